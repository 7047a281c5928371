"""SD 2.x's layout (the ``tiny-sd2`` random model): v-prediction, heads per level, linear projections,
upcast attention, a GELU text encoder, ``"!"`` padding and a 24² latent (192 px). The code that runs
SD 1.5 and the tiny model inverts, edits and trains it unchanged: no shape or layer is hard-coded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train_run import make_train_project
from typer.testing import CliRunner

from selfage_cli.cli import app
from selfage_cli.edit.engine import P2PSettings, edit_ages, encode_image, invert
from selfage_cli.edit.engine.attention import CROSS, SDPA, SELF
from selfage_cli.edit.engine.ddim import DDIMSchedule, encode_text
from selfage_cli.edit.engine.p2p import build_controller, sample_pass
from selfage_cli.edit.prompts import build_prompts
from selfage_cli.models import load_pipeline, native_resolution, save_random_model

STEPS = 10


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("models") / "tiny-sd2", arch="tiny-sd2", seed=0)


@pytest.fixture(scope="module")
def sd2_pipe(sd2_dir: Path):
    return load_pipeline(sd2_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def source(sd2_pipe, astronaut_path: Path) -> torch.Tensor:
    with Image.open(astronaut_path) as image:
        return encode_image(sd2_pipe, image)


@pytest.fixture(scope="module")
def inversion(sd2_pipe, source: torch.Tensor):
    prompt = build_prompts(30, [30], "female").source
    return invert(sd2_pipe, source, prompt, steps=STEPS, inner_steps=10)


def test_the_factory_writes_sd2_traits_that_load_back(sd2_pipe) -> None:
    unet = sd2_pipe.unet.config
    assert sd2_pipe.scheduler.config.prediction_type == "v_prediction"
    assert list(unet.attention_head_dim) == [2, 4, 4, 4]
    assert unet.use_linear_projection is True and unet.upcast_attention is True
    assert unet.cross_attention_dim == sd2_pipe.text_encoder.config.hidden_size == 48
    assert sd2_pipe.text_encoder.config.hidden_act == "gelu"
    assert sd2_pipe.tokenizer.pad_token == "!" and sd2_pipe.tokenizer.pad_token_id == 0
    assert native_resolution(sd2_pipe) == 192


def test_null_text_inversion_and_batched_edit(sd2_pipe, source: torch.Tensor, inversion) -> None:
    assert source.shape == (1, 4, 24, 24)
    prompts = build_prompts(30, [30, 5, 80], "female")
    settings = P2PSettings(blend_threshold=0.9)
    batched = edit_ages(sd2_pipe, inversion, prompts, settings=settings)
    separate = edit_ages(sd2_pipe, inversion, prompts, settings=settings, max_batch=1, decode=False)
    assert batched.latents.shape == (4, 4, 24, 24) and batched.masks.shape == (4, 1, 24, 24)
    assert torch.allclose(batched.latents, separate.latents, atol=1e-4)
    assert all(image.size == (192, 192) for image in batched.images)

    null = encode_text(sd2_pipe, [""]).expand(STEPS, -1, -1).clone()
    plain = edit_ages(
        sd2_pipe, dataclasses.replace(inversion, null_embeddings=null, mode="ddim"), prompts, decode=False
    )
    error = float(((batched.latents[1] - source) ** 2).mean())
    plain_error = float(((plain.latents[1] - source) ** 2).mean())
    assert error <= 0.3 * plain_error, (error, plain_error)  # measured ≈ 0.1×


def test_attention_control_finds_the_layers_by_resolution(sd2_pipe, inversion) -> None:
    """Attention at 24², 12², 6² (down), 3² (mid), 6², 12², 24² (up, two layers each): self-injection
    on layers with ≤ 12² tokens, the local blend's cross-attention on the 6² layers (3 of them)."""
    prompts = build_prompts(30, [5], "female")
    controller = build_controller(prompts, sd2_pipe.tokenizer, P2PSettings(), STEPS, latent_side=24)
    context = encode_text(sd2_pipe, prompts.all_prompts)
    sample_pass(sd2_pipe, DDIMSchedule.from_pipe(sd2_pipe, STEPS), inversion, context, controller, guidance=7.5)
    self_steps, cross_steps = int(0.5 * STEPS), int(0.8 * (STEPS + 1))
    assert controller.calls[SELF] == 7 * self_steps
    assert controller.calls[CROSS] == 10 * cross_steps + 3 * (STEPS - cross_steps)
    assert controller.calls[SDPA] == 20 * STEPS - controller.calls[SELF] - controller.calls[CROSS]


@pytest.mark.slow
def test_train_then_edit_from_the_command_line(
    sd2_dir: Path, tmp_path: Path, astronaut_path: Path, hopper_path: Path
) -> None:
    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path], size=192)
    runner = CliRunner()
    train = ["train", "--run", "v", "--steps", "2", "--batch-size", "1", "--rank", "4", "--resolution", "192"]
    train += ["--base-model", str(sd2_dir), "--device", "cpu", "--dtype", "fp32", "-p", str(project.root)]
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    meta = json.loads((project.root / "runs" / "v" / "pytorch_lora_weights.json").read_text())
    assert meta["prediction_type"] == "v_prediction" and meta["resolution"] == 192

    photo = tmp_path / "photo.png"
    with Image.open(astronaut_path) as image:
        image.convert("RGB").resize((192, 192)).save(photo)
    edit = ["edit", str(photo), "--aligned", "--ages", "20,70", "--source-age", "30", "--ddim-steps", "3"]
    edit += ["--inner-steps", "2", "--device", "cpu", "--dtype", "fp32", "-p", str(project.root), "--json"]
    result = runner.invoke(app, edit)  # the base model: the one the LoRA was trained on
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["base_model"] == str(sd2_dir) and record["resolution"] == 192
    for age in ("20", "70"):
        with Image.open(project.root / "edits" / "photo" / f"{age}.png") as output:
            assert output.size == (192, 192)
