"""The project folder and its manifest, ``selfage.json``.

Every stage reads and writes one project folder. The manifest records what each stage produced
(paths relative to the project root), so stages can run in separate processes and Makefiles.
See ``docs/manifest.md`` for the schema.

Writes are atomic (temporary file, fsync, ``os.replace``) and happen under an exclusive lock
(``fcntl.flock`` on ``selfage.json.lock``), re-reading the manifest inside the lock, so parallel
stages (``make -j``) never lose an update. A manifest that is malformed, of an unknown schema
version, or that names a path outside the project raises :class:`ManifestError` and is never
rewritten.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfage_cli.errors import ManifestError, SelfageError
from selfage_cli.files import atomic_write_json
from selfage_cli.manifest import ALIGNED, SCHEMA_VERSION, empty_manifest, find, now_iso, upsert  # noqa: F401 - find/upsert: older imports
from selfage_cli.manifest import Manifest as ManifestModel

MANIFEST_NAME = "selfage.json"
LOCK_NAME = "selfage.json.lock"

# Keys under which entries hold paths relative to the project root; validated on every read/write.
PATH_KEYS = frozenset(
    {
        ALIGNED,
        "lora",
        "checkpoint_dir",
        "loss_log",
        "run_dir",
        "input",
        "strip",
        "gif",
        "inversion_cache",
        "folder_copy",
        "validation_grid",
        "strip_full",
        "gif_full",
    }
)
# Keys that may hold absolute paths outside the project (the user's own files).
EXTERNAL_PATH_KEYS = frozenset({"source", "folder", "base_model", "dex_weights", "lora_source"})

Manifest = dict[str, Any]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Project:
    """A project folder: the manifest plus the files the stages write into it."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    # ---- paths -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """Absolute path of a project-relative path; refuses paths that escape the project."""
        rel = Path(relative)
        if rel.is_absolute():
            raise ManifestError(
                f"{self.manifest_path}: the path '{relative}' is absolute; manifest paths must be "
                "relative to the project folder (fix or remove that entry)."
            )
        full = (self.root / rel).resolve()
        if not full.is_relative_to(self.root):
            raise ManifestError(
                f"{self.manifest_path}: the path '{relative}' escapes the project folder {self.root}; "
                "fix or remove that entry."
            )
        return full

    def relative(self, path: str | os.PathLike[str]) -> str:
        """Project-relative POSIX string for a path inside the project (raises if outside)."""
        full = Path(path).expanduser().resolve()
        if not full.is_relative_to(self.root):
            raise SelfageError(
                f"{full} is outside the project folder {self.root}; outputs must live inside the project."
            )
        return full.relative_to(self.root).as_posix()

    def subdir(self, *parts: str) -> Path:
        """A folder inside the project, created if needed."""
        folder = self.writable_path(self.root.joinpath(*parts))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def writable_path(self, path: str | os.PathLike[str]) -> Path:
        """``path`` (absolute, or relative to the project) checked BEFORE anything is written or deleted there.

        Every symbolic link and ``..`` is resolved; a path that then lies outside the project (a name read
        from the manifest, a folder that is a link to elsewhere) raises :class:`SelfageError` (exit 2).
        Returns the resolved path, so a later write cannot follow a link the check did not see.
        """
        full = Path(path) if Path(path).is_absolute() else self.root / path
        resolved = full.resolve()
        if not resolved.is_relative_to(self.root):
            raise SelfageError(
                f"{full} leads outside the project folder {self.root} (to {resolved}: a name in {MANIFEST_NAME} or "
                "a symbolic link); nothing was written there: remove the link or fix that entry."
            )
        return resolved

    # ---- reading -----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read(self) -> Manifest:
        """The current manifest (an empty one if the project has none yet)."""
        if not self.manifest_path.exists():
            return empty_manifest()
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(
                f"{self.manifest_path}: cannot be read ({exc.strerror}); check its permissions."
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{self.manifest_path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "fix it by hand or move it away to start a new project."
            ) from exc
        self.validate(data)
        return data

    def validate(self, data: Any) -> None:
        """Check the schema version, the sections, the type of every known field (``manifest.py`` defines them)
        and every stored path; raise ManifestError."""
        if not isinstance(data, dict):
            raise ManifestError(f"{self.manifest_path} must hold a JSON object; move it away to start a new project.")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{self.manifest_path} has schema_version {version!r}, but this selfage understands only "
                f"version {SCHEMA_VERSION}; use the selfage release that wrote it or start a new project."
            )
        for key, kind in (
            ("references", list),
            ("inputs", list),
            ("runs", list),
            ("edits", list),
            ("regularisation", dict),
            ("config", dict),
        ):
            if key in data and not isinstance(data[key], kind):
                raise ManifestError(f"{self.manifest_path}: '{key}' must be a JSON {kind.__name__}; fix or remove it.")
        ManifestModel.from_dict(data, self.manifest_path)
        self._check_paths(data)

    def _check_paths(self, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in PATH_KEYS and isinstance(value, str):
                    self.path(value)
                elif key in ("outputs", "full_outputs") and isinstance(value, dict):
                    for out in value.values():
                        if isinstance(out, str):
                            self.path(out)
                else:
                    self._check_paths(value)
        elif isinstance(node, list):
            for item in node:
                self._check_paths(item)

    # ---- writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive inter-process lock on the manifest (blocks until it is free).

        In a project folder this process cannot write (a read-only disk, no permission) there is no lock
        file to take and none is needed: nothing can be written there, so no update can be lost. The block
        runs unlocked (reads are safe: every write is an atomic rename), and a block that does change the
        manifest fails on its write (one sentence, exit 2), leaving the manifest as it was.
        """
        handle = self._open_lock_file()
        if handle is None:
            yield
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _open_lock_file(self) -> Any:
        """The lock file opened for locking, or None when the project folder cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return open(self.lock_path, "a+")  # noqa: SIM115 - closed by lock()
        except OSError as exc:
            if exc.errno == errno.EROFS or (exc.errno in (errno.EACCES, errno.EPERM) and not _writable(self.root)):
                return None  # no one can write here, so no one needs the lock: the read-only commands go on
            if exc.errno in (errno.EACCES, errno.EPERM):  # the folder is writable, the lock file is not
                raise SelfageError(
                    f"{self.lock_path}: cannot be opened for locking ({exc.strerror}) although the project "
                    "folder is writable; remove that file or give it back to your user (e.g. after a sudo run)."
                ) from None
            raise

    @contextlib.contextmanager
    def update(self) -> Iterator[Manifest]:
        """Read-modify-write the manifest under the lock; written atomically only if the block succeeds.

        >>> with project.update() as manifest:
        ...     manifest["references"].append(entry)
        """
        with self.lock():
            manifest = self.read()
            before = copy.deepcopy(manifest)
            yield manifest
            if manifest != before or not self.manifest_path.exists():
                self.validate(manifest)
                manifest["updated"] = now_iso()
                self._write_atomic(manifest)

    def _write_atomic(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest_path, manifest, sort_keys=False, ensure_ascii=False)

    def init(self) -> Manifest:
        """Create the manifest if there is none; return it."""
        with self.update() as manifest:
            return manifest


def resolve_project(project: str | os.PathLike[str] | None) -> Project:
    """The project for a ``--project`` value (default: ``$SELFAGE_PROJECT`` or the current folder)."""
    if project is None:
        project = os.environ.get("SELFAGE_PROJECT") or os.getcwd()
    path = Path(project).expanduser()
    if path.exists() and not path.is_dir():
        raise SelfageError(f"--project {path} is a file, not a folder; pass the project folder.")
    return Project(path)


def _writable(folder: Path) -> bool:
    """Whether this user may create files in ``folder`` (root bypasses permission bits, as the kernel does)."""
    return os.access(folder, os.W_OK)
