"""``selfage train`` as a library call: :func:`train_project`.

Runs the align and label-ages stages first when ``--refs``/``--reg`` name photos the project does not
hold yet (through the same code as ``selfage align`` / ``selfage label-ages``), selects the training
images, trains (:class:`~selfage_cli.train.loop.Trainer`) and writes, in ``runs/NAME/``:

* ``pytorch_lora_weights.safetensors`` — diffusers LoRA format (``unet.…``, ``text_encoder.…`` keys),
  loadable with ``StableDiffusionPipeline.load_lora_weights``;
* ``pytorch_lora_weights.json`` — base model and its fingerprint, rank, alpha, steps done, finished,
  prompts, ages and files used (``edit`` checks it);
* ``loss.jsonl``, ``checkpoints/step-NNNNNN/`` and, with ``--validate-ages``, ``validation.png``;

and records the run in ``selfage.json`` (``runs``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from selfage_cli import console
from selfage_cli.errors import InterruptedRun, SelfageError
from selfage_cli.faces.loading import IMAGE_SUFFIXES
from selfage_cli.files import atomic_write_json
from selfage_cli.processes import decided_by_main, is_main, main_first, process_state
from selfage_cli.project import Project, find, now_iso, upsert
from selfage_cli.summary import StageSummary
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.data import TrainImage, select_references, select_regularisation
from selfage_cli.train.loop import LOSS_LOG, Trainer, list_checkpoints, resolve_precision, truncate_loss_log
from selfage_cli.train.lora import META_NAME, WEIGHT_NAME

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class _RunPlan:
    """The run to train: its name and folder, the config to use, and how it starts."""

    name: str
    run_dir: Path
    config: TrainConfig
    checkpoint: Path | None = None  # --resume: continue from this checkpoint
    replace: bool = False  # --force: an earlier run of this name goes once training can start
    already_finished: bool = False  # --resume of a finished run: nothing to do


def train_project(
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
) -> StageSummary | None:
    """Train a personal LoRA in ``project`` (see the module docstring); returns the stage summary.

    Under ``accelerate launch`` the main process decides (run name, resume, images), prepares the
    project and writes everything; the other processes train beside it, print nothing but their own
    errors, and return ``None``.
    """
    from selfage_cli.models import model_reference

    summary = StageSummary("train")
    config.check()
    config = replace(config, base_model=model_reference(config.base_model))  # a folder: absolute
    state = process_state(config.device)
    if not is_main(state):
        console.mute(f"process {state.process_index}")
    plan = decided_by_main(state, lambda: _plan_run(project, config, run_name, resume=resume, force=force))
    if plan.already_finished:
        return _skip_finished(summary, plan) if is_main(state) else None
    with main_first(state):
        if is_main(state):
            _run_earlier_stages(
                project, plan.config, summary, refs=refs, reg=reg, birth_date=birth_date, ages_file=ages_file
            )
    ref_images, reg_images = decided_by_main(state, lambda: _training_images(project, plan.config))
    pipe = _load_base_model(plan.config)
    if plan.replace and is_main(state):
        _remove_run(project, plan)
    trainer, entry = _train_in_run_dir(project, plan, pipe, ref_images, reg_images, writer=is_main(state))
    if not is_main(state):
        return None
    grid, entry = _validation_grid(project, plan, pipe, trainer, entry)
    return _report_trained(summary, plan, trainer, entry, grid)


# ---- which run ------------------------------------------------------------------------------------------
def _plan_run(project: Project, config: TrainConfig, run_name: str | None, *, resume: bool, force: bool) -> _RunPlan:
    """Apply the --run/--resume/--force policy: which run to train and how it starts (exit 2 when refused)."""
    if resume and force:
        raise SelfageError("--resume and --force contradict each other; pass one of them.")
    manifest = project.read()
    name = _run_name(manifest, run_name, resume)
    run_dir = project.root / "runs" / name
    existing = find(manifest.get("runs", []), name, key="name")
    if resume:
        return _resume_plan(name, run_dir, existing, config)
    return _fresh_plan(name, run_dir, existing, config, force)


def _resume_plan(name: str, run_dir: Path, existing: dict[str, Any] | None, config: TrainConfig) -> _RunPlan:
    """Continue the run from its latest checkpoint, with the method options it was started with."""
    if existing is None and not run_dir.is_dir():
        raise SelfageError(f"--resume --run {name}: the project has no such run; leave out --resume to start it.")
    if _is_finished(existing, run_dir):
        return _RunPlan(name, run_dir, config, already_finished=True)
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise SelfageError(f"--resume --run {name}: runs/{name} has no checkpoint yet; start it again with --force.")
    checkpoint = found[-1]
    recorded = json.loads((checkpoint / "state.json").read_text()).get("config") or (existing or {}).get("config")
    resumed = config.with_method_of(recorded) if recorded else config
    fingerprint = (existing or {}).get("base_model_fingerprint")
    resumed = _base_model_found(name, resumed, offered=config.base_model, fingerprint=fingerprint)
    return _RunPlan(name, run_dir, resumed, checkpoint=checkpoint)


def _base_model_found(name: str, config: TrainConfig, *, offered: str, fingerprint: str | None) -> TrainConfig:
    """--resume of a run whose base-model folder is gone (moved): go on with the model offered now
    (--base-model, else the project's) when it holds the same weights (same fingerprint), else exit 2."""
    from selfage_cli.models import model_fingerprint

    recorded = Path(config.base_model)
    if not recorded.is_absolute() or recorded.is_dir():
        return config  # a Hub id, or still in its place
    if fingerprint and offered != config.base_model and model_fingerprint(offered) == fingerprint:
        console.info(f"run {name}: its base model {recorded} is gone; resuming with {offered} (the same weights).")
        return replace(config, base_model=offered)
    raise SelfageError(
        f"--resume --run {name}: the base model it was trained on, {recorded}, is no longer there (moved or "
        "deleted); pass --base-model with its new place (the same weights)."
    )


def _fresh_plan(
    name: str, run_dir: Path, existing: dict[str, Any] | None, config: TrainConfig, force: bool
) -> _RunPlan:
    """Start the run from scratch; a run that already holds that name is replaced only with --force."""
    taken = existing is not None or (run_dir.exists() and any(run_dir.iterdir()))
    if taken and not force:
        if _is_finished(existing, run_dir):
            state, fix = "a finished", "pass --force to replace it or choose another --run name"
        else:
            state = "an unfinished"
            fix = "pass --resume to continue it, --force to start it again, or choose another --run name"
        raise SelfageError(f"--run {name}: runs/{name} already holds {state} run; {fix}.")
    return _RunPlan(name, run_dir, config, replace=taken)


def _skip_finished(summary: StageSummary, plan: _RunPlan) -> StageSummary:
    """Report that a resumed run is already finished, and train nothing."""
    summary.skipped.append({"run": plan.name, "reason": "already finished"})
    summary.lines.append(
        f"run {plan.name} is already finished ({plan.run_dir / WEIGHT_NAME}); "
        "pass --force without --resume to train it again."
    )
    return summary


def _remove_run(project: Project, plan: _RunPlan) -> None:
    """--force: delete the old run's files and manifest entry (only once the new run can start)."""
    shutil.rmtree(plan.run_dir, ignore_errors=True)
    with project.update() as manifest:
        manifest["runs"] = [r for r in manifest.get("runs", []) if r.get("name") != plan.name]


# ---- what to train on, and with what -------------------------------------------------------------------
def _run_earlier_stages(
    project: Project,
    config: TrainConfig,
    summary: StageSummary,
    *,
    refs: Path | None,
    reg: Path | None,
    birth_date: str | None,
    ages_file: Path | None,
) -> None:
    """Run align / label-ages for the --refs and --reg photos that the project does not hold yet."""
    if refs is not None:
        _ensure_references(project, refs, config, birth_date, ages_file, summary)
    if reg is not None:
        _ensure_regularisation(project, reg, config, summary)


def _training_images(project: Project, config: TrainConfig) -> tuple[list[TrainImage], list[TrainImage]]:
    """The reference and regularisation images to train on (and say which)."""
    manifest = project.read()
    ref_images = select_references(project, manifest, config.num_refs, config.instance_prompt)
    reg_images = select_regularisation(project, manifest, config.class_prompt)
    console.info(
        "references used (first by file name): "
        + ", ".join(f"{img.id} ({img.age} y)" for img in ref_images)
        + f"; {len(reg_images)} regularisation image(s)."
    )
    return ref_images, reg_images


def _load_base_model(config: TrainConfig) -> Any:
    """Load the base pipeline at the training precision; warn when --resolution is not the model's own."""
    from selfage_cli.models import check_resolution, load_pipeline, native_resolution

    device, dtype, _ = resolve_precision(config)
    pipe = load_pipeline(config.base_model, device=str(device), dtype=dtype)
    check_resolution(pipe, config.resolution)
    native = native_resolution(pipe)
    if native != config.resolution:
        console.warn(
            f"--resolution {config.resolution} differs from the base model's native {native} px; training "
            f"at {config.resolution} px as asked (pass --resolution {native} to match the model)."
        )
    return pipe


# ---- training and its results --------------------------------------------------------------------------
def _train_in_run_dir(
    project: Project, plan: _RunPlan, pipe: Any, refs: list[TrainImage], regs: list[TrainImage], *, writer: bool
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
    project: Project, plan: _RunPlan, pipe: Any, refs: list[TrainImage], regs: list[TrainImage], *, writer: bool
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
    recorder = _Recorder(project, name, run_dir, config, trainer, refs, regs)
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
        interrupted.reported_by_main = not writer
        raise interrupted from None
    except torch.OutOfMemoryError as exc:
        raise _oom(config) from exc
    if config.checkpoint_every:
        trainer.save_checkpoint()
    return trainer, recorder.record(finished=True)


def _validation_grid(
    project: Project, plan: _RunPlan, pipe: Any, trainer: Trainer, entry: dict[str, Any]
) -> tuple[Path | None, dict[str, Any]]:
    """With --validate-ages: render validation.png and record it; returns it (or None) and the run entry."""
    ages = plan.config.validation_ages()
    if not ages:
        return None, entry
    from selfage_cli.train.validate import render_validation_grid

    grid = render_validation_grid(pipe, plan.config, ages, plan.run_dir / "validation.png", dtype=trainer.weight_dtype)
    with project.update() as manifest:
        run = find(manifest["runs"], plan.name, key="name")
        if run is not None:
            run["validation_grid"] = project.relative(grid)
            entry = run
    return grid, entry


def _report_trained(
    summary: StageSummary, plan: _RunPlan, trainer: Trainer, entry: dict[str, Any], grid: Path | None
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


def _run_name(manifest: dict[str, Any], run_name: str | None, resume: bool) -> str:
    """The run's name: --run (checked), the last unfinished run for --resume, else a timestamp."""
    if run_name:
        if not _RUN_NAME.match(run_name):
            raise SelfageError(f"--run {run_name!r}: use letters, digits, '.', '_' and '-' only.")
        return run_name
    if resume:
        unfinished = [r for r in manifest.get("runs", []) if not r.get("finished")]
        if not unfinished:
            raise SelfageError("--resume: the project has no unfinished run; name one with --run NAME.")
        return str(unfinished[-1]["name"])
    return "run-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _is_finished(entry: dict[str, Any] | None, run_dir: Path) -> bool:
    """Whether the run is finished, from its manifest entry or else its LoRA JSON."""
    if entry is not None:
        return bool(entry.get("finished"))
    meta = run_dir / META_NAME
    if meta.is_file():
        try:
            return bool(json.loads(meta.read_text()).get("finished"))
        except (ValueError, OSError):
            return False
    return False


def _merge(summary: StageSummary, sub: StageSummary | None, stage: str) -> None:
    """Carry an earlier stage's failures and warnings into the training summary."""
    if sub is None:
        return
    for failure in sub.failures:
        summary.fail(failure.item, f"{stage}: {failure.reason}")
    summary.warnings.extend(sub.warnings)
    summary.lines.extend(f"{stage}: {line}" for line in sub.lines)


def _photos(folder: Path) -> list[Path]:
    """The photos in ``folder`` and below, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _ensure_references(
    project: Project,
    refs: Path,
    config: TrainConfig,
    birth_date: str | None,
    ages_file: Path | None,
    summary: StageSummary,
) -> None:
    """Align and label the photos of ``refs`` that the project does not hold yet."""
    refs = refs.expanduser()
    if not refs.is_dir():
        raise SelfageError(f"--refs {refs}: no such folder; pass the folder that holds your photos.")
    photos = _photos(refs)
    if not photos:
        raise SelfageError(f"--refs {refs} holds no photos (.jpg, .png, …); pass the folder that holds your photos.")
    entries = project.read().get("references", [])
    known = {str(Path(e["source"]).resolve()) for e in entries if e.get("source") and e.get("aligned")}
    if any(str(p.resolve()) not in known for p in photos):
        from selfage_cli.faces.stage import align_photos

        console.info(f"aligning the photos of {refs} (selfage align) …")
        _merge(summary, align_photos(project, [refs], role="refs", size=config.resolution), "align")
    entries = project.read().get("references", [])
    if not any(e.get("aligned") for e in entries):
        raise SelfageError(
            f"--refs {refs}: no face could be aligned in any photo; use clear frontal photos "
            "(see the align failures above)."
        )
    if ages_file is not None or birth_date or any(e.get("aligned") and e.get("age") is None for e in entries):
        _label(project, summary, config, reg=None, birth_date=birth_date, ages_file=ages_file)


def _ensure_regularisation(project: Project, reg: Path, config: TrainConfig, summary: StageSummary) -> None:
    """Label ``reg`` as the regularisation set unless the project already holds it labelled."""
    reg = reg.expanduser()
    if not reg.is_dir():
        raise SelfageError(f"--reg {reg}: no such folder; pass a folder of other people's aligned faces.")
    section = project.read().get("regularisation") or {}
    same = section.get("folder") and Path(section["folder"]).resolve() == reg.resolve()
    images = section.get("images") or []
    if not (same and images and all(img.get("age") is not None for img in images)):
        console.info(f"labelling the regularisation set {reg} (selfage label-ages --reg) …")
        _label(project, summary, config, reg=reg, birth_date=None, ages_file=None)


def _label(
    project: Project,
    summary: StageSummary,
    config: TrainConfig,
    *,
    reg: Path | None,
    birth_date: str | None,
    ages_file: Path | None,
) -> None:
    """Run the label-ages stage (references, or ``reg`` as the regularisation set) into ``summary``."""
    from selfage_cli.ages.stage import label_ages

    sub = label_ages(project, reg=reg, ages_file=ages_file, birth_date=birth_date, device=config.device)
    _merge(summary, sub, "label-ages")


class _Recorder:
    """Writes the LoRA, its JSON and the manifest's Run entry (at checkpoints, interrupts and the end)."""

    def __init__(
        self,
        project: Project,
        name: str,
        run_dir: Path,
        config: TrainConfig,
        trainer: Trainer,
        refs: list[TrainImage],
        regs: list[TrainImage],
    ):
        from selfage_cli.models import model_fingerprint, pipeline_fingerprint

        self.pipeline_fingerprint = pipeline_fingerprint(SimpleNamespace(unet=trainer.unet))
        self.project, self.name, self.run_dir, self.config = project, name, run_dir, config
        self.trainer, self.refs, self.regs = trainer, refs, regs
        self.fingerprint = model_fingerprint(config.base_model)

    def metadata(self, finished: bool) -> dict[str, Any]:
        """The LoRA's JSON sidecar (``pytorch_lora_weights.json``)."""
        cfg = self.config
        return {
            "format": "selfage-lora",
            "version": 1,
            "base_model": cfg.base_model,
            "base_model_fingerprint": self.fingerprint,
            "pipeline_fingerprint": self.pipeline_fingerprint,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "steps_done": self.trainer.step_done,
            "steps_total": cfg.steps,
            "finished": finished,
            "processes": self.trainer.accelerator.num_processes,
            "train_text_encoder": cfg.train_text_encoder,
            "resolution": cfg.resolution,
            "prediction_type": self.trainer.prediction_type,
            "instance_prompt": cfg.instance_prompt,
            "class_prompt": cfg.class_prompt,
            "prompt_template": f"{cfg.instance_prompt} as {{age}}-year-old",
            "prompts": [img.prompt for img in self.refs],
            "ages": [img.age for img in self.refs],
            "references": [img.to_json() for img in self.refs],
            "regularisation": {
                "count": len(self.regs),
                "ages": sorted({img.age for img in self.regs}),
                "files": [img.stored_as for img in self.regs],
            },
            "config": cfg.to_json(),
            "updated": now_iso(),
        }

    def record(self, finished: bool) -> dict[str, Any]:
        """Write the LoRA and its JSON, upsert the Run entry; returns it ({} off the main process)."""
        if not self.trainer.accelerator.is_main_process:
            return {}
        lora = self.trainer.save_lora(self.run_dir)
        meta = self.run_dir / META_NAME
        atomic_write_json(meta, self.metadata(finished))
        rel = self.project.relative
        entry = {
            "name": self.name,
            "run_dir": rel(self.run_dir),
            "lora": rel(lora),
            "config": self.config.to_json(),
            "base_model": self.config.base_model,
            "base_model_fingerprint": self.fingerprint,
            "pipeline_fingerprint": self.pipeline_fingerprint,
            "steps_done": self.trainer.step_done,
            "steps_total": self.config.steps,
            "finished": finished,
            "processes": self.trainer.accelerator.num_processes,
            "checkpoint_dir": rel(self.run_dir / "checkpoints"),
            "loss_log": rel(self.run_dir / LOSS_LOG),
            "references": [{"id": img.id, "age": img.age} for img in self.refs],
            "updated": now_iso(),
        }
        with self.project.update() as manifest:
            runs = manifest.setdefault("runs", [])
            previous = find(runs, self.name, key="name")
            if previous is not None and previous.get("validation_grid") and not finished:
                entry["validation_grid"] = previous["validation_grid"]
            upsert(runs, entry, key="name")
        return entry
