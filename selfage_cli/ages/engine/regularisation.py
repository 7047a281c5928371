"""Regularisation images: the folder a user gives, or new ones drawn by the base model.

The DreamBooth class-image approach: the base model draws ``REG_PROMPT`` for integer ages spread
evenly over an age range; each image is FFHQ-aligned like the references when a face is found and
kept as generated otherwise. Pipelines and images in and out; the ``make-reg`` stage
(:mod:`selfage_cli.ages.regularisation`) decides where they go and records them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from selfage_cli.ages.engine.sources import MAX_AGE, MIN_AGE
from selfage_cli.errors import SelfageError
from selfage_cli.faces.engine.loading import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

REG_PROMPT = "photo of person as {age}-year-old"
GUIDANCE_SCALE = 7.5


def scan_reg_folder(
    folder: str | os.PathLike[str],
) -> tuple[Path, list[tuple[Path, tuple[int, int]]], list[tuple[Path, str]]]:
    """Images of a regularisation folder (recursively, sorted): (folder, [(path, (w, h))], [(path, why unreadable)]).

    Raises :class:`SelfageError` when the folder does not exist or holds no image files.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SelfageError(f"--reg {root}: no such folder; pass a folder of aligned face images of other people.")
    root = root.resolve()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise SelfageError(
            f"--reg {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); pass a folder of aligned faces "
            "or generate a set with `selfage make-reg`."
        )
    images: list[tuple[Path, tuple[int, int]]] = []
    unreadable: list[tuple[Path, str]] = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
                size = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            unreadable.append((path, f"not a readable image ({exc}); replace or remove the file"))
            continue
        images.append((path, size))
    if not images:
        raise SelfageError(f"--reg {root}: none of its {len(files)} image files can be read; check the folder.")
    return root, images, unreadable


def parse_age_range(text: str) -> tuple[int, int]:
    """``--age-range 0-90`` → (0, 90), both within 0–100 and low ≤ high."""
    parts = str(text).replace("–", "-").split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = int(parts[0].strip()), int(parts[1].strip())
    except ValueError:
        raise SelfageError(f"--age-range {text!r} is not LOW-HIGH; write whole years, e.g. --age-range 0-90.") from None
    if not (MIN_AGE <= low <= high <= MAX_AGE):
        raise SelfageError(f"--age-range {text}: need {MIN_AGE} ≤ LOW ≤ HIGH ≤ {MAX_AGE}; e.g. --age-range 0-90.")
    return low, high


def spread_ages(count: int, low: int, high: int) -> list[int]:
    """``count`` integer ages spread evenly from ``low`` to ``high`` (both included when count > 1)."""
    if count == 1:
        return [round((low + high) / 2)]
    return [int(round(low + (high - low) * i / (count - 1))) for i in range(count)]


def generate_images(
    pipe: StableDiffusionPipeline, ages: list[int], seeds: list[int], steps: int, resolution: int, device: Any
) -> list[Image.Image]:
    """One batch of images from the base model, one per prompted age and seed.

    Args:
        pipe: a loaded ``StableDiffusionPipeline`` (base model, no LoRA).
        ages: the prompted age of each image (``REG_PROMPT``).
        seeds: one generator seed per image.
        steps: denoising steps; resolution: the image side in pixels; device: the pipeline's device.
    """
    import torch

    generator_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(device=generator_device).manual_seed(s) for s in seeds]
    result = pipe(
        prompt=[REG_PROMPT.format(age=age) for age in ages],
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        height=resolution,
        width=resolution,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)


def align_or_keep(image: Image.Image, size: int, name: str) -> tuple[Image.Image, bool, str | None]:
    """(image, aligned?, why not): the FFHQ-aligned face, else the generated image as it is."""
    from selfage_cli.faces.engine.align import align_image

    try:
        faces = align_image(image, size=size, detector="hog", name=name)
    except SelfageError as exc:
        return image, False, str(exc)
    if not faces:
        return image, False, "no face found"
    return faces[0].image, True, None
