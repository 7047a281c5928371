"""Two commands writing the same outputs at once (issue 17, item 1), with real processes: the second
stops with one sentence (exit 2) before it writes anything; the first goes on undisturbed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.locks import FolderBusy, hold, lock_file_for
from selfage_cli.project import Project, find

runner = CliRunner()
TRAIN = ["--batch-size", "1", "--rank", "2", "--resolution", "128", "--device", "cpu", "--checkpoint-every", "0"]


def one_line(text: str) -> str:
    return " ".join(text.split())


def selfage(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "selfage_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_a_second_train_of_the_same_run_is_refused_while_the_first_trains(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    from test_train_run import make_train_project

    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    common = ["train", "-p", str(project.root), "--base-model", str(tiny_model_dir), "--run", "dup", *TRAIN]
    first = selfage(*common, "--steps", "5000", "--seed", "1")
    log = project.root / "runs" / "dup" / "loss.jsonl"
    lock = lock_file_for(project.root / "runs" / "dup")
    deadline = time.monotonic() + 120
    while not lock.is_file() and first.poll() is None and time.monotonic() < deadline:  # the run is the first's
        time.sleep(0.02)
    try:
        # The repro (another seed), with --force (which used to delete the first's files and train anew).
        second = selfage(*common, "--steps", "3", "--seed", "2", "--force")
        out, err = second.communicate(timeout=120)
        while not (log.is_file() and log.read_text().strip()) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]  # still training, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=120)
    folder = project.root / "runs" / "dup"
    assert second.returncode == 2, err[-2000:]
    message = one_line(err)
    assert f"{folder} is in use by another selfage process (pid {first.pid}); wait for it to finish or " in message
    assert "choose another --run name." in message and "Traceback" not in err and out == ""
    assert first.returncode == 130, first_err[-2000:]  # the first stopped by SIGTERM only, at a step boundary
    run = find(project.read()["runs"], "dup", key="name")
    assert run["config"]["seed"] == 1 and run["finished"] is False
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, run["steps_done"] + 1))  # one run's steps, none interleaved
    assert not lock_file_for(folder).exists()  # the lock file goes with its holder


@pytest.mark.slow
def test_a_second_edit_of_the_same_photo_is_refused_while_the_first_writes(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path
) -> None:
    """A long edit runs in another process; this edit of the same photo (even with --force) writes nothing, exit 2."""
    folder = Project(project_dir).root / "edits" / "astronaut"
    base = [str(astronaut_path), "--aligned", "--source-age", "40", "--no-lora", "--device", "cpu", "--dtype", "fp32"]
    model = ["-p", str(project_dir), "--base-model", str(tiny_model_dir)]
    first = selfage("edit", *base, "--ages", "20,70", "--ddim-steps", "500", "--inner-steps", "10", *model)
    deadline = time.monotonic() + 120
    while not lock_file_for(folder).is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert first.poll() is None, first.communicate()[1][-2000:]
        fast = ["--ages", "20", "--ddim-steps", "2", "--inner-steps", "1", "--force"]
        result = runner.invoke(app, ["edit", *base, *fast, *model], terminal_width=400)
        assert first.poll() is None  # the first was still editing all along
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert (
        f"{folder} is in use by another selfage process (pid {first.pid}); wait for it to finish, then edit" in message
    )
    assert not folder.exists() and not Project(project_dir).read()["edits"]


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "a"
    with hold(folder, "wait"), pytest.raises(FolderBusy, match="in use by another selfage process"):  # noqa: SIM117
        with hold(folder, "wait"):  # flock is per open file: refused as for another process
            pass
    with hold(folder, "wait"):  # free again
        pass
    assert not any((tmp_path / "runs").iterdir())
