"""The SelfAge contrastive term: NT-Xent (SimCLR) computed per latent channel and averaged.

For a batch of B predictions p_i and targets g_i (B×C×H×W), for each channel c: flatten channel c
of every sample over space, form z = [p_1..p_B, g_1..g_B], take cosine similarities divided by the
temperature, and for each of the 2B anchors score its partner (p_i ↔ g_i) against the other 2B−2
(the anchor itself is excluded) with cross-entropy; sum over anchors, divide by 2B. The result is
the mean over channels. Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_per_channel(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent between ``pred`` and ``target`` (both B×C×…), per channel, averaged over channels.

    With B = 1 there are no negatives and the loss is 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    batch, channels = pred.shape[:2]
    p = pred.float().reshape(batch, channels, -1).transpose(0, 1)  # C × B × D
    g = target.float().reshape(batch, channels, -1).transpose(0, 1)
    z = F.normalize(torch.cat([p, g], dim=1), dim=-1)  # C × 2B × D
    logits = z @ z.transpose(1, 2) / temperature  # C × 2B × 2B
    eye = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    # Made on the device: a CPU tensor copied over would be a host-to-device copy, which a CUDA-graph
    # recording of the training step cannot contain.
    partner = torch.cat([torch.arange(batch, 2 * batch, device=z.device), torch.arange(0, batch, device=z.device)])
    # mean over C·2B anchors == (sum over anchors / 2B) averaged over channels
    return F.cross_entropy(logits.reshape(channels * 2 * batch, 2 * batch), partner.repeat(channels))
