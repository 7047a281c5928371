"""Training benchmark: seconds per optimisation step, with and without the latent cache.

The paper's configuration: B = 4 reference + 4 regularisation images per step at the model's native
resolution (sd15: 512², tiny: 128²), LoRA rank 16 on the UNet *and* the text encoder, the full
SelfAge loss (MSE + contrastive, prior preservation), AdamW with gradient clipping. Each variant
builds a fresh random pipeline (the trainer adds LoRA layers to it), runs ``warmup`` untimed steps,
then times ``steps`` single steps; the median is the figure. Peak memory covers the whole variant
(trainer set-up, latent caching and every step), which is what the reference's 16.8 GB measures.

The reference (public SelfAge code, H100, fp32, VAE re-encoding every step) takes 0.507 s per step;
the goal is ≤ 0.17 s and ≤ 12 GB on the same GPU.
"""

from __future__ import annotations

import functools
import gc
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from benchmarks.harness import Recorder, measuring_memory, time_call
from selfage_cli.models import dtype_name, native_resolution

REF_AGES = (30, 35, 40)
REG_AGES = (10, 30, 50, 70)


def write_training_images(folder: Path, resolution: int, faces: list[Path]) -> tuple[list[Path], list[Path]]:
    """Reference and regularisation PNGs at ``resolution`` made from the packaged portraits.

    Their content does not matter for timing; they are real photos so the VAE sees realistic input.
    """
    folder.mkdir(parents=True, exist_ok=True)
    refs, regs = [], []
    variants = (
        lambda im: im,
        ImageOps.mirror,
        lambda im: ImageOps.crop(im, border=im.size[0] // 16),
        lambda im: ImageOps.mirror(ImageOps.crop(im, border=im.size[0] // 12)),
    )
    for index, age in enumerate(REF_AGES):
        refs.append(_save_square(faces[0], variants[index % len(variants)], folder / f"ref_{age}.png", resolution))
    for index, age in enumerate(REG_AGES):
        regs.append(_save_square(faces[-1], variants[index % len(variants)], folder / f"reg_{age}.png", resolution))
    return refs, regs


def _save_square(source: Path, transform: Callable[[Image.Image], Image.Image], out: Path, size: int) -> Path:
    with Image.open(source) as handle:
        image = ImageOps.fit(transform(handle.convert("RGB")), (size, size), Image.Resampling.LANCZOS)
    image.save(out)
    return out


def train_images(refs: list[Path], regs: list[Path], config: Any) -> tuple[list[Any], list[Any]]:
    """:class:`TrainImage` lists with the method's prompts and integer ages."""
    from selfage_cli.train.engine.data import TrainImage

    ref_images = [
        TrainImage(p.stem, p, age, config.prompt(age, instance=True), str(p))
        for p, age in zip(refs, REF_AGES, strict=True)
    ]
    reg_images = [
        TrainImage(p.stem, p, age, config.prompt(age, instance=False), str(p))
        for p, age in zip(regs, REG_AGES, strict=True)
    ]
    return ref_images, reg_images


def bench_train(
    recorder: Recorder,
    make_pipe: Callable[[], Any],
    *,
    device: torch.device,
    dtype: str,
    faces: list[Path],
    steps: int = 20,
    warmup: int = 2,
    batch_size: int = 4,
    rank: int = 16,
    num_refs: int = 3,
    latent_cache_modes: tuple[bool, ...] = (True, False),
    compile_mode: str | None = None,
    profile_steps: int = 0,
    cuda_graph: bool = False,
) -> list[dict[str, Any]]:
    """Time training steps for each latent-cache mode; emit one JSON line per mode plus their ratio.

    ``compile_mode`` (a torch.compile mode, None = off) sets the trainer's ``--compile``/``--compile-mode``;
    ``profile_steps`` > 0 adds a ``train_profile`` line per mode (GPU kernel time per step and the top
    kernels, from torch.profiler) after the timed steps. ``cuda_graph`` sets ``train --cuda-graph`` (the
    step replayed from one CUDA graph); its eager warm-up and recording then fall in the untimed steps.
    """
    from selfage_cli.train.config import TrainConfig
    from selfage_cli.train.engine.cuda_graph import WARMUP_STEPS
    from selfage_cli.train.engine.loop import Trainer

    records = []
    with tempfile.TemporaryDirectory(prefix="selfage-bench-train-") as tmp:
        for cache in latent_cache_modes:
            with measuring_memory(device) as peak:
                pipe = make_pipe()
                resolution = native_resolution(pipe)
                config = TrainConfig(
                    base_model=f"random-{recorder.model}",
                    steps=warmup + steps,
                    batch_size=batch_size,
                    rank=rank,
                    num_refs=num_refs,
                    train_text_encoder=True,
                    resolution=resolution,
                    checkpoint_every=0,
                    latent_cache=cache,
                    compile=compile_mode is not None,
                    compile_mode=compile_mode or TrainConfig.compile_mode,
                    cuda_graph=cuda_graph,
                    device=str(device),
                    dtype=dtype,
                )
                refs, regs = write_training_images(Path(tmp) / f"r{resolution}", resolution, faces)
                ref_images, reg_images = train_images(refs, regs, config)
                setup_seconds, trainer = time_call(
                    functools.partial(Trainer, pipe, config, ref_images, reg_images), device
                )
                untimed = max(warmup, WARMUP_STEPS + 1) if trainer.graphed is not None else warmup
                warmup_seconds, _ = time_call(functools.partial(run_steps, trainer, untimed), device)
                samples, losses = [], []
                for _ in range(steps):
                    seconds, stats = time_call(trainer.step, device)
                    samples.append(seconds)
                    losses.append(stats["loss"])
                memory = peak.read()
                if profile_steps:
                    records.append(profile_train(recorder, trainer, profile_steps, cache))
            settings = {
                "latent_cache": cache,
                "batch": f"{batch_size}+{batch_size}",
                "resolution": resolution,
                "rank": rank,
                "text_encoder_lora": True,
                "num_refs": num_refs,
                "timed_steps": steps,
                "warmup_steps": untimed,  # more than asked with --cuda-graph: its warm-up and recording
                "weights_dtype": dtype_name(trainer.weight_dtype),
                "compile": compile_mode,
                "cuda_graph": cuda_graph,
            }
            graphed = trainer.graphed
            records.append(
                recorder.emit(
                    "train_step",
                    settings,
                    samples,
                    memory,
                    setup_seconds=setup_seconds,
                    warmup_seconds=warmup_seconds,
                    loss_finite=all(math.isfinite(v) for v in losses),
                    step_runner=graphed.runner if graphed is not None else None,
                    graph_loss_difference=graphed.loss_difference if graphed is not None else None,
                    graph_failure=graphed.failure if graphed is not None else None,
                    reference={
                        "seconds": 0.507,
                        "peak_memory_gb": 16.8,
                        "gpu": "NVIDIA H100 80GB",
                        "note": "public SelfAge code, fp32, VAE re-encoding every step",
                    },
                )
            )
            del trainer, pipe
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    by_mode = {r["settings"]["latent_cache"]: r for r in records}
    if True in by_mode and False in by_mode:
        records.append(
            recorder.emit(
                "train_latent_cache_speedup",
                {"batch": f"{batch_size}+{batch_size}", "rank": rank},
                speedup=by_mode[False]["seconds"] / by_mode[True]["seconds"],
                seconds_with_cache=by_mode[True]["seconds"],
                seconds_without_cache=by_mode[False]["seconds"],
            )
        )
    return records


def run_steps(trainer: Any, steps: int) -> None:
    for _ in range(steps):
        trainer.step()


def profile_train(recorder: Recorder, trainer: Any, steps: int, cache: bool) -> dict[str, Any]:
    """``train_profile``: per-step GPU kernel time (vs. the profiled wall time, which the profiler
    itself slows) and the 12 costliest kernels."""
    import time

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run_steps(trainer, steps)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    # Kernel rows only: an operator's own device time repeats the time of the kernels it launched
    # (the first H100 profile summed both and so read twice the kernel time).
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernel_seconds = sum(device_us(e) for e in kernels) / steps / 1e6
    top = sorted(kernels, key=device_us, reverse=True)[:12]
    return recorder.emit(
        "train_profile",
        {"latent_cache": cache, "profiled_steps": steps},
        seconds=wall,
        device_kernel_seconds_per_step=kernel_seconds,
        device_busy_share=kernel_seconds / wall if wall else None,
        top_kernels=[
            {"name": e.key[:80], "ms_per_step": device_us(e) / steps / 1e3, "calls_per_step": e.count / steps}
            for e in top
        ],
        kernels_per_step=sum(e.count for e in kernels) / steps,
        cpu_ops_per_step=sum(e.count for e in events) / steps,
    )


def bench_train_graph_check(
    recorder: Recorder,
    make_pipe: Callable[[], Any],
    *,
    device: torch.device,
    dtype: str,
    faces: list[Path],
    steps: int = 50,
    batch_size: int = 4,
    rank: int = 16,
    num_refs: int = 3,
) -> list[dict[str, Any]]:
    """``train_graph_check``: ``steps`` steps replayed from the CUDA graph against ``steps`` eager steps from
    the same seeds (fresh pipelines, the paper's configuration): the largest relative difference of the
    per-step losses and of the final LoRA weights. Off a CUDA GPU both runs are eager (``step_runner``
    says so) and agree exactly."""
    from selfage_cli.train.config import TrainConfig
    from selfage_cli.train.engine.loop import Trainer
    from selfage_cli.train.engine.lora import lora_state

    runs: dict[bool, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="selfage-bench-graph-") as tmp:
        for graph in (True, False):
            pipe = make_pipe()
            resolution = native_resolution(pipe)
            config = TrainConfig(
                base_model=f"random-{recorder.model}",
                steps=steps,
                batch_size=batch_size,
                rank=rank,
                num_refs=num_refs,
                resolution=resolution,
                checkpoint_every=0,
                cuda_graph=graph,
                device=str(device),
                dtype=dtype,
            )
            refs, regs = write_training_images(Path(tmp) / f"r{resolution}", resolution, faces)
            ref_images, reg_images = train_images(refs, regs, config)
            trainer = Trainer(pipe, config, ref_images, reg_images)
            seconds, losses = time_call(lambda trainer=trainer: [trainer.step()["loss"] for _ in range(steps)], device)
            weights = {f"unet.{k}": v.float().cpu().clone() for k, v in lora_state(trainer.unet).items()}
            weights.update({f"text.{k}": v.float().cpu().clone() for k, v in lora_state(trainer.text_encoder).items()})
            runs[graph] = {"losses": losses, "weights": weights, "runner": trainer.step_runner, "seconds": seconds}
            del trainer, pipe
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    graphed, eager = runs[True], runs[False]
    loss_rel = [abs(g - e) / max(abs(e), 1e-12) for g, e in zip(graphed["losses"], eager["losses"], strict=True)]
    weight_rel = {
        name: float((graphed["weights"][name] - w).abs().max() / w.abs().max().clamp_min(1e-12))
        for name, w in eager["weights"].items()
    }
    worst = max(weight_rel, key=weight_rel.get) if weight_rel else None
    return [
        recorder.emit(
            "train_graph_check",
            {"steps": steps, "batch": f"{batch_size}+{batch_size}", "rank": rank, "weights_dtype": dtype},
            step_runner=graphed["runner"],
            eager_runner=eager["runner"],
            max_relative_loss_difference=max(loss_rel) if loss_rel else None,
            relative_loss_difference_last=loss_rel[-1] if loss_rel else None,
            max_relative_weight_difference=weight_rel[worst] if worst else None,
            worst_weight=worst,
            graph_seconds=graphed["seconds"],
            eager_seconds=eager["seconds"],
            losses_graph=[round(v, 6) for v in graphed["losses"]],
            losses_eager=[round(v, 6) for v in eager["losses"]],
        )
    ]
