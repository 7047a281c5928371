"""The README's Makefile pipeline (examples/Makefile) on the tiny model: `make -j2` runs every stage,
a second `make` has nothing to do, and touching one photo reruns only what it affects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parent.parent / "examples" / "Makefile"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make"),
]


def make(folder: Path, *args: str, model: Path) -> subprocess.CompletedProcess[str]:
    knobs = [
        f"SELFAGE={folder / 'selfage'}",
        f"BASE_MODEL={model}",
        "DEVICE=cpu",
        "STEPS=1",
        "SIZE=128",
        "REG_COUNT=2",
        "REG_FLAGS=--steps 1 --no-verify",
        "TRAIN_FLAGS=--batch-size 1 --rank 2 --checkpoint-every 0",
        "EDIT_FLAGS=--ddim-steps 2 --inner-steps 1",
        "AGES=20,60",
    ]
    # A user's own make, not a sub-make of `make test` (CI): without MAKELEVEL/MAKEFLAGS from the parent,
    # make neither prints "Entering directory" lines nor joins the parent's job server.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(
        ["make", "-f", str(MAKEFILE), *knobs, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )


def test_makefile_pipeline_builds_once_and_reruns_only_what_a_photo_affects(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "to-edit").mkdir()
    shutil.copy(astronaut_path, tmp_path / "photos" / "30_beach.png")
    shutil.copy(hopper_path, tmp_path / "photos" / "40_office.jpg")
    shutil.copy(astronaut_path, tmp_path / "to-edit" / "25_holiday.png")
    wrapper = tmp_path / "selfage"  # `selfage` of this checkout, whatever is on PATH
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m selfage_cli "$@"\n')
    wrapper.chmod(0o755)

    first = make(tmp_path, "-j2", model=tiny_model_dir)
    assert first.returncode == 0, first.stdout + first.stderr
    project = tmp_path / "me"
    built = [
        project / "refs" / "aligned" / "30_beach.png",
        project / "refs" / "aligned" / "40_office.png",
        project / "reg" / "generated",
        project / "runs" / "main" / "pytorch_lora_weights.safetensors",
        project / "edits" / "25_holiday" / "strip.png",
        project / "edits" / "25_holiday" / "60.png",
    ]
    assert all(path.exists() for path in built), [p for p in built if not p.exists()]
    assert "--base-model " + str(tiny_model_dir) in first.stdout  # BASE_MODEL reaches every model stage

    again = make(tmp_path, "-q", model=tiny_model_dir)
    assert again.returncode == 0, again.stdout + again.stderr  # nothing to rebuild

    later = time.time() + 5
    os.utime(tmp_path / "photos" / "40_office.jpg", (later, later))
    planned = make(tmp_path, "-n", model=tiny_model_dir)
    assert planned.returncode == 0, planned.stderr
    commands = [line.split()[1] + " " + line.split()[2] for line in planned.stdout.splitlines()]
    assert commands == [
        "align photos/40_office.jpg",
        "label-ages -p",
        "train --run",
        "edit to-edit/25_holiday.png",
    ], planned.stdout
