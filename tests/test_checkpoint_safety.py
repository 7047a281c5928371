"""Hostile and broken checkpoints (issue 17, items 3 and 4): a pickle that would run code is refused by
name and never runs, wherever selfage reads one (DEX weights, ``train --resume``, ``doctor``); a bad
latest checkpoint is skipped, said, and the run resumes from the newest one that loads."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from selfage_cli import console
from selfage_cli.cli import app
from selfage_cli.errors import SelfageError
from selfage_cli.project import Project, find
from selfage_cli.torch_files import CODE_REFUSED, CodeRefused, is_code_refusal, load_plain
from selfage_cli.train.engine.loop import Trainer

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs"


class RunsShell:
    """Would run ``touch MARKER`` through os.system (a module torch's weights-only loader blocks)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TouchesFile:
    """Would call Path.touch (a global torch's weights-only loader does not allow)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- item 3: the refusal, recognised by type and text --------------------------------------------------
@pytest.mark.parametrize("payload", [RunsShell, TouchesFile])
def test_a_pickle_that_would_run_code_is_refused_by_name_and_never_runs(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state": payload(marker)}, path)
    with pytest.raises(CodeRefused) as info:
        load_plain(path)
    assert str(info.value) == f"{path}: {CODE_REFUSED}."
    assert "weights_only" not in str(info.value) and not marker.exists()


def test_only_the_weights_only_refusal_counts_as_code(tmp_path: Path) -> None:
    import pickle

    assert not is_code_refusal(pickle.UnpicklingError("Weights only load failed. Unsupported operand 149"))
    assert not is_code_refusal(RuntimeError("Unsupported global: GLOBAL os.system"))  # not the unpickler's type
    assert is_code_refusal(
        pickle.UnpicklingError("Weights only load failed. WeightsUnpickler error: Unsupported class os.system")
    )
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(SelfageError, match="not a readable PyTorch file") as info:
        load_plain(garbled)
    assert CODE_REFUSED not in str(info.value)


def test_dex_weights_that_would_run_code_are_refused_and_doctor_does_not_call_them_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "dex_age_classifier.pth"
    torch.save({"state_dict": {"conv1_1.weight": RunsShell(marker)}}, evil)
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    project = tmp_path / "proj"
    project.mkdir()

    result = runner.invoke(app, ["doctor", "-p", str(project), "--dex-weights", str(evil), "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout.strip().splitlines()[-1])["checks"]}
    assert checks["DEX weights"]["ok"] is False
    assert f"{evil}: {CODE_REFUSED}" in checks["DEX weights"]["detail"]
    text = runner.invoke(app, ["doctor", "-p", str(project), "--dex-weights", str(evil)], terminal_width=300)
    assert "unusable DEX weights" in one_line(text.output) and "ok      DEX" not in text.output

    from selfage_cli.ages.engine.dex import load_dex

    with pytest.raises(SelfageError) as info:
        load_dex(evil, "cpu")
    assert str(info.value).startswith(f"--dex-weights {evil}: {CODE_REFUSED}.")
    assert "weights_only" not in str(info.value) and "garbled" not in str(info.value)
    assert not marker.exists()


def test_a_base_model_with_a_code_running_weights_file_is_refused_naming_the_file(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """diffusers loads a ``.bin`` weights file with torch.load(weights_only=True) for us: its refusal is ours."""
    from selfage_cli.models import load_pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "ran"
    torch.save({"conv_in.weight": RunsShell(marker)}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(SelfageError) as info:
        load_pipeline(model, device="cpu", dtype=torch.float32)
    bin_file = model / "unet" / "diffusion_pytorch_model.bin"
    assert str(info.value) == f"--base-model {model}: {bin_file}: {CODE_REFUSED}; use a model saved as safetensors."
    assert not marker.exists()


def test_troubleshooting_quotes_the_refusal_exactly() -> None:
    """docs/troubleshooting.md names the sentence the user sees, word for word."""
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    quoted = re.findall(r"`([^`]*would run code[^`]*)`", text)
    assert quoted == [f"FILE: {CODE_REFUSED}"]  # FILE: the file named, as every message names it


# ---- item 4: resume from the newest checkpoint that loads ----------------------------------------------
@pytest.fixture(scope="module")
def interrupted(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
):
    """A 4-step run interrupted after step 2: checkpoints step-000001 and step-000002."""
    from test_train_run import make_train_project, run, tiny_config

    project = make_train_project(tmp_path_factory.mktemp("ckpt") / "proj", [astronaut_path, hopper_path])
    config = tiny_config(tiny_model_dir, steps=4, checkpoint_every=1, keep_checkpoints=2)
    original = Trainer.on_step_end

    def stop_after_two(self: Trainer, stats: dict[str, float]) -> None:
        if stats["step"] == 2:
            raise KeyboardInterrupt

    Trainer.on_step_end = stop_after_two
    try:
        with pytest.raises(SelfageError, match="interrupted at step 2/4"):
            run(project, config, "r")
    finally:
        Trainer.on_step_end = original
    names = sorted(p.name for p in (project.root / "runs" / "r" / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000002"]
    return {"project": project.root, "config": config}


def copy_of(interrupted: dict[str, Any], tmp_path: Path) -> Project:
    root = tmp_path / "proj"
    shutil.copytree(interrupted["project"], root, symlinks=True)
    return Project(root)


def break_truncated_unet(folder: Path, marker: Path) -> str:
    file = folder / "unet.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return "unet.safetensors is truncated or garbled"


def break_garbled_optimizer(folder: Path, marker: Path) -> str:
    (folder / "optimizer.pt").write_bytes(b"\x00 not a checkpoint" * 50)
    return "optimizer.pt is truncated or garbled"


def break_missing_rng(folder: Path, marker: Path) -> str:
    (folder / "rng.pt").unlink()
    return "rng.pt is missing"


def break_malicious_optimizer(folder: Path, marker: Path) -> str:
    torch.save({"state": {0: RunsShell(marker)}, "param_groups": []}, folder / "optimizer.pt")
    return f"optimizer.pt: {CODE_REFUSED}"


def break_malicious_rng(folder: Path, marker: Path) -> str:
    torch.save({"torch": TouchesFile(marker)}, folder / "rng.pt")
    return f"rng.pt: {CODE_REFUSED}"


def break_state_json(folder: Path, marker: Path) -> str:
    (folder / "state.json").write_text('{"step": ')
    return "state.json cannot be read"


BREAKS = [
    break_truncated_unet,
    break_garbled_optimizer,
    break_missing_rng,
    break_malicious_optimizer,
    break_malicious_rng,
    break_state_json,
]


@pytest.mark.parametrize("spoil", BREAKS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_a_bad_latest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(
    interrupted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spoil: Any
) -> None:
    from test_train_run import run

    project = copy_of(interrupted, tmp_path)
    marker = tmp_path / "ran"
    reason = spoil(project.root / "runs" / "r" / "checkpoints" / "step-000002", marker)
    console.WARNINGS.clear()
    steps: list[int] = []
    monkeypatch.setattr(Trainer, "on_step_end", lambda self, stats: steps.append(int(stats["step"])))
    summary = run(project, interrupted["config"], "r", resume=True)
    assert summary.exit_code == 0 and steps == [2, 3, 4]
    warning = next(w for w in console.WARNINGS if "skipped checkpoint" in w)
    assert warning.startswith(f"run r: skipped checkpoint step-000002: {reason}")
    assert warning.endswith("resuming from step-000001.")
    assert "weights_only" not in warning and not marker.exists()
    assert find(project.read()["runs"], "r", key="name")["finished"] is True
    log = [json.loads(line)["step"] for line in (project.root / "runs" / "r" / "loss.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_resume_with_no_checkpoint_that_loads_is_exit_2_in_one_sentence(
    interrupted: dict[str, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = copy_of(interrupted, tmp_path)
    marker = tmp_path / "ran"
    checkpoints = project.root / "runs" / "r" / "checkpoints"
    break_malicious_optimizer(checkpoints / "step-000002", marker)
    break_missing_rng(checkpoints / "step-000001", marker)
    before = project.manifest_path.read_bytes()
    result = runner.invoke(
        app,
        ["train", "-p", str(project.root), "--resume", "--run", "r", "--base-model", str(tiny_model_dir)],
        terminal_width=400,
    )
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert (
        f"--resume --run r: no checkpoint in runs/r/checkpoints loads (step-000002: optimizer.pt: {CODE_REFUSED}, "
        "and 1 older one(s) too); start the run again with --force." in message
    )
    assert "weights_only" not in message and "Traceback" not in result.output and not marker.exists()
    assert project.manifest_path.read_bytes() == before
