"""Regularisation photos from ``--reg`` are read upright: their EXIF orientation is applied in training
(and for their DEX estimate), as for every other image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfage_cli.train.engine.data import LatentSource, TrainImage, load_pixels

ORIENTATION = 0x0112


def _upright_and_rotated(astronaut_path: Path, folder: Path) -> tuple[Path, Path]:
    """The face at 128² (PNG), and the same pixels stored turned a quarter to the left with EXIF
    orientation 6 ("rotate 90° clockwise to display"), as a phone writes a portrait photo."""
    with Image.open(astronaut_path) as handle:
        upright = handle.convert("RGB").resize((128, 128), Image.Resampling.LANCZOS)
    upright_path, rotated_path = folder / "upright_30.png", folder / "rotated_30.png"
    upright.save(upright_path)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated_path, exif=exif.tobytes())
    return upright_path, rotated_path


def test_a_reg_image_with_an_exif_orientation_trains_on_the_upright_face(
    tmp_path: Path, astronaut_path: Path, tiny_pipe
) -> None:
    upright_path, rotated_path = _upright_and_rotated(astronaut_path, tmp_path)
    with Image.open(rotated_path) as stored, Image.open(upright_path) as upright:
        assert stored.getexif().get(ORIENTATION) == 6
        assert not np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(upright))  # stored turned
    notes: dict[str, list[str]] = {}
    assert torch.equal(load_pixels(rotated_path, 128, notes), load_pixels(upright_path, 128, notes))
    assert notes == {}
    images = [TrainImage(p.stem, p, 30, "photo of person as 30-year-old", str(p)) for p in (upright_path, rotated_path)]
    source = LatentSource(tiny_pipe.vae, images, 128, torch.device("cpu"), cache=True)
    assert torch.equal(source.mean[0], source.mean[1])  # the latents the trainer draws from are the upright face's
