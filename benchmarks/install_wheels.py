"""Install, from a folder of wheels and without network, the distributions this Python lacks.

Usage: ``python -m benchmarks.install_wheels WHEELS_DIR TARGET_DIR`` (``benchmarks/gpu.sh`` calls it).

For every ``*.whl`` in WHEELS_DIR whose distribution is not installed, ``pip install --no-index
--no-deps --target TARGET_DIR`` installs it; distributions already present (torch, transformers,
peft, accelerate, …) are left alone, so a wheel folder can hold more than needed. Prints what it
installed and what it skipped; a wheel that does not install (e.g. built for another Python) is
reported and the others still go in. Put TARGET_DIR on ``PYTHONPATH`` afterwards.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path


def wheel_distribution(path: Path) -> str:
    """The normalised distribution name of a wheel file (``Foo_Bar-1.0-py3-none-any.whl`` → ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", path.name.split("-", 1)[0]).lower()


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def missing_wheels(folder: Path) -> tuple[list[Path], list[Path]]:
    """(wheels to install, wheels skipped because their distribution is present)."""
    wheels = sorted(folder.glob("*.whl"))
    todo = [w for w in wheels if not installed(wheel_distribution(w))]
    return todo, [w for w in wheels if w not in todo]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder, target = Path(argv[0]), Path(argv[1])
    if not folder.is_dir():
        print(
            f"error: wheel folder {folder} does not exist; pass the folder that holds the .whl files.", file=sys.stderr
        )
        return 2
    todo, skipped = missing_wheels(folder)
    for wheel in skipped:
        print(f"present, not installed again: {wheel.name}", file=sys.stderr)
    if not todo:
        return 0
    target.mkdir(parents=True, exist_ok=True)
    failed = []
    for wheel in todo:  # one at a time: a wheel for another platform must not stop the others
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--root-user-action=ignore",
            "--target",
            str(target),
            str(wheel),
        ]
        if subprocess.run(command, check=False).returncode == 0:
            print(f"installed: {wheel.name}", file=sys.stderr)
        else:
            failed.append(wheel.name)
    if failed:
        print(f"warning: not installed (see pip's message above): {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
