"""A full disk and a read-only project (issue 17, item 5) are the user's environment: one sentence naming
the folder and the fix, exit 2, no temporary files left, the manifest untouched; the read-only commands
still work in a read-only project.

Where the tests may mount (root, as in CI) they use a real small tmpfs and a real read-only bind mount;
elsewhere (or with ``SELFAGE_TEST_NO_MOUNT=1``) they patch the writes to fail with the same errno.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import selfage_cli.torch_files as torch_files
from selfage_cli.cli import app
from selfage_cli.errors import environment_error
from selfage_cli.project import Project

runner = CliRunner()


def one_line(text: str) -> str:
    return " ".join(text.split())


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders anywhere under ``root``."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if ".tmp" in p.name]


@contextlib.contextmanager
def mounted(args: list[str], target: Path) -> Iterator[bool]:
    """``mount ARGS TARGET`` for the block; yields False (and mounts nothing) where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if os.environ.get("SELFAGE_TEST_NO_MOUNT"):  # to run the patched variant where mounting works
        yield False
        return
    try:
        done = subprocess.run(["mount", *args, str(target)], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        done = False
    try:
        yield done
    finally:
        if done:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def failing_writes(monkeypatch: pytest.MonkeyPatch, root: Path, code: int, after: int = 0) -> None:
    """Patch open/os.open/os.mkdir so that writing under ``root`` fails with ``code`` (after ``after`` bytes)."""
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def under(path: Any) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(root.resolve())
        except TypeError:
            return False

    class Full(io.FileIO):
        def write(self, data: Any) -> int:
            raise OSError(code, os.strerror(code), self.name)

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if under(file) and any(c in mode for c in "wax+"):
            if code == errno.EROFS:
                raise OSError(code, os.strerror(code), os.fspath(file))
            handle = Full(os.fspath(file), mode.replace("t", "").replace("b", "") or "w")
            return handle if "b" in mode else io.TextIOWrapper(handle)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if code == errno.EROFS and under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if code == errno.EROFS and under(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise OSError(code, os.strerror(code), os.fspath(path))
        real_mkdir(path, *args, **kwargs)

    for owner in (builtins, io):
        monkeypatch.setattr(owner, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


# ---- the sentence ---------------------------------------------------------------------------------------
def test_full_read_only_and_denied_become_one_sentence_naming_the_folder(tmp_path: Path) -> None:
    file = tmp_path / "runs" / "x.png"
    full = environment_error(OSError(errno.ENOSPC, "No space left on device", str(file)))
    assert str(full).startswith(f"no space left on the disk of {tmp_path} (No space left on device); free some space")
    read_only = environment_error(RuntimeError("wrapped"), tmp_path)
    assert read_only is None
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))
        except OSError as exc:
            raise RuntimeError("a library's own error") from exc
    except RuntimeError as exc:
        read_only = environment_error(exc)
    assert str(read_only).startswith(f"{tmp_path} is on a read-only file system; use a writable project folder")
    rust = environment_error(Exception("Error while serializing: IoError(No space left on device (os error 28))"))
    assert str(rust).startswith("no space left on the disk of the output folder")
    denied = environment_error(PermissionError(errno.EACCES, "Permission denied", str(file)))
    assert str(denied).startswith(f"{file}: permission denied; make it writable (and readable) for you")
    assert environment_error(OSError(errno.ENOENT, "No such file or directory", "x")) is None


# ---- disk full ------------------------------------------------------------------------------------------
def test_align_on_a_full_disk_is_exit_2_and_leaves_no_temporary_png(
    tmp_path: Path, astronaut_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "small"
    with mounted(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], root) as real:
        project = Project(root / "proj")
        project.init()
        if not real:  # no tmpfs here: the PNG write fails as it would on a full disk
            failing_writes(monkeypatch, project.root / "refs", errno.ENOSPC)
        before = project.manifest_path.read_bytes()
        result = runner.invoke(app, ["align", str(astronaut_path), "-p", str(project.root)], terminal_width=400)
        monkeypatch.undo()
        assert result.exit_code == 2, result.output
        message = one_line(result.output)
        assert f"no space left on the disk of {project.root / 'refs' / 'aligned'}" in message
        assert "free some space there" in message and "Traceback" not in result.output
        assert leftovers(project.root) == [] and project.manifest_path.read_bytes() == before


def test_a_checkpoint_that_does_not_fit_is_exit_2_and_leaves_nothing_half_written(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's own writer said `RuntimeError: unexpected pos …`; the optimiser state now fails as an OSError."""
    from test_train_run import make_train_project

    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    real_open = builtins.open

    def full_for_optimizer(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if Path(os.fspath(file)).name == "optimizer.pt" and "w" in mode:
            handle = real_open(file, mode, *args, **kwargs)
            handle.write(b"PK\x03\x04 partial")
            handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(torch_files, "open", full_for_optimizer, raising=False)
    before = project.manifest_path.read_bytes()
    args = ["--steps", "2", "--checkpoint-every", "1", "--batch-size", "1", "--rank", "2", "--resolution", "128"]
    result = runner.invoke(
        app,
        ["train", "-p", str(project.root), "--base-model", str(tiny_model_dir), "--device", "cpu", "--run", "r", *args],
        terminal_width=400,
    )
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert f"no space left on the disk of {project.root / 'runs'}" in message and "Traceback" not in result.output
    assert leftovers(project.root) == [] and not (project.root / "runs" / "r").exists()
    assert project.manifest_path.read_bytes() == before


def test_make_reg_on_a_full_disk_leaves_no_partial_set(
    project_dir: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = Project(project_dir)
    project.init()
    before = project.manifest_path.read_bytes()
    failing_writes(monkeypatch, project.root / "reg", errno.ENOSPC)  # the generated images do not fit
    args = ["--count", "2", "--steps", "1", "--batch-size", "2", "--no-verify", "--device", "cpu"]
    result = runner.invoke(
        app, ["make-reg", *args, "--base-model", str(tiny_model_dir), "-p", str(project_dir)], terminal_width=400
    )
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert f"no space left on the disk of {project.root / 'reg'}" in one_line(result.output)
    assert list((project.root / "reg").iterdir()) == [] and project.manifest_path.read_bytes() == before


# ---- a read-only project --------------------------------------------------------------------------------
@pytest.fixture
def read_only_project(tmp_path: Path, astronaut_path: Path, hopper_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A labelled project with two recorded edits, seen through a read-only bind mount (else patched writes)."""
    from test_eval import build_project

    source = tmp_path / "src"
    project = build_project(source, astronaut_path, hopper_path)
    (source / "refs" / "aligned" / "me_mirror.png").rename(source / "refs" / "aligned" / "35_me.png")
    with project.update() as manifest:
        manifest["references"][0].update(id="35_me", aligned="refs/aligned/35_me.png")
    assert runner.invoke(app, ["label-ages", "-p", str(source)]).exit_code == 0
    (source / "selfage.json.lock").unlink()  # as a project copied from elsewhere may be: no lock file
    view = tmp_path / "ro"
    with mounted(["--bind", "-o", "ro", str(source)], view) as real:
        if not real:
            shutil.rmtree(view)
            shutil.copytree(source, view)
            failing_writes(monkeypatch, view, errno.EROFS)
        yield view


def test_a_read_only_project_allows_the_read_only_commands_and_names_itself_for_the_others(
    read_only_project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    astronaut_path: Path,
    tiny_model_dir: Path,
) -> None:
    root = read_only_project
    monkeypatch.delenv("SELFAGE_DEX_WEIGHTS", raising=False)
    before = (root / "selfage.json").read_bytes()

    doctor = runner.invoke(app, ["doctor", "-p", str(root), "--base-model", str(tmp_path / "none")])
    assert doctor.exit_code == 0, doctor.output
    labels = runner.invoke(app, ["label-ages", "-p", str(root)])
    assert labels.exit_code == 0 and "35_me: 35" in labels.output, labels.output
    report = tmp_path / "report"
    evaluated = runner.invoke(app, ["eval", "hopper", "-p", str(root), "--report", str(report), "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert (report / "report.md").is_file()

    aligned = runner.invoke(app, ["align", str(astronaut_path), "-p", str(root)], terminal_width=400)
    assert aligned.exit_code == 2, aligned.output
    message = one_line(aligned.output)
    assert f"{root / 'refs' / 'aligned'} is on a read-only file system; use a writable project folder" in message
    assert "Traceback" not in aligned.output
    model = ["--base-model", str(tiny_model_dir), "--resolution", "128"]
    trained = runner.invoke(
        app, ["train", "-p", str(root), "--run", "r", *model, "--device", "cpu"], terminal_width=400
    )
    assert trained.exit_code == 2, trained.output
    assert f"{root} is on a read-only file system" in one_line(trained.output)
    assert (root / "selfage.json").read_bytes() == before and leftovers(root) == []


def test_a_lock_file_not_ours_in_a_writable_project_is_refused_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left by a `sudo` run: writing without the lock could lose another command's update."""
    import selfage_cli.project as project_module
    from selfage_cli.errors import SelfageError
    from selfage_cli.project import Project

    project = Project(tmp_path / "p")
    with project.update() as manifest:
        manifest["inputs"] = []
    before = project.manifest_path.read_bytes()
    real_open = builtins.open

    def not_ours(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if Path(os.fspath(file)) == project.lock_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(project_module, "open", not_ours, raising=False)
    with pytest.raises(SelfageError, match="selfage.json.lock: cannot be opened for locking"), project.update() as m:
        m["inputs"].append({"id": "x"})
    assert project.manifest_path.read_bytes() == before
