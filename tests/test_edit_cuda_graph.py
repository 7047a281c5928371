"""CUDA-graph replay of the inversion's UNet: the selection, the checks, the fallback and the plumbing
(on the CPU).

The real recording needs a GPU (``benchmarks/gpu.sh --variants`` times it there against eager
execution); here stand-ins for ``torch.cuda.make_graphed_callables`` check that the inversion routes
its calls through the recorded callable and gets the eager result, that the recording is made with
gradients on (its first H100 run recorded under no_grad, so the backward graph was missing) and from
stand-in inputs, and that a replay which ignores its inputs, or fails, is caught and replaced by
eager execution.
"""

from __future__ import annotations

import pytest
import torch

from selfage_cli.edit.engine import cuda_graph as graphs
from selfage_cli.edit.engine import invert
from selfage_cli.edit.engine.inversion import inversion_unet, runner_name
from selfage_cli.edit.prompts import build_prompts

PROMPT = build_prompts(35, [35], "female").source


def test_cpu_pipes_run_eagerly_although_graphs_are_the_default(tiny_pipe, tiny_source_latent):
    assert not graphs.cuda_graphs_available(tiny_pipe)
    assert inversion_unet(tiny_pipe, "null-text", False, False) is None
    assert inversion_unet(tiny_pipe, "null-text", False, True) is None
    assert runner_name(inversion_unet(tiny_pipe, "null-text", {"backend": "eager"}, True)) == "compiled"
    assert invert(tiny_pipe, tiny_source_latent, PROMPT, steps=2, inner_steps=1).unet_runner == "eager"


@pytest.fixture
def fake_recording(monkeypatch):
    """Pretend to be on a GPU: recording returns the function; remembers the sample arguments."""
    recorded: list[tuple[torch.Tensor, ...]] = []

    def fake_make_graphed_callables(fn, samples, num_warmup_iters=3):
        recorded.append((*samples, torch.is_grad_enabled()))
        return fn

    monkeypatch.setattr(graphs, "cuda_graphs_available", lambda pipe: True)
    monkeypatch.setattr("selfage_cli.edit.engine.inversion.cuda_graphs_available", lambda pipe: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    monkeypatch.setattr(graphs.GraphedUNet, "_on_gpu", staticmethod(lambda sample: True))
    return recorded


@pytest.mark.parametrize("mode", ["null-text", "negative-prompt"])
def test_graph_path_routes_every_call_and_matches_eager(tiny_pipe, tiny_source_latent, fake_recording, mode):
    eager = invert(tiny_pipe, tiny_source_latent, PROMPT, mode=mode, steps=2, inner_steps=2, cuda_graph=False)
    graphed = invert(tiny_pipe, tiny_source_latent, PROMPT, mode=mode, steps=2, inner_steps=2, cuda_graph=True)
    assert eager.unet_runner == "eager" and graphed.unet_runner == "cuda-graph"
    assert len(fake_recording) == 1  # recorded once (at the first, no-grad DDIM call), replayed after
    latent, timestep, context, grad_enabled = fake_recording[0]
    assert grad_enabled  # else no backward graph would be recorded
    assert latent.shape == tiny_source_latent.shape and timestep.shape == ()
    assert not torch.equal(latent, tiny_source_latent)  # stand-in inputs: the first replay is a real check
    assert context.requires_grad == (mode == "null-text")  # backward recorded only when optimising
    assert torch.allclose(eager.x_t, graphed.x_t, atol=1e-6)
    assert torch.allclose(eager.null_embeddings, graphed.null_embeddings, atol=1e-6)
    assert eager.inner_steps_run == graphed.inner_steps_run
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())  # frozen only during the inversion


def _pretend_gpu(monkeypatch, recorder):
    monkeypatch.setattr("selfage_cli.edit.engine.inversion.cuda_graphs_available", lambda pipe: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", recorder)
    monkeypatch.setattr(graphs.GraphedUNet, "_on_gpu", staticmethod(lambda sample: True))


def _broken(fn, samples, num_warmup_iters=3):
    raise RuntimeError("capture not permitted")


def _stale(fn, samples, num_warmup_iters=3):
    """A recording whose replays ignore their inputs (what a graph that never copied them would do)."""
    return lambda *args: fn(*samples)


def _fails_on_replay(fn, samples, num_warmup_iters=3):
    def replay(*args):
        raise RuntimeError("CUDAGraph::replay without a preceding successful capture")

    return replay


def _static_buffers(fn, samples, num_warmup_iters=3):
    """Replays with torch's semantics: inputs are copied into the recorded tensors, and every replay
    writes its output (and its input gradients) into the same buffers, returned as detached aliases."""
    static_inputs = [s.detach().clone() for s in samples]
    wants_grad = [s.requires_grad for s in samples]
    static_output: list[torch.Tensor] = []
    static_grads: dict[int, torch.Tensor] = {}
    last: dict[str, object] = {}

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for static, value in zip(static_inputs, inputs, strict=True):
                static.copy_(value)
            with torch.enable_grad():
                probes = [s.clone().requires_grad_(g) for s, g in zip(static_inputs, wants_grad, strict=True)]
                out = fn(*probes)
            last.update(out=out, probes=probes)  # the activations of the latest replay, as in a graph
            if not static_output:
                static_output.append(torch.empty_like(out))
            static_output[0].copy_(out.detach())
            return static_output[0].detach()

        @staticmethod
        def backward(ctx, grad):
            wanted = [i for i, g in enumerate(wants_grad) if g]
            grads = torch.autograd.grad(last["out"], [last["probes"][i] for i in wanted], grad)
            for i, value in zip(wanted, grads, strict=True):
                static_grads.setdefault(i, torch.empty_like(value)).copy_(value)
            return tuple(static_grads[i].detach() if i in static_grads else None for i in range(len(samples)))

    return lambda *args: Replay.apply(*args)


@pytest.mark.parametrize("mode", ["null-text", "negative-prompt"])
def test_replays_that_reuse_their_output_buffer_give_the_eager_inversion(
    tiny_pipe, tiny_source_latent, monkeypatch, mode
):
    """A real replay overwrites the previous call's output: the conditional ε held across the inner
    steps must be the inversion's own copy, not an alias of the graph's output buffer."""
    _pretend_gpu(monkeypatch, _static_buffers)
    eager = invert(tiny_pipe, tiny_source_latent, PROMPT, mode=mode, steps=3, inner_steps=3, cuda_graph=False)
    graphed = invert(tiny_pipe, tiny_source_latent, PROMPT, mode=mode, steps=3, inner_steps=3, cuda_graph=True)
    assert graphed.unet_runner == "cuda-graph"
    assert set(graphed.graph_differences) == (
        {graphs.FORWARD, graphs.BACKWARD} if mode == "null-text" else {graphs.FORWARD}
    )
    assert all(d <= 1e-6 for d in graphed.graph_differences.values())
    assert torch.allclose(eager.x_t, graphed.x_t, atol=1e-6)
    assert torch.allclose(eager.null_embeddings, graphed.null_embeddings, atol=1e-6)
    assert eager.inner_steps_run == graphed.inner_steps_run


@pytest.mark.parametrize(
    ("recorder", "message"),
    [
        (_broken, "could not be recorded (capture not permitted)"),
        (_stale, "disagreed with eager execution (forward: relative difference"),
        (_fails_on_replay, "failed (CUDAGraph::replay without a preceding successful capture)"),
    ],
)
def test_a_failed_or_wrong_graph_warns_once_and_runs_eagerly(
    tiny_pipe, tiny_source_latent, monkeypatch, capsys, recorder, message
):
    _pretend_gpu(monkeypatch, recorder)
    eager = invert(tiny_pipe, tiny_source_latent, PROMPT, steps=2, inner_steps=1, cuda_graph=False)
    fallback = invert(tiny_pipe, tiny_source_latent, PROMPT, steps=2, inner_steps=1, cuda_graph=True)
    assert fallback.unet_runner == "eager"
    assert torch.equal(eager.null_embeddings, fallback.null_embeddings)
    assert torch.equal(eager.x_t, fallback.x_t)
    err = capsys.readouterr().err
    assert f"CUDA-graph replay of the UNet {message}" in err
    assert err.count("CUDA-graph replay of the UNet") == 1


def test_the_first_replay_of_each_kind_is_checked_against_eager(tiny_pipe, tiny_source_latent, fake_recording):
    unet = graphs.GraphedUNet(tiny_pipe.unet, context_grad=True)
    context = torch.randn(1, 77, 32)
    with graphs_frozen(tiny_pipe.unet):
        with torch.no_grad():
            unet(tiny_source_latent, torch.tensor(10), encoder_hidden_states=context)
        assert list(unet.checked) == [graphs.FORWARD]
        probe = context.clone().requires_grad_(True)
        out = unet(tiny_source_latent, torch.tensor(20), encoder_hidden_states=probe)[0]
        out.sum().backward()
    assert list(unet.checked) == [graphs.FORWARD, graphs.BACKWARD]
    assert all(diff <= 1e-6 for diff in unet.checked.values())
    assert probe.grad is not None and torch.isfinite(probe.grad).all()
    assert unet.replays == 2 and unet.runner == "cuda-graph"


class _NoisyUNet(torch.nn.Module):
    """A frozen stand-in UNet whose every call is off by up to ``noise`` (relative), like rounding
    in a nondeterministic kernel."""

    def __init__(self, dtype: torch.dtype, noise: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones((), dtype=dtype), requires_grad=False)
        self.noise = noise

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        out = sample * encoder_hidden_states.float().mean() * self.weight.float()
        return (out * (1 + self.noise * torch.rand_like(out)),)


def _first_replay(monkeypatch, unet: torch.nn.Module, replay_offset: float) -> graphs.GraphedUNet:
    """One forward call through a GraphedUNet whose 'replay' is off from eager by ``replay_offset``."""
    _pretend_gpu(monkeypatch, lambda fn, samples, num_warmup_iters=3: lambda *a: fn(*a) * (1 + replay_offset))
    graphed = graphs.GraphedUNet(unet, context_grad=False)
    torch.manual_seed(0)
    with torch.no_grad():
        graphed(torch.randn(1, 4, 8, 8), torch.tensor(10), encoder_hidden_states=torch.rand(1, 77, 32) + 0.5)
    return graphed


@pytest.mark.parametrize(
    ("dtype", "noise", "offset", "kept"),
    [
        (torch.float32, 0.0, 0.01, True),
        (torch.float32, 0.0, 0.05, False),  # fp32 rounding is far below 2 %
        (torch.bfloat16, 0.0, 0.05, True),  # bf16: a few per cent is rounding (0.025 seen on an H100)
        (torch.float16, 0.0, 0.05, True),
        (torch.float32, 0.03, 0.05, True),  # within 4× what two eager calls differ by
        (torch.bfloat16, 0.0, 0.5, False),  # O(1): a replay that read the wrong inputs
        (torch.bfloat16, 0.01, 0.5, False),
    ],
)
def test_a_replay_is_trusted_when_it_differs_from_eager_by_rounding_only(monkeypatch, dtype, noise, offset, kept):
    graphed = _first_replay(monkeypatch, _NoisyUNet(dtype, noise), offset)
    assert graphed.checked[graphs.FORWARD] > 0
    assert (graphed.eager_noise[graphs.FORWARD] > 0) == (noise > 0)
    assert (graphed.runner == "cuda-graph") == kept
    assert (graphed.failure is None) == kept


def test_a_rejected_replay_says_how_far_it_was_and_how_far_eager_calls_are_apart(monkeypatch, capsys):
    graphed = _first_replay(monkeypatch, _NoisyUNet(torch.float32), 0.5)
    assert graphed.runner == "eager"
    err = capsys.readouterr().err
    assert "(forward: relative difference 0.5 > 0.02; two eager calls differ by 0)" in err


def test_agreement_tolerance_by_weight_dtype():
    assert graphs.agreement_tolerance(torch.float32) == graphs.AGREEMENT_TOLERANCE == 0.02
    assert graphs.agreement_tolerance(torch.bfloat16) == graphs.agreement_tolerance(torch.float16) == 0.1


def test_relative_difference_flags_non_finite_values():
    reference = torch.tensor([1.0, -2.0])
    assert graphs.relative_difference(reference, reference) == 0.0
    assert graphs.relative_difference(torch.tensor([1.0, -1.0]), reference) == 0.5
    assert graphs.relative_difference(torch.tensor([float("nan"), 0.0]), reference) == float("inf")


def test_other_shapes_than_the_recorded_one_run_eagerly(tiny_pipe, tiny_source_latent, fake_recording):
    unet = graphs.GraphedUNet(tiny_pipe.unet, context_grad=False)
    context = torch.zeros(1, 77, 32)
    with torch.no_grad(), graphs_frozen(tiny_pipe.unet):
        unet(tiny_source_latent, torch.tensor(10), encoder_hidden_states=context)
        unet(torch.cat([tiny_source_latent] * 2), torch.tensor(10), encoder_hidden_states=torch.cat([context] * 2))
    assert unet.replays == 1 and len(fake_recording) == 1


def graphs_frozen(module):
    from selfage_cli.edit.engine.inversion import frozen

    return frozen(module)
