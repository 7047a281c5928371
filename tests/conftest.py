"""Shared fixtures: the packaged face photos and a tiny random SD-1.x pipeline saved to disk once."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the tiny models' small ops run several times slower with two threads on two cores
# (measured: the demo test 16 s with one thread, 50 s with two). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SELFAGE_TEST_THREADS", "1"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests: no per-example deadline (a loaded CI machine is slow) and a fixed seed (no flakes).
settings.register_profile("selfage", deadline=None, derandomize=True)
settings.load_profile("selfage")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _console_speaks() -> None:
    """Every test starts with the console as a fresh process has it: a CLI call with --quiet/--json, or
    a process muted as a launcher's non-main rank, would otherwise hide later tests' warnings."""
    from selfage_cli import console

    console._state.update(quiet=False, muted=False, hide_warnings=False)


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


# ---- DEX age classifier checkpoint (ages helper) ----------------------------------------------------------
# The layer table of issue 4, written out here by hand (not taken from selfage_cli.ages.engine.dex), so tests
# of the loader check our module against the specification rather than against itself.
DEX_LAYER_TABLE: list[tuple[str, tuple[int, ...]]] = [
    *[
        (name, (cout, cin, 3, 3))
        for name, cin, cout in [
            ("conv1_1", 3, 64),
            ("conv1_2", 64, 64),
            ("conv2_1", 64, 128),
            ("conv2_2", 128, 128),
            ("conv3_1", 128, 256),
            ("conv3_2", 256, 256),
            ("conv3_3", 256, 256),
            ("conv4_1", 256, 512),
            ("conv4_2", 512, 512),
            ("conv4_3", 512, 512),
            ("conv5_1", 512, 512),
            ("conv5_2", 512, 512),
            ("conv5_3", 512, 512),
        ]
    ],
    ("fc6", (4096, 25088)),
    ("fc7", (4096, 4096)),
    ("fc8_101", (101, 4096)),
]


@pytest.fixture(scope="session")
def dex_state_dict() -> dict[str, torch.Tensor]:
    """A full-size random DEX VGG-16 state dict in the SAM checkpoint's naming (``fc8-101`` with a dash).

    He-initialised so activations stay finite; ~540 MB in memory. Do not mutate it.
    """
    import math

    generator = torch.Generator().manual_seed(1234)
    state: dict[str, torch.Tensor] = {}
    for name, shape in DEX_LAYER_TABLE:
        key = name.replace("fc8_101", "fc8-101")
        fan_in = math.prod(shape[1:])
        state[f"{key}.weight"] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        state[f"{key}.bias"] = torch.randn(shape[0], generator=generator) * 0.01
    return state


@pytest.fixture(scope="session")
def dex_weights_path(tmp_path_factory: pytest.TempPathFactory, dex_state_dict: dict[str, torch.Tensor]) -> Path:
    """``dex_age_classifier.pth`` in the SAM format (``{'state_dict': ...}``) with random weights, saved once."""
    path = tmp_path_factory.mktemp("dex") / "dex_age_classifier.pth"
    torch.save({"state_dict": dex_state_dict}, path)
    return path


# ---- edit engine (shared by tests/test_edit_*.py) -------------------------------------------------
TINY_EDIT_STEPS = 20  # DDIM steps of the shared inversion (the method's default is 50; kept small for speed)
TINY_EDIT_SOURCE_AGE = 30


@pytest.fixture(scope="session")
def tiny_source_latent(tiny_pipe, astronaut_path: Path) -> torch.Tensor:
    """The astronaut portrait encoded by the tiny pipeline's VAE (1, 4, 16, 16), fp32."""
    from PIL import Image

    from selfage_cli.edit.engine import encode_image

    with Image.open(astronaut_path) as image:
        return encode_image(tiny_pipe, image)


@pytest.fixture(scope="session")
def tiny_inversion(tiny_pipe, tiny_source_latent: torch.Tensor):
    """ONE null-text inversion of the astronaut with the tiny model, computed once per session.

    Prompt ``build_prompts(30, [...], "female").source`` = "photo of sks woman as 30-year-old";
    20 DDIM steps, guidance 7.5, 10 inner steps, trajectory kept. Do not mutate it.
    """
    from selfage_cli.edit.engine import invert
    from selfage_cli.edit.prompts import build_prompts

    prompt = build_prompts(TINY_EDIT_SOURCE_AGE, [TINY_EDIT_SOURCE_AGE], "female").source
    return invert(
        tiny_pipe,
        tiny_source_latent,
        prompt,
        mode="null-text",
        steps=TINY_EDIT_STEPS,
        guidance=7.5,
        inner_steps=10,
        keep_trajectory=True,
    )


# ---- the builtin age estimator (shared by tests/test_ages_builtin.py and tests/test_edit_source.py) ------
@pytest.fixture(scope="session")
def builtin_estimator():
    """The bundled ONNX age/gender networks (sessions built once per test session)."""
    from selfage_cli.ages.engine.builtin import BuiltinEstimator

    return BuiltinEstimator()


@pytest.fixture(scope="session")
def aligned_portraits(tmp_path_factory: pytest.TempPathFactory, astronaut_path: Path, hopper_path: Path) -> dict:
    """The two packaged portraits FFHQ-aligned at 512 px by the align stage: {name: path of the PNG}."""
    from selfage_cli.faces.engine.align import align_file

    folder = tmp_path_factory.mktemp("aligned_portraits")
    paths = {}
    for name, photo in (("astronaut", astronaut_path), ("hopper", hopper_path)):
        paths[name] = folder / f"{name}.png"
        align_file(photo, size=512)[0].image.save(paths[name])
    return paths
