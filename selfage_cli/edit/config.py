"""The options of one ``selfage edit`` call, validated once, in one place.

:class:`EditConfig` holds every setting of the method (defaults are the reference's) and the output
choices. It refuses bad values with a :class:`SelfageError` naming the option and the fix, so the
stage code can trust it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from selfage_cli.ages.engine.sources import MAX_AGE, MIN_AGE, check_age_list
from selfage_cli.edit.prompts import GENDERS
from selfage_cli.errors import SelfageError

INVERSION_MODES = ("null-text", "negative-prompt", "direct")


@dataclass
class EditConfig:
    """Every option of an edit (method settings and outputs), validated on construction."""

    ages: list[int] = field(default_factory=lambda: [0, 20, 80])
    side_by_side: bool = False
    gif: bool = False
    source_age: float | None = None  # None: recorded age of the input, else the DEX estimate
    gender: str | None = None
    inversion: str = "null-text"
    ddim_steps: int = 50
    guidance: float = 7.5
    inner_steps: int = 10
    cross_replace: float = 0.8
    self_replace: float = 0.5
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    reweight: float = 1.0  # weight of the target age word's tokens in cross-attention (1 = identity)
    max_batch: int | None = None
    round_source_age: bool = True
    seed: int = 0
    compile: bool = False  # torch.compile the inversion's UNet (engineering only: same method)
    cuda_graph: bool = True  # replay the inversion's UNet from CUDA graphs on a GPU (same kernels, checked)
    paste_back: bool = False  # also write each age pasted back into the source photo (edit/paste_back.py)
    age_estimator: str = "auto"  # who estimates a missing source age: dex, builtin or auto (ages/engine/estimator.py)
    dex_preprocess: str = "antialias"  # DEX's resize, as in label-ages (ages/engine/dex.py)

    def __post_init__(self) -> None:
        """Raise SelfageError (exit 2) for the first bad value, naming the option and the fix (every config
        validates when it is built; ``dataclasses.replace`` checks a changed one again)."""
        self.ages = _check_ages(self.ages)
        if self.source_age is not None:
            if (
                isinstance(self.source_age, bool)
                or not isinstance(self.source_age, int | float)
                or not math.isfinite(self.source_age)
            ):
                raise SelfageError(
                    f"--source-age {self.source_age!r} is not a number; give the age in the photo, e.g. 34."
                )
            if not MIN_AGE <= self.source_age <= MAX_AGE:
                raise SelfageError(
                    f"--source-age {self.source_age} is outside {MIN_AGE}–{MAX_AGE}; give the age in the photo."
                )
        if self.gender is not None:
            gender = str(self.gender).strip().lower()
            if gender not in (*GENDERS, "none"):
                raise SelfageError(
                    f"--gender {self.gender!r} is not known; use female, male or none (neutral words), or leave it "
                    "out (estimated)."
                )
            self.gender = gender
        from selfage_cli.ages.engine.dex import check_preprocess
        from selfage_cli.ages.engine.estimator import check_choice

        self.age_estimator = check_choice(self.age_estimator)
        check_preprocess(self.dex_preprocess)
        if self.inversion not in INVERSION_MODES:
            raise SelfageError(
                f"--inversion {self.inversion!r} is not known; use null-text (the paper's), negative-prompt or direct "
                "(both faster)."
            )
        _check_int("--ddim-steps", self.ddim_steps, 1, 1000)
        _check_int("--inner-steps", self.inner_steps, 0, 1000)
        if not isinstance(self.guidance, int | float) or not math.isfinite(self.guidance) or self.guidance < 1.0:
            raise SelfageError(f"--guidance {self.guidance} must be a number ≥ 1 (the paper uses 7.5).")
        for option, value in (
            ("--cross-replace", self.cross_replace),
            ("--self-replace", self.self_replace),
            ("--blend-threshold", self.blend_threshold),
            ("--blend-start", self.blend_start),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise SelfageError(f"{option} {value} must be a fraction between 0 and 1.")
        if (
            isinstance(self.reweight, bool)
            or not isinstance(self.reweight, int | float)
            or not math.isfinite(self.reweight)
        ):
            raise SelfageError(f"--reweight {self.reweight!r} must be a finite number (1 = no re-weighting).")
        if self.max_batch is not None:
            _check_int("--max-batch", self.max_batch, 1, 10_000)
        _check_int("--seed", self.seed, 0, 2**63 - 1)

    def prompt_age(self, age: float | int) -> float | int:
        """The age as it goes into the inversion prompt: rounded to an integer unless --no-round-source-age
        (which pastes a DEX float as it is, like the reference; integer ages stay integers)."""
        return int(round(age)) if self.round_source_age else age

    def p2p_settings(self) -> Any:
        """The engine's prompt-to-prompt settings for these options."""
        from selfage_cli.edit.engine import P2PSettings

        return P2PSettings(
            cross_replace=self.cross_replace,
            self_replace=self.self_replace,
            blend_threshold=self.blend_threshold,
            blend_start=self.blend_start,
            reweight=float(self.reweight),
        )

    def to_json(self) -> dict[str, Any]:
        """Every option, as recorded in the manifest's edit entries."""
        return asdict(self)


def _check_int(option: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SelfageError(f"{option} {value!r} is not an integer; give a whole number.")
    if not low <= value <= high:
        raise SelfageError(f"{option} {value} is outside {low}–{high}; give a value in that range.")


def _check_ages(ages: Any) -> list[int]:
    return check_age_list(list(ages or []), "--ages")
