"""Names read from the manifest and folders that are symbolic links (issue 17, item 2): every path selfage
writes to or deletes is checked to lie inside the project before the write, so nothing outside changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.edit.outputs import plan_outputs
from selfage_cli.errors import SelfageError
from selfage_cli.project import Project
from selfage_cli.train.engine.loop import list_checkpoints

runner = CliRunner()


def one_line(text: str) -> str:
    return " ".join(text.split())


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links not followed): file bytes, or the link's target."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        found[rel] = f"-> {path.readlink()}" if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return found


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the project, holding files a careless write would overwrite."""
    folder = tmp_path / "outside"
    (folder / "checkpoints" / "step-000001").mkdir(parents=True)
    (folder / "checkpoints" / "step-000001" / "state.json").write_text('{"step": 1}')
    (folder / "loss.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    return folder


def train(project: Path, model: Path, *args: str):
    return runner.invoke(
        app, ["train", "-p", str(project), "--base-model", str(model), "--device", "cpu", *args], terminal_width=400
    )


def test_a_run_name_from_the_manifest_that_climbs_out_is_refused(
    project_dir: Path, outside: Path, tiny_model_dir: Path
) -> None:
    assert (project_dir / "runs" / ".." / ".." / "outside").resolve() == outside.resolve()
    project = Project(project_dir)
    with project.update() as manifest:
        manifest["runs"].append({"name": "../../outside", "finished": False, "steps_done": 1})
    before, manifest_bytes = snapshot(outside), project.manifest_path.read_bytes()
    result = train(project_dir, tiny_model_dir, "--resume", "--steps", "2", "--resolution", "128")
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert "selfage.json names the unfinished run '../../outside', which is not a plain folder name" in message
    assert "nothing was written: fix or remove that entry." in message and "Traceback" not in result.output
    assert snapshot(outside) == before and project.manifest_path.read_bytes() == manifest_bytes
    assert not (project_dir / "runs").exists()


@pytest.mark.parametrize("link", ["runs", "runs/r/checkpoints", "runs/r/loss.jsonl"])
def test_a_run_folder_or_file_that_is_a_link_out_of_the_project_is_never_written_through(
    project_dir: Path, outside: Path, tiny_model_dir: Path, link: str
) -> None:
    project = Project(project_dir)
    with project.update() as manifest:
        manifest["runs"].append({"name": "r", "finished": False, "steps_done": 1})
    target = {
        "runs": outside,
        "runs/r/checkpoints": outside / "checkpoints",
        "runs/r/loss.jsonl": outside / "loss.jsonl",
    }
    if link == "runs":  # runs/r is then outside/r
        (outside / "r").mkdir()
    (project_dir / link).parent.mkdir(parents=True, exist_ok=True)
    (project_dir / link).symlink_to(target[link])
    before = snapshot(outside)
    result = train(project_dir, tiny_model_dir, "--resume", "--run", "r", "--steps", "2", "--resolution", "128")
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert "leads outside the project folder" in message and "nothing was written there" in message
    assert snapshot(outside) == before


def test_checkpoint_pruning_never_follows_a_link(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    (root / "step-000002").mkdir(parents=True)
    (root / "step-000002" / "state.json").write_text('{"step": 2}')
    (root / "step-000001").symlink_to(outside / "checkpoints" / "step-000001")  # older: first to be pruned
    assert list_checkpoints(root) == [root / "step-000002"]


def test_a_symlinked_refs_aligned_gets_no_png_through_the_link(
    project_dir: Path, tmp_path: Path, astronaut_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project_dir / "refs").mkdir()
    (project_dir / "refs" / "aligned").symlink_to(elsewhere)
    result = runner.invoke(app, ["align", str(astronaut_path), "-p", str(project_dir)], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert "leads outside the project folder" in one_line(result.output)
    assert list(elsewhere.iterdir()) == []
    manifest = project_dir / "selfage.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["references"] == []


def test_edit_outputs_are_never_planned_through_a_link(project_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project_dir / "edits").symlink_to(elsewhere)
    with pytest.raises(SelfageError, match="leads outside the project folder"):
        plan_outputs(Project(project_dir), "astronaut", [20], side_by_side=True, gif=False)


def test_writable_path_accepts_the_project_and_refuses_ways_out(project_dir: Path, tmp_path: Path) -> None:
    project = Project(project_dir)
    assert project.writable_path("runs/a/b") == project.root / "runs" / "a" / "b"
    (project_dir / "inner").mkdir()
    (project_dir / "alias").symlink_to(project_dir / "inner")  # a link that stays inside: fine
    assert project.writable_path("alias/x") == project.root / "inner" / "x"
    for way_out in ("../x", str(tmp_path / "x"), "runs/../../x"):
        with pytest.raises(SelfageError, match="leads outside the project folder"):
            project.writable_path(way_out)
    shutil.rmtree(project_dir / "inner")
