"""Model factory (tiny and sd15), loading through the real code path, device/dtype choice, tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfage_cli.errors import ModelNotFoundError, SelfageError
from selfage_cli.manifest import set_config
from selfage_cli.models import (
    DEFAULT_BASE_MODEL,
    architecture,
    build_random_pipeline,
    load_clip_tokenizer,
    load_pipeline,
    model_fingerprint,
    native_resolution,
    resolve_device,
    resolve_dtype,
    save_random_model,
)

# SD 1.5's published configs (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/vae/text_encoder config.json).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "downsample_padding": 1,
    "norm_eps": 1e-5,
}
SD15_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def test_sd15_architecture_matches_sd15_config() -> None:
    pipe = build_random_pipeline("sd15", device="meta")
    unet, vae, text = dict(pipe.unet.config), dict(pipe.vae.config), pipe.text_encoder.config
    for key, value in SD15_UNET.items():
        assert _plain(unet[key]) == value, key
    for key, value in SD15_VAE.items():
        assert _plain(vae[key]) == value, key
    for key, value in SD15_TEXT.items():
        assert getattr(text, key) == value, key
    assert vae["scaling_factor"] == pytest.approx(0.18215)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964  # SD 1.5's UNet
    assert native_resolution(pipe) == 512
    scheduler = dict(pipe.scheduler.config)
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert scheduler["set_alpha_to_one"] is False and scheduler["steps_offset"] == 1


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_tiny_architecture_has_sd15_layout() -> None:
    spec = architecture("tiny")
    assert spec.unet["down_block_types"] == SD15_UNET["down_block_types"]
    assert spec.unet["up_block_types"] == SD15_UNET["up_block_types"]
    assert len(spec.unet["block_out_channels"]) == 4
    assert spec.unet["sample_size"] == 16
    with pytest.raises(SelfageError, match="--arch 'huge'"):
        architecture("huge")


def test_tokenizer_matches_sd15() -> None:
    tokenizer = load_clip_tokenizer()
    ids = tokenizer("photo of sks person as 30-year-old").input_ids
    # SD 1.5's tokenizer gives exactly these ids ("sks" is one rare token; each digit its own token).
    assert ids == [49406, 1125, 539, 48136, 2533, 601, 274, 271, 268, 935, 268, 896, 49407]
    padded = tokenizer("photo", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert len(tokenizer.tokenize("30-year-old")) == 6
    assert len(tokenizer.tokenize("5-year-old")) == 5
    assert len(tokenizer.tokenize("100-year-old")) == 7


def test_tiny_pipeline_saved_loads_and_generates(tiny_model_dir: Path, tiny_pipe) -> None:
    assert (tiny_model_dir / "model_index.json").is_file()
    assert native_resolution(tiny_pipe) == 128
    generator = torch.Generator().manual_seed(0)
    image = tiny_pipe(
        "photo of person as 30-year-old", num_inference_steps=3, generator=generator, output_type="np"
    ).images[0]
    assert image.shape == (128, 128, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    assert model_fingerprint(tiny_model_dir) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(tiny_model_dir) != model_fingerprint(DEFAULT_BASE_MODEL)


def test_save_refuses_to_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SelfageError, match="--force"):
        save_random_model(tiny_model_dir, arch="tiny")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(SelfageError, match="not empty"):
        save_random_model(tmp_path, arch="tiny")


def test_models_that_are_not_sd_text_to_image_are_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    inpainting = shutil.copytree(tiny_model_dir, tmp_path / "inpainting")
    config = {k: v for k, v in UNet2DConditionModel.load_config(inpainting / "unet").items() if not k.startswith("_")}
    UNet2DConditionModel(**{**config, "in_channels": 9}).save_pretrained(inpainting / "unet")
    with pytest.raises(ModelNotFoundError, match="its UNet takes 9 input channels .an inpainting or depth model"):
        load_pipeline(inpainting, device="cpu")

    x0 = shutil.copytree(tiny_model_dir, tmp_path / "x0")
    scheduler_file = x0 / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ModelNotFoundError, match="its scheduler predicts 'sample'.*pass an SD 1.x/2.x text-to-image"):
        load_pipeline(x0, device="cpu")


def test_missing_models_say_how_to_pass_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="--base-model ./sd15"):
        load_pipeline("nobody/no-such-model-xyz", device="cpu")
    with pytest.raises(ModelNotFoundError, match="without model_index.json"):
        load_pipeline(tmp_path, device="cpu")
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_pipeline(tmp_path / "missing" / "model", device="cpu")


def test_local_folders_are_recorded_absolute_and_the_project_default_applies(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfage_cli.base_model import choose_base_model
    from selfage_cli.models import DEFAULT_BASE_MODEL, model_reference
    from selfage_cli.project import Project

    monkeypatch.chdir(tiny_model_dir.parent)
    assert model_reference(tiny_model_dir.name) == str(tiny_model_dir)  # relative folder → absolute
    assert model_reference("someone/some-model") == "someone/some-model"  # a Hub id is kept as it is
    project = Project(tmp_path / "proj")
    assert choose_base_model(project, None) == DEFAULT_BASE_MODEL  # no project yet
    project.init()
    assert choose_base_model(project, None) == DEFAULT_BASE_MODEL
    set_config(project, base_model=tiny_model_dir.name)
    assert choose_base_model(project, None) == str(tiny_model_dir)


def test_device_and_dtype_choice() -> None:
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(SelfageError, match="--dtype 'fp8'"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(SelfageError, match="--device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(SelfageError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto").type in {"cpu", "mps"}
