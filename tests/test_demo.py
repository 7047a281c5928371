"""`selfage demo`: every stage end to end, offline, on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.project import Project


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, dex_weights_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    folder = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and "meaningless" in summary["note"]
    # Every edit scores its reconstruction; on random weights it warns, and the demo says why.
    assert any("astronaut_to_edit: the inversion did not hold" in w for w in summary["warnings"])
    assert "random VAE" in summary["reconstruction_note"]
    manifest = Project(folder).read()
    assert len(manifest["references"]) == 3 and all(r["age"] in (30, 35, 40) for r in manifest["references"])
    assert len(manifest["regularisation"]["images"]) == 4
    assert [run["finished"] for run in manifest["runs"]] == [True]
    assert (folder / manifest["runs"][0]["lora"]).is_file()
    edit = manifest["edits"][0]
    assert sorted(int(age) for age in edit["outputs"]) == [10, 50, 80]
    for path in edit["outputs"].values():
        assert Image.open(folder / path).size == (128, 128)
    strip = Image.open(folder / edit["strip"])
    assert strip.width == 4 * 128
    assert (folder / "eval" / "report.md").is_file()
    # Without DEX weights the demo's eval has an age column, measured by the builtin estimator.
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert [e["estimator"] for e in report["age_estimators"]] == ["builtin"]
    assert report["summary"]["age"]["count"] == 3
    assert "| target age | builtin age | abs error |" in (folder / "eval" / "report.md").read_text()
    # With a (random) DEX checkpoint, --age-estimator both reports DEX and builtin side by side.
    both = CliRunner().invoke(
        app,
        ["eval", "-p", str(folder), "--age-estimator", "both", "--dex-weights", str(dex_weights_path)]
        + ["--report", str(tmp_path / "both"), "--device", "cpu"],
    )
    assert both.exit_code == 0, both.output
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    assert [e["estimator"] for e in report["age_estimators"]] == ["dex", "builtin"]
    assert set(report["summary"]["age_by_estimator"]) == {"dex", "builtin"}
    output = report["edits"][0]["outputs"][0]
    assert set(output["estimates"]) == {"dex", "builtin"} and output["estimated_age"] == output["estimates"]["dex"]
    markdown = (tmp_path / "both" / "report.md").read_text()
    assert "| target age | DEX age | abs error | builtin age |" in markdown
    assert "age MAE (years, DEX)" in markdown and "age MAE (years, builtin)" in markdown
    assert "age (dex): MAE" in both.output and "age (builtin): MAE" in both.output
    # A second demo into the same folder needs --force.
    again = CliRunner().invoke(app, ["demo", str(folder)])
    assert again.exit_code == 2 and "--force" in again.output


def test_demo_force_never_deletes_a_real_project(tmp_path: Path) -> None:
    project = Project(tmp_path / "me")
    with project.update() as manifest:
        manifest["references"].append({"id": "precious"})
    (tmp_path / "me" / "model").mkdir()
    result = CliRunner().invoke(app, ["demo", str(tmp_path / "me"), "--force"])
    assert result.exit_code == 2 and "was not made by `selfage demo`" in result.output
    assert project.read()["references"] == [{"id": "precious"}]
