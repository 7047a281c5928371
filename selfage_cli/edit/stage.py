"""The ``selfage edit`` stage: inputs → source age → (cached) inversion → all ages in one pass → files + manifest.

Per input photo: the aligned image at the model's native resolution; the source age (``--source-age``,
else the age recorded for that input, else the ``--age-estimator``'s estimate, rounded unless
``--no-round-source-age``; the gender word from ``--gender`` or the builtin estimate, :mod:`~selfage_cli.edit.source`);
the prompts; the inversion (from the cache when the same photo, model, LoRA and inversion settings were
inverted before); prompt-to-prompt editing to every target age; ``edits/<id>/<age>.png`` plus the
optional strip and GIF; one Edit entry per photo in the manifest, merged with the earlier calls'
(:mod:`~selfage_cli.edit.record`). Outputs that exist are never overwritten without ``--force``, and that is
checked before any expensive work. Under ``accelerate launch`` (``WORLD_SIZE`` > 1) the photos are
split across the processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from selfage_cli import console
from selfage_cli.edit import inputs as input_photos
from selfage_cli.edit import paste_back
from selfage_cli.edit.cache import InversionCache, InversionKey
from selfage_cli.edit.config import EditConfig
from selfage_cli.edit.engine.precision import apply_precision, resolve_edit_precision
from selfage_cli.edit.lora import ResolvedLora, check_base_model, load_lora, resolve_lora
from selfage_cli.edit.outputs import EditOutputs, existing_outputs, outputs_held, plan_outputs, write_outputs
from selfage_cli.edit.progress import PhasedTask
from selfage_cli.edit.record import record_edit
from selfage_cli.errors import SelfageError, environment_error, is_out_of_memory
from selfage_cli.manifest import Edit
from selfage_cli.processes import (
    decided_by_main,
    gathered,
    is_main,
    main_first,
    process_state,
    share,
    speak_only_from_main,
)
from selfage_cli.project import Project, now_iso, sha256_file
from selfage_cli.summary import StageSummary


def run_edit(
    project: Project,
    config: EditConfig,
    *,
    images: list[Path],
    base_model: str | None,
    lora: Path | None,
    no_lora: bool,
    aligned: bool,
    dex_weights: Path | None,
    force: bool,
    device: str,
    dtype: str,
) -> StageSummary | None:
    """Edit ``images`` (default: every registered input) to ``config.ages``; see the module doc.

    Under ``accelerate launch`` the main process checks the call and registers the photos, each
    process edits its share, and the main process returns the summary of all (the others ``None``).
    """
    state = process_state(device)
    speak_only_from_main(state)
    summary = StageSummary("edit")
    config = replace(config)  # checked again (EditConfig.__post_init__): a caller may have changed a field
    paste_back.check_call(aligned, config.paste_back)
    call = _EditCall(images, base_model, lora, no_lora, dex_weights)
    chosen_lora, base_model, files = decided_by_main(state, lambda: _check_call(project, config, call, summary))
    if images and not files:
        return summary if is_main(state) else None
    ctx = _load_context(project, config, base_model, chosen_lora, dex_weights, device=device, dtype=dtype, state=state)
    photos = _register_inputs(project, files, aligned=aligned, resolution=ctx.resolution, summary=summary, state=state)
    _edit_photos(ctx, share(photos, state), force, summary)
    summary = gathered(summary, state)
    if summary is not None:
        summary.data.update(_call_data(ctx, summary.done))
        if summary.done:  # the project's first model stage records its model, once it has made something
            from selfage_cli.base_model import remember_base_model

            remember_base_model(project, ctx.base_model)
    return summary


@dataclass(frozen=True)
class _EditCall:
    """What a call asks for besides its :class:`EditConfig`, as :func:`run_edit` received it."""

    images: list[Path]
    base_model: str | None
    lora: Path | None
    no_lora: bool
    dex_weights: Path | None


def _check_call(
    project: Project, config: EditConfig, call: _EditCall, summary: StageSummary
) -> tuple[ResolvedLora | None, str, list[Path]]:
    """The LoRA, the base model and the photo files of the call (missing ones fail in ``summary``);
    exit 2 before any model loads when a photo would have no source age."""
    chosen_lora = _choose_lora(project, call.lora, call.no_lora)
    base_model = call.base_model or _base_model_for(project, chosen_lora)
    files = _expand_images(call.images, summary)
    if not call.images or files:
        _check_source_age_available(project, config, files, call.dex_weights)
    return chosen_lora, base_model, files


# ---- the call ----------------------------------------------------------------------------------------
@dataclass
class _EditContext:
    """What every photo of one call shares: options, pipeline, LoRA, cache, lazily loaded age estimators."""

    project: Project
    config: EditConfig
    pipe: Any
    lora: ResolvedLora | None
    base_model: str
    base_fingerprint: str
    dtype: str
    resolution: int
    dex_weights: Path | None
    device: Any
    lora_applied: str = "none"  # how the LoRA is applied (edit/engine/precision.py): fused-fp32, branch-bf16, …
    cache: InversionCache = field(init=False)
    facts: Any = field(default=None, init=False)  # source age and gender when not given (edit/source.py)

    def __post_init__(self) -> None:
        self.cache = InversionCache(self.project)
        from selfage_cli.edit.source import SourceFacts

        self.facts = SourceFacts(self.project, self.config, self.dex_weights, self.device)


def _choose_lora(project: Project, lora: Path | None, no_lora: bool) -> ResolvedLora | None:
    """The LoRA to edit with (--lora, else the project's latest run, unless --no-lora); shows its warnings."""
    chosen = resolve_lora(project, lora, no_lora)
    for message in chosen.warnings if chosen else []:
        console.warn(message)
    return chosen


def _base_model_for(project: Project, lora: ResolvedLora | None) -> str:
    """Without --base-model: the model the LoRA was trained on (its JSON or run record), else the
    project's recorded base model, else SD 1.5."""
    from selfage_cli.base_model import choose_base_model
    from selfage_cli.models import model_reference

    trained_on = (lora.meta or {}).get("base_model") if lora is not None else None
    if trained_on and Path(str(trained_on)).is_absolute() and not Path(str(trained_on)).is_dir():
        raise SelfageError(
            f"{lora.path}: the base model it was trained on, {trained_on}, is no longer there (moved or deleted); "
            "pass --base-model with the model's folder (or Hub id)."
        )
    if trained_on:
        console.info(f"base model: {trained_on}, the one the LoRA was trained on (--base-model to choose another)")
        return model_reference(str(trained_on))
    return choose_base_model(project, None)


def _expand_images(images: list[Path], summary: StageSummary) -> list[Path]:
    """The photo files that the given paths name (folders expanded); the missing ones fail in ``summary``."""
    files, missing = input_photos.expand_images(list(images))
    for item, reason in missing:
        summary.fail(item, reason)
    return files


def _load_context(
    project: Project,
    config: EditConfig,
    base_model: str,
    lora: ResolvedLora | None,
    dex_weights: Path | None,
    *,
    device: str,
    dtype: str,
    state: Any,
) -> _EditContext:
    """Load the base model (and the LoRA, checked against it) on this process's device."""
    from selfage_cli.models import (
        load_pipeline,
        model_fingerprint,
        native_resolution,
        pipeline_fingerprint,
        resolve_device,
    )

    torch_device = state.device if state is not None else resolve_device(device)
    precision = resolve_edit_precision(dtype, torch_device)
    console.info(f"loading {base_model} on {torch_device} ({precision.name})")
    pipe = load_pipeline(base_model, device=torch_device, dtype=precision.load_dtype(lora is not None))
    if lora is not None:
        check_base_model(lora, base_model)
        load_lora(pipe, lora)
    lora_applied = apply_precision(pipe, precision, with_lora=lora is not None)
    return _EditContext(
        project=project,
        config=config,
        pipe=pipe,
        lora=lora,
        base_model=base_model,
        base_fingerprint=f"{model_fingerprint(base_model)}:{pipeline_fingerprint(pipe)}",
        dtype=precision.name,
        resolution=native_resolution(pipe),
        dex_weights=dex_weights,
        device=torch_device,
        lora_applied=lora_applied,
    )


def _edit_photos(ctx: _EditContext, photos: list[input_photos.InputPhoto], force: bool, summary: StageSummary) -> None:
    """Edit each photo in turn (with a progress bar), recording each result or failure in ``summary``."""
    with outputs_held(ctx.project, [photo.id for photo in photos]), console.progress() as bar:
        overall = console.new_task(bar, "photos", total=len(photos))
        for photo in photos:
            record = _edit_or_fail(ctx, photo, force, summary, bar)
            if record is not None:
                summary.done.append(record)
                summary.lines.append(_report_line(record))
            bar.update(overall, advance=1)


def _edit_or_fail(
    ctx: _EditContext, photo: input_photos.InputPhoto, force: bool, summary: StageSummary, bar: Any
) -> dict[str, Any] | None:
    """Edit one photo; None when it failed (recorded in ``summary``). Out of memory stops the call (exit 2)."""
    outputs = plan_outputs(
        ctx.project, photo.id, ctx.config.ages, side_by_side=ctx.config.side_by_side, gif=ctx.config.gif
    )
    pasting = (
        paste_back.plan_for_edit(ctx.project, photo.entry, ctx.config, photo.given) if ctx.config.paste_back else None
    )
    if isinstance(pasting, str):
        summary.fail(photo.id, pasting)
        return None
    clash = existing_outputs(outputs) + (pasting.outputs.existing() if pasting is not None else [])
    if clash and not force:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        summary.fail(
            photo.id,
            f"{ctx.project.relative(clash[0])}{more} already exists; pass --force to overwrite "
            "it, or choose other --ages",
        )
        return None
    try:
        return _edit_one(ctx, photo, outputs, bar, pasting)
    except input_photos.MissingAlignedError as exc:  # this photo fails, the others go on
        summary.fail(photo.id, str(exc))
        return None
    except SelfageError:
        raise
    except Exception as exc:  # noqa: BLE001 - one photo failing must not stop the others
        if environment_error(exc) is not None:  # a full or read-only disk stops the call (exit 2, one sentence)
            raise
        if is_out_of_memory(exc):
            raise SelfageError(_oom_message(ctx.config, photo.id)) from exc
        summary.fail(photo.id, f"editing failed ({type(exc).__name__}: {str(exc)[:200]}); please report it")
        return None


def _call_data(ctx: _EditContext, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The call's extra JSON keys: inversions computed/cached, LoRA, base model, resolution."""
    cached = sum(1 for record in records if record["inversion"]["cached"])
    return {
        "inversions_computed": len(records) - cached,
        "inversions_cached": cached,
        "lora": str(ctx.lora.path) if ctx.lora else None,
        "base_model": ctx.base_model,
        "resolution": ctx.resolution,
    }


# ---- one photo ---------------------------------------------------------------------------------------
def _edit_one(
    ctx: _EditContext,
    photo: input_photos.InputPhoto,
    outputs: EditOutputs,
    bar: Any,
    pasting: paste_back.PastePlan | None = None,
) -> dict[str, Any]:
    """Invert one photo (or reuse its cached inversion), edit it to every age, write the files, record it."""
    from selfage_cli.edit.prompts import build_prompts

    config = ctx.config
    image = input_photos.load_for_model(ctx.project, photo, ctx.resolution)
    source_age, age_source = _source_age(ctx, photo)
    prompt_age = config.prompt_age(source_age)
    gender, gender_source, gender_confidence = ctx.facts.gender(photo)
    prompts = build_prompts(prompt_age, config.ages, gender, ctx.lora.identifier if ctx.lora is not None else None)
    key = _inversion_key(ctx, photo, prompts.source)
    phases = PhasedTask(bar, photo.id)  # each phase's ETA from its own measured step time
    inversion, cached = _invert(ctx, key, image, phases.inversion(config.ddim_steps))
    phases.start(f"editing {len(config.ages)} ages", None)
    result = _edit_ages(ctx, inversion, prompts, phases.update)
    phases.remove()
    edited = dict(zip(config.ages, result.images[1:], strict=True))
    write_outputs(outputs, image, prompt_age, edited, tile=ctx.resolution)
    entry = _edit_entry(ctx, photo, outputs, (prompt_age, age_source), prompts, key, inversion, cached, result)
    if pasting is not None:
        full = paste_back.write_full_outputs(ctx.project, pasting.source, pasting.outputs, edited, prompt_age)
        for key, value in full.items():  # full_outputs, strip_full, gif_full
            setattr(entry, key, value)
    entry.reconstruction = _reconstruction(photo.id, image, result.images[0], inversion.mode)
    entry.gender, entry.gender_source, entry.gender_confidence = gender, gender_source, gender_confidence
    return record_edit(ctx.project, entry)


def _reconstruction(photo_id: str, image: Any, rebuilt: Any, mode: str) -> dict[str, Any]:
    """The source branch's picture scored against the aligned input (edit/engine/reconstruction.py); warns
    when the inversion did not hold."""
    from selfage_cli.edit.engine.reconstruction import reconstruction_warning, score_reconstruction

    scores = score_reconstruction(image, rebuilt)
    message = reconstruction_warning(photo_id, scores, mode)
    if message:
        console.warn(message)
    return scores


def _inversion_key(ctx: _EditContext, photo: input_photos.InputPhoto, source_prompt: str) -> InversionKey:
    """What the photo's inversion depends on (its cache key)."""
    config = ctx.config
    return InversionKey(
        image_sha256=sha256_file(ctx.project.path(photo.aligned)),
        base_model=ctx.base_fingerprint,
        lora_sha256=ctx.lora.sha256 if ctx.lora is not None else "none",
        prompt=source_prompt,
        guidance=config.guidance,
        steps=config.ddim_steps,
        mode=config.inversion,
        inner_steps=config.inner_steps,
        dtype=ctx.dtype,
        resolution=ctx.resolution,
    )


def _invert(ctx: _EditContext, key: InversionKey, image: Any, progress: Any) -> tuple[Any, bool]:
    """(inversion, whether it came from the cache): the cached one, else computed now and cached."""
    import torch

    from selfage_cli.edit import engine

    config = ctx.config
    torch.manual_seed(config.seed)
    inversion = ctx.cache.load(key)
    if inversion is not None:
        return inversion, True
    inversion = engine.invert(
        ctx.pipe,
        image,
        key.prompt,
        mode=config.inversion,
        steps=config.ddim_steps,
        guidance=config.guidance,
        inner_steps=config.inner_steps,
        progress=progress,
        compile_unet=config.compile,
        cuda_graph=config.cuda_graph,
    )
    ctx.cache.save(key, inversion)
    return inversion, False


def _edit_ages(ctx: _EditContext, inversion: Any, prompts: Any, progress: Any) -> Any:
    """Edit the inversion to every target age in one pass (checking that each age got an image)."""
    from selfage_cli.edit import engine

    config = ctx.config
    result = engine.edit_ages(
        ctx.pipe,
        inversion,
        prompts,
        settings=config.p2p_settings(),
        max_batch=config.max_batch,
        guidance=config.guidance,
        progress=progress,
    )
    if len(result.images) != 1 + len(config.ages):
        raise RuntimeError(f"the engine returned {len(result.images)} images for {len(config.ages)} ages")
    return result


def _edit_entry(
    ctx: _EditContext,
    photo: input_photos.InputPhoto,
    outputs: EditOutputs,
    source: tuple[float | int, str],
    prompts: Any,
    key: InversionKey,
    inversion: Any,
    cached: bool,
    result: Any,
) -> Edit:
    """This call's Edit entry for the photo (docs/manifest.md, "Edit"), before merging with earlier calls."""
    project, config = ctx.project, ctx.config
    prompt_age, age_source = source
    return Edit(
        id=photo.id,
        input=photo.aligned,
        source_age=prompt_age,
        source_age_source=age_source,
        target_ages=list(config.ages),
        outputs={str(age): project.relative(path) for age, path in outputs.ages.items()},
        strip=project.relative(outputs.strip) if outputs.strip else None,
        gif=project.relative(outputs.gif) if outputs.gif else None,
        inversion_cache=ctx.cache.relative(key),
        **{"lora": None, **(ctx.lora.manifest_fields(project) if ctx.lora is not None else {})},
        base_model=ctx.base_model,
        lora_applied=ctx.lora_applied,
        prompts={"source": prompts.source, "targets": list(prompts.targets)},
        settings={**config.to_json(), "dtype": ctx.dtype, "resolution": ctx.resolution},
        inversion={
            "cached": cached,
            "mode": inversion.mode,
            "seconds": round(float(inversion.seconds), 3),
            "inner_steps_run": inversion.total_inner_steps,
            "unet_runner": inversion.unet_runner,
        },
        edit_seconds=round(float(result.seconds), 3),
        unet_calls=int(result.unet_calls),
        created=now_iso(),
    )


def _source_age(ctx: _EditContext, photo: input_photos.InputPhoto) -> tuple[float | int, str]:
    """(age, where it came from): --source-age, the age recorded for the input, else the estimator (recorded)."""
    return ctx.facts.source_age(photo)


# ---- inputs, ages, processes ---------------------------------------------------------------------------
def _check_source_age_available(
    project: Project, config: EditConfig, files: list[Path], dex_weights: Path | None
) -> None:
    """Exit 2 early when a photo would need an estimate but no estimator can run and --source-age is not given."""
    if config.source_age is not None:
        return
    from selfage_cli.ages.engine.builtin import available

    if config.age_estimator != "dex" and available()[0]:
        return  # the builtin estimator needs no download
    from selfage_cli.ages.engine.dex import find_dex_weights
    from selfage_cli.manifest import configured_dex_weights

    if find_dex_weights(dex_weights, configured_dex_weights(project)) is not None:
        return
    if files:
        unlabelled = []
        for file in files:
            try:
                entry = input_photos.find_input_by_sha(project, sha256_file(file))
            except OSError:
                continue  # reported later as unreadable
            if entry is None or entry.age is None:
                unlabelled.append(file.name)
    else:
        from selfage_cli.manifest import load

        unlabelled = [e.id for e in load(project).inputs if e.aligned and e.age is None]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else "")
        raise SelfageError(
            f"no source age for {shown}: pass --source-age N (the age in the photo), or give the DEX age classifier "
            "with --dex-weights PATH (or SELFAGE_DEX_WEIGHTS; dex_age_classifier.pth from the SAM project, "
            "yuval-alaluf/SAM) so that it estimates the age, or use --age-estimator builtin (no download)."
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

    with main_first(state):
        photos = register(summary if is_main(state) else StageSummary("edit"))
    unique: dict[str, input_photos.InputPhoto] = {}
    for photo in photos:
        unique.setdefault(photo.id, photo)
    return list(unique.values())


def _oom_message(config: EditConfig, item: str) -> str:
    """The exit-2 message for running out of GPU memory, suggesting a smaller --max-batch."""
    current = config.max_batch or len(config.ages)
    if current <= 1:  # nothing smaller to suggest; half precision fits but loses most of the LoRA's effect
        return (
            f"{item}: out of GPU memory even with one age per pass; use a GPU with more memory, or pass "
            "--dtype bf16 knowing that half precision undoes most of the LoRA's effect (docs/benchmarks.md)."
        )
    return (
        f"{item}: out of GPU memory while editing {current} ages in one pass; pass --max-batch "
        f"{max(1, current // 2)} (fewer ages per pass, same result)."
    )


def _report_line(record: dict[str, Any]) -> str:
    """The human report line for one edited photo."""
    ages = ", ".join(str(a) for a in record["settings"]["ages"])
    folder = str(Path(next(iter(record["outputs"].values()))).parent)
    inv = record["inversion"]
    how = "cached inversion" if inv["cached"] else f"inverted in {inv['seconds']:.1f} s"
    extras = "".join(f", {k} {record[k]}" for k in ("strip", "gif") if record.get(k))
    extras += paste_back.report_suffix(record)
    if record.get("reconstruction"):
        from selfage_cli.edit.engine.reconstruction import summary_text

        extras += f", {summary_text(record['reconstruction'])}"
    return (
        f"{record['id']}: age {record['source_age']:g} ({record['source_age_source']}) → {ages}: "
        f"{folder}/ ({how}, edited in {record['edit_seconds']:.1f} s{extras})"
    )
