"""The age bands: the edit prompts' placeholder word changes at each band, and eval reports age errors per band."""

from __future__ import annotations

# (name, first age), youngest first.
AGE_BANDS: tuple[tuple[str, int], ...] = (("baby", 0), ("child", 5), ("adult", 15), ("elderly", 65))


def age_band(age: float) -> str:
    """The band of an age: baby < 5, child 5–14, adult 15–64, elderly ≥ 65 (ages below 0 count as baby)."""
    return next((name for name, first in reversed(AGE_BANDS) if age >= first), AGE_BANDS[0][0])
