"""``selfage edit --paste-back`` and ``--paste-back-only`` end to end on the tiny model.

The editing itself is a stand-in (flat images per age, as in test_edit_stage.py): these tests are
about the files, the manifest and the refusals around the paste-back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.edit import engine
from selfage_cli.faces.engine.loading import load_image
from selfage_cli.project import Project
from tests.edit_cli import json_summary, run_edit, stand_in_inversion

runner = CliRunner()
AGE_COLOURS = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200)}


def edit(project: Path, model: Path, *args: str) -> tuple[int, str, dict | None]:
    result = run_edit(project, model, *args)
    return result.exit_code, result.output, json_summary(result.stdout)


def paste_only(project: Path, *args: str) -> tuple[int, str, dict | None]:
    result = runner.invoke(app, ["edit", "--paste-back-only", *args, "-p", str(project)], terminal_width=200)
    return result.exit_code, result.output, json_summary(result.stdout)


@pytest.fixture
def flat_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """invert/edit_ages replaced by fast stand-ins: each target age comes back as one flat colour."""

    def invert(pipe, image, prompt, *, steps=50, mode="null-text", guidance=7.5, **kwargs):
        return stand_in_inversion(pipe, image, prompt, steps=steps, mode=mode, guidance=guidance)

    def edit_ages(pipe, inversion, prompts, **kwargs):
        size = int(inversion.x_t.shape[-1]) * int(pipe.vae_scale_factor)
        images = [Image.new("RGB", (size, size), (128, 128, 128))]
        images += [Image.new("RGB", (size, size), AGE_COLOURS[i]) for i in range(len(prompts.targets))]
        return engine.EditResult(latents=torch.zeros(1), images=images, masks=None, unet_calls=0, seconds=0.0)

    monkeypatch.setattr(engine, "invert", invert)
    monkeypatch.setattr(engine, "edit_ages", edit_ages)


@pytest.fixture
def sideways_jpeg(tmp_path: Path, hopper_path: Path) -> Path:
    """Grace Hopper stored sideways with EXIF orientation 6 and an sRGB colour profile, as a phone writes it."""
    upright = load_image(hopper_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "selfage test camera"  # Make
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "photos" / "hopper phone.jpg"
    path.parent.mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif, icc_profile=profile)
    return path


def test_paste_back_writes_full_frames_records_them_and_refuses_to_overwrite(
    project_dir: Path, tiny_model_dir: Path, sideways_jpeg: Path, flat_engine: None
) -> None:
    args = [str(sideways_jpeg), "--no-lora", "--source-age", "80", "--ages", "20,60", "--inversion", "negative-prompt"]
    code, output, summary = edit(
        project_dir, tiny_model_dir, *args, "--paste-back", "--side-by-side", "--gif", "--json"
    )
    assert code == 0, output
    (record,) = Project(project_dir).read()["edits"]
    folder = project_dir / "edits" / record["id"]
    assert record["full_outputs"] == {
        "20": f"edits/{record['id']}/20_full.jpg",
        "60": f"edits/{record['id']}/60_full.jpg",
    }
    assert record["strip_full"] == f"edits/{record['id']}/strip_full.jpg"
    assert record["gif_full"] == f"edits/{record['id']}/ages_full.gif"
    assert record["settings"]["paste_back"] is True
    upright = load_image(sideways_jpeg)
    with Image.open(sideways_jpeg) as stored:
        profile = stored.info["icc_profile"]
    for age, colour in ((20, AGE_COLOURS[0]), (60, AGE_COLOURS[1])):
        with Image.open(folder / f"{age}_full.jpg") as full:
            assert full.format == "JPEG" and full.size == upright.size  # upright, the photo's size
            assert full.info.get("icc_profile") == profile
            exif = full.getexif()
            assert 0x0112 not in exif and exif.get(0x010F) == "selfage test camera"
            pixels = np.asarray(full.convert("RGB"), dtype=int)
        # The face's middle is the edit's colour; the corners are the photo (up to JPEG re-encoding).
        entry = Project(project_dir).read()["inputs"][0]
        centre = np.rint(np.mean(entry["landmarks"], axis=0)).astype(int)
        assert np.abs(pixels[centre[1], centre[0]] - colour).max() <= 6
        corner = np.asarray(upright, dtype=int)[:30, :30]
        assert np.abs(pixels[:30, :30] - corner).mean() < 2.0
    with Image.open(folder / "strip_full.jpg") as strip:
        assert strip.height > upright.height and strip.width == 3 * upright.width  # input + 2 ages
    with Image.open(folder / "ages_full.gif") as gif:
        assert gif.n_frames == 2 and max(gif.size) <= 768

    # Same call again: everything exists, so nothing is edited or written without --force.
    stamp = (folder / "20_full.jpg").stat().st_mtime_ns
    code, output, summary = edit(project_dir, tiny_model_dir, *args, "--paste-back", "--json")
    assert code == 1 and "already exists" in output and "--force" in output
    assert (folder / "20_full.jpg").stat().st_mtime_ns == stamp

    # Editing an age again without pasting it back drops that age's (now stale) full frame from the record.
    code, output, _ = edit(project_dir, tiny_model_dir, *args[:-4], "--ages", "20", "--force", "--json")
    assert code == 0, output
    (record,) = Project(project_dir).read()["edits"]
    assert record["full_outputs"] == {"60": f"edits/{record['id']}/60_full.jpg"}
    assert "strip_full" not in record  # it showed the old 20

    # --paste-back-only: no model, every recorded age; refuses to overwrite without --force.
    code, output, summary = paste_only(project_dir, "--json")
    assert code == 1 and "_full.jpg" in output and "already exists" in output and "--force" in output
    code, output, summary = paste_only(project_dir, "--force", "--side-by-side", "--json")
    assert code == 0, output
    (record,) = Project(project_dir).read()["edits"]
    assert set(record["full_outputs"]) == {"20", "60"} and record["strip_full"].endswith("strip_full.jpg")
    assert summary["done"][0]["full_outputs"] == record["full_outputs"]

    # The photo moved: one sentence naming the fix, exit 1; given at its new place, it works.
    moved = sideways_jpeg.parent / "moved.jpg"
    shutil.move(sideways_jpeg, moved)
    code, output, summary = paste_only(project_dir, "--force", "--json")
    assert code == 1
    (failure,) = summary["failures"]
    assert "no longer there" in failure["reason"] and "--paste-back-only PHOTO" in failure["reason"]
    code, output, summary = paste_only(project_dir, str(moved), "--force", "--json")
    assert code == 0, output

    # The photo changed (same path, other bytes): the face may be elsewhere, so it is refused.
    shutil.move(moved, sideways_jpeg)
    Image.open(sideways_jpeg).convert("L").save(sideways_jpeg)
    code, output, summary = paste_only(project_dir, "--force", "--json")
    assert code == 1 and "changed since it was aligned" in summary["failures"][0]["reason"]


def test_png_photo_gives_png_and_only_the_face_changes(
    project_dir: Path, tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, flat_engine: None
) -> None:
    photo = tmp_path / "astro.png"
    shutil.copy(astronaut_path, photo)
    code, output, _ = edit(
        project_dir,
        tiny_model_dir,
        str(photo),
        "--no-lora",
        "--source-age",
        "40",
        "--ages",
        "70",
        "--inversion",
        "negative-prompt",
        "--paste-back",
    )
    assert code == 0, output
    assert "full photos 70_full.png" in output  # the report line names the file
    full = project_dir / "edits" / "astro" / "70_full.png"
    with Image.open(full) as image:
        assert image.format == "PNG"
        out = np.asarray(image.convert("RGB"))
    original = np.asarray(load_image(photo))
    changed = np.any(out != original, axis=2)
    assert changed.any()
    ys, xs = np.nonzero(changed)
    assert xs.min() > 0 and xs.max() < original.shape[1] - 1 and ys.min() > 0  # the face only
    for corner in ((slice(0, 20), slice(0, 20)), (slice(-20, None), slice(-20, None))):
        assert np.array_equal(out[corner], original[corner])


def test_aligned_with_paste_back_exits_2_with_nothing_written(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, flat_engine: None
) -> None:
    for flag in ("--paste-back", "--paste-back-only"):
        code, output, _ = edit(
            project_dir, tiny_model_dir, str(astronaut_path), "--aligned", "--source-age", "40", "--no-lora", flag
        )
        assert code == 2, output
        assert "--aligned" in output and "original photo" in output
        assert "Traceback" not in output
    assert not any(project_dir.iterdir())  # no manifest, no inputs, no edits


def test_inputs_registered_aligned_cannot_be_pasted_back(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, flat_engine: None
) -> None:
    code, output, _ = edit(
        project_dir, tiny_model_dir, str(astronaut_path), "--aligned", "--source-age", "40", "--no-lora", "--ages", "9"
    )
    assert code == 0, output
    # Later, every input with --paste-back: the aligned one has no photo; it fails before any editing.
    code, output, summary = edit(
        project_dir, tiny_model_dir, "--source-age", "40", "--no-lora", "--ages", "30", "--paste-back", "--json"
    )
    assert code == 1
    (failure,) = summary["failures"]
    assert failure["item"] == "astronaut" and "--aligned" in failure["reason"]
    assert not (project_dir / "edits" / "astronaut" / "30.png").exists()
    code, output, summary = paste_only(project_dir, "--json")
    assert code == 1 and "no photo to paste it back into" in summary["failures"][0]["reason"]


def test_merge_keeps_full_frames_of_ages_not_redone() -> None:
    from selfage_cli.edit.record import merge_edit_entry as merge_typed
    from selfage_cli.manifest import Edit

    def merge_edit_entry(previous: dict | None, latest: dict) -> dict:
        typed = None if previous is None else Edit.model_validate(previous)
        return merge_typed(typed, Edit.model_validate(latest)).to_dict()

    first = {
        "id": "p",
        "target_ages": [10, 70],
        "outputs": {"10": "edits/p/10.png", "70": "edits/p/70.png"},
        "settings": {"ages": [10, 70]},
        "full_outputs": {"10": "edits/p/10_full.jpg", "70": "edits/p/70_full.jpg"},
        "strip_full": "edits/p/strip_full.jpg",
        "gif_full": None,
    }
    merged = merge_edit_entry(None, first)
    second = {"id": "p", "target_ages": [30], "outputs": {"30": "edits/p/30.png"}, "settings": {"ages": [30]}}
    merged = merge_edit_entry(merged, second)
    assert merged["full_outputs"] == first["full_outputs"] and merged["strip_full"] == "edits/p/strip_full.jpg"
    third = {
        "id": "p",
        "target_ages": [70],
        "outputs": {"70": "edits/p/70.png"},
        "settings": {"ages": [70]},
        "full_outputs": {"70": "edits/p/70_full.jpg"},
        "strip_full": None,
        "gif_full": None,
    }
    merged = merge_edit_entry(merged, third)
    assert merged["full_outputs"] == first["full_outputs"]
    assert merged.get("strip_full") is None  # the latest paste-back made none
    assert json.loads(json.dumps(merged)) == merged


def test_profile_of_another_colour_space_is_not_copied(tmp_path: Path) -> None:
    from selfage_cli.edit.paste_back import _save_options

    grey = tmp_path / "grey.jpg"
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    Image.new("L", (8, 8)).save(grey, icc_profile=profile)
    options = _save_options(grey, ".jpg")
    assert "icc_profile" not in options and options["quality"] >= 90


@pytest.mark.parametrize(
    "record",
    [{"full_outputs": {"20": "/abs/20_full.jpg"}}, {"strip_full": "../../strip_full.jpg"}, {"gif_full": "/x.gif"}],
)
def test_manifest_refuses_full_frame_paths_outside_the_project(project_dir: Path, record: dict) -> None:
    from selfage_cli.project import MANIFEST_NAME, ManifestError

    (project_dir / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "edits": [{"id": "a", **record}]}))
    with pytest.raises(ManifestError):
        Project(project_dir).read()


@pytest.mark.parametrize(("mode", "suffix"), [("L", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("RGB", ".webp")])
def test_any_pixel_mode_and_format(project_dir: Path, tmp_path: Path, astronaut_path: Path, mode: str, suffix: str):
    from selfage_cli.edit.paste_back import plan_full_outputs, source_photo, write_full_outputs
    from selfage_cli.faces.engine.align import align_image
    from selfage_cli.project import sha256_file

    upright = load_image(astronaut_path)
    face = align_image(upright, name="astronaut")[0]
    photo = tmp_path / f"photo{suffix}"
    upright.convert(mode).save(photo)
    entry = {
        "id": "photo",
        "source": str(photo),
        "sha256": sha256_file(photo),
        "landmarks": face.landmarks.tolist(),
        "size": 512,
    }
    source = source_photo(Project(project_dir), entry)
    assert not isinstance(source, str), source
    outputs = plan_full_outputs(Project(project_dir), "photo", [30], source.suffix, side_by_side=True, gif=True)
    keys = write_full_outputs(Project(project_dir), source, outputs, {30: Image.new("RGB", (128, 128), (9, 9, 9))}, 40)
    expected = ".jpg" if suffix == ".jpg" else ".png"
    assert keys["full_outputs"] == {"30": f"edits/photo/30_full{expected}"}
    with Image.open(project_dir / keys["full_outputs"]["30"]) as full:
        assert full.format == ("JPEG" if expected == ".jpg" else "PNG") and full.size == upright.size
        out = np.asarray(full.convert("RGB"), dtype=int)
    original = np.asarray(load_image(photo), dtype=int)
    corner = np.abs(out[:20, :20] - original[:20, :20])
    if expected == ".jpg":  # re-encoded at quality 95
        assert corner.mean() <= 1.5
    else:
        assert corner.max() == 0
    assert (project_dir / keys["strip_full"]).is_file() and (project_dir / keys["gif_full"]).is_file()


def test_paste_back_only_refuses_editing_options_by_name(project_dir: Path) -> None:
    code, output, _ = paste_only(project_dir, "--ages", "10,20", "--inversion", "direct")
    text = " ".join(output.split())
    assert code == 2 and "does not take --ages, --inversion" in text and "Traceback" not in output


@pytest.fixture
def edited_face(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, tmp_path: Path, flat_engine: None
) -> Path:
    """The astronaut as face.png, edited (stand-in engine) to ages 0 and 1 in ``project_dir``."""
    photo = tmp_path / "face.png"
    shutil.copy(astronaut_path, photo)
    code, output, _ = edit(project_dir, tiny_model_dir, str(photo), "--no-lora", "--source-age", "40", "--ages", "0,1")
    assert code == 0, output
    return photo


def test_a_damaged_crop_or_record_fails_that_item_only(project_dir: Path, edited_face: Path) -> None:
    project = Project(project_dir)
    (record,) = project.read()["edits"]
    (project_dir / record["outputs"]["0"]).write_bytes(b"not a png")  # a damaged crop
    code, output, summary = paste_only(project_dir, "--json")
    assert code == 1 and "Traceback" not in output and "internal error" not in output
    assert record["outputs"]["0"].split("/")[-1] in summary["failures"][0]["reason"]
    with project.update() as manifest:  # an age without a recorded output
        del manifest["edits"][0]["outputs"]["0"]
    code, output, summary = paste_only(project_dir, "--json")
    assert code == 1 and "the edit to age 0 has no recorded output" in summary["failures"][0]["reason"]


def test_edit_of_a_moved_photo_pastes_back_into_the_photo_given(
    project_dir: Path, tiny_model_dir: Path, astronaut_path: Path, tmp_path: Path, flat_engine: None
) -> None:
    first = tmp_path / "a" / "face.png"
    first.parent.mkdir()
    shutil.copy(astronaut_path, first)
    args = ["--no-lora", "--source-age", "40"]
    code, output, _ = edit(project_dir, tiny_model_dir, str(first), *args, "--ages", "0")
    assert code == 0, output
    moved = tmp_path / "b" / "face.png"
    moved.parent.mkdir()
    shutil.move(first, moved)  # same bytes, new place: found by its sha256, aligned already
    code, output, summary = edit(
        project_dir, tiny_model_dir, str(moved), *args, "--ages", "1", "--paste-back", "--json"
    )
    assert code == 0, output
    (record,) = Project(project_dir).read()["edits"]
    assert set(record["full_outputs"]) == {"1"} and (project_dir / record["full_outputs"]["1"]).is_file()


def test_paste_back_only_waits_for_no_one_holding_the_edit_folder(project_dir: Path, edited_face: Path) -> None:
    from selfage_cli.edit.outputs import outputs_held

    project = Project(project_dir)
    before = project.manifest_path.read_bytes()
    with outputs_held(project, ["face"]):  # as a running `selfage edit face.png` holds it
        code, output, _ = paste_only(project_dir)
    assert code == 2 and "Traceback" not in output
    assert project.manifest_path.read_bytes() == before and not list((project_dir / "edits" / "face").glob("*_full*"))
