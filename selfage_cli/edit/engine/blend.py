"""Prompt-to-prompt's local blend: keep the edit only where the blend words attend.

Accumulates, over all sampling steps so far, the (already replaced) cross-attention maps of the
conditional half of the batch at the *blend layers* (down- and up-block cross-attention at a
quarter of the latent side: SD 1.5's 16×16 layers, the tiny model's 4×4), each reduced on arrival
to the sum over the branch's blend-word tokens and summed over heads — the same numbers as the
reference's store-everything-then-reduce, without keeping L-channel maps (L: the prompt length, 77 in SD).

After a scheduler step, once ``step + 1 > int(blend_start · T)`` (the reference's counter is
incremented before its test), the mask is: mean over heads and layers, 3×3 max-pool (stride 1,
pad 1), nearest upsampling to the latent size, division by the per-image maximum, ``> threshold``,
then each edit's mask OR the source's; and ``x_edit ← x_src + mask · (x_edit − x_src)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LocalBlend:
    """Running blend-word attention per branch and the mask/blend step (branch 0 = the source)."""

    def __init__(self, word_weights: Tensor, steps: int, threshold: float = 0.3, start: float = 0.2) -> None:
        self.word_weights = word_weights.float()  # (B, L): 1 on each branch's blend-word tokens
        self.threshold = float(threshold)
        self.start_step = int(start * steps)
        self.sum: Tensor | None = None  # (B, tokens): Σ steps, layers, heads of blend-word attention
        self.pairs = 0  # (layer, head) pairs per step
        self._pairs_this_step = 0
        self.last_mask: Tensor | None = None

    @property
    def branches(self) -> int:
        return int(self.word_weights.shape[0])

    def begin_step(self) -> None:
        self._pairs_this_step = 0

    def add(self, probs: Tensor) -> None:
        """Add one blend layer's conditional cross-attention probabilities (B, heads, tokens, L)."""
        weights = self.word_weights.to(probs.device)
        reduced = torch.einsum("bhnw,bw->bn", probs.float(), weights)
        self.sum = reduced if self.sum is None else self.sum + reduced
        self._pairs_this_step += int(probs.shape[1])
        self.pairs = max(self.pairs, self._pairs_this_step)

    def active(self, step: int) -> bool:
        """Whether the blend applies after sampling step ``step`` (0-based)."""
        return step + 1 > self.start_step

    def mask(self, latent_hw: tuple[int, int]) -> Tensor:
        """The boolean mask (B, 1, h, w), each edit's ORed with the source's."""
        if self.sum is None or self.pairs == 0:
            raise RuntimeError("local blend has no attention maps: no blend layer was found in the UNet")
        tokens = self.sum.shape[1]
        side = int(round(tokens**0.5))
        maps = (self.sum / self.pairs).reshape(self.branches, 1, side, side)
        maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
        maps = F.interpolate(maps, size=latent_hw, mode="nearest")
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        mask = maps > self.threshold
        return mask[:1] | mask

    def __call__(self, latents: Tensor, step: int) -> Tensor:
        """Blend the latents after the scheduler step of sampling step ``step``."""
        if not self.active(step):
            return latents
        mask = self.mask(tuple(latents.shape[-2:]))
        self.last_mask = mask
        m = mask.to(latents.dtype)
        return latents[:1] + m * (latents - latents[:1])
