"""How an edit holds its weights and applies the LoRA: the named ``--dtype`` values of ``selfage edit``.

The UNet and the text encoder are frozen while inverting and editing, so the LoRA can be folded into
them (``fused``: W + B·A computed once, in fp32, then the weights cast to the precision; no extra work
per call) or kept beside them as PEFT's branch (``branch``: two more small GEMMs per adapted layer
and call, in the weights' precision; ``branch-fp32``: the branch in fp32 beside half-precision
weights). Which one, and in which precision, is recorded in the Edit entry as
``lora_applied`` (:meth:`EditPrecision.lora_applied`).

``auto`` is chosen by the ``lora_effect`` measurement (docs/benchmarks.md, "LoRA effect and edit
precision"): the fastest setting whose edits with the LoRA stay within R ≤ 0.1 of the fp32 edits at
every age, R = ‖candidate − fp32‖ / ‖fp32 without the LoRA − fp32‖. On the CPU it is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from selfage_cli import console
from selfage_cli.errors import SelfageError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_MODES = ("fused", "branch", "branch-fp32")


@dataclass(frozen=True)
class EditPrecision:
    """One way to run an edit: weight dtype of the UNet and text encoder, how the LoRA is applied,
    the VAE's dtype, and TF32 matmuls/convolutions (CUDA only)."""

    name: str  # the --dtype value
    weights: str  # fp32, bf16, fp16
    lora: str  # fused (in fp32, then cast to the weights' dtype), branch (in the weights' dtype), branch-fp32
    vae: str  # fp32, bf16, fp16
    tf32: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        if self.lora not in LORA_MODES or self.weights not in _TORCH or self.vae not in _TORCH:
            raise ValueError(f"bad precision {self}")

    @property
    def weights_dtype(self) -> torch.dtype:
        return _TORCH[self.weights]

    @property
    def vae_dtype(self) -> torch.dtype:
        return _TORCH[self.vae]

    def load_dtype(self, with_lora: bool) -> torch.dtype:
        """The dtype to load the pipeline in: fp32 where the LoRA is fused before casting."""
        return torch.float32 if with_lora and self.lora == "fused" else self.weights_dtype

    def lora_applied(self, with_lora: bool) -> str:
        """What the manifest records: ``none``, ``fused-fp32``, ``fused-bf16`` (fused in fp32, then cast),
        ``branch-bf16`` (PEFT's branch in the weights' dtype), ``branch-fp32`` …"""
        if not with_lora:
            return "none"
        if self.lora == "branch-fp32":
            return "branch-fp32"
        return f"{self.lora}-{self.weights}"


PRECISIONS: dict[str, EditPrecision] = {
    p.name: p
    for p in (
        EditPrecision("fp32", "fp32", "fused", "fp32", summary="fp32 weights, LoRA fused (the reference's precision)"),
        EditPrecision("tf32", "fp32", "fused", "fp32", tf32=True, summary="fp32 with TF32 matmuls (CUDA only)"),
        EditPrecision("bf16", "bf16", "branch", "bf16", summary="bf16 weights, LoRA branch in bf16"),
        EditPrecision("bf16-lora32", "bf16", "branch-fp32", "bf16", summary="bf16 weights, LoRA as an fp32 branch"),
        EditPrecision("bf16-fused", "bf16", "fused", "bf16", summary="LoRA fused in fp32, then cast to bf16"),
        EditPrecision("fp16", "fp16", "branch", "fp16", summary="fp16 weights and VAE, LoRA branch in fp16"),
        EditPrecision("fp16-vae32", "fp16", "branch", "fp32", summary="fp16 weights, fp32 VAE"),
    )
}
EDIT_DTYPES = ("auto", *PRECISIONS)

# --dtype auto on CUDA and MPS: the fastest setting that met R ≤ 0.1 at every age in the lora_effect
# measurement (docs/benchmarks.md, "LoRA effect and edit precision").
AUTO_ACCELERATOR = "fp32"


def resolve_edit_precision(dtype: str | None, device: torch.device) -> EditPrecision:
    """``--dtype`` of ``selfage edit`` → :class:`EditPrecision` (``auto``: see the module doc)."""
    if dtype in (None, "", "auto"):
        return PRECISIONS["fp32" if device.type == "cpu" else AUTO_ACCELERATOR]
    if dtype not in PRECISIONS:
        raise SelfageError(f"--dtype {dtype!r} is not known; use {', '.join(EDIT_DTYPES)}.")
    precision = PRECISIONS[dtype]
    if precision.tf32 and device.type != "cuda":
        console.warn(f"--dtype tf32 acts only on a CUDA GPU; on {device.type} it is plain fp32.")
    return precision


def apply_precision(pipe: StableDiffusionPipeline, precision: EditPrecision, with_lora: bool) -> str:
    """Put a loaded pipeline (its LoRA, if any, loaded by ``load_lora_weights``) into ``precision``;
    returns :meth:`EditPrecision.lora_applied`.

    Fusing changes only this pipeline's weights in memory (the LoRA file is read, never written).
    """
    if with_lora and precision.lora == "fused":
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
        pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay
    for model, dtype in (
        (pipe.unet, precision.weights_dtype),
        (pipe.text_encoder, precision.weights_dtype),
        (pipe.vae, precision.vae_dtype),
    ):
        if any(p.dtype != dtype for p in model.parameters()):
            _quietly_cast(model, dtype)
    if with_lora and precision.lora == "branch-fp32":
        _lora_parameters_to(pipe, torch.float32)
    set_tf32(precision.tf32)
    return precision.lora_applied(with_lora)


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and convolutions on (``tf32``) or off (every other setting: true fp32)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _quietly_cast(model: Any, dtype: torch.dtype) -> None:
    """``model.to(dtype)`` without diffusers' warning about modules to keep in fp32 (SD 1.x/2.x has none)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _lora_parameters_to(pipe: StableDiffusionPipeline, dtype: torch.dtype) -> None:
    for model in (pipe.unet, pipe.text_encoder):
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.data = param.data.to(dtype)


def describe() -> str:
    """One line per --dtype value, for docs and help."""
    return "; ".join(f"{p.name}: {p.summary}" for p in PRECISIONS.values())
