"""Edit prompts, word token indices and prompt-to-prompt's word-swap mapper under the real CLIP tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch

from selfage_cli.edit.engine.mapper import (
    SD_MAX_TOKENS,
    equalizer,
    replacement_mapper,
    token_length,
    word_token_counts,
    word_token_indices,
)
from selfage_cli.edit.engine.p2p import blend_word_weights
from selfage_cli.edit.prompts import age_word, build_prompts, placeholder
from selfage_cli.errors import SelfageError
from selfage_cli.models import load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


# ---- prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("age", "gender", "word"),
    [
        (0, None, "baby"),
        (4.9, "female", "baby"),
        (5, "female", "girl"),
        (14, "male", "boy"),
        (10, None, "child"),
        (15, "female", "woman"),
        (64, "male", "man"),
        (40, None, "person"),
        (65, "female", "elderly"),
        (100, None, "elderly"),
    ],
)
def test_placeholder_by_age_and_gender(age, gender, word):
    assert placeholder(age, gender) == word


def test_placeholder_refuses_unknown_gender():
    with pytest.raises(SelfageError, match="--gender"):
        placeholder(30, "other")


def test_age_word_integers_and_floats():
    assert age_word(30) == "30-year-old"
    assert age_word(34.71) == "34.71-year-old"  # --no-round-source-age pastes the float
    assert age_word(torch.tensor(7).item()) == "7-year-old"


def test_build_prompts_with_and_without_identifier():
    prompts = build_prompts(30, [0, 10, 80], "female")
    assert prompts.source == "photo of sks woman as 30-year-old"
    assert prompts.targets == [
        "photo of sks baby as 0-year-old",
        "photo of sks girl as 10-year-old",
        "photo of sks elderly as 80-year-old",
    ]
    assert prompts.source_blend_words == ("30-year-old", "woman")
    assert prompts.target_blend_words == [("0-year-old", "baby"), ("10-year-old", "girl"), ("80-year-old", "elderly")]
    plain = build_prompts(34.71, [20], None, identifier=None)
    assert plain.source == "photo of person as 34.71-year-old"
    assert plain.targets == ["photo of person as 20-year-old"]
    assert all(len(t.split(" ")) == len(prompts.source.split(" ")) for t in prompts.targets)
    sub = prompts.subset([2])
    assert sub.targets == [prompts.targets[2]] and sub.target_blend_words == [prompts.target_blend_words[2]]


# ---- token indices -------------------------------------------------------------------------------
def test_age_words_token_counts(tokenizer):
    assert word_token_counts("30-year-old 5-year-old 100-year-old", tokenizer) == [6, 5, 7]


def test_word_indices_match_the_tokenizer(tokenizer):
    prompt = "photo of sks woman as 30-year-old"
    ids = tokenizer(prompt).input_ids
    assert len(ids) == 13  # BOS + 11 + EOS
    assert word_token_indices(prompt, "woman", tokenizer) == [4]
    assert word_token_indices(prompt, "30-year-old", tokenizer) == [6, 7, 8, 9, 10, 11]
    decoded = [tokenizer.decode([ids[i]]) for i in word_token_indices(prompt, "30-year-old", tokenizer)]
    assert decoded == ["3", "0", "-", "year", "-", "old"]
    assert word_token_indices(prompt, 5, tokenizer) == [6, 7, 8, 9, 10, 11]
    assert word_token_indices(prompt, "man", tokenizer) == []


# ---- mapper --------------------------------------------------------------------------------------
def test_mapper_30_to_5_rows(tokenizer):
    m = replacement_mapper("photo of sks woman as 30-year-old", "photo of sks girl as 5-year-old", tokenizer)
    assert m.shape == (77, 77)
    for k in range(6):  # BOS, photo, of, sks, woman→girl (same count: one to one), as
        assert m[k].tolist() == torch.nn.functional.one_hot(torch.tensor(k), 77).float().tolist()
    # The six source tokens of "30-year-old" each give 1/5 to each of the five target tokens of "5-year-old".
    assert torch.allclose(m[6:12, 6:11], torch.full((6, 5), 0.2))
    assert m[6:11, 11:].abs().sum() == 0
    # Tail quirk: mapper[j, j] = 1 after the last swapped word, so the target EOS (11) takes source
    # token 11 ("old") and not the source EOS (12); padding maps position to position.
    assert m[11, 11] == 1.0
    for j in range(12, 76):
        assert m[j, j] == 1.0 and m[j].sum() == 1.0
    assert m[76].sum() == 0 and m[:, 76].sum() == 0  # the loop ends when the source index reaches 77


def test_mapper_5_to_30_rows(tokenizer):
    m = replacement_mapper("photo of sks girl as 5-year-old", "photo of sks woman as 30-year-old", tokenizer)
    assert torch.equal(m[:6, :6], torch.eye(6))
    assert torch.allclose(m[6:11, 6:12], torch.full((5, 6), 1 / 6))
    assert m[11].sum() == 0  # the source EOS feeds nothing (tail quirk: target 12 ← source 12)
    for j in range(12, 77):
        assert m[j, j] == 1.0
    # Column sums are len(source word)/len(target word) = 5/6 on the new word (no renormalisation), 1 elsewhere.
    sums = m.sum(0)
    assert torch.allclose(sums[6:12], torch.full((6,), 5 / 6))
    assert torch.allclose(torch.cat([sums[:6], sums[12:]]), torch.ones(71))


def test_mapper_identity_for_equal_prompts_and_one_to_one_for_equal_counts(tokenizer):
    same = replacement_mapper("photo of sks woman as 30-year-old", "photo of sks woman as 30-year-old", tokenizer)
    assert torch.equal(same, torch.eye(77))
    equal_count = replacement_mapper(
        "photo of sks woman as 30-year-old", "photo of sks woman as 80-year-old", tokenizer
    )
    assert torch.equal(equal_count, torch.eye(77))  # 3→8, 0→0 … token k → token k


def test_mapper_refuses_different_word_counts(tokenizer):
    with pytest.raises(ValueError, match="same number of words"):
        replacement_mapper("photo of a woman", "photo of woman", tokenizer)


def test_equalizer_reweights_only_the_age_word(tokenizer):
    eq = equalizer("photo of sks elderly as 80-year-old", "80-year-old", 2.0, tokenizer)
    assert eq[6:12].tolist() == [2.0] * 6
    assert eq.sum() == 77 + 6


def test_lengths_come_from_the_tokenizer(tokenizer):
    """Mapper, re-weighting and blend weights take the tokenizer's padded length (77 is only SD's)."""
    assert token_length(tokenizer) == SD_MAX_TOKENS == 77
    short = copy.deepcopy(tokenizer)
    short.model_max_length = 16
    source, target = "photo of sks woman as 30-year-old", "photo of sks woman as 80-year-old"
    assert torch.equal(replacement_mapper(source, target, short), torch.eye(16))
    assert equalizer(target, "80-year-old", 2.0, short).shape == (16,)
    prompts = build_prompts(30, [5, 80], "female")
    weights = blend_word_weights(prompts, short)
    assert weights.shape == (3, 16) and torch.equal(weights[:, :16], blend_word_weights(prompts, tokenizer)[:, :16])
    short.model_max_length = 8  # a word cut by the length keeps only the tokens that fit
    assert word_token_indices(source, "30-year-old", short) == [6, 7]
    short.model_max_length = int(1e30)  # transformers' "no limit" default: the length is unknown
    with pytest.raises(ValueError, match="model_max_length"):
        token_length(short)


def test_the_controller_reweights_the_whole_age_word_like_the_reference(tokenizer):
    """The engine's re-weighting acts on "{age}-year-old" (every token of it), as the reference's
    equaliser does, not on the bare age number alone."""
    from selfage_cli.edit.engine.p2p import P2PSettings, build_controller

    prompts = build_prompts(30, [80, 5], "female")
    controller = build_controller(prompts, tokenizer, P2PSettings(reweight=2.0), steps=3, latent_side=8)
    eighty = word_token_indices(prompts.targets[0], "80-year-old", tokenizer)
    five = word_token_indices(prompts.targets[1], "5-year-old", tokenizer)
    assert len(eighty) == 6 and len(five) == 5  # digits, "-", "year", "-", "old"
    for row, indices in ((controller.equalizers[0], eighty), (controller.equalizers[1], five)):
        assert row[indices].tolist() == [2.0] * len(indices) and row.sum() == 77 + len(indices)
