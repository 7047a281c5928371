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
    from selfage_cli.train.data import TrainImage

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
) -> list[dict[str, Any]]:
    """Time training steps for each latent-cache mode; emit one JSON line per mode plus their ratio."""
    from selfage_cli.train.config import TrainConfig
    from selfage_cli.train.loop import Trainer

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
                    device=str(device),
                    dtype=dtype,
                )
                refs, regs = write_training_images(Path(tmp) / f"r{resolution}", resolution, faces)
                ref_images, reg_images = train_images(refs, regs, config)
                setup_seconds, trainer = time_call(
                    functools.partial(Trainer, pipe, config, ref_images, reg_images), device
                )
                for _ in range(warmup):
                    trainer.step()
                samples, losses = [], []
                for _ in range(steps):
                    seconds, stats = time_call(trainer.step, device)
                    samples.append(seconds)
                    losses.append(stats["loss"])
                memory = peak.read()
            settings = {
                "latent_cache": cache,
                "batch": f"{batch_size}+{batch_size}",
                "resolution": resolution,
                "rank": rank,
                "text_encoder_lora": True,
                "num_refs": num_refs,
                "timed_steps": steps,
                "warmup_steps": warmup,
                "weights_dtype": dtype_name(trainer.weight_dtype),
            }
            records.append(
                recorder.emit(
                    "train_step",
                    settings,
                    samples,
                    memory,
                    setup_seconds=setup_seconds,
                    loss_finite=all(math.isfinite(v) for v in losses),
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
