"""The regularisation set: a user's folder of other people's faces, or one generated with the base model.

``selfage make-reg`` is the DreamBooth class-image approach: the base model itself draws
"photo of person as {age}-year-old" for integer ages spread evenly over ``--age-range``, at its
native resolution; each image is aligned like the references (FFHQ recipe) when a face is found,
and otherwise kept as generated (``aligned_ok: false``). Each is recorded with its prompted age
(``age_source: prompt``); with DEX weights available the estimate is recorded too and large
disagreements are reported. Images go to ``reg/generated/``; an existing set is only replaced with
``--force``.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from selfage_cli import console
from selfage_cli.ages.engine.regularisation import (
    REG_PROMPT,
    align_or_keep,
    generate_images,
    parse_age_range,
    spread_ages,
)
from selfage_cli.errors import SelfageError
from selfage_cli.manifest import Manifest, RegImage, Regularisation, configured_dex_weights
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project
from selfage_cli.summary import StageSummary

GENERATED_DIR = ("reg", "generated")
PARTIAL_NAME = ".generated.partial"  # the set being generated, in reg/ (moved into place when complete)
DEFAULT_ALIGNED_SIZE = 512
DEX_DISAGREEMENT_YEARS = 10.0


# ---- generating one -------------------------------------------------------------------------------------
def run_make_reg(
    project: Project,
    *,
    count: int = 200,
    age_range: str = "0-90",
    verify: bool = True,
    dex_weights: Path | None = None,
    batch_size: int = 4,
    steps: int = 50,
    seed: int = 0,
    force: bool = False,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> StageSummary:
    """Generate, align and record an age-labelled regularisation set; see the module doc."""
    from selfage_cli.base_model import choose_base_model, remember_base_model
    from selfage_cli.models import resolve_device

    low, high = _check_options(count, batch_size, steps, age_range)
    manifest = load_manifest(project)
    _refuse_existing_set(project, manifest, force)
    dex_model = _load_dex_model(project, verify, dex_weights)
    plan = _RegPlan(
        base_model=choose_base_model(project, base_model),
        low=low,
        high=high,
        ages=spread_ages(count, low, high),
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        aligned_size=_aligned_size(manifest),
    )
    torch_device = resolve_device(device)
    try:
        partial, records, images = _generate_set(project, plan, torch_device, dtype)
    except OSError:  # a full or read-only disk: nothing half-written stays behind
        with contextlib.suppress(SelfageError):  # (never through a link out of the project)
            shutil.rmtree(project.writable_path(Path("reg") / PARTIAL_NAME), ignore_errors=True)
        raise
    summary = StageSummary("make-reg")
    if dex_model is not None:
        _verify_with_dex(dex_model, images, records, torch_device, summary)
    final = _replace_generated_folder(project, partial)
    _record_set(project, plan, records, dex_weights)
    remember_base_model(project, plan.base_model)
    _report(summary, project, plan, final, records)
    return summary


@dataclass(frozen=True)
class _RegPlan:
    """The checked options of one ``make-reg`` run."""

    base_model: str  # the model actually used (and recorded)
    low: int
    high: int
    ages: list[int]  # one prompted age per image
    steps: int
    seed: int
    batch_size: int
    aligned_size: int


def _check_options(count: int, batch_size: int, steps: int, age_range: str) -> tuple[int, int]:
    """Validate the numeric options; return ``--age-range`` as (low, high)."""
    if count < 1:
        raise SelfageError(f"--count {count}: generate at least 1 image.")
    if batch_size < 1:
        raise SelfageError(f"--batch-size {batch_size}: must be at least 1.")
    if steps < 1:
        raise SelfageError(f"--steps {steps}: must be at least 1.")
    return parse_age_range(age_range)


def _refuse_existing_set(project: Project, manifest: Manifest, force: bool) -> None:
    """Without ``force``, refuse when the manifest records a set or ``reg/generated/`` holds files."""
    if force:
        return
    section = manifest.regularisation
    if section.images:
        what = "a generated set" if section.generated else f"the folder {section.folder}"
        raise SelfageError(
            f"{project.manifest_path} already records a regularisation set ({what}, {len(section.images)} "
            "images); pass --force to replace it."
        )
    folder = _generated_folder(project)
    if folder.is_dir() and any(folder.iterdir()):
        raise SelfageError(f"{folder} already holds files; pass --force to replace them.")


def _load_dex_model(project: Project, verify: bool, dex_weights: Path | None) -> Any | None:
    """The DEX model on the CPU when verifying and weights are found (checked before minutes of generation)."""
    from selfage_cli.ages.engine.dex import find_dex_weights, load_dex

    if not verify:
        return None
    dex_path = find_dex_weights(dex_weights, configured_dex_weights(project))
    if dex_path is None:
        console.info(
            "Not verifying ages with DEX: no weights (--dex-weights, $SELFAGE_DEX_WEIGHTS or the project's config)."
        )
        return None
    return load_dex(dex_path, "cpu")  # moved to the device when estimating


def _aligned_size(manifest: Manifest) -> int:
    """Align to the references' size (the training resolution), else 512."""
    for entry in manifest.references:
        if isinstance(entry.size, int) and entry.size > 0:
            return int(entry.size)
    return DEFAULT_ALIGNED_SIZE


def _generate_set(
    project: Project, plan: _RegPlan, device: Any, dtype: str
) -> tuple[Path, list[RegImage], list[Image.Image]]:
    """Load the base model; generate, align and save every image into a fresh partial folder.

    Returns (partial folder, RegImage records, saved images); the pipeline is released on return.
    """
    from selfage_cli.models import load_pipeline, native_resolution, resolve_dtype

    pipe = load_pipeline(plan.base_model, device, resolve_dtype(dtype, device))
    resolution = native_resolution(pipe)
    partial = _fresh_partial_folder(project)
    count = len(plan.ages)
    records: list[RegImage] = []
    saved: list[Image.Image] = []
    console.info(f"Generating {count} regularisation image(s) at {resolution}px, ages {plan.low}–{plan.high}.")
    with console.progress() as bar:
        task = console.new_task(bar, "make-reg", total=count)
        for start in range(0, count, plan.batch_size):
            batch_ages = plan.ages[start : start + plan.batch_size]
            seeds = [plan.seed + start + k for k in range(len(batch_ages))]
            images = generate_images(pipe, batch_ages, seeds, plan.steps, resolution, device)
            for offset, (age, image) in enumerate(zip(batch_ages, images, strict=True)):
                record, aligned = _align_and_save(image, start + offset, age, plan, partial)
                records.append(record)
                saved.append(aligned)
            bar.update(task, advance=len(batch_ages))
    return partial, records, saved


def _fresh_partial_folder(project: Project) -> Path:
    """An empty ``reg/.generated.partial/`` (a leftover from an interrupted run is removed)."""
    partial = project.subdir("reg") / PARTIAL_NAME
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _align_and_save(
    image: Image.Image, index: int, age: int, plan: _RegPlan, folder: Path
) -> tuple[RegImage, Image.Image]:
    """Align one generated image and save it into ``folder``; return its RegImage record and the saved image."""
    ident = f"{index:04d}_age{age}"
    aligned, ok, reason = align_or_keep(image, plan.aligned_size, f"generated image {ident}")
    aligned.save(folder / f"{ident}.png")
    record = RegImage(
        id=ident,
        source=None,
        aligned=f"{'/'.join(GENERATED_DIR)}/{ident}.png",
        age=age,
        age_source="prompt",
        aligned_ok=ok,
        prompt=REG_PROMPT.format(age=age),
        seed=plan.seed + index,
    )
    if not ok:
        record.align_failure = reason
    return record, aligned


def _generated_folder(project: Project) -> Path:
    """Where the generated set lives: ``reg/generated/``."""
    return project.writable_path(project.root.joinpath(*GENERATED_DIR))  # replaced: never through a link outside


def _replace_generated_folder(project: Project, partial: Path) -> Path:
    """Move the finished partial folder into place, replacing an existing set; return the final folder."""
    final = _generated_folder(project)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return final


def _record_set(project: Project, plan: _RegPlan, records: list[RegImage], dex_weights: Path | None) -> None:
    """Write the generated set (and ``--dex-weights``, when given) into the manifest."""
    with update_manifest(project) as manifest:
        manifest.regularisation = Regularisation(
            folder=None,
            generated=True,
            base_model=plan.base_model,
            prompt=REG_PROMPT,
            age_range=[plan.low, plan.high],
            steps=plan.steps,
            images=records,
        )
        if dex_weights is not None:
            manifest.config.dex_weights = str(Path(dex_weights).expanduser().resolve())


def _report(summary: StageSummary, project: Project, plan: _RegPlan, final: Path, records: list[RegImage]) -> None:
    """Fill the summary (done items, report line, data) and warn about images kept unaligned."""
    count = len(records)
    aligned_count = sum(1 for r in records if r.aligned_ok)
    unaligned = count - aligned_count
    summary.done.extend(
        {
            "id": r.id,
            "age": r.age,
            "aligned_ok": r.aligned_ok,
            "aligned": r.aligned,
            **({"dex_age": r.dex_age} if r.has("dex_age") else {}),
        }
        for r in records
    )
    summary.lines.append(
        f"wrote {count} regularisation image(s) to {final} (ages {plan.low}–{plan.high}); "
        f"{aligned_count} aligned, {unaligned} kept as generated (no face found)"
    )
    if unaligned:
        console.warn(
            f"make-reg: {unaligned} of {count} generated image(s) had no detectable face and are "
            "kept unaligned (aligned_ok: false); a real SD 1.5 base model rarely does this."
        )
    summary.data.update(
        {"folder": project.relative(final), "count": count, "aligned": aligned_count, "ages": plan.ages}
    )


def _verify_with_dex(
    model: Any, images: list[Image.Image], records: list[RegImage], device: Any, summary: StageSummary
) -> None:
    """Record DEX's estimate on each record; report the mean error and warn about large disagreements."""
    from selfage_cli.ages.engine.dex import estimate_ages

    estimates = estimate_ages(model, images, device=device)
    off: list[str] = []
    errors: list[float] = []
    for record, estimate in zip(records, estimates, strict=True):
        record.dex_age = round(float(estimate), 2)
        errors.append(abs(float(estimate) - record.age))
        if errors[-1] > DEX_DISAGREEMENT_YEARS:
            off.append(f"{record.id} (prompted {record.age}, DEX {estimate:.1f})")
    mae = sum(errors) / len(errors)
    summary.data["dex_mean_abs_error"] = round(mae, 2)
    summary.lines.append(f"DEX verification: mean |prompted − estimated| = {mae:.1f} years")
    if off:
        shown = ", ".join(off[:10]) + (f" and {len(off) - 10} more" if len(off) > 10 else "")
        console.warn(
            f"make-reg: DEX disagrees with the prompted age by more than {DEX_DISAGREEMENT_YEARS:g} years on "
            f"{len(off)} of {len(records)} image(s): {shown}. They are kept with their prompted age; delete "
            "or relabel them if they look wrong."
        )
