"""``selfage align`` end to end: CLI, manifest entries, skipping, failures, identity check, pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.project import Project, sha256_file

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _json(result) -> dict:
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (sha256_file(p), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut_path, hopper_path) -> Path:
    """Two portraits, a photo without a face and a truncated JPEG (plus a text file, ignored in folders)."""
    folder = tmp_path_factory.mktemp("photos")
    shutil.copy(astronaut_path, folder / "astronaut.png")
    sub = folder / "older"
    sub.mkdir()
    shutil.copy(hopper_path, sub / "grace_hopper.jpg")
    rng = np.random.default_rng(1)
    sky = np.clip(rng.normal(150, 20, (300, 400, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(sky).save(folder / "sky.png")
    (folder / "broken.jpg").write_bytes(hopper_path.read_bytes()[:15000])
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, photos):
    """One `selfage align` of the folder into a fresh project (in-process: --workers 1)."""
    project = tmp_path_factory.mktemp("proj")
    before = _snapshot(photos)
    result = _invoke("align", photos, "-p", project, "--workers", "1", "--json")
    return {"project": project, "result": result, "summary": _json(result), "sources_before": before}


def test_bad_files_fail_with_clear_lines_while_the_others_succeed(aligned):
    result, summary = aligned["result"], aligned["summary"]
    assert result.exit_code == 1
    failures = {Path(f["item"]).name: f["reason"] for f in summary["failures"]}
    assert set(failures) == {"sky.png", "broken.jpg"}
    assert failures["sky.png"].startswith("no face found")
    assert "truncated or corrupt" in failures["broken.jpg"]
    assert sorted(d["id"] for d in summary["done"]) == ["astronaut", "grace_hopper"]


def test_human_output_names_each_failed_file(photos, aligned):
    result = _invoke("align", photos / "sky.png", photos / "astronaut.png", "-p", aligned["project"])
    assert result.exit_code == 1
    assert "sky.png: no face found" in result.output
    assert "1 item(s) failed" in result.output


def test_manifest_records_successes_with_landmarks(aligned):
    project = Project(aligned["project"])
    refs = {e["id"]: e for e in project.read()["references"]}
    assert set(refs) == {"astronaut", "grace_hopper"}
    for entry in refs.values():
        source = Path(entry["source"])
        assert source.is_absolute() and entry["sha256"] == sha256_file(source)
        assert entry["aligned"] == f"refs/aligned/{entry['id']}.png"
        with Image.open(project.path(entry["aligned"])) as img:
            assert img.size == (512, 512) and img.mode == "RGB"
        assert len(entry["landmarks"]) == 68 and all(len(p) == 2 for p in entry["landmarks"])
        left, top, right, bottom = entry["box"]
        assert left < right and top < bottom
        assert entry["detector"] == "hog" and entry["size"] == 512 and entry["score"] > 0
        assert entry["faces_found"] == 1 and entry["face_index"] == 0
        assert len(entry["descriptor"]) == 128
        assert entry["age"] is None


def test_nothing_written_for_failures_and_sources_untouched(photos, aligned):
    project = aligned["project"]
    written = sorted(p.name for p in (project / "refs" / "aligned").iterdir())
    assert written == ["astronaut.png", "grace_hopper.png"]  # no temporary or partial files
    assert _snapshot(photos) == aligned["sources_before"]


def test_two_different_people_are_both_flagged(aligned):
    summary = aligned["summary"]
    assert sorted(summary["suspects"]) == ["astronaut", "grace_hopper"]
    distance = summary["distances"]["astronaut"]["grace_hopper"]
    assert distance > 0.6
    assert any("refs/aligned/grace_hopper.png" in w and "0.6" in w for w in summary["warnings"])


def test_rerun_is_a_no_op(photos, aligned):
    project = aligned["project"]
    before = _snapshot(project)
    result = _invoke("align", photos, "-p", project, "--workers", "1", "--json")
    summary = _json(result)
    assert summary["done"] == []
    assert sorted(s["id"] for s in summary["skipped"]) == ["astronaut", "grace_hopper"]
    assert _snapshot(project) == before  # manifest and images untouched (only the lock file may exist)


def test_check_recomputes_missing_descriptors(aligned):
    project = Project(aligned["project"])
    stored = aligned["summary"]["distances"]["astronaut"]["grace_hopper"]
    copy = aligned["project"].parent / "proj_copy"
    shutil.copytree(aligned["project"], copy)
    with Project(copy).update() as manifest:
        for entry in manifest["references"]:
            entry.pop("descriptor")
    result = _invoke("align", "--check", "-p", copy, "--json")
    summary = _json(result)
    assert result.exit_code == 0
    assert summary["distances"]["astronaut"]["grace_hopper"] == pytest.approx(stored, abs=0.05)
    assert sorted(summary["suspects"]) == ["astronaut", "grace_hopper"]
    text = _invoke("align", "--check", "-p", project.root)
    assert "astronaut" in text.output and "0.6" in text.output


def test_force_realigns_without_duplicates(photos, aligned, tmp_path):
    copy = tmp_path / "proj"
    shutil.copytree(aligned["project"], copy)
    with Project(copy).update() as manifest:
        manifest["references"][0]["age"] = 41
        manifest["references"][0]["age_source"] = "file"
    result = _invoke("align", photos / "astronaut.png", "-p", copy, "--force", "--json")
    assert result.exit_code == 0, result.output
    refs = Project(copy).read()["references"]
    assert sorted(e["id"] for e in refs) == ["astronaut", "grace_hopper"]
    astronaut = next(e for e in refs if e["id"] == "astronaut")
    assert astronaut["age"] == 41  # same photo: its age label survives --force
    assert sorted(p.name for p in (copy / "refs" / "aligned").iterdir()) == ["astronaut.png", "grace_hopper.png"]


def test_mirror_image_is_the_same_person_in_a_process_pool(astronaut_path, tmp_path):
    from selfage_cli.faces.stage import run_align

    folder = tmp_path / "me"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "me_a.png")
    ImageOps.mirror(Image.open(astronaut_path).convert("RGB")).save(folder / "me_b.png")
    summary = run_align(Project(tmp_path / "proj"), [folder], workers=2)
    assert summary.data["workers"] == 2
    assert sorted(d["id"] for d in summary.done) == ["me_a", "me_b"]
    assert summary.data["distances"]["me_a"]["me_b"] < 0.6
    assert summary.data["suspects"] == []


def test_only_the_odd_one_out_is_flagged(aligned, tmp_path):
    """With three references (one, its mirror, someone else) only the other person is a suspect."""
    from selfage_cli.faces.stage import check_identity

    copy = tmp_path / "proj"
    shutil.copytree(aligned["project"], copy)
    with Project(copy).update() as manifest:
        astronaut = next(e for e in manifest["references"] if e["id"] == "astronaut")
        mirror_path = copy / "refs" / "aligned" / "astronaut_mirror.png"
        ImageOps.mirror(Image.open(copy / astronaut["aligned"])).save(mirror_path)
        manifest["references"].append(
            {
                "id": "astronaut_mirror",
                "source": astronaut["source"],
                "sha256": "0" * 64,
                "aligned": "refs/aligned/astronaut_mirror.png",
            }
        )
    summary = check_identity(Project(copy))
    assert summary.data["suspects"] == ["grace_hopper"]
    assert summary.data["distances"]["astronaut"]["astronaut_mirror"] < 0.6
    assert any("grace_hopper" in w for w in summary.warnings)
    assert not any("astronaut" in w.split(":")[0] for w in summary.warnings)


def test_inputs_role_and_all_faces(astronaut_path, hopper_path, tmp_path):
    group = Image.new("RGB", (1100, 620), (128, 128, 128))
    group.paste(Image.open(astronaut_path).convert("RGB"), (0, 40))
    group.paste(Image.open(hopper_path).convert("RGB"), (560, 0))
    photo = tmp_path / "group photo.jpg"
    group.save(photo, quality=92)
    project = tmp_path / "proj"
    result = _invoke("align", photo, "--role", "inputs", "--all-faces", "--size", "256", "-p", project, "--json")
    assert result.exit_code == 0, result.output
    entries = Project(project).read()["inputs"]
    assert [e["id"] for e in entries] == ["group_photo_face1", "group_photo_face2"]
    assert all(e["faces_found"] == 2 and "descriptor" not in e for e in entries)
    for entry in entries:
        with Image.open(project / entry["aligned"]) as img:
            assert img.size == (256, 256)
    assert Project(project).read()["references"] == []


def test_help_and_usage_errors(tmp_path):
    result = _invoke("align", "--help")
    assert result.exit_code == 0
    for option in ("--role", "--size", "--detector", "--all-faces", "--check", "--force", "--workers"):
        assert option in result.output
    assert _invoke("align", tmp_path / "missing.jpg", "-p", tmp_path / "p").exit_code == 2
    assert "no such file or folder" in _invoke("align", tmp_path / "missing.jpg", "-p", tmp_path / "p").output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _invoke("align", empty, "-p", tmp_path / "p").exit_code == 2
    assert _invoke("align", "-p", tmp_path / "p").exit_code == 2
    bad_role = _invoke("align", empty, "--role", "others", "-p", tmp_path / "p")
    assert bad_role.exit_code == 2 and "--role" in bad_role.output
    assert _invoke("align", empty, "--detector", "yolo", "-p", tmp_path / "p").exit_code == 2
    assert _invoke("align", empty, "--size", "10", "-p", tmp_path / "p").exit_code == 2
    assert not (tmp_path / "p" / "selfage.json").exists()
