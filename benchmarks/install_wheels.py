"""Install, from a folder of wheels and without network, the versions this Python lacks.

Usage: ``python -m benchmarks.install_wheels WHEELS_DIR TARGET_DIR`` (``benchmarks/gpu.sh`` calls it).

For every ``*.whl`` in WHEELS_DIR whose distribution is not installed *at the wheel's version*,
``pip install --no-index --no-deps --target TARGET_DIR`` installs it: a missing package (diffusers)
goes in, and so does a pinned version that differs from the machine's (transformers 5.23.0 over an
image's 5.17.0); a distribution already present at that version is left alone. So the wheel folder
says which versions run. Prints what it installed and what it skipped; a wheel that does not install
(e.g. built for another Python) is reported and the others still go in. Put TARGET_DIR first on
``PYTHONPATH`` afterwards so its versions win.
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


def wheel_version(path: Path) -> str:
    """The version field of a wheel file name (``Foo_Bar-1.0-py3-none-any.whl`` → ``1.0``)."""
    return path.name.split("-")[1]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_wheels(folder: Path) -> tuple[list[Path], list[Path]]:
    """(wheels to install, wheels skipped because their distribution is present at that version)."""
    wheels = sorted(folder.glob("*.whl"))
    todo = [w for w in wheels if installed_version(wheel_distribution(w)) != wheel_version(w)]
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
        print(f"present at this version, not installed again: {wheel.name}", file=sys.stderr)
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
