"""``selfage edit`` without --source-age / --gender: the age estimators, the gender threshold, the exact float.

The real networks throughout (the builtin ONNX estimator, a fixed random DEX); the one stand-in is the gender
confidence of the threshold test. The inputs are the FFHQ-aligned portraits (``--aligned``), edited with
the tiny model in 2 DDIM steps.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from selfage_cli.ages.engine import builtin
from selfage_cli.edit.source import GENDER_THRESHOLD
from selfage_cli.faces.engine.loading import load_image
from selfage_cli.project import Project
from tests import edit_cli
from tests.edit_cli import json_summary, run_edit

runner = CliRunner()
FAST = [*edit_cli.FAST, "--no-lora"]


@pytest.fixture(autouse=True)
def _no_dex_from_the_environment(monkeypatch):
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    monkeypatch.delenv(builtin.BUNDLE_ENV, raising=False)


def edit(project: Path, model: Path, *args: str) -> tuple[int, str, dict | None]:
    result = run_edit(project, model, *args, fast=FAST)
    return result.exit_code, " ".join(result.output.split()), json_summary(result.stdout)


def test_builtin_source_age_and_gender_above_the_threshold(
    project_dir, tiny_model_dir, aligned_portraits, builtin_estimator
) -> None:
    code, output, summary = edit(
        project_dir, tiny_model_dir, str(aligned_portraits["hopper"]), "--aligned", "--ages", "40"
    )
    assert code == 0, output
    manifest = Project(project_dir).read()
    (entry,) = manifest["inputs"]
    (record,) = manifest["edits"]
    # The estimate on the aligned input as stored (the model's 128 px), recorded with its estimator.
    expected = builtin_estimator.estimate_one(load_image(project_dir / entry["aligned"]))
    assert entry["age_source"] == "builtin" and entry["age_candidates"] == {"builtin": expected.age}
    assert entry["age"] == round(expected.age) and abs(expected.age - 77) <= 10
    assert record["source_age"] == round(expected.age) and record["source_age_source"] == "builtin"
    # The builtin gender call (male for this portrait, see docs/ages.md) is taken above the threshold.
    assert expected.gender_confidence >= GENDER_THRESHOLD
    assert record["gender"] == expected.gender and record["gender_source"] == "estimated"
    assert record["gender_confidence"] == pytest.approx(expected.gender_confidence)
    word = {"female": "woman", "male": "man"}[expected.gender]
    assert record["prompts"]["targets"] == [f"photo of {word} as 40-year-old"]
    assert (
        f"gender: {expected.gender} (estimated, {100 * expected.gender_confidence:.0f} %); pass --gender to change"
        in output
    )

    # --gender none forces the neutral words (the reference's default).
    code, output, _ = edit(
        project_dir,
        tiny_model_dir,
        str(aligned_portraits["hopper"]),
        "--aligned",
        "--ages",
        "40",
        "--gender",
        "none",
        "--force",
    )
    assert code == 0, output
    record = Project(project_dir).read()["edits"][0]
    assert record["prompts"]["targets"] == ["photo of person as 40-year-old"] and record["gender_source"] == "none"
    assert record["gender"] is None


def test_gender_below_the_threshold_keeps_the_neutral_words(
    project_dir, tiny_model_dir, aligned_portraits, monkeypatch
) -> None:
    real = builtin.BuiltinEstimator.estimate_one

    def unsure(self, image):  # the real estimate, with a gender confidence just under the threshold
        return replace(real(self, image), gender_confidence=GENDER_THRESHOLD - 0.01)

    monkeypatch.setattr(builtin.BuiltinEstimator, "estimate_one", unsure)
    code, output, _ = edit(
        project_dir, tiny_model_dir, str(aligned_portraits["hopper"]), "--aligned", "--ages", "40", "--source-age", "70"
    )
    assert code == 0, output
    record = Project(project_dir).read()["edits"][0]
    assert record["prompts"]["targets"] == ["photo of person as 40-year-old"]
    assert record["gender"] is None and record["gender_source"] == "neutral"
    assert "neutral words" in output and "--gender" in output


def test_no_round_source_age_pastes_the_same_float_every_run(
    project_dir, tiny_model_dir, aligned_portraits, dex_weights_path
) -> None:
    args = [
        str(aligned_portraits["astronaut"]),
        "--aligned",
        "--ages",
        "20",
        "--gender",
        "none",
        "--no-round-source-age",
    ]
    args += ["--dex-weights", str(dex_weights_path), "--json"]
    code, output, first = edit(project_dir, tiny_model_dir, *args)
    assert code == 0, output
    manifest = Project(project_dir).read()
    estimate = manifest["inputs"][0]["age_candidates"]["dex"]
    assert isinstance(estimate, float) and manifest["inputs"][0]["age_source"] == "dex"
    prompt = manifest["edits"][0]["prompts"]["source"]
    assert prompt == f"photo of person as {estimate!r}-year-old"  # the full float, not a rounded copy
    assert first["inversions_computed"] == 1
    picture = (project_dir / manifest["edits"][0]["outputs"]["20"]).read_bytes()

    code, output, second = edit(project_dir, tiny_model_dir, *args, "--force")
    assert code == 0, output
    manifest = Project(project_dir).read()
    assert manifest["edits"][0]["prompts"]["source"] == prompt
    assert manifest["edits"][0]["source_age"] == estimate
    assert second["inversions_cached"] == 1 and second["inversions_computed"] == 0
    assert np.array_equal(
        np.asarray(Image.open(project_dir / manifest["edits"][0]["outputs"]["20"])),
        np.asarray(Image.open(io.BytesIO(picture))),
    )


def test_dex_preprocess_reference_is_the_reference_resize(
    project_dir, tiny_model_dir, aligned_portraits, dex_weights_path
) -> None:
    from selfage_cli.ages.engine.dex import expected_age, image_to_tensor, load_dex, resize_for_dex

    code, output, _ = edit(
        project_dir,
        tiny_model_dir,
        str(aligned_portraits["astronaut"]),
        "--aligned",
        "--ages",
        "20",
        "--gender",
        "none",
        "--inversion",
        "negative-prompt",
        "--dex-weights",
        str(dex_weights_path),
        "--dex-preprocess",
        "reference",
    )
    assert code == 0, output
    entry = Project(project_dir).read()["inputs"][0]
    # The reference: the aligned image straight to 224x224, bilinear without antialiasing.
    model = load_dex(dex_weights_path, "cpu")
    x = image_to_tensor(load_image(project_dir / entry["aligned"])).unsqueeze(0)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    with torch.inference_mode():
        reference = float(expected_age(model(x))[0])
        antialiased = float(
            expected_age(
                model(resize_for_dex(image_to_tensor(load_image(project_dir / entry["aligned"])).unsqueeze(0)))
            )[0]
        )
    assert entry["age_candidates"]["dex"] == pytest.approx(reference, abs=1e-4)
    assert abs(antialiased - reference) > 1e-3  # the option matters: the default resize gives another age


def test_dex_asked_for_without_weights_is_exit_2(project_dir, tiny_model_dir, aligned_portraits) -> None:
    code, output, _ = edit(
        project_dir,
        tiny_model_dir,
        str(aligned_portraits["hopper"]),
        "--aligned",
        "--ages",
        "40",
        "--age-estimator",
        "dex",
    )
    assert code == 2 and "--dex-weights" in output and "--age-estimator builtin" in output
    code, output, _ = edit(
        project_dir, tiny_model_dir, str(aligned_portraits["hopper"]), "--aligned", "--ages", "40", "--gender", "it"
    )
    assert code == 2 and "female, male or none" in output


def test_a_builtin_source_age_is_re_estimated_once_dex_weights_are_known(
    project_dir, tiny_model_dir, aligned_portraits, dex_weights_path
) -> None:
    base = [str(aligned_portraits["astronaut"]), "--aligned", "--ages", "20", "--gender", "none"]
    base += ["--inversion", "negative-prompt"]
    code, output, _ = edit(project_dir, tiny_model_dir, *base)
    assert code == 0, output
    assert Project(project_dir).read()["edits"][0]["source_age_source"] == "builtin"
    code, output, _ = edit(project_dir, tiny_model_dir, *base, "--dex-weights", str(dex_weights_path), "--force")
    assert code == 0, output
    manifest = Project(project_dir).read()
    assert manifest["edits"][0]["source_age_source"] == "dex" and manifest["inputs"][0]["age_source"] == "dex"
    candidates = manifest["inputs"][0]["age_candidates"]
    assert set(candidates) == {"builtin", "dex"}
    # auto keeps DEX's; asked for explicitly, the builtin estimate (recorded before) is used again
    code, output, _ = edit(project_dir, tiny_model_dir, *base, "--force")
    assert code == 0, output
    assert Project(project_dir).read()["edits"][0]["source_age_source"] == "dex"
    code, output, _ = edit(project_dir, tiny_model_dir, *base, "--age-estimator", "builtin", "--force")
    assert code == 0, output
    manifest = Project(project_dir).read()
    assert manifest["edits"][0]["source_age"] == round(candidates["builtin"])
    assert (
        manifest["edits"][0]["source_age_source"] == "builtin" and manifest["inputs"][0]["age_candidates"] == candidates
    )
