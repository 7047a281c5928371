"""Inverting a photo's latent: DDIM inversion, null-text optimisation, negative-prompt inversion.

* :func:`ddim_inversion` runs the schedule backwards (low → high noise) with the conditional ε and
  keeps every latent (T + 1 of them; x_T is the last).
* :func:`null_text_optimisation` (Mokady et al. 2023, the reference's ``null_optimization``) finds,
  for each timestep, an unconditional embedding with which guided DDIM sampling retraces the
  inversion trajectory: fresh Adam per timestep on a copy of the previous result (warm start from
  the ``""`` embedding), lr 1e-2·(1 − i/100), the conditional ε computed once per timestep, up to
  ``inner_steps`` inner steps with early stopping when the loss (measured before the update)
  falls under 1e-5 + i·2e-5.
* :func:`negative_prompt_inversion` (Miyake et al. 2023) skips the optimisation: the conditional
  embedding is the null embedding of every step.
* ``direct`` (PnP Inversion / Direct Inversion, Ju et al. 2024) skips it too: the null embedding stays
  ``""`` and the DDIM-inversion latents x_0 … x_T are kept (``trajectory``), so that editing can put the
  source branch back on them at every step (:func:`selfage_cli.edit.engine.p2p.correct_source`).

The optimisation runs in fp32 on the embedding, the latents and the loss whatever the UNet's weight
dtype (fp16/bf16 weights only change the UNet's internal arithmetic; the test suite checks that a
bf16 UNet gives the fp32 result within a tolerance).

How the UNet runs (:func:`inversion_unet`): on a CUDA GPU it is replayed from CUDA graphs by
default (``cuda_graph``; :mod:`selfage_cli.edit.engine.cuda_graph` checks the replays against eager execution and
falls back to it), elsewhere eagerly; ``compile_unet`` runs its calls through ``torch.compile``
instead (faster per call after a one-off compile; figures in docs/benchmarks.md, "Latest figures: GPU").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Adam

from selfage_cli.edit.engine.cuda_graph import GraphedUNet, cuda_graphs_available
from selfage_cli.edit.engine.ddim import DDIMSchedule, compiled_unet, encode_text, unet_epsilon

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

Progress = Callable[[int, int], None] | None

NULL_TEXT_LR = 1e-2
NULL_TEXT_EPSILON = 1e-5
NULL_TEXT_EPSILON_SLOPE = 2e-5
MODES = ("null-text", "negative-prompt", "direct")


@dataclass
class Inversion:
    """An inverted photo: x_T and one null (unconditional) embedding per sampling step.

    ``null_embeddings[i]`` is used at sampling step i (timestep ``timesteps[i]``, high → low noise).
    ``inner_steps_run[i]`` counts the Adam steps taken at step i (0 for negative-prompt inversion).
    ``trajectory`` holds the T + 1 DDIM-inversion latents (x_0 … x_T) when kept (always for ``direct``,
    whose editing follows them).
    """

    x_t: Tensor  # (1, C, h, w) fp32
    null_embeddings: Tensor  # (T, L, D) fp32, L = the tokenizer's length (77 in SD)
    mode: str
    prompt: str
    steps: int
    guidance: float
    inner_steps_run: list[int]
    seconds: float
    trajectory: list[Tensor] | None = None
    learning_rates: list[float] = field(default_factory=list)
    unet_runner: str = "eager"  # how the UNet ran: eager, cuda-graph or compiled (kept in the cache)
    # CUDA-graph runs: relative difference from eager execution found at the first replay of each kind
    graph_differences: dict[str, float] = field(default_factory=dict)
    # ... and how far two eager calls on the same inputs were from each other (rounding noise)
    graph_eager_noise: dict[str, float] = field(default_factory=dict)

    @property
    def total_inner_steps(self) -> int:
        return int(sum(self.inner_steps_run))


def null_text_lr(i: int, base: float = NULL_TEXT_LR) -> float:
    """The reference's learning rate at step i: 1e-2 · (1 − i/100)."""
    return base * (1.0 - i / 100.0)


def early_stop_threshold(i: int) -> float:
    """Inner steps stop once the loss (before the update) is under 1e-5 + i · 2e-5."""
    return NULL_TEXT_EPSILON + i * NULL_TEXT_EPSILON_SLOPE


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on a module's parameters for the duration (restored after).

    The null-text backward pass needs gradients w.r.t. the embedding only; loaded pipelines leave
    ``requires_grad=True`` on every weight, which would make each inner step also compute (and
    store) a gradient for every UNet weight.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@torch.no_grad()
def ddim_inversion(
    pipe: StableDiffusionPipeline,
    schedule: DDIMSchedule,
    latent: Tensor,
    cond: Tensor,
    progress: Progress = None,
    unet: Any = None,
) -> list[Tensor]:
    """x_0 → x_T with the conditional ε (no guidance); returns all T + 1 latents, fp32."""
    x = latent.float()
    out = [x]
    total = schedule.steps
    for k, t in enumerate(reversed(schedule.timesteps)):
        eps = unet_epsilon(pipe, schedule, x, t, cond, unet)
        x = schedule.next_step(eps, t, x)
        out.append(x)
        if progress:
            progress(k + 1, total)
    return out


def null_text_optimisation(
    pipe,
    schedule: DDIMSchedule,
    trajectory: list[Tensor],
    cond: Tensor,
    null: Tensor,
    *,
    guidance: float = 7.5,
    inner_steps: int = 10,
    progress: Progress = None,
    unet: Any = None,
) -> tuple[Tensor, list[int], list[float]]:
    """Per-step null embeddings (T, L, D) fp32, the inner steps run per step and the lrs used.

    One UNet call for the conditional ε per timestep, one forward + backward per inner step, one
    no-grad call to advance the latent with the final embedding.
    """
    steps = schedule.steps
    current = null.detach().float().clone()
    latent = trajectory[-1]
    embeddings: list[Tensor] = []
    runs: list[int] = []
    lrs: list[float] = []
    for i, t in enumerate(schedule.timesteps):
        target = trajectory[len(trajectory) - i - 2]
        current = current.clone().detach().requires_grad_(True)
        lr = null_text_lr(i)
        optimiser = Adam([current], lr=lr)
        lrs.append(lr)
        with torch.no_grad():
            eps_cond = unet_epsilon(pipe, schedule, latent, t, cond, unet)
        threshold = early_stop_threshold(i)
        run = 0
        for _ in range(inner_steps):
            eps_uncond = unet_epsilon(pipe, schedule, latent, t, current, unet)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            rebuilt = schedule.prev_step(eps, t, latent)
            loss = torch.nn.functional.mse_loss(rebuilt, target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            run += 1
            if loss.item() < threshold:
                break
        current = current.detach()
        embeddings.append(current.clone())
        runs.append(run)
        with torch.no_grad():
            eps_uncond = unet_epsilon(pipe, schedule, latent, t, current, unet)
            latent = schedule.prev_step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latent)
        if progress:
            progress(i + 1, steps)
    return torch.cat(embeddings, dim=0), runs, lrs


def invert_latent(
    pipe: StableDiffusionPipeline,
    latent: Tensor,
    prompt: str,
    *,
    mode: str = "null-text",
    steps: int = 50,
    guidance: float = 7.5,
    inner_steps: int = 10,
    progress: Progress = None,
    keep_trajectory: bool = False,
    compile_unet: bool | dict[str, Any] = False,
    cuda_graph: bool = True,
) -> Inversion:
    """Invert an encoded latent (1, C, h, w) with the given prompt and mode.

    Args:
        latent: the photo's latent (:func:`selfage_cli.edit.engine.encode_image`), fp32.
        prompt: the source prompt (``EditPrompts.source``).
        mode: ``null-text`` (the paper's), ``negative-prompt`` or ``direct`` (no optimisation; direct
            keeps the DDIM-inversion latents, which its editing's source branch follows).
        steps, guidance: DDIM steps and classifier-free guidance scale of the later edit.
        inner_steps: null-text optimisation steps per DDIM step (at most; early stopping).
        progress: called as ``progress(done, total)`` after each DDIM step (inversion, then optimisation).
        keep_trajectory: keep the T + 1 DDIM-inversion latents.
        compile_unet: run the UNet calls through ``torch.compile`` (``True``: ``mode="reduce-overhead"``,
            i.e. CUDA graphs on a GPU; a dict: torch.compile's options); off by default.
        cuda_graph: replay the UNet calls from CUDA graphs, checked against eager execution
            (:mod:`selfage_cli.edit.engine.cuda_graph`); acts only on a CUDA GPU and without ``compile_unet``.

    Returns:
        The :class:`Inversion`: x_T, one null embedding per step, and how it ran.
    """
    if mode not in MODES:
        raise ValueError(f"inversion mode {mode!r} is not one of {MODES}")
    start = time.perf_counter()
    schedule = DDIMSchedule.from_pipe(pipe, steps)
    device = latent.device
    cond, null = encode_text(pipe, [prompt, ""]).to(device).chunk(2)
    total = 2 * steps if mode == "null-text" else steps

    def forward_progress(done: int, _total: int) -> None:
        if progress:
            progress(done, total)

    unet = inversion_unet(pipe, mode, compile_unet, cuda_graph)
    # Frozen for the whole inversion, not just the optimisation: one parameter state means one
    # compiled graph per grad mode under torch.compile (requires_grad flips are recompile guards).
    with frozen(pipe.unet):
        trajectory = ddim_inversion(pipe, schedule, latent, cond, forward_progress, unet)
        lrs: list[float] = []
        if mode == "null-text":

            def backward_progress(done: int, _total: int) -> None:
                if progress:
                    progress(steps + done, total)

            embeddings, runs, lrs = null_text_optimisation(
                pipe,
                schedule,
                trajectory,
                cond,
                null,
                guidance=guidance,
                inner_steps=inner_steps,
                progress=backward_progress,
                unet=unet,
            )
        else:
            # negative-prompt: the prompt is the null embedding; direct: the plain "" embedding
            kept = null if mode == "direct" else cond
            embeddings = kept.expand(steps, *kept.shape[1:]).clone()
            runs = [0] * steps
    return Inversion(
        x_t=trajectory[-1].detach().clone(),
        null_embeddings=embeddings.detach().float(),
        mode=mode,
        prompt=prompt,
        steps=steps,
        guidance=float(guidance),
        inner_steps_run=runs,
        seconds=time.perf_counter() - start,
        trajectory=[x.detach().clone() for x in trajectory] if keep_trajectory or mode == "direct" else None,
        learning_rates=lrs,
        unet_runner=runner_name(unet),
        graph_differences=dict(unet.checked) if isinstance(unet, GraphedUNet) else {},
        graph_eager_noise=dict(unet.eager_noise) if isinstance(unet, GraphedUNet) else {},
    )


def inversion_unet(
    pipe: StableDiffusionPipeline, mode: str, compile_unet: bool | dict[str, Any], cuda_graph: bool
) -> Any:
    """The UNet callable the inversion uses (``None``: ``pipe.unet`` itself)."""
    if compile_unet:
        return compiled_unet(pipe, compile_unet)
    if cuda_graph and cuda_graphs_available(pipe):
        return GraphedUNet(pipe.unet, context_grad=mode == "null-text")
    return None


def runner_name(unet: Any) -> str:
    """How an inversion's UNet calls ran, for reports: ``eager``, ``cuda-graph`` or ``compiled``
    (a graphed UNet that fell back to eager execution reports ``eager``)."""
    if unet is None:
        return "eager"
    return unet.runner if isinstance(unet, GraphedUNet) else "compiled"
