"""The progress bar of one photo's edit, phase by phase, with an ETA from each phase's measured step time.

A photo's edit runs in phases whose steps cost very different times: the DDIM inversion (one UNet call
per step), the null-text optimisation (up to ``--inner-steps`` forward and backward passes per step,
the slowest by far) and the editing (one batched pass per step). Counted as one task, the remaining
time was extrapolated from the cheap first phase and came out several times too short. Here each
phase restarts the task, so rich measures its speed afresh: the ETA shown is that phase's remaining
steps times its own measured per-step time, and the description names the phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selfage_cli import console


class PhasedTask:
    """One progress-bar task that is restarted at each phase of a photo's edit."""

    def __init__(self, bar: Any, label: str):
        self.bar, self.label = bar, label
        self.task = console.new_task(bar, label, total=None)
        self.phase: str | None = None

    def start(self, phase: str, total: int | None) -> None:
        """Begin a phase: the task's count, timing and speed estimate start again."""
        self.phase = phase
        self.bar.reset(self.task, total=total, completed=0, description=f"{self.label}: {phase}")

    def update(self, done: int, total: int) -> None:
        """``progress(done, total)`` callback of the current phase."""
        self.bar.update(self.task, completed=done, total=total)

    def inversion(self, steps: int) -> Callable[[int, int], None]:
        """The callback for :func:`~selfage_cli.edit.engine.inversion.invert`, which counts its two phases as one
        (``total`` = 2 × ``steps`` with null-text optimisation): split there into two phases."""
        self.start("inverting (DDIM)", steps)

        def progress(done: int, total: int) -> None:
            if total > steps and done > steps:
                if self.phase != "null-text optimisation":
                    self.start("null-text optimisation", total - steps)
                self.update(done - steps, total - steps)
            else:
                self.update(done, min(total, steps))

        return progress

    def remove(self) -> None:
        self.bar.remove_task(self.task)
