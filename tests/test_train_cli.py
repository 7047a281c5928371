"""``selfage train`` from the command line: from raw photos (runs align + label-ages itself), bad inputs, Ctrl-C."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.project import Project, find
from selfage_cli.train.engine.loop import Trainer

runner = CliRunner()
FAST = [
    "--steps",
    "1",
    "--batch-size",
    "1",
    "--rank",
    "2",
    "--resolution",
    "128",
    "--device",
    "cpu",
    "--checkpoint-every",
    "0",
]


def invoke(project: Path, *args: str) -> Any:
    return runner.invoke(app, ["train", "-p", str(project), *args], terminal_width=200)


def write_reg_folder(folder: Path, portrait: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(portrait) as image:
        face = image.convert("RGB").resize((128, 128))
    for index, age in enumerate((12, 35, 70)):
        face.rotate(8 * index).save(folder / f"{age}_other{index}.png")
    return folder


@pytest.fixture(scope="module")
def from_raw_photos(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> dict[str, Any]:
    """`selfage train --refs DIR --reg DIR` on an empty project: ages come from the file names."""
    root = tmp_path_factory.mktemp("train_cli")
    refs = root / "me"
    refs.mkdir()
    shutil.copy(astronaut_path, refs / "30_a.png")
    shutil.copy(hopper_path, refs / "40_b.jpg")
    reg = write_reg_folder(root / "reg", hopper_path)
    project = root / "proj"
    result = invoke(
        project,
        "--refs",
        str(refs),
        "--reg",
        str(reg),
        "--base-model",
        str(tiny_model_dir),
        "--run",
        "raw",
        "--json",
        *FAST,
    )
    return {"project": project, "result": result, "refs": refs, "reg": reg, "model": tiny_model_dir}


def test_train_from_raw_photos_runs_align_and_label_ages_itself(from_raw_photos: dict[str, Any]) -> None:
    result = from_raw_photos["result"]
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["command"] == "train" and summary["ok"] is True
    manifest = Project(from_raw_photos["project"]).read()
    refs = {entry["id"]: entry for entry in manifest["references"]}
    assert {e["age"] for e in refs.values()} == {30, 40}
    assert all(e["aligned"] and e["age_source"] == "filename" for e in refs.values())
    assert sorted(img["age"] for img in manifest["regularisation"]["images"]) == [12, 35, 70]
    run = find(manifest["runs"], "raw", key="name")
    assert run["finished"] is True and run["steps_done"] == 1
    assert [r["age"] for r in run["references"]] == [30, 40]  # first by file name: 30_a.png, 40_b.jpg
    assert (Project(from_raw_photos["project"]).path(run["lora"])).is_file()
    assert "only 2 labelled reference" in result.output  # --num-refs 3 asked for, 2 exist


def test_finished_run_needs_force(from_raw_photos: dict[str, Any]) -> None:
    project, model = from_raw_photos["project"], str(from_raw_photos["model"])
    result = invoke(project, "--base-model", model, "--run", "raw", *FAST)
    assert result.exit_code == 2
    assert "already holds a finished run; pass --force" in result.output
    from_env = runner.invoke(  # SELFAGE_RUN names the run where --run cannot be passed (torchrun)
        app, ["train", "-p", str(project), "--base-model", model, *FAST], env={"SELFAGE_RUN": "raw"}, terminal_width=200
    )
    assert from_env.exit_code == 2 and "--run raw: runs/raw already holds a finished run" in from_env.output
    missing = invoke(project, "--base-model", str(project / "no-such-model"), "--run", "other", *FAST)
    assert missing.exit_code == 2 and "no-such-model" in missing.output


def test_ctrl_c_saves_a_checkpoint_and_exits_130(
    from_raw_photos: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(self, stats):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "on_step_end", interrupt)
    project = from_raw_photos["project"]
    args = ["--base-model", str(from_raw_photos["model"]), "--run", "cut", *FAST]
    args[args.index("--steps") + 1] = "3"
    result = invoke(project, *args)
    assert result.exit_code == 130, result.output
    assert "--resume --run cut" in result.output
    run = find(Project(project).read()["runs"], "cut", key="name")
    assert run["finished"] is False and run["steps_done"] == 1
    assert (project / "runs" / "cut" / "checkpoints" / "step-000001" / "optimizer.pt").is_file()


def test_bad_inputs_exit_2_with_the_fix(tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path) -> None:
    model = ["--base-model", str(tiny_model_dir)]
    empty = tmp_path / "empty"
    result = invoke(empty, *model, *FAST)
    assert result.exit_code == 2 and "no aligned references" in result.output and "--refs" in result.output

    result = invoke(empty, "--refs", str(tmp_path / "nowhere"), *model, *FAST)
    assert result.exit_code == 2 and "no such folder" in result.output

    project = Project(tmp_path / "proj")
    aligned = project.subdir("refs", "aligned") / "me.png"
    with Image.open(astronaut_path) as image:
        image.convert("RGB").resize((128, 128)).save(aligned)
    with project.update() as manifest:
        manifest["references"].append(
            {"id": "me", "source": str(astronaut_path), "aligned": "refs/aligned/me.png", "age": None}
        )
    result = invoke(project.root, *model, *FAST)
    assert result.exit_code == 2 and "has an age" in result.output

    with project.update() as manifest:
        manifest["references"][0]["age"] = 33
    result = invoke(project.root, *model, *FAST)
    assert result.exit_code == 2
    assert "label-ages --reg" in result.output and "make-reg" in result.output

    for bad in (["--steps", "0"], ["--resolution", "100"], ["--resume", "--force"]):
        assert invoke(project.root, *model, *FAST, *bad).exit_code == 2
    assert not (project.root / "runs").exists() or not any((project.root / "runs").iterdir())
    assert project.read()["runs"] == []


def test_force_replaces_a_finished_run(from_raw_photos: dict[str, Any]) -> None:
    project = from_raw_photos["project"]
    before = (project / "runs" / "raw" / "loss.jsonl").stat().st_mtime_ns
    result = invoke(project, "--base-model", str(from_raw_photos["model"]), "--run", "raw", "--force", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert (project / "runs" / "raw" / "loss.jsonl").stat().st_mtime_ns != before
    runs = [r for r in Project(project).read()["runs"] if r["name"] == "raw"]
    assert len(runs) == 1 and runs[0]["finished"] is True


@pytest.mark.slow
def test_sigterm_stops_after_the_current_step_and_saves_it(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    """A job scheduler's (or `timeout`'s) SIGTERM is a Ctrl-C that waits for the step to end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train_run import make_train_project

    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    args = ["--base-model", str(tiny_model_dir), "--run", "long", *FAST]
    args[args.index("--steps") + 1] = "5000"
    command = [sys.executable, "-m", "selfage_cli", "train", "-p", str(project.root), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = project.root / "runs" / "long" / "loss.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    run = find(Project(project.root).read()["runs"], "long", key="name")
    steps = run["steps_done"]
    assert run["finished"] is False and 2 <= steps < 5000
    assert f"training interrupted at step {steps}/5000" in " ".join(stderr.split())
    assert (project.root / "runs" / "long" / "checkpoints" / f"step-{steps:06d}").is_dir()
    assert len(log.read_text().splitlines()) == steps  # whole steps: the log and the checkpoint agree
    assert os.path.isfile(project.root / "runs" / "long" / "pytorch_lora_weights.safetensors")
