"""Edit benchmark: 1 photo → K ages (default 9: 0, 10, …, 80), inversion and editing timed apart.

For each inversion mode (``null-text``, ``negative-prompt``, ``direct``):

- ``edit_inversion``: seconds of ``invert`` (VAE encode + DDIM inversion + null-text optimisation),
  with the number of inner steps actually run (random weights change how often early stopping fires);
- ``edit_batched``: seconds of ``edit_ages`` with every age in one pass (or ``--max-batch`` chunks),
  VAE decode included, with the UNet calls made;
- ``edit_naive_loop`` (in the modes of ``naive_modes``): the same editing with ``max_batch=1`` — the
  reference's per-age loop of two-prompt runs — on the same inversion, dtype and attention backend,
  with ``ratio`` = naive seconds / batched seconds;
- ``edit_whole``: inversion + batched editing seconds, and the peak memory of that span, with the
  reconstruction the edit records (its source branch against the photo at the model's resolution:
  ``reconstruction_psnr`` in dB, ``reconstruction_ssim``; selfage_cli/edit/engine/reconstruction.py) and, in
  latent space, ``reconstruction_latent_rmse`` against the encoded photo (what the inversion itself
  keeps, without the VAE's loss).

A short warm-up (2 DDIM steps, 2 inner steps, batched and naive) runs first so one-off start-up costs
(CUDA context, cuBLAS/cuDNN autotuning) are not timed.

``compile_inversion`` runs the inversion's UNet through ``torch.compile(mode="reduce-overhead")``
(the library's ``compile_unet=True``: CUDA graphs on a GPU). Its warm-up (the short inversion, which
compiles and records the graphs) is timed on its own as ``edit_compile_warmup``; every line of such a
run has ``settings.compile_inversion = true``. ``cuda_graph`` (on, as in the library) replays the
inversion's UNet from CUDA graphs on a GPU; ``settings.cuda_graph`` says which way a line ran, and
``unet_runner`` how it actually ran (``eager`` after a fallback).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.harness import Recorder, measuring_memory, repeat_timed, time_call

REFERENCE = {
    "gpu": "NVIDIA H100 80GB",
    "null_text_inversion_seconds": 95.5,
    "editing_9_ages_seconds": 41.3,
    "whole_edit_seconds": 140.5,
    "whole_edit_peak_memory_gb": 11.8,
}


def bench_edit(
    recorder: Recorder,
    pipe: Any,
    *,
    device: torch.device,
    photo: Path,
    ages: list[int],
    source_age: int = 35,
    steps: int = 50,
    inner_steps: int = 10,
    guidance: float = 7.5,
    modes: list[str] | tuple[str, ...] = ("null-text", "negative-prompt", "direct"),
    naive_modes: list[str] | tuple[str, ...] = ("null-text",),
    repeats: int = 1,
    max_batch: int | None = None,
    warmup: bool = True,
    compile_inversion: bool = False,
    cuda_graph: bool = True,
    graph_check_steps: int = 0,
    lora_applied: str = "none",
) -> list[dict[str, Any]]:
    """Run the edit measurements on ``pipe`` and emit their JSON lines; return the records."""
    from selfage_cli.edit.engine import P2PSettings, edit_ages, encode_image, invert
    from selfage_cli.edit.prompts import build_prompts

    prompts = build_prompts(source_age, list(ages), gender=None, identifier="sks")
    settings = P2PSettings()
    with Image.open(photo) as handle:
        image = handle.convert("RGB")
    base = {
        "ages": list(ages),
        "source_age": source_age,
        "ddim_steps": steps,
        "guidance": guidance,
        "photo": photo.name,
        "compile_inversion": compile_inversion,
        "cuda_graph": cuda_graph,
        "lora_applied": lora_applied,
    }
    records: list[dict[str, Any]] = []

    if graph_check_steps:
        try:
            records += graph_check(
                recorder, pipe, image, prompts.source, modes, graph_check_steps, inner_steps, guidance
            )
        except Exception as exc:  # noqa: BLE001 - an experimental path: record why, go on without it
            records.append(recorder.emit("edit_graph_check", {"ddim_steps": graph_check_steps}, error=repr(exc)))
            cuda_graph = False
            base["cuda_graph"] = False

    if warmup:
        warmup_seconds, short = time_call(
            lambda: invert(
                pipe,
                image,
                prompts.source,
                mode=modes[0],
                steps=min(steps, 2),
                guidance=guidance,
                inner_steps=min(inner_steps, 2),
                compile_unet=compile_inversion,
                cuda_graph=cuda_graph,
            ),
            device,
        )
        if compile_inversion:
            records.append(
                recorder.emit(
                    "edit_compile_warmup",
                    {**base, "mode": modes[0]},
                    [warmup_seconds],
                    seconds_note="compile + graph recording + 2 short steps",
                )
            )
        edit_ages(pipe, short, prompts, settings=settings, max_batch=max_batch, guidance=guidance)
        if naive_modes:
            edit_ages(pipe, short, prompts, settings=settings, max_batch=1, guidance=guidance)

    for mode in modes:
        mode_settings = {**base, "mode": mode, "inner_steps": inner_steps if mode == "null-text" else 0}
        with measuring_memory(device) as peak:
            inv_samples, inversion = repeat_timed(
                lambda mode=mode: invert(
                    pipe,
                    image,
                    prompts.source,
                    mode=mode,
                    steps=steps,
                    guidance=guidance,
                    inner_steps=inner_steps,
                    compile_unet=compile_inversion,
                    cuda_graph=cuda_graph,
                ),
                device,
                repeats,
                warmup=0,
            )
            edit_samples, result = repeat_timed(
                lambda inversion=inversion: edit_ages(
                    pipe, inversion, prompts, settings=settings, max_batch=max_batch, guidance=guidance
                ),
                device,
                repeats,
                warmup=0,
            )
            memory = peak.read()
        records.append(
            recorder.emit(
                "edit_inversion",
                mode_settings,
                inv_samples,
                memory,
                inner_steps_run=inversion.total_inner_steps,
                inner_steps_max=steps * inner_steps if mode == "null-text" else 0,
                engine_seconds=inversion.seconds,
                unet_runner=inversion.unet_runner,
                graph_differences=inversion.graph_differences,
                graph_eager_noise=inversion.graph_eager_noise,
                reference=REFERENCE,
            )
        )
        batched = recorder.emit(
            "edit_batched",
            {**mode_settings, "max_batch": max_batch},
            edit_samples,
            memory,
            unet_calls=result.unet_calls,
            passes=len(result.chunks) or None,
            sampling_seconds=result.seconds,
            images=len(result.images),
            reference=REFERENCE,
        )
        records.append(batched)
        whole = [i + e for i, e in zip(inv_samples, edit_samples, strict=True)]
        rebuilt = reconstruction(image, result.images[0])
        # In latent space too: the VAE alone limits the PSNR (with random weights to ~9 dB in every mode).
        encoded = encode_image(pipe, image).to(result.latents.device)
        latent_rmse = float(((result.latents[:1] - encoded) ** 2).mean().sqrt())
        records.append(
            recorder.emit(
                "edit_whole",
                mode_settings,
                whole,
                memory,
                inversion_seconds=records[-2]["seconds"],
                editing_seconds=batched["seconds"],
                reconstruction_psnr=rebuilt["psnr"],
                reconstruction_ssim=rebuilt["ssim"],
                reconstruction_latent_rmse=latent_rmse,
                reference=REFERENCE,
            )
        )
        if mode in naive_modes:
            with measuring_memory(device) as peak:
                naive_samples, naive = repeat_timed(
                    lambda inversion=inversion: edit_ages(
                        pipe, inversion, prompts, settings=settings, max_batch=1, guidance=guidance
                    ),
                    device,
                    repeats,
                    warmup=0,
                )
                naive_memory = peak.read()
            ratio = statistics.median(naive_samples) / batched["seconds"]
            naive_record = recorder.emit(
                "edit_naive_loop",
                {**mode_settings, "max_batch": 1},
                naive_samples,
                naive_memory,
                unet_calls=naive.unet_calls,
                passes=len(naive.chunks) or None,
                sampling_seconds=naive.seconds,
                batched_seconds=batched["seconds"],
                ratio=ratio,
                reference=REFERENCE,
            )
            records.append(naive_record)
            records.append(
                recorder.emit(
                    "edit_batching_ratio",
                    {**mode_settings, "max_batch": max_batch},
                    ratio=ratio,
                    naive_seconds=naive_record["seconds"],
                    batched_seconds=batched["seconds"],
                    max_abs_latent_difference=float((naive.latents - result.latents).abs().max()),
                )
            )
    by_mode = {r["settings"]["mode"]: r for r in records if r["what"] == "edit_inversion"}
    if "null-text" in by_mode and "negative-prompt" in by_mode:
        records.append(
            recorder.emit(
                "edit_inversion_speedup",
                {**base, "inner_steps": inner_steps},
                speedup=by_mode["null-text"]["seconds"] / by_mode["negative-prompt"]["seconds"],
                null_text_seconds=by_mode["null-text"]["seconds"],
                negative_prompt_seconds=by_mode["negative-prompt"]["seconds"],
            )
        )
    return records


def reconstruction(photo: Image.Image, rebuilt: Image.Image) -> dict[str, Any]:
    """The edit's own reconstruction scores (PSNR, SSIM; no identity: random weights draw no face)."""
    from selfage_cli.edit.engine.reconstruction import score_reconstruction

    return score_reconstruction(photo, rebuilt, identity=False)


def graph_check(
    recorder: Recorder,
    pipe: Any,
    image: Image.Image,
    prompt: str,
    modes: list[str] | tuple[str, ...],
    steps: int,
    inner_steps: int,
    guidance: float,
) -> list[dict[str, Any]]:
    """``edit_graph_check``: a short inversion per mode eagerly and from CUDA graphs; their largest differences.

    The graphs replay the same kernels, so the null embeddings and x_T should agree to rounding.
    """
    from selfage_cli.edit.engine import invert

    records = []
    for mode in modes:
        runs = {}
        for graph in (False, True):
            seconds, runs[graph] = time_call(
                lambda graph=graph, mode=mode: invert(
                    pipe,
                    image,
                    prompt,
                    mode=mode,
                    steps=steps,
                    guidance=guidance,
                    inner_steps=inner_steps,
                    cuda_graph=graph,
                ),
                recorder.device,
            )
            runs[graph].seconds = seconds
        eager, graphed = runs[False], runs[True]
        records.append(
            recorder.emit(
                "edit_graph_check",
                {"mode": mode, "ddim_steps": steps, "inner_steps": inner_steps if mode == "null-text" else 0},
                unet_runner=graphed.unet_runner,
                graph_differences=graphed.graph_differences,
                graph_eager_noise=graphed.graph_eager_noise,
                eager_seconds=eager.seconds,
                graph_seconds=graphed.seconds,
                inner_steps_run=[sum(eager.inner_steps_run), sum(graphed.inner_steps_run)],
                max_abs_null_embedding_difference=float((eager.null_embeddings - graphed.null_embeddings).abs().max()),
                max_abs_x_t_difference=float((eager.x_t - graphed.x_t).abs().max()),
                x_t_abs_max=float(eager.x_t.abs().max()),
            )
        )
    return records
