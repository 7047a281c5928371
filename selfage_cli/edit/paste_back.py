"""``edit --paste-back``: the edited faces put back into the user's own photo, at its full resolution.

Per edited age, ``edits/<id>/<age>_full.<ext>`` is the source photo (EXIF orientation applied, as the
user sees it) with the edited crop blended back where it was aligned from
(:mod:`selfage_cli.faces.engine.paste_back`); JPEG photos give JPEG files (quality :data:`JPEG_QUALITY`, 4:4:4,
the photo's RGB colour profile and EXIF kept, orientation tag dropped), all others PNG. With
``--side-by-side`` and ``--gif`` also ``strip_full.<ext>`` (the photo then every age, each tile at most
:data:`STRIP_TILE_WIDTH` px wide, labelled) and ``ages_full.gif`` (at most :data:`GIF_SIDE` px).

The source photo must still be where the input's manifest entry says, with the same sha256; inputs
registered with ``--aligned`` have no photo to paste into. :func:`paste_back_recorded`
(``--paste-back-only``) does the same for edits made earlier, without editing again. The photo is
decoded once; each age is pasted into it, saved, and the face's box restored, so memory stays at one
8-bit copy of the photo whatever the number of ages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from selfage_cli.edit.outputs import EDITS_DIR, GIF_FRAME_MS, _draw_centred, age_label, label_band_height, outputs_held
from selfage_cli.errors import SelfageError
from selfage_cli.faces.engine.errors import UnreadableImageError
from selfage_cli.faces.engine.loading import load_image
from selfage_cli.files import atomic_save
from selfage_cli.manifest import Edit, ImageEntry, find
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project, sha256_file
from selfage_cli.summary import StageSummary

JPEG_QUALITY = 95
STRIP_TILE_WIDTH = 1600
GIF_SIDE = 768
FULL_SUFFIX = "_full"
STRIP_FULL_STEM = "strip_full"
GIF_FULL_NAME = "ages_full.gif"


@dataclass
class FullOutputs:
    """The full-frame files one paste-back writes (absolute paths)."""

    ages: dict[int, Path] = field(default_factory=dict)
    strip: Path | None = None
    gif: Path | None = None

    def all_paths(self) -> list[Path]:
        return list(self.ages.values()) + [p for p in (self.strip, self.gif) if p is not None]

    def existing(self) -> list[Path]:
        return [p for p in self.all_paths() if p.exists()]


@dataclass
class SourcePhoto:
    """An input's source photo, checked: where it is, how to save like it, where the face lies."""

    path: Path
    landmarks: np.ndarray
    aligned_size: int
    suffix: str  # ".jpg" or ".png"


def check_call(aligned: bool, paste_back: bool) -> None:
    """Exit 2 before any work when ``--aligned`` meets ``--paste-back``/``--paste-back-only``."""
    if aligned and paste_back:
        raise SelfageError(
            "--paste-back needs the original photo, and --aligned inputs are already crops with no photo "
            "around them; drop --aligned (selfage aligns the photo itself) or drop --paste-back."
        )


def source_photo(
    project: Project, entry: ImageEntry | dict[str, Any], photo_path: Path | None = None
) -> SourcePhoto | str:
    """The checked source photo of an input entry, or the one-sentence reason there is none.

    ``photo_path`` (a photo given on the command line with the same sha256) replaces the recorded path.
    """
    name = str(entry.get("id"))
    if entry.get("prealigned") or not entry.get("landmarks"):
        return (
            f"input {name} was registered as an aligned crop (--aligned), so there is no photo to paste it back "
            "into; edit the original photo instead (selfage edit PHOTO --paste-back)"
        )
    recorded = entry.get("source")
    path = Path(photo_path) if photo_path is not None else Path(str(recorded)) if recorded else None
    if path is None or not path.is_file():
        return (
            f"the source photo of {name}, {recorded}, is no longer there; pass the photo's new path "
            "(selfage edit --paste-back-only PHOTO)"
        )
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return f"the source photo of {name}, {path}, cannot be read ({exc.strerror}); make it readable"
    if entry.get("sha256") and digest != entry.get("sha256"):
        return (
            f"the source photo of {name}, {path}, changed since it was aligned (sha256 differs), so the face is "
            "no longer where it was recorded; edit the photo again (selfage edit PHOTO --paste-back)"
        )
    size = entry.get("size") or _aligned_size(project, entry)
    if not size:
        return f"input {name} records neither its aligned size nor an aligned image; align the photo again"
    return SourcePhoto(
        path=path,
        landmarks=np.asarray(entry.get("landmarks"), dtype=np.float64),
        aligned_size=int(size),
        suffix=_suffix_for(path),
    )


def _aligned_size(project: Project, entry: ImageEntry | dict[str, Any]) -> int | None:
    """The side of the input's aligned square, from its image (entries without a recorded ``size``)."""
    aligned = entry.get("aligned")
    if not aligned:
        return None
    try:
        with Image.open(project.path(str(aligned))) as opened:
            return int(opened.size[0])
    except OSError:
        return None


def _suffix_for(path: Path) -> str:
    """``.jpg`` for JPEG photos, else ``.png``."""
    try:
        with Image.open(path) as opened:
            return ".jpg" if opened.format == "JPEG" else ".png"
    except OSError:
        return ".png"


def plan_full_outputs(
    project: Project, input_id: str, ages: Sequence[int], suffix: str, *, side_by_side: bool, gif: bool
) -> FullOutputs:
    """Where the full-frame outputs of input ``input_id`` go (nothing is created)."""
    folder = project.path(f"{EDITS_DIR}/{input_id}")
    return FullOutputs(
        ages={int(age): folder / f"{int(age)}{FULL_SUFFIX}{suffix}" for age in ages},
        strip=folder / f"{STRIP_FULL_STEM}{suffix}" if side_by_side else None,
        gif=folder / GIF_FULL_NAME if gif else None,
    )


# ---- writing -------------------------------------------------------------------------------------------
def write_full_outputs(
    project: Project,
    source: SourcePhoto,
    outputs: FullOutputs,
    edited: dict[int, Image.Image],
    source_age: float | int,
) -> dict[str, Any]:
    """Paste every age's crop into the photo and write the files; returns the Edit entry's keys
    (``full_outputs``, ``strip_full``, ``gif_full``; project-relative)."""
    from selfage_cli.faces.engine.paste_back import Placement, paste_into

    photo = load_image(source.path)
    save_kwargs = _save_options(source.path, source.suffix)
    tiles: list[Image.Image] = [_fit(photo, STRIP_TILE_WIDTH)] if outputs.strip is not None else []
    frames: list[Image.Image] = []
    for age, path in outputs.ages.items():
        crop = edited[age].convert("RGB")
        placement = Placement.from_landmarks(source.landmarks, photo.size, source.aligned_size, crop.width)
        box = placement.footprint()
        original = photo.crop(box) if box is not None else None
        paste_into(photo, crop, placement)
        _save(photo, path, save_kwargs)
        if outputs.strip is not None:
            tiles.append(_fit(photo, STRIP_TILE_WIDTH))
        if outputs.gif is not None:
            frames.append(_labelled(_fit(photo, GIF_SIDE, longer_side=True), str(age)))
        if original is not None:
            photo.paste(original, box[:2])  # back to the untouched photo for the next age
    del photo
    if outputs.strip is not None:
        labels = [f"input ({age_label(source_age)})"] + [str(age) for age in outputs.ages]
        _save(_strip(tiles, labels), outputs.strip, save_kwargs)
    if outputs.gif is not None and frames:
        _save(
            frames[0],
            outputs.gif,
            {"format": "GIF", "save_all": True, "append_images": frames[1:], "duration": GIF_FRAME_MS, "loop": 0},
        )
    return {
        "full_outputs": {str(age): project.relative(path) for age, path in outputs.ages.items()},
        "strip_full": project.relative(outputs.strip) if outputs.strip is not None else None,
        "gif_full": project.relative(outputs.gif) if outputs.gif is not None else None,
    }


def _save_options(path: Path, suffix: str) -> dict[str, Any]:
    """How to save like the photo: JPEG at high quality with its RGB colour profile and EXIF (no
    orientation: the pixels are already upright), else PNG with its RGB colour profile."""
    options: dict[str, Any] = {"format": "JPEG", "quality": JPEG_QUALITY, "subsampling": 0}
    if suffix != ".jpg":
        options = {"format": "PNG"}
    try:
        with Image.open(path) as opened:
            profile = opened.info.get("icc_profile")
            if profile and profile[16:20] == b"RGB ":  # the pixels written are RGB: only an RGB profile fits
                options["icc_profile"] = profile
            if suffix == ".jpg":
                exif = opened.getexif()
                if exif:
                    exif.pop(0x0112, None)
                    options["exif"] = exif.tobytes()
    except Exception:  # noqa: BLE001 - metadata is a nicety: the pixels are what matters
        options = {k: v for k, v in options.items() if k not in ("icc_profile", "exif")}
    return options


def _save(image: Image.Image, path: Path, options: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_save(path, lambda tmp: image.save(tmp, **options))
    except (ValueError, OSError, SyntaxError):
        if "exif" not in options and "icc_profile" not in options:
            raise
        plain = {k: v for k, v in options.items() if k not in ("icc_profile", "exif")}
        atomic_save(path, lambda tmp: image.save(tmp, **plain))


def _fit(image: Image.Image, limit: int, *, longer_side: bool = False) -> Image.Image:
    """A copy at most ``limit`` px wide (or on its longer side), antialiased."""
    side = max(image.size) if longer_side else image.width
    if side <= limit:
        return image.copy()
    scale = limit / side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _strip(tiles: list[Image.Image], labels: list[str]) -> Image.Image:
    """The tiles side by side (same height as the first), each labelled in a band under it."""
    height = tiles[0].height
    tiles = [t if t.height == height else t.resize((round(t.width * height / t.height), height)) for t in tiles]
    band = label_band_height(min(t.width for t in tiles) // 2)
    strip = Image.new("RGB", (sum(t.width for t in tiles), height + band), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    left = 0
    for tile, label in zip(tiles, labels, strict=True):
        strip.paste(tile, (left, 0))
        _draw_centred(draw, (left, height, left + tile.width, height + band), label, size=int(band * 0.7))
        left += tile.width
    return strip


def _labelled(frame: Image.Image, label: str) -> Image.Image:
    """A GIF frame with its label in a band at the bottom."""
    band = label_band_height(min(frame.size) // 2)
    draw = ImageDraw.Draw(frame)
    draw.rectangle((0, frame.height - band, frame.width, frame.height), fill=(24, 24, 24))
    _draw_centred(draw, (0, frame.height - band, frame.width, frame.height), label, size=int(band * 0.7))
    return frame


# ---- the manifest --------------------------------------------------------------------------------------
def merge_full_outputs(previous: Edit | None, latest: Edit) -> dict[str, Any]:
    """The full-frame keys of an Edit entry after a call that wrote ``latest`` (see docs/manifest.md).

    ``full_outputs`` accumulates like ``outputs``, less the ages that the latest call edited again
    without pasting them back (their full frame would show the old edit). ``strip_full``/``gif_full``
    are those of the latest call when it pasted back, else the earlier ones while none of their ages
    was edited again.
    """
    before = previous.full_outputs or {} if previous is not None else {}
    redone = {str(int(a)) for a in (latest.settings or {}).get("ages") or latest.target_ages}
    full = {k: v for k, v in before.items() if k not in redone}
    full.update(latest.full_outputs or {})
    merged: dict[str, Any] = {"full_outputs": full} if full else {}
    stale = bool(redone & set(before))
    for key in ("strip_full", "gif_full"):
        earlier = previous.get(key) if previous is not None else None
        value = latest.get(key) if latest.has("full_outputs") else None if stale else earlier
        if value:
            merged[key] = value
    return merged


# ---- --paste-back-only -----------------------------------------------------------------------------------
def paste_back_recorded(
    project: Project, images: list[Path], *, side_by_side: bool, gif: bool, force: bool
) -> StageSummary:
    """Paste back every recorded age of the edits of ``images`` (default: every edit in the project)."""
    from selfage_cli import console

    summary = StageSummary("edit")
    manifest = load_manifest(project)
    jobs = _recorded_jobs(project, images, manifest.edits, manifest.inputs, summary)
    # The edit folders' locks, as `selfage edit` takes them: a running edit of the same photo is not raced.
    with outputs_held(project, [str(e.id) for e, _, _ in jobs]), console.progress() as bar:
        task = console.new_task(bar, "pasting back", total=len(jobs))
        for edit_entry, input_entry, given in jobs:
            try:
                record = _paste_back_one(project, edit_entry, input_entry, given, side_by_side, gif, force, summary)
            except (UnreadableImageError, ValueError) as exc:  # a damaged crop or record: this item fails
                summary.fail(str(edit_entry.id), f"{exc}; edit that photo again (selfage edit PHOTO --force)")
                record = None
            if record is not None:
                summary.done.append(record)
                summary.lines.append(f"{record['id']}: {', '.join(record['full_outputs'].values())}")
            bar.update(task, advance=1)
    return summary


def _recorded_jobs(
    project: Project,
    images: list[Path],
    edits: list[Edit],
    inputs: list[ImageEntry],
    summary: StageSummary,
) -> list[tuple[Edit, ImageEntry | None, Path | None]]:
    """(Edit entry, input entry, photo given on the command line) for each edit to paste back."""
    if not edits:
        raise SelfageError(
            f"{project.manifest_path}: no edits are recorded in this project; edit first "
            "(selfage edit PHOTO --ages 0,40,80 --paste-back)."
        )
    if not images:
        return [(e, find(inputs, e.id), None) for e in edits]
    from selfage_cli.edit.inputs import expand_images

    files, missing = expand_images(list(images))
    for item, reason in missing:
        summary.fail(item, reason)
    jobs = []
    for file, digest in summary.hashed(files):
        faces = [e for e in inputs if e.sha256 == digest]
        chosen = [(e, find(edits, e.id)) for e in faces]
        chosen = [(e, edit) for e, edit in chosen if edit is not None]
        if not chosen:
            summary.fail(
                str(file), "has no recorded edit in this project; edit it first (selfage edit PHOTO --paste-back)"
            )
            continue
        jobs += [(edit, entry, file) for entry, edit in chosen]
    return jobs


def _paste_back_one(
    project: Project,
    edit_entry: Edit,
    input_entry: ImageEntry | None,
    given: Path | None,
    side_by_side: bool,
    gif: bool,
    force: bool,
    summary: StageSummary,
) -> dict[str, Any] | None:
    """Paste back one recorded edit and record it; None when it failed (recorded in ``summary``)."""
    item = str(edit_entry.id)
    if input_entry is None:
        summary.fail(
            item, f"input {item} is no longer registered in the project, so its photo is unknown; edit the photo again"
        )
        return None
    source = source_photo(project, input_entry, given)
    if isinstance(source, str):
        summary.fail(item, source)
        return None
    ages = [int(a) for a in edit_entry.target_ages]
    crops: dict[int, Image.Image] = {}
    for age in ages:
        recorded = (edit_entry.outputs or {}).get(str(age))
        if not recorded:
            summary.fail(item, f"the edit to age {age} has no recorded output; edit that age again")
            return None
        path = project.path(str(recorded))
        if not path.is_file():
            summary.fail(item, f"{project.relative(path)}, the edit to age {age}, is missing; edit that age again")
            return None
        crops[age] = load_image(path)
    outputs = plan_full_outputs(project, item, ages, source.suffix, side_by_side=side_by_side, gif=gif)
    clash = outputs.existing()
    if clash and not force:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        summary.fail(item, f"{project.relative(clash[0])}{more} already exists; pass --force to overwrite it")
        return None
    source_age = edit_entry.source_age if edit_entry.has("source_age") else "?"
    keys = write_full_outputs(project, source, outputs, crops, source_age)
    with update_manifest(project) as manifest:
        stored = find(manifest.edits, item)
        if stored is not None:
            stored.full_outputs = {**(stored.full_outputs or {}), **keys["full_outputs"]}
            for key in ("strip_full", "gif_full"):
                if keys[key]:
                    setattr(stored, key, keys[key])
    return {"id": item, **keys}


# ---- edit --paste-back -----------------------------------------------------------------------------------
@dataclass
class PastePlan:
    """What ``edit --paste-back`` will paste into for one input, checked before that photo is edited."""

    source: SourcePhoto
    outputs: FullOutputs


def plan_for_edit(project: Project, entry: ImageEntry, config: Any, photo_path: Path | None = None) -> PastePlan | str:
    """The checked source photo and the full-frame files of one input's edit, or why it cannot be pasted back.

    ``photo_path``: the photo as given to this edit (found by its sha256, so it may have moved since it
    was aligned); else the path the input's entry records."""
    source = source_photo(project, entry, photo_path)
    if isinstance(source, str):
        return source
    outputs = plan_full_outputs(
        project, str(entry.id), config.ages, source.suffix, side_by_side=config.side_by_side, gif=config.gif
    )
    return PastePlan(source=source, outputs=outputs)


def report_suffix(record: dict[str, Any]) -> str:
    """The human report line's mention of the full-frame files this call wrote (empty when none)."""
    full = record.get("full_outputs") or {}
    ages = [str(a) for a in (record.get("settings") or {}).get("ages") or [] if str(a) in full]
    if not ages or not (record.get("settings") or {}).get("paste_back"):
        return ""
    return ", full photos " + ", ".join(Path(full[a]).name for a in ages)
