"""The edit stage's parts without the model: options, cache keys, output files, LoRA resolution, process split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfage_cli.edit.cache import InversionCache, InversionKey
from selfage_cli.edit.config import EditConfig
from selfage_cli.edit.lora import ResolvedLora, check_base_model, identifier_from_meta, resolve_lora
from selfage_cli.edit.outputs import existing_outputs, make_strip, plan_outputs, write_outputs
from selfage_cli.edit.record import merge_edit_entry as merge_typed
from selfage_cli.edit.stage import _oom_message
from selfage_cli.errors import SelfageError
from selfage_cli.processes import share
from selfage_cli.project import Project


# ---- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"gender": "other"}, "--gender"),
        ({"inversion": "ddim"}, "--inversion"),
        ({"cross_replace": 1.5}, "--cross-replace"),
        ({"self_replace": -0.1}, "--self-replace"),
        ({"blend_threshold": 2}, "--blend-threshold"),
        ({"blend_start": float("nan")}, "--blend-start"),
        ({"reweight": float("inf")}, "--reweight"),
        ({"ddim_steps": 0}, "--ddim-steps"),
        ({"inner_steps": -1}, "--inner-steps"),
        ({"guidance": 0.5}, "--guidance"),
        ({"max_batch": 0}, "--max-batch"),
        ({"source_age": 120}, "--source-age"),
        ({"ages": []}, "--ages"),
        ({"ages": [10, 10]}, "twice"),
        ({"ages": [10, 101]}, "outside"),
        ({"ages": [1.5]}, "not an integer"),
    ],
)
def test_bad_options_are_refused_naming_the_option(changes: dict, fragment: str) -> None:
    with pytest.raises(SelfageError, match=fragment.replace("-", r"\-")):
        EditConfig(**changes)


def test_config_normalises_gender_and_rounds_source_age() -> None:
    config = EditConfig(gender="Female")
    assert config.gender == "female"
    assert config.prompt_age(34.71) == 35
    assert EditConfig(round_source_age=False).prompt_age(34.71) == 34.71
    assert EditConfig(round_source_age=False).prompt_age(34) == 34
    assert config.to_json()["ages"] == [0, 20, 80]


# ---- cache -----------------------------------------------------------------------------------------------
def _key(**changes) -> InversionKey:
    values = dict(
        image_sha256="a" * 64,
        base_model="fp",
        lora_sha256="none",
        prompt="photo of sks woman as 30-year-old",
        guidance=7.5,
        steps=50,
        mode="null-text",
        inner_steps=10,
        dtype="fp32",
        resolution=512,
    )
    values.update(changes)
    return InversionKey(**values)


def test_cache_key_depends_on_everything_the_inversion_depends_on() -> None:
    base = _key().digest
    for change in (
        {"image_sha256": "b" * 64},
        {"base_model": "other"},
        {"lora_sha256": "c" * 64},
        {"prompt": "photo of woman as 30-year-old"},
        {"guidance": 5.0},
        {"steps": 20},
        {"mode": "negative-prompt"},
        {"inner_steps": 5},
        {"dtype": "bf16"},
        {"resolution": 768},
    ):
        assert _key(**change).digest != base, change
    # negative-prompt inversion runs no optimisation: the inner-step count does not split its cache
    assert _key(mode="negative-prompt", inner_steps=3).digest == _key(mode="negative-prompt", inner_steps=10).digest


def test_cache_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    from selfage_cli.edit.engine.inversion import Inversion

    cache = InversionCache(Project(tmp_path))
    key = _key()
    assert cache.load(key) is None
    inversion = Inversion(
        x_t=torch.randn(1, 4, 16, 16),
        null_embeddings=torch.randn(3, 77, 32),
        mode="null-text",
        prompt=key.prompt,
        steps=3,
        guidance=7.5,
        inner_steps_run=[2, 1, 2],
        seconds=1.25,
        unet_runner="cuda-graph",
    )
    path = cache.save(key, inversion)
    assert path.parent == tmp_path / "cache" / "inversions"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = cache.load(key)
    assert torch.equal(loaded.x_t, inversion.x_t) and torch.equal(loaded.null_embeddings, inversion.null_embeddings)
    assert loaded.inner_steps_run == [2, 1, 2] and loaded.steps == 3 and loaded.prompt == key.prompt
    assert loaded.unet_runner == "cuda-graph"
    path.write_bytes(b"garbage")  # a torn or edited file is recomputed, never fatal
    assert cache.load(key) is None


# ---- outputs -------------------------------------------------------------------------------------------
def test_strip_has_one_tile_per_image_and_gif_one_frame_per_age(tmp_path: Path) -> None:
    project = Project(tmp_path)
    ages = [5, 40, 80]
    outputs = plan_outputs(project, "me", ages, side_by_side=True, gif=True)
    assert existing_outputs(outputs) == []
    colours = {5: "red", 40: "green", 80: "blue"}
    write_outputs(
        outputs,
        Image.new("RGB", (64, 64), "grey"),
        34,
        {a: Image.new("RGB", (64, 64), colours[a]) for a in ages},
        tile=64,
    )
    assert sorted(p.name for p in outputs.folder.iterdir()) == ["40.png", "5.png", "80.png", "ages.gif", "strip.png"]
    strip = Image.open(outputs.strip)
    assert strip.width == (1 + len(ages)) * 64 and strip.height > 64
    assert strip.getpixel((64 + 32, 32))[0] > 200  # second tile is the first age (red)
    with Image.open(outputs.gif) as gif:
        assert gif.n_frames == len(ages)
    assert len(existing_outputs(outputs)) == 5
    assert make_strip([Image.new("RGB", (10, 10))] * 2, ["a", "b"], 32).width == 64


# ---- LoRA resolution --------------------------------------------------------------------------------------
def _write_lora(folder: Path, meta: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "pytorch_lora_weights.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.x.lora_A.weight": torch.zeros(1)}, str(file))
    if meta is not None:
        (folder / "pytorch_lora_weights.json").write_text(json.dumps(meta))
    return file


def test_default_lora_is_the_latest_finished_run(tmp_path: Path) -> None:
    project = Project(tmp_path)
    with pytest.raises(SelfageError) as info:
        resolve_lora(project, None, no_lora=False)
    for way_out in ("selfage train", "--lora", "--no-lora"):
        assert way_out in str(info.value)
    for name, finished in (("old", True), ("new", True), ("broken", False)):
        _write_lora(tmp_path / "runs" / name, {"finished": finished, "base_model": "m", "base_model_fingerprint": "f"})
        with project.update() as manifest:
            manifest["runs"].append(
                {"name": name, "lora": f"runs/{name}/pytorch_lora_weights.safetensors", "finished": finished}
            )
    chosen = resolve_lora(project, None, no_lora=False)
    assert chosen.run == "new" and chosen.path == tmp_path / "runs" / "new" / "pytorch_lora_weights.safetensors"
    named = resolve_lora(project, Path("broken"), no_lora=False)  # a run name, used although unfinished
    assert named.run == "broken" and any("did not finish" in w for w in named.warnings)
    assert resolve_lora(project, None, no_lora=True) is None
    with pytest.raises(SelfageError, match="contradict"):
        resolve_lora(project, Path("x"), no_lora=True)


def test_only_unfinished_runs_says_how_to_finish_them(tmp_path: Path) -> None:
    project = Project(tmp_path)
    _write_lora(tmp_path / "runs" / "half", {"finished": False})
    with project.update() as manifest:
        manifest["runs"].append(
            {"name": "half", "lora": "runs/half/pytorch_lora_weights.safetensors", "finished": False}
        )
    with pytest.raises(SelfageError, match="--resume"):
        resolve_lora(project, None, no_lora=False)


def test_lora_option_takes_file_or_folder_and_warns_without_json(tmp_path: Path) -> None:
    project = Project(tmp_path / "proj")
    file = _write_lora(tmp_path / "theirs", None)
    for option in (file, file.parent):
        chosen = resolve_lora(project, option, no_lora=False)
        assert chosen.path == file.resolve() and chosen.meta is None
        assert any("no pytorch_lora_weights.json" in w for w in chosen.warnings)
        assert chosen.identifier == "sks"
    assert chosen.manifest_fields(project)["lora_source"] == str(file.resolve())
    with pytest.raises(SelfageError, match="no such file"):
        resolve_lora(project, tmp_path / "missing.safetensors", no_lora=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfageError, match="without pytorch_lora_weights"):
        resolve_lora(project, tmp_path / "empty", no_lora=False)


def test_lora_for_another_base_model_is_refused(tiny_model_dir: Path) -> None:
    from selfage_cli.models import model_fingerprint

    good = ResolvedLora(
        path=Path("x"),
        origin="t",
        meta={"base_model": str(tiny_model_dir), "base_model_fingerprint": model_fingerprint(tiny_model_dir)},
    )
    check_base_model(good, str(tiny_model_dir))
    other = ResolvedLora(
        path=Path("x"), origin="t", meta={"base_model": "someone/else", "base_model_fingerprint": "0" * 16}
    )
    with pytest.raises(SelfageError, match="trained on someone/else"):
        check_base_model(other, str(tiny_model_dir))
    check_base_model(ResolvedLora(path=Path("x"), origin="t", meta=None), str(tiny_model_dir))


def test_identifier_comes_from_the_training_prompt() -> None:
    assert identifier_from_meta(None) == "sks"
    assert identifier_from_meta({"identifier": "zwx"}) == "zwx"
    assert identifier_from_meta({"config": {"instance_prompt": "photo of ohwx person"}}) == "ohwx"


# ---- processes, memory --------------------------------------------------------------------------------------
class _FakeState:
    num_processes = 2

    def __init__(self, index: int):
        self.index = index

    def split_between_processes(self, items):
        import contextlib

        half = (len(items) + 1) // 2
        return contextlib.nullcontext(items[:half] if self.index == 0 else items[half:])


def test_photos_are_split_across_processes() -> None:
    photos = ["a", "b", "c"]
    assert share(photos, None) == photos
    shares = [share(photos, _FakeState(i)) for i in range(2)]
    assert shares[0] + shares[1] == photos and all(shares)


def test_out_of_memory_suggests_max_batch() -> None:
    assert "--max-batch 4" in _oom_message(EditConfig(ages=list(range(0, 90, 10))), "me")
    assert "--max-batch 1" in _oom_message(EditConfig(ages=[1, 2, 3], max_batch=2), "me")
    last = _oom_message(EditConfig(ages=[1, 2, 3], max_batch=1), "me")
    assert "--max-batch" not in last and "undoes most of the LoRA's effect" in last


# ---- manifest entry over several calls ----------------------------------------------------------------------
def merge_edit_entry(previous: dict | None, latest: dict) -> dict:
    """``edit.record.merge_edit_entry`` on the JSON of the entries."""
    from selfage_cli.manifest import Edit

    typed = None if previous is None else Edit.model_validate(previous)
    return merge_typed(typed, Edit.model_validate(latest)).to_dict()


def _entry(source_age: int, ages: list[int], *, strip: bool = False, **settings) -> dict:
    return {
        "id": "me",
        "source_age": source_age,
        "source_age_source": "option",
        "target_ages": ages,
        "outputs": {str(a): f"edits/me/{a}.png" for a in ages},
        "strip": "edits/me/strip.png" if strip else None,
        "gif": None,
        "lora": None,
        "base_model": "tiny",
        "prompts": {"source": f"photo of person as {source_age}-year-old", "targets": [f"t{a}" for a in ages]},
        "settings": {"ages": ages, **settings},
        "inversion_cache": f"cache/inversions/{source_age}.safetensors",
        "created": f"call {source_age}-{ages}",
    }


def test_edits_accumulate_and_older_outputs_keep_their_provenance() -> None:
    from selfage_cli.eval.stage import _source_age_output

    first = merge_edit_entry(None, _entry(40, [10, 40, 70], strip=True, cross_replace=0.8))
    assert first["history"] == [] and _source_age_output(first) == 40
    # Another source age: 10/40/70 stay, made from 40; 30 is from 30. Output 40 is no reconstruction now.
    second = merge_edit_entry(first, _entry(30, [30, 70], cross_replace=0.5))
    assert second["target_ages"] == [10, 40, 70, 30]
    assert second["outputs"] == {str(a): f"edits/me/{a}.png" for a in (10, 40, 70, 30)}
    assert second["source_age"] == 30 and second["settings"] == {"ages": [30, 70], "cross_replace": 0.5}
    assert second["strip"] is None
    (earlier,) = second["history"]
    assert earlier["ages"] == [10, 40] and earlier["prompts"]["targets"] == ["t10", "t40"]
    assert earlier["source_age"] == 40 and earlier["settings"]["cross_replace"] == 0.8
    assert earlier["strip"] == "edits/me/strip.png" and earlier["created"] == "call 40-[10, 40, 70]"
    assert _source_age_output(second) == 30
    assert _source_age_output({**second, "source_age": 10}) is None  # 10 was made from 40
    # Redoing every earlier age (and the strip) leaves no history.
    third = merge_edit_entry(second, _entry(30, [10, 40, 30, 70], strip=True))
    assert third["target_ages"] == [10, 40, 70, 30] and third["history"] == []
    assert _source_age_output(_entry(40, [40]) | {"history": [{"ages": [40], "source_age": 40}]}) == 40


def test_aligned_registration_never_overwrites_an_unregistered_file(project_dir: Path, astronaut_path: Path) -> None:
    from selfage_cli.edit.inputs import register_aligned
    from selfage_cli.summary import StageSummary

    project = Project(project_dir)
    project.init()
    stray = project.subdir("inputs", "aligned") / "astronaut.png"
    Image.new("RGB", (8, 8), "blue").save(stray)
    before = stray.read_bytes()
    summary = StageSummary("edit")
    [photo] = register_aligned(project, [astronaut_path], 64, summary)
    assert not summary.failures
    assert photo.id == "astronaut_2" and photo.aligned == "inputs/aligned/astronaut_2.png"
    assert stray.read_bytes() == before  # the unregistered file is left alone
    with Image.open(project.path(photo.aligned)) as saved:
        assert saved.size == (64, 64) and saved.mode == "RGB"
    # the same photo again: the same entry, no third file
    assert register_aligned(project, [astronaut_path], 64, StageSummary("edit"))[0].id == "astronaut_2"
    assert sorted(p.name for p in stray.parent.iterdir()) == ["astronaut.png", "astronaut_2.png"]


def test_aligned_inputs_are_read_like_the_align_stage(project_dir: Path, tmp_path: Path) -> None:
    """EXIF orientation, CMYK and 16-bit photos go through faces.loading, as in ``selfage align``."""
    import numpy as np

    from selfage_cli.edit.inputs import register_aligned
    from selfage_cli.faces.engine.loading import load_image
    from selfage_cli.summary import StageSummary

    project = Project(project_dir)
    project.init()
    left_right = np.zeros((16, 16, 3), np.uint8)
    left_right[:, 8:] = 255  # right half white
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90° clockwise to view
    Image.fromarray(np.rot90(left_right, k=1).copy()).save(rotated, exif=exif, quality=100)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=100)  # red
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(deep)  # 16-bit white
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    summary = StageSummary("edit")
    photos = register_aligned(project, [rotated, cmyk, deep, broken], 16, summary)
    assert [p.id for p in photos] == ["rotated", "cmyk", "deep"]
    for photo, source in zip(photos, (rotated, cmyk, deep), strict=True):
        with Image.open(project.path(photo.aligned)) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(load_image(source)))
    with Image.open(project.path(photos[0].aligned)) as upright:
        pixels = np.asarray(upright, float)
        assert pixels[:, 12:].mean() > 200 and pixels[:, :4].mean() < 50  # white on the right again
    with Image.open(project.path(photos[2].aligned)) as white:
        assert np.asarray(white).min() == 255
    [failure] = summary.failures
    assert failure.item == str(broken) and "not an image file" in failure.reason
