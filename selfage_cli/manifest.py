"""The manifest ``selfage.json`` as types: what each entry holds, and the named functions that change it.

This module is the definition of the schema (``docs/manifest.md`` describes it in words). Each section of the
manifest has a model: :class:`ProjectConfig` (``config``), :class:`ImageEntry` (``references`` and ``inputs``),
:class:`Regularisation` with its :class:`RegImage`, :class:`Run` (``runs``) and :class:`Edit` (``edits``) with its
:class:`HistoryRecord`; every entry that carries an age does so through the fields of :class:`AgeLabelled`
(:class:`AgeLabel`: value, source, candidates).

``Manifest.from_dict`` checks the types of every known field (a wrong type raises :class:`ManifestError`
naming the field and the file, exit 2); ``to_dict`` gives back the same JSON, key for key and in the same
order: keys this version does not know are kept as they were, and a key that was absent stays absent.
``project.py`` keeps the storage (lock, atomic write, path checks); what a stage may change in another
stage's entries goes through a function here (:func:`set_age_label`, :func:`allocate_id`, :func:`upsert`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_serializer, model_validator

from selfage_cli.errors import ManifestError

if TYPE_CHECKING:
    from selfage_cli.project import Project

SCHEMA_VERSION = 1

# Section names and the one key under which an entry names its aligned (or generated) image.
REFERENCES = "references"
INPUTS = "inputs"
ALIGNED = "aligned"

# The files a training run writes into its folder, and ``edit`` looks for there.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the LoRA weights (diffusers format)
META_NAME = "pytorch_lora_weights.json"  # our metadata beside them (written by train/record.py)

Number = int | float  # kept as given: an int stays an int, a float a float (so a rewrite is byte-identical)


class _Model(BaseModel):
    """Strict types (no silent conversions), unknown keys kept, and the key order of the JSON it came from."""

    model_config = ConfigDict(extra="allow", strict=True, validate_assignment=True)
    _order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        if isinstance(data, dict) and not model._order:
            model._order = list(data)
        return model

    @model_serializer(mode="wrap")
    def _in_order(self, handler: Any) -> dict[str, Any]:
        for name, info in type(self).model_fields.items():  # an absent section that a stage filled in is written
            unset = name not in self.model_fields_set and info.default_factory is not None
            if unset and getattr(self, name) != info.default_factory():
                self.model_fields_set.add(name)
        data = handler(self)
        rank = {key: index for index, key in enumerate(self._order)}
        return dict(sorted(data.items(), key=lambda item: rank.get(item[0], len(rank))))

    def __setattr__(self, name: str, value: Any) -> None:
        """Set a field as a dict sets a key: a key new to the entry goes after the others."""
        super().__setattr__(name, value)
        if not name.startswith("_") and name not in self._order:
            self._order.append(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys it was read or built with (plus those set since, in the order they were set)."""
        return self.model_dump(mode="python", exclude_unset=True)

    def has(self, key: str) -> bool:
        """Whether the JSON object holds ``key`` (null or not), as ``key in dict``."""
        return key in self.model_fields_set or key in (self.model_extra or {})

    def get(self, key: str, default: Any = None) -> Any:
        """A field or unknown key by name (``default`` when absent or null), as a dict's ``get``."""
        value = getattr(self, key, None) if key in type(self).model_fields else (self.model_extra or {}).get(key)
        return default if value is None else value


# ---- the age label ----------------------------------------------------------------------------------------
class AgeLabel(_Model):
    """An age label: the integer age, where it came from (``file``, ``filename``, ``exif``, ``prompt`` or the
    estimator that estimated it: ``dex``, ``builtin``) and every source's value."""

    value: Number | None = None
    source: str | None = None
    candidates: dict[str, Number | None] = Field(default_factory=dict)

    @property
    def estimator(self) -> str | None:
        """The estimator that gave the age (``dex`` or ``builtin``), or None when it was given or read."""
        return self.source if self.source in ("dex", "builtin") else None


class AgeLabelled(_Model):
    """The age label's fields as an entry stores them (``age``, ``age_source``, ``age_candidates``)."""

    age: Number | None = None
    age_source: str | None = None
    age_candidates: dict[str, Number | None] | None = None

    @property
    def age_label(self) -> AgeLabel:
        return AgeLabel(value=self.age, source=self.age_source, candidates=dict(self.age_candidates or {}))


def set_age_label(entry: AgeLabelled, age: Number | None, source: str | None, candidates: dict[str, Any]) -> None:
    """Give ``entry`` an age label: the one function through which any stage writes ``age``/``age_source``/
    ``age_candidates`` (``align`` blank or kept, ``label-ages``, ``edit``'s estimate)."""
    entry.age = age
    entry.age_source = source
    entry.age_candidates = dict(candidates)


def set_estimated_age(entry: AgeLabelled, estimator: str, value: float) -> None:
    """Record ``estimator``'s estimate: rounded as the age, the float itself among the candidates."""
    set_age_label(entry, int(round(value)), estimator, {**(entry.age_candidates or {}), estimator: value})


def copy_age_label(entry: AgeLabelled, previous: AgeLabelled | dict[str, Any] | None) -> None:
    """Give ``entry`` the label of ``previous`` (an entry of the same content), or a blank one."""
    if previous is None:
        set_age_label(entry, None, None, {})
        return
    if isinstance(previous, dict):
        previous = AgeLabelled.model_validate(previous)
    set_age_label(entry, previous.age, previous.age_source, dict(previous.age_candidates or {}))


# ---- entries ------------------------------------------------------------------------------------------------
class ImageEntry(AgeLabelled):
    """An aligned face in ``references`` or ``inputs`` (written by ``align``, ``edit``; labelled by ``label-ages``)."""

    id: str
    source: str | None = None
    sha256: str | None = None
    aligned: str | None = None
    size: int | None = None
    detector: str | None = None
    box: list[Number] | None = None
    score: Number | None = None
    landmarks: list[list[Number]] | None = None
    face_index: int | None = None
    faces_found: int | None = None
    aligned_at: str | None = None
    registered: str | None = None
    descriptor: list[Number] | None = None
    prealigned: bool | None = None


class RegImage(AgeLabelled):
    """A regularisation image (``label-ages --reg`` or ``make-reg``)."""

    id: str
    source: str | None = None
    aligned: str | None = None
    aligned_ok: bool | None = None
    dex_age: Number | None = None
    size: list[int] | None = None
    prompt: str | None = None
    seed: int | None = None
    align_failure: str | None = None


class Regularisation(_Model):
    """The ``regularisation`` section: a user's folder (``folder``) or a generated set (``generated``)."""

    folder: str | None = None
    images: list[RegImage] = Field(default_factory=list)
    generated: bool | None = None
    base_model: str | None = None
    prompt: str | None = None
    age_range: list[int] | None = None
    steps: int | None = None


class Run(_Model):
    """A training run (``train``)."""

    name: str
    run_dir: str | None = None
    lora: str | None = None
    config: dict[str, Any] | None = None
    base_model: str | None = None
    base_model_fingerprint: Any = None
    pipeline_fingerprint: Any = None
    steps_done: int | None = None
    steps_total: int | None = None
    finished: bool | None = None
    updated: str | None = None
    processes: int | None = None
    step_runner: str | None = None
    checkpoint_dir: str | None = None
    loss_log: str | None = None
    references: list[Any] | None = None
    validation_grid: str | None = None


class HistoryRecord(_Model):
    """An earlier ``edit`` call whose outputs are still recorded (``ages`` limited to those no later call redid)."""

    ages: list[int] = Field(default_factory=list)
    prompts: dict[str, Any] | None = None
    strip: str | None = None
    gif: str | None = None
    source_age: Number | None = None
    source_age_source: str | None = None
    lora: str | None = None
    lora_source: str | None = None
    lora_sha256: str | None = None
    lora_run: str | None = None
    lora_applied: str | None = None
    base_model: str | None = None
    settings: dict[str, Any] | None = None
    inversion_cache: str | None = None
    reconstruction: dict[str, Any] | None = None
    created: str | None = None


class Edit(_Model):
    """One input's edits (``edit``): the latest call's keys, plus ``target_ages``/``outputs``/``history``
    accumulated over calls (``edit.record.merge_edit_entry``)."""

    id: str
    input: str | None = None
    source_age: Number | None = None
    source_age_source: str | None = None
    gender: str | None = None
    gender_source: str | None = None
    gender_confidence: Number | None = None
    target_ages: list[int] = Field(default_factory=list)
    outputs: dict[str, str] = Field(default_factory=dict)
    strip: str | None = None
    gif: str | None = None
    full_outputs: dict[str, str] | None = None
    strip_full: str | None = None
    gif_full: str | None = None
    inversion_cache: str | None = None
    lora: str | None = None
    lora_source: str | None = None
    lora_sha256: str | None = None
    lora_run: str | None = None
    base_model: str | None = None
    lora_applied: str | None = None
    prompts: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    history: list[HistoryRecord] = Field(default_factory=list)
    inversion: dict[str, Any] | None = None
    edit_seconds: Number | None = None
    unet_calls: int | None = None
    created: str | None = None
    reconstruction: dict[str, Any] | None = None

    def ages_from_other_source_age(self) -> set[int]:
        """Ages kept from an earlier call (``history``) whose source age differs from this entry's."""
        source = None if self.source_age is None else float(self.source_age)
        return {
            int(age)
            for record in self.history
            if record.source_age is None or float(record.source_age) != source
            for age in record.ages
        }


class ProjectConfig(_Model):
    """The ``config`` section: the project's settings."""

    base_model: str | None = None
    dex_weights: str | None = None
    demo: bool | None = None


class Manifest(_Model):
    """The whole ``selfage.json``."""

    schema_version: int = SCHEMA_VERSION
    created: str | None = None
    updated: str | None = None
    config: ProjectConfig = Field(default_factory=ProjectConfig)
    references: list[ImageEntry] = Field(default_factory=list)
    inputs: list[ImageEntry] = Field(default_factory=list)
    regularisation: Regularisation = Field(default_factory=Regularisation)
    runs: list[Run] = Field(default_factory=list)
    edits: list[Edit] = Field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any, path: str | Path = "selfage.json") -> Manifest:
        """The manifest read from its JSON object; a wrong-typed value raises ManifestError naming it and ``path``."""
        return validate(cls, data, path)

    def section(self, name: str) -> list[ImageEntry]:
        """``references`` or ``inputs``."""
        if name not in (REFERENCES, INPUTS):
            raise ValueError(f"no image section {name!r}")
        return self.references if name == REFERENCES else self.inputs


ModelT = TypeVar("ModelT", bound=_Model)

_TYPE_TAGS = re.compile(r"^(int|float|str|bool|none|dict\[.*|list\[.*|function-.*|.*\[.*\])$")
_KINDS = {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "true/false", int: "a number"}


def validate(model: type[ModelT], data: Any, path: str | Path = "selfage.json") -> ModelT:
    """``model`` built from ``data``; a wrong-typed value raises ManifestError (exit 2) naming the field and ``path``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = _field_name(error["loc"])
        message = re.sub(r" or instance of \w+", "", error["msg"]).replace("valid dictionary", "JSON object")
        got = error.get("input")
        kind = next((name for typ, name in _KINDS.items() if isinstance(got, typ)), "null" if got is None else "")
        raise ManifestError(
            f"{path}: '{where}' has the wrong type ({message[0].lower()}{message[1:]}"
            f"{f'; it holds {kind}' if kind else ''}); fix or remove that entry."
        ) from None


def _field_name(loc: tuple[Any, ...]) -> str:
    """``('edits', 0, 'outputs', 'dict[str,str]')`` → ``edits[0].outputs`` (the union/type tags left out)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _TYPE_TAGS.match(str(part)):
            text += f".{part}" if text else str(part)
    return text or "(top level)"


# ---- find, upsert, ids ----------------------------------------------------------------------------------


def find(entries: list[Any], value: Any, key: str = "id") -> Any:
    """The first entry (typed or a plain dict) whose ``key`` equals ``value``, or None."""
    return next((entry for entry in entries if entry.get(key) == value), None)


def upsert(entries: list[Any], entry: Any, key: str = "id") -> None:
    """Replace the entry with the same ``key`` value, or append it."""
    for index, existing in enumerate(entries):
        if existing.get(key) == entry.get(key):
            entries[index] = entry
            return
    entries.append(entry)


def safe_id(stem: str) -> str:
    """A file-name stem made safe as an entry id (``my photo!`` → ``my_photo``; empty → ``photo``)."""
    cleaned = re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "photo"
    return cleaned[:100]


def taken_ids(entries: list[Any], folder: Path) -> set[str]:
    """Ids a new entry must not get: those of ``entries`` and the stems of the PNGs already in ``folder``
    (a file there that no entry records is never overwritten)."""
    taken = {str(e.get("id")) for e in entries}
    if folder.is_dir():
        taken |= {p.stem for p in folder.glob("*.png")}
    return taken


def unique_id(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, … — the first not in ``taken`` (which it is then added to).

    The one id allocator of the project's aligned images (``align``, ``train --refs``, ``edit``,
    ``edit --aligned``); build ``taken`` with :func:`taken_ids`.
    """
    candidate, number = base, 2
    while candidate in taken:
        candidate = f"{base}_{number}"
        number += 1
    taken.add(candidate)
    return candidate


def allocate_id(stem: str, entries: list[Any], folder: Path) -> str:
    """A new id for an image named ``stem``: free among ``entries`` and the PNGs in ``folder``."""
    return unique_id(safe_id(stem), taken_ids(entries, folder))


def reuse_or_allocate_id(old_id: Any, base: str, taken: set[str]) -> str:
    """The face's previous id when it is still free and of this call's naming (``base`` or ``base_N``: a plain
    align after ``--all-faces``, or the reverse, renames), else a new one from ``base``; either is added to
    ``taken``."""
    if old_id and old_id not in taken and re.fullmatch(re.escape(base) + r"(_\d+)?", str(old_id)):
        taken.add(old_id)
        return old_id
    return unique_id(base, taken)


# ---- a new manifest, the project's settings ----------------------------------------------------------------
def now_iso() -> str:
    """The current UTC time as an ISO-8601 string with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def empty_manifest() -> dict[str, Any]:
    """A new manifest's JSON object with every section present and empty."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "config": {},
        "references": [],
        "inputs": [],
        "regularisation": {"folder": None, "images": []},
        "runs": [],
        "edits": [],
    }


def config(project: Project, key: str, default: Any = None) -> Any:
    """A project setting (``config`` section), e.g. ``base_model`` or ``dex_weights``; ``default`` when unset."""
    return load(project).config.get(key, default)


def set_config(project: Project, **values: Any) -> None:
    """Set project settings (``config`` section); a value of None leaves that setting as it is."""
    with update(project) as manifest:
        for key, value in values.items():
            if value is not None:
                setattr(manifest.config, key, value)


def configured_dex_weights(project: Project | None) -> tuple[str, str | None] | None:
    """The DEX weights path the project remembers (``config.dex_weights``, set by ``label-ages --dex-weights``) and
    where it is written, as the age engine takes it (``ages.engine.dex.find_dex_weights``); None without a project."""
    if project is None or not project.exists():
        return None
    return f"the project's config ({project.manifest_path})", config(project, "dex_weights")


# ---- reading and writing through a Project ------------------------------------------------------------------
def load(project: Project) -> Manifest:
    """The project's manifest, typed (checked as :meth:`Project.read` checks it)."""
    return Manifest.from_dict(project.read(), project.manifest_path)


@contextlib.contextmanager
def update(project: Project) -> Iterator[Manifest]:
    """:meth:`Project.update` (locked, atomic, only if the block succeeds) on the typed manifest."""
    with project.update() as raw:
        typed = Manifest.from_dict(raw, project.manifest_path)
        yield typed
        new = typed.to_dict()
        if new != raw:
            raw.clear()
            raw.update(new)
