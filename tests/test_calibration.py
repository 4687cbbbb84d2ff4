"""Entropy and ECE (alignax.metrics.calibration) against float64 NumPy references."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.metrics.calibration import (binned_ece, predictive_entropy, sampled_ece,
                                         stochastic_ece, top_label_ece)

B, N = 16, 5


def _numpy_entropy(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def _numpy_binned_ece(conf, correct, n_bins, weights=None):
    """Guo et al. (2017) eq. 3 with bins ((m-1)/M, m/M], a loop over bins in float64."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    weights = np.ones_like(conf) if weights is None else np.asarray(weights, np.float64)
    n = max(weights.sum(), 1.0)
    total = 0.0
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        in_bin = ((conf > lo) | ((m == 1) & (conf == 0.0))) & (conf <= hi)
        n_b = np.sum(weights * in_bin)
        if n_b > 0:
            acc_b = np.sum(weights * in_bin * correct) / n_b
            conf_b = np.sum(weights * in_bin * conf) / n_b
            total += n_b / n * abs(acc_b - conf_b)
    return total


_entropy = jax.jit(predictive_entropy)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 50.0))
def test_entropy_matches_float64_reference(seed, scale):
    logits = scale * np.random.default_rng(seed).normal(size=(B, N)).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(_entropy(logits)), _numpy_entropy(p), atol=2e-6)


def test_entropy_zero_probabilities_bf16_and_errors():
    logits = jnp.array([[0.0, -jnp.inf, 0.0], [5.0, -jnp.inf, -jnp.inf]])
    np.testing.assert_allclose(np.asarray(predictive_entropy(logits)), [np.log(2.0), 0.0],
                               atol=1e-7)
    probs = jnp.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(predictive_entropy(probs=probs)), [np.log(2.0), 0.0],
                               atol=1e-7)
    bf16 = predictive_entropy(jnp.zeros((2, 4), jnp.bfloat16))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16), np.log(4.0), rtol=1e-6)
    grad = jax.grad(lambda x: predictive_entropy(x).sum())(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))
    with pytest.raises(ValueError, match="exactly one"):
        predictive_entropy(logits, probs=probs)
    with pytest.raises(ValueError, match="exactly one"):
        predictive_entropy()


def _random_probs(seed, *, sharpness=1.0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(N, 1.0 / sharpness), size=B)
    truth = rng.dirichlet(np.ones(N), size=B)
    return probs, truth


@hypothesis.given(seed=st.integers(0, 2**31 - 1), sharpness=st.floats(0.2, 10.0))
def test_stochastic_ece_matches_float64_reference(seed, sharpness):
    probs, truth = _random_probs(seed, sharpness=sharpness)
    where = np.random.default_rng(seed + 1).random(B) < 0.7
    want = np.sum(probs * np.abs(truth - probs), axis=-1)  # §2.8.8 per context
    got = jax.jit(stochastic_ece)(probs.astype(np.float32), truth.astype(np.float32))
    np.testing.assert_allclose(float(got), want.mean(), atol=1e-6)
    got = jax.jit(stochastic_ece)(probs.astype(np.float32), truth.astype(np.float32), where=where)
    np.testing.assert_allclose(float(got), want[where].mean() if where.any() else 0.0, atol=1e-6)


def test_stochastic_ece_edge_cases_and_errors():
    probs = jnp.eye(3)
    assert float(stochastic_ece(probs, probs)) == 0.0  # a perfect deterministic oracle
    assert float(stochastic_ece(probs, probs, where=jnp.zeros(3, bool))) == 0.0  # empty mask
    with pytest.raises(ValueError, match="shape mismatch"):
        stochastic_ece(probs, probs[:2])
    with pytest.raises(ValueError, match="rank 2"):
        stochastic_ece(probs[0], probs[0])
    with pytest.raises(ValueError, match="where"):
        stochastic_ece(probs, probs, where=jnp.ones(2, bool))


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_binned_and_top_label_ece_match_float64_reference(n_bins):
    for seed in range(10):
        probs, _ = _random_probs(seed, sharpness=3.0)
        probs = probs.astype(np.float32)
        labels = np.random.default_rng(seed + 100).integers(0, N, size=B)
        conf, pred = probs.max(-1), probs.argmax(-1)
        want = _numpy_binned_ece(conf, pred == labels, n_bins)
        got = jax.jit(functools.partial(top_label_ece, n_bins=n_bins))(probs, labels)
        np.testing.assert_allclose(float(got), want, atol=1e-6)
        weights = np.random.default_rng(seed).random(B) < 0.5
        got = binned_ece(conf, pred == labels, n_bins=n_bins, where=weights)
        np.testing.assert_allclose(float(got), _numpy_binned_ece(conf, pred == labels, n_bins,
                                                                 weights), atol=1e-6)


def test_binned_ece_bin_edges_and_errors():
    # With M = 4: 0 and 0.25 fall in (0, 0.25], 0.5 in (0.25, 0.5], 1.0 in (0.75, 1].
    conf = jnp.array([0.0, 0.25, 0.5, 1.0])
    correct = jnp.array([1.0, 0.0, 1.0, 1.0])
    want = _numpy_binned_ece(np.asarray(conf), np.asarray(correct), 4)
    np.testing.assert_allclose(want, (abs(0.5 - 0.125) * 2 + abs(1 - 0.5)) / 4, atol=1e-12)
    np.testing.assert_allclose(float(binned_ece(conf, correct, n_bins=4)), want, atol=1e-7)
    with pytest.raises(ValueError, match="n_bins"):
        binned_ece(conf, correct, n_bins=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        binned_ece(conf, correct[:2])
    with pytest.raises(ValueError, match="disagree"):
        top_label_ece(jnp.ones((3, 2)) / 2, jnp.zeros(4, jnp.int32))


def _numpy_population_binned_ece(probs, truth, n_bins):
    """Exact limit of `sampled_ece` on contexts drawn uniformly: pool (x, y) by confidence bin."""
    total = 0.0
    bins = np.clip(np.ceil(probs * n_bins).astype(int) - 1, 0, n_bins - 1)
    for m in range(n_bins):
        in_bin = bins == m
        total += abs(np.sum(np.where(in_bin, probs * (truth - probs), 0.0))) / probs.shape[0]
    return total


def test_sampled_ece_estimates_the_population_binned_ece():
    """Many samples per context: the estimator converges to its population value, which by the
    triangle inequality is at most the x-conditioned stochastic ECE of §2.8.8."""
    probs, truth = _random_probs(3, sharpness=2.0)
    probs, truth = probs.astype(np.float32), truth.astype(np.float32)
    repeats = 20000
    tiled = np.tile(probs, (repeats, 1))  # [repeats * B, N]
    label_key, pred_key = jax.random.split(jax.random.key(0))
    labels = jax.random.categorical(label_key, jnp.log(np.tile(truth, (repeats, 1))), axis=-1)
    got = float(jax.jit(functools.partial(sampled_ece, n_bins=10))(tiled, labels, key=pred_key))
    want = _numpy_population_binned_ece(probs.astype(np.float64), truth.astype(np.float64), 10)
    exact = float(stochastic_ece(probs, truth))
    assert want <= exact + 1e-7
    # Each bin's gap is a mean of n terms in [-1, 1] with mass p_b: its standard error is at most
    # sqrt(p_b / n), and sum_b sqrt(p_b / n) <= sqrt(M / n) (Cauchy-Schwarz).
    assert abs(got - want) < 2.0 * np.sqrt(10 / tiled.shape[0]), (got, want, exact)


def test_top_label_ece_is_small_for_a_calibrated_predictor():
    """Labels drawn from the predicted probabilities: top-label ECE -> 0 as samples grow."""
    probs, _ = _random_probs(5, sharpness=2.0)
    tiled = np.tile(probs.astype(np.float32), (20000, 1))
    labels = jax.random.categorical(jax.random.key(1), jnp.log(tiled), axis=-1)
    assert float(top_label_ece(tiled, labels, n_bins=10)) < 2.0 * np.sqrt(10 / tiled.shape[0])


def test_ece_difference_bounds_match_float64_divergences():
    """The KL and JS terms of `ece_difference_bounds` against float64, including zeros in
    either distribution (KL infinite where p > 0 = q), and exactly 0 for identical policies."""
    from alignax.metrics.calibration import ece_difference_bounds
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(N, 0.3), size=B).astype(np.float32)
    q = rng.dirichlet(np.full(N, 0.3), size=B).astype(np.float32)
    p[0, 0], q[1, 1] = 0.0, 0.0
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    truth = rng.dirichlet(np.ones(N), size=B).astype(np.float32)
    bounds = jax.jit(ece_difference_bounds)(p, q, truth)
    p64, q64 = np.float64(p), np.float64(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.sum(np.where(p64 > 0, p64 * np.log(p64 / q64), 0.0), -1)
        m = (p64 + q64) / 2
        js = 0.5 * np.sum(np.where(p64 > 0, p64 * np.log(p64 / m), 0.0)
                          + np.where(q64 > 0, q64 * np.log(q64 / m), 0.0), -1)
    np.testing.assert_allclose(bounds["jsd"], np.mean(4 * np.sqrt(2 * js)), rtol=1e-5)
    finite = np.isfinite(kl)
    assert not finite.all() and float(bounds["kl_12"]) == np.inf  # p > 0 = q somewhere
    kl_finite = jax.jit(ece_difference_bounds)(p[finite], q[finite], truth[finite])["kl_12"]
    np.testing.assert_allclose(kl_finite, np.mean(4 * np.sqrt(kl[finite] / 2)), rtol=1e-5)
    same = jax.jit(ece_difference_bounds)(p, p, truth)
    assert all(float(v) == 0.0 for v in same.values()), same
