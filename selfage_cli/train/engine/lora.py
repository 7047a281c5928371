"""LoRA adapters on the UNet and the CLIP text encoder (PEFT), and saving them in diffusers' format.

UNet targets: the attention projections ``to_q, to_k, to_v, to_out.0`` (plus ``add_k_proj,
add_v_proj`` where the model has them); text-encoder targets: ``q_proj, k_proj, v_proj, out_proj``.
Rank r, alpha = r (scale 1), PEFT's "gaussian" init (A ~ N(0, 1/r), B = 0). Trainable LoRA weights
are kept in fp32 whatever the dtype of the frozen base weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from selfage_cli.files import atomic_save

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The file name diffusers' loaders look for in a LoRA folder (its LORA_WEIGHT_NAME_SAFE); a project names
# its runs' LoRA files in selfage_cli/manifest.py (the same name).
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def present_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The target names that occur as linear layers in ``model`` (module name ends with ``.name``)."""
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def lora_config(rank: int, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, rank: int, seed: int) -> None:
    """Attach fresh LoRA adapters (deterministic for a given seed) and freeze everything else."""
    unet.requires_grad_(False)
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(lora_config(rank, present_targets(unet, UNET_TARGETS)))
    if text_encoder is not None:
        text_encoder.add_adapter(lora_config(rank, present_targets(text_encoder, TEXT_TARGETS)))


def cast_lora_fp32(*models: torch.nn.Module | None) -> None:
    """Trainable (LoRA) parameters in fp32; frozen base weights keep their dtype."""
    from diffusers.training_utils import cast_training_params

    cast_training_params([m for m in models if m is not None], dtype=torch.float32)


def lora_layers(*models: torch.nn.Module | None) -> list[Any]:
    """The PEFT LoRA layers of these models."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_inputs_uncast(layers: list[Any]) -> Iterator[None]:
    """Under autocast: stop PEFT casting each LoRA layer's input to the LoRA weights' dtype.

    PEFT casts a bf16/fp16 activation to fp32 for the fp32 LoRA weights, and autocast casts it straight
    back for the matmul: two copies of such a LoRA input, and two more in the backward pass, for
    bit-identical results (fp32 holds every bf16/fp16 value exactly). Inputs that autocast already
    made fp32 (layer-norm outputs, the text embeddings) are not cast by PEFT, so which layers gain
    depends on autocast's per-op policy (SD 1.5's layout with text-encoder LoRA saves a few hundred
    copies a step). Only for forwards under autocast: without it the dtypes would not
    match.
    """
    saved = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.cast_input_dtype_enabled = value


def trainable_parameters(*models: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by name (for checkpoints)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def diffusers_layers(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, Any]:
    """``save_lora_weights`` keyword arguments: the adapters' state dicts in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    layers: dict[str, Any] = {
        "unet_lora_layers": fp32(convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    }
    if text_encoder is not None:
        layers["text_encoder_lora_layers"] = fp32(
            convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        )
    return layers


def save_lora(
    folder: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    weight_name: str = DIFFUSERS_LORA_FILE,
) -> Path:
    """Write the LoRA layers in diffusers' format to ``folder/weight_name`` atomically (files.atomic_save)."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    layers = diffusers_layers(unet, text_encoder)

    def write(tmp: Path) -> None:
        # diffusers writes into a folder under a given name: let it, then move the file to ``tmp``.
        scratch = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
        try:
            StableDiffusionPipeline.save_lora_weights(scratch, weight_name=weight_name, **layers)
            os.replace(scratch / weight_name, tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    atomic_save(folder / weight_name, write)
    return folder / weight_name
