"""The engineering switches ``train --compile/--compile-mode/--cuda-graph`` and ``edit --compile`` reach the library.

Compiling itself is not run here (minutes on a CPU); ``benchmarks/gpu.sh`` measures it on a GPU and the
torch.compile plumbing of the inversion is checked with the eager backend in test_edit_engine.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.errors import SelfageError
from selfage_cli.train.config import TrainConfig

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch) -> dict[str, Any]:
    """Replace the stage functions with ones that keep their config and stop (exit 2)."""
    seen: dict[str, Any] = {}

    def keep(name: str):
        def stage(project, config, **kwargs):
            seen[name] = config
            raise SelfageError("stopped by the test.")

        return stage

    monkeypatch.setattr("selfage_cli.train.stage.run_train", keep("train"))
    monkeypatch.setattr("selfage_cli.edit.stage.run_edit", keep("edit"))
    return seen


def test_train_compile_defaults_to_reduce_overhead_and_takes_a_mode(project_dir: Path, captured) -> None:
    result = runner.invoke(app, ["train", "-p", str(project_dir), "--compile", "--base-model", "x"])
    assert result.exit_code == 2 and "stopped by the test" in result.output
    assert captured["train"].compile and captured["train"].compile_mode == "reduce-overhead"
    runner.invoke(app, ["train", "-p", str(project_dir), "--compile", "--compile-mode", "default", "--base-model", "x"])
    assert captured["train"].compile_mode == "default"
    runner.invoke(app, ["train", "-p", str(project_dir), "--compile-mode", "max-autotune", "--base-model", "x"])
    assert captured["train"].compile and captured["train"].compile_mode == "max-autotune"  # the mode implies it
    runner.invoke(app, ["train", "-p", str(project_dir), "--base-model", "x"])
    assert not captured["train"].compile


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--cuda-graph"], True), (["--no-cuda-graph"], False)])
def test_train_cuda_graph_is_automatic_unless_asked_for_or_turned_off(
    project_dir: Path, captured, flags: list[str], expected: bool | None
) -> None:
    result = runner.invoke(app, ["train", "-p", str(project_dir), "--base-model", "x", *flags])
    assert result.exit_code == 2 and captured["train"].cuda_graph is expected


def test_unknown_compile_mode_is_refused_naming_the_choices() -> None:
    with pytest.raises(
        SelfageError, match=r"--compile-mode 'fastest' is not known; use one of default, reduce-overhead"
    ):
        TrainConfig(compile_mode="fastest")


def test_edit_compile_reaches_the_inversion(project_dir: Path, captured, monkeypatch, tiny_pipe) -> None:
    result = runner.invoke(app, ["edit", "-p", str(project_dir), "--ages", "10,70", "--compile"])
    assert result.exit_code == 2 and captured["edit"].compile is True
    runner.invoke(app, ["edit", "-p", str(project_dir), "--ages", "10,70"])
    assert captured["edit"].compile is False

    from selfage_cli.edit import engine, stage

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(engine, "invert", lambda *args, **kwargs: calls.append(kwargs) or "inverted")

    class Ctx:
        pipe = tiny_pipe
        config = captured["edit"].__class__(ages=[10, 70], compile=True)

        class cache:  # noqa: N801 - a stand-in namespace
            load = staticmethod(lambda key: None)
            save = staticmethod(lambda key, inversion: None)

    class Key:
        prompt = "photo of person as 30-year-old"

    assert stage._invert(Ctx, Key, image=None, progress=None) == ("inverted", False)
    assert calls[0]["compile_unet"] is True
