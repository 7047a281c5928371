"""Whole-command benchmark: ``selfage train`` and ``selfage edit`` timed as a user waits for them.

Set-up (untimed): the random pipeline saved as a diffusers folder (``selfage random-model``'s
``save_random_model``), a random DEX checkpoint, and a project with 3 aligned, labelled references and
4 labelled regularisation images at the model's native resolution (made from the packaged portraits).

- ``command_train``: ``selfage train --steps N`` (the paper's 800) from that project: model load,
  latent cache, the steps, saving the LoRA, recording the run; ``repeats`` runs, each a new run name.
- ``command_edit``: ``selfage edit PHOTO --aligned --ages 0,10,…,80 --side-by-side --gif`` with the
  LoRA of the first training run and the source age estimated by DEX: model and LoRA load, DEX,
  inversion, editing, PNG and GIF writing; each repeat in a fresh copy of the project (no cached
  inversion, no recorded age).

Each command runs in its own process (``python -m benchmarks.run_command``: the CLI, plus its peak
memory written at exit); ``seconds`` is the median wall time from its start to its exit, ``samples``
every repeat. Memory: ``peak_memory_gib`` (GPU: ``torch.cuda.max_memory_allocated``; CPU: the
process's RSS high-water mark), the largest over the repeats.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from benchmarks.harness import Recorder

REF_AGES = (30, 35, 40)
REG_AGES = (10, 30, 50, 70)
EDIT_AGES = (0, 10, 20, 30, 40, 50, 60, 70, 80)
ROOT = Path(__file__).resolve().parent.parent


def write_random_dex(path: Path, seed: int = 1234) -> Path:
    """A full-size random DEX VGG-16 checkpoint (the SAM naming, ``fc8-101``), He-initialised (~540 MB)."""
    from selfage_cli.ages.engine.dex import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes().items():
        key = name.replace("fc8_101", "fc8-101")
        if name.endswith(".weight"):
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / math.prod(shape[1:]))
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    torch.save(state, path)
    return path


def make_project(root: Path, faces: list[Path], size: int, base_model: Path) -> Path:
    """A project with 3 aligned, labelled references and 4 labelled regularisation images; returns the
    aligned photo to edit (outside the project)."""
    from selfage_cli.project import Project

    project = Project(root)

    def square(source: Path, turn: float) -> Image.Image:
        with Image.open(source) as handle:
            image = ImageOps.fit(handle.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        return image.rotate(turn, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))

    (root / "refs" / "aligned").mkdir(parents=True, exist_ok=True)
    (root / "reg").mkdir(parents=True, exist_ok=True)
    with project.update() as manifest:
        manifest.setdefault("config", {})["base_model"] = str(base_model)
        for i, age in enumerate(REF_AGES):
            path = root / "refs" / "aligned" / f"{age}_me.png"
            square(faces[0], 4 * i).save(path)
            manifest["references"].append(
                {
                    "id": path.stem,
                    "source": str(path),
                    "aligned": project.relative(path),
                    "age": age,
                    "age_source": "filename",
                }
            )
        for i, age in enumerate(REG_AGES):
            path = root / "reg" / f"{age}_other.png"
            square(faces[-1], -5 * i).save(path)
            manifest["regularisation"]["images"].append(
                {"id": path.stem, "source": str(path), "age": age, "age_source": "filename"}
            )
        manifest["regularisation"]["folder"] = str(root / "reg")
    photo = root.parent / "photo_to_edit.png"
    square(faces[0], 0).save(photo)
    return photo


def run_command(args: list[str], cwd: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run ``selfage ARGS`` in a new process; wall seconds, exit code, peak memory, and its JSON summary."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report = Path(handle.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_command", str(report), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    try:
        peak = json.loads(report.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        peak = {}
    report.unlink(missing_ok=True)
    summary = None
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except json.JSONDecodeError:
                pass
    return {
        "seconds": seconds,
        "exit_code": done.returncode,
        "stderr_tail": done.stderr[-800:] if done.returncode else None,
        "summary": summary,
        **peak,
    }


def bench_commands(
    recorder: Recorder,
    *,
    model: str,
    device: torch.device,
    dtype: str,
    faces: list[Path],
    repeats: int = 3,
    train_steps: int = 800,
    ages: tuple[int, ...] | list[int] = EDIT_AGES,
    ddim_steps: int = 50,
    inner_steps: int = 10,
    workdir: Path | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time ``selfage train`` then ``selfage edit`` (see the module doc); one JSON line each."""
    from selfage_cli.models import build_random_pipeline, native_resolution

    records = []
    with tempfile.TemporaryDirectory(prefix="selfage-bench-commands-", dir=workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        pipe = build_random_pipeline(model, seed=seed, device="cpu")
        size = native_resolution(pipe)
        pipe.save_pretrained(root / "model", safe_serialization=True)
        del pipe
        dex = write_random_dex(root / "dex_random.pth")
        project = root / "project"
        photo = make_project(project, faces, size, root / "model")
        setup_seconds = time.perf_counter() - start
        common = ["--device", str(device), "--dtype", dtype, "--json", "-q"]

        train_args = ["--steps", str(train_steps), "--checkpoint-every", "0"]
        runs = []
        for k in range(repeats):
            runs.append(
                run_command(["train", "-p", str(project), *train_args, "--run", f"bench{k}", *common], cwd=root)
            )
        records.append(
            _emit(recorder, "command_train", {"steps": train_steps, "resolution": size}, runs, setup_seconds)
        )

        edit_args = [str(photo), "--aligned", "--ages", ",".join(str(a) for a in ages), "--side-by-side", "--gif"]
        edit_args += ["--ddim-steps", str(ddim_steps), "--inner-steps", str(inner_steps), "--dex-weights", str(dex)]
        edit_args += ["--lora", "bench0"]
        runs = []
        for k in range(repeats):
            fresh = root / f"edit{k}"
            shutil.copytree(project, fresh, ignore=shutil.ignore_patterns("cache", "edits"))
            runs.append(run_command(["edit", *edit_args, "-p", str(fresh), *common], cwd=root))
            shutil.rmtree(fresh, ignore_errors=True)
        settings = {"ages": list(ages), "ddim_steps": ddim_steps, "inner_steps": inner_steps, "resolution": size}
        records.append(
            _emit(recorder, "command_edit", {**settings, "side_by_side": True, "gif": True, "dex": "random"}, runs)
        )
    return records


def _emit(
    recorder: Recorder,
    what: str,
    settings: dict[str, Any],
    runs: list[dict[str, Any]],
    setup_seconds: float | None = None,
) -> dict[str, Any]:
    ok = [r for r in runs if r["exit_code"] == 0]
    samples = [r["seconds"] for r in ok]
    peaks = [r.get("peak_gpu_bytes") or r.get("peak_rss_bytes") or 0 for r in ok]
    kind = "cuda_max_memory_allocated" if any(r.get("peak_gpu_bytes") for r in ok) else "process_ru_maxrss"
    last = ok[-1]["summary"] if ok and ok[-1].get("summary") else {}
    extra: dict[str, Any] = {
        "repeat_seconds": samples,
        "exit_codes": [r["exit_code"] for r in runs],
        "peak_memory_gib": round(max(peaks) / 2**30, 3) if peaks else None,
        "peak_memory_kind": kind,
        "peak_memory_bytes": max(peaks) if peaks else None,
    }
    if setup_seconds is not None:
        extra["setup_seconds"] = setup_seconds
    if len(ok) < len(runs):
        extra["error"] = next(r["stderr_tail"] for r in runs if r["exit_code"] != 0)
    if what == "command_edit" and last:
        done = (last.get("done") or [{}])[0]
        extra["lora_applied"] = done.get("lora_applied")
        extra["unet_runner"] = (done.get("inversion") or {}).get("unet_runner")
        extra["dtype_used"] = (done.get("settings") or {}).get("dtype")
    if samples:
        extra["median_of"] = len(samples)
    return recorder.emit(what, settings, samples or None, None, **extra)
