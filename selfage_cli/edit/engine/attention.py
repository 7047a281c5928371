"""Prompt-to-prompt attention control as diffusers attention processors.

:class:`P2PAttnProcessor` is installed on every attention layer of the UNet with
``unet.set_attn_processor`` (nothing's ``forward`` is replaced) and restored afterwards by
:func:`installed`. The sampling step index reaches the processors explicitly, through the UNet's
``cross_attention_kwargs={"step": i}``; the per-edit state (mappers, α schedule, blend maps) lives
in one :class:`P2PController`.

Batch layout (as in the reference): ``[uncond × B, cond × B]`` with B = 1 + K branches, branch 0
the source. Control applies to the conditional half only; the unconditional half always runs
through torch SDPA. Explicit probabilities are computed only where the controller needs them:

* cross-attention, conditional half, while replacement is on (step < int(cross_replace·(T+1)))
  or at a blend layer (its maps feed the local blend at every step);
* self-attention, conditional half, for steps in [0, int(self_replace·T)) on layers with at most
  (latent side / 2)² tokens: only the *source* branch's probabilities are computed, and every
  branch attends with them (``P_src @ V_b``);
* everything else: ``F.scaled_dot_product_attention``.

Layers are chosen by their token count relative to the latent's (never by SD-1.5 indices), so the
tiny test model and SD 1.5 run the same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfage_cli.edit.engine.blend import LocalBlend

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

SDPA, CROSS, SELF = "sdpa", "cross", "self"


class P2PController:
    """The per-edit state of prompt-to-prompt: replacement schedule, mappers, re-weighting, blend.

    ``mappers``: (K, L, L) source→target word-swap mappers; ``equalizers``: (K, L) re-weighting
    of each target's tokens (1 = identity); ``latent_side``: side of the latent (64 for SD 1.5).
    """

    def __init__(
        self,
        *,
        steps: int,
        latent_side: int,
        mappers: Tensor,
        equalizers: Tensor,
        cross_replace: float = 0.8,
        self_replace: float = 0.5,
        blend: LocalBlend | None = None,
    ) -> None:
        self.steps = steps
        self.latent_side = int(latent_side)
        self.mappers = mappers.float()
        self.equalizers = equalizers.float()
        self.branches = 1 + int(mappers.shape[0])
        # The reference's α is a (T + 1)-long table: 1 for steps < int(cross_replace · (T + 1)).
        self.cross_steps = int(cross_replace * (steps + 1))
        self.self_steps = (0, int(self_replace * steps))
        self.blend = blend
        self.calls: dict[str, int] = {SDPA: 0, CROSS: 0, SELF: 0}

    def to(self, device: torch.device | str) -> P2PController:
        """Move the mappers, re-weighting and blend weights to the UNet's device (once per pass)."""
        self.mappers = self.mappers.to(device)
        self.equalizers = self.equalizers.to(device)
        if self.blend is not None:
            self.blend.word_weights = self.blend.word_weights.to(device)
        return self

    # ---- layer and step selection -------------------------------------------------------------
    def cross_alpha(self, step: int) -> float:
        return 1.0 if step < self.cross_steps else 0.0

    def injects_self(self, tokens: int, step: int) -> bool:
        """Self-attention injection: steps in [0, int(self_replace·T)), layers ≤ (side/2)² tokens."""
        lo, hi = self.self_steps
        return lo <= step < hi and tokens <= (self.latent_side // 2) ** 2

    def is_blend_layer(self, name: str, tokens: int) -> bool:
        """Down/up-block cross-attention at a quarter of the latent side (SD 1.5: 16×16)."""
        return not name.startswith("mid") and tokens == (self.latent_side // 4) ** 2

    def mode(self, name: str, is_cross: bool, tokens: int, step: int | None) -> str:
        """Which path a layer takes at this step: SDPA, explicit cross control, or self injection."""
        if step is None:
            return SDPA
        if is_cross:
            if self.cross_alpha(step) > 0 or (self.blend is not None and self.is_blend_layer(name, tokens)):
                return CROSS
            return SDPA
        if self.branches > 1 and self.injects_self(tokens, step):
            return SELF
        return SDPA

    def begin_step(self) -> None:
        if self.blend is not None:
            self.blend.begin_step()

    # ---- the edits --------------------------------------------------------------------------------
    def edit_cross(self, probs: Tensor, name: str, tokens: int, step: int) -> Tensor:
        """Replace the edits' cross-attention (conditional half, (B, heads, N, L), fp32) and store it."""
        alpha = self.cross_alpha(step)
        if alpha > 0 and self.branches > 1:
            base = probs[0]
            mappers = self.mappers.to(probs.device)
            replaced = torch.einsum("hpw,bwn->bhpn", base, mappers)
            replaced = replaced * self.equalizers.to(probs.device)[:, None, None, :]
            probs = torch.cat([probs[:1], alpha * replaced + (1.0 - alpha) * probs[1:]], dim=0)
        if self.blend is not None and self.is_blend_layer(name, tokens):
            self.blend.add(probs)
        return probs


def _explicit_probs(attn: Any, query: Tensor, key: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q kᵀ · scale (+ mask)) in fp32, shapes (b, heads, n, d) × (b, heads, m, d) → (b, heads, n, m)."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(dim=-1)


class P2PAttnProcessor:
    """Attention processor of one layer: SDPA, or prompt-to-prompt control when the controller asks."""

    def __init__(self, name: str, controller: P2PController | None) -> None:
        self.name = name
        self.controller = controller

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        is_cross = encoder_hidden_states is not None
        context_len = encoder_hidden_states.shape[1] if is_cross else tokens
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        controller = self.controller
        mode = SDPA if controller is None else controller.mode(self.name, is_cross, tokens, step)
        if controller is not None:
            controller.calls[mode] += 1
        if mode == SDPA:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        else:
            assert controller is not None and step is not None
            half = batch // 2
            if half != controller.branches:
                raise RuntimeError(f"batch {batch} does not hold 2 × {controller.branches} branches")
            mask_u = attention_mask[:half] if attention_mask is not None else None
            mask_c = attention_mask[half:] if attention_mask is not None else None
            out_u = F.scaled_dot_product_attention(
                query[:half], key[:half], value[:half], attn_mask=mask_u, scale=attn.scale
            )
            if mode == CROSS:
                probs = _explicit_probs(attn, query[half:], key[half:], mask_c)
                probs = controller.edit_cross(probs, self.name, tokens, step)
                out_c = torch.matmul(probs.to(value.dtype), value[half:])
            else:  # SELF: every branch attends with the source branch's probabilities
                source_mask = mask_c[:1] if mask_c is not None else None
                probs = _explicit_probs(attn, query[half : half + 1], key[half : half + 1], source_mask)
                out_c = torch.matmul(probs.to(value.dtype), value[half:])
            out = torch.cat([out_u, out_c], dim=0)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def installed(unet: UNet2DConditionModel, controller: P2PController | None) -> Iterator[dict[str, P2PAttnProcessor]]:
    """Install our processor on every attention layer for the duration; restore the originals after."""
    original = dict(unet.attn_processors)
    ours = {name: P2PAttnProcessor(name, controller) for name in original}
    unet.set_attn_processor(dict(ours))  # set_attn_processor pops from the dict it is given
    try:
        yield ours
    finally:
        unet.set_attn_processor(dict(original))
