"""Per-token chunked log-probs and entropies (PPO's scoring) against float64 NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alignax.logprobs import chunked_sequence_logprobs, chunked_token_logprobs

B, T, D, V = 3, 7, 6, 11  # B*T = 21 positions: the chunk sizes below mostly do not divide it
CHUNKINGS = [(1, 1), (4, 3), (5, None), (8, 4), (100, 100)]


def np_reference(hidden, unembedding, targets, g_logp, g_entropy):
    """float64 per-token log-probs [B, T], entropies [B, T] and the gradients of
    sum(g_logp * logps + g_entropy * entropies) w.r.t. hidden and unembedding."""
    hidden, unembedding = np.float64(hidden), np.float64(unembedding)
    logits = hidden @ unembedding  # [B, T, V]
    top = logits.max(-1, keepdims=True)
    log_p = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
    p = np.exp(log_p)
    logps = np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    entropies = -(p * log_p).sum(-1)
    onehot = np.eye(logits.shape[-1])[targets]
    d_logits = (g_logp[..., None] * (onehot - p)
                - g_entropy[..., None] * p * (log_p + entropies[..., None]))
    return logps, entropies, d_logits @ unembedding.T, np.einsum("btd,btv->dv", hidden, d_logits)


def random_inputs(seed, *, scale=1.0):
    rng = np.random.default_rng(seed)
    hidden = (scale * rng.standard_normal((B, T, D))).astype(np.float32)
    unembedding = rng.standard_normal((D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    g_logp, g_entropy = rng.standard_normal((2, B, T)).astype(np.float32)
    return hidden, unembedding, targets, g_logp, g_entropy


_JITTED = {}


def value_and_grads(chunk_size, vocab_chunk_size):
    """(logps, entropies, d hidden, d unembedding) of one chunking, jitted once."""
    key = (chunk_size, vocab_chunk_size)
    if key not in _JITTED:
        def stats(h, w, y):
            return chunked_token_logprobs(h, w, y, chunk_size=chunk_size,
                                          vocab_chunk_size=vocab_chunk_size, return_entropy=True)

        def f(h, w, y, g_logp, g_entropy):
            def weighted(h, w):
                logps, entropies = stats(h, w, y)
                return jnp.sum(g_logp * logps + g_entropy * entropies)
            return *stats(h, w, y), *jax.grad(weighted, argnums=(0, 1))(h, w)
        _JITTED[key] = jax.jit(f)
    return _JITTED[key]


@pytest.mark.parametrize("chunk_size,vocab_chunk_size", CHUNKINGS)
def test_token_logprobs_and_entropies_match_float64_in_value_and_gradients(chunk_size,
                                                                          vocab_chunk_size):
    for seed in range(3):
        inputs = random_inputs(seed, scale=3.0)
        got = value_and_grads(chunk_size, vocab_chunk_size)(*inputs)
        want = np_reference(*inputs)
        # |logits| ~ 10: float32 log-softmax is accurate to ~10 eps absolute.
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_entropy_of_peaked_and_flat_distributions():
    # A near-one-hot row (logit gap 60) has entropy ~ 61 e^-60 > 0, never a negative rounding
    # artefact; a flat row has log V exactly up to rounding.
    hidden = np.zeros((1, 2, 2), np.float32)
    hidden[0, 0] = [60.0, 0.0]
    unembedding = np.zeros((2, V), np.float32)
    unembedding[0, 3] = 1.0
    logps, entropies = jax.jit(lambda h: chunked_token_logprobs(
        h, unembedding, np.array([[3, 0]]), chunk_size=2, vocab_chunk_size=4,
        return_entropy=True))(hidden)
    assert 0.0 < float(entropies[0, 0]) < 1e-20
    np.testing.assert_allclose(entropies[0, 1], np.log(V), rtol=1e-6)
    np.testing.assert_allclose(logps[0], [0.0, -np.log(V)], rtol=1e-6, atol=1e-20)


def test_extreme_logits_give_finite_values_and_gradients():
    inputs = random_inputs(5, scale=1e4)
    got = value_and_grads(4, 3)(*inputs)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in got)
    assert bool(jnp.all(got[1] >= 0.0))


def test_masked_sum_of_token_logprobs_is_the_sequence_logprob():
    hidden, unembedding, targets, _, _ = random_inputs(2)
    mask = np.random.default_rng(2).random((B, T)) < 0.5
    tokens = chunked_token_logprobs(hidden, unembedding, targets, chunk_size=5, vocab_chunk_size=4)
    sequences = chunked_sequence_logprobs(hidden, unembedding, targets, mask, chunk_size=5,
                                          vocab_chunk_size=4)
    np.testing.assert_allclose(np.where(mask, tokens, 0.0).sum(-1), sequences, rtol=1e-6,
                               atol=1e-6)


def test_no_retracing_and_sharded_equals_unsharded():
    def stats(h, w, y):
        return chunked_token_logprobs(h, w, y, chunk_size=8, vocab_chunk_size=4,
                                      return_entropy=True)

    once = jax.jit(chex.assert_max_traces(stats, n=1))
    for seed in range(3):
        once(*random_inputs(seed)[:3])
    hidden, unembedding, targets, _, _ = random_inputs(13)
    hidden, targets = (np.concatenate([x, x[:1]]) for x in (hidden, targets))  # B = 4
    unembedding = np.concatenate([unembedding, unembedding[:, :1]], axis=1)  # V = 12
    f = jax.jit(stats)
    want = f(hidden, unembedding, targets)
    with jax.set_mesh(jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))):
        batch = P(("data", "fsdp"))
        got = f(jax.device_put(hidden, batch), jax.device_put(unembedding, P("fsdp", "tensor")),
                jax.device_put(targets, batch))
    assert jax.typeof(got[0]).sharding.spec == P(("data", "fsdp"), None)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_rejects_bad_input():
    hidden, unembedding, targets, _, _ = random_inputs(0)
    with pytest.raises(ValueError, match=r"targets \(3, 6\) must be \[B, T\] = \(3, 7\)"):
        chunked_token_logprobs(hidden, unembedding, targets[:, :6], chunk_size=4)
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        chunked_token_logprobs(hidden, unembedding, np.float32(targets), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        chunked_token_logprobs(hidden, unembedding, targets, chunk_size=0)
