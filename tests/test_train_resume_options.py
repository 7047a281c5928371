"""`train --resume` with options (issue 17, item 7): options a resumed run cannot honour are refused by
name (exit 2, nothing written); a larger --steps extends the run to the weights of a run started with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.models import save_random_model
from selfage_cli.project import Project, find
from tests.test_train_run import make_train_project, run, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def two_steps(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> dict[str, Any]:
    """A project with a finished 2-step run "r" (a checkpoint after each step) and a 4-step run "whole"."""
    root = tmp_path_factory.mktemp("resume") / "proj"
    project = make_train_project(root, [astronaut_path, hopper_path])
    run(project, tiny_config(tiny_model_dir, steps=2, checkpoint_every=1), "r")
    run(project, tiny_config(tiny_model_dir, steps=4, checkpoint_every=1), "whole")
    other = save_random_model(root.parent / "other-model", arch="tiny", seed=1)
    return {"project": project, "model": tiny_model_dir, "other": other}


def invoke(project: Project, *args: str) -> Any:
    return runner.invoke(app, ["train", "--resume", "--run", "r", "-p", str(project.root), *args], terminal_width=200)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--base-model", "OTHER", "--steps", "8"],
            "--base-model OTHER cannot be used with --resume: run r was trained on",
        ),
        (["--rank", "8"], "--rank 8 cannot be used with --resume: run r was started with rank 4"),
        (["--lr", "0.5"], "--lr 0.5 cannot be used with --resume"),
        (["--no-train-text-encoder"], "--no-train-text-encoder cannot be used with --resume"),
        (["--refs", "PHOTOS"], "--refs cannot be used with --resume: run r goes on with the images it started with"),
        (["--steps", "1"], "--steps 1: run r is finished at 2 steps; give more than 2 to extend it"),
    ],
)
def test_options_a_resume_cannot_honour_are_refused_by_name(
    two_steps: dict[str, Any], args: list[str], named: str, tmp_path: Path
) -> None:
    project = two_steps["project"]
    args = [str(two_steps["other"]) if a == "OTHER" else str(tmp_path) if a == "PHOTOS" else a for a in args]
    named = named.replace("OTHER", str(two_steps["other"]))
    before = (project.root / "selfage.json").read_text(), (project.root / "runs" / "r" / "loss.jsonl").read_text()
    if "--base-model" not in args:  # the run's own model, given: accepted
        args = ["--base-model", str(two_steps["model"]), *args]
    result = invoke(project, *args)
    assert result.exit_code == 2, result.output
    assert named in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert before == (
        (project.root / "selfage.json").read_text(),
        (project.root / "runs" / "r" / "loss.jsonl").read_text(),
    )


def test_the_same_values_and_engineering_options_are_accepted(two_steps: dict[str, Any]) -> None:
    project = two_steps["project"]
    result = invoke(project, "--rank", "4", "--base-model", str(two_steps["model"]), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output


def test_a_larger_steps_extends_a_finished_run_to_the_run_started_with_it(two_steps: dict[str, Any]) -> None:
    project = two_steps["project"]
    result = invoke(project, "--steps", "4", "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "--steps 4 extends run r from 2 to 4 steps" in result.output
    entry = find(project.read()["runs"], "r", key="name")
    assert entry["finished"] is True and entry["steps_done"] == 4 and entry["config"]["steps"] == 4
    folder = project.root / "runs" / "r"
    assert [json.loads(line)["step"] for line in (folder / "loss.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    extended = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    whole = load_file(str(project.root / "runs" / "whole" / "pytorch_lora_weights.safetensors"))
    assert extended.keys() == whole.keys()
    for key in whole:
        assert torch.equal(extended[key], whole[key]), key
