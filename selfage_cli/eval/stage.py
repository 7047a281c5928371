"""``selfage eval``: score recorded edits for age accuracy, identity and reconstruction.

For every recorded edit (or the ones named) and every target age:

- **age**: the age estimator's estimate of the output against the target age (``--age-estimator``: DEX
  with ``antialias`` preprocessing when its weights are known, else the builtin networks; ``both`` reports
  DEX and builtin side by side, the first of them being the one the ``estimated_age`` fields hold);
  absolute error per output, MAE overall / per decade / per prompt band (``metrics``);
- **identity**: dlib 128-d descriptor distance of the output to the edit's aligned input and to the
  mean descriptor of the person's references, and the share under 0.6 (dlib's same-person threshold);
  an output where dlib finds no face has no distance (counted as ``no_face``);
- **reconstruction**: for the output at the source age (when that age was among the targets), PSNR and
  SSIM against the aligned input, resized to the output's size (Lanczos) when the two differ.

Without any estimator (no DEX weights and the builtin one not installed) the report is identity-only,
with a note saying how to add the age columns.
The manifest is only read; the report files (``report.json``, ``report.md``, ``contact_sheet.png``)
are rewritten on every run (they are derived from the project and hold no user data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.eval.engine import metrics
from selfage_cli.eval.estimators import DEX_PREPROCESS
from selfage_cli.eval.report import REPORT_FILES, fmt
from selfage_cli.faces.engine.errors import UnreadableImageError
from selfage_cli.faces.engine.identity import SAME_PERSON_THRESHOLD
from selfage_cli.faces.engine.loading import load_image
from selfage_cli.manifest import Edit, ImageEntry, Manifest
from selfage_cli.manifest import load as load_manifest
from selfage_cli.project import Project, now_iso
from selfage_cli.summary import StageSummary


@dataclass
class OutputScore:
    """One output image of an edit and its scores (None where not measured)."""

    target_age: int
    path: str
    estimated_age: float | None = None
    distance_to_input: float | None = None
    distance_to_references: float | None = None
    face_found: bool | None = None
    estimates: dict[str, float] = field(default_factory=dict)  # every estimator's age ("dex", "builtin")

    @property
    def abs_error(self) -> float | None:
        if self.estimated_age is None:
            return None
        return abs(self.estimated_age - self.target_age)

    def to_json(self) -> dict[str, Any]:
        return {
            "target_age": self.target_age,
            "path": self.path,
            "estimated_age": self.estimated_age,
            "abs_error": self.abs_error,
            "distance_to_input": self.distance_to_input,
            "distance_to_references": self.distance_to_references,
            "same_person_as_input": None
            if self.distance_to_input is None
            else self.distance_to_input < SAME_PERSON_THRESHOLD,
            "face_found": self.face_found,
            "estimates": dict(self.estimates),
        }


@dataclass
class EditScore:
    """All scores of one recorded edit."""

    id: str
    input: str
    source_age: float | None
    lora: str | None
    settings: dict[str, Any]
    outputs: list[OutputScore] = field(default_factory=list)
    input_estimated_age: float | None = None
    input_face_found: bool | None = None
    reconstruction: dict[str, Any] | None = None
    input_estimates: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "input": self.input,
            "source_age": self.source_age,
            "input_estimated_age": self.input_estimated_age,
            "input_face_found": self.input_face_found,
            "input_estimates": dict(self.input_estimates),
            "lora": self.lora,
            "inversion": self.settings.get("inversion"),
            "outputs": [o.to_json() for o in self.outputs],
            "reconstruction": self.reconstruction,
        }


# ---- selecting edits ---------------------------------------------------------------------------------
def select_edits(project: Project, entries: list[Edit], names: list[str]) -> list[Edit]:
    """The recorded edits named by id, input stem, or a path to the input/source photo (all when empty)."""
    if not entries:
        raise SelfageError(
            f"{project.manifest_path}: no edits are recorded; run `selfage edit PHOTO --ages 0,20,80 -p "
            f"{project.root}` first."
        )
    if not names:
        return list(entries)
    inputs = {entry.id: entry for entry in load_manifest(project).inputs}
    chosen: list[Edit] = []
    for name in names:
        match = [e for e in entries if _edit_matches(project, e, name, inputs)]
        if not match:
            known = ", ".join(e.id for e in entries)
            raise SelfageError(f"EDIT {name!r} is not a recorded edit; name one of: {known}.")
        chosen.extend(m for m in match if m not in chosen)
    return chosen


def _edit_matches(project: Project, entry: Edit, name: str, inputs: dict[str, ImageEntry]) -> bool:
    """Whether ``name`` (an id, input stem or photo path) names the recorded edit ``entry``."""
    if name == entry.id:
        return True
    if entry.input and Path(entry.input).stem == name:
        return True
    given = Path(name).expanduser()
    if not given.exists():
        return False
    given = given.resolve()
    candidates = []
    if entry.input:
        candidates.append(project.path(entry.input))
    registered = inputs.get(entry.id)
    source = registered.source if registered is not None else None
    if source:
        candidates.append(Path(source).expanduser().resolve())
    return given in candidates


# ---- helpers -------------------------------------------------------------------------------------------
class _Identity:
    """dlib descriptors (cached per file) and distances; disabled with a note when dlib is unavailable."""

    def __init__(self) -> None:
        self.note: str | None = None
        self._cache: dict[Path, np.ndarray | None] = {}
        try:
            from selfage_cli.faces.engine import identity
        except ImportError as exc:  # dlib or the model files missing
            self.note = f"identity not measured: the face models could not be loaded ({exc}); run `selfage doctor`."
            self._identity = None
        else:
            self._identity = identity

    @property
    def available(self) -> bool:
        return self._identity is not None

    def descriptor(self, path: Path, image: Image.Image | None = None) -> np.ndarray | None:
        if not self.available:
            return None
        if path not in self._cache:
            picture = image if image is not None else load_image(path)
            value = self._identity.face_descriptor(np.asarray(picture.convert("RGB")))
            self._cache[path] = None if value is None else np.asarray(value, dtype=np.float64)
        return self._cache[path]

    def distance(self, a: np.ndarray | None, b: np.ndarray | None) -> float | None:
        if a is None or b is None or not self.available:
            return None
        return float(self._identity.descriptor_distance(a, b))


def reference_mean_descriptor(
    project: Project, references: list[ImageEntry], identity: _Identity
) -> tuple[np.ndarray | None, int]:
    """Mean 128-d descriptor of the references (recorded ``descriptor`` or computed), and how many were used."""
    descriptors: list[np.ndarray] = []
    for ref in references:
        value = ref.descriptor
        if value is not None and len(value) == 128:
            descriptors.append(np.asarray(value, dtype=np.float64))
            continue
        if ref.aligned and identity.available:
            path = project.path(ref.aligned)
            if path.is_file():
                computed = identity.descriptor(path)
                if computed is not None:
                    descriptors.append(computed)
    if not descriptors:
        return None, 0
    return np.mean(descriptors, axis=0), len(descriptors)


def _source_age_output(entry: Edit | dict[str, Any]) -> int | None:
    """The target age equal to the edit's source age (the reconstruction), when it was edited to."""
    edit = entry if isinstance(entry, Edit) else Edit.model_validate(entry)
    if edit.source_age is None:
        return None
    source = float(edit.source_age)
    if not source.is_integer():
        return None
    # An age kept from an earlier call (``history``) was made from that call's source age.
    other_source = edit.ages_from_other_source_age()
    return int(source) if int(source) in edit.target_ages and int(source) not in other_source else None


def reconstruction_scores(input_image: Image.Image, output_image: Image.Image) -> dict[str, Any]:
    """PSNR/SSIM of an output against the aligned input (resized to the output's size when needed)."""
    resized = input_image.size != output_image.size
    reference = input_image.resize(output_image.size, Image.LANCZOS) if resized else input_image
    value = metrics.psnr(reference, output_image)
    return {
        "psnr": None if math.isinf(value) else value,
        "identical": math.isinf(value),
        "ssim": metrics.ssim(reference, output_image),
        "size": list(output_image.size),
        "input_resized": resized,
    }


# Images waiting for the age estimates (with the score that takes them), and the contact sheet's tiles.
_EstimateQueue = list[tuple[OutputScore | EditScore, Image.Image]]
_Tiles = dict[tuple[str, int | str], Image.Image]


# ---- the stage ------------------------------------------------------------------------------------------
def run_evaluate(
    project: Project,
    *,
    edits: list[str],
    report_dir: Path | None,
    dex_weights: Path | None,
    device: str,
    age_estimator: str = "auto",
) -> StageSummary:
    """Score the project's recorded edits and write report.json, report.md and contact_sheet.png."""
    _require_manifest(project)
    if report_dir is not None and Path(report_dir).expanduser().exists() and not Path(report_dir).expanduser().is_dir():
        raise SelfageError(f"--report {report_dir} is a file; pass a folder for the report (it is created if needed).")
    manifest = load_manifest(project)
    chosen = select_edits(project, manifest.edits, list(edits or []))
    summary = StageSummary("eval")
    from selfage_cli.eval.estimators import estimate_all, load_estimators

    estimators, dex_path, age_notes = load_estimators(age_estimator, dex_weights, project, device)
    identity = _Identity()
    notes = _warn_notes([*age_notes, identity.note])
    ref_mean, ref_count = _reference_mean(project, manifest, identity, notes)
    scores, images, tiles = _score_edits(project, chosen, identity, ref_mean, summary)
    estimate_all(estimators, images)
    report = build_report(
        project, scores, dex_path=dex_path, ref_count=ref_count, notes=notes, identity_available=identity.available
    )
    report["age_estimators"] = [model.describe() for model in estimators]
    by_estimator = {
        model.name: metrics.aggregate_age_errors(
            metrics.AgeError(o.target_age, o.estimates[model.name])
            for s in scores
            for o in s.outputs
            if model.name in o.estimates
        )
        for model in estimators
    }
    report["summary"]["age_by_estimator"] = by_estimator
    files = _write_report_files(report, report_dir, project, tiles)
    return _report_summary(summary, scores, report, notes, files)


def _require_manifest(project: Project) -> None:
    """Exit 2 unless ``project`` has a manifest."""
    if not project.exists():
        raise SelfageError(
            f"--project {project.root} has no {project.manifest_path.name}; point -p at a project where "
            "`selfage edit` has run."
        )


def _warn_notes(notes: list[str | None]) -> list[str]:
    """The notes that apply (not None), each shown as a warning; they go into the report."""
    kept = [note for note in notes if note]
    for note in kept:
        console.warn(note)
    return kept


def _reference_mean(
    project: Project, manifest: Manifest, identity: _Identity, notes: list[str]
) -> tuple[np.ndarray | None, int]:
    """The references' mean descriptor and how many were used; a note (no warning) when there is none."""
    ref_mean, ref_count = reference_mean_descriptor(project, manifest.references, identity)
    if identity.available and ref_mean is None:
        notes.append(
            "distance to the references not measured: the project has no references with a face "
            "descriptor (run `selfage align --role refs` on the person's photos)."
        )
    return ref_mean, ref_count


def _score_edits(
    project: Project,
    chosen: list[Edit],
    identity: _Identity,
    ref_mean: np.ndarray | None,
    summary: StageSummary,
) -> tuple[list[EditScore], _EstimateQueue, _Tiles]:
    """Score identity and reconstruction of every chosen edit (with a progress bar).

    Returns the scores, the (score, image) pairs left for DEX, and the contact sheet's tiles.
    """
    scores: list[EditScore] = []
    images: _EstimateQueue = []  # for DEX, batched at the end
    tiles: _Tiles = {}
    with console.progress(transient=True) as bar:
        task = console.new_task(bar, "identity", total=sum(len(e.target_ages) for e in chosen))
        for entry in chosen:
            score = _score_edit(project, entry, identity, ref_mean, summary, images, tiles)
            if score is not None:
                scores.append(score)
            bar.update(task, advance=len(entry.target_ages))
    return scores, images, tiles


def _write_report_files(
    report: dict[str, Any], report_dir: Path | None, project: Project, tiles: _Tiles
) -> dict[str, Path]:
    """Write the report files (replacing, with a warning, an earlier report) and list them in ``report``."""
    from selfage_cli.eval.report import write_report

    folder = Path(report_dir).expanduser() if report_dir is not None else project.writable_path("eval")
    previous = [name for name in REPORT_FILES if (folder / name).exists()]
    if previous:  # a derived artefact: replaced without --force, but never silently
        console.warn(f"replacing the previous report in {folder} ({', '.join(previous)}).")
    files = write_report(report, folder, tiles)
    report["files"] = {k: str(v) for k, v in files.items()}
    return files


def _report_summary(
    summary: StageSummary, scores: list[EditScore], report: dict[str, Any], notes: list[str], files: dict[str, Path]
) -> StageSummary:
    """Fill the stage summary: one done item per edit, the report, its notes and the human lines."""
    for score in scores:
        summary.done.append({"id": score.id, "outputs": len(score.outputs)})
    summary.data["report"] = report
    summary.warnings.extend(notes)
    summary.lines.extend(_summary_lines(report))
    summary.lines.append(f"wrote {', '.join(str(p) for p in files.values())}")
    return summary


def _score_edit(
    project: Project,
    entry: Edit,
    identity: _Identity,
    ref_mean: np.ndarray | None,
    summary: StageSummary,
    images: _EstimateQueue,
    tiles: _Tiles,
) -> EditScore | None:
    """Score one edit's outputs (identity, reconstruction), queueing its images for DEX and the sheet."""
    edit_id = entry.id
    input_rel = entry.input
    input_path = project.path(input_rel) if input_rel else None
    if input_path is None or not input_path.is_file():
        summary.fail(edit_id, f"the aligned input {input_rel} is missing; re-run `selfage edit` on the photo.")
        return None
    try:
        input_image = load_image(input_path)
    except UnreadableImageError as exc:
        summary.fail(edit_id, exc.sentence("re-run `selfage edit --force` on the photo"))
        return None
    score = EditScore(
        id=edit_id,
        input=str(input_rel),
        source_age=entry.source_age,
        lora=entry.lora,
        settings=dict(entry.settings or {}),
    )
    input_descriptor = identity.descriptor(input_path, input_image)
    score.input_face_found = None if not identity.available else input_descriptor is not None
    images.append((score, input_image))
    tiles[(edit_id, "input")] = input_image
    recon_age = _source_age_output(entry)
    outputs = entry.outputs
    for age in entry.target_ages:
        age = int(age)
        rel = outputs.get(str(age))
        path = project.path(rel) if rel else None
        if path is None or not path.is_file():
            summary.fail(
                f"{edit_id}/{age}",
                f"the output {rel or '(not recorded)'} is missing; re-run `selfage edit --force` for this photo.",
            )
            continue
        try:
            output, image = _score_output(path, str(rel), age, identity, input_descriptor, ref_mean)
        except UnreadableImageError as exc:
            summary.fail(f"{edit_id}/{age}", exc.sentence("re-run `selfage edit --force` for this photo"))
            continue
        if age == recon_age:
            score.reconstruction = {"target_age": age, **reconstruction_scores(input_image, image)}
        score.outputs.append(output)
        images.append((output, image))
        tiles[(edit_id, age)] = image
    return score


def _score_output(
    path: Path,
    rel: str,
    age: int,
    identity: _Identity,
    input_descriptor: np.ndarray | None,
    ref_mean: np.ndarray | None,
) -> tuple[OutputScore, Image.Image]:
    """One output's identity scores (face found, distances to the input and the references), and its image."""
    image = load_image(path)
    output = OutputScore(target_age=age, path=rel)
    descriptor = identity.descriptor(path, image)
    output.face_found = None if not identity.available else descriptor is not None
    output.distance_to_input = identity.distance(descriptor, input_descriptor)
    output.distance_to_references = identity.distance(descriptor, ref_mean)
    return output, image


def build_report(
    project: Project,
    scores: list[EditScore],
    *,
    dex_path: str | None,
    ref_count: int,
    notes: list[str],
    identity_available: bool,
) -> dict[str, Any]:
    """The report as one JSON-ready dict (per-edit scores plus the aggregates)."""
    outputs = [o for s in scores for o in s.outputs]
    age_errors = [metrics.AgeError(o.target_age, o.estimated_age) for o in outputs if o.estimated_age is not None]
    recon = [s.reconstruction for s in scores if s.reconstruction]
    psnrs = [r["psnr"] for r in recon if r["psnr"] is not None]
    return {
        "report_version": 1,
        "created": now_iso(),
        "project": str(project.root),
        "dex": {"weights": dex_path, "preprocess": DEX_PREPROCESS if dex_path else None, "measured": bool(dex_path)},
        "identity": {"measured": identity_available, "threshold": SAME_PERSON_THRESHOLD, "references_used": ref_count},
        "notes": notes,
        "edits": [s.to_json() for s in scores],
        "summary": {
            "edits": len(scores),
            "outputs": len(outputs),
            "age": metrics.aggregate_age_errors(age_errors),
            "identity_to_input": metrics.distance_summary([o.distance_to_input for o in outputs], SAME_PERSON_THRESHOLD)
            if identity_available
            else None,
            "identity_to_references": metrics.distance_summary(
                [o.distance_to_references for o in outputs], SAME_PERSON_THRESHOLD
            )
            if identity_available and ref_count
            else None,
            "reconstruction": {
                "count": len(recon),
                "psnr_mean": float(np.mean(psnrs)) if psnrs else None,
                "identical": sum(1 for r in recon if r["identical"]),
                "ssim_mean": float(np.mean([r["ssim"] for r in recon])) if recon else None,
            }
            if recon
            else None,
        },
    }


def _summary_lines(report: dict[str, Any]) -> list[str]:
    """The human report lines for the report's aggregates."""
    s = report["summary"]
    lines = [f"evaluated {s['edits']} edit(s), {s['outputs']} output(s)"]
    by_estimator = s.get("age_by_estimator") or {}
    for name, value in by_estimator.items():
        if value:
            lines.append(f"age ({name}): MAE {fmt(value['mae'])} years over {value['count']} output(s)")
    if not s["age"]:
        lines.append("age: not measured (no age estimator)")
    for key, label in (("identity_to_input", "identity to input"), ("identity_to_references", "identity to refs")):
        value = s.get(key)
        if value and value["count"]:
            lines.append(
                f"{label}: mean distance {fmt(value['mean'], 3)}, "
                f"{100 * value['share_under_threshold']:.0f}% under {SAME_PERSON_THRESHOLD}"
                + (f", {value['no_face']} without a face" if value["no_face"] else "")
            )
        elif value:
            lines.append(f"{label}: no face found in any output")
    if s["reconstruction"]:
        r = s["reconstruction"]
        lines.append(
            f"reconstruction: PSNR {fmt(r['psnr_mean'])} dB, SSIM {fmt(r['ssim_mean'], 3)} "
            f"({r['count']} edit(s) with the source age)"
        )
    return lines
