"""The command line: every command has --help with an example; errors map to exit codes without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfage_cli.ages.sources import parse_int_list
from selfage_cli.cli import app
from selfage_cli.errors import SelfageError

COMMANDS = ["align", "label-ages", "make-reg", "train", "edit", "eval", "demo", "doctor", "random-model"]
runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"selfage {command}" in result.output


def test_stage_commands_share_the_common_options() -> None:
    for command in ["align", "label-ages", "train", "edit", "eval"]:
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        for option in ("--project", "--json", "--quiet", "--debug"):
            assert option in text, (command, option)
    for command in ["train", "edit", "make-reg"]:
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        for option in ("--base-model", "--device", "--dtype"):
            assert option in text, (command, option)


def test_version_and_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "selfage_cli", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("selfage ")


def test_unknown_option_is_a_usage_error() -> None:
    result = runner.invoke(app, ["edit", "--no-such-option"])
    assert result.exit_code == 2


def test_random_model_json_and_refusal(tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = runner.invoke(app, ["random-model", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["done"][0]["path"] == str(out)
    again = runner.invoke(app, ["random-model", str(out), "--json"])
    assert again.exit_code == 2
    assert "--force" in again.output and "Traceback" not in again.output


def test_debug_shows_traceback(tmp_path: Path) -> None:
    (tmp_path / "selfage.json").write_text("{broken")
    quiet = runner.invoke(app, ["doctor", "-p", str(tmp_path)])
    loud = runner.invoke(app, ["doctor", "-p", str(tmp_path), "--debug"])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and "Traceback" in loud.output


def test_project_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "selfage.json").write_text(json.dumps({"schema_version": 7}))
    monkeypatch.setenv("SELFAGE_PROJECT", str(tmp_path))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 2 and "schema_version 7" in result.output


def test_doctor_reports_missing_pieces_with_fixes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["doctor", "-p", str(tmp_path), "--json", "--base-model", str(tmp_path / "none")])
    assert result.exit_code == 0
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    checks = {check["name"]: check for check in summary["checks"]}
    assert checks["DEX weights"]["ok"] is False and "yuval-alaluf/SAM" in checks["DEX weights"]["fix"]
    assert checks["dlib models"]["ok"] is True
    assert summary["versions"]["diffusers"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is empty"),
        ("10,abc", "not an integer"),
        ("10,101", "outside 0–100"),
        ("10,10", "given twice"),
        ("2.5", "not an integer"),
    ],
)
def test_age_lists_are_validated(value: str, message: str) -> None:
    with pytest.raises(SelfageError, match=message):
        parse_int_list(value, "--ages")
    assert parse_int_list("0, 20,80", "--ages") == [0, 20, 80]


def test_help_prose_is_one_line_per_paragraph_and_examples_stay_indented() -> None:
    from selfage_cli.cli import help_text

    doc = """First line.

    A paragraph written
    over two lines.

    Examples:

      selfage edit a.png --ages 20
      selfage edit b.png
    """
    assert help_text(doc) == (
        "First line.\n\nA paragraph written over two lines.\n\nExamples:\n\n"
        "  selfage edit a.png --ages 20\n  selfage edit b.png"
    )
    for command in app.registered_commands:
        assert command.help == help_text(command.callback.__doc__), command.name
        assert "\n" not in command.help.split("\n\n")[1], command.name  # the prose paragraph is one line
