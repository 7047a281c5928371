"""How an edit holds its weights and applies the LoRA (``edit --dtype``, selfage_cli/edit/engine/precision.py).

Each test loads its own pipelines from the tiny model's folder: fusing changes a pipeline's weights, so
the shared ``tiny_pipe`` is never used for it (and is checked to stay untouched).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from selfage_cli.edit.engine.precision import PRECISIONS, EditPrecision, apply_precision, resolve_edit_precision
from selfage_cli.errors import SelfageError
from selfage_cli.models import load_pipeline
from selfage_cli.project import sha256_file

FP32_BRANCH = EditPrecision("fp32-branch", "fp32", "branch", "fp32")


@pytest.fixture(scope="module")
def lora_file(tiny_pipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA on the tiny UNet and text encoder with non-zero B, saved as `selfage train` saves it."""
    from selfage_cli.train.engine.lora import add_lora, save_lora

    unet, text_encoder = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.text_encoder)
    add_lora(unet, text_encoder, rank=4, seed=3)
    with torch.no_grad():
        for name, param in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return save_lora(tmp_path_factory.mktemp("lora"), unet, text_encoder)


def _pipe(model: Path, precision: EditPrecision, lora: Path | None):
    pipe = load_pipeline(model, device="cpu", dtype=precision.load_dtype(lora is not None))
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="selfage")
    return pipe, apply_precision(pipe, precision, with_lora=lora is not None)


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states of a prompt and the UNet's ε on them (fixed inputs), fp32."""
    from selfage_cli.edit.engine.ddim import encode_text

    context = encode_text(pipe, ["photo of sks person as 40-year-old"])
    side = int(pipe.unet.config.sample_size)
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    dtype = next(pipe.unet.parameters()).dtype
    with torch.no_grad():
        eps = pipe.unet(latent.to(dtype), 500, encoder_hidden_states=context.to(dtype), return_dict=False)[0]
    return context, eps.float()


def test_fused_and_unfused_fp32_agree_and_the_lora_file_and_shared_pipe_stay_untouched(
    tiny_model_dir: Path, tiny_pipe, lora_file: Path
) -> None:
    before = sha256_file(lora_file)
    shared = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    fused, applied = _pipe(tiny_model_dir, PRECISIONS["fp32"], lora_file)
    assert applied == "fused-fp32"
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())  # folded in: no branch left
    branch, applied = _pipe(tiny_model_dir, FP32_BRANCH, lora_file)
    assert applied == "branch-fp32" and any("lora_B" in name for name, _ in branch.unet.named_parameters())
    plain, applied = _pipe(tiny_model_dir, PRECISIONS["fp32"], None)
    assert applied == "none"
    (ctx_f, eps_f), (ctx_b, eps_b), (_, eps_0) = _outputs(fused), _outputs(branch), _outputs(plain)
    assert (ctx_f - ctx_b).abs().max() < 1e-5 and (eps_f - eps_b).abs().max() < 1e-5
    assert (eps_f - eps_0).abs().max() > 1e-3  # the LoRA does change the outputs
    assert sha256_file(lora_file) == before
    assert all(torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in shared.items())


def test_half_precision_candidates_hold_the_lora_as_named(tiny_model_dir: Path, lora_file: Path) -> None:
    lora32, applied = _pipe(tiny_model_dir, PRECISIONS["bf16-lora32"], lora_file)
    assert applied == "branch-fp32"
    dtypes = {n: p.dtype for n, p in lora32.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    _outputs(lora32)  # runs: the fp32 branch beside bf16 weights
    fused, applied = _pipe(tiny_model_dir, PRECISIONS["bf16-fused"], lora_file)
    assert applied == "fused-bf16" and {p.dtype for p in fused.unet.parameters()} == {torch.bfloat16}
    branch, applied = _pipe(tiny_model_dir, PRECISIONS["bf16"], lora_file)
    assert applied == "branch-bf16" and {p.dtype for p in branch.unet.parameters()} == {torch.bfloat16}
    vae32, applied = _pipe(tiny_model_dir, PRECISIONS["fp16-vae32"], None)
    assert applied == "none" and next(vae32.vae.parameters()).dtype == torch.float32
    assert next(vae32.unet.parameters()).dtype == torch.float16


def test_dtype_names(capsys: pytest.CaptureFixture[str]) -> None:
    cpu = torch.device("cpu")
    assert resolve_edit_precision("auto", cpu).name == "fp32"  # auto on the CPU stays fp32
    assert resolve_edit_precision(None, cpu) is PRECISIONS["fp32"]
    assert resolve_edit_precision("bf16", cpu).weights == "bf16"  # bf16 stays available under its name
    with pytest.raises(SelfageError, match="--dtype 'fp8' is not known; use auto, fp32, tf32, bf16"):
        resolve_edit_precision("fp8", cpu)
    assert resolve_edit_precision("tf32", cpu).tf32
    assert "acts only on a CUDA GPU" in capsys.readouterr().err
