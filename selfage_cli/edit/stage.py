"""The ``selfage edit`` stage: inputs → source age → (cached) inversion → all ages in one pass → files + manifest.

Per input photo: the aligned image at the model's native resolution; the source age (``--source-age``,
else the age recorded for that input, else the DEX estimate, rounded unless ``--no-round-source-age``);
the prompts; the inversion (from the cache when the same photo, model, LoRA and inversion settings were
inverted before); prompt-to-prompt editing to every target age; ``edits/<id>/<age>.png`` plus the
optional strip and GIF; one Edit entry per photo in the manifest, merged with the earlier calls'
(``merge_edit_entry``). Outputs that exist are never overwritten without ``--force``, and that is
checked before any expensive work. Under ``accelerate launch`` (``WORLD_SIZE`` > 1) the photos are
split across the processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selfage_cli import console
from selfage_cli.edit import inputs as input_photos
from selfage_cli.edit.cache import InversionCache, InversionKey
from selfage_cli.edit.config import EditConfig
from selfage_cli.edit.lora import ResolvedLora, check_base_model, load_lora, resolve_lora
from selfage_cli.edit.outputs import EditOutputs, existing_outputs, plan_outputs, write_outputs
from selfage_cli.errors import SelfageError, is_out_of_memory
from selfage_cli.project import Project, find, now_iso, sha256_file, upsert
from selfage_cli.summary import StageSummary


def edit_project(
    project: Project,
    config: EditConfig,
    *,
    images: list[Path],
    base_model: str,
    lora: Path | None,
    no_lora: bool,
    aligned: bool,
    dex_weights: Path | None,
    force: bool,
    device: str,
    dtype: str,
) -> StageSummary:
    """Edit ``images`` (default: every registered input) to ``config.ages``; see the module doc."""
    from selfage_cli.models import dtype_name, load_pipeline, model_fingerprint, native_resolution, resolve_dtype

    summary = StageSummary("edit")
    config.validate()
    chosen_lora = resolve_lora(project, lora, no_lora)
    for message in chosen_lora.warnings if chosen_lora else []:
        console.warn(message)
    files, missing = input_photos.expand_images(list(images))
    for item, reason in missing:
        summary.fail(item, reason)
    if images and not files:
        return summary
    _check_source_age_available(project, config, files, dex_weights)

    state = _distributed_state(device)
    torch_device = state.device if state is not None else _device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    console.info(f"loading {base_model} on {torch_device} ({dtype_name(torch_dtype)})")
    pipe = load_pipeline(base_model, device=torch_device, dtype=torch_dtype)
    if chosen_lora is not None:
        check_base_model(chosen_lora, base_model, pipe)
        load_lora(pipe, chosen_lora)
    resolution = native_resolution(pipe)

    photos = _register_inputs(project, files, aligned=aligned, resolution=resolution, summary=summary, state=state)
    photos = _split_for_process(photos, state)

    context = _EditContext(
        project=project,
        config=config,
        pipe=pipe,
        lora=chosen_lora,
        base_model=base_model,
        base_fingerprint=f"{model_fingerprint(base_model)}:{_pipeline_fingerprint(pipe)}",
        dtype=dtype_name(torch_dtype),
        resolution=resolution,
        dex_weights=dex_weights,
        device=torch_device,
    )
    counts = {"computed": 0, "cached": 0}
    with console.progress() as bar:
        overall = console.new_task(bar, "photos", total=len(photos))
        for photo in photos:
            outputs = plan_outputs(project, photo.id, config.ages, side_by_side=config.side_by_side, gif=config.gif)
            clash = existing_outputs(outputs)
            if clash and not force:
                more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
                summary.fail(
                    photo.id,
                    f"{project.relative(clash[0])}{more} already exists; pass --force to overwrite "
                    "it, or choose other --ages",
                )
                bar.update(overall, advance=1)
                continue
            try:
                record = _edit_one(context, photo, outputs, bar)
            except SelfageError:
                raise
            except Exception as exc:  # noqa: BLE001 - one photo failing must not stop the others
                if is_out_of_memory(exc):
                    raise SelfageError(_oom_message(config, photo.id)) from exc
                summary.fail(photo.id, f"editing failed ({type(exc).__name__}: {str(exc)[:200]}); please report it")
                bar.update(overall, advance=1)
                continue
            counts["cached" if record["inversion"]["cached"] else "computed"] += 1
            summary.done.append(record)
            summary.lines.append(_report_line(record))
            bar.update(overall, advance=1)
    summary.data.update(
        {
            "inversions_computed": counts["computed"],
            "inversions_cached": counts["cached"],
            "lora": str(chosen_lora.path) if chosen_lora else None,
            "base_model": base_model,
            "resolution": resolution,
        }
    )
    return summary


# ---- one photo ---------------------------------------------------------------------------------------
class _EditContext:
    """What every photo of one call shares: options, pipeline, LoRA, cache, lazily loaded DEX."""

    def __init__(
        self,
        *,
        project: Project,
        config: EditConfig,
        pipe: Any,
        lora: ResolvedLora | None,
        base_model: str,
        base_fingerprint: str,
        dtype: str,
        resolution: int,
        dex_weights: Path | None,
        device: Any,
    ):
        self.project = project
        self.config = config
        self.pipe = pipe
        self.lora = lora
        self.base_model = base_model
        self.base_fingerprint = base_fingerprint
        self.dtype = dtype
        self.resolution = resolution
        self.dex_weights = dex_weights
        self.device = device
        self.cache = InversionCache(project)
        self._dex: Any = None

    @property
    def identifier(self) -> str | None:
        return self.lora.identifier if self.lora is not None else None

    def dex(self) -> Any:
        if self._dex is None:
            from selfage_cli.ages.dex import load_dex, resolve_dex_weights

            path = resolve_dex_weights(self.dex_weights, self.project)
            self._dex = load_dex(path, self.device)
        return self._dex


def _edit_one(ctx: _EditContext, photo: input_photos.InputPhoto, outputs: EditOutputs, bar: Any) -> dict[str, Any]:
    import torch

    from selfage_cli.edit import engine
    from selfage_cli.edit.prompts import build_prompts

    config, project = ctx.config, ctx.project
    image = input_photos.load_for_model(project, photo, ctx.resolution)
    source_age, age_source = _source_age(ctx, photo)
    prompt_age = config.prompt_age(source_age)
    prompts = build_prompts(prompt_age, config.ages, config.gender, ctx.identifier)
    key = InversionKey(
        image_sha256=sha256_file(project.path(photo.aligned)),
        base_model=ctx.base_fingerprint,
        lora_sha256=ctx.lora.sha256 if ctx.lora is not None else "none",
        prompt=prompts.source,
        guidance=config.guidance,
        steps=config.ddim_steps,
        mode=config.inversion,
        inner_steps=config.inner_steps,
        dtype=ctx.dtype,
        resolution=ctx.resolution,
    )
    task = console.new_task(bar, f"{photo.id}: inverting", total=config.ddim_steps)

    def advance(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    torch.manual_seed(config.seed)
    inversion = ctx.cache.load(key)
    cached = inversion is not None
    if inversion is None:
        inversion = engine.invert(
            ctx.pipe,
            image,
            prompts.source,
            mode=config.inversion,
            steps=config.ddim_steps,
            guidance=config.guidance,
            inner_steps=config.inner_steps,
            progress=advance,
        )
        ctx.cache.save(key, inversion)
    bar.update(task, description=f"{photo.id}: editing {len(config.ages)} ages", completed=0)
    result = engine.edit_ages(
        ctx.pipe,
        inversion,
        prompts,
        settings=config.p2p_settings(),
        max_batch=config.max_batch,
        guidance=config.guidance,
        progress=advance,
    )
    bar.remove_task(task)
    if len(result.images) != 1 + len(config.ages):
        raise RuntimeError(f"the engine returned {len(result.images)} images for {len(config.ages)} ages")
    edited = dict(zip(config.ages, result.images[1:], strict=True))
    write_outputs(outputs, image, prompt_age, edited, tile=ctx.resolution)

    entry: dict[str, Any] = {
        "id": photo.id,
        "input": photo.aligned,
        "source_age": prompt_age,
        "source_age_source": age_source,
        "target_ages": list(config.ages),
        "outputs": {str(age): project.relative(path) for age, path in outputs.ages.items()},
        "strip": project.relative(outputs.strip) if outputs.strip else None,
        "gif": project.relative(outputs.gif) if outputs.gif else None,
        "inversion_cache": ctx.cache.relative(key),
        "lora": None,
        **(ctx.lora.manifest_fields(project) if ctx.lora is not None else {}),
        "base_model": ctx.base_model,
        "prompts": {"source": prompts.source, "targets": list(prompts.targets)},
        "settings": {**config.to_json(), "dtype": ctx.dtype, "resolution": ctx.resolution},
        "inversion": {
            "cached": cached,
            "mode": inversion.mode,
            "seconds": round(float(inversion.seconds), 3),
            "inner_steps_run": int(sum(inversion.inner_steps_run or [])),
        },
        "edit_seconds": round(float(result.seconds), 3),
        "unet_calls": int(result.unet_calls),
        "created": now_iso(),
    }
    with project.update() as manifest:
        edits = manifest.setdefault("edits", [])
        entry = merge_edit_entry(find(edits, photo.id), entry)
        upsert(edits, entry)
    return entry


# Provenance of one call's outputs, kept in ``history`` for the ages a later call did not redo.
_PROVENANCE_KEYS = (
    "source_age",
    "source_age_source",
    "lora",
    "lora_source",
    "lora_sha256",
    "lora_run",
    "base_model",
    "settings",
    "inversion_cache",
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
    return {**latest, "target_ages": ages, "outputs": {str(a): outputs[str(a)] for a in ages}, "history": kept}


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


def _source_age(ctx: _EditContext, photo: input_photos.InputPhoto) -> tuple[float | int, str]:
    """(age, where it came from): --source-age, the age recorded for the input, else DEX (recorded)."""
    config = ctx.config
    if config.source_age is not None:
        return config.source_age, "option"
    entry = find(ctx.project.read().get("inputs", []), photo.id) or photo.entry
    candidates = entry.get("age_candidates") or {}
    if entry.get("age") is not None:
        if entry.get("age_source") == "dex" and isinstance(candidates.get("dex"), int | float):
            return float(candidates["dex"]), "dex"
        return entry["age"], str(entry.get("age_source") or "manifest")
    from selfage_cli.ages.dex import estimate_ages

    image = _open_rgb(ctx.project.path(photo.aligned))
    estimate = float(estimate_ages(ctx.dex(), [image], preprocess="antialias", progress=False)[0])
    console.info(f"{photo.id}: DEX estimates age {estimate:.1f}")
    with ctx.project.update() as manifest:
        stored = find(manifest.get("inputs", []), photo.id)
        if stored is not None:
            stored["age"] = int(round(estimate))
            stored["age_source"] = "dex"
            stored["age_candidates"] = {**(stored.get("age_candidates") or {}), "dex": round(estimate, 3)}
    return estimate, "dex"


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


# ---- inputs, ages, processes ---------------------------------------------------------------------------
def _check_source_age_available(
    project: Project, config: EditConfig, files: list[Path], dex_weights: Path | None
) -> None:
    """Exit 2 early when a photo would need DEX but neither DEX weights nor --source-age are given."""
    if config.source_age is not None:
        return
    from selfage_cli.ages.dex import find_dex_weights

    if find_dex_weights(dex_weights, project) is not None:
        return
    if files:
        unlabelled = []
        for file in files:
            try:
                entry = input_photos.find_input_by_sha(project, sha256_file(file))
            except OSError:
                continue  # reported later as unreadable
            if entry is None or entry.get("age") is None:
                unlabelled.append(file.name)
    else:
        entries = [e for e in project.read().get("inputs", []) if e.get("aligned")]
        unlabelled = [str(e.get("id")) for e in entries if e.get("age") is None]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else "")
        raise SelfageError(
            f"no source age for {shown}: pass --source-age N (the age in the photo), or give the DEX age classifier "
            "with --dex-weights PATH (or SELFAGE_DEX_WEIGHTS; dex_age_classifier.pth from the SAM project, "
            "yuval-alaluf/SAM) so that it estimates the age."
        )


def _register_inputs(
    project: Project, files: list[Path], *, aligned: bool, resolution: int, summary: StageSummary, state: Any
) -> list[input_photos.InputPhoto]:
    """Register the given photos (align or copy), or take every registered input when none are given.

    Under ``accelerate launch`` the main process registers first; the others then find everything
    registered (same sha256) and write nothing.
    """

    def register(target: StageSummary) -> list[input_photos.InputPhoto]:
        if not files:
            return input_photos.all_inputs(project)
        if aligned:
            return input_photos.register_aligned(project, files, resolution, target)
        return input_photos.register_raw(project, files, resolution, target)

    if state is None:
        photos = register(summary)
    else:
        with state.main_process_first():
            photos = register(summary if state.is_main_process else StageSummary("edit"))
    unique: dict[str, input_photos.InputPhoto] = {}
    for photo in photos:
        unique.setdefault(photo.id, photo)
    return list(unique.values())


def _distributed_state(device: str) -> Any:
    """accelerate's PartialState under ``accelerate launch``/``torchrun`` with several processes, else None.

    Each process then uses its own GPU (``state.device``); without CUDA (or with ``--device cpu``) the
    processes share the CPU (gloo), which only makes sense for testing.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def _split_for_process(photos: list[Any], state: Any) -> list[Any]:
    """This process's share of the photos (all of them without ``accelerate launch``)."""
    if state is None or state.num_processes <= 1:
        return photos
    with state.split_between_processes(photos) as mine:
        return list(mine)


def _device(device: str) -> Any:
    from selfage_cli.models import resolve_device

    return resolve_device(device)


def _pipeline_fingerprint(pipe: Any) -> str:
    from selfage_cli.models import pipeline_fingerprint

    return pipeline_fingerprint(pipe)


def _oom_message(config: EditConfig, item: str) -> str:
    current = config.max_batch or len(config.ages)
    suggestion = max(1, current // 2)
    return (
        f"{item}: out of GPU memory while editing {current} ages in one pass; pass --max-batch {suggestion} "
        f"(fewer ages per pass, same result){' or --dtype fp16' if config.max_batch == 1 else ''}."
    )


def _report_line(record: dict[str, Any]) -> str:
    ages = ", ".join(str(a) for a in record["settings"]["ages"])
    folder = str(Path(next(iter(record["outputs"].values()))).parent)
    inv = record["inversion"]
    how = "cached inversion" if inv["cached"] else f"inverted in {inv['seconds']:.1f} s"
    extras = "".join(f", {k} {record[k]}" for k in ("strip", "gif") if record.get(k))
    return (
        f"{record['id']}: age {record['source_age']:g} ({record['source_age_source']}) → {ages}: "
        f"{folder}/ ({how}, edited in {record['edit_seconds']:.1f} s{extras})"
    )
