"""The files an edit writes: one PNG per target age, a labelled strip, an animated GIF.

Layout (inside the project): ``edits/<id>/<age>.png``, ``edits/<id>/strip.png`` (with
``--side-by-side``: the input then every age, each tile labelled under the picture) and
``edits/<id>/ages.gif`` (with ``--gif``: one labelled frame per age). Existing files are never
overwritten without ``--force``; :func:`existing_outputs` lets the stage check that before any
expensive work, and :func:`outputs_held` locks the folders for the call, so two edits of one photo at
once never overwrite each other. Every file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from selfage_cli.files import atomic_save
from selfage_cli.project import Project

EDITS_DIR = "edits"
STRIP_NAME = "strip.png"
GIF_NAME = "ages.gif"
GIF_FRAME_MS = 600


@dataclass
class EditOutputs:
    """The paths (absolute) one edit of one input will write."""

    folder: Path
    ages: dict[int, Path] = field(default_factory=dict)
    strip: Path | None = None
    gif: Path | None = None

    def all_paths(self) -> list[Path]:
        paths = list(self.ages.values())
        paths += [p for p in (self.strip, self.gif) if p is not None]
        return paths


def plan_outputs(project: Project, input_id: str, ages: Sequence[int], *, side_by_side: bool, gif: bool) -> EditOutputs:
    """Where the outputs of editing input ``input_id`` to ``ages`` go (nothing is created)."""
    folder = project.writable_path(f"{EDITS_DIR}/{input_id}")  # never through a link out of the project
    return EditOutputs(
        folder=folder,
        ages={int(age): folder / f"{int(age)}.png" for age in ages},
        strip=folder / STRIP_NAME if side_by_side else None,
        gif=folder / GIF_NAME if gif else None,
    )


@contextlib.contextmanager
def outputs_held(project: Project, input_ids: Sequence[str]) -> Iterator[None]:
    """Hold the lock of each input's output folder (``edits/.ID.lock``) for the ``with`` block.

    A second ``edit`` of the same photo while this one runs stops with one sentence (exit 2) before it
    writes anything, instead of overwriting these outputs without ``--force``.
    """
    from selfage_cli.locks import hold

    with contextlib.ExitStack() as stack:
        for input_id in dict.fromkeys(input_ids):  # each once: a second hold in one process would be refused
            folder = project.writable_path(f"{EDITS_DIR}/{input_id}")
            stack.enter_context(
                hold(folder, "wait for it to finish, then edit again (with --force to replace what it wrote)")
            )
        yield


def existing_outputs(outputs: EditOutputs) -> list[Path]:
    """The planned outputs that already exist (to refuse overwriting them without --force)."""
    return [path for path in outputs.all_paths() if path.exists()]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support
        return ImageFont.load_default()


def label_band_height(tile: int) -> int:
    return max(14, tile // 8)


def _draw_centred(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    text: str,
    size: int,
    fill: tuple[int, int, int] = (255, 255, 255),
) -> None:
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = box[0] + (box[2] - box[0] - (right - left)) // 2 - left
    y = box[1] + (box[3] - box[1] - (bottom - top)) // 2 - top
    draw.text((x, y), text, font=font, fill=fill)


def make_strip(tiles: Sequence[Image.Image], labels: Sequence[str], tile: int) -> Image.Image:
    """Tiles side by side (each resized to ``tile``²), each labelled in a band under it.

    Width = len(tiles) · tile; height = tile + the label band.
    """
    if len(tiles) != len(labels):
        raise ValueError("one label per tile")
    band = label_band_height(tile)
    strip = Image.new("RGB", (tile * len(tiles), tile + band), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    for index, (image, label) in enumerate(zip(tiles, labels, strict=True)):
        strip.paste(_square(image, tile), (index * tile, 0))
        _draw_centred(draw, (index * tile, tile, (index + 1) * tile, tile + band), label, size=int(band * 0.7))
    return strip


def labelled_frame(image: Image.Image, label: str, tile: int) -> Image.Image:
    """One GIF frame: the picture with its label in a band at the bottom (so frames never coincide)."""
    frame = _square(image, tile).copy()
    band = label_band_height(tile)
    draw = ImageDraw.Draw(frame)
    draw.rectangle((0, tile - band, tile, tile), fill=(24, 24, 24))
    _draw_centred(draw, (0, tile - band, tile, tile), label, size=int(band * 0.7))
    return frame


def _square(image: Image.Image, tile: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size != (tile, tile):
        image = image.resize((tile, tile), Image.Resampling.LANCZOS)
    return image


def age_label(age: float | int) -> str:
    return f"{age:g}" if isinstance(age, float) else str(age)


def write_outputs(
    outputs: EditOutputs,
    source: Image.Image,
    source_age: float | int,
    edited: dict[int, Image.Image],
    tile: int,
) -> None:
    """Write the per-age PNGs and, when planned, the strip and the GIF (ages in the order given)."""
    outputs.folder.mkdir(parents=True, exist_ok=True)
    for age, path in outputs.ages.items():
        _save_atomic(edited[age].convert("RGB"), path, format="PNG")
    ages = list(outputs.ages)
    if outputs.strip is not None:
        tiles = [source] + [edited[age] for age in ages]
        labels = [f"input ({age_label(source_age)})"] + [str(age) for age in ages]
        _save_atomic(make_strip(tiles, labels, tile), outputs.strip, format="PNG")
    if outputs.gif is not None:
        frames = [labelled_frame(edited[age], str(age), tile) for age in ages]
        _save_atomic(
            frames[0],
            outputs.gif,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=GIF_FRAME_MS,
            loop=0,
            optimize=False,
        )


def _save_atomic(image: Image.Image, path: Path, **save_kwargs: object) -> None:
    """``image.save(path, **save_kwargs)`` atomically (``save_kwargs`` must name the ``format``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: image.save(tmp, **save_kwargs))
