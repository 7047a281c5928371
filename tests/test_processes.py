"""Several processes of one command (``accelerate launch``), for real: two CPU processes over gloo.

Train: the main process decides and writes, both train, the loss log holds the mean over the processes
of each step's loss, one summary comes out. Edit: the photos are split, one summary covers both.
An error the main process reports is printed once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_train_run import make_train_project, tiny_config

from selfage_cli.project import Project, find

TRAIN_ARGS = ["--steps", "3", "--batch-size", "1", "--rank", "4", "--lr", "1e-2", "--resolution", "128"]
TRAIN_ARGS += ["--seed", "3", "--checkpoint-every", "2", "--device", "cpu", "--dtype", "fp32"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(args: list[str]) -> list[str]:
    """``accelerate launch`` with two processes on the CPU, running ``selfage ARGS``."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + ["--main_process_port", str(_free_port()), "-m", "selfage_cli", *args]


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch_command(args), cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=600)


def first_step_loss(model: Path, project: Project, process: int) -> float:
    """The first step's loss of process ``process`` of 2, computed here in one process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from selfage_cli.models import load_pipeline
    from selfage_cli.train.engine.loop import Trainer
    from selfage_cli.train.images import select_references, select_regularisation

    class AsProcess(Accelerator):
        process_index = process
        num_processes = 2

    AcceleratorState._reset_state(reset_partial_state=True)
    config = tiny_config(model, batch_size=1)  # what TRAIN_ARGS say
    manifest = project.read()
    refs = select_references(project, manifest, config.num_refs, config.instance_prompt)
    regs = select_regularisation(project, manifest, config.class_prompt)
    pipe = load_pipeline(model, device="cpu")
    trainer = Trainer(pipe, config, refs, regs, accelerator=AsProcess(cpu=True))
    loss, _ = trainer.forward_loss(trainer.step_inputs(0))
    return float(loss.detach())


@pytest.mark.slow
def test_training_with_two_processes(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    result = launch(["train", "--run", "two", *TRAIN_ARGS, "--base-model", str(tiny_model_dir), "-p", "proj"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # one summary, from the main process
    assert "trained run two: 3 steps" in lines[0]
    assert result.stderr.count("references used") == 1  # the other process prints nothing
    assert "process 1:" not in result.stderr

    entry = find(project.read()["runs"], "two", key="name")
    assert entry["finished"] is True and entry["processes"] == 2 and entry["steps_done"] == 3
    run_dir = project.root / "runs" / "two"
    assert json.loads((run_dir / "pytorch_lora_weights.json").read_text())["processes"] == 2
    assert json.loads((run_dir / "checkpoints" / "step-000002" / "state.json").read_text())["processes"] == 2
    log = [json.loads(line) for line in (run_dir / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]  # written once

    # Step 1 (before any update): the log holds the mean of both processes' micro-batch losses; process 1
    # drew another micro-batch (item group 1) with its own noise.
    losses = [first_step_loss(tiny_model_dir, project, process) for process in (0, 1)]
    assert losses[0] != pytest.approx(losses[1], abs=1e-4)
    assert log[0]["loss"] == pytest.approx(sum(losses) / 2, abs=2e-5)


@pytest.mark.slow
def test_an_error_of_the_main_process_is_printed_once(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    (project.root / "runs" / "taken").mkdir(parents=True)
    (project.root / "runs" / "taken" / "loss.jsonl").write_text("")
    result = launch(
        ["train", "--run", "taken", *TRAIN_ARGS, "--base-model", str(tiny_model_dir), "-p", "proj"], tmp_path
    )
    assert result.returncode != 0
    assert result.stderr.count("runs/taken already holds an unfinished run") == 1, result.stderr[-3000:]
    assert "process 1:" not in result.stderr
    assert (project.root / "runs" / "taken" / "loss.jsonl").read_text() == ""  # nothing touched


@pytest.mark.slow
def test_editing_with_two_processes_splits_the_photos(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    photos = []
    for source in (astronaut_path, hopper_path):
        face = Image.open(source).convert("RGB")
        side = min(face.size)
        photos.append(tmp_path / f"{source.stem}.png")
        face.crop((0, 0, side, side)).resize((128, 128)).save(photos[-1])
    args = ["edit", *map(str, photos), "--aligned", "--ages", "20,60", "--source-age", "30", "--no-lora"]
    args += ["--ddim-steps", "2", "--inner-steps", "1", "--device", "cpu", "--dtype", "fp32"]
    args += ["--base-model", str(tiny_model_dir), "-p", "proj", "--json"]
    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # one JSON summary, covering both processes
    summary: dict[str, Any] = json.loads(lines[0])
    assert summary["ok"] is True and len(summary["done"]) == 2  # each photo edited once, by one process
    assert summary["inversions_computed"] == 2
    edits = Project(tmp_path / "proj").read()["edits"]
    assert sorted(entry["id"] for entry in edits) == sorted(photo.stem for photo in photos)
    for entry in edits:
        assert sorted(entry["outputs"]) == ["20", "60"]
        for output in entry["outputs"].values():
            assert (tmp_path / "proj" / output).is_file()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_single_process_commands_refuse_a_launcher(rank: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    result = CliRunner().invoke(app, ["make-reg", "-p", str(tmp_path / "proj")], terminal_width=400)
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    if rank == "0":
        assert "`selfage make-reg` runs in one process, but it was started as 2" in said
    else:
        assert said == ""  # the main process says it
    assert not (tmp_path / "proj").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_process_after_the_same_step_and_the_run_resumes_bit_identically(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    """Ctrl-C in a terminal reaches the launcher and both processes (and the launcher passes it on):
    they agree at the end of a step, the main process checkpoints that step and says so once. Resumed
    with two processes, the run ends with the weights of an uninterrupted two-process run."""
    import signal
    import time

    from safetensors.torch import load_file

    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    steps_total = 40
    args = [*TRAIN_ARGS, "--base-model", str(tiny_model_dir), "-p", "proj"]
    args[args.index("--steps") + 1] = str(steps_total)
    args[args.index("--checkpoint-every") + 1] = "0"
    process = subprocess.Popen(
        launch_command(["train", "--run", "cut", *args]),
        cwd=tmp_path,
        env=launch_env(),
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    log = project.root / "runs" / "cut" / "loss.jsonl"
    deadline = time.monotonic() + 180
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what the terminal does
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0  # the launcher's code for a failed process (130 here)
    run = find(project.read()["runs"], "cut", key="name")
    steps = run["steps_done"]
    assert run["finished"] is False and 2 <= steps < steps_total, stderr[-3000:]
    said = " ".join(stderr.split())
    assert said.count(f"training interrupted at step {steps}/{steps_total}") == 1, stderr[-3000:]
    assert "process 1:" not in said
    assert (project.root / "runs" / "cut" / "checkpoints" / f"step-{steps:06d}").is_dir()
    assert len(log.read_text().splitlines()) == steps

    resumed = launch(["train", "--run", "cut", "--resume", *args], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = launch(["train", "--run", "whole", *args], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = load_file(str(project.root / "runs" / "cut" / "pytorch_lora_weights.safetensors"))
    uninterrupted = load_file(str(project.root / "runs" / "whole" / "pytorch_lora_weights.safetensors"))
    assert cut.keys() == uninterrupted.keys()
    assert all(torch.equal(cut[key], uninterrupted[key]) for key in cut)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, steps_total + 1))
