"""The source age and the gender word of an edit, when the user does not give them.

**Source age** (in this order): ``--source-age``; the age recorded for the input (an estimate recorded
by an earlier edit is reused as the exact float it was, so ``--no-round-source-age`` pastes the same
number on every run, and the prompt and the inversion cache key stay the same); else the
``--age-estimator``'s estimate on the aligned input (DEX with ``--dex-preprocess``, or builtin),
recorded on the input as ``age`` (rounded), ``age_source`` (the estimator) and ``age_candidates``
(the float, exactly). A recorded builtin estimate is re-estimated by DEX when DEX is asked for
(``--age-estimator dex``) or, under ``auto``, once DEX weights are known.

**Gender**: ``--gender female|male`` is used as given, ``--gender none`` forces the neutral words
(the reference's default). Without ``--gender`` the builtin estimator's gender call is used when its
confidence is at least :data:`GENDER_THRESHOLD`, printed ("gender: female (estimated, 97 %); pass
--gender to change") and recorded as ``gender_source: "estimated"``; below it, or when the builtin
estimator is not installed, the neutral words are used as before (``gender_source: "neutral"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfage_cli import console, manifest
from selfage_cli.ages.engine.estimator import AgeEstimate, AgeEstimator
from selfage_cli.faces.engine.loading import load_image
from selfage_cli.project import Project

GENDER_THRESHOLD = 0.9  # the builtin gender call is used only at this confidence or above
NO_GENDER = "none"
ESTIMATED_SOURCES = ("dex", "builtin")


@dataclass
class SourceFacts:
    """The estimators of one edit call (each loaded on first use) and what they decided per photo."""

    project: Project
    config: Any  # EditConfig
    dex_weights: Path | None
    device: Any
    _estimators: dict[str, AgeEstimator] = field(default_factory=dict, init=False)
    _builtin_runs: dict[str, AgeEstimate] = field(default_factory=dict, init=False)

    # ---- estimators ----
    def estimator(self, name: str) -> AgeEstimator:
        if name not in self._estimators:
            from selfage_cli.ages.engine import estimator

            self._estimators[name] = estimator.load(
                name,
                dex_weights=self.dex_weights,
                configured=manifest.configured_dex_weights(self.project),
                device=self.device,
                dex_preprocess=getattr(self.config, "dex_preprocess", "antialias"),
            )
        return self._estimators[name]

    def chosen(self) -> str:
        from selfage_cli.ages.engine import estimator

        return estimator.choose(
            getattr(self.config, "age_estimator", "auto"),
            self.dex_weights,
            manifest.configured_dex_weights(self.project),
        )

    def _estimate(self, name: str, photo: Any) -> AgeEstimate:
        key = f"{name}:{photo.aligned}"
        if name == "builtin" and key in self._builtin_runs:
            return self._builtin_runs[key]
        image = load_image(self.project.path(photo.aligned))
        estimate = self.estimator(name).estimate([image], progress=False)[0]
        if name == "builtin":
            self._builtin_runs[key] = estimate
        return estimate

    # ---- the source age ----
    def source_age(self, photo: Any) -> tuple[float | int, str]:
        """(age, where it came from): see the module doc."""
        config = self.config
        if config.source_age is not None:
            return config.source_age, "option"
        entry = manifest.find(manifest.load(self.project).inputs, photo.id)
        label = (entry or photo.entry).age_label
        candidates = label.candidates
        recorded = label.source
        name: str | None = None
        if label.value is not None:
            if recorded not in ESTIMATED_SOURCES or not _is_number(candidates.get(recorded)):
                return label.value, str(recorded or "manifest")
            name = self.chosen()
            keep = recorded == name or (getattr(config, "age_estimator", "auto") == "auto" and recorded == "dex")
            if keep:
                return float(candidates[recorded]), str(recorded)
            if _is_number(candidates.get(name)):  # estimated by the chosen estimator before
                self._record(photo, name, float(candidates[name]))
                return float(candidates[name]), name
        name = name or self.chosen()
        estimate = self._estimate(name, photo)
        age = float(estimate.age)
        label = "DEX" if name == "dex" else "the builtin estimator"
        spread = f" ± {estimate.uncertainty:.1f}" if estimate.uncertainty is not None else ""
        console.info(f"{photo.id}: {label} estimates age {age:.1f}{spread}")
        self._record(photo, name, age)
        return age, name

    def _record(self, photo: Any, name: str, age: float) -> None:
        """The input's age from estimator ``name``: rounded as ``age``, the float itself in ``age_candidates``
        (JSON keeps its repr, so a later --no-round-source-age pastes the same number)."""
        with manifest.update(self.project) as typed:
            stored = manifest.find(typed.inputs, photo.id)
            if stored is not None:
                manifest.set_estimated_age(stored, name, age)

    # ---- the gender ----
    def gender(self, photo: Any) -> tuple[str | None, str, float | None]:
        """(gender for the prompts or None for the neutral words, gender_source, confidence of an estimate)."""
        given = self.config.gender
        if given == NO_GENDER:
            return None, "none", None
        if given is not None:
            return given, "option", None
        from selfage_cli.ages.engine.builtin import available

        ok, why = available()
        if not ok:
            console.info(f"gender: not estimated ({why}); neutral words. Pass --gender to choose one.")
            return None, "neutral", None
        estimate = self._estimate("builtin", photo)
        confidence = estimate.gender_confidence
        percent = f"{100 * confidence:.0f} %" if confidence is not None else "?"
        if estimate.gender is None or confidence is None or confidence < GENDER_THRESHOLD:
            console.info(
                f"{photo.id}: gender: {estimate.gender} only {percent} sure (needs {100 * GENDER_THRESHOLD:.0f} %); "
                "neutral words. Pass --gender to choose one."
            )
            return None, "neutral", confidence
        console.info(f"{photo.id}: gender: {estimate.gender} (estimated, {percent}); pass --gender to change")
        return estimate.gender, "estimated", confidence


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
