"""``selfage make-reg``: a regularisation set generated with the base model, aligned when a face is found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from selfage_cli import console
from selfage_cli.ages import regularisation as reg_module
from selfage_cli.ages.engine.regularisation import parse_age_range, spread_ages
from selfage_cli.ages.regularisation import run_make_reg
from selfage_cli.cli import app
from selfage_cli.errors import SelfageError
from selfage_cli.manifest import set_config
from selfage_cli.project import Project

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_dex_from_the_environment(monkeypatch):
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    console.configure()


def test_spread_and_range():
    assert spread_ages(4, 0, 90) == [0, 30, 60, 90]
    assert spread_ages(5, 10, 20) == [10, 12, 15, 18, 20]
    assert spread_ages(1, 0, 90) == [45]
    assert all(isinstance(a, int) for a in spread_ages(7, 3, 77))
    assert parse_age_range("0-90") == (0, 90) and parse_age_range(" 20 - 20 ") == (20, 20)
    for bad in ("90-0", "0-101", "ten-20", "5"):
        with pytest.raises(SelfageError, match="--age-range"):
            parse_age_range(bad)


def test_make_reg_on_the_tiny_model(project_dir, tiny_model_dir):
    result = runner.invoke(
        app,
        [
            "make-reg",
            "--count",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "3",
            "--base-model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "-p",
            str(project_dir),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    project = Project(project_dir)
    section = project.read()["regularisation"]
    assert section["generated"] is True and section["folder"] is None
    images = section["images"]
    assert [img["age"] for img in images] == [0, 30, 60, 90]
    assert [img["prompt"] for img in images] == [f"photo of person as {a}-year-old" for a in (0, 30, 60, 90)]
    files = sorted((project_dir / "reg" / "generated").iterdir())
    assert [f.name for f in files] == [f"{i:04d}_age{a}.png" for i, a in enumerate((0, 30, 60, 90))]
    for img in images:
        assert img["age_source"] == "prompt" and img["source"] is None
        path = project.path(img["aligned"])
        with Image.open(path) as picture:
            # A random tiny model draws no faces: alignment fails and the image is kept as generated
            # (128 px, its native resolution); an aligned one would be a 512² FFHQ crop.
            expected = (512, 512) if img["aligned_ok"] else (128, 128)
            assert picture.size == expected
        if not img["aligned_ok"]:
            assert img["align_failure"]
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert summary["count"] == 4 and summary["aligned"] == sum(img["aligned_ok"] for img in images)
    assert "dex_age" not in images[0]  # no DEX weights anywhere: not verified

    # An existing set is never replaced silently.
    before = project.manifest_path.read_bytes()
    again = runner.invoke(
        app,
        [
            "make-reg",
            "--count",
            "2",
            "--steps",
            "1",
            "--base-model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "-p",
            str(project_dir),
        ],
    )
    assert again.exit_code == 2 and "--force" in again.output
    assert project.manifest_path.read_bytes() == before
    assert len(list((project_dir / "reg" / "generated").iterdir())) == 4


def test_make_reg_aligns_faces_and_verifies_with_dex(
    project_dir, tiny_model_dir, astronaut_path, dex_weights_path, monkeypatch
):
    """With a face in the picture the image is FFHQ-aligned; DEX verification records its estimate.

    (A 128-px picture's face is below the align stage's minimum eye distance, so the stand-in for the
    generator returns the 512-px portrait, as SD 1.5 would draw at its native resolution.)
    """
    face = Image.open(astronaut_path).convert("RGB")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))

    def fake_generate(pipe, ages, seeds, steps, resolution, device):
        assert resolution == 128  # the tiny model's native resolution
        return [face if seed % 2 == 0 else noise for seed in seeds]

    monkeypatch.setattr(reg_module, "generate_images", fake_generate)
    project = Project(project_dir)
    (project_dir / "reg" / "generated").mkdir(parents=True)
    (project_dir / "reg" / "generated" / "old.png").write_bytes(b"old")
    set_config(project, base_model=str(tiny_model_dir))
    with pytest.raises(SelfageError, match="--force"):
        run_make_reg(
            project,
            count=2,
            age_range="20-40",
            verify=True,
            dex_weights=dex_weights_path,
            batch_size=2,
            steps=1,
            seed=0,
            force=False,
            base_model=str(tiny_model_dir),
            device="cpu",
            dtype="fp32",
        )
    summary = run_make_reg(
        project,
        count=2,
        age_range="20-40",
        verify=True,
        dex_weights=dex_weights_path,
        batch_size=2,
        steps=1,
        seed=0,
        force=True,
        base_model=None,  # the project's base model is used, and recorded
        device="cpu",
        dtype="fp32",
    )
    assert project.read()["regularisation"]["base_model"] == str(tiny_model_dir)
    images = project.read()["regularisation"]["images"]
    assert [(img["age"], img["aligned_ok"]) for img in images] == [(20, True), (40, False)]
    with Image.open(project.path(images[0]["aligned"])) as aligned:
        assert aligned.size == (512, 512)
    assert all(0 <= img["dex_age"] <= 100 for img in images)
    assert "dex_mean_abs_error" in summary.data
    assert sorted(p.name for p in (project_dir / "reg" / "generated").iterdir()) == ["0000_age20.png", "0001_age40.png"]
    assert project.read()["config"]["dex_weights"] == str(Path(dex_weights_path).resolve())
