"""``selfage train`` as a library call: :func:`run_train`.

Runs the align and label-ages stages first when ``--refs``/``--reg`` name photos the project does not
hold yet (through the same code as ``selfage align`` / ``selfage label-ages``), selects the training
images, trains (:class:`~selfage_cli.train.engine.loop.Trainer`) and writes, in ``runs/NAME/``:

* ``pytorch_lora_weights.safetensors`` — diffusers LoRA format (``unet.…``, ``text_encoder.…`` keys),
  loadable with ``StableDiffusionPipeline.load_lora_weights``;
* ``pytorch_lora_weights.json`` — base model and its fingerprint, rank, alpha, steps done, finished,
  prompts, ages and files used (``edit`` checks it);
* ``loss.jsonl``, ``checkpoints/step-NNNNNN/`` and, with ``--validate-ages``, ``validation.png``;

and records the run in ``selfage.json`` (``runs``). Which run (:mod:`~selfage_cli.train.runs`), the
preparation of ``--refs``/``--reg`` (:mod:`~selfage_cli.train.prepare`) and the run's record
(:mod:`~selfage_cli.train.record`) live in their own modules; this one puts them in order.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from selfage_cli import console
from selfage_cli.base_model import check_regularisation_model, choose_base_model, remember_base_model
from selfage_cli.errors import InterruptedRun, SelfageError
from selfage_cli.manifest import WEIGHT_NAME, find
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.processes import decided_by_main, is_main, met_by_all, process_state, speak_only_from_main
from selfage_cli.project import Project
from selfage_cli.summary import StageSummary
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.engine.data import TrainImage
from selfage_cli.train.engine.loop import LOSS_LOG, Trainer, list_checkpoints, resolve_precision, truncate_loss_log
from selfage_cli.train.images import select_references, select_regularisation
from selfage_cli.train.prepare import prepare_project
from selfage_cli.train.record import RunRecorder
from selfage_cli.train.runs import RunPlan, plan_run, remove_run


def run_train(project: Project, config: TrainConfig, **options: Any) -> StageSummary | None:
    """Train a personal LoRA in ``project`` (see :func:`_train_project`), holding the run folder's lock
    (:mod:`selfage_cli.locks`) throughout: a second process training the same run stops with exit 2."""
    with contextlib.ExitStack() as locks:
        return _train_project(project, config, locks=locks, **options)


def _train_project(
    project: Project,
    config: TrainConfig,
    *,
    refs: Path | None = None,
    reg: Path | None = None,
    birth_date: str | None = None,
    ages_file: Path | None = None,
    run_name: str | None = None,
    resume: bool = False,
    force: bool = False,
    given: frozenset[str] | None = None,
    locks: contextlib.ExitStack | None = None,
) -> StageSummary | None:
    """Train a personal LoRA in ``project`` (see the module docstring); returns the stage summary.

    Under ``accelerate launch`` the main process decides (run name, resume, images), prepares the
    project and writes everything; the other processes train beside it, print nothing but their own
    errors, and return ``None``.

    ``given``: the names of the options given explicitly (TrainConfig fields and ``refs``, ``reg``,
    ``birth_date``, ``ages_file``); ``--resume`` refuses those it cannot honour and extends the run for
    ``steps`` (:mod:`~selfage_cli.train.resume`). ``None``: the recorded options win without a word.
    ``config.resolution`` ``None``: the base model's native resolution.
    """
    from selfage_cli.models import model_reference

    summary = StageSummary("train")
    config = replace(config)  # checked again (TrainConfig.__post_init__): a caller may have changed a field
    base_model = choose_base_model(project, None) if not config.base_model else model_reference(config.base_model)
    config = replace(config, base_model=base_model)  # None: the project's; a folder: absolute
    state = process_state(config.device)
    speak_only_from_main(state)
    asked_resolution = config.resolution
    plan = decided_by_main(
        state,
        lambda: _with_resolution(
            plan_run(project, config, run_name, resume=resume, force=force, given=given, locks=locks)
        ),
    )
    if plan.already_finished:
        return _skip_finished(summary, plan) if is_main(state) else None
    decided_by_main(  # the main process aligns and labels; the others wait, and share its errors
        state,
        lambda: prepare_project(
            project, plan.config, summary, refs=refs, reg=reg, birth_date=birth_date, ages_file=ages_file
        ),
    )
    ref_images, reg_images = decided_by_main(state, lambda: _training_images(project, plan.config))
    pipe = _load_base_model(plan.config, asked=None if plan.checkpoint else asked_resolution is not None)
    if plan.replace and is_main(state):
        remove_run(project, plan)
    trainer, entry = _train_in_run_dir(project, plan, pipe, ref_images, reg_images, writer=is_main(state))
    if not is_main(state):
        return None
    # The project's first model stage records its base model; training does once it has trained (a run
    # that fails, e.g. on a full disk, leaves the manifest as it was).
    remember_base_model(project, plan.config.base_model)
    grid, entry = _validation_grid(project, plan, pipe, trainer, entry)
    return _report_trained(summary, plan, trainer, entry, grid)


# ---- a finished run -------------------------------------------------------------------------------------
def _skip_finished(summary: StageSummary, plan: RunPlan) -> StageSummary:
    """Report that a resumed run is already finished, and train nothing."""
    summary.skipped.append({"run": plan.name, "reason": "already finished"})
    summary.lines.append(
        f"run {plan.name} is already finished ({plan.run_dir / WEIGHT_NAME}); "
        "pass --force without --resume to train it again."
    )
    return summary


# ---- what to train on, and with what -------------------------------------------------------------------
def _training_images(project: Project, config: TrainConfig) -> tuple[list[TrainImage], list[TrainImage]]:
    """The reference and regularisation images to train on (and say which)."""
    manifest = load_manifest(project)
    check_regularisation_model(manifest, config.base_model)
    ref_images = select_references(project, manifest, config.num_refs, config.instance_prompt)
    reg_images = select_regularisation(project, manifest, config.class_prompt)
    console.info(
        "references used (first by file name): "
        + ", ".join(f"{img.id} ({img.age} y)" for img in ref_images)
        + f"; {len(reg_images)} regularisation image(s)."
    )
    return ref_images, reg_images


def _with_resolution(plan: RunPlan) -> RunPlan:
    """The plan with the training resolution decided: ``--resolution``, else the base model's native one
    (read from its config files; 512, SD 1.5's, when they cannot be read before loading it)."""
    from selfage_cli.models import configured_resolution

    if plan.config.resolution is not None:
        return plan
    native = configured_resolution(plan.config.base_model) or 512
    return replace(plan, config=replace(plan.config, resolution=native))


def _load_base_model(config: TrainConfig, asked: bool | None = True) -> Any:
    """Load the base pipeline at the training precision; warn when the training resolution is not the
    model's own: ``asked`` True: given as --resolution; False: the default, when the model's config could
    not be read before loading it; None: a resumed run's (warned about when it started)."""
    from selfage_cli.models import check_resolution, load_pipeline, native_resolution

    device, dtype, _ = resolve_precision(config)
    pipe = load_pipeline(config.base_model, device=str(device), dtype=dtype)
    check_resolution(pipe, config.resolution)
    native = native_resolution(pipe)
    if native != config.resolution and asked:
        console.warn(
            f"--resolution {config.resolution} differs from the base model's native {native} px; training "
            f"at {config.resolution} px as asked (pass --resolution {native} to match the model)."
        )
    elif native != config.resolution and asked is False:
        console.warn(
            f"training at {config.resolution} px: the base model's native resolution, {native} px, could not be "
            f"read before loading it; pass --resolution {native} to train at it."
        )
    return pipe


# ---- training and its results --------------------------------------------------------------------------
def _train_in_run_dir(
    project: Project, plan: RunPlan, pipe: Any, refs: list[TrainImage], regs: list[TrainImage], *, writer: bool
) -> tuple[Trainer, dict[str, Any]]:
    """Train in the run folder; a run that fails before its first checkpoint leaves nothing behind.

    ``writer``: this process writes the run's files (the main one of several processes)."""
    if writer:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _train(project, plan, pipe, refs, regs, writer=writer)
    except BaseException:
        if writer and plan.checkpoint is None and not list_checkpoints(plan.run_dir / "checkpoints"):
            shutil.rmtree(plan.run_dir, ignore_errors=True)  # nothing resumable: leave nothing behind
        raise


def _train(
    project: Project, plan: RunPlan, pipe: Any, refs: list[TrainImage], regs: list[TrainImage], *, writer: bool
) -> tuple[Trainer, dict[str, Any]]:
    """Build the trainer, resume if asked, train, write the outputs; Ctrl-C → checkpoint + InterruptedRun."""
    name, run_dir, config = plan.name, plan.run_dir, plan.config
    try:
        trainer = Trainer(pipe, config, refs, regs, run_dir)
    except torch.OutOfMemoryError as exc:
        raise _oom(config) from exc
    if plan.checkpoint is not None:
        trainer.load_checkpoint(plan.checkpoint)
        if writer:
            truncate_loss_log(run_dir / LOSS_LOG, trainer.step_done)
        console.info(f"resuming run {name} at step {trainer.step_done}/{config.steps}.")
    elif writer:
        (run_dir / LOSS_LOG).write_text("")
    recorder = RunRecorder(project, name, run_dir, config, trainer, refs, regs)
    try:
        trainer.fit(on_checkpoint=lambda _path: recorder.record(finished=False))
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        recorder.record(finished=False)
        resume_cmd = f"selfage train --resume --run {name} -p {project.root}"
        interrupted = InterruptedRun(
            f"training interrupted at step {trainer.step_done}/{config.steps}; a checkpoint was saved in "
            f"runs/{name}/checkpoints and the run is marked unfinished; continue with `{resume_cmd}`."
        )
        raise met_by_all(interrupted, main=writer) from None
    except torch.OutOfMemoryError as exc:
        raise _oom(config) from exc
    if config.checkpoint_every:
        trainer.save_checkpoint()
    return trainer, recorder.record(finished=True)


def _validation_grid(
    project: Project, plan: RunPlan, pipe: Any, trainer: Trainer, entry: dict[str, Any]
) -> tuple[Path | None, dict[str, Any]]:
    """With --validate-ages: render validation.png and record it; returns it (or None) and the run entry."""
    ages = plan.config.validation_ages()
    if not ages:
        return None, entry
    from selfage_cli.train.engine.validate import render_validation_grid

    grid = render_validation_grid(pipe, plan.config, ages, plan.run_dir / "validation.png", dtype=trainer.weight_dtype)
    with update_manifest(project) as manifest:
        run = find(manifest.runs, plan.name, key="name")
        if run is not None:
            run.validation_grid = project.relative(grid)
            entry = run.to_dict()
    return grid, entry


def _report_trained(
    summary: StageSummary, plan: RunPlan, trainer: Trainer, entry: dict[str, Any], grid: Path | None
) -> StageSummary:
    """Fill the summary of a finished run: its entry, steps, final loss, LoRA and validation grid."""
    summary.done.append({"run": plan.name, "lora": entry["lora"], "steps_done": trainer.step_done})
    summary.data["run"] = entry
    final_loss = trainer.last.get("loss", float("nan"))
    summary.lines.append(
        f"trained run {plan.name}: {trainer.step_done} steps, final loss {final_loss:.4f}; "
        f"LoRA {plan.run_dir / WEIGHT_NAME}"
    )
    if grid is not None:
        summary.lines.append(f"validation grid: {grid}")
    return summary


def _oom(config: TrainConfig) -> SelfageError:
    """The exit-2 error for running out of GPU memory, with the options that use less."""
    return SelfageError(
        f"out of GPU memory training at --batch-size {config.batch_size}, --resolution "
        f"{config.resolution}; try --gradient-checkpointing, a smaller --batch-size (with "
        "--gradient-accumulation), or --use-8bit-adam."
    )
