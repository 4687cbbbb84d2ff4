"""Log-probs against float64 NumPy references; chunked == naive in value and gradients."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.sharding import PartitionSpec as P

from alignax.logprobs import (chunked_sequence_logprobs, next_token_targets, sequence_logprobs,
                              token_logprobs)

B, T, D, V = 3, 7, 6, 11  # B*T = 21 positions: most chunk sizes below do not divide it


def np_logsumexp(x):
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def np_reference(hidden, unembedding, targets, mask, weights):
    """float64 log pi(y|x) [B] and the gradients of sum_b weights_b log pi(y_b|x_b) w.r.t.
    hidden [B,T,D] and unembedding [D,V]: d logits = weights mask (onehot(y) - softmax)."""
    hidden, unembedding = np.float64(hidden), np.float64(unembedding)
    logits = hidden @ unembedding  # [B, T, V]
    lse = np_logsumexp(logits)
    logps = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse  # [B, T]
    mask = np.asarray(mask).astype(bool)
    values = np.where(mask, logps, 0.0).sum(axis=-1)
    onehot = np.eye(logits.shape[-1])[targets]  # [B, T, V]
    d_logits = (weights[:, None] * mask)[..., None] * (onehot - np.exp(logits - lse[..., None]))
    return values, d_logits @ unembedding.T, np.einsum("btd,btv->dv", hidden, d_logits)


def random_inputs(seed, *, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    hidden = (scale * rng.standard_normal((B, T, D))).astype(dtype)
    unembedding = rng.standard_normal((D, V)).astype(dtype)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.6
    mask[0] = False  # one empty sequence in every batch
    weights = rng.standard_normal(B).astype(np.float32)
    return hidden, unembedding, targets, mask, weights


_JITTED = {}


def value_and_grads(chunk_size=None, vocab_chunk_size=None):
    """One jitted (values [B], d hidden, d unembedding) per chunking; None means naive."""
    key = (chunk_size, vocab_chunk_size)
    if key not in _JITTED:
        def values(hidden, unembedding, targets, mask):
            if chunk_size is None:
                return sequence_logprobs(hidden @ unembedding, targets, mask)
            return chunked_sequence_logprobs(hidden, unembedding, targets, mask,
                                             chunk_size=chunk_size,
                                             vocab_chunk_size=vocab_chunk_size)

        def f(hidden, unembedding, targets, mask, weights):
            weighted = lambda h, w: jnp.sum(weights * values(h, w, targets, mask))
            return values(hidden, unembedding, targets, mask), \
                *jax.grad(weighted, argnums=(0, 1))(hidden, unembedding)
        _JITTED[key] = jax.jit(f)
    return _JITTED[key]


# Token x vocabulary chunks: single entries, non-divisors of (21, 11), the whole vocabulary,
# and sizes beyond (B*T, V) that are clipped to them.
CHUNKINGS = [(1, 1), (4, 3), (5, None), (8, 4), (100, 100)]


_naive_token_and_sequence = jax.jit(
    lambda logits, targets, mask: (token_logprobs(logits, targets),
                                   sequence_logprobs(logits, targets, mask)))


@given(seed=st.integers(0, 2**32 - 1))
def test_token_and_sequence_logprobs_match_float64(seed):
    hidden, unembedding, targets, mask, _ = random_inputs(seed, scale=3.0)
    logits = hidden @ unembedding
    tokens, sequences = _naive_token_and_sequence(logits, targets, mask)
    lse = np_logsumexp(np.float64(logits))
    want = np.take_along_axis(np.float64(logits), targets[..., None], axis=-1)[..., 0] - lse
    assert tokens.dtype == sequences.dtype == jnp.float32
    np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sequences, np.where(mask, want, 0.0).sum(-1), rtol=1e-5, atol=1e-4)
    assert _naive_token_and_sequence._cache_size() == 1


@pytest.mark.parametrize("chunk_size,vocab_chunk_size", CHUNKINGS)
def test_chunked_matches_naive_and_float64_in_value_and_gradients(chunk_size, vocab_chunk_size):
    chunked = value_and_grads(chunk_size, vocab_chunk_size)
    naive = value_and_grads()
    for seed in range(3):
        inputs = random_inputs(seed, scale=2.0)
        got, want = chunked(*inputs), naive(*inputs)
        reference = np_reference(*inputs)
        for name, g, n, r in zip(("values", "d_hidden", "d_unembedding"), got, want, reference):
            assert g.dtype == jnp.float32 and g.shape == n.shape == r.shape, name
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=name)
            np.testing.assert_allclose(g, n, rtol=2e-5, atol=2e-5, err_msg=name)
        np.testing.assert_array_equal(got[0][0], 0.0)  # the empty sequence
    assert chunked._cache_size() == 1


def test_empty_masks_give_zero_and_zero_gradients():
    hidden, unembedding, targets, mask, weights = random_inputs(7)
    values, d_hidden, d_unembedding = value_and_grads(4, 3)(
        hidden, unembedding, targets, np.zeros_like(mask), weights)
    np.testing.assert_array_equal(values, np.zeros(B))
    np.testing.assert_array_equal(d_hidden, np.zeros((B, T, D)))
    np.testing.assert_array_equal(d_unembedding, np.zeros((D, V)))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_logits_are_finite_and_match_float64(sign):
    hidden, unembedding, targets, mask, weights = random_inputs(3)
    # Logits up to about +-1e4: exp overflows float32 unless shifted by the log-sum-exp.
    unembedding = np.float32(sign * 1e4 * unembedding / np.abs(hidden @ unembedding).max())
    values, d_hidden, d_unembedding = value_and_grads(4, 3)(
        hidden, unembedding, targets, mask, weights)
    assert np.abs(np.float64(hidden) @ unembedding).max() > 9e3
    for got in (values, d_hidden, d_unembedding):
        assert np.all(np.isfinite(got))
    want = np_reference(hidden, unembedding, targets, mask, weights)
    # The tolerances are the float32 conditioning at this scale, not slack: each float32 logit is
    # off by up to logit_err (1e-3 here), so log-probs are off by 2 logit_err per token, and each
    # softmax weight by a factor exp(2 logit_err), which moves sum_v p_v w_v by <= 2 logit_err
    # max|w| (d hidden) and each d unembedding entry by <= 2 logit_err sum_bt |h_bt| |g_b|.
    logit_err = np.finfo(np.float32).eps * (np.abs(hidden) @ np.abs(unembedding)).max()
    g = np.abs(weights).max()
    np.testing.assert_allclose(values, want[0], rtol=0, atol=2 * 2 * logit_err * T)
    np.testing.assert_allclose(d_hidden, want[1], rtol=0,
                               atol=2 * 2 * logit_err * g * np.abs(unembedding).max())
    np.testing.assert_allclose(d_unembedding, want[2], rtol=0,
                               atol=2 * 2 * logit_err * g * np.abs(hidden).max() * B * T)


def test_bfloat16_inputs_give_float32_values_and_bfloat16_gradients():
    hidden, unembedding, targets, mask, weights = random_inputs(5)
    hidden, unembedding = jnp.bfloat16(hidden), jnp.bfloat16(unembedding)
    values, d_hidden, d_unembedding = value_and_grads(4, 3)(
        hidden, unembedding, targets, mask, weights)
    assert values.dtype == jnp.float32
    assert d_hidden.dtype == d_unembedding.dtype == jnp.bfloat16
    # The reference sees exactly the bf16-rounded inputs: only accumulation/output rounding differ.
    want = np_reference(np.float32(hidden), np.float32(unembedding), targets, mask, weights)
    np.testing.assert_allclose(values, want[0], rtol=1e-5, atol=1e-4)
    for got, ref in zip((d_hidden, d_unembedding), want[1:]):  # bf16 output: 8 mantissa bits
        np.testing.assert_allclose(np.float32(got), ref, rtol=1e-2, atol=1e-2)


def test_no_retracing_under_jit():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(hidden, unembedding, targets, mask):
        return chunked_sequence_logprobs(hidden, unembedding, targets, mask, chunk_size=8,
                                         vocab_chunk_size=4)

    for seed in range(3):
        hidden, unembedding, targets, mask, _ = random_inputs(seed)
        f(hidden, unembedding, targets, mask)


def test_vmap_over_a_leading_axis_equals_a_loop():
    inputs = [random_inputs(seed) for seed in range(2)]
    hidden, unembedding, targets, mask = (np.stack(x) for x in zip(*(i[:4] for i in inputs)))
    f = lambda h, w, y, m: chunked_sequence_logprobs(h, w, y, m, chunk_size=8, vocab_chunk_size=4)
    batched = jax.jit(jax.vmap(f))(hidden, unembedding, targets, mask)  # [2, B]
    for k, (h, w, y, m, _) in enumerate(inputs):
        np.testing.assert_allclose(batched[k], np_reference(h, w, y, m, np.ones(B))[0],
                                   rtol=1e-5, atol=1e-5)


def test_vmap_of_gradients_equals_a_loop():
    inputs = [random_inputs(seed) for seed in range(2)]
    hidden, unembedding, targets, mask = (np.stack(x) for x in zip(*(i[:4] for i in inputs)))
    grads = jax.jit(jax.vmap(jax.grad(
        lambda h, w, y, m: jnp.sum(chunked_sequence_logprobs(h, w, y, m, chunk_size=8,
                                                             vocab_chunk_size=4)),
        argnums=(0, 1))))(hidden, unembedding, targets, mask)
    for k, (h, w, y, m, _) in enumerate(inputs):
        want = np_reference(h, w, y, m, np.ones(B))[1:]
        for got, ref in zip(grads, want):
            np.testing.assert_allclose(got[k], ref, rtol=2e-5, atol=2e-5)


def test_sharded_equals_unsharded_under_an_explicit_mesh():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    hidden, unembedding, targets, mask, weights = random_inputs(13)
    # Shardable sizes: B = 4 over ("data", "fsdp"), D = 6 over "fsdp", V = 12 over "tensor".
    hidden, targets, mask = (np.concatenate([x, x[:1]]) for x in (hidden, targets, mask))
    unembedding = np.concatenate([unembedding, unembedding[:, :1]], axis=1)
    f = jax.jit(jax.value_and_grad(
        lambda h, w, y, m: jnp.sum(chunked_sequence_logprobs(h, w, y, m, chunk_size=8,
                                                             vocab_chunk_size=4)),
        argnums=(0, 1)))
    want = f(hidden, unembedding, targets, mask)
    with jax.set_mesh(mesh):
        batch = P(("data", "fsdp"))
        got = f(jax.device_put(hidden, batch), jax.device_put(unembedding, P("fsdp", "tensor")),
                jax.device_put(targets, batch), jax.device_put(mask, batch))
    assert jax.typeof(got[1][1]).sharding.spec == P("fsdp", "tensor")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_integer_masks_select_like_boolean_masks():
    hidden, unembedding, targets, mask, _ = random_inputs(11)
    f = jax.jit(lambda m: chunked_sequence_logprobs(hidden, unembedding, targets, m,
                                                    chunk_size=5))
    np.testing.assert_array_equal(f(mask.astype(np.int32)), f(mask))


def test_zero_positions_give_zeros():
    out = chunked_sequence_logprobs(jnp.zeros((2, 0, D)), jnp.zeros((D, V)),
                                    jnp.zeros((2, 0), jnp.int32), jnp.zeros((2, 0), bool),
                                    chunk_size=4)
    np.testing.assert_array_equal(out, np.zeros(2, np.float32))


def test_next_token_targets_shift_left_and_mask_the_last_column():
    input_ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    loss_mask = np.array([[0, 0, 1, 1], [0, 1, 1, 0]])
    targets, mask = jax.jit(next_token_targets)(input_ids, loss_mask)
    np.testing.assert_array_equal(targets, [[2, 3, 4, 0], [6, 7, 8, 0]])
    np.testing.assert_array_equal(mask, [[False, True, True, False], [True, True, False, False]])
    assert targets.dtype == jnp.int32 and mask.dtype == jnp.bool_


def test_next_token_targets_score_what_the_logits_predict():
    # Logits at t that put all their mass on input_ids[t + 1] give log-prob 0 on every response
    # token and -log V-ish elsewhere: the shift is the right way round.
    input_ids = np.array([[3, 1, 4, 1, 5]])
    loss_mask = np.array([[0, 0, 1, 1, 1]])
    logits = np.float32(50.0 * np.eye(8)[np.roll(input_ids, -1, axis=1)])  # [1, 5, 8]
    score = jax.jit(lambda ids, m: sequence_logprobs(logits, *next_token_targets(ids, m)))
    np.testing.assert_allclose(score(input_ids, loss_mask), [0.0], atol=1e-12)


@pytest.mark.parametrize("args,kwargs,error,match", [
    (((B, T), (D, V), (B, T), (B, T)), {}, ValueError, r"hidden must have rank 3, got shape"),
    (((B, T, D), (D,), (B, T), (B, T)), {}, ValueError, r"unembedding must have rank 2"),
    (((B, T, D), (D + 1, V), (B, T), (B, T)), {}, ValueError,
     r"unembedding \(7, 11\) must be \[D, V\] with D = 6 for hidden \(3, 7, 6\)"),
    (((B, T, D), (D, V), (B, T + 1), (B, T + 1)), {}, ValueError,
     r"targets \(3, 8\) must be \[B, T\] = \(3, 7\)"),
    (((B, T, D), (D, V), (B, T), (B, T - 1)), {}, ValueError,
     r"shape mismatch: targets \(3, 7\), mask \(3, 6\)"),
    (((B, T, D), (D, V), (B, T), (B, T)), {"chunk_size": 0}, ValueError,
     r"chunk_size must be a positive int, got 0"),
    (((B, T, D), (D, V), (B, T), (B, T)), {"chunk_size": 2.5}, ValueError,
     r"chunk_size must be a positive int, got 2.5"),
    (((B, T, D), (D, V), (B, T), (B, T)), {"chunk_size": True}, ValueError,
     r"chunk_size must be a positive int, got True"),
    (((B, T, D), (D, V), (B, T), (B, T)), {"vocab_chunk_size": -3}, ValueError,
     r"vocab_chunk_size must be a positive int, got -3"),
    (((B, T, D), (D, 0), (B, T), (B, T)), {}, ValueError, r"empty vocabulary"),
])
def test_chunked_rejects_bad_input(args, kwargs, error, match):
    hidden, unembedding, targets, mask = (np.zeros(s, np.float32) for s in args)
    kwargs = {"chunk_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        chunked_sequence_logprobs(hidden, unembedding, targets.astype(np.int32), mask, **kwargs)


def test_rejects_non_integer_targets_and_non_float_hidden():
    hidden, unembedding, targets, mask, _ = random_inputs(0)
    with pytest.raises(TypeError, match="targets must hold integer token ids, got dtype float32"):
        chunked_sequence_logprobs(hidden, unembedding, np.float32(targets), mask, chunk_size=4)
    with pytest.raises(TypeError, match="hidden must be a floating-point array, got dtype int32"):
        chunked_sequence_logprobs(np.int32(hidden), unembedding, targets, mask, chunk_size=4)
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        token_logprobs(hidden @ unembedding, np.float32(targets))
    with pytest.raises(ValueError, match=r"loss_mask \(1, 3\)"):
        next_token_targets(np.zeros((1, 4), np.int32), np.zeros((1, 3), bool))
