"""The edit prompts: placeholder word by age and gender, the age word, and source/target prompt pairs.

The inversion (source) prompt is ``"photo of sks {placeholder} as {age}-year-old"``; the prompt for a
target age A replaces the age word by A's and the placeholder by A's placeholder, so source and target
prompts always have the same number of space-separated words (prompt-to-prompt's word swap needs it).
Without a LoRA (``identifier=None``) the identifier word is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfage_cli.ages.engine.bands import age_band
from selfage_cli.errors import SelfageError

GENDERS = ("female", "male")
_BAND_WORDS = {  # age band (selfage_cli.ages.engine.bands) → (female, male, no gender)
    "baby": ("baby", "baby", "baby"),
    "child": ("girl", "boy", "child"),
    "adult": ("woman", "man", "person"),
    "elderly": ("elderly", "elderly", "elderly"),
}


def placeholder(age: float, gender: str | None) -> str:
    """The person word for an age: <5 baby; 5–14 girl/boy/child; 15–64 woman/man/person; ≥65 elderly."""
    if gender not in (None, *GENDERS):
        raise SelfageError(f"--gender {gender!r} is not known; use female or male (or leave it out).")
    female, male, neutral = _BAND_WORDS[age_band(age)]
    return {"female": female, "male": male}.get(gender or "", neutral)


def age_word(age: float | int) -> str:
    """``30`` → ``"30-year-old"``; a float is pasted as Python prints it (``34.71`` → ``"34.71-year-old"``).

    The reference pastes the DEX estimate unrounded; ``--no-round-source-age`` passes a float here to
    reproduce that. Integral numbers of any integer type print without a decimal point.
    """
    if isinstance(age, bool):
        raise TypeError("age must be a number, not a bool")
    if isinstance(age, int) or type(age).__name__.startswith(("int", "uint")):
        return f"{int(age)}-year-old"
    return f"{float(age)}-year-old"


def prompt_for(age: float | int, gender: str | None, identifier: str | None = "sks") -> str:
    """``"photo of sks {placeholder} as {age}-year-old"`` (no identifier word when ``identifier`` is None)."""
    person = placeholder(age, gender)
    subject = f"{identifier} {person}" if identifier else person
    return f"photo of {subject} as {age_word(age)}"


@dataclass
class EditPrompts:
    """The source (inversion) prompt, one prompt per target age, and the local-blend words of each.

    Blend words are ``(age word, placeholder)``: the words whose cross-attention maps make the
    local-blend mask (source words for the source branch, each target's own words for its branch).
    """

    source: str
    targets: list[str]
    source_blend_words: tuple[str, str]
    target_blend_words: list[tuple[str, str]] = field(default_factory=list)
    target_ages: list[int] = field(default_factory=list)
    source_age: float | int | None = None

    @property
    def all_prompts(self) -> list[str]:
        """Source first, then the targets: the prompt of each branch of a batched edit."""
        return [self.source, *self.targets]

    def subset(self, indices: list[int]) -> EditPrompts:
        """The same source with only the targets at ``indices`` (one chunk of a ``--max-batch`` edit)."""
        return EditPrompts(
            source=self.source,
            targets=[self.targets[i] for i in indices],
            source_blend_words=self.source_blend_words,
            target_blend_words=[self.target_blend_words[i] for i in indices],
            target_ages=[self.target_ages[i] for i in indices] if self.target_ages else [],
            source_age=self.source_age,
        )


def build_prompts(
    source_age: float | int,
    target_ages: list[int],
    gender: str | None,
    identifier: str | None = "sks",
) -> EditPrompts:
    """Source prompt for ``source_age`` and one edit prompt per target age (same word count)."""
    if not target_ages:
        raise SelfageError("--ages is empty; give at least one target age, e.g. --ages 0,20,80.")
    if identifier is not None and (not identifier or " " in identifier):
        raise ValueError(f"identifier must be one word, got {identifier!r}")
    source = prompt_for(source_age, gender, identifier)
    targets = [prompt_for(age, gender, identifier) for age in target_ages]
    return EditPrompts(
        source=source,
        targets=targets,
        source_blend_words=(age_word(source_age), placeholder(source_age, gender)),
        target_blend_words=[(age_word(age), placeholder(age, gender)) for age in target_ages],
        target_ages=list(target_ages),
        source_age=source_age,
    )
