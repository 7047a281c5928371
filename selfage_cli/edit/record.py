"""A photo's Edit entry in the manifest across calls: :func:`record_edit` merges one call's entry
into it (:func:`merge_edit_entry`): outputs accumulate, the latest call describes the top level, and
earlier calls keep their provenance in ``history`` for the ages no later call redid.
"""

from __future__ import annotations

from typing import Any

from selfage_cli.edit.paste_back import merge_full_outputs
from selfage_cli.project import Project, find, upsert


def record_edit(project: Project, entry: dict[str, Any]) -> dict[str, Any]:
    """Merge ``entry`` into the photo's Edit entry in the manifest; returns the merged entry."""
    with project.update() as manifest:
        edits = manifest.setdefault("edits", [])
        merged = merge_edit_entry(find(edits, entry["id"]), entry)
        upsert(edits, merged)
    return merged


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


def merge_edit_entry(previous: dict[str, Any] | None, latest: dict[str, Any]) -> dict[str, Any]:
    """The photo's Edit entry after a call that wrote ``latest`` (see docs/manifest.md, "Edit").

    ``outputs`` and ``target_ages`` accumulate over calls (a re-edited age keeps its place and takes the
    new file). Every other top-level key describes the latest call, whose ages are ``settings.ages``.
    The ages of earlier calls that this call did not redo keep their provenance in ``history``: one
    record per earlier call, ``{"ages": [...], "prompts": ..., "strip", "gif", source age, LoRA,
    base model, settings, inversion cache, created}``, newest first. A record loses the ages (and the
    strip/GIF) that a later call rewrote, and disappears when nothing of it is left.
    """
    if previous is None:
        return {**latest, "history": []}
    new_ages = [int(a) for a in latest["target_ages"]]
    rewrote = {key: bool(latest.get(key)) for key in ("strip", "gif")}
    history = [_call_record(previous)] + list(previous.get("history") or [])
    kept: list[dict[str, Any]] = []
    for record in history:
        record = _without(record, new_ages, rewrote)
        if record["ages"] or record.get("strip") or record.get("gif"):
            kept.append(record)
    outputs = {**(previous.get("outputs") or {}), **latest["outputs"]}
    ages = [int(a) for a in previous.get("target_ages") or [] if str(a) in outputs]
    ages += [a for a in new_ages if a not in ages]
    return {
        **latest,
        "target_ages": ages,
        "outputs": {str(a): outputs[str(a)] for a in ages},
        "history": kept,
        **merge_full_outputs(previous, latest),  # edit --paste-back's full frames
    }


def _call_record(entry: dict[str, Any]) -> dict[str, Any]:
    """The provenance of the call that an entry's top level describes, with that call's ages."""
    call_ages = [int(a) for a in (entry.get("settings") or {}).get("ages") or entry.get("target_ages") or []]
    prompts = entry.get("prompts") or {}
    targets = dict(zip(call_ages, prompts.get("targets") or [], strict=False))
    return {
        "ages": call_ages,
        "prompts": {"source": prompts.get("source"), "targets": [targets.get(a) for a in call_ages]},
        "strip": entry.get("strip"),
        "gif": entry.get("gif"),
        **{key: entry.get(key) for key in _PROVENANCE_KEYS if key in entry},
    }


def _without(record: dict[str, Any], ages: list[int], rewrote: dict[str, bool]) -> dict[str, Any]:
    """``record`` less the ages (and strip/GIF) that a later call wrote again."""
    keep = [i for i, age in enumerate(record.get("ages") or []) if int(age) not in ages]
    prompts = record.get("prompts") or {}
    targets = list(prompts.get("targets") or [])
    return {
        **record,
        "ages": [int(record["ages"][i]) for i in keep],
        "prompts": {**prompts, "targets": [targets[i] if i < len(targets) else None for i in keep]},
        **{key: None for key, again in rewrote.items() if again},
    }
