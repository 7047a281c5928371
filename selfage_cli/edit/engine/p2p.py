"""Batched prompt-to-prompt sampling: every target age in one pass from one inversion.

A pass holds the source branch and up to ``max_batch`` target branches, doubled for guidance:
``[uncond × B, cond × B]``. At step i the unconditional half uses the inversion's null embedding
``null_embeddings[i]``; the conditional half uses each branch's prompt. After the guided ε and the
DDIM step, the local blend pulls each edit back to the source outside its mask. With more targets
than ``max_batch`` the targets are split into chunks, each re-running the source branch (the
source branch never depends on the edits, so every chunk's source is the same);
``max_batch=1`` is the reference's per-age loop of two-prompt runs.

Direct inversion (``inversion.mode == "direct"``; PnP Inversion, Ju et al., ICLR 2024): the
unconditional half uses the plain ``""`` embedding, and after each guided DDIM step — before the local
blend, as in the authors' ``direct_inversion_p2p_guidance_diffusion_step`` — the source branch alone
gets the correction :func:`correct_source`: the difference between the stored DDIM-inversion latent for
that step and its own latent, so it follows the inversion trajectory exactly and ends on x_0. The
target branches step with the usual attention control and are never corrected; they take the
corrected source's attention maps and, through the local blend, its latents outside the mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import PIL.Image
import torch
from torch import Tensor

from selfage_cli.edit.engine.attention import P2PController, installed
from selfage_cli.edit.engine.blend import LocalBlend
from selfage_cli.edit.engine.ddim import DDIMSchedule, encode_text, model_device, model_dtype
from selfage_cli.edit.engine.inversion import Inversion
from selfage_cli.edit.engine.mapper import equalizer, replacement_mapper, token_length, word_token_indices
from selfage_cli.edit.prompts import EditPrompts

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

Progress = Callable[[int, int], None] | None


@dataclass
class P2PSettings:
    """Prompt-to-prompt settings (the reference's defaults).

    ``cross_replace``: fraction of steps (of T + 1) with cross-attention replacement;
    ``self_replace``: fraction of steps with self-attention injection; ``blend_threshold`` and
    ``blend_start``: local-blend mask threshold and the fraction of steps before it starts;
    ``reweight``: re-weighting of the target age word's tokens (1 = identity, the reference's value);
    ``local_blend``: switch the blend off (for experiments; the method always blends).
    """

    cross_replace: float = 0.8
    self_replace: float = 0.5
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    reweight: float = 1.0
    local_blend: bool = True


@dataclass
class EditResult:
    """The edited latents and images: index 0 is the source reconstruction, then one per target.

    ``masks``: the last local-blend masks (1 + K, 1, h, w) as floats (None when the blend never ran);
    ``unet_calls``: UNet forwards made (T × passes); ``chunks``: the passes' target indices.
    """

    latents: Tensor
    images: list[PIL.Image.Image]
    masks: Tensor | None
    unet_calls: int
    seconds: float
    chunks: list[list[int]] = field(default_factory=list)


def chunk_indices(count: int, max_batch: int | None) -> list[list[int]]:
    """Target indices split into passes of at most ``max_batch`` (None: all in one)."""
    size = count if not max_batch or max_batch <= 0 else max_batch
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def blend_word_weights(prompts: EditPrompts, tokenizer: CLIPTokenizer) -> Tensor:
    """(1 + K, N): 1 on the tokens of each branch's blend words (source words for branch 0).

    N is the tokenizer's padded prompt length (``token_length``; 77 for SD's CLIP).
    """
    weights = torch.zeros(1 + len(prompts.targets), token_length(tokenizer))
    words = [prompts.source_blend_words, *prompts.target_blend_words]
    for b, (prompt, branch_words) in enumerate(zip(prompts.all_prompts, words, strict=True)):
        for word in branch_words:
            weights[b, word_token_indices(prompt, word, tokenizer)] = 1.0
    return weights


def build_controller(
    prompts: EditPrompts, tokenizer: CLIPTokenizer, settings: P2PSettings, steps: int, latent_side: int
) -> P2PController:
    """The controller of one pass (source + the targets of ``prompts``)."""
    mappers = torch.stack([replacement_mapper(prompts.source, t, tokenizer) for t in prompts.targets])
    equalizers = torch.stack(
        [
            equalizer(t, words[0], settings.reweight, tokenizer)
            for t, words in zip(prompts.targets, prompts.target_blend_words, strict=True)
        ]
    )
    blend = None
    if settings.local_blend:
        blend = LocalBlend(
            blend_word_weights(prompts, tokenizer),
            steps,
            threshold=settings.blend_threshold,
            start=settings.blend_start,
        )
    return P2PController(
        steps=steps,
        latent_side=latent_side,
        mappers=mappers,
        equalizers=equalizers,
        cross_replace=settings.cross_replace,
        self_replace=settings.self_replace,
        blend=blend,
    )


def correct_source(latents: Tensor, target: Tensor) -> Tensor:
    """Direct inversion's per-step correction: the source branch (row 0) plus (target − itself).

    ``target`` is the DDIM-inversion latent the step should reach (x_{t−Δ}, shape (1, C, h, w)). The
    authors add the offset ``x*_{t−Δ} − DDIM_step(x*_t)`` computed in a separate pass over the
    inversion trajectory (``offset_calculate``, their ``noise_loss``); the source branch enters every
    step at x*_t here too, so the difference taken from its own latent is that same offset without
    the extra T UNet calls. The target rows are returned untouched.
    """
    return torch.cat([latents[:1] + (target - latents[:1]), latents[1:]])


def direct_targets(inversion: Inversion, steps: int, device: torch.device) -> list[Tensor] | None:
    """The latents the source branch must reach after each sampling step (x_{T−1}, …, x_0), or None
    when the inversion is not a direct inversion."""
    if inversion.mode != "direct":
        return None
    if inversion.trajectory is None or len(inversion.trajectory) != steps + 1:
        raise ValueError("a direct inversion needs its T + 1 DDIM-inversion latents (the trajectory)")
    return [inversion.trajectory[steps - 1 - i].to(device, torch.float32) for i in range(steps)]


@torch.no_grad()
def sample_pass(
    pipe: StableDiffusionPipeline,
    schedule: DDIMSchedule,
    inversion: Inversion,
    context: Tensor,
    controller: P2PController,
    *,
    guidance: float,
    on_step: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One guided prompt-to-prompt pass from x_T; returns the final latents (B, C, h, w) and masks."""
    device, dtype = model_device(pipe), model_dtype(pipe)
    branches = context.shape[0]
    latents = inversion.x_t.to(device, torch.float32).expand(branches, -1, -1, -1).clone()
    null = inversion.null_embeddings.to(device)
    cond = context.to(device, dtype)
    controller.to(device)
    targets = direct_targets(inversion, schedule.steps, device)
    with installed(pipe.unet, controller):
        for i, t in enumerate(schedule.timesteps):
            controller.begin_step()
            uncond = null[i : i + 1].to(dtype).expand(branches, -1, -1)
            out = pipe.unet(
                torch.cat([latents, latents]).to(dtype),
                t,
                encoder_hidden_states=torch.cat([uncond, cond]),
                cross_attention_kwargs={"step": i},
                return_dict=False,
            )[0].float()
            eps = schedule.to_epsilon(out, t, torch.cat([latents, latents]))
            eps_uncond, eps_cond = eps.chunk(2)
            latents = schedule.prev_step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents)
            if targets is not None:
                latents = correct_source(latents, targets[i])
            if controller.blend is not None:
                latents = controller.blend(latents, i)
            if on_step:
                on_step()
    mask = controller.blend.last_mask if controller.blend is not None else None
    return latents, mask


def edit_latents(
    pipe: StableDiffusionPipeline,
    inversion: Inversion,
    prompts: EditPrompts,
    *,
    settings: P2PSettings,
    max_batch: int | None = None,
    guidance: float = 7.5,
    progress: Progress = None,
) -> EditResult:
    """All target ages from one inversion, in passes of at most ``max_batch`` targets."""
    start = time.perf_counter()
    schedule = DDIMSchedule.from_pipe(pipe, inversion.steps)
    if inversion.null_embeddings.shape[0] != schedule.steps:
        raise ValueError("the inversion's null embeddings do not match its number of steps")
    latent_side = int(inversion.x_t.shape[-1])
    contexts = encode_text(pipe, prompts.all_prompts)
    chunks = chunk_indices(len(prompts.targets), max_batch)
    total = schedule.steps * len(chunks)
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    source_latent: Tensor | None = None
    source_mask: Tensor | None = None
    target_latents: list[Tensor] = []
    target_masks: list[Tensor | None] = []
    for chunk in chunks:
        sub = prompts.subset(chunk)
        controller = build_controller(sub, pipe.tokenizer, settings, schedule.steps, latent_side)
        context = contexts[[0, *(1 + k for k in chunk)]]
        latents, mask = sample_pass(pipe, schedule, inversion, context, controller, guidance=guidance, on_step=on_step)
        if source_latent is None:
            source_latent = latents[:1]
            source_mask = mask[:1] if mask is not None else None
        target_latents.append(latents[1:])
        target_masks.extend(list(mask[1:]) if mask is not None else [None] * len(chunk))
    assert source_latent is not None
    masks = None
    if source_mask is not None and all(m is not None for m in target_masks):
        masks = torch.cat([source_mask, torch.stack(target_masks)]).float()  # type: ignore[arg-type]
    return EditResult(
        latents=torch.cat([source_latent, *target_latents]),
        images=[],
        masks=masks,
        unet_calls=total,
        seconds=time.perf_counter() - start,
        chunks=chunks,
    )
