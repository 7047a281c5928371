"""CUDA-graph replay of the UNet for the batch-1 calls of an inversion.

Null-text inversion makes ~650 batch-1 UNet calls (500 of them forward + backward w.r.t. the null
embedding). At batch 1 a GPU spends most of each call waiting for Python to launch its ~1,000
kernels; recording the call once as a CUDA graph and replaying it removes that cost without
changing a single operation (the same kernels on the same inputs, so the results match eager
execution). :class:`GraphedUNet` records on the first call (``torch.cuda.make_graphed_callables``:
forward, and backward when the context needs a gradient) and replays afterwards; it behaves like
``pipe.unet`` called as ``unet(latents, timestep_tensor, encoder_hidden_states=ctx, return_dict=False)``.

Only for CUDA devices, frozen UNets (no weight needs a gradient) and one fixed input shape; any other
call, and any failure to record, falls back to the plain UNet (with a warning for the failure).

**Experimental, off by default** (``invert(..., cuda_graph=True)``): its first H100 run failed (the
recording was made under ``torch.no_grad`` and so held no backward graph); that is fixed and tested on
the CPU with a stand-in recorder, but the GPU path has not run since. ``benchmarks/gpu.sh --variants``
checks it against eager execution (``edit_graph_check``) and times it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfage_cli import console


def cuda_graphs_available(pipe: Any) -> bool:
    """Whether the pipe's UNet sits on a CUDA device (CUDA graphs need one)."""
    return next(pipe.unet.parameters()).device.type == "cuda"


class GraphedUNet:
    """``pipe.unet`` for repeated fixed-shape calls, replayed from a CUDA graph.

    ``context_grad``: record the backward w.r.t. ``encoder_hidden_states`` as well (null-text
    optimisation); without it only the forward is recorded (negative-prompt inversion).
    """

    def __init__(self, unet: torch.nn.Module, *, context_grad: bool, warmup_iters: int = 3):
        self.unet = unet
        self.context_grad = context_grad
        self.warmup_iters = warmup_iters
        self.graphed: Any = None
        self.shapes: tuple[torch.Size, ...] | None = None
        self.failed = False
        self.replays = 0

    def _forward(self, sample: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    def _record(self, sample: Tensor, timestep: Tensor, context: Tensor) -> None:
        samples = (
            sample.detach().clone(),
            timestep.detach().clone(),
            context.detach().clone().requires_grad_(self.context_grad),
        )
        # The first call may come under torch.no_grad() (DDIM inversion): recording there would
        # capture no backward graph, and the first backward replay would then fail
        # ("CUDAGraph::replay without a preceding successful capture", seen on an H100).
        with torch.enable_grad():
            self.graphed = torch.cuda.make_graphed_callables(self._forward, samples, num_warmup_iters=self.warmup_iters)
        self.shapes = tuple(t.shape for t in samples)

    @staticmethod
    def _on_gpu(sample: Tensor) -> bool:
        return sample.device.type == "cuda"

    def _usable(self, sample: Tensor, timestep: Tensor, context: Tensor) -> bool:
        if self.failed or not self._on_gpu(sample) or torch.is_autocast_enabled():
            return False
        if self.shapes is None and any(p.requires_grad for p in self.unet.parameters()):
            return False  # weights needing gradients: not what a recording covers (they stay frozen after)
        if context.requires_grad and torch.is_grad_enabled() and not self.context_grad:
            return False
        shapes = (sample.shape, timestep.shape, context.shape)
        return self.shapes is None or shapes == self.shapes

    def __call__(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False
    ) -> tuple[Tensor]:
        timestep = torch.as_tensor(timestep, device=sample.device)
        if self._usable(sample, timestep, encoder_hidden_states):
            if self.graphed is None:
                try:
                    self._record(sample, timestep, encoder_hidden_states)
                except Exception as exc:  # noqa: BLE001 - any recording failure: run eagerly instead
                    self.failed = True
                    self.graphed = None
                    console.warn(f"CUDA-graph recording of the UNet failed ({exc}); running it without graphs.")
            if self.graphed is not None:
                self.replays += 1
                return (self.graphed(sample, timestep, encoder_hidden_states),)
        return (self._forward(sample, timestep, encoder_hidden_states),)
