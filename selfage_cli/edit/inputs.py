"""The photos an edit works on: registering them as project inputs and loading them for the model.

Raw photos go through the align stage's own code (``selfage_cli.faces.stage.run_align`` with
``role="inputs"``). With ``--aligned`` the photos are taken as FFHQ-aligned squares: each is copied,
resized to the model's native resolution, into ``inputs/aligned/<id>.png`` and registered (the
original file is never modified). Without IMAGES every registered input is edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from selfage_cli.errors import SelfageError
from selfage_cli.faces.engine.errors import UnreadableImageError
from selfage_cli.faces.engine.loading import images_in_folder, load_image
from selfage_cli.files import atomic_save
from selfage_cli.manifest import INPUTS, ImageEntry, allocate_id, copy_age_label, upsert
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project, now_iso
from selfage_cli.summary import StageSummary

ALIGN_MIN_SIZE = 512  # raw photos are FFHQ-aligned at 512 px (or the model's resolution if larger)


@dataclass
class InputPhoto:
    """One registered input, as the edit loop needs it."""

    id: str
    entry: ImageEntry
    given: Path | None = None  # the photo as given in this call (same sha256; may have moved since it was aligned)

    @property
    def aligned(self) -> str:
        return str(self.entry.aligned)


def expand_images(images: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for images; missing paths reported as failures."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for image in images:
        path = Path(image).expanduser()
        if path.is_dir():
            found = images_in_folder(path)
            if not found:
                missing.append((str(image), "the folder holds no images (png, jpg, webp, bmp, tif)"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            missing.append((str(image), "no such file or folder; check the path"))
    unique: list[Path] = []
    for file in files:
        if file.resolve() not in [u.resolve() for u in unique]:
            unique.append(file)
    return unique, missing


def find_input_by_sha(project: Project, sha: str) -> ImageEntry | None:
    """The registered input whose source has this sha256 (the first face when several)."""
    entries = [e for e in load_manifest(project).inputs if e.sha256 == sha and e.aligned]
    entries.sort(key=lambda e: int(e.face_index or 0))
    for entry in entries:
        if project.path(entry.aligned).is_file():
            return entry
    return None


def all_inputs(project: Project) -> list[InputPhoto]:
    """Every input registered in the project (exit 2 when there is none)."""
    entries = [e for e in load_manifest(project).inputs if e.aligned]
    if not entries:
        raise SelfageError(
            f"{project.manifest_path}: no inputs are registered in this project; pass photos to edit "
            "(selfage edit photo.jpg --ages 0,20,80) or register them first with selfage align PHOTO --role inputs."
        )
    return [InputPhoto(str(e.id), e) for e in entries]


def register_aligned(project: Project, files: list[Path], resolution: int, summary: StageSummary) -> list[InputPhoto]:
    """``--aligned``: copy square photos, resized to ``resolution``, into ``inputs/aligned/`` and register them."""
    out: list[InputPhoto] = []
    for file, sha in summary.hashed(files):
        existing = find_input_by_sha(project, sha)
        if existing is not None and (existing.get("detector") or int(existing.get("size") or 0) == resolution):
            out.append(InputPhoto(str(existing.id), existing))
            continue
        try:
            image = load_image(file)  # the align stage's reader: EXIF orientation, any mode to 8-bit RGB
        except UnreadableImageError as exc:
            summary.fail(str(file), str(exc).removeprefix(f"{file.name}: "))
            continue
        if image.width != image.height:
            summary.fail(
                str(file),
                f"is {image.width}×{image.height}, not square, so it cannot be an aligned face; drop --aligned to "
                "align it (selfage finds and crops the face)",
            )
            continue
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        with update_manifest(project) as manifest:
            if not manifest.has(INPUTS):
                manifest.inputs = []  # the section goes where a dict's new key would
            inputs = manifest.inputs
            folder = project.subdir("inputs", "aligned")
            # a new id is free in the manifest and on disk (never overwrites an unregistered file)
            input_id = existing.id if existing is not None else allocate_id(file.stem, inputs, folder)
            target = folder / f"{input_id}.png"
            atomic_save(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
            registered = ImageEntry(
                id=input_id,
                source=str(file.resolve()),
                sha256=sha,
                aligned=project.relative(target),
                size=resolution,
                detector=None,
                prealigned=True,
                face_index=0,
                faces_found=1,
            )
            copy_age_label(registered, existing)  # kept from the same photo's entry, else blank
            registered.registered = now_iso()
            upsert(inputs, registered)
        out.append(InputPhoto(input_id, registered))
    return out


def register_raw(project: Project, files: list[Path], resolution: int, summary: StageSummary) -> list[InputPhoto]:
    """Align raw photos with the align stage's code (role ``inputs``) and return their entries."""
    from selfage_cli.faces.stage import run_align

    aligned = run_align(project, files, role="inputs", size=max(ALIGN_MIN_SIZE, resolution))
    summary.warnings.extend(aligned.warnings)
    reasons = {failure.item: failure.reason for failure in aligned.failures}
    out: list[InputPhoto] = []
    for file, digest in summary.hashed(files):
        entry = find_input_by_sha(project, digest)
        if entry is None:
            reason = next((r for item, r in reasons.items() if _same_file(item, file)), None)
            summary.fail(str(file), reason or "could not be aligned (no face found); try another photo or --aligned")
            continue
        out.append(InputPhoto(str(entry.id), entry, given=file))
    return out


def _same_file(item: str, file: Path) -> bool:
    try:
        return Path(item).expanduser().resolve() == file.resolve() or Path(item).name == file.name
    except OSError:
        return False


class MissingAlignedError(SelfageError):
    """A registered input whose aligned image is gone: that photo fails (exit 1), the others are edited."""


def load_for_model(project: Project, photo: InputPhoto, resolution: int) -> Image.Image:
    """The aligned input as an RGB image at the model's resolution (:class:`MissingAlignedError` when
    its aligned file is gone, naming the file and the command that re-creates it)."""
    path = project.path(photo.aligned)
    if not path.is_file():
        source = photo.entry.source or "PHOTO"
        again = (
            f"selfage edit {source} --aligned --force"
            if photo.entry.prealigned
            else f"selfage align {source} --role inputs --force"
        )
        raise MissingAlignedError(
            f"its aligned image {photo.aligned} is missing from the project; re-create it with `{again} -p "
            f"{project.root}` (or pass the photo to `selfage edit` again)."
        )
    with Image.open(path) as handle:
        image = handle.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image
