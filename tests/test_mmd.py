"""mmd2, gaussian_kernel and the median heuristic against float64 brute force and simulation."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from alignax.objectives import gaussian_kernel, median_heuristic_bandwidth, mmd2


def mmd2_brute(x, y, bandwidths, unbiased):
    """Double-loop float64 reference of the (un)biased squared MMD, Gaussian kernel(s)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)

    def k(a, b):
        d2 = float(np.sum((a - b) ** 2))
        return sum(np.exp(-d2 / (2 * s * s)) for s in bandwidths)

    def mean_k(a, b, skip_diag):
        tot, cnt = 0.0, 0
        for i in range(len(a)):
            for j in range(len(b)):
                if skip_diag and i == j:
                    continue
                tot += k(a[i], b[j])
                cnt += 1
        return tot / cnt

    return (mean_k(x, x, unbiased) + mean_k(y, y, unbiased) - 2 * mean_k(x, y, False))


# module-level jits, reused across cases: one trace per shape
_mmd_u = jax.jit(lambda x, y: mmd2(x, y, bandwidth=0.9, unbiased=True))
_mmd_b = jax.jit(lambda x, y: mmd2(x, y, bandwidth=0.9, unbiased=False))


@pytest.mark.parametrize("dim", [1, 3, 12])  # 12 takes the |a|^2 + |b|^2 - 2ab path
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("bandwidth", [0.7, (0.3, 1.0, 4.0)])
def test_mmd2_matches_brute_force(dim, unbiased, bandwidth):
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(7, dim))
    y = rng.normal(0.5, 1.3, size=(5, dim))
    widths = bandwidth if isinstance(bandwidth, tuple) else (bandwidth,)
    out = jax.jit(lambda a, b: mmd2(a, b, bandwidth=bandwidth, unbiased=unbiased))(x, y)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, mmd2_brute(x, y, widths, unbiased), rtol=2e-5, atol=2e-6)


def test_rank1_features_equal_rank2():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=6), rng.normal(size=4)
    np.testing.assert_allclose(_mmd_u(x, y), _mmd_u(x[:, None], y[:, None]), rtol=1e-6)


@given(hnp.arrays(np.float32, (9, 2), elements=st.floats(-50, 50, width=32)))
def test_biased_mmd2_nonnegative(xy):
    assert float(_mmd_b(xy[:5], xy[5:])) >= -1e-6


@given(st.permutations(list(range(6))), st.permutations(list(range(4))))
def test_invariant_to_permuting_samples(px, py):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(4, 2))
    ref = _mmd_u(x, y)
    np.testing.assert_allclose(_mmd_u(x[list(px)], y[list(py)]), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_mmd_u(y, x), ref, rtol=1e-5, atol=1e-7)  # symmetric


def _population_mmd2_1d_gauss(delta, s):
    """Exact MMD^2 between N(0, 1) and N(delta, 1) under exp(-d^2 / (2 s^2))."""
    c = np.sqrt(s * s / (s * s + 2.0))
    return 2 * c - 2 * c * np.exp(-delta ** 2 / (2 * (s * s + 2.0)))


_estimators = jax.jit(jax.vmap(lambda x, y: (mmd2(x, y, bandwidth=0.9, unbiased=True),
                                                mmd2(x, y, bandwidth=0.9, unbiased=False))))


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_unbiased_estimator_is_unbiased_by_simulation(delta):
    reps, rng = 20_000, np.random.default_rng(7)
    u, b = _estimators(rng.normal(size=(reps, 4)), delta + rng.normal(size=(reps, 3)))
    truth = _population_mmd2_1d_gauss(delta, 0.9)
    se = np.std(np.asarray(u, np.float64)) / np.sqrt(reps)
    assert abs(np.mean(u) - truth) < 4 * se, (np.mean(u), truth, se)
    # the V-statistic is visibly biased upwards at these sample sizes: the test can fail
    assert np.mean(b) - truth > 10 * se


def test_gaussian_kernel_values():
    k = gaussian_kernel(jnp.array([0.0, 1.0]), jnp.array([0.0, 2.0]), bandwidth=(1.0, 2.0))
    d2 = np.array([[0.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(k, np.exp(-d2 / 2) + np.exp(-d2 / 8), rtol=1e-6)


def test_median_heuristic_matches_numpy_and_where():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 2))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))[np.triu_indices(9, 1)]
    where = np.arange(9) < 6
    d6 = np.sqrt(((x[:6, None] - x[None, :6]) ** 2).sum(-1))[np.triu_indices(6, 1)]
    heuristic = jax.jit(lambda a, w: median_heuristic_bandwidth(a, where=w))
    np.testing.assert_allclose(heuristic(x, np.ones(9, bool)), np.median(d), rtol=1e-5)
    np.testing.assert_allclose(heuristic(x, where), np.median(d6), rtol=1e-5)
    assert float(heuristic(np.zeros((9, 2)), where)) > 0  # floor, not 0
    g = jax.jit(jax.grad(lambda a: heuristic(a, where)))(jnp.asarray(x))
    np.testing.assert_array_equal(g, 0.0)  # stop_gradient


def test_mmd2_bf16_and_grads_finite():
    x = jnp.linspace(-80, 80, 6).astype(jnp.bfloat16)
    y = jnp.linspace(-1, 1, 4).astype(jnp.bfloat16)
    assert _mmd_u(x, y).dtype == jnp.float32
    np.testing.assert_allclose(_mmd_u(x, y), _mmd_u(x.astype(jnp.float32), y.astype(jnp.float32)),
                               rtol=1e-6)
    g = jax.jit(jax.grad(_mmd_u))(x.astype(jnp.float32), y.astype(jnp.float32))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("bw", [0.0, -1.0, (1.0, 0.0)])
def test_nonpositive_bandwidth_raises(bw):
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        mmd2(jnp.zeros(3), jnp.ones(3), bandwidth=bw)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="feature widths differ"):
        mmd2(jnp.zeros((3, 2)), jnp.zeros((3, 3)), bandwidth=1.0)
    with pytest.raises(ValueError, match=">= 2 samples"):
        mmd2(jnp.zeros(1), jnp.zeros(3), bandwidth=1.0)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, D\]"):
        mmd2(jnp.zeros((2, 2, 2)), jnp.zeros(3), bandwidth=1.0)


# ---------------------------------------------------------------- issue 16 reproductions
def test_tiny_bandwidth_gives_the_limit_kernel_not_nan():
    """bandwidth 1e-19: bandwidth^2 underflows float32, and 0/0 on the diagonal gave NaN. The
    kernel is now the identity on distinct points (e^-(huge) = 0, e^0 = 1)."""
    x = jnp.array([0.0, 1.0, 2.0])
    for width in (1e-19, 1e-30, 1e-39):  # the last one a subnormal: read as the smallest normal
        k = gaussian_kernel(x, x, bandwidth=width)
        np.testing.assert_array_equal(k, np.eye(3))
        v, g = jax.value_and_grad(lambda a: mmd2(a, x[:2] + 0.5, bandwidth=width,
                                                 unbiased=False))(x)
        assert float(v) == pytest.approx(mmd2_brute(x, x[:2] + 0.5, [1e-19], False))
        assert np.all(np.asarray(g) == 0.0)


def test_wide_features_far_from_the_origin_keep_a_unit_diagonal():
    """D > 8 takes the Gram path |a|^2 + |b|^2 - 2 a.b; at |x| ~ 1e4 its cancellation made the
    diagonal 1.6e-28 instead of 1, and biased mmd2 1.25 instead of the exact 1.5 (one x point,
    two y points, all far apart: mean k_xx + mean k_yy - 2 mean k_xy = 1 + 1/2 - 0)."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(size=(1, 16))).astype(np.float32)
    y = (-1e4 + 50 * rng.normal(size=(2, 16))).astype(np.float32)
    for a in (x, y):
        np.testing.assert_array_equal(np.diag(jax.jit(lambda a: gaussian_kernel(
            a, a, bandwidth=1.0))(a)), 1.0)
    assert float(jax.jit(lambda a, b: mmd2(a, b, bandwidth=1.0, unbiased=False))(x, y)) == 1.5
    # centred on their mean, nearby wide points are as accurate as narrow ones
    near = (1e4 + 0.3 * rng.normal(size=(5, 16))).astype(np.float32)
    got = jax.jit(lambda a: gaussian_kernel(a, a, bandwidth=1.0))(near)
    d2 = ((near.astype(np.float64)[:, None] - near[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, np.exp(-d2 / 2), rtol=1e-4)


def test_median_heuristic_without_any_pair_is_one():
    """B = 0 (and one sample) raised a bare IndexError; the documented fallback is 1."""
    for n in (0, 1):
        assert float(median_heuristic_bandwidth(jnp.zeros((n,)))) == 1.0
        assert float(median_heuristic_bandwidth(jnp.zeros((n, 3)))) == 1.0
