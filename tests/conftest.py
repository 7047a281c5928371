"""Shared fixtures: the packaged face photos and a tiny random SD-1.x pipeline saved to disk once."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def faces_folder() -> Path:
    return Path(str(resources.files("selfage_cli") / "data" / "faces"))


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    """512×512 public-domain portrait (Eileen Collins)."""
    return faces_folder() / "astronaut.png"


@pytest.fixture(scope="session")
def hopper_path() -> Path:
    """512×600 public-domain portrait (Grace Hopper): a second identity."""
    return faces_folder() / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-1.x pipeline (128 px, 16² latent) saved as an ordinary diffusers folder."""
    from selfage_cli.models import save_random_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    save_random_model(out, arch="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir: Path):
    """The tiny pipeline loaded through the real loading code (fp32, CPU). Do not mutate it."""
    from selfage_cli.models import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """An empty project folder."""
    folder = tmp_path / "proj"
    folder.mkdir()
    return folder
