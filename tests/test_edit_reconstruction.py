"""Every edit scores its own inversion: the source branch's picture against the aligned input (PSNR,
SSIM, dlib identity distance), recorded in the Edit entry, printed, in --json, and warned about below
the documented thresholds (selfage_cli/edit/engine/reconstruction.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from selfage_cli.edit import engine
from selfage_cli.edit.engine.reconstruction import (
    PSNR_WARN_DB,
    SSIM_WARN,
    reconstruction_warning,
    score_reconstruction,
)
from selfage_cli.eval.engine import metrics
from selfage_cli.project import Project
from tests.edit_cli import json_summary, run_edit

runner = CliRunner()
ARGS = ["--aligned", "--source-age", "40", "--no-lora", "--ages", "10,70"]


def edit(project: Path, model: Path, *args: str) -> tuple[int, str, dict | None, str]:
    result = run_edit(project, model, *args, width=400)
    return result.exit_code, result.output, json_summary(result.stdout), result.stderr or ""


def test_null_text_edit_records_prints_and_warns_about_its_reconstruction(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path
) -> None:
    code, output, summary, _ = edit(project_dir, tiny_model_dir, str(astronaut_path), *ARGS, "--json")
    assert code == 0, output
    scores = summary["done"][0]["reconstruction"]
    assert set(scores) == {"psnr", "ssim", "identity_distance"}
    (entry,) = Project(project_dir).read()["edits"]
    assert entry["reconstruction"] == scores
    aligned = Image.open(project_dir / entry["input"]).convert("RGB")
    assert 0 < scores["psnr"] < 60 and -1 <= scores["ssim"] <= 1
    # A random tiny model rebuilds no face: no identity distance, and the warning fires naming the photo.
    assert scores["identity_distance"] is None
    assert scores["psnr"] < PSNR_WARN_DB
    (warning,) = [w for w in summary["warnings"] if "did not hold" in w]
    assert warning.startswith("astronaut: ") and "--inner-steps" in warning and "LoRA" in warning
    assert aligned.size == (128, 128)

    # The human summary line carries the scores too.
    code, output, _, _ = edit(project_dir, tiny_model_dir, str(astronaut_path), *ARGS, "--force")
    assert code == 0, output
    line = next(line for line in output.splitlines() if line.startswith("astronaut: age 40"))
    assert f"reconstruction {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.2f}" in line
    assert "warning: astronaut: the inversion did not hold" in " ".join(output.split())


def _stub_engine(monkeypatch: pytest.MonkeyPatch, project_dir: Path, source) -> None:
    """edit_ages replaced: images[0] (the source branch) is ``source(aligned input)``, the ages grey."""

    def edit_ages(pipe, inversion, prompts, **kwargs):
        aligned = Image.open(project_dir / "inputs" / "aligned" / "astronaut.png").convert("RGB")
        images = [source(aligned)] + [Image.new("RGB", aligned.size, (90, 90, 90)) for _ in prompts.targets]
        return engine.EditResult(latents=torch.zeros(1), images=images, masks=None, unet_calls=0, seconds=0.0)

    monkeypatch.setattr(engine, "edit_ages", edit_ages)


def test_a_faithful_reconstruction_passes_and_a_bad_one_warns_with_the_photo_name(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stub_engine(monkeypatch, project_dir, lambda aligned: aligned)
    code, output, summary, _ = edit(
        project_dir, tiny_model_dir, str(astronaut_path), *ARGS, "--inversion", "negative-prompt", "--json"
    )
    assert code == 0, output
    scores = summary["done"][0]["reconstruction"]
    assert scores["psnr"] is None and scores["ssim"] == 1.0  # identical pictures: infinite PSNR
    assert scores["identity_distance"] in (None, 0.0)  # 0 when dlib finds the 128 px face
    assert not [w for w in summary["warnings"] if "did not hold" in w]

    # A forced bad inversion: the source branch comes back as noise.
    generator = torch.Generator().manual_seed(0)

    def noise(aligned: Image.Image) -> Image.Image:
        pixels = torch.randint(0, 256, (aligned.height, aligned.width, 3), generator=generator, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy())

    _stub_engine(monkeypatch, project_dir, noise)
    code, output, summary, _ = edit(
        project_dir, tiny_model_dir, str(astronaut_path), *ARGS, "--inversion", "negative-prompt", "--force", "--json"
    )
    assert code == 0, output
    scores = summary["done"][0]["reconstruction"]
    assert scores["psnr"] < PSNR_WARN_DB and scores["ssim"] < SSIM_WARN
    (warning,) = [w for w in summary["warnings"] if "did not hold" in w]
    assert warning.startswith("astronaut: ") and "PSNR" in warning and "SSIM" in warning
    assert "--inversion null-text" in warning  # the fast mode's way out
    (entry,) = Project(project_dir).read()["edits"]
    assert entry["reconstruction"] == scores
    assert entry["history"] == []  # the same ages again: nothing of the first call is left


def test_scores_reuse_the_eval_metrics_and_the_warning_fits_the_mode(astronaut_path: Path) -> None:
    aligned = Image.open(astronaut_path).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS)
    blurred = aligned.resize((32, 32)).resize((128, 128))
    scores = score_reconstruction(aligned, blurred, identity=False)
    assert scores["psnr"] == round(metrics.psnr(aligned, blurred), 2)
    assert scores["ssim"] == round(metrics.ssim(aligned, blurred), 4)
    assert scores["identity_distance"] is None
    # The input is brought to the reconstruction's size (a 512 px input against a 128 px model).
    big = Image.open(astronaut_path).convert("RGB")
    assert score_reconstruction(big, aligned, identity=False)["psnr"] is None
    good = {"psnr": 27.0, "ssim": 0.84, "identity_distance": 0.3}
    assert reconstruction_warning("me", good, "null-text") is None
    bad_identity = {**good, "identity_distance": 0.7}
    message = reconstruction_warning("me", bad_identity, "null-text")
    assert message.startswith("me: ") and "identity distance 0.70" in message and message.count(".") <= 4
    assert "--inner-steps" in message and "--inversion null-text" not in message
    assert "--inversion null-text" in reconstruction_warning("me", {**good, "psnr": 12.0}, "negative-prompt")
    direct = reconstruction_warning("me", {**good, "ssim": 0.3}, "direct")
    assert "LoRA" in direct and "--inner-steps" not in direct
