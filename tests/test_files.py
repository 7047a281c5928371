"""files.py: atomic writes leave the old file or the new one, never a torn one or a stray temporary."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from selfage_cli.files import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_replace_the_target_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    assert atomic_write_json(target, {"x": [1, 2]}) == target
    assert json.loads(target.read_text()) == {"x": [1, 2]} and target.read_text().endswith("\n")
    atomic_write_text(tmp_path / "b.md", "héllo")
    assert (tmp_path / "b.md").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    atomic_save(tmp_path / "d.png", lambda tmp: Image.new("RGB", (4, 4), "red").save(tmp, format="PNG"))
    with Image.open(tmp_path / "d.png") as image:
        assert image.size == (4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "c.bin", "d.png"]
    # the usual permissions, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "report.json"
    target.write_text("old")

    def writer(tmp):
        tmp.write_text("half")
        raise error

    with pytest.raises(type(error)):
        atomic_save(target, writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(TypeError):  # not JSON: nothing is written
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
