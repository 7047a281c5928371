"""`selfage edit` driven in-process for the edit tests: the fast options and the --json summary."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from selfage_cli.cli import app

runner = CliRunner()
FAST = ["--ddim-steps", "2", "--inner-steps", "1", "--device", "cpu", "--dtype", "fp32"]


def run_edit(project: Path, model: Path, *args: str, fast: list[str] = FAST, width: int = 200) -> Result:
    """``selfage edit ARGS`` with the fast options on ``project`` and base model ``model``."""
    return runner.invoke(
        app, ["edit", *args, *fast, "-p", str(project), "--base-model", str(model)], terminal_width=width
    )


def json_summary(stdout: str | None) -> dict | None:
    """The last ``--json`` summary line of a command's output, or None."""
    summary = None
    for line in (stdout or "").splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    return summary


def stand_in_inversion(pipe, image, prompt: str, *, steps: int, mode: str, guidance: float):
    """What ``engine.invert`` returns, made of zeros at once: for tests whose editing is a stand-in too."""
    import torch

    from selfage_cli.edit.engine.inversion import Inversion

    side = image.width // int(pipe.vae_scale_factor)
    return Inversion(
        x_t=torch.zeros(1, 4, side, side),
        null_embeddings=torch.zeros(steps, 77, int(pipe.text_encoder.config.hidden_size)),
        mode=mode,
        prompt=prompt,
        steps=steps,
        guidance=guidance,
        inner_steps_run=[0] * steps,
        seconds=0.0,
    )
