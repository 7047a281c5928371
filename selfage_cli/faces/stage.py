"""The ``selfage align`` stage: photos and folders in, aligned PNGs and manifest entries out.

:func:`run_align` hashes every photo, skips those already aligned (same sha256) unless ``force``,
aligns the rest in a process pool (each worker loads the dlib models once), writes the PNGs, and
registers the successes in one locked manifest update. After references it runs the identity check
(:func:`check_identity`), which ``selfage align --check`` also runs alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfage_cli.errors import SelfageError
from selfage_cli.files import write_new
from selfage_cli.manifest import ALIGNED, ImageEntry, copy_age_label, find, reuse_or_allocate_id, safe_id, taken_ids
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project, now_iso
from selfage_cli.summary import StageSummary

ROLES = {"refs": ("references", ("refs", "aligned")), "inputs": ("inputs", ("inputs", "aligned"))}
# Folders of a project that hold selfage's own outputs: never aligned as sources.
OUTPUT_DIRS = ("refs/aligned", "inputs/aligned", "edits", "runs", "cache", "reg")
# The fields of an aligned face reported in the summary's ``done`` list.
DONE_KEYS = ("id", "source", ALIGNED, "face_index", "faces_found", "score")
MIN_JOBS_PER_WORKER = 3


@dataclass(frozen=True)
class AlignJob:
    """One photo for a worker."""

    source: str
    size: int
    detector: str
    all_faces: bool
    descriptors: bool


@dataclass
class JobResult:
    """What a worker sends back: per face, manifest fields plus the encoded PNG."""

    source: str
    faces: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # the process's peak resident memory so far (Linux), for benchmarks


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (VmHWM, Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def run_job(job: AlignJob) -> JobResult:
    """Align one photo (runs in a worker process or in-process); never raises for a bad photo."""
    from selfage_cli.faces.engine.align import align_loaded
    from selfage_cli.faces.engine.errors import FaceError
    from selfage_cli.faces.engine.identity import face_descriptor
    from selfage_cli.faces.engine.loading import load_image

    start = time.perf_counter()
    result = JobResult(source=job.source)
    path = Path(job.source)
    try:
        image = load_image(path)
        faces, result.warnings = align_loaded(
            image, name=path.name, size=job.size, detector=job.detector, all_faces=job.all_faces
        )
        for face in faces:
            fields = face.to_entry()
            if job.descriptors:
                descriptor = face_descriptor(face.image, face.aligned_landmarks)
                fields["descriptor"] = None if descriptor is None else [round(float(v), 6) for v in descriptor]
            buffer = io.BytesIO()
            face.image.save(buffer, format="PNG")
            fields["png"] = buffer.getvalue()
            result.faces.append(fields)
    except FaceError as exc:
        result.error = str(exc)
    except SelfageError:
        raise  # a setup problem (e.g. missing dlib model files), not this photo's: exit 2 with its fix
    except MemoryError:
        result.error = f"{path.name}: out of memory while aligning; downscale the photo or use fewer --workers."
    except Exception as exc:  # noqa: BLE001 - one bad photo must not stop the others
        result.error = f"{path.name}: unexpected {type(exc).__name__} while aligning ({exc}); please report it."
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = _peak_rss_mb()
    return result


# ---- sources ----------------------------------------------------------------------------------
def collect_sources(sources: list[Path], project: Project | None = None) -> list[Path]:
    """Files as given and image files found recursively in folders (hidden ones and project outputs skipped)."""
    from selfage_cli.faces.engine.loading import images_in_folder

    excluded = [project.root / d for d in OUTPUT_DIRS] if project is not None else []
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = images_in_folder(path.resolve(), excluded)
            if not files:
                raise SelfageError(
                    f"{path}: no photos found in this folder (searched recursively for .jpg, .jpeg, .png, .webp, "
                    ".bmp, .tif, .tiff); check the path."
                )
            found.extend(files)
        elif path.exists():
            found.append(path.resolve())
        else:
            raise SelfageError(f"{path}: no such file or folder; check the path.")
    return list(dict.fromkeys(found))


def _workers(requested: int, jobs: int) -> int:
    """Processes to use: as requested (at most one per photo); automatic (0): one per core, but only when
    each worker gets at least MIN_JOBS_PER_WORKER photos (starting a worker and loading the dlib models
    costs about as much as aligning two photos)."""
    if requested < 0:
        raise SelfageError(f"--workers {requested} must be 0 (one per core) or a positive number.")
    if requested:
        return max(1, min(requested, jobs))
    return max(1, min(os.cpu_count() or 1, jobs // MIN_JOBS_PER_WORKER))


def _run_jobs(jobs: list[AlignJob], workers: int, on_result: Callable[[JobResult], None]) -> None:
    """Run jobs in-process (one worker) or in a spawn-based process pool; call ``on_result`` as each ends."""
    if workers <= 1:
        for job in jobs:
            on_result(run_job(job))
        return
    import multiprocessing

    # spawn: no inherited threads or locks (torch may be loaded in the parent); each worker loads the
    # dlib models on first use and keeps them for its next photos.
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {executor.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                on_result(future.result())
            except BrokenProcessPool:
                on_result(
                    JobResult(
                        source=job.source,
                        error=f"{Path(job.source).name}: the worker process died "
                        "(out of memory?); rerun with fewer --workers.",
                    )
                )
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


# ---- the stage -----------------------------------------------------------------------------------
def run_align(
    project: Project,
    sources: list[Path],
    *,
    role: str = "refs",
    size: int = 512,
    detector: str = "hog",
    all_faces: bool = False,
    force: bool = False,
    workers: int = 0,
) -> StageSummary:
    """Align photos into ``refs/aligned/`` or ``inputs/aligned/`` and register them (the ``selfage align`` body)."""
    size, detector = _check_options(sources, role, size, detector)
    section, folder_parts = ROLES[role]
    rel_dir = "/".join(folder_parts)
    summary = StageSummary("align")
    summary.data.update({"role": role, "aligned_dir": rel_dir})

    paths = collect_sources(sources, project)
    todo = _photos_to_align(paths, load_manifest(project).section(section), force, summary)
    out_dir = project.subdir(*folder_parts)
    jobs = [
        AlignJob(source=s, size=size, detector=detector, all_faces=all_faces, descriptors=role == "refs") for s in todo
    ]
    n_workers = _workers(workers, len(jobs)) if jobs else 0
    temp_files: dict[tuple[str, int], Path] = {}
    started = time.perf_counter()
    try:
        results = _align_with_progress(jobs, n_workers, out_dir, temp_files)
        elapsed = time.perf_counter() - started
        _register_results(project, section, todo, results, temp_files, out_dir, all_faces, summary)
    finally:
        for temp in temp_files.values():
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    _report_alignment(summary, len(todo), elapsed, n_workers, rel_dir, given=len(paths))
    if role == "refs":
        _add_identity_check(summary, check_identity(project))
    return summary


def _check_options(sources: list[Path], role: str, size: int, detector: str) -> tuple[int, str]:
    """Validate the options (raising SelfageError with the fix); return the checked size and detector."""
    from selfage_cli.faces.engine.align import check_size
    from selfage_cli.faces.engine.detect import check_detector

    if role not in ROLES:
        raise SelfageError(f"--role {role!r} is not known; use refs (photos for training) or inputs (photos to edit).")
    size = check_size(size)
    detector = check_detector(detector)
    if not sources:
        raise SelfageError("no photos given; pass photos or folders, e.g. selfage align ./me -p proj.")
    return size, detector


def _photos_to_align(
    paths: list[Path], entries: list[ImageEntry], force: bool, summary: StageSummary
) -> dict[str, str]:
    """Hash each photo; skip those already aligned (unless ``force``) and duplicates; return {source: sha256}."""
    todo: dict[str, str] = {}
    seen_hashes: dict[str, str] = {}
    for path, digest in summary.hashed(paths, end="."):
        existing = find(entries, digest, key="sha256")
        if existing is not None and not force:
            summary.skipped.append(
                {
                    "id": existing.id,
                    "source": str(path),
                    ALIGNED: existing.aligned,
                    "reason": "already aligned (same sha256)",
                }
            )
            continue
        if digest in seen_hashes:
            summary.skipped.append({"source": str(path), "reason": f"same content as {seen_hashes[digest]}"})
            continue
        seen_hashes[digest] = str(path)
        todo[str(path)] = digest
    return todo


def _align_with_progress(
    jobs: list[AlignJob], n_workers: int, out_dir: Path, temp_files: dict[tuple[str, int], Path]
) -> dict[str, JobResult]:
    """Run the jobs under a progress bar, saving each face's PNG to a temporary file; return {source: result}."""
    from selfage_cli import console

    results: dict[str, JobResult] = {}
    if not jobs:
        return results
    with console.progress() as bar:
        task = console.new_task(bar, f"aligning ({n_workers} worker{'s' if n_workers > 1 else ''})", len(jobs))

        def on_result(result: JobResult) -> None:
            results[result.source] = result
            _save_temp_pngs(result, out_dir, temp_files)
            bar.update(task, advance=1, status=Path(result.source).name)

        _run_jobs(jobs, n_workers, on_result)
    return results


def _save_temp_pngs(result: JobResult, out_dir: Path, temp_files: dict[tuple[str, int], Path]) -> None:
    """Move each face's encoded PNG out of ``result`` into a temporary file in ``out_dir``, keyed (source, index)."""
    for index, face in enumerate(result.faces):
        temp = out_dir / f".tmp-{uuid.uuid4().hex}.png"
        temp_files[(result.source, index)] = temp  # listed before it is written: a failed write is removed too
        write_new(temp, face.pop("png"))


def _register_results(
    project: Project,
    section: str,
    todo: dict[str, str],
    results: dict[str, JobResult],
    temp_files: dict[tuple[str, int], Path],
    out_dir: Path,
    all_faces: bool,
    summary: StageSummary,
) -> None:
    """Report each photo's warnings and failure; register the successes in one locked manifest update."""
    with update_manifest(project) as manifest:
        if not manifest.has(section):
            setattr(manifest, section, [])  # written even when nothing is registered, as before
        entries = manifest.section(section)
        for source, digest in todo.items():
            result = results[source]
            for message in result.warnings:
                _warn(summary, message)
            if result.error is not None:
                summary.fail(source, result.error.removeprefix(f"{Path(source).name}: "))
                continue
            _register(project, entries, source, digest, result, temp_files, out_dir, all_faces, summary)
        summary.data[section] = len(entries)


def _register(
    project: Project,
    entries: list[ImageEntry],
    source: str,
    digest: str,
    result: JobResult,
    temp_files: dict[tuple[str, int], Path],
    out_dir: Path,
    all_faces: bool,
    summary: StageSummary,
) -> None:
    """Replace this source's old entries (same sha256 or same path) by the new faces; move PNGs into place."""
    old = _remove_old_entries(project, entries, source, digest)
    same_content = [e for e in old if e.sha256 == digest]
    if old and not same_content:
        _warn(
            summary, f"{Path(source).name} changed since it was aligned; re-aligned it (its age labels were dropped)."
        )
    taken = taken_ids(entries, out_dir)
    stem = safe_id(Path(source).stem)
    for index, face in enumerate(result.faces):
        base = f"{stem}_face{face['face_index'] + 1}" if all_faces else stem
        entry_id = reuse_or_allocate_id(old[index].id if index < len(old) else None, base, taken)
        target = out_dir / f"{entry_id}.png"
        os.replace(temp_files.pop((source, index)), target)
        entry = _face_entry(entry_id, source, digest, project.relative(target), face, same_content)
        entries.append(entry)
        summary.done.append({key: getattr(entry, key) for key in DONE_KEYS})
        summary.lines.append(f"{Path(source).name} → {entry.aligned}")


def _remove_old_entries(project: Project, entries: list[ImageEntry], source: str, digest: str) -> list[ImageEntry]:
    """Remove (and return) the entries of this content or this path, deleting their aligned PNGs."""
    old = [e for e in entries if e.sha256 == digest or e.source == source]
    for entry in old:
        entries.remove(entry)
        aligned = entry.aligned
        if aligned:
            with contextlib.suppress(FileNotFoundError, SelfageError):
                project.path(aligned)  # checked to lie inside the project; a link is deleted, not its target
                (project.root / aligned).unlink()
    return old


def _face_entry(
    entry_id: str, source: str, digest: str, aligned: str, face: dict[str, Any], same_content: list[ImageEntry]
) -> ImageEntry:
    """The manifest entry of one aligned face (``face``: its fields from ``AlignedFace.to_entry``, the descriptor);
    age labels are kept from the same content's entry of that id."""
    entry = ImageEntry(id=entry_id, source=source, sha256=digest, aligned=aligned, **face)
    previous = next((e for e in same_content if e.id == entry_id), None)
    copy_age_label(entry, previous)  # kept from the same content's entry, else blank
    entry.aligned_at = now_iso()
    return entry


def _report_alignment(
    summary: StageSummary, photos: int, elapsed: float, n_workers: int, rel_dir: str, given: int | None = None
) -> None:
    """Add the timing data and the one-line report of the run (``photos`` aligned now of ``given`` found)."""
    summary.data["seconds_per_photo"] = round(elapsed / photos, 3) if photos else None
    summary.data["workers"] = n_workers
    summary.lines.append(
        f"aligned {len(summary.done)} face(s) from {photos if given is None else given} photo(s) into {rel_dir}/"
        + (f"; {len(summary.skipped)} skipped (already aligned; --force to redo)" if summary.skipped else "")
        + (f"; {len(summary.failures)} failed" if summary.failures else "")
        + (f" [{elapsed / photos:.2f} s per photo, {n_workers} worker(s)]" if photos else "")
    )


def _add_identity_check(summary: StageSummary, identity: StageSummary) -> None:
    """Append the identity check's lines, warnings and data to the align summary."""
    summary.lines.extend(identity.lines)
    summary.warnings.extend(identity.warnings)
    summary.data.update(identity.data)


def _warn(summary: StageSummary, message: str) -> None:
    """Show a warning and record it in the summary."""
    from selfage_cli import console

    console.warn(message)
    summary.warnings.append(message)


# ---- identity check ----------------------------------------------------------------------------
def check_identity(project: Project) -> StageSummary:
    """Pairwise descriptor distances of the aligned references; warn about likely other people.

    Descriptors stored in the manifest are used; missing ones are computed from the aligned images.
    A reference whose median distance to the others exceeds 0.6 (dlib's same-person threshold) is a
    suspect: a warning names its file.
    """
    from selfage_cli.faces.engine.identity import (
        SAME_PERSON_THRESHOLD,
        distance_table,
        format_table,
        median_distances,
        suspects,
    )

    summary = StageSummary("align")
    references = load_manifest(project).references
    descriptors = _reference_descriptors(project, references, summary)
    table = distance_table(descriptors)
    medians = median_distances(table)
    flagged = suspects(table)
    summary.data["distances"] = table
    summary.data["median_distances"] = {k: round(v, 4) for k, v in medians.items()}
    summary.data["suspects"] = flagged
    if len(descriptors) < 2:
        summary.lines.append(f"identity check: needs at least two aligned references (found {len(descriptors)}).")
        return summary
    summary.lines.append(
        f"identity check: dlib descriptor distances between the {len(descriptors)} references "
        f"(same person below {SAME_PERSON_THRESHOLD}):"
    )
    summary.lines.extend("  " + line for line in format_table(table))
    _warn_suspects(summary, references, flagged, medians)
    if not flagged:
        summary.lines.append("identity check: all references look like the same person.")
    return summary


def _reference_descriptors(project: Project, references: list[ImageEntry], summary: StageSummary) -> dict[str, Any]:
    """{id: descriptor} of the references: stored ones, else computed from the aligned image (left out if none)."""
    descriptors: dict[str, Any] = {}
    for entry in references:
        descriptor = entry.descriptor
        if descriptor is None and entry.aligned:
            descriptor = _descriptor_of_aligned(project, entry.aligned, summary)
        if descriptor is not None:
            descriptors[str(entry.id)] = descriptor
    return descriptors


def _descriptor_of_aligned(project: Project, aligned: str, summary: StageSummary) -> Any | None:
    """The descriptor computed from an aligned PNG, or None (with a warning) when unreadable or faceless."""
    from PIL import Image

    from selfage_cli.faces.engine.identity import face_descriptor

    path = project.path(aligned)
    try:
        with Image.open(path) as img:
            descriptor = face_descriptor(img.convert("RGB"))
    except OSError as exc:
        _warn(summary, f"{aligned}: cannot be read for the identity check ({exc}); re-run selfage align --force.")
        return None
    if descriptor is None:
        _warn(summary, f"{aligned}: no face found in the aligned image; it is left out of the identity check.")
    return descriptor


def _warn_suspects(
    summary: StageSummary, references: list[ImageEntry], flagged: list[str], medians: dict[str, float]
) -> None:
    """Warn about each suspect reference, naming its aligned file and source photo."""
    from selfage_cli.faces.engine.identity import SAME_PERSON_THRESHOLD

    by_id = {str(e.id): e for e in references}
    for key in flagged:
        entry = by_id.get(key)
        aligned, source = (entry.aligned, entry.source) if entry is not None else (key, key)
        _warn(
            summary,
            f"{aligned} (from {Path(str(source)).name}): median identity distance "
            f"{medians[key]:.2f} to the other references is above {SAME_PERSON_THRESHOLD} (dlib's same-person "
            "threshold); if it shows someone else, remove that photo: it would poison the personalisation.",
        )
