"""A photo's Edit entry in the manifest across calls: :func:`record_edit` merges one call's entry
into it (:func:`merge_edit_entry`): outputs accumulate, the latest call describes the top level, and
earlier calls keep their provenance in ``history`` for the ages no later call redid.
"""

from __future__ import annotations

from typing import Any

from selfage_cli.edit.paste_back import merge_full_outputs
from selfage_cli.manifest import Edit, HistoryRecord, find, upsert
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project


def record_edit(project: Project, entry: Edit) -> dict[str, Any]:
    """Merge ``entry`` into the photo's Edit entry in the manifest; returns the merged entry's JSON."""
    with update_manifest(project) as manifest:
        merged = merge_edit_entry(find(manifest.edits, entry.id), entry)
        upsert(manifest.edits, merged)
    return merged.to_dict()


# Provenance of one call's outputs, kept in ``history`` for the ages a later call did not redo.
_PROVENANCE_KEYS = (
    "source_age",
    "source_age_source",
    "lora",
    "lora_source",
    "lora_sha256",
    "lora_run",
    "lora_applied",
    "base_model",
    "settings",
    "inversion_cache",
    "reconstruction",
    "created",
)


def merge_edit_entry(previous: Edit | None, latest: Edit) -> Edit:
    """The photo's Edit entry after a call that wrote ``latest`` (see docs/manifest.md, "Edit").

    ``outputs`` and ``target_ages`` accumulate over calls (a re-edited age keeps its place and takes the
    new file). Every other top-level key describes the latest call, whose ages are ``settings.ages``.
    The ages of earlier calls that this call did not redo keep their provenance in ``history``: one
    :class:`~selfage_cli.manifest.HistoryRecord` per earlier call (ages, prompts, strip, GIF, source age,
    LoRA, base model, settings, inversion cache, created), newest first. A record loses the ages (and the
    strip/GIF) that a later call rewrote, and disappears when nothing of it is left.
    """
    merged = latest.model_copy(deep=True)
    if previous is None:
        merged.history = []
        return merged
    new_ages = [int(a) for a in latest.target_ages]
    rewrote = {"strip": bool(latest.strip), "gif": bool(latest.gif)}
    kept = []
    for record in [_call_record(previous), *previous.history]:
        record = _without(record, new_ages, rewrote)
        if record.ages or record.strip or record.gif:
            kept.append(record)
    outputs = {**previous.outputs, **latest.outputs}
    ages = [int(a) for a in previous.target_ages if str(a) in outputs]
    ages += [a for a in new_ages if a not in ages]
    merged.target_ages = ages
    merged.outputs = {str(a): outputs[str(a)] for a in ages}
    merged.history = kept
    for key, value in merge_full_outputs(previous, latest).items():  # edit --paste-back's full frames
        setattr(merged, key, value)
    return merged


def _call_record(entry: Edit) -> HistoryRecord:
    """The provenance of the call that an entry's top level describes, with that call's ages."""
    call_ages = [int(a) for a in (entry.settings or {}).get("ages") or entry.target_ages]
    prompts = entry.prompts or {}
    targets = dict(zip(call_ages, prompts.get("targets") or [], strict=False))
    return HistoryRecord(
        ages=call_ages,
        prompts={"source": prompts.get("source"), "targets": [targets.get(a) for a in call_ages]},
        strip=entry.strip,
        gif=entry.gif,
        **{key: getattr(entry, key) for key in _PROVENANCE_KEYS if entry.has(key)},
    )


def _without(record: HistoryRecord, ages: list[int], rewrote: dict[str, bool]) -> HistoryRecord:
    """``record`` less the ages (and strip/GIF) that a later call wrote again."""
    keep = [i for i, age in enumerate(record.ages) if int(age) not in ages]
    prompts = record.prompts or {}
    targets = list(prompts.get("targets") or [])
    trimmed = record.model_copy(deep=True)
    trimmed.ages = [int(record.ages[i]) for i in keep]
    trimmed.prompts = {**prompts, "targets": [targets[i] if i < len(targets) else None for i in keep]}
    for key, again in rewrote.items():
        if again:
            setattr(trimmed, key, None)
    return trimmed
