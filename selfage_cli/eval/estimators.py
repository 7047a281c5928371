"""The age estimators of ``selfage eval`` (``--age-estimator auto|dex|builtin|both``) and their estimates.

``auto``: DEX when its weights are known, else builtin; ``both``: DEX and builtin side by side (needs DEX
weights), since papers report DEX and a second estimator differs. The first estimator is the one the
report's ``estimated_age`` fields and its age summary hold; every estimator's values are in
``estimates`` / ``input_estimates`` and ``summary.age_by_estimator``. A DEX file that is named but
missing is an error with ``dex``/``both`` (exit 2) and a note with ``auto``; a builtin estimator that is not
installed is a note, not an error (identity still counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfage_cli.errors import SelfageError
from selfage_cli.manifest import configured_dex_weights

CHOICES = ("auto", "dex", "builtin", "both")
DEX_PREPROCESS = "antialias"  # how eval resizes a face for DEX (ages.engine.dex.check_preprocess)


def load_estimators(
    choice: str, dex_weights: Path | None, project: Any, device: str
) -> tuple[list[Any], str | None, list[str]]:
    """(estimators in report order, the DEX weights' path or None, notes)."""
    from selfage_cli.ages.engine import estimator
    from selfage_cli.ages.engine.builtin import available
    from selfage_cli.ages.engine.dex import MISSING_WEIGHTS_HELP, find_dex_weights

    choice = estimator.check_choice(choice, CHOICES)
    notes: list[str] = []
    try:
        dex_path = find_dex_weights(dex_weights, configured_dex_weights(project))
    except SelfageError as exc:  # a named file that does not exist: asked for DEX, an error; else a note
        if choice in ("dex", "both"):
            raise
        dex_path = None
        notes.append(f"DEX age error not measured: {exc}")
    if choice in ("dex", "both") and dex_path is None and not notes:
        raise SelfageError(f"--age-estimator {choice} needs the DEX weights: {MISSING_WEIGHTS_HELP}.")
    names = {"auto": ["dex" if dex_path else "builtin"], "dex": ["dex"], "builtin": ["builtin"]}.get(
        choice, ["dex", "builtin"]
    )
    models: list[Any] = []
    for name in names:
        if name == "dex":
            if dex_path is None:
                continue
            models.append(estimator.load("dex", dex_weights=dex_path, device=device, dex_preprocess=DEX_PREPROCESS))
            continue
        ok, why = available()
        if not ok:
            notes.append(
                f"builtin age estimate not measured ({why})"
                + ("" if models else f"; for DEX age errors: {MISSING_WEIGHTS_HELP}")
                + "."
            )
            continue
        models.append(estimator.load("builtin"))
    if not models and not notes:
        notes.append(f"age error not measured (identity only): {MISSING_WEIGHTS_HELP}.")
    return models, (str(dex_path) if dex_path and any(m.name == "dex" for m in models) else None), notes


def estimate_all(models: list[Any], images: list[tuple[Any, Any]]) -> None:
    """Fill every input's and output's estimates (the first estimator's also as ``estimated_age``)."""
    if not models or not images:
        return
    pictures = [image for _, image in images]
    for position, model in enumerate(models):
        estimates = model.estimate(pictures)
        for (holder, _), estimate in zip(images, estimates, strict=True):
            value = float(estimate.age)
            if hasattr(holder, "input_estimates"):
                holder.input_estimates[model.name] = value
                if position == 0:
                    holder.input_estimated_age = value
            else:
                holder.estimates[model.name] = value
                if position == 0:
                    holder.estimated_age = value
