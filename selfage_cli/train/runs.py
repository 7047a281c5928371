"""Which run ``selfage train`` trains: the ``--run`` / ``--resume`` / ``--force`` policy.

:func:`plan_run` names the run (``--run``, the last unfinished one for ``--resume``, else a timestamp),
refuses to overwrite a run without ``--force``, and for ``--resume`` finds the latest checkpoint and
the method options (and base model) the run was started with.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.locks import hold
from selfage_cli.manifest import META_NAME, Manifest, Run, find
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.engine.checkpoints import newest_loadable
from selfage_cli.train.engine.loop import LOSS_LOG, list_checkpoints

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RunPlan:
    """The run to train: its name and folder, the config to use, and how it starts."""

    name: str
    run_dir: Path
    config: TrainConfig
    checkpoint: Path | None = None  # --resume: continue from this checkpoint
    replace: bool = False  # --force: an earlier run of this name goes once training can start
    already_finished: bool = False  # --resume of a finished run: nothing to do


def plan_run(
    project: Project,
    config: TrainConfig,
    run_name: str | None,
    *,
    resume: bool,
    force: bool,
    given: frozenset[str] | None = None,
    locks: contextlib.ExitStack | None = None,
) -> RunPlan:
    """Apply the --run/--resume/--force policy: which run to train and how it starts (exit 2 when refused).

    ``given``: the options given explicitly, which --resume honours or refuses (:mod:`~selfage_cli.train.resume`).
    ``locks``: the run folder's lock is taken into it (held until it closes) before the run's state is
    looked at, so a second process training the same run stops here (exit 2) having written nothing.
    """
    if resume and force:
        raise SelfageError("--resume and --force contradict each other; pass one of them.")
    manifest = load_manifest(project)
    name = _run_name(manifest, run_name, resume)
    run_dir = checked_run_dir(project, name)
    if locks is not None:
        locks.enter_context(hold(run_dir, "wait for it to finish or choose another --run name"))
        manifest = load_manifest(project)  # as it is now that the run is ours
    existing = find(manifest.runs, name, key="name")
    if resume:
        return _resume_plan(name, run_dir, existing, config, given)
    return _fresh_plan(name, run_dir, existing, config, force)


def _resume_plan(
    name: str, run_dir: Path, existing: Run | None, config: TrainConfig, given: frozenset[str] | None = None
) -> RunPlan:
    """Continue the run from its latest checkpoint, with the method options it was started with."""
    from selfage_cli.train import resume as resume_options

    if existing is None and not run_dir.is_dir():
        raise SelfageError(f"--resume --run {name}: the project has no such run; leave out --resume to start it.")
    recorded_config = existing.config if existing is not None else None
    extend = resume_options.wants_extension(given, config, recorded_config)
    if _is_finished(existing, run_dir) and not extend:
        resume_options.check_finished(name, config, recorded_config, given)  # options it would ignore: refused
        return RunPlan(name, run_dir, config, already_finished=True)
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise SelfageError(f"--resume --run {name}: runs/{name} has no checkpoint yet; start it again with --force.")
    newest = newest_loadable(name, found)  # a bad newer checkpoint is skipped, and said
    checkpoint = newest.folder
    recorded = newest.state.get("config") or recorded_config
    resumed = config.with_method_of(recorded) if recorded else config
    fingerprint = existing.base_model_fingerprint if existing is not None else None
    resumed = _base_model_found(name, resumed, offered=config.base_model, fingerprint=fingerprint)
    resumed = resume_options.reconcile(name, resumed, config, given, checkpoint)
    return RunPlan(name, run_dir, resumed, checkpoint=checkpoint)


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


def _fresh_plan(name: str, run_dir: Path, existing: Run | None, config: TrainConfig, force: bool) -> RunPlan:
    """Start the run from scratch; a run that already holds that name is replaced only with --force."""
    taken = existing is not None or (run_dir.exists() and any(run_dir.iterdir()))
    if taken and not force:
        if _is_finished(existing, run_dir):
            state, fix = "a finished", "pass --force to replace it or choose another --run name"
        else:
            state = "an unfinished"
            fix = "pass --resume to continue it, --force to start it again, or choose another --run name"
        raise SelfageError(f"--run {name}: runs/{name} already holds {state} run; {fix}.")
    return RunPlan(name, run_dir, config, replace=taken)


def remove_run(project: Project, plan: RunPlan) -> None:
    """--force: delete the old run's files and manifest entry (only once the new run can start)."""
    shutil.rmtree(plan.run_dir, ignore_errors=True)
    with update_manifest(project) as manifest:
        manifest.runs = [run for run in manifest.runs if run.name != plan.name]


def _run_name(manifest: Manifest, run_name: str | None, resume: bool) -> str:
    """The run's name: --run (checked), the last unfinished run for --resume, else a timestamp."""
    if run_name:
        return check_run_name(run_name, "--run")
    if resume:
        unfinished = [run for run in manifest.runs if not run.finished]
        if not unfinished:
            raise SelfageError("--resume: the project has no unfinished run; name one with --run NAME.")
        return check_run_name(unfinished[-1].name, "selfage.json names the unfinished run")
    return "run-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def check_run_name(name: Any, where: str) -> str:
    """A run name (from --run, or read from the manifest: untrusted) that is one plain folder name."""
    if isinstance(name, str) and _RUN_NAME.match(name):
        return name
    if where == "--run":
        raise SelfageError(f"--run {name!r}: use letters, digits, '.', '_' and '-' only.")
    raise SelfageError(
        f"{where} {name!r}, which is not a plain folder name (letters, digits, '.', '_' and '-'); nothing was "
        "written: fix or remove that entry."
    )


def checked_run_dir(project: Project, name: str) -> Path:
    """``runs/NAME``, refused (exit 2, nothing written) when it, its checkpoint folder or its loss log (appended
    to in place) resolves outside the project (a symbolic link)."""
    run_dir = project.root / "runs" / name
    for path in (run_dir, run_dir / "checkpoints", run_dir / LOSS_LOG):
        project.writable_path(path)
    return run_dir  # as named, not resolved: --force deletes a link itself, never what it points to


def _is_finished(entry: Run | None, run_dir: Path) -> bool:
    """Whether the run is finished, from its manifest entry or else its LoRA JSON."""
    if entry is not None:
        return bool(entry.finished)
    meta = run_dir / META_NAME
    if meta.is_file():
        try:
            return bool(json.loads(meta.read_text()).get("finished"))
        except (ValueError, OSError):
            return False
    return False
