"""The smaller cases of issue 17, item 8: each message, count, name and default as a user meets it."""

from __future__ import annotations

import io
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.edit.progress import PhasedTask
from selfage_cli.errors import SelfageError
from selfage_cli.project import Project, find
from tests.test_train_run import make_train_project, run, tiny_config

runner = CliRunner()


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def one_sentence(output: str) -> str:
    """The error line, its wrapping undone."""
    return " ".join(output.split())


# ---- train: the resolution ---------------------------------------------------------------------------
def test_train_defaults_to_the_models_native_resolution_and_warns_once(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    project = make_train_project(tmp_path / "p", [astronaut_path, hopper_path], size=256)  # not the model's 128
    result = invoke("train", "--run", "r", "--steps", "1", "--batch-size", "1", "--rank", "2", "--checkpoint-every",
                    "0", "--base-model", tiny_model_dir, "--device", "cpu", "-p", project.root)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert find(project.read()["runs"], "r", key="name")["config"]["resolution"] == 128  # the tiny model's own
    assert "as asked" not in result.output  # nothing was asked
    assert result.output.count("were resized") == 1 and "are not 128×128" in result.output


# ---- exit 2, one sentence --------------------------------------------------------------------------------
def test_random_model_into_a_file_and_eval_report_at_a_file_exit_2(tmp_path: Path) -> None:
    a_file = tmp_path / "model"
    a_file.write_text("x")
    result = invoke("random-model", a_file)
    assert result.exit_code == 2 and f"{a_file} is a file, not a folder" in one_sentence(result.output)
    assert a_file.read_text() == "x"
    Project(tmp_path / "p").init()
    report = invoke("eval", "--report", a_file, "-p", tmp_path / "p")
    assert report.exit_code == 2, report.output
    assert f"--report {a_file} is a file; pass a folder" in one_sentence(report.output)
    assert "Traceback" not in result.output + report.output


def test_doctor_says_a_missing_folder_is_missing(tmp_path: Path) -> None:
    result = invoke("doctor", "--base-model", tmp_path / "nonexistent", "-p", tmp_path)
    assert f"{tmp_path / 'nonexistent'} does not exist (no such folder)" in one_sentence(result.output)
    assert "Hugging Face cache" not in result.output


def test_a_missing_model_message_points_at_no_unshown_stacktrace() -> None:
    from selfage_cli.models import _explain_load_failure

    try:
        try:
            raise ConnectionError("Name or service not known")
        except ConnectionError as cause:
            raise OSError(
                "Cannot load model someone/model: the model is not fully cached locally (no snapshot) and an error "
                "occurred while trying to fetch metadata from the Hub. Please check out the root cause in the "
                "stacktrace above."
            ) from cause
    except OSError as exc:
        message = _explain_load_failure("someone/model", exc)
    assert "stacktrace" not in message.lower() and "ConnectionError: Name or service not known" in message


# ---- align: names and counts ------------------------------------------------------------------------------
def _group_photo(folder: Path, astronaut: Path, hopper: Path) -> Path:
    group = Image.new("RGB", (1100, 620), (128, 128, 128))
    group.paste(Image.open(astronaut).convert("RGB"), (0, 40))
    group.paste(Image.open(hopper).convert("RGB"), (560, 0))
    group.save(folder / "group.jpg", quality=92)
    return folder / "group.jpg"


def test_all_faces_after_a_plain_align_names_every_face_the_same_way(
    tmp_path: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    photo, project = _group_photo(tmp_path, astronaut_path, hopper_path), tmp_path / "p"
    assert invoke("align", photo, "--size", "128", "-p", project).exit_code == 0
    assert [e["id"] for e in Project(project).read()["references"]] == ["group"]
    both = invoke("align", photo, "--all-faces", "--force", "--size", "128", "-p", project)
    assert both.exit_code == 0, both.output
    assert sorted(e["id"] for e in Project(project).read()["references"]) == ["group_face1", "group_face2"]
    assert sorted(p.name for p in (project / "refs" / "aligned").iterdir()) == ["group_face1.png", "group_face2.png"]
    again = invoke("align", photo, "--force", "--size", "128", "-p", project)
    assert again.exit_code == 0 and [e["id"] for e in Project(project).read()["references"]] == ["group"]


def test_align_counts_the_photos_it_was_given(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (120, 120, 120)).save(blank)
    result = invoke("align", blank, "-p", tmp_path / "p")
    assert result.exit_code == 1
    assert "aligned 0 face(s) from 1 photo(s)" in result.output and "1 failed" in result.output


# ---- edit -------------------------------------------------------------------------------------------------
def test_an_input_whose_aligned_file_is_missing_says_which_and_how_to_re_create_it(tmp_path: Path) -> None:
    from selfage_cli.edit.inputs import InputPhoto, MissingAlignedError, load_for_model
    from selfage_cli.manifest import ImageEntry

    project = Project(tmp_path / "p")
    entry = {"id": "holiday", "source": "/photos/holiday.jpg", "aligned": "inputs/aligned/holiday.png"}
    with pytest.raises(MissingAlignedError) as info:
        load_for_model(project, InputPhoto("holiday", ImageEntry.model_validate(entry)), 128)
    message = str(info.value)
    assert "inputs/aligned/holiday.png is missing" in message
    assert "selfage align /photos/holiday.jpg --role inputs --force" in message and "report" not in message
    with pytest.raises(MissingAlignedError, match="--aligned --force"):
        load_for_model(project, InputPhoto("holiday", ImageEntry.model_validate({**entry, "prealigned": True})), 128)


class _Bar:
    """A stand-in for rich's Progress that records resets (phase starts) and updates."""

    def __init__(self) -> None:
        self.resets: list[tuple[str, int | None]] = []
        self.updates: list[tuple[int, int]] = []

    def add_task(self, description: str, total: Any = None, status: str = "") -> int:
        return 0

    def reset(self, task: int, total: Any = None, completed: int = 0, description: str = "") -> None:
        self.resets.append((description, total))

    def update(self, task: int, completed: int = 0, total: Any = None) -> None:
        self.updates.append((completed, total))

    def remove_task(self, task: int) -> None:
        pass


def test_edit_progress_restarts_its_timing_at_each_phase() -> None:
    bar = _Bar()
    phases = PhasedTask(bar, "photo")
    progress = phases.inversion(3)
    for done in range(1, 7):  # invert() counts DDIM and null-text steps as one: 1..6 of 6
        progress(done, 6)
    phases.start("editing 2 ages", None)
    assert bar.resets == [("photo: inverting (DDIM)", 3), ("photo: null-text optimisation", 3), ("photo: editing 2 ages", None)]  # fmt: skip
    assert bar.updates == [(1, 3), (2, 3), (3, 3), (1, 3), (2, 3), (3, 3)]


def test_an_sd1_lora_on_an_sd2_model_fails_in_one_line_without_diffusers_dump(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from selfage_cli.edit.lora import ResolvedLora, load_lora
    from selfage_cli.models import build_random_pipeline

    project = make_train_project(tmp_path / "p", [astronaut_path, hopper_path])
    run(project, tiny_config(tiny_model_dir, steps=1, checkpoint_every=0), "sd1")
    lonely = tmp_path / "lonely" / "pytorch_lora_weights.safetensors"  # no JSON beside it
    lonely.parent.mkdir()
    shutil.copy(project.root / "runs" / "sd1" / "pytorch_lora_weights.safetensors", lonely)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with pytest.raises(SelfageError) as info:
            load_lora(build_random_pipeline("tiny-sd2"), ResolvedLora(path=lonely, origin="--lora", meta=None))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert "size mismatch" not in stream.getvalue() + caplog.text
    message = str(info.value)
    assert "\n" not in message and "could not be loaded as a diffusers LoRA for this base model" in message


# ---- ages -------------------------------------------------------------------------------------------------
def test_label_ages_reg_does_not_replace_a_generated_set_without_force(tmp_path: Path, astronaut_path: Path) -> None:
    project = Project(tmp_path / "p")
    (project.root / "refs").mkdir(parents=True)
    shutil.copy(astronaut_path, project.root / "refs" / "30_me.png")
    generated = {"folder": None, "generated": True, "base_model": "m", "images": [{"id": "g", "age": 40}]}
    with project.update() as manifest:
        manifest["references"] = [{"id": "30_me", "source": "/x/30_me.jpg", "aligned": "refs/30_me.png"}]
        manifest["regularisation"] = generated
    reg = tmp_path / "reg"
    reg.mkdir()
    shutil.copy(astronaut_path, reg / "50_other.png")
    refused = invoke("label-ages", "--reg", reg, "-p", project.root)
    assert refused.exit_code == 2, refused.output
    assert "the project's regularisation set is a generated set (1 images); pass --force" in one_sentence(
        refused.output
    )
    assert project.read()["regularisation"] == generated
    forced = invoke("label-ages", "--reg", reg, "--force", "-p", project.root)
    assert forced.exit_code == 0, forced.output
    assert project.read()["regularisation"]["folder"] == str(reg.resolve())


def test_train_names_only_ways_to_give_an_age_that_train_accepts(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selfage_cli.ages.stage as ages_stage

    refs = tmp_path / "me"
    refs.mkdir()
    shutil.copy(astronaut_path, refs / "beach.png")  # no age in its name
    # An image no estimator labels (the builtin estimator would otherwise give every face an age).
    monkeypatch.setattr(ages_stage, "_run_estimator_if_needed", lambda *args: ages_stage.ESTIMATOR_PREFERENCE)
    result = invoke("train", "--refs", refs, "--base-model", tiny_model_dir, "--device", "cpu", "-p", tmp_path / "p")
    assert result.exit_code == 2, result.output
    text = one_sentence(result.output)
    assert "no age from any source" in text and "--ages-file" in text
    assert "NAME=AGE or" not in text and "with NAME=AGE" not in text


def test_a_damaged_exif_block_gives_our_sentence_not_pillows_warning(tmp_path: Path) -> None:
    from selfage_cli.ages.engine.sources import ExifDateError, exif_date

    exif = Image.Exif()
    exif[0x010F] = "Camera"  # a Make tag, no date
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    start = data.find(b"Exif\x00\x00") + 6
    big_endian = data[start : start + 2] == b"MM"
    data[start + 8 : start + 10] = b"\x00\x40" if big_endian else b"\x40\x00"  # IFD0 claims 64 entries, holds 1
    photo = tmp_path / "damaged.jpg"
    photo.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning leaking out fails the test
        with pytest.raises(ExifDateError, match="its EXIF block is damaged"):
            exif_date(photo)
        from selfage_cli.faces.engine.loading import load_image

        load_image(photo)


# ---- --quiet -------------------------------------------------------------------------------------------
def test_quiet_prints_only_errors_and_one_summary_line(tmp_path: Path, astronaut_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(astronaut_path, photos / "30_a.png")
    Image.new("RGB", (200, 200), (120, 120, 120)).save(photos / "blank.png")
    result = runner.invoke(app, ["align", str(photos), "-p", str(tmp_path / "p"), "--quiet"], terminal_width=200)
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "align: 1 done, 1 failed."
    assert all(line.startswith("failed:") for line in lines[:-1]) and len(lines) == 2
    assert "warning:" not in result.output and "identity check" not in result.output


def test_edit_of_an_input_whose_aligned_file_is_gone_fails_that_photo_with_the_fix(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = Project(tmp_path / "p")
    with project.update() as manifest:
        manifest["inputs"] = [
            {"id": "holiday", "source": "/photos/holiday.jpg", "aligned": "inputs/aligned/holiday.png"}
        ]
    result = invoke("edit", "--ages", "20", "--no-lora", "--source-age", "30", "--base-model", tiny_model_dir,
                    "--device", "cpu", "-p", project.root)  # fmt: skip
    assert result.exit_code == 1, result.output
    text = one_sentence(result.output)
    assert "holiday: its aligned image inputs/aligned/holiday.png is missing" in text
    assert "selfage align /photos/holiday.jpg --role inputs --force" in text and "report it" not in text
