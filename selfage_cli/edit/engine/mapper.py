"""Prompt-to-prompt's word-swap mapper and the token indices of words.

Every length comes from the tokenizer: :func:`token_length` is ``tokenizer.model_max_length``, the
length prompts are padded to (77 for SD's CLIP; written N below).

``word_token_indices(prompt, word, tokenizer)`` gives the positions (in the N-token padded sequence,
BOS at 0) of the CLIP tokens of every space-separated word equal to ``word``; ``"30-year-old"`` is
one word and six tokens (3, 0, -, year, -, old).

``replacement_mapper(source, target, tokenizer)`` is the reference's ``get_replacement_mapper_``
(seq_aligner.py of prompt-to-prompt), reproduced including its quirk: an N×N matrix M with
``M[source token, target token]``, so that edited cross-attention = source attention @ M.

* A swapped word with the same number of tokens maps token k → token k.
* A swapped word with a different number of tokens: every target token gets 1/len(target tokens)
  of each source token of the word.
* Before the last swapped word, unchanged tokens map one to one, shifted by the token-count
  difference accumulated so far.
* **Quirk** — after the last swapped word the reference writes ``M[j, j] = 1`` (j the target
  position) instead of ``M[i, j]``: the tail (the end token and the padding) maps each target
  position to the *same* source position, not to the shifted one. When the source word has more
  tokens than the target word the loop also stops when the source index reaches N, so the last
  (difference) target columns stay zero. Both are kept for fidelity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

SD_MAX_TOKENS = 77  # CLIP's context length in Stable Diffusion 1.x/2.x; only a documented example here


def token_length(tokenizer: CLIPTokenizer) -> int:
    """The padded prompt length of ``tokenizer`` (its ``model_max_length``; 77 for SD's CLIP).

    ``encode_text`` pads every prompt to this length, so the mapper, the re-weighting vector and the
    blend weights use it too. A tokenizer without a real limit (transformers' "very large" default)
    cannot say how long the text encoder's sequence is: that is refused.
    """
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= 1_000_000:
        raise ValueError(
            f"the tokenizer's model_max_length is {length!r}; set it to the text encoder's context length "
            "(tokenizer_config.json)"
        )
    return length


def word_token_counts(prompt: str, tokenizer: CLIPTokenizer) -> list[int]:
    """Number of CLIP tokens of each space-separated word of ``prompt``."""
    return [len(tokenizer(word, add_special_tokens=False).input_ids) for word in prompt.split(" ")]


def word_positions(prompt: str, tokenizer: CLIPTokenizer) -> list[list[int]]:
    """Token positions (BOS = 0, so the first word starts at 1) of each space-separated word."""
    positions: list[list[int]] = []
    start = 1
    for count in word_token_counts(prompt, tokenizer):
        positions.append(list(range(start, start + count)))
        start += count
    return positions


def word_token_indices(prompt: str, word: str | int, tokenizer: CLIPTokenizer) -> list[int]:
    """Token positions of a word given by text (every occurrence) or by its word index."""
    words = prompt.split(" ")
    places = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [word]
    positions = word_positions(prompt, tokenizer)
    limit = token_length(tokenizer)
    return [p for place in places for p in positions[place] if p < limit]


def replacement_mapper(source: str, target: str, tokenizer: CLIPTokenizer, max_len: int | None = None) -> Tensor:
    """The reference's word-swap mapper (``get_replacement_mapper_``) from ``source`` to ``target``.

    ``max_len``: the matrix size, by default :func:`token_length` of the tokenizer.
    """
    max_len = token_length(tokenizer) if max_len is None else max_len
    words_x, words_y = source.split(" "), target.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(
            "attention replacement needs prompts with the same number of words, "
            f"got {len(words_x)} ({source!r}) and {len(words_y)} ({target!r})"
        )
    swapped = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [word_token_indices(source, i, tokenizer) for i in swapped]
    inds_target = [word_token_indices(target, i, tokenizer) for i in swapped]
    mapper = torch.zeros(max_len, max_len)
    i = j = 0
    cur = 0
    while i < max_len and j < max_len:
        if cur < len(inds_source) and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1.0
            else:
                ratio = 1.0 / len(tgt)
                for t in tgt:
                    mapper[src, t] = ratio
            cur += 1
            i += len(src)
            j += len(tgt)
        elif cur < len(inds_source):
            mapper[i, j] = 1.0
            i += 1
            j += 1
        else:
            mapper[j, j] = 1.0  # the reference's tail quirk (see the module docstring)
            i += 1
            j += 1
    return mapper


def equalizer(target: str, word: str, value: float, tokenizer: CLIPTokenizer, max_len: int | None = None) -> Tensor:
    """Re-weighting vector (N,): ``value`` on the tokens of ``word`` in ``target``, 1 elsewhere."""
    weights = torch.ones(token_length(tokenizer) if max_len is None else max_len)
    weights[word_token_indices(target, word, tokenizer)] = value
    return weights
