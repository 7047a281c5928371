"""``--validate-ages``: render the trained person at a few ages into one labelled grid image."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from selfage_cli.files import atomic_save
from selfage_cli.train.config import TrainConfig

VALIDATION_STEPS = 30  # DDIM steps per validation image
GUIDANCE = 7.5


@torch.no_grad()
def render_validation_grid(
    pipe: Any,
    config: TrainConfig,
    ages: list[int],
    out_path: Path,
    steps: int | None = None,
    guidance: float = GUIDANCE,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """One image per age with the instance prompt (same seed for every age), side by side, labelled."""
    steps = steps or VALIDATION_STEPS
    device = pipe.unet.device
    pipe.unet.eval()
    pipe.text_encoder.eval()
    tiles = []
    mixed = device.type == "cuda" and dtype != torch.float32  # frozen weights in dtype, LoRA weights fp32
    autocast = torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext()
    for age in ages:
        generator = torch.Generator(device=device).manual_seed(config.seed)
        with autocast:
            image = pipe(
                config.prompt(age),
                height=config.resolution,
                width=config.resolution,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
            ).images[0]
        tiles.append(image)
    grid = label_row(tiles, [f"{age} y" for age in ages])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(out_path, lambda tmp: grid.save(tmp, format="PNG"))  # a fresh temporary name, removed on failure


def label_row(tiles: list[Image.Image], labels: list[str]) -> Image.Image:
    """Tiles side by side with a caption strip under each."""
    side = tiles[0].size[0]
    strip = max(16, side // 10)
    grid = Image.new("RGB", (side * len(tiles), side + strip), "white")
    draw = ImageDraw.Draw(grid)
    for index, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        grid.paste(tile.resize((side, side)), (index * side, 0))
        draw.text((index * side + 4, side + 2), label, fill="black")
    return grid
