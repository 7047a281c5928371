"""The manifest: round trip, atomic writes, locking across processes, refusal of bad manifests."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.errors import ManifestError
from selfage_cli.project import MANIFEST_NAME, SCHEMA_VERSION, Project, find, sha256_file, upsert


def test_round_trip(project_dir: Path) -> None:
    project = Project(project_dir)
    assert not project.exists()
    entry = {"id": "a", "source": "/photos/a.jpg", "aligned": "refs/aligned/a.png", "age": 34, "age_source": "filename"}
    with project.update() as manifest:
        manifest["references"].append(entry)
        manifest["config"]["base_model"] = "some/model"
    again = Project(project_dir).read()
    assert again["schema_version"] == SCHEMA_VERSION
    assert again["references"] == [entry]
    assert again["config"]["base_model"] == "some/model"
    assert json.loads((project_dir / MANIFEST_NAME).read_text())["references"][0]["age"] == 34
    assert project.path("refs/aligned/a.png") == project_dir.resolve() / "refs" / "aligned" / "a.png"
    assert project.relative(project_dir / "edits" / "x" / "20.png") == "edits/x/20.png"


def test_upsert_and_find() -> None:
    entries = [{"id": "a", "v": 1}]
    upsert(entries, {"id": "b", "v": 2})
    upsert(entries, {"id": "a", "v": 3})
    assert entries == [{"id": "a", "v": 3}, {"id": "b", "v": 2}]
    assert find(entries, "b") == {"id": "b", "v": 2}
    assert find(entries, "zz") is None


def test_failed_update_writes_nothing(project_dir: Path) -> None:
    project = Project(project_dir)
    project.init()
    before = (project_dir / MANIFEST_NAME).read_bytes()
    with pytest.raises(RuntimeError), project.update() as manifest:
        manifest["references"].append({"id": "x"})
        raise RuntimeError("stage failed half-way")
    assert (project_dir / MANIFEST_NAME).read_bytes() == before


def test_sha256(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON (line 1"),
        (json.dumps({"schema_version": 99}), "schema_version 99"),
        (
            json.dumps({"schema_version": 1, "references": [{"id": "a", "aligned": "../../etc/passwd"}]}),
            "escapes the project folder",
        ),
        (json.dumps({"schema_version": 1, "edits": [{"id": "a", "outputs": {"20": "/abs/20.png"}}]}), "is absolute"),
        (json.dumps([1, 2]), "must hold a JSON object"),
    ],
)
def test_bad_manifest_is_refused_and_left_untouched(project_dir: Path, content: str, message: str) -> None:
    path = project_dir / MANIFEST_NAME
    path.write_text(content)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        Project(project_dir).read()
    with pytest.raises(ManifestError), Project(project_dir).update():
        pass
    result = CliRunner().invoke(app, ["doctor", "-p", str(project_dir)])
    assert result.exit_code == 2, result.output
    assert MANIFEST_NAME in result.output and "Traceback" not in result.output
    assert path.read_text() == content


def _add_entries(root: str, prefix: str, count: int) -> None:
    project = Project(root)
    for index in range(count):
        with project.update() as manifest:
            manifest["references"].append({"id": f"{prefix}{index}"})


def test_concurrent_writers_lose_nothing(project_dir: Path) -> None:
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_add_entries, args=(str(project_dir), prefix, 15)) for prefix in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    ids = {entry["id"] for entry in Project(project_dir).read()["references"]}
    assert ids == {f"{p}{i}" for p in "ab" for i in range(15)}


def _slow_writer(root: str, started: str) -> None:
    """Holds the lock and writes a huge manifest slowly, so the parent can kill it mid-write."""
    project = Project(root)
    import builtins

    import selfage_cli.files as module  # the manifest is written through files.atomic_write_json

    real_open = builtins.open

    class SlowFile:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            Path(started).touch()
            for start in range(0, len(text), 64):
                self.handle.write(text[start : start + 64])
                self.handle.flush()
                time.sleep(0.01)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    module.open = lambda *a, **k: SlowFile(real_open(*a, **k))  # type: ignore[attr-defined]
    with project.update() as manifest:
        manifest["references"] = [{"id": f"big{i}", "age": i % 100} for i in range(2000)]


def test_killed_writer_leaves_previous_manifest(project_dir: Path) -> None:
    project = Project(project_dir)
    with project.update() as manifest:
        manifest["references"].append({"id": "keep"})
    before = (project_dir / MANIFEST_NAME).read_text()
    started = project_dir / "started"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(str(project_dir), str(started)))
    proc.start()
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert (project_dir / MANIFEST_NAME).read_text() == before
    assert [e["id"] for e in Project(project_dir).read()["references"]] == ["keep"]
    # The lock died with the writer: the next update goes through.
    with project.update() as manifest:
        manifest["references"].append({"id": "next"})
    assert [e["id"] for e in project.read()["references"]] == ["keep", "next"]
