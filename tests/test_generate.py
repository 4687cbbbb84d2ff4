"""alignax.models.generate: greedy parity with HF generate, EOS, padding, sampling filters.

All llama tests use one prompt shape ([8, 6] -> 7 new tokens), so `generate` compiles once for
them: temperature, top-k, top-p, one EOS id (or none) and the key are traced values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                     TopPLogitsWarper)

import alignax.models as am
from alignax.models.generate import _generate, filter_logits
from alignax.training.mesh import make_mesh
from test_models_support import VOCAB, checkpoints, hf_logits  # noqa: F401

NEW = 7


def left_padded_prompts(seed: int, *, batch: int = 8, length: int = 6):
    """ids [B, P] (pad id 0) and mask [B, P]; row b has 1 + b % P real tokens, left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    real = 1 + np.arange(batch) % length
    mask = (np.arange(length)[None, :] >= length - real[:, None]).astype(np.int32)
    return ids * mask, mask


def hf_greedy(hf, ids, mask, *, eos_token_id=None):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=eos_token_id)
    new = out[:, ids.shape[1]:].numpy()  # HF stops early when every row is done
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=0)


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2", "gpt_neox"])
def test_greedy_matches_hf_generate(case, checkpoints):
    hf, _, model = checkpoints(case)
    ids, mask = left_padded_prompts(seed=1)
    tokens, out_mask = am.generate(model, ids, mask, key=jax.random.key(0),
                                   max_new_tokens=NEW, temperature=0.0)
    assert tokens.shape == (8, NEW) and tokens.dtype == jnp.int32
    assert bool(out_mask.all())
    np.testing.assert_array_equal(tokens, hf_greedy(hf, ids, mask))


def test_greedy_on_a_mesh_equals_unsharded(checkpoints):
    _, directory, model = checkpoints("llama_gqa")
    sharded = am.from_pretrained(directory, mesh=make_mesh((2, 2, 2)))
    ids, mask = left_padded_prompts(seed=1)
    tokens = [am.generate(m, ids, mask, key=jax.random.key(0), max_new_tokens=NEW,
                          temperature=0.0)[0] for m in (model, sharded)]
    np.testing.assert_array_equal(tokens[0], tokens[1])


def test_eos_stops_each_row_like_hf(checkpoints):
    hf, _, model = checkpoints("llama_gqa")
    ids, mask = left_padded_prompts(seed=1)
    free, _ = am.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=NEW,
                          temperature=0.0)
    eos = int(np.asarray(free)[0, 2])  # row 0 emits it at step 2
    tokens, out_mask = am.generate(model, ids, mask, key=jax.random.key(0),
                                   max_new_tokens=NEW, temperature=0.0, eos_token_id=eos)
    tokens, out_mask, free = map(np.asarray, (tokens, out_mask, free))
    for row in range(8):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] + 1 if hits.size else NEW  # EOS itself is kept
        np.testing.assert_array_equal(tokens[row, :stop], free[row, :stop])
        assert out_mask[row, :stop].all() and not out_mask[row, stop:].any()
        assert (tokens[row, stop:] == 0).all()
    assert not out_mask[0, 3:].any()
    np.testing.assert_array_equal(tokens, hf_greedy(hf, ids, mask, eos_token_id=eos))


def test_right_padded_prompts_give_the_same_tokens(checkpoints):
    model = checkpoints("llama_gqa")[2]
    ids, mask = left_padded_prompts(seed=1)
    left, _ = am.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=NEW,
                          temperature=0.0)
    right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    right, _ = am.generate(model, right_ids, right_mask, key=jax.random.key(0),
                           max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(left, right)


def test_sampling_is_a_function_of_the_key(checkpoints):
    model = checkpoints("llama_gqa")[2]
    ids, mask = left_padded_prompts(seed=1)
    draw = [np.asarray(am.generate(model, ids, mask, key=jax.random.key(k), max_new_tokens=NEW,
                                   temperature=1.0)[0]) for k in (3, 3, 4)]
    np.testing.assert_array_equal(draw[0], draw[1])
    assert (draw[0] != draw[2]).any()


def test_top_k_1_and_tiny_top_p_are_greedy_without_recompiling(checkpoints):
    model = checkpoints("llama_gqa")[2]
    ids, mask = left_padded_prompts(seed=1)
    greedy, _ = am.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=NEW,
                            temperature=0.0)
    compiled = _generate._cache_size()
    for top_k, top_p in [(1, None), (None, 1e-6), (VOCAB, 1e-6)]:
        tokens, _ = am.generate(model, ids, mask, key=jax.random.key(5), max_new_tokens=NEW,
                                temperature=2.0, top_k=top_k, top_p=top_p, eos_token_id=VOCAB)
        np.testing.assert_array_equal(tokens, greedy)
    assert _generate._cache_size() == compiled  # sampling settings are traced values


def test_first_token_frequencies_match_the_filtered_distribution(checkpoints):
    """400 first tokens (50 keys x 8 copies of one prompt) vs the distribution HF's warpers
    give on HF's logits: softmax(top_p(top_k(logits / T)))."""
    hf, _, model = checkpoints("llama_gqa")
    ids, mask = left_padded_prompts(seed=1)
    ids, mask = np.repeat(ids[5:6], 8, 0), np.repeat(mask[5:6], 8, 0)  # a full 6-token prompt
    first = np.concatenate([
        np.asarray(am.generate(model, ids, mask, key=jax.random.key(k), max_new_tokens=NEW,
                               temperature=1.5, top_k=20, top_p=0.8)[0][:, 0])
        for k in range(50)])
    scores = torch.as_tensor(hf_logits(hf, ids[:1], mask[:1])[:, -1])  # [1, V]
    for warper in (TemperatureLogitsWarper(1.5), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    probs = torch.softmax(scores, -1)[0].double().numpy()
    freq = np.bincount(first, minlength=VOCAB) / first.size
    assert (freq[probs == 0] == 0).all()  # filtered tokens are never drawn
    assert (probs > 0).sum() >= 3  # the check is not vacuous
    bound = 4.5 * np.sqrt(probs * (1 - probs) / first.size) + 1.0 / first.size
    assert (np.abs(freq - probs) <= bound).all()


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (7, None), (12, 0.7), (1, 0.5)])
def test_filter_logits_keeps_the_tokens_hf_warpers_keep(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, VOCAB)).astype(np.float32) * 3
    logits[0, :4] = logits[0, 4]  # ties
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature=0.7, top_k=top_k,
                                    top_p=top_p))
    scores = TemperatureLogitsWarper(0.7)(None, torch.as_tensor(logits))
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    reference = scores.numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(reference))
    np.testing.assert_allclose(ours[np.isfinite(ours)], reference[np.isfinite(reference)],
                               rtol=1e-6)


def test_invalid_arguments_raise(checkpoints):
    model = checkpoints("llama_gqa")[2]
    ids, mask = left_padded_prompts(seed=1)
    mask[3] = 0
    with pytest.raises(ValueError, match=r"prompt rows \[3\] have no real token"):
        am.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        am.generate(model, ids, np.ones_like(ids), key=jax.random.key(0), max_new_tokens=2,
                    top_p=1.5)
    with pytest.raises(ValueError, match="must match"):
        am.generate(model, ids, mask[:, 1:], key=jax.random.key(0), max_new_tokens=2)
