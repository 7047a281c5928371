"""Direct inversion (PnP Inversion, ``--inversion direct``) on the tiny model: the source branch is put
back on the DDIM-inversion trajectory at every step, so it reconstructs the input latent exactly;
the correction is what holds it; batched and per-age passes agree; the cache keeps the trajectory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfage_cli.edit.cache import InversionCache, InversionKey
from selfage_cli.edit.engine import P2PSettings, edit_ages, invert, p2p
from selfage_cli.edit.engine.ddim import encode_text
from selfage_cli.edit.prompts import build_prompts
from selfage_cli.project import Project

SOURCE_AGE = 30
GENDER = "female"
PARTIAL_MASK = 0.9  # as in test_edit_engine.py: a blend mask with zeros and ones on random attention


@pytest.fixture(scope="module")
def direct_runs(tiny_pipe, tiny_source_latent):
    """Direct inversions of the astronaut at two numbers of DDIM steps."""
    prompt = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER).source
    return {steps: invert(tiny_pipe, tiny_source_latent, prompt, mode="direct", steps=steps) for steps in (3, 8)}


@pytest.mark.parametrize("steps", [3, 8])
def test_direct_inversion_reconstructs_the_source_exactly(tiny_pipe, tiny_source_latent, direct_runs, steps):
    inversion = direct_runs[steps]
    empty = encode_text(tiny_pipe, [""])[0]
    assert inversion.mode == "direct" and inversion.inner_steps_run == [0] * steps
    assert all(torch.equal(e, empty) for e in inversion.null_embeddings)  # no optimisation: plain ""
    assert len(inversion.trajectory) == steps + 1 and torch.equal(inversion.trajectory[0], tiny_source_latent)
    assert torch.equal(inversion.trajectory[-1], inversion.x_t)
    result = edit_ages(tiny_pipe, inversion, build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER), decode=False)
    assert float((result.latents[0] - tiny_source_latent).abs().max()) <= 1e-4  # measured ~6e-11


def test_without_the_correction_the_source_branch_drifts(tiny_pipe, tiny_source_latent, direct_runs, monkeypatch):
    inversion = direct_runs[8]
    prompts = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER)
    held = edit_ages(tiny_pipe, inversion, prompts, decode=False)
    seen = []

    def switched_off(latents, target):
        seen.append(target)
        return latents

    monkeypatch.setattr(p2p, "correct_source", switched_off)
    drifted = edit_ages(tiny_pipe, inversion, prompts, decode=False)
    assert len(seen) == 8  # called once per sampling step, with x_{T-1} … x_0
    assert torch.equal(seen[-1], tiny_source_latent) and torch.equal(seen[0], inversion.trajectory[-2])
    error_held = float((held.latents[0] - tiny_source_latent).abs().max())
    error_drift = float((drifted.latents[0] - tiny_source_latent).abs().max())
    assert error_drift > 0.1 and error_drift > 1e4 * error_held, (error_drift, error_held)  # measured ~1.0


def test_the_correction_moves_the_source_row_only():
    latents = torch.randn(3, 4, 2, 2)
    target = torch.randn(1, 4, 2, 2)
    corrected = p2p.correct_source(latents, target)
    assert torch.allclose(corrected[0], target[0], atol=1e-6)
    assert torch.equal(corrected[1:], latents[1:])


def test_batched_and_per_age_direct_edits_agree(tiny_pipe, tiny_source_latent, direct_runs):
    inversion = direct_runs[8]
    prompts = build_prompts(SOURCE_AGE, [5, 80], GENDER)
    settings = P2PSettings(blend_threshold=PARTIAL_MASK)
    batched = edit_ages(tiny_pipe, inversion, prompts, settings=settings, decode=False)
    separate = edit_ages(tiny_pipe, inversion, prompts, settings=settings, max_batch=1, decode=False)
    assert batched.unet_calls == 8 and separate.unet_calls == 16
    assert float((batched.latents - separate.latents).abs().max()) <= 1e-5
    assert batched.masks is not None and torch.equal(batched.masks, separate.masks)
    assert float((batched.latents[0] - tiny_source_latent).abs().max()) <= 1e-4  # the source, still exact
    # The targets are edited (never corrected): they differ from the source and from each other, and
    # equal the corrected source outside their blend masks.
    assert not torch.allclose(batched.latents[1], batched.latents[2], atol=1e-3)
    for k in (1, 2):
        keep = batched.masks[k, 0] == 0
        assert 0 < int(keep.sum()) < keep.numel()
        assert torch.equal(batched.latents[k][:, keep], batched.latents[0][:, keep])
        assert not torch.allclose(batched.latents[k][:, ~keep], batched.latents[0][:, ~keep])


def test_a_direct_inversion_without_its_trajectory_is_refused(tiny_pipe, direct_runs):
    import dataclasses

    broken = dataclasses.replace(direct_runs[3], trajectory=None)
    with pytest.raises(ValueError, match="trajectory"):
        edit_ages(tiny_pipe, broken, build_prompts(SOURCE_AGE, [5], GENDER), decode=False)


def test_cache_keeps_the_trajectory_of_a_direct_inversion(tmp_path: Path, tiny_pipe, tiny_source_latent, direct_runs):
    inversion = direct_runs[3]
    cache = InversionCache(Project(tmp_path / "proj"))
    fields = dict(
        image_sha256="0" * 64,
        base_model="tiny",
        lora_sha256="none",
        prompt=inversion.prompt,
        guidance=7.5,
        steps=3,
        inner_steps=10,
        dtype="fp32",
        resolution=128,
    )
    key = InversionKey(mode="direct", **fields)
    assert key.digest != InversionKey(mode="negative-prompt", **fields).digest  # keyed by the mode
    cache.save(key, inversion)
    loaded = cache.load(key)
    assert loaded.mode == "direct" and len(loaded.trajectory) == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.trajectory, inversion.trajectory, strict=True))
    prompts = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER)
    again = edit_ages(tiny_pipe, loaded, prompts, decode=False)
    assert float((again.latents[0] - tiny_source_latent).abs().max()) <= 1e-4


def test_edit_command_with_direct_inversion_reports_it_like_the_other_modes(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path
) -> None:
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from selfage_cli.cli import app

    args = ["edit", str(astronaut_path), "--aligned", "--source-age", "40", "--no-lora", "--ages", "10,70"]
    args += ["--inversion", "direct", "--ddim-steps", "3", "--max-batch", "1", "--device", "cpu", "--dtype", "fp32"]
    args += ["-p", str(project_dir), "--base-model", str(tiny_model_dir), "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    record = json.loads(first.stdout.strip().splitlines()[-1])["done"][0]
    assert record["inversion"]["mode"] == "direct" and record["inversion"]["inner_steps_run"] == 0
    assert record["inversion"]["cached"] is False and record["unet_calls"] == 3 * 2  # --max-batch 1: a pass per age
    assert set(record["reconstruction"]) == {"psnr", "ssim", "identity_distance"}
    entry = Project(project_dir).read()["edits"][0]
    assert entry["settings"]["inversion"] == "direct" and entry["reconstruction"] == record["reconstruction"]
    picture = Image.open(project_dir / "edits" / "astronaut" / "70.png").copy()
    # Again: the cached inversion (with its trajectory) gives the very same pictures and scores.
    again = CliRunner().invoke(app, [*args, "--force"])
    assert again.exit_code == 0, again.output
    record = json.loads(again.stdout.strip().splitlines()[-1])["done"][0]
    assert record["inversion"]["cached"] is True and record["reconstruction"] == entry["reconstruction"]
    assert list(Image.open(project_dir / "edits" / "astronaut" / "70.png").getdata()) == list(picture.getdata())
