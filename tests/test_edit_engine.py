"""The editing engine on the tiny model: DDIM maths, null-text / negative-prompt inversion, batched
prompt-to-prompt (mapper, attention control, local blend), processors and decoding.

One null-text inversion (``tiny_inversion`` in conftest.py, 20 DDIM steps) is shared by all tests.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfage_cli.edit.engine import P2PSettings, decode_latents, edit_ages, invert
from selfage_cli.edit.engine import inversion as inversion_module
from selfage_cli.edit.engine.attention import CROSS, SDPA, SELF, P2PAttnProcessor
from selfage_cli.edit.engine.ddim import DDIMSchedule, encode_text
from selfage_cli.edit.engine.p2p import build_controller, sample_pass
from selfage_cli.edit.prompts import build_prompts
from selfage_cli.models import SCHEDULER_CONFIG

SOURCE_AGE = 30
GENDER = "female"
PARTIAL_MASK = 0.9  # random attention is nearly flat: a high threshold gives a mask with zeros and ones


def squared_error(latent: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((latent - reference) ** 2).mean())


@contextmanager
def count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def plain_ddim(inversion, pipe):
    """The same x_T sampled with the "" embedding at every step: plain DDIM inversion's reconstruction."""
    null = encode_text(pipe, [""]).expand(inversion.steps, -1, -1).clone()
    return dataclasses.replace(inversion, null_embeddings=null, mode="ddim")


# ---- DDIM maths -------------------------------------------------------------------------------------
def test_schedule_follows_the_reference(tiny_pipe):
    schedule = DDIMSchedule.from_pipe(tiny_pipe, 50)
    assert schedule.timesteps[:2] == [981, 961] and schedule.timesteps[-1] == 1
    assert schedule.step_size == 20
    assert schedule.alpha(-19) == pytest.approx(float(schedule.alphas_cumprod[0]))  # set_alpha_to_one=False
    # prev_step is diffusers' DDIM step with eta = 0 and clip_sample = False.
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_config(
        tiny_pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    reference.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(2, 1, 4, 8, 8, generator=generator)
    for t in (981, 501, 1):
        expected = reference.step(eps, t, sample, eta=0.0).prev_sample
        assert torch.allclose(schedule.prev_step(eps, t, sample), expected, atol=1e-5)
    # next_step undoes prev_step for the same ε.
    x = schedule.prev_step(eps, 501, sample)
    assert torch.allclose(schedule.next_step(eps, 501, x), sample, atol=1e-4)


def test_v_prediction_is_converted_to_epsilon():
    schedule = DDIMSchedule(
        timesteps=[1],
        alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
        final_alpha_cumprod=0.99,
        step_size=20,
        prediction_type="v_prediction",
    )
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 1, 4, 8, 8, generator=generator)
    for t in (0, 400, 999):
        a = schedule.alpha(t)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
        v = a**0.5 * eps - (1 - a) ** 0.5 * x0
        assert torch.allclose(schedule.to_epsilon(v, t, x_t), eps, atol=1e-5)
    assert dataclasses.replace(schedule, prediction_type="epsilon").to_epsilon(x0, 5, eps) is x0


class _VPredictionUNet(torch.nn.Module):
    """The tiny UNet re-expressed as a v-prediction model (same ε, other parameterisation)."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.alphas = alphas_cumprod
        self.config = unet.config

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        a = float(self.alphas[int(timestep)])
        x0 = (sample - (1 - a) ** 0.5 * eps) / a**0.5
        return (a**0.5 * eps - (1 - a) ** 0.5 * x0,)


def test_v_prediction_model_inverts_like_its_epsilon_twin(tiny_pipe, tiny_source_latent):
    from diffusers import DDIMScheduler

    v_scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    v_pipe = SimpleNamespace(
        unet=_VPredictionUNet(tiny_pipe.unet, v_scheduler.alphas_cumprod),
        scheduler=v_scheduler,
        tokenizer=tiny_pipe.tokenizer,
        text_encoder=tiny_pipe.text_encoder,
        vae=tiny_pipe.vae,
    )
    prompt = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER).source
    eps_run = invert(tiny_pipe, tiny_source_latent, prompt, mode="negative-prompt", steps=5)
    v_run = invert(v_pipe, tiny_source_latent, prompt, mode="negative-prompt", steps=5)
    assert torch.allclose(eps_run.x_t, v_run.x_t, atol=1e-4)


# ---- inversion --------------------------------------------------------------------------------------
def test_null_text_inversion_gives_one_distinct_embedding_per_step(tiny_pipe, tiny_inversion):
    steps = tiny_inversion.steps
    null = tiny_inversion.null_embeddings
    dim = tiny_pipe.text_encoder.config.hidden_size
    assert null.shape == (steps, 77, dim) and null.dtype == torch.float32
    assert tiny_inversion.x_t.shape == (1, 4, 16, 16)
    empty = encode_text(tiny_pipe, [""])[0]
    for i in range(steps):
        assert not torch.allclose(null[i], empty, atol=1e-4), f"step {i} kept the '' embedding"
        for j in range(i):
            assert not torch.allclose(null[i], null[j], atol=1e-6), f"steps {i} and {j} share an embedding"
    assert len(tiny_inversion.inner_steps_run) == steps
    assert all(1 <= n <= 10 for n in tiny_inversion.inner_steps_run)
    assert tiny_inversion.learning_rates == pytest.approx([1e-2 * (1 - i / 100) for i in range(steps)])
    assert len(tiny_inversion.trajectory) == steps + 1
    assert torch.equal(tiny_inversion.trajectory[-1], tiny_inversion.x_t)
    assert tiny_inversion.mode == "null-text" and tiny_inversion.seconds > 0


def test_adam_gets_the_lr_schedule_and_early_stopping_cuts_inner_steps(tiny_pipe, tiny_source_latent, monkeypatch):
    made: list[float] = []
    stepped: list[int] = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, lr):
            made.append(lr)
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            stepped.append(1)
            # Only the embedding gets a gradient: the UNet's weights are frozen during the optimisation.
            assert all(p.grad is None and not p.requires_grad for p in tiny_pipe.unet.parameters())
            return super().step(closure)

    assert inversion_module.early_stop_threshold(0) == pytest.approx(1e-5)
    assert inversion_module.early_stop_threshold(49) == pytest.approx(1e-5 + 49 * 2e-5)
    monkeypatch.setattr(inversion_module, "Adam", RecordingAdam)
    prompt = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER).source
    capped = invert(tiny_pipe, tiny_source_latent, prompt, steps=3, inner_steps=2)
    assert made == pytest.approx([1e-2, 1e-2 * 0.99, 1e-2 * 0.98])  # a fresh Adam per timestep
    assert capped.inner_steps_run == [2, 2, 2] and len(stepped) == 6
    # A threshold every loss meets: one inner step per timestep (the step is taken, then it stops).
    monkeypatch.setattr(inversion_module, "early_stop_threshold", lambda i: float("inf"))
    early = invert(tiny_pipe, tiny_source_latent, prompt, steps=3, inner_steps=10)
    assert early.inner_steps_run == [1, 1, 1]
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())  # flags restored


def test_edit_to_the_source_age_reconstructs_better_than_plain_ddim(tiny_pipe, tiny_inversion, tiny_source_latent):
    prompts = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER)
    optimised = edit_ages(tiny_pipe, tiny_inversion, prompts, decode=False)
    plain = edit_ages(tiny_pipe, plain_ddim(tiny_inversion, tiny_pipe), prompts, decode=False)
    err_null = squared_error(optimised.latents[1], tiny_source_latent)
    err_plain = squared_error(plain.latents[1], tiny_source_latent)
    # Measured 0.26 at 20 steps (0.13 at 50; no optimisation = 1.0): the bound is 0.3.
    assert err_null <= 0.3 * err_plain, (err_null, err_plain)
    assert torch.allclose(optimised.latents[0], optimised.latents[1], atol=1e-5)  # source age = source branch


def test_negative_prompt_inversion_uses_the_prompt_as_null(tiny_pipe, tiny_inversion, tiny_source_latent):
    prompts = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER)
    with count_unet_calls(tiny_pipe.unet) as calls_before:
        fast = invert(tiny_pipe, tiny_source_latent, prompts.source, mode="negative-prompt", steps=tiny_inversion.steps)
    assert len(calls_before) == tiny_inversion.steps  # the DDIM inversion only
    cond = encode_text(tiny_pipe, [prompts.source])[0]
    assert all(torch.equal(e, cond) for e in fast.null_embeddings)
    assert fast.inner_steps_run == [0] * tiny_inversion.steps
    assert torch.allclose(fast.x_t, tiny_inversion.x_t, atol=1e-5)  # same DDIM inversion
    result = edit_ages(tiny_pipe, fast, prompts, decode=False)
    plain = edit_ages(tiny_pipe, plain_ddim(tiny_inversion, tiny_pipe), prompts, decode=False)
    assert squared_error(result.latents[0], tiny_source_latent) < squared_error(plain.latents[0], tiny_source_latent)


@pytest.mark.slow
def test_half_precision_weights_match_the_fp32_optimisation(tiny_pipe, tiny_source_latent):
    """bf16 UNet weights, fp32 embedding/latents/loss: the same optimisation within tolerance.

    Compared with the fp32 run of the same photo and settings (5 DDIM steps, 10 inner steps): the
    embeddings step by step, and what matters in the end, the reconstruction (edit to the source age,
    sampled in bf16) against the input latent, next to the fp32 run's and plain DDIM's (bf16 too).
    """
    half = copy.deepcopy(tiny_pipe).to(dtype=torch.bfloat16)
    prompts = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER)
    full_run = invert(tiny_pipe, tiny_source_latent, prompts.source, steps=5, inner_steps=10)
    half_run = invert(half, tiny_source_latent, prompts.source, steps=5, inner_steps=10)
    assert half_run.null_embeddings.dtype == torch.float32 and half_run.x_t.dtype == torch.float32
    assert half_run.inner_steps_run == full_run.inner_steps_run
    empty = encode_text(tiny_pipe, [""])[0]
    full_change = full_run.null_embeddings - empty
    half_change = half_run.null_embeddings - empty
    cosine = torch.nn.functional.cosine_similarity(full_change.flatten(), half_change.flatten(), dim=0)
    assert cosine > 0.98, float(cosine)  # measured 0.991 (fp16: 0.993)
    # Per step, the bf16 embedding differs from the fp32 one by a fraction of the optimisation's change.
    relative = [float((half_change[i] - full_change[i]).norm() / full_change[i].norm()) for i in range(5)]
    assert max(relative) < 0.3, relative  # measured 0.10–0.16 (fp16: 0.03–0.18)
    assert torch.allclose(half_run.x_t, full_run.x_t, atol=0.05 * float(full_run.x_t.abs().max()))
    # Reconstruction: the bf16 run is as good as the fp32 run, and far better than no optimisation.
    err_full = squared_error(edit_ages(tiny_pipe, full_run, prompts, decode=False).latents[1], tiny_source_latent)
    err_half = squared_error(edit_ages(half, half_run, prompts, decode=False).latents[1], tiny_source_latent)
    err_plain = squared_error(
        edit_ages(half, plain_ddim(half_run, half), prompts, decode=False).latents[1], tiny_source_latent
    )
    # Measured: fp32 0.0228, bf16 0.0234 (×1.03), plain DDIM 0.0462 (bf16 / plain 0.51; fp32 / plain 0.49).
    assert err_half <= 1.25 * err_full, (err_half, err_full)
    assert err_half <= 0.65 * err_plain, (err_half, err_plain)
    # The editing pass runs with half-precision weights too (explicit attention in fp32, cast back).
    edited = edit_ages(half, half_run, build_prompts(SOURCE_AGE, [5, 80], GENDER), decode=False)
    assert edited.latents.dtype == torch.float32 and torch.isfinite(edited.latents).all()


def test_a_tokenizer_with_another_context_length_inverts_and_edits(tiny_pipe, tiny_source_latent):
    short = copy.deepcopy(tiny_pipe.tokenizer)
    short.model_max_length = 32
    pipe = copy.copy(tiny_pipe)  # shares the modules; only the tokenizer differs
    pipe.tokenizer = short
    assert tiny_pipe.tokenizer.model_max_length == 77
    prompts = build_prompts(SOURCE_AGE, [5, 80], GENDER)
    run = invert(pipe, tiny_source_latent, prompts.source, steps=2, inner_steps=1)
    assert run.null_embeddings.shape[:2] == (2, 32)
    edited = edit_ages(pipe, run, prompts, settings=P2PSettings(reweight=2.0), decode=False)
    assert edited.latents.shape == (3, 4, 16, 16) and torch.isfinite(edited.latents).all()
    assert edited.masks is not None


# ---- prompt-to-prompt -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batched_and_separate(tiny_pipe, tiny_inversion):
    prompts = build_prompts(SOURCE_AGE, [5, 80], GENDER)
    settings = P2PSettings(blend_threshold=PARTIAL_MASK)
    with count_unet_calls(tiny_pipe.unet) as batched_calls:
        batched = edit_ages(tiny_pipe, tiny_inversion, prompts, settings=settings)
    with count_unet_calls(tiny_pipe.unet) as separate_calls:
        separate = edit_ages(tiny_pipe, tiny_inversion, prompts, settings=settings, max_batch=1, decode=False)
    return SimpleNamespace(
        batched=batched,
        separate=separate,
        batched_calls=len(batched_calls),
        separate_calls=len(separate_calls),
        prompts=prompts,
    )


def test_batched_equals_separate_runs_with_fewer_unet_calls(batched_and_separate, tiny_inversion):
    run = batched_and_separate
    steps = tiny_inversion.steps
    assert run.batched_calls == steps == run.batched.unet_calls  # T × 1 pass
    assert run.separate_calls == 2 * steps == run.separate.unet_calls  # T × K passes (K = 2)
    assert run.separate.chunks == [[0], [1]] and run.batched.chunks == [[0, 1]]
    assert run.batched.latents.shape == run.separate.latents.shape == (3, 4, 16, 16)
    assert torch.allclose(run.batched.latents, run.separate.latents, atol=1e-4)
    assert run.batched.masks is not None and torch.equal(run.batched.masks, run.separate.masks)
    assert not torch.allclose(run.batched.latents[1], run.batched.latents[2], atol=1e-3)  # ages differ


def test_outside_the_blend_mask_the_edit_equals_the_source(batched_and_separate):
    result = batched_and_separate.batched
    masks = result.masks
    assert masks.shape == (3, 1, 16, 16)
    for k in (1, 2):
        keep = masks[k, 0] == 0
        assert 0 < int(keep.sum()) < keep.numel(), "the test needs a mask with zeros and ones"
        assert torch.equal(result.latents[k][:, keep], result.latents[0][:, keep])
        assert not torch.allclose(result.latents[k][:, ~keep], result.latents[0][:, ~keep])
        assert torch.all(masks[k] >= masks[0])  # each edit's mask contains the source's


def test_images_are_decoded_source_first(batched_and_separate, tiny_pipe):
    images = batched_and_separate.batched.images
    assert len(images) == 3 and all(im.size == (128, 128) and im.mode == "RGB" for im in images)
    again = decode_latents(tiny_pipe, batched_and_separate.batched.latents[:1])
    assert np.array_equal(np.asarray(again[0]), np.asarray(images[0]))


def test_reweight_one_is_the_identity_and_other_values_act(tiny_pipe, tiny_inversion, batched_and_separate):
    prompts = batched_and_separate.prompts
    base = batched_and_separate.batched
    same = edit_ages(
        tiny_pipe,
        tiny_inversion,
        prompts,
        settings=P2PSettings(blend_threshold=PARTIAL_MASK, reweight=1.0),
        decode=False,
    )
    assert torch.equal(same.latents, base.latents)
    louder = edit_ages(
        tiny_pipe,
        tiny_inversion,
        prompts,
        settings=P2PSettings(blend_threshold=PARTIAL_MASK, reweight=3.0),
        decode=False,
    )
    assert torch.equal(louder.latents[0], base.latents[0])  # the source branch is never edited
    assert not torch.allclose(louder.latents[1:], base.latents[1:], atol=1e-6)


def test_processors_are_ours_during_the_edit_and_restored_after(tiny_pipe, tiny_inversion):
    before = {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()}
    seen: list[set[type]] = []

    def progress(done: int, total: int) -> None:
        seen.append({type(p) for p in tiny_pipe.unet.attn_processors.values()})

    prompts = build_prompts(SOURCE_AGE, [5, 80], GENDER)
    edit_ages(tiny_pipe, tiny_inversion, prompts, max_batch=1, progress=progress, decode=False)
    assert len(seen) == 2 * tiny_inversion.steps
    assert all(kinds == {P2PAttnProcessor} for kinds in seen)
    assert {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()} == before
    for component in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder):
        patched = [name for name, module in component.named_modules() if "forward" in vars(module)]
        assert patched == [], patched


def test_explicit_attention_only_where_the_controller_needs_it(tiny_pipe, tiny_inversion):
    """Tiny UNet (16² latent): attention at 16², 8², 4² (down), 2² (mid), 4², 8², 16² (up; two layers each).

    Self-injection on layers with ≤ (16/2)² tokens for steps < int(0.5·T); cross control on all cross
    layers for steps < int(0.8·(T+1)), then only on the blend layers (4², down and up: 3 layers).
    """
    steps = tiny_inversion.steps
    prompts = build_prompts(SOURCE_AGE, [5], GENDER)
    controller = build_controller(prompts, tiny_pipe.tokenizer, P2PSettings(), steps, latent_side=16)
    schedule = DDIMSchedule.from_pipe(tiny_pipe, steps)
    context = encode_text(tiny_pipe, prompts.all_prompts)
    sample_pass(tiny_pipe, schedule, tiny_inversion, context, controller, guidance=7.5)
    self_steps, cross_steps = int(0.5 * steps), int(0.8 * (steps + 1))
    assert controller.calls[SELF] == 7 * self_steps
    assert controller.calls[CROSS] == 10 * cross_steps + 3 * (steps - cross_steps)
    assert controller.calls[SDPA] == 20 * steps - controller.calls[SELF] - controller.calls[CROSS]
    assert controller.is_blend_layer("down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor", 16)
    assert not controller.is_blend_layer("mid_block.attentions.0.transformer_blocks.0.attn2.processor", 16)
    sd15 = build_controller(prompts, tiny_pipe.tokenizer, P2PSettings(), 50, latent_side=64)
    assert sd15.injects_self(32 * 32, 24) and not sd15.injects_self(64 * 64, 0) and not sd15.injects_self(1024, 25)
    assert sd15.is_blend_layer("up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor", 16 * 16)
    assert sd15.cross_alpha(39) == 1.0 and sd15.cross_alpha(40) == 0.0


def test_progress_reports_every_step(tiny_pipe, tiny_source_latent):
    ticks: list[tuple[int, int]] = []
    prompt = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER).source
    invert(tiny_pipe, tiny_source_latent, prompt, steps=2, inner_steps=1, progress=lambda d, t: ticks.append((d, t)))
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.slow
def test_compiled_unet_option_gives_the_same_inversion(tiny_pipe, tiny_source_latent):
    """The optional torch.compile path (eager backend here: the plumbing, not the speed) changes nothing."""
    prompt = build_prompts(SOURCE_AGE, [SOURCE_AGE], GENDER).source
    plain = invert(tiny_pipe, tiny_source_latent, prompt, steps=2, inner_steps=2)
    compiled = invert(tiny_pipe, tiny_source_latent, prompt, steps=2, inner_steps=2, compile_unet={"backend": "eager"})
    assert torch.allclose(plain.x_t, compiled.x_t, atol=1e-5)
    assert torch.allclose(plain.null_embeddings, compiled.null_embeddings, atol=1e-5)
    assert compiled.inner_steps_run == plain.inner_steps_run


def test_chunks_split_targets_by_max_batch():
    from selfage_cli.edit.engine.p2p import chunk_indices

    assert chunk_indices(9, None) == [list(range(9))]
    assert chunk_indices(3, 2) == [[0, 1], [2]]
    assert chunk_indices(3, 1) == [[0], [1], [2]]
    assert chunk_indices(2, 10) == [[0, 1]]


def test_local_blend_mask_by_hand():
    """One-hot attention at a 4×4 blend layer → 3×3 max-pool → nearest ×2 → /max → > 0.3 → OR source."""
    from selfage_cli.edit.engine.blend import LocalBlend

    weights = torch.zeros(2, 77)
    weights[0, 1] = 1.0  # the source's blend word is token 1
    weights[1, 2] = 1.0  # the edit's is token 2
    blend = LocalBlend(weights, steps=10, threshold=0.3, start=0.2)
    assert [blend.active(i) for i in range(4)] == [False, False, True, True]  # step + 1 > int(0.2 · 10)
    probs = torch.zeros(2, 2, 16, 77)  # (branches, heads, 4×4 tokens, 77)
    probs[0, :, 0, 1] = 1.0  # source attends to its word at pixel (0, 0)
    probs[1, :, 15, 2] = 0.5  # the edit at pixel (3, 3), weaker (normalised away)
    probs[1, :, 15, 1] = 1.0  # attention to another branch's word does not count
    blend.begin_step()
    blend.add(probs)
    mask = blend.mask((8, 8))
    source = torch.zeros(8, 8, dtype=torch.bool)
    source[:4, :4] = True
    edit = source.clone()
    edit[4:, 4:] = True
    assert torch.equal(mask[0, 0], source) and torch.equal(mask[1, 0], edit)
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(blend(latents, 1), latents)  # not active yet
    blended = blend(latents, 2)
    assert torch.equal(blended[1][:, ~edit], latents[0][:, ~edit])
    assert torch.allclose(blended[1][:, edit], latents[1][:, edit], atol=1e-6)  # x_src + 1·(x − x_src)
    assert torch.equal(blended[0], latents[0])
