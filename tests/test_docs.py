"""Docs and pins stay true: the CLI reference matches the code, the conda file matches constraints.txt."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    typer_bin = Path(sys.executable).with_name("typer")
    subprocess.run(
        [
            str(typer_bin),
            "selfage_cli.cli",
            "utils",
            "docs",
            "--name",
            "selfage",
            "--title",
            "selfage command reference",
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), "docs/cli.md is stale: run `make docs`"


def test_conda_environment_uses_the_tested_pins() -> None:
    pins = {
        line.split("==")[0].lower(): line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    conda = re.findall(r"^\s+- ([A-Za-z0-9_.\-]+==\S+)$", (ROOT / "environment" / "selfage.yml").read_text(), re.M)
    assert conda, "environment/selfage.yml lists no pip pins"
    for pin in conda:
        name = pin.split("==")[0].lower()
        if name == "torch":
            continue
        assert pins.get(name) == pin, f"{pin} differs from constraints.txt"
    for key in ("diffusers", "transformers", "peft", "accelerate", "dlib-bin"):
        assert any(p.lower().startswith(key + "==") for p in conda), key


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first = text.index("make demo")
    assert first < text.index("## The real workflow") and "make test" in text[: text.index("## The real workflow")]
