"""LoRA effect benchmark: does a fast precision keep what the LoRA changes? (docs/benchmarks.md)

1. Train a LoRA with the paper's settings (800 steps, lr 1e-6, rank 16, MSE + contrastive loss, text-encoder
   LoRA) in fp32 (TF32 off), and, for the training check, another from the same seeds under the default
   training precision (``train_dtype``, bf16: bf16 frozen weights under bf16 autocast, TF32 on a GPU).
2. Edit one photo (the packaged astronaut) to ``ages`` (10, 40, 80) with null-text inversion and
   prompt-to-prompt: (a) fp32 with the fp32 LoRA, (b) fp32 without a LoRA, (c) each candidate
   ``--dtype`` of ``selfage edit`` (:mod:`selfage_cli.edit.engine.precision`) with the LoRA, plus
   ``fp32-branch`` (the LoRA as PEFT's unfused branch in fp32, which ``fp32`` fuses) and a repeat of (a).
3. Per age: R = ‖c − a‖ / ‖b − a‖ on the decoded images (values 0–1) and on the edited latents.
   R ≤ 0.1 means the candidate's own error is at most a tenth of the LoRA's effect.

Lines: ``lora_effect`` (one per candidate: ``r_image``/``r_latent`` per age, ``max_r``, ``lora_applied``,
``seconds`` of its inversion + editing), ``lora_effect_choice`` (the candidates meeting R ≤ 0.1 at every
age, the fastest of them: what ``--dtype auto`` should be on this device), ``lora_effect_train``
(R_train per age = ‖edit(LoRA_default) − edit(LoRA_fp32)‖ / ‖edit(LoRA_fp32) − edit(no LoRA)‖, both
edited in fp32; goal ≤ 0.2), ``lora_effect_inner_step`` (the null-text inner step, forward + backward
w.r.t. the embedding at batch 1, with and without the LoRA at the chosen precision, side by side).
"""

from __future__ import annotations

import gc
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.harness import Recorder, synchronize, time_call
from selfage_cli.edit.engine.precision import PRECISIONS, EditPrecision, apply_precision, set_tf32

R_GOAL = 0.1  # edit precision: R ≤ 0.1 at every age
R_TRAIN_GOAL = 0.2  # training precision
FP32_BRANCH = EditPrecision("fp32-branch", "fp32", "branch", "fp32", summary="fp32, LoRA as PEFT's unfused branch")
CPU_CANDIDATES = ("bf16", "bf16-lora32", "bf16-fused", "fp16-vae32")
GPU_CANDIDATES = ("tf32", "bf16", "bf16-lora32", "bf16-fused", "fp16", "fp16-vae32")


@dataclass
class Edited:
    """One edit of the photo: the edited latents and decoded images of every age, and its seconds."""

    latents: torch.Tensor  # (ages, C, h, w) fp32, CPU
    images: torch.Tensor  # (ages, H, W, 3) in [0, 1], fp32, CPU
    seconds: float
    lora_applied: str
    unet_runner: str


def ratio(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per age (first axis): ‖c − a‖ / ‖b − a‖ (inf where b equals a and c does not; 0 where both do)."""
    out = []
    for ci, ai, bi in zip(c.double(), a.double(), b.double(), strict=True):
        num, den = float((ci - ai).norm()), float((bi - ai).norm())
        out.append(num / den if den > 0 else (0.0 if num == 0 else math.inf))
    return out


def train_lora(
    make_pipe: Callable[[], Any],
    folder: Path,
    *,
    device: torch.device,
    dtype: str,
    faces: list[Path],
    steps: int,
    lr: float,
    rank: int,
    seed: int = 42,
) -> tuple[Path, float, list[float]]:
    """Train a LoRA (paper's configuration, ``steps`` at ``lr``) and save it in ``folder``; (file, seconds, losses).

    ``dtype`` fp32 runs without TF32 (the reference's training); bf16 as ``selfage train`` runs by default
    on a GPU (bf16 weights under autocast, TF32, the CUDA-graph step where it works).
    """
    from benchmarks.train import train_images, write_training_images
    from selfage_cli.models import native_resolution
    from selfage_cli.train.config import TrainConfig
    from selfage_cli.train.engine.loop import Trainer

    pipe = make_pipe()
    resolution = native_resolution(pipe)
    config = TrainConfig(
        base_model="random",
        steps=steps,
        lr=lr,
        rank=rank,
        resolution=resolution,
        checkpoint_every=0,
        device=str(device),
        dtype=dtype,
        seed=seed,
    )
    refs, regs = write_training_images(folder / "images", resolution, faces)
    ref_images, reg_images = train_images(refs, regs, config)

    def run(pipe: Any = pipe) -> list[float]:
        trainer = Trainer(pipe, config, ref_images, reg_images)
        if dtype == "fp32":
            set_tf32(False)  # the Trainer turns TF32 on for CUDA; the fp32 reference runs without it
        losses = [trainer.step()["loss"] for _ in range(steps)]
        trainer.release_graph()
        trainer.save_lora(folder)
        return losses

    seconds, losses = time_call(run, device)
    del pipe
    _free(device)
    return folder / "pytorch_lora_weights.safetensors", seconds, losses


def edit_photo(
    make_pipe: Callable[[], Any],
    precision: EditPrecision,
    lora: Path | None,
    image: Image.Image,
    prompts: Any,
    *,
    device: torch.device,
    steps: int,
    inner_steps: int,
    guidance: float,
) -> Edited:
    """Invert and edit ``image`` with a fresh pipeline in ``precision`` (the LoRA loaded as ``selfage edit`` does)."""
    from selfage_cli.edit.engine import P2PSettings, edit_ages, invert

    pipe = make_pipe()
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="selfage")
    applied = apply_precision(pipe, precision, with_lora=lora is not None)

    def run(pipe: Any = pipe) -> Any:
        torch.manual_seed(0)
        inversion = invert(pipe, image, prompts.source, steps=steps, guidance=guidance, inner_steps=inner_steps)
        result = edit_ages(pipe, inversion, prompts, settings=P2PSettings(), guidance=guidance, decode=False)
        return inversion, result, decode_float(pipe, result.latents[1:])

    seconds, (inversion, result, images) = time_call(run, device)
    edited = Edited(result.latents[1:].float().cpu(), images, seconds, applied, inversion.unet_runner)
    set_tf32(False)
    del pipe, result
    _free(device)
    return edited


@torch.no_grad()
def decode_float(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The VAE decode of :func:`selfage_cli.edit.engine.decode_latents` in the VAE's dtype, kept as fp32
    values in [0, 1] (N, H, W, 3) before the 8-bit rounding, which would hide differences under 1/255."""
    vae = pipe.vae
    param = next(vae.parameters())
    out = []
    for latent in latents:
        pixels = vae.decode((latent[None] / vae.config.scaling_factor).to(param.device, param.dtype)).sample
        out.append((pixels[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu())
    return torch.stack(out)


def edit_pipeline(
    make_pipe: Callable[..., Any], precision: EditPrecision, *, device: torch.device, lora: str, rank: int = 16
) -> tuple[Any, str]:
    """The edit benchmark's pipeline in ``precision``: plain (``lora="none"``), or with a random rank-``rank``
    LoRA (``"random"``: B ~ N(0, 8e-4), about what 800 Adam steps at lr 1e-6 can move it) loaded from a
    file as ``selfage edit`` loads one; (pipeline, lora_applied)."""
    from selfage_cli.train.engine.lora import add_lora, save_lora

    if lora == "none":
        pipe = make_pipe(precision.load_dtype(False))
        return pipe, apply_precision(pipe, precision, with_lora=False)
    with tempfile.TemporaryDirectory(prefix="selfage-bench-lora-") as tmp:
        donor = make_pipe(torch.float32)
        add_lora(donor.unet, donor.text_encoder, rank=rank, seed=7)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in [*donor.unet.named_parameters(), *donor.text_encoder.named_parameters()]:
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 8e-4)
        file = save_lora(Path(tmp), donor.unet, donor.text_encoder)
        del donor
        _free(device)
        pipe = make_pipe(precision.load_dtype(True))
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="selfage")
        return pipe, apply_precision(pipe, precision, with_lora=True)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_lora_effect(
    recorder: Recorder,
    make_pipe: Callable[[], Any],
    *,
    device: torch.device,
    photo: Path,
    faces: list[Path],
    ages: list[int] | tuple[int, ...] = (10, 40, 80),
    source_age: int = 35,
    train_steps: int = 800,
    lr: float = 1e-6,
    rank: int = 16,
    train_dtype: str | None = "bf16",
    steps: int = 50,
    inner_steps: int = 10,
    guidance: float = 7.5,
    candidates: list[str] | tuple[str, ...] | None = None,
    inner_step_repeats: int = 20,
    checks: bool = True,
) -> list[dict[str, Any]]:
    """The measurement of the module doc; ``make_pipe()`` builds a fresh fp32 pipeline each time."""
    from selfage_cli.edit.prompts import build_prompts

    if candidates is None:
        candidates = GPU_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES
    unknown = [c for c in candidates if c not in PRECISIONS]
    if unknown:
        raise SystemExit(f"--lora-candidates: {', '.join(unknown)} not known; use {', '.join(PRECISIONS)}.")
    prompts = build_prompts(source_age, list(ages), gender=None, identifier="sks")
    with Image.open(photo) as handle:
        image = handle.convert("RGB")
    base = {
        "ages": list(ages),
        "source_age": source_age,
        "ddim_steps": steps,
        "inner_steps": inner_steps,
        "guidance": guidance,
        "photo": photo.name,
        "train_steps": train_steps,
        "lr": lr,
        "rank": rank,
    }
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="selfage-bench-lora-") as tmp:
        trained = {}
        for dtype in ["fp32"] + ([train_dtype] if train_dtype and train_dtype != "fp32" else []):
            file, seconds, losses = train_lora(
                make_pipe,
                Path(tmp) / dtype,
                device=device,
                dtype=dtype,
                faces=faces,
                steps=train_steps,
                lr=lr,
                rank=rank,
            )
            trained[dtype] = file
            records.append(
                recorder.emit(
                    "lora_effect_training",
                    {**base, "train_dtype": dtype},
                    [seconds],
                    seconds_per_step=seconds / max(1, train_steps),
                    loss_first=losses[0] if losses else None,
                    loss_last=losses[-1] if losses else None,
                    loss_finite=all(math.isfinite(v) for v in losses),
                )
            )

        def edit(precision: EditPrecision, lora: Path | None) -> Edited:
            return edit_photo(
                make_pipe,
                precision,
                lora,
                image,
                prompts,
                device=device,
                steps=steps,
                inner_steps=inner_steps,
                guidance=guidance,
            )

        fp32 = PRECISIONS["fp32"]
        a = edit(fp32, trained["fp32"])
        b = edit(fp32, None)
        runs: dict[str, tuple[EditPrecision, Edited]] = {}
        if checks:  # determinism (R = 0) and fused vs unfused fp32 (within 1e-5)
            runs["fp32 (repeat)"] = (fp32, edit(fp32, trained["fp32"]))
            runs["fp32-branch"] = (FP32_BRANCH, edit(FP32_BRANCH, trained["fp32"]))
        for name in candidates:
            if PRECISIONS[name].tf32 and device.type != "cuda":
                records.append(
                    recorder.emit(
                        "lora_effect",
                        {**base, "candidate": name},
                        skipped="TF32 exists only on CUDA GPUs: measured by benchmarks/gpu.sh",
                    )
                )
                continue
            runs[name] = (PRECISIONS[name], edit(PRECISIONS[name], trained["fp32"]))
        lora_norms = {
            "image": [float(x) for x in (b.images - a.images).flatten(1).norm(dim=1)],
            "latent": [float(x) for x in (b.latents - a.latents).flatten(1).norm(dim=1)],
        }
        records.append(
            recorder.emit(
                "lora_effect",
                {**base, "candidate": "fp32"},
                [a.seconds],
                r_image=[0.0] * len(ages),
                r_latent=[0.0] * len(ages),
                max_r=0.0,
                lora_applied=a.lora_applied,
                unet_runner=a.unet_runner,
                lora_effect_norm=lora_norms,
                no_lora_seconds=b.seconds,
                note="(a): the reference; (b) is the same without the LoRA",
            )
        )
        passing: list[tuple[float, str]] = [(a.seconds, "fp32")]
        for name, (precision, c) in runs.items():
            r_image, r_latent = ratio(c.images, a.images, b.images), ratio(c.latents, a.latents, b.latents)
            max_r = max(r_image + r_latent)
            records.append(
                recorder.emit(
                    "lora_effect",
                    {**base, "candidate": name},
                    [c.seconds],
                    r_image=r_image,
                    r_latent=r_latent,
                    max_r=max_r,
                    meets_goal=max_r <= R_GOAL,
                    lora_applied=c.lora_applied,
                    unet_runner=c.unet_runner,
                    max_abs_latent_difference=float((c.latents - a.latents).abs().max()),
                    weights=precision.weights,
                    vae=precision.vae,
                    tf32=precision.tf32,
                )
            )
            if name in PRECISIONS and max_r <= R_GOAL:
                passing.append((c.seconds, name))
        fastest = min(passing)[1]
        records.append(
            recorder.emit(
                "lora_effect_choice",
                {**base, "goal": f"R <= {R_GOAL} at every age"},
                passing=[name for _, name in sorted(passing)],
                auto=fastest,
                candidate_seconds={name: seconds for seconds, name in passing},
            )
        )
        if train_dtype and train_dtype in trained and train_dtype != "fp32":
            d = edit(fp32, trained[train_dtype])
            r_image, r_latent = ratio(d.images, a.images, b.images), ratio(d.latents, a.latents, b.latents)
            max_r = max(r_image + r_latent)
            records.append(
                recorder.emit(
                    "lora_effect_train",
                    {**base, "train_dtype": train_dtype, "goal": f"R_train <= {R_TRAIN_GOAL} at every age"},
                    r_image=r_image,
                    r_latent=r_latent,
                    max_r=max_r,
                    meets_goal=max_r <= R_TRAIN_GOAL,
                )
            )
        if inner_step_repeats:
            records.append(
                inner_step(recorder, make_pipe, PRECISIONS[fastest], trained["fp32"], device, inner_step_repeats)
            )
    return records


def inner_step(
    recorder: Recorder,
    make_pipe: Callable[[], Any],
    precision: EditPrecision,
    lora: Path,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """``lora_effect_inner_step``: seconds of one null-text inner step (UNet forward + backward w.r.t. the
    null embedding, batch 1) without and with the LoRA, at ``precision``, alternating in one process."""
    import statistics

    from selfage_cli.edit.engine.ddim import encode_text

    seconds: dict[str, list[float]] = {"without": [], "with": []}
    applied = {}
    pipes = {}
    for key, file in (("without", None), ("with", lora)):
        pipe = make_pipe()
        if file is not None:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="selfage")
        applied[key] = apply_precision(pipe, precision, with_lora=file is not None)
        pipes[key] = pipe
    any_pipe = pipes["without"]
    side = int(any_pipe.unet.config.sample_size)
    dtype = next(any_pipe.unet.parameters()).dtype
    latent = torch.randn(1, 4, side, side, device=device)
    context = encode_text(any_pipe, [""]).to(device)

    def step(pipe: Any) -> None:
        null = context.clone().requires_grad_(True)
        out = pipe.unet(latent.to(dtype), 500, encoder_hidden_states=null.to(dtype), return_dict=False)[0]
        out.float().square().mean().backward()

    for pipe in pipes.values():
        step(pipe)  # warm-up
    for index in range(max(1, repeats)):
        order = list(pipes.items()) if index % 2 == 0 else list(pipes.items())[::-1]  # no order bias
        for key, pipe in order:
            synchronize(device)
            seconds[key].append(time_call(lambda pipe=pipe: step(pipe), device)[0])
    set_tf32(False)
    ratio_ = statistics.median(seconds["with"]) / statistics.median(seconds["without"])
    record = recorder.emit(
        "lora_effect_inner_step",
        {"precision": precision.name, "repeats": repeats, "cuda_graph": False},
        seconds["with"],
        without_lora_seconds=statistics.median(seconds["without"]),
        ratio=ratio_,
        goal="<= 1.05",
        lora_applied=applied["with"],
    )
    del pipes
    _free(device)
    return record
