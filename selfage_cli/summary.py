"""What a stage returns to the CLI: items done, items failed, warnings and free-form data.

Exit code follows from it: 0 when nothing failed, 1 when some items failed (the rest done).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfage_cli.errors import EXIT_OK, EXIT_PARTIAL


@dataclass
class Failure:
    """One input that could not be processed, and why (one sentence with the fix)."""

    item: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"item": self.item, "reason": self.reason}


@dataclass
class StageSummary:
    """The result of one CLI command, printed as text or as one JSON object (``--json``)."""

    command: str
    done: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # human-readable report lines

    def fail(self, item: str, reason: str) -> None:
        self.failures.append(Failure(item, reason))

    def hashed(self, paths: Iterable[Path], end: str = "") -> Iterator[tuple[Path, str]]:
        """Each photo given to the command with its SHA-256; one that cannot be read is recorded as failed and
        left out (``end`` closes the reason, e.g. ``"."``)."""
        from selfage_cli.project import sha256_file

        for path in paths:
            try:
                digest = sha256_file(path)
            except OSError as exc:
                self.fail(str(path), f"cannot be read ({exc.strerror}); check its permissions{end}")
                continue
            yield path, digest

    def merge(self, other: StageSummary) -> None:
        """Add what ``other`` (the same command, run by another process) did."""
        self.done += other.done
        self.failures += other.failures
        self.skipped += other.skipped
        self.warnings = list(dict.fromkeys(self.warnings + other.warnings))
        self.lines += other.lines
        self.data = {**other.data, **self.data}

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.failures else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "ok": not self.failures,
            "exit_code": self.exit_code,
            "done": self.done,
            "skipped": self.skipped,
            "failures": [f.to_json() for f in self.failures],
            "warnings": self.warnings,
            **self.data,
        }
