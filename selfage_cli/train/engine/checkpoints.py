"""A training checkpoint read whole before any of it is used, and the newest one that loads, for ``--resume``.

A checkpoint (``runs/NAME/checkpoints/step-NNNNNN/``, written by
:meth:`~selfage_cli.train.engine.loop.Trainer.save_checkpoint`) holds ``unet.safetensors`` (and
``text_encoder.safetensors`` when the text encoder is trained), ``optimizer.pt``, ``rng.pt`` and
``state.json``. :func:`read_checkpoint` reads every file into memory and checks its kind, raising
:class:`CheckpointUnusable` with the reason (missing, truncated, garbled, or a pickle that would run
code: refused, nothing in it ran). :func:`newest_loadable` picks the newest checkpoint that reads
completely and says which newer ones it skipped and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.torch_files import CODE_REFUSED, CodeRefused, UnreadableTorchFile, first_line, load_plain


class CheckpointUnusable(SelfageError):
    """A checkpoint folder that cannot be resumed from; ``reason`` says which file and why."""

    def __init__(self, folder: Path, reason: str):
        super().__init__(f"{folder}: {reason}; resume from an earlier checkpoint or start the run again with --force.")
        self.folder, self.reason = folder, reason


@dataclass
class CheckpointData:
    """Everything a checkpoint holds, read into memory (CPU tensors)."""

    folder: Path
    step: int
    state: dict[str, Any]  # state.json
    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def read_checkpoint(folder: Path, *, text_encoder: bool | None = None) -> CheckpointData:
    """Read and check every file of a checkpoint; :class:`CheckpointUnusable` naming the first bad one.

    ``text_encoder``: whether the run trains the text encoder (``None``: as the checkpoint's recorded config says).
    """
    folder = Path(folder)
    state = _state(folder)
    if text_encoder is None:
        text_encoder = bool((state.get("config") or {}).get("train_text_encoder"))
    unet = _tensors(folder, "unet.safetensors")
    text = _tensors(folder, "text_encoder.safetensors") if text_encoder else None
    optimizer = _pickle(folder, "optimizer.pt")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise CheckpointUnusable(folder, "optimizer.pt holds no optimiser state")
    rng = _pickle(folder, "rng.pt")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointUnusable(folder, "rng.pt holds no random-number state")
    return CheckpointData(folder, int(state["step"]), state, unet, text, optimizer, rng)


def _state(folder: Path) -> dict[str, Any]:
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointUnusable(folder, "state.json is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointUnusable(folder, f"state.json cannot be read ({first_line(exc, 100)})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointUnusable(folder, "state.json records no step count")
    return state


def _tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / name
    if not path.is_file():
        raise CheckpointUnusable(folder, f"{name} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for truncated/garbled files
        raise CheckpointUnusable(folder, f"{name} is truncated or garbled ({first_line(exc, 100)})") from None
    if not tensors:
        raise CheckpointUnusable(folder, f"{name} holds no tensors")
    return tensors


def _pickle(folder: Path, name: str) -> Any:
    path = folder / name
    try:
        return load_plain(path)
    except FileNotFoundError:
        raise CheckpointUnusable(folder, f"{name} is missing") from None
    except CodeRefused:
        raise CheckpointUnusable(folder, f"{name}: {CODE_REFUSED}") from None
    except UnreadableTorchFile as exc:
        raise CheckpointUnusable(folder, f"{name} is truncated or garbled ({exc.detail})") from None


def newest_loadable(run: str, checkpoints: list[Path]) -> CheckpointData:
    """The newest of ``checkpoints`` (oldest first) that reads completely; warns for each newer one skipped.

    Exit 2 with one sentence when none of them reads.
    """
    skipped: list[CheckpointUnusable] = []
    for folder in reversed(checkpoints):
        try:
            data = read_checkpoint(folder)
        except CheckpointUnusable as exc:
            skipped.append(exc)
            continue
        for bad in skipped:
            console.warn(f"run {run}: skipped checkpoint {bad.folder.name}: {bad.reason}; resuming from {folder.name}.")
        return data
    first = skipped[0]
    raise SelfageError(
        f"--resume --run {run}: no checkpoint in runs/{run}/checkpoints loads ({first.folder.name}: {first.reason}"
        f"{f', and {len(skipped) - 1} older one(s) too' if len(skipped) > 1 else ''}); start the run again with --force."
    )
