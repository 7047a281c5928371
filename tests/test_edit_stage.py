"""``selfage edit`` end to end on the tiny model: outputs, manifest, inversion cache, LoRA choice, bad input.

Steps are kept tiny (``--ddim-steps 2 --inner-steps 1``) and the inputs pre-aligned (``--aligned``:
the packaged 512² astronaut is resized to the tiny model's 128²) so these tests do not depend on face
alignment, except the one raw-photo test. Tests whose subject is not the editing itself replace the
engine's ``edit_ages`` with a stand-in that returns plain images.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.edit import engine
from selfage_cli.project import Project, sha256_file
from tests.edit_cli import FAST, json_summary, run_edit, stand_in_inversion

runner = CliRunner()


def edit(project: Path, model: Path, *args: str) -> tuple[int, str, dict | None]:
    result = run_edit(project, model, *args)
    return result.exit_code, result.output, json_summary(result.stdout)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the engine's invert/edit_ages calls (the real functions still run)."""
    counts = {"invert": 0, "edit_ages": 0}
    real_invert, real_edit = engine.invert, engine.edit_ages

    def invert(*args, **kwargs):
        counts["invert"] += 1
        return real_invert(*args, **kwargs)

    def edit_ages(*args, **kwargs):
        counts["edit_ages"] += 1
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(engine, "invert", invert)
    monkeypatch.setattr(engine, "edit_ages", edit_ages)
    return counts


@pytest.fixture
def stub_engine(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace invert/edit_ages by fast stand-ins (for tests about everything around the editing).

    Returns the calls: ``{"invert": [prompt, ...], "edit_ages": [EditPrompts, ...], "settings": [P2PSettings, ...]}``.
    """

    seen: dict = {"invert": [], "edit_ages": [], "settings": []}

    def invert(
        pipe,
        image,
        prompt,
        *,
        mode="null-text",
        steps=50,
        guidance=7.5,
        inner_steps=10,
        progress=None,
        compile_unet=False,
        cuda_graph=True,
    ):
        seen["invert"].append(prompt)
        seen.setdefault("cuda_graph", []).append(cuda_graph)
        return stand_in_inversion(pipe, image, prompt, steps=steps, mode=mode, guidance=guidance)

    def edit_ages(pipe, inversion, prompts, **kwargs):
        seen["edit_ages"].append(prompts)
        seen["settings"].append(kwargs.get("settings"))
        size = int(inversion.x_t.shape[-1]) * int(pipe.vae_scale_factor)
        images = [Image.new("RGB", (size, size), (20 * i, 100, 100)) for i in range(1 + len(prompts.targets))]
        return engine.EditResult(latents=torch.zeros(1), images=images, masks=None, unet_calls=0, seconds=0.0)

    monkeypatch.setattr(engine, "invert", invert)
    monkeypatch.setattr(engine, "edit_ages", edit_ages)
    return seen


def _plain_result(calls: dict[str, int], pipe, inversion, prompts, **kwargs):
    calls["edit_ages"] += 1
    size = int(inversion.x_t.shape[-1]) * int(pipe.vae_scale_factor)
    images = [Image.new("RGB", (size, size), (20 * i, 90, 90)) for i in range(1 + len(prompts.targets))]
    return engine.EditResult(latents=torch.zeros(1), images=images, masks=None, unet_calls=0, seconds=0.0)


def _make_lora(pipe, folder: Path, seed: int, meta: dict | None) -> Path:
    """A real diffusers-format LoRA for the tiny pipeline, written the way `selfage train` writes it."""
    from selfage_cli.train.engine.lora import add_lora, save_lora

    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    add_lora(unet, text_encoder, rank=2, seed=seed)
    with torch.no_grad():
        for name, param in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    file = save_lora(folder, unet, text_encoder)
    if meta is not None:
        (folder / "pytorch_lora_weights.json").write_text(json.dumps(meta))
    return file


def test_edit_writes_outputs_records_them_and_reuses_the_inversion(
    project_dir: Path,
    tiny_model_dir: Path,
    astronaut_path: Path,
    calls: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = sha256_file(astronaut_path)
    args = [
        str(astronaut_path),
        "--aligned",
        "--source-age",
        "40",
        "--no-lora",
        "--ages",
        "10,70",
        "--side-by-side",
        "--gif",
        "--json",
    ]
    code, output, summary = edit(project_dir, tiny_model_dir, *args)
    assert code == 0, output
    assert calls == {"invert": 1, "edit_ages": 1}
    assert summary["inversions_computed"] == 1 and summary["inversions_cached"] == 0
    folder = project_dir / "edits" / "astronaut"
    assert sorted(p.name for p in folder.iterdir()) == ["10.png", "70.png", "ages.gif", "strip.png"]
    assert Image.open(folder / "10.png").size == (128, 128)
    assert Image.open(folder / "strip.png").width == (1 + 2) * 128  # input + one tile per age
    with Image.open(folder / "ages.gif") as gif:
        assert gif.n_frames == 2
    assert sha256_file(astronaut_path) == before  # the user's photo is never modified

    manifest = Project(project_dir).read()
    (entry,) = manifest["inputs"]
    assert entry["id"] == "astronaut" and entry["aligned"] == "inputs/aligned/astronaut.png" and entry["size"] == 128
    assert entry["sha256"] == before and entry["source"] == str(astronaut_path.resolve())
    (record,) = manifest["edits"]
    assert record["input"] == "inputs/aligned/astronaut.png"
    assert record["source_age"] == 40 and record["source_age_source"] == "option"
    assert record["target_ages"] == [10, 70]
    assert record["outputs"] == {"10": "edits/astronaut/10.png", "70": "edits/astronaut/70.png"}
    assert record["strip"] == "edits/astronaut/strip.png" and record["gif"] == "edits/astronaut/ages.gif"
    assert record["lora"] is None and record["lora_applied"] == "none"
    assert (project_dir / record["inversion_cache"]).is_file()
    assert record["settings"]["ddim_steps"] == 2 and record["settings"]["inversion"] == "null-text"
    # --no-lora drops the identifier: "photo of {placeholder} as {age}-year-old"
    assert record["prompts"] == {
        "source": "photo of person as 40-year-old",
        "targets": ["photo of child as 10-year-old", "photo of elderly as 70-year-old"],
    }
    assert record["inversion"]["cached"] is False and record["inversion"]["inner_steps_run"] >= 1
    assert record["inversion"]["unet_runner"] == "eager"  # a CPU has no CUDA graphs

    # Same call again: the outputs exist, so the photo fails before any work and nothing is touched.
    stamp = (folder / "10.png").stat().st_mtime_ns
    code, output, summary = edit(project_dir, tiny_model_dir, *args)
    assert code == 1
    assert "edits/astronaut/" in output and "already exists" in output and "--force" in output
    assert calls == {"invert": 1, "edit_ages": 1}
    assert (folder / "10.png").stat().st_mtime_ns == stamp

    # --force: the cached inversion is reused, and the real engine makes the very same pictures from it.
    first = np.asarray(Image.open(folder / "70.png"))
    code, output, summary = edit(project_dir, tiny_model_dir, *args, "--force")
    assert code == 0, output
    assert calls == {"invert": 1, "edit_ages": 2}
    assert summary["inversions_cached"] == 1 and summary["done"][0]["inversion"]["cached"] is True
    assert summary["done"][0]["inversion"]["unet_runner"] == "eager"  # as the cache recorded it
    assert np.array_equal(np.asarray(Image.open(folder / "70.png")), first)

    # Other prompt-to-prompt settings reuse it too (from here on the editing itself is a stand-in).
    monkeypatch.setattr(engine, "edit_ages", lambda *a, **k: _plain_result(calls, *a, **k))
    code, output, summary = edit(project_dir, tiny_model_dir, *args, "--force", "--cross-replace", "0.5")
    assert code == 0, output
    assert calls == {"invert": 1, "edit_ages": 3}

    # Without IMAGES every registered input is edited (new age, no clash, same inversion). The new age
    # joins the entry; 10 and 70 stay recorded, with the settings of the call that made them.
    code, output, summary = edit(
        project_dir, tiny_model_dir, "--source-age", "40", "--no-lora", "--ages", "30", "--json"
    )
    assert code == 0, output
    assert calls == {"invert": 1, "edit_ages": 4}
    assert (folder / "30.png").is_file()
    (record,) = Project(project_dir).read()["edits"]
    assert record["target_ages"] == [10, 70, 30]
    assert record["outputs"] == {str(a): f"edits/astronaut/{a}.png" for a in (10, 70, 30)}
    assert record["settings"]["ages"] == [30] and record["settings"]["cross_replace"] == 0.8
    assert record["strip"] is None and record["gif"] is None  # this call made neither
    (earlier,) = record["history"]
    assert earlier["ages"] == [10, 70] and earlier["settings"]["cross_replace"] == 0.5
    assert earlier["strip"] == "edits/astronaut/strip.png" and earlier["gif"] == "edits/astronaut/ages.gif"
    assert earlier["prompts"]["targets"] == ["photo of child as 10-year-old", "photo of elderly as 70-year-old"]
    assert earlier["source_age"] == 40 and earlier["inversion_cache"] == record["inversion_cache"]

    # Re-editing 70 with --force replaces that age's output and takes it out of the earlier call's record.
    code, output, summary = edit(
        project_dir, tiny_model_dir, "--source-age", "40", "--no-lora", "--ages", "70", "--force", "--json"
    )
    assert code == 0, output
    (record,) = Project(project_dir).read()["edits"]
    assert record["target_ages"] == [10, 70, 30] and record["settings"]["ages"] == [70]
    assert [r["ages"] for r in record["history"]] == [[30], [10]]
    assert record["history"][1]["prompts"]["targets"] == ["photo of child as 10-year-old"]


def test_lora_default_run_and_cache_miss_when_the_lora_changes(
    project_dir: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_pipe,
    astronaut_path: Path,
    stub_engine: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from selfage_cli.models import model_fingerprint

    meta = {
        "base_model": str(tiny_model_dir),
        "base_model_fingerprint": model_fingerprint(tiny_model_dir),
        "finished": True,
        "rank": 2,
    }
    _make_lora(tiny_pipe, project_dir / "runs" / "a", seed=1, meta=meta)
    with Project(project_dir).update() as manifest:
        manifest["runs"].append(
            {
                "name": "a",
                "lora": "runs/a/pytorch_lora_weights.safetensors",
                "finished": True,
                **{k: meta[k] for k in ("base_model", "base_model_fingerprint")},
            }
        )
    args = [
        str(astronaut_path),
        "--aligned",
        "--source-age",
        "40",
        "--gender",
        "female",
        "--ages",
        "20",
        "--inversion",
        "negative-prompt",
        "--json",
    ]
    code, output, summary = edit(project_dir, tiny_model_dir, *args)
    assert code == 0, output
    record = Project(project_dir).read()["edits"][0]
    assert record["lora"] == "runs/a/pytorch_lora_weights.safetensors" and record["lora_run"] == "a"
    assert record["lora_applied"] == "fused-fp32"  # folded into the fp32 weights (edit/engine/precision.py)
    assert record["prompts"]["source"] == "photo of sks woman as 40-year-old"
    assert stub_engine["edit_ages"][-1].targets == ["photo of sks woman as 20-year-old"]
    assert len(stub_engine["invert"]) == 1

    code, output, _ = edit(project_dir, tiny_model_dir, *args, "--force")
    assert code == 0, output
    assert len(stub_engine["invert"]) == 1  # same LoRA: cache hit

    # Without --base-model (and from another folder), the model the LoRA was trained on is used.
    monkeypatch.chdir(tmp_path)
    plain = [a for a in args if a != "--json"]
    result = runner.invoke(app, ["edit", *plain, *FAST, "--force", "-p", str(project_dir)], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert f"base model: {tiny_model_dir}, the one the LoRA was trained on" in " ".join(result.output.split())
    assert Project(project_dir).read()["edits"][0]["base_model"] == str(tiny_model_dir)
    assert len(stub_engine["invert"]) == 1  # the same model under the same name: still a cache hit

    other = _make_lora(tiny_pipe, tmp_path / "theirs", seed=2, meta=None)  # e.g. the authors' LoRA: no JSON
    code, output, summary = edit(project_dir, tiny_model_dir, *args, "--force", "--lora", str(other))
    assert code == 0, output
    assert len(stub_engine["invert"]) == 2  # another LoRA: cache miss
    assert any("no pytorch_lora_weights.json" in w for w in summary["warnings"])
    record = Project(project_dir).read()["edits"][0]
    assert record["lora"] is None and record["lora_source"] == str(other.resolve())
    assert len(list((project_dir / "cache" / "inversions").glob("*.safetensors"))) == 2


def test_lora_problems_exit_2(project_dir: Path, tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path) -> None:
    base = [str(astronaut_path), "--aligned", "--source-age", "40", "--ages", "20"]
    code, output, _ = edit(project_dir, tiny_model_dir, *base)
    assert code == 2
    for way_out in ("selfage train", "--lora", "--no-lora"):
        assert way_out in output

    code, output, _ = edit(project_dir, tiny_model_dir, *base, "--lora", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "nope.safetensors" in output and "no such file" in output

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_lora_weights.safetensors").write_bytes(b"not loaded: refused before")
    (foreign / "pytorch_lora_weights.json").write_text(
        json.dumps(
            {
                "base_model": "someone/other-model",
                "base_model_fingerprint": "0123456789abcdef",
                "finished": True,
                "rank": 4,
            }
        )
    )
    code, output, _ = edit(project_dir, tiny_model_dir, *base, "--lora", str(foreign))
    assert code == 2 and "someone/other-model" in output and "--base-model" in output

    # Without --base-model, a LoRA whose (local) base model has since moved says so.
    moved = {"base_model": str(tmp_path / "moved-model"), "base_model_fingerprint": "0123456789abcdef"}
    (foreign / "pytorch_lora_weights.json").write_text(json.dumps({**moved, "finished": True, "rank": 4}))
    result = runner.invoke(app, ["edit", *base, *FAST, "-p", str(project_dir), "--lora", str(foreign)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"the base model it was trained on, {tmp_path / 'moved-model'}, is no longer there" in said
    assert "pass --base-model" in said


def test_no_dex_weights_and_no_source_age_exit_2(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    code, output, _ = edit(
        project_dir,
        tiny_model_dir,
        str(astronaut_path),
        "--aligned",
        "--no-lora",
        "--ages",
        "20",
        "--age-estimator",
        "dex",
    )
    assert code == 2
    assert "--source-age" in output and "--dex-weights" in output
    assert not (project_dir / "edits").exists()


def test_dex_source_age_is_rounded_recorded_and_reused(
    project_dir: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    astronaut_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stub_engine: dict,
) -> None:
    import selfage_cli.ages.engine.dex as dex
    from selfage_cli.ages.engine.estimator import AgeEstimate

    estimates: list[int] = []

    def fake_estimate(self, images, **kwargs):
        assert self.preprocess == "antialias" and images[0].size == (128, 128)
        estimates.append(1)
        return [AgeEstimate(37.4, "dex")]

    monkeypatch.setattr(dex, "load_dex", lambda path, device=None: object())
    monkeypatch.setattr(dex.DexEstimator, "estimate", fake_estimate)
    weights = tmp_path / "dex_age_classifier.pth"
    weights.write_bytes(b"stand-in")
    base = [
        str(astronaut_path),
        "--aligned",
        "--no-lora",
        "--ages",
        "20",
        "--inversion",
        "negative-prompt",
        "--dex-weights",
        str(weights),
    ]
    code, output, _ = edit(project_dir, tiny_model_dir, *base)
    assert code == 0, output
    manifest = Project(project_dir).read()
    assert manifest["edits"][0]["source_age"] == 37 and manifest["edits"][0]["source_age_source"] == "dex"
    assert manifest["edits"][0]["prompts"]["source"] == "photo of person as 37-year-old"
    assert manifest["inputs"][0]["age"] == 37 and manifest["inputs"][0]["age_candidates"]["dex"] == 37.4

    code, output, _ = edit(project_dir, tiny_model_dir, *base, "--no-round-source-age", "--force")
    assert code == 0, output
    assert Project(project_dir).read()["edits"][0]["prompts"]["source"] == "photo of person as 37.4-year-old"
    assert len(estimates) == 1  # the recorded estimate is reused


@pytest.mark.parametrize("ages", ["1.5", "20,101", "10,10", "", "=-5", "ten"])
def test_bad_ages_exit_2(project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, ages: str) -> None:
    option = ["--ages" + ages] if ages.startswith("=") else ["--ages", ages]
    code, output, _ = edit(
        project_dir, tiny_model_dir, str(astronaut_path), "--aligned", "--no-lora", "--source-age", "40", *option
    )
    assert code == 2, output
    assert "--ages" in output
    assert not (project_dir / "selfage.json").exists()


def test_out_of_memory_suggests_max_batch(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "invert", oom)
    code, output, _ = edit(
        project_dir,
        tiny_model_dir,
        str(astronaut_path),
        "--aligned",
        "--no-lora",
        "--source-age",
        "40",
        "--ages",
        "0,20,40,60",
    )
    assert code == 2 and "--max-batch 2" in output


def test_reweight_option_reaches_the_engine_and_the_record(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, stub_engine: dict
) -> None:
    args = [str(astronaut_path), "--aligned", "--no-lora", "--source-age", "40", "--ages", "20", "--json"]
    code, output, _ = edit(project_dir, tiny_model_dir, *args)
    assert code == 0, output
    assert stub_engine["settings"][-1].reweight == 1.0  # the default: no re-weighting
    code, output, _ = edit(project_dir, tiny_model_dir, *args, "--force", "--reweight", "2.5")
    assert code == 0, output
    assert stub_engine["settings"][-1].reweight == 2.5
    assert Project(project_dir).read()["edits"][0]["settings"]["reweight"] == 2.5
    code, output, _ = edit(project_dir, tiny_model_dir, *args, "--force", "--reweight", "inf")
    assert code == 2 and "--reweight" in output


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--no-cuda-graph"], False)])
def test_cuda_graph_option_reaches_the_inversion(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, stub_engine: dict, flags: list[str], expected: bool
) -> None:
    args = [str(astronaut_path), "--aligned", "--no-lora", "--source-age", "40", "--ages", "20", *flags]
    code, output, _ = edit(project_dir, tiny_model_dir, *args)
    assert code == 0, output
    assert stub_engine["cuda_graph"] == [expected]


def test_aligned_inputs_must_be_square(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path, stub_engine: dict
) -> None:
    code, output, summary = edit(
        project_dir,
        tiny_model_dir,
        str(hopper_path),
        str(astronaut_path),
        "--aligned",
        "--no-lora",
        "--source-age",
        "40",
        "--ages",
        "20",
        "--inversion",
        "negative-prompt",
        "--json",
    )
    assert code == 1, output
    (failure,) = summary["failures"]
    assert "grace_hopper.jpg" in failure["item"] and "not square" in failure["reason"]
    assert [d["id"] for d in summary["done"]] == ["astronaut"]


def test_raw_photo_is_aligned_registered_and_edited(
    project_dir: Path, tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, calls: dict[str, int]
) -> None:
    pytest.importorskip("selfage_cli.faces.stage")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (128, 128, 128)).save(blank)
    code, output, summary = edit(
        project_dir,
        tiny_model_dir,
        str(astronaut_path),
        str(blank),
        "--no-lora",
        "--source-age",
        "40",
        "--ages",
        "60",
        "--inversion",
        "negative-prompt",
        "--side-by-side",
        "--json",
    )
    assert code == 1, output  # the photo without a face fails, the other one is edited
    (failure,) = summary["failures"]
    assert failure["item"].endswith("blank.png") and "no face" in failure["reason"]
    manifest = Project(project_dir).read()
    (entry,) = manifest["inputs"]
    assert entry["sha256"] == sha256_file(astronaut_path) and entry.get("landmarks")  # the align stage's entry
    (record,) = manifest["edits"]
    assert record["input"] == entry["aligned"]
    assert Image.open(project_dir / record["outputs"]["60"]).size == (128, 128)
    assert Image.open(project_dir / record["strip"]).width == 2 * 128
    assert calls == {"invert": 1, "edit_ages": 1}
