"""CUDA-graph replay of the UNet for the batch-1 calls of an inversion, checked against eager execution.

Null-text inversion makes ~650 batch-1 UNet calls (500 of them forward + backward w.r.t. the null
embedding). At batch 1 a GPU spends most of each call waiting for Python to launch its ~1,000
kernels; recording the call once as a CUDA graph and replaying it removes that cost without
changing a single operation (the same kernels on the same inputs). :class:`GraphedUNet` records on
the first call (``torch.cuda.make_graphed_callables``: forward, and backward when the context needs a
gradient) and replays afterwards; it behaves like ``pipe.unet`` called as
``unet(latents, timestep_tensor, encoder_hidden_states=ctx, return_dict=False)``.

Checked before it is trusted: the recording is made from stand-in inputs (random latents and
context, another timestep), so the first replay of each kind (forward only, and forward + backward) runs on inputs the
recording never saw; that replay is compared with an eager call on the same inputs (output, and the
gradient w.r.t. the context), and only if they agree does the inversion go on with graphs. A failed
recording or replay, or a disagreement, is reported once as a warning and the inversion continues
eagerly with the same result. Only CUDA devices, frozen UNets (no weight needs a gradient) and one
fixed input shape are replayed; any other call runs the plain UNet.

Used by default for inversions on a CUDA GPU (``invert(..., cuda_graph=True)``, ``edit
--no-cuda-graph`` to turn off). The recording and the checks are tested on the CPU with a stand-in
recorder; ``benchmarks/gpu.sh`` times it against eager execution (and ``--variants`` compares the two
inversions, ``edit_graph_check``); the figures are in docs/benchmarks.md ("Latest figures: GPU").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selfage_cli import console

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# Largest |graph − eager| allowed, relative to the largest |eager| value, by the UNet's weight dtype.
# The graph replays the eager kernels, so the two agree to rounding; a replay that read stale or
# wrong inputs is off by O(1). In bf16/fp16 the gradient w.r.t. the context differs by rounding alone
# by a few per cent (attention's backward accumulates in a nondeterministic order), hence the looser
# bound for reduced precision (docs/benchmarks.md shows the differences seen on a GPU).
AGREEMENT_TOLERANCE = 2e-2
REDUCED_PRECISION_TOLERANCE = 1e-1
# Whatever the dtype, a difference within this many times that of two eager calls on the same
# inputs is rounding too.
EAGER_NOISE_FACTOR = 4.0
FORWARD, BACKWARD = "forward", "forward + backward"


def agreement_tolerance(dtype: torch.dtype) -> float:
    """The relative difference a replay may have from eager execution at this weight dtype."""
    return AGREEMENT_TOLERANCE if dtype in (torch.float32, torch.float64) else REDUCED_PRECISION_TOLERANCE


def cuda_graphs_available(pipe: StableDiffusionPipeline) -> bool:
    """Whether the pipe's UNet sits on a CUDA device (CUDA graphs need one)."""
    return next(pipe.unet.parameters()).device.type == "cuda"


def relative_difference(value: Tensor, reference: Tensor) -> float:
    """max |value − reference| / max |reference| (inf when value has non-finite entries)."""
    value, reference = value.detach().float(), reference.detach().float()
    if not bool(torch.isfinite(value).all()):
        return float("inf")
    scale = reference.abs().max().clamp_min(1e-12)
    return float((value - reference).abs().max() / scale)


class GraphedUNet:
    """``pipe.unet`` for repeated fixed-shape calls, replayed from a CUDA graph.

    ``context_grad``: record the backward w.r.t. ``encoder_hidden_states`` as well (null-text
    optimisation); without it only the forward is recorded (negative-prompt inversion).
    ``failure`` holds why graphs were given up (``None`` while they are in use or not yet tried).
    """

    def __init__(self, unet: torch.nn.Module, *, context_grad: bool, warmup_iters: int = 3):
        self.unet = unet
        self.context_grad = context_grad
        self.warmup_iters = warmup_iters
        self.graphed: Any = None
        self.shapes: tuple[torch.Size, ...] | None = None
        self.failure: str | None = None
        self.checked: dict[str, float] = {}  # kind → relative difference found at its first replay
        self.eager_noise: dict[str, float] = {}  # kind → relative difference of two eager calls
        self.replays = 0

    @property
    def runner(self) -> str:
        """How the calls ran, for reports: ``cuda-graph`` when every call after recording replayed."""
        return "cuda-graph" if self.replays and self.failure is None else "eager"

    def _forward(self, sample: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    def _record(self, sample: Tensor, timestep: Tensor, context: Tensor) -> None:
        # Stand-in inputs: the first real replay then differs from what was recorded, so its check
        # also proves that replays read their inputs.
        stand_in_t = torch.full_like(timestep, 500 if int(timestep.max()) != 500 else 499)
        samples = (
            torch.randn_like(sample),
            stand_in_t,
            torch.randn_like(context).requires_grad_(self.context_grad),
        )
        # The first call may come under torch.no_grad() (DDIM inversion): recording there would
        # capture no backward graph, and the first backward replay would then fail
        # ("CUDAGraph::replay without a preceding successful capture").
        with torch.enable_grad():
            self.graphed = torch.cuda.make_graphed_callables(self._forward, samples, num_warmup_iters=self.warmup_iters)
        self.shapes = tuple(t.shape for t in samples)

    @staticmethod
    def _on_gpu(sample: Tensor) -> bool:
        return sample.device.type == "cuda"

    def _usable(self, sample: Tensor, timestep: Tensor, context: Tensor) -> bool:
        if self.failure is not None or not self._on_gpu(sample) or torch.is_autocast_enabled():
            return False
        if self.shapes is None and any(p.requires_grad for p in self.unet.parameters()):
            return False  # weights needing gradients: not what a recording covers (they stay frozen after)
        if context.requires_grad and torch.is_grad_enabled() and not self.context_grad:
            return False
        shapes = (sample.shape, timestep.shape, context.shape)
        return self.shapes is None or shapes == self.shapes

    def _give_up(self, why: str) -> None:
        self.failure = why
        self.graphed = None
        console.warn(f"CUDA-graph replay of the UNet {why}; running it without graphs (same result, slower).")

    def _check(self, kind: str, sample: Tensor, timestep: Tensor, context: Tensor) -> float:
        """Relative difference between a replay and an eager call on these inputs (output and, for
        ``BACKWARD``, the gradient w.r.t. the context against a fixed random cotangent). A second
        eager call measures the rounding noise of eager execution itself (``eager_noise``)."""
        cotangent: list[Tensor] = []

        def run(fn: Any) -> tuple[Tensor, ...]:
            if kind == FORWARD:
                with torch.no_grad():
                    return (fn(sample, timestep, context).detach().clone(),)
            probe = context.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = fn(sample, timestep, probe)
                if not cotangent:
                    cotangent.append(torch.randn_like(out, dtype=torch.float32))
                (grad,) = torch.autograd.grad((out.float() * cotangent[0]).sum(), probe)
            return out.detach().clone(), grad.clone()

        def difference(values: tuple[Tensor, ...], references: tuple[Tensor, ...]) -> float:
            return max(relative_difference(v, r) for v, r in zip(values, references, strict=True))

        graph, eager, eager_again = run(self.graphed), run(self._forward), run(self._forward)
        self.eager_noise[kind] = difference(eager_again, eager)
        return difference(graph, eager)

    def _tolerance(self, kind: str) -> float:
        dtype = next(self.unet.parameters()).dtype
        return max(agreement_tolerance(dtype), EAGER_NOISE_FACTOR * self.eager_noise.get(kind, 0.0))

    def _replay(self, sample: Tensor, timestep: Tensor, context: Tensor) -> Tensor | None:
        """The graph's output for these inputs, or ``None`` after giving graphs up."""
        kind = BACKWARD if context.requires_grad and torch.is_grad_enabled() else FORWARD
        try:
            if kind not in self.checked:
                self.checked[kind] = self._check(kind, sample, timestep, context)
                tolerance = self._tolerance(kind)
                if not self.checked[kind] <= tolerance:
                    self._give_up(
                        f"disagreed with eager execution ({kind}: relative difference "
                        f"{self.checked[kind]:.2g} > {tolerance:.2g}; two eager calls differ by "
                        f"{self.eager_noise[kind]:.2g})"
                    )
                    return None
            out = self.graphed(sample, timestep, context)
        except Exception as exc:  # noqa: BLE001 - any replay failure: run eagerly instead
            self._give_up(f"failed ({exc})")
            return None
        self.replays += 1
        return out

    def __call__(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False
    ) -> tuple[Tensor]:
        timestep = torch.as_tensor(timestep, device=sample.device)
        if self._usable(sample, timestep, encoder_hidden_states):
            if self.graphed is None:
                try:
                    self._record(sample, timestep, encoder_hidden_states)
                except Exception as exc:  # noqa: BLE001 - any recording failure: run eagerly instead
                    self._give_up(f"could not be recorded ({exc})")
            if self.graphed is not None:
                out = self._replay(sample, timestep, encoder_hidden_states)
                if out is not None:
                    return (out,)
        return (self._forward(sample, timestep, encoder_hidden_states),)
