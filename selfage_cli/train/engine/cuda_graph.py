"""The whole training step as one CUDA graph (on by default on a GPU; ``train --no-cuda-graph`` turns it off).

On a fast GPU the eager step of the paper configuration spends most of its time in Python and the
CUDA driver launching ~20,000 small kernels (LoRA, autocast casts, diffusers' blocks), not in GPU
work. Recording forward, loss, backward, gradient clipping and AdamW once and replaying them removes
that cost without changing an operation (the figures are in docs/benchmarks.md, "Latest figures:
GPU"). The random draws (latent posterior samples, noise, timesteps, prompt choice)
stay outside the graph, eager and in the same order, so the run draws the same numbers as an eager
one.

The recipe is PyTorch's whole-network capture: the first :data:`WARMUP_STEPS` steps run eagerly on a
side stream (they are real steps), then the step body (:meth:`Trainer.optimise
<selfage_cli.train.engine.loop.Trainer.optimise>`) is recorded on static input tensors, into which every
later step copies its inputs before the replay. AdamW keeps its step count on the GPU
(``capturable=True``), autocast's weight cache is off (the docs' rule for graphs).

Checked before it is trusted: the recording is made on zero inputs, and the first replay's loss (on
the copied-in real inputs) is compared with an eager forward pass on those inputs; on a
disagreement, or if recording or replaying fails, the LoRA weights and optimiser state are restored
from a snapshot taken before that replay, a warning names the cause and training continues eagerly.

Not used where it cannot work (:func:`why_not_graphed`): off a CUDA GPU, with ``--compile``,
gradient accumulation, gradient checkpointing, 8-bit Adam, fp16 (loss scaling syncs with the CPU) or
several processes; by default silently, with a warning when ``--cuda-graph`` asked for it.
``benchmarks/gpu.sh`` times it (``train_step`` with ``settings.cuda_graph``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selfage_cli import console

if TYPE_CHECKING:
    from selfage_cli.train.config import TrainConfig
    from selfage_cli.train.engine.loop import Trainer

WARMUP_STEPS = 2  # eager steps on a side stream before recording (cuBLAS/cuDNN set-up, optimiser state)
LOSS_TOLERANCE = 2e-2  # |replayed − eager| / |eager| loss at the first replay

StepOutputs = tuple[dict[str, Tensor], Tensor]  # (loss terms, gradient norm)


@dataclass
class StepInputs:
    """One micro-batch as the models see it: noisy latents, timesteps, the target, prompt rows."""

    noisy: Tensor
    timesteps: Tensor
    target: Tensor
    prompt_rows: Tensor

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def copy_into(self, static: StepInputs) -> None:
        """Write these values into ``static``'s tensors (a recorded graph reads those very tensors)."""
        for target, value in zip(static.tensors(), self.tensors(), strict=True):
            target.copy_(value)


def why_not_graphed(config: TrainConfig, device_type: str, weight_dtype: torch.dtype, processes: int) -> str | None:
    """Why a whole-step graph cannot be used for this set-up (``None``: it can)."""
    reasons = [
        (device_type != "cuda", "off a CUDA GPU"),
        (config.compile, "--compile (it brings its own CUDA graphs)"),
        (config.gradient_accumulation != 1, "--gradient-accumulation above 1"),
        (config.gradient_checkpointing, "--gradient-checkpointing"),
        (config.use_8bit_adam, "--use-8bit-adam"),
        (weight_dtype == torch.float16, "fp16 (its loss scaling syncs with the CPU)"),
        (processes > 1, "several processes"),
    ]
    return next((why for applies, why in reasons if applies), None)


def graph_wanted(config: TrainConfig, device_type: str, weight_dtype: torch.dtype, processes: int) -> bool:
    """Whether training replays its steps from a CUDA graph: by default (``cuda_graph=None``) wherever
    it works, silently; asked for (``True``) where it cannot, with a warning saying why; never with
    ``False``."""
    if config.cuda_graph is False:
        return False
    reason = why_not_graphed(config, device_type, weight_dtype, processes)
    if reason is not None and config.cuda_graph:
        console.warn(f"--cuda-graph does not work {reason}; training runs without it.")
    return reason is None


class CudaGraphs:
    """Recording and replaying on a CUDA device (tests pass a stand-in with the same two methods)."""

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def record(self, body: Callable[[], StepOutputs]) -> Callable[[], StepOutputs]:
        """Record ``body`` (not run: its kernels are captured); return a replay that gives its outputs."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph gets its own pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = body()

        def replay() -> StepOutputs:
            graph.replay()
            return outputs

        return replay


class GraphedStep:
    """Runs a :class:`~selfage_cli.train.engine.loop.Trainer`'s steps, from one CUDA graph after a warm-up."""

    def __init__(self, trainer: Trainer, backend: Any = None):
        self.trainer = trainer
        self.backend = backend or CudaGraphs()
        self.static: StepInputs | None = None
        self.replay: Callable[[], StepOutputs] | None = None
        self.failure: str | None = None
        self.eager_steps = 0
        self.replays = 0
        self.loss_difference: float | None = None  # found at the first replay

    @property
    def runner(self) -> str:
        return "cuda-graph" if self.replays and self.failure is None else "eager"

    def step(self, inputs: StepInputs) -> StepOutputs:
        """One optimisation step on ``inputs``: eager warm-up, then recording, then replays."""
        if self.replay is None and self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            with self.backend.side_stream():
                return self._eager(inputs)
        if self.replay is None:
            try:
                self._record(inputs)
            except Exception as exc:  # noqa: BLE001 - any recording failure: train eagerly instead
                self.trainer.optimizer.zero_grad(set_to_none=True)
                return self._give_up(f"could not be recorded ({exc})", inputs)
        assert self.static is not None and self.replay is not None
        inputs.copy_into(self.static)
        if self.loss_difference is None:
            return self._checked_replay(inputs)
        self.replays += 1
        return self.replay()

    def _eager(self, inputs: StepInputs) -> StepOutputs:
        outputs = self.trainer.optimise(inputs)
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return outputs

    def _record(self, inputs: StepInputs) -> None:
        # Recorded on zeros (a recording runs nothing, so the values do not matter to it): the first
        # replay then reads only what was copied in, and its check also proves the copying.
        static = self.static = StepInputs(*(torch.zeros_like(t) for t in inputs.tensors()))
        trainer = self.trainer
        trainer.optimizer.zero_grad(set_to_none=True)  # the recorded backward writes fresh gradients
        self.replay = self.backend.record(lambda: trainer.optimise(static))

    def _checked_replay(self, inputs: StepInputs) -> StepOutputs:
        """The first replay, compared with an eager forward pass; undone and run eagerly if it is wrong."""
        trainer = self.trainer
        state = _training_state(trainer)
        snapshot = [t.detach().clone() for t in state]
        with torch.no_grad():
            eager_loss = trainer.forward_loss(inputs)[0].detach().float()
        try:
            assert self.replay is not None
            outputs = self.replay()
            replayed = outputs[0]["loss"].detach().float()
            difference = float((replayed - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12))
            if not torch.isfinite(replayed) and not torch.isfinite(eager_loss):
                difference = 0.0  # both blew up: the graph is not the problem
        except Exception as exc:  # noqa: BLE001 - any replay failure: undo, train eagerly instead
            why = f"failed ({exc})"
        else:
            self.loss_difference = difference
            if difference <= LOSS_TOLERANCE:
                self.replays += 1
                return outputs
            why = f"disagreed with eager execution (loss relative difference {difference:.2g} > {LOSS_TOLERANCE:g})"
        with torch.no_grad():
            for tensor, saved in zip(state, snapshot, strict=True):
                tensor.copy_(saved)
        trainer.optimizer.zero_grad(set_to_none=True)
        return self._give_up(why, inputs)

    def _give_up(self, why: str, inputs: StepInputs) -> StepOutputs:
        self.failure = why
        self.replay = None
        console.warn(f"CUDA-graph replay of the training step {why}; training goes on without graphs.")
        return self._eager(inputs)


def _training_state(trainer: Trainer) -> list[Tensor]:
    """Every tensor a step changes: the LoRA weights and the optimiser's state (moments, step counts)."""
    state: list[Tensor] = [p.data for p in trainer.params]
    for per_param in trainer.optimizer.state.values():
        state += [v for v in per_param.values() if isinstance(v, Tensor)]
    return state
