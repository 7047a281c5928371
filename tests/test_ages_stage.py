"""``selfage label-ages``: every reference (and --reg image) gets an age; errors leave the manifest untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from selfage_cli import console
from selfage_cli.ages.engine import sources
from selfage_cli.ages.stage import run_label_ages
from selfage_cli.cli import app
from selfage_cli.errors import SelfageError
from selfage_cli.manifest import set_config
from selfage_cli.project import Project, sha256_file

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_dex_from_the_environment(monkeypatch):
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    console.configure()


def _photo(path: Path, face: Path, original: str | None = None) -> Path:
    """A small 'raw photo' (optionally with an EXIF DateTimeOriginal)."""
    exif = Image.Exif()
    if original is not None:
        exif.get_ifd(sources.EXIF_IFD)[sources.TAG_DATETIME_ORIGINAL] = original
    Image.open(face).convert("RGB").resize((64, 64)).save(path, exif=exif)
    return path


def _register(project_dir: Path, photos: list[Path], face: Path) -> Project:
    """Reference entries as the align stage writes them (docs/manifest.md ImageEntry)."""
    project = Project(project_dir)
    aligned_dir = project.subdir("refs", "aligned")
    entries = []
    for photo in photos:
        aligned = aligned_dir / f"{photo.stem}.png"
        Image.open(face).convert("RGB").resize((128, 128)).save(aligned)
        entries.append(
            {
                "id": photo.stem,
                "source": str(photo),
                "sha256": sha256_file(photo),
                "aligned": project.relative(aligned),
                "size": 128,
                "age": None,
                "age_source": None,
            }
        )
    with project.update() as manifest:
        manifest["references"] = entries
    return project


def _ages(project: Project, section: str = "references") -> dict[str, tuple[int, str]]:
    manifest = project.read()
    entries = manifest[section] if section == "references" else manifest["regularisation"]["images"]
    return {e["id"]: (e["age"], e["age_source"]) for e in entries}


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    return folder


def test_label_ages_fills_the_manifest_from_every_source(project_dir, raw, astronaut_path):
    photos = [
        _photo(raw / "34_beach.jpg", astronaut_path),  # file name
        _photo(raw / "me_2010.jpg", astronaut_path),  # NAME=AGE
        _photo(raw / "holiday.jpg", astronaut_path, original="2015:07:01 12:00:00"),  # EXIF + birth date → 25
        _photo(raw / "40_party.jpg", astronaut_path, original="2031:04:01 12:00:00"),  # ages file 41 beats name, EXIF
    ]
    project = _register(project_dir, photos, astronaut_path)
    hashes = {p: sha256_file(p) for p in photos}
    (raw / "ages.csv").write_text("name,age\n40_party,41\n")
    result = runner.invoke(
        app,
        [
            "label-ages",
            "me_2010.jpg=20",
            "--ages-file",
            str(raw / "ages.csv"),
            "--birth-date",
            "1990-04-02",
            "-p",
            str(project_dir),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert _ages(project) == {
        "34_beach": (34, "filename"),
        "me_2010": (20, "file"),
        "holiday": (25, "exif"),
        "40_party": (41, "file"),
    }
    party = next(e for e in project.read()["references"] if e["id"] == "40_party")
    assert party["age_candidates"] == {"file": 41, "filename": 40, "exif": 40}
    assert "file says 41, filename says 40" in result.output and "exif says 40" in result.output
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert summary["ok"] and len(summary["done"]) == 4
    assert any("age sources disagree" in w for w in summary["warnings"])
    assert {p: sha256_file(p) for p in photos} == hashes  # user files untouched
    assert sorted(p.name for p in raw.iterdir()) == [
        "34_beach.jpg",
        "40_party.jpg",
        "ages.csv",
        "holiday.jpg",
        "me_2010.jpg",
    ]

    # A later run without the pairs/ages file keeps what they gave; --prefer changes the winner.
    result = runner.invoke(app, ["label-ages", "-p", str(project_dir), "--prefer", "filename,exif,file"])
    assert result.exit_code == 0, result.output
    assert _ages(project) == {
        "34_beach": (34, "filename"),
        "me_2010": (20, "file"),
        "holiday": (25, "exif"),
        "40_party": (40, "filename"),
    }


def test_a_reference_without_an_age_is_exit_2_and_nothing_is_written(project_dir, raw, astronaut_path):
    photos = [
        _photo(raw / "12_kid.jpg", astronaut_path),
        _photo(raw / "holiday.jpg", astronaut_path),
        _photo(raw / "party.png", astronaut_path),
    ]
    project = _register(project_dir, photos, astronaut_path)
    before = project.manifest_path.read_bytes()
    # Without the estimate slot in --prefer nothing estimates the missing ages (with it, builtin would).
    result = runner.invoke(app, ["label-ages", "--prefer", "file,filename,exif", "-p", str(project_dir)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "holiday.jpg" in text and "party.png" in text and "12_kid" not in text
    for way in ("NAME=AGE", "--ages-file", "{age}_anything.jpg", "--birth-date", "--dex-weights", "yuval-alaluf/SAM"):
        assert way in text
    assert project.manifest_path.read_bytes() == before


def test_project_without_references(project_dir):
    result = runner.invoke(app, ["label-ages", "-p", str(project_dir)])
    assert result.exit_code == 2
    assert "selfage align" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--prefer", "dex,guess"], "unknown age source 'guess'"),
        (["--prefer", "file,file"], "listed twice"),
        (["34_a.jpg=101"], "outside 0–100"),
        (["34_a.jpg"], "is not NAME=AGE"),
        (["--birth-date", "1990-13-01"], "YYYY-MM-DD"),
        (["--dex-preprocess", "bicubic"], "antialias or reference"),
        (["--dex-weights", "/nonexistent/dex.pth"], "not a file"),
    ],
)
def test_bad_options_are_exit_2(project_dir, raw, astronaut_path, args, fragment):
    project = _register(project_dir, [_photo(raw / "34_a.jpg", astronaut_path)], astronaut_path)
    before = project.manifest_path.read_bytes()
    result = runner.invoke(app, ["label-ages", *args, "-p", str(project_dir)])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert project.manifest_path.read_bytes() == before


def test_unparsable_ages_file_reports_the_line(project_dir, raw, astronaut_path):
    project = _register(project_dir, [_photo(raw / "34_a.jpg", astronaut_path)], astronaut_path)
    (raw / "ages.csv").write_text("a.jpg,20\n\nb.jpg,old\n")
    before = project.manifest_path.read_bytes()
    result = runner.invoke(app, ["label-ages", "--ages-file", str(raw / "ages.csv"), "-p", str(project_dir)])
    assert result.exit_code == 2
    assert "line 3" in result.output and "'old' is not an age" in result.output
    assert project.manifest_path.read_bytes() == before


def test_unreadable_exif_date_is_an_error_only_when_needed(project_dir, raw, astronaut_path):
    photos = [
        _photo(raw / "30_ok.jpg", astronaut_path, original="0000:00:00 00:00:00"),
        _photo(raw / "broken_clock.jpg", astronaut_path, original="2019:02:30 10:00:00"),
    ]
    project = _register(project_dir, photos, astronaut_path)
    with pytest.raises(SelfageError) as info:
        run_label_ages(project, pairs=[], reg=None, ages_file=None, birth_date="1990-01-01", dex_weights=None)
    assert "broken_clock.jpg" in str(info.value) and "not a valid date" in str(info.value)
    assert "30_ok.jpg" not in str(info.value)
    assert _ages(project) == {"30_ok": (None, None), "broken_clock": (None, None)}
    console.configure()
    summary = run_label_ages(
        project, pairs=["broken_clock=29"], reg=None, ages_file=None, birth_date="1990-01-01", dex_weights=None
    )
    assert summary.exit_code == 0
    assert _ages(project) == {"30_ok": (30, "filename"), "broken_clock": (29, "file")}
    assert any("30_ok.jpg" in w and "not a valid date" in w for w in console.WARNINGS)


def test_reg_folder_with_dex_fills_the_regularisation_set(
    project_dir, raw, astronaut_path, hopper_path, dex_weights_path, monkeypatch
):
    project = _register(project_dir, [_photo(raw / "34_me.jpg", astronaut_path)], astronaut_path)
    reg = raw.parent / "reg faces"
    (reg / "sub").mkdir(parents=True)
    Image.open(hopper_path).convert("RGB").resize((96, 96)).save(reg / "25_a.png")
    Image.open(astronaut_path).convert("RGB").resize((96, 96)).save(reg / "sub" / "b.jpg")
    (reg / "notes.txt").write_text("not an image")
    (reg / "broken.png").write_bytes(b"\x89PNG garbage")
    hashes = {p: sha256_file(p) for p in reg.rglob("*") if p.is_file()}

    result = runner.invoke(
        app, ["label-ages", "--reg", str(reg), "--dex-weights", str(dex_weights_path), "-p", str(project_dir), "--json"]
    )
    assert result.exit_code == 1, result.output  # broken.png failed, the rest labelled
    assert "broken.png" in result.output
    manifest = project.read()
    section = manifest["regularisation"]
    assert section["folder"] == str(reg.resolve()) and section["generated"] is False
    images = {img["id"]: img for img in section["images"]}
    assert set(images) == {"25_a", "sub/b"}
    assert images["25_a"]["source"] == str((reg / "25_a.png").resolve())
    assert (images["25_a"]["age"], images["25_a"]["age_source"]) == (25, "filename")
    dex_b = images["sub/b"]["age_candidates"]["dex"]
    assert images["sub/b"]["age_source"] == "dex" and images["sub/b"]["age"] == round(dex_b)
    assert 0 <= dex_b <= 100
    assert "dex" in images["25_a"]["age_candidates"]  # weights given: DEX ran on every image
    assert "dex" in manifest["references"][0]["age_candidates"]
    assert manifest["references"][0]["age"] == 34  # the file name still wins over DEX
    assert manifest["config"]["dex_weights"] == str(dex_weights_path.resolve())  # remembered
    assert {p: sha256_file(p) for p in reg.rglob("*") if p.is_file()} == hashes

    # Next time the remembered weights are only loaded if an image still needs DEX: none does.
    def no_dex(*args, **kwargs):
        raise AssertionError("DEX should not be loaded")

    monkeypatch.setattr("selfage_cli.ages.engine.dex.load_dex", no_dex)
    (reg / "broken.png").unlink()
    console.configure()
    summary = run_label_ages(project, pairs=["b=61"], reg=reg, ages_file=None, birth_date=None, dex_weights=None)
    assert summary.exit_code == 0
    assert _ages(project, "regularisation") == {"25_a": (25, "filename"), "sub/b": (61, "file")}


def test_reg_image_needing_dex_uses_the_remembered_weights(
    project_dir, raw, astronaut_path, dex_weights_path, monkeypatch
):
    project = _register(project_dir, [_photo(raw / "34_me.jpg", astronaut_path)], astronaut_path)
    set_config(project, dex_weights=str(dex_weights_path))
    reg = raw.parent / "reg"
    reg.mkdir()
    shutil.copy(astronaut_path, reg / "face.png")
    calls = []
    from selfage_cli.ages.engine import dex

    real_estimate = dex.DexEstimator.estimate

    def counting_estimate(self, images, **kwargs):
        calls.append((len(images), self.preprocess))
        return real_estimate(self, images, **kwargs)

    monkeypatch.setattr(dex.DexEstimator, "estimate", counting_estimate)
    summary = run_label_ages(
        project, pairs=[], reg=reg, ages_file=None, birth_date=None, dex_weights=None, dex_preprocess="reference"
    )
    assert summary.exit_code == 0
    assert calls == [(1, "reference")]  # only the image without another source went through DEX
    assert _ages(project, "regularisation")["face"][1] == "dex"


def test_label_ages_after_the_real_align_stage(project_dir, raw, astronaut_path, hopper_path):
    """The entries `selfage align` writes are the ones label-ages reads (source name for file-name ages)."""
    from selfage_cli.faces.stage import run_align

    shutil.copy(astronaut_path, raw / "34_astronaut.png")
    shutil.copy(hopper_path, raw / "hopper.jpg")
    project = Project(project_dir)
    aligned = run_align(project, [raw], workers=1)
    assert aligned.exit_code == 0 and len(aligned.done) == 2
    summary = run_label_ages(
        project, pairs=["hopper.jpg=79"], reg=None, ages_file=None, birth_date=None, dex_weights=None
    )
    assert summary.exit_code == 0
    assert _ages(project) == {"34_astronaut": (34, "filename"), "hopper": (79, "file")}
