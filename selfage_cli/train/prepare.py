"""What ``selfage train --refs DIR --reg DIR`` does before training: the align and label-ages stages for
the photos the project does not hold yet, through the same functions as ``selfage align`` and
``selfage label-ages``, their failures and warnings carried into the training summary.
"""

from __future__ import annotations

from pathlib import Path

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.faces.engine.loading import IMAGE_SUFFIXES
from selfage_cli.manifest import load as load_manifest
from selfage_cli.project import Project
from selfage_cli.summary import StageSummary
from selfage_cli.train.config import TrainConfig


def prepare_project(
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
    entries = load_manifest(project).references
    known = {str(Path(e.source).resolve()) for e in entries if e.source and e.aligned}
    if any(str(p.resolve()) not in known for p in photos):
        from selfage_cli.faces.stage import run_align

        console.info(f"aligning the photos of {refs} (selfage align) …")
        _merge(summary, run_align(project, [refs], role="refs", size=config.resolution), "align")
    entries = load_manifest(project).references
    if not any(e.aligned for e in entries):
        raise SelfageError(
            f"--refs {refs}: no face could be aligned in any photo; use clear frontal photos "
            "(see the align failures above)."
        )
    if ages_file is not None or birth_date or any(e.aligned and e.age is None for e in entries):
        _label(project, summary, config, reg=None, birth_date=birth_date, ages_file=ages_file)


def _ensure_regularisation(project: Project, reg: Path, config: TrainConfig, summary: StageSummary) -> None:
    """Label ``reg`` as the regularisation set unless the project already holds it labelled."""
    reg = reg.expanduser()
    if not reg.is_dir():
        raise SelfageError(f"--reg {reg}: no such folder; pass a folder of other people's aligned faces.")
    section = load_manifest(project).regularisation
    same = section.folder and Path(section.folder).resolve() == reg.resolve()
    images = section.images
    if not (same and images and all(img.age is not None for img in images)):
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
    from selfage_cli.ages.stage import WAYS_TO_GIVE_AN_AGE_TO_TRAIN, run_label_ages

    sub = run_label_ages(
        project,
        reg=reg,
        ages_file=ages_file,
        birth_date=birth_date,
        device=config.device,
        force=True,  # train --reg DIR replaces an earlier set, with a warning (docs/training.md)
        ways_to_give_an_age=WAYS_TO_GIVE_AN_AGE_TO_TRAIN,
    )
    _merge(summary, sub, "label-ages")


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
