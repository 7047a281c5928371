"""DDIM maths shared by inversion and editing, and the thin model calls (text, UNet, VAE).

:class:`DDIMSchedule` is built from the pipeline's own scheduler config (its betas and prediction
type) with the reference's overrides ``clip_sample=False``, ``set_alpha_to_one=False``,
``steps_offset=1`` and ``leading`` spacing, so with SD 1.5 and 50 steps the timesteps are
981, 961, …, 1 and Δ = 1000 // 50 = 20. Both directions use the deterministic (η = 0) DDIM update
written out as in the reference (``prev_step`` / ``next_step``), in fp32 on the latents.

Every model call returns ε: a v-prediction model's output is converted with
ε = √ᾱ_t · v + √(1 − ᾱ_t) · x_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


@dataclass
class DDIMSchedule:
    """The DDIM schedule of one run: timesteps (high noise → low), ᾱ table, Δ and prediction type."""

    timesteps: list[int]
    alphas_cumprod: Tensor  # fp32, on CPU (indexed with python ints)
    final_alpha_cumprod: float
    step_size: int
    prediction_type: str

    @classmethod
    def from_pipe(cls, pipe: StableDiffusionPipeline, steps: int) -> DDIMSchedule:
        """The pipeline's betas and prediction type with the reference's DDIM settings."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        )
        scheduler.set_timesteps(steps)
        prediction = scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {prediction!r} is not supported (epsilon or v_prediction)")
        return cls(
            timesteps=[int(t) for t in scheduler.timesteps],
            alphas_cumprod=scheduler.alphas_cumprod.detach().to("cpu", torch.float32),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            step_size=scheduler.config.num_train_timesteps // steps,
            prediction_type=prediction,
        )

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, t: int) -> float:
        """ᾱ_t, or the final ᾱ (= ᾱ_0 since ``set_alpha_to_one=False``) for t < 0."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def to_epsilon(self, output: Tensor, t: int, sample: Tensor) -> Tensor:
        """The model output as ε (v-prediction: ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t)."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alpha(t)
        return a**0.5 * output + (1.0 - a) ** 0.5 * sample

    @staticmethod
    def _move(eps: Tensor, sample: Tensor, a_from: float, a_to: float) -> Tensor:
        x0 = (sample - (1.0 - a_from) ** 0.5 * eps) / a_from**0.5
        return a_to**0.5 * x0 + (1.0 - a_to) ** 0.5 * eps

    def prev_step(self, eps: Tensor, t: int, sample: Tensor) -> Tensor:
        """One denoising DDIM step t → t − Δ (η = 0; the reference's ``prev_step``)."""
        return self._move(eps, sample, self.alpha(t), self.alpha(t - self.step_size))

    def next_step(self, eps: Tensor, t: int, sample: Tensor) -> Tensor:
        """One inversion DDIM step t − Δ → t with ε predicted at t (the reference's ``next_step``)."""
        return self._move(eps, sample, self.alpha(min(t - self.step_size, 999)), self.alpha(t))


# ---- model calls ---------------------------------------------------------------------------------
def model_device(pipe: StableDiffusionPipeline) -> torch.device:
    return next(pipe.unet.parameters()).device


def model_dtype(pipe: StableDiffusionPipeline) -> torch.dtype:
    return next(pipe.unet.parameters()).dtype


@torch.no_grad()
def encode_text(pipe: StableDiffusionPipeline, prompts: list[str]) -> Tensor:
    """Text-encoder hidden states of prompts padded to the tokenizer's length L (77 in SD), fp32, (N, L, D)."""
    tokens = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(pipe.text_encoder.parameters()).device
    hidden = pipe.text_encoder(tokens.input_ids.to(device))[0]
    return hidden.float()


def unet_epsilon(
    pipe: StableDiffusionPipeline, schedule: DDIMSchedule, latents: Tensor, t: int, context: Tensor, unet: Any = None
) -> Tensor:
    """ε predicted by the UNet for fp32 ``latents`` at timestep ``t`` (fp32 out; weights in any dtype).

    ``unet`` overrides ``pipe.unet`` (a ``torch.compile``d wrapper of it); it gets the timestep as a
    0-d tensor so that one compiled graph serves every timestep.
    """
    dtype = model_dtype(pipe)
    timestep: int | Tensor = t
    if unet is None:
        unet = pipe.unet
    else:
        timestep = torch.tensor(t, device=latents.device)
        # CUDA-graph replays reuse output buffers: start a new graph step and own the result.
        torch.compiler.cudagraph_mark_step_begin()
    out = unet(latents.to(dtype), timestep, encoder_hidden_states=context.to(dtype), return_dict=False)[0]
    out = out.float() if unet is pipe.unet else out.float().clone()
    return schedule.to_epsilon(out, t, latents)


def compiled_unet(pipe: StableDiffusionPipeline, compile_unet: bool | dict[str, Any]) -> Any:
    """``None`` (use ``pipe.unet``), or ``torch.compile(pipe.unet, **options)`` without touching the pipe.

    ``True`` means ``mode="reduce-overhead"`` (CUDA graphs on GPUs: the batch-1 inversion is
    launch-bound); a dict gives torch.compile's keyword arguments.
    """
    if not compile_unet:
        return None
    options: dict[str, Any] = {"mode": "reduce-overhead"} if compile_unet is True else dict(compile_unet)
    return torch.compile(pipe.unet, **options)
