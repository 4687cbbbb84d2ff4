"""binned_mmd2, the CRM regulariser, the causal reward loss and Causal DPO."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from alignax.objectives import (binned_mmd2, causal_dpo_loss, causal_reward_loss,
                                crm_regularizer, fdpo_loss)

N, M = 24, 6
# bin 4 is empty and bin 5 holds one sample: both drop out of the unbiased statistic
BINS = np.array([0] * 5 + [1] * 6 + [2] * 4 + [3] * 8 + [5], np.int32)
assert BINS.shape == (N,)


def mmd2_ref(x, y, widths, unbiased):
    """float64 NumPy squared MMD with summed Gaussian kernels."""
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * s * s)) for s in widths)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    if unbiased:
        wx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        wy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    else:
        wx, wy = kxx.mean(), kyy.mean()
    return wx + wy - 2 * kxy.mean()


def binned_ref(features, bins, num_bins, widths, unbiased, reduction="sum"):
    """Brute-force loop over unordered pairs of bins that hold enough samples."""
    f = np.asarray(features, np.float64).reshape(len(bins), -1)
    need = 2 if unbiased else 1
    ok = [m for m in range(num_bins) if np.sum(bins == m) >= need]
    vals = [mmd2_ref(f[bins == a], f[bins == b], widths, unbiased)
            for a, b in itertools.combinations(ok, 2)]
    total = float(np.sum(vals)) if vals else 0.0
    return {"sum": total, "double_sum": 2 * total,
            "mean": total / len(vals) if vals else 0.0}[reduction]


def _binned(unbiased, reduction, bandwidth):
    return jax.jit(lambda f, b, w: binned_mmd2(f, b, num_bins=M, bandwidth=bandwidth,
                                               unbiased=unbiased, where=w, reduction=reduction))


_binned_u = _binned(True, "sum", 1.3)
_ALL = np.ones(N, bool)


@pytest.mark.parametrize("dim", [1, 3, 16])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean", "double_sum"])
def test_binned_matches_brute_force(dim, unbiased, reduction):
    rng = np.random.default_rng(dim)
    feats = rng.normal(size=(N, dim)) + 0.4 * BINS[:, None]
    widths = (0.5, 2.0)
    out = _binned(unbiased, reduction, widths)(feats, BINS, _ALL)
    assert out.dtype == jnp.float32 and out.shape == ()
    ref = binned_ref(feats, BINS, M, widths, unbiased, reduction)
    np.testing.assert_allclose(out, ref, rtol=3e-5, atol=3e-6)


def test_rank1_features_and_bins_with_one_sample_count_when_biased():
    rng = np.random.default_rng(0)
    x = rng.normal(size=N)
    # biased: the single-sample bin 5 contributes; unbiased: it does not
    b = _binned(False, "sum", 1.3)(x, BINS, _ALL)
    np.testing.assert_allclose(b, binned_ref(x, BINS, M, (1.3,), False), rtol=3e-5)
    assert not np.isclose(binned_ref(x, BINS, M, (1.3,), False),
                          binned_ref(x[:-1], BINS[:-1], M, (1.3,), False))
    u_with = binned_ref(x, BINS, M, (1.3,), True)
    u_without = binned_ref(x[:-1], BINS[:-1], M, (1.3,), True)
    np.testing.assert_allclose(u_with, u_without)
    np.testing.assert_allclose(_binned_u(x, BINS, _ALL), u_with, rtol=3e-5, atol=3e-6)


def test_identical_bins_give_zero_biased_statistic():
    vals = np.array([0.3, -1.0, 2.0])
    feats = np.tile(vals, 4)  # 4 bins holding the same multiset
    bins = np.repeat(np.arange(4), 3).astype(np.int32)
    out = jax.jit(lambda f: binned_mmd2(f, bins, num_bins=4, bandwidth=1.0, unbiased=False))(feats)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


@given(st.permutations(list(range(N))), st.permutations(list(range(M))))
def test_invariant_to_permuting_samples_and_relabelling_bins(perm, relabel):
    rng = np.random.default_rng(5)
    x = rng.normal(size=N) + 0.3 * BINS
    ref = _binned_u(x, BINS, _ALL)
    perm = np.array(perm)
    np.testing.assert_allclose(_binned_u(x[perm], BINS[perm], _ALL), ref, rtol=1e-5,
                               atol=1e-6)
    relabelled = np.array(relabel, np.int32)[BINS]
    np.testing.assert_allclose(_binned_u(x, relabelled, _ALL), ref, rtol=1e-5, atol=1e-6)


def test_where_equals_slicing():
    rng = np.random.default_rng(2)
    x = rng.normal(size=N) + 0.3 * BINS
    n_real = 17
    padded_x = x.copy()
    padded_x[n_real:] = 1e6  # finite garbage in the padding
    padded_bins = BINS.copy()
    padded_bins[n_real:] = -1  # out-of-range ids are fine where masked
    where = np.arange(N) < n_real
    sliced = binned_ref(x[:n_real], BINS[:n_real], M, (1.3,), True)
    np.testing.assert_allclose(_binned_u(padded_x, padded_bins, where), sliced, rtol=1e-5,
                               atol=1e-6)
    g = jax.jit(jax.grad(_binned_u))(jnp.asarray(padded_x), padded_bins, where)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[n_real:] == 0)


def test_gradients_finite_and_zero_through_dropped_bins():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=N) + 0.3 * BINS, jnp.float32)
    g = jax.jit(jax.grad(_binned_u))(x, BINS, _ALL)
    assert np.all(np.isfinite(g))
    assert float(g[-1]) == 0.0  # the single sample of bin 5
    # one usable bin only: value 0, gradient 0, no NaN
    one_bin = np.zeros(N, np.int32)
    v, g1 = jax.jit(jax.value_and_grad(_binned_u))(x, one_bin, _ALL)
    assert float(v) == 0.0 and np.all(np.asarray(g1) == 0.0)
    # every bin a single sample (biased statistic keeps them) and extreme features
    ext = jnp.linspace(-80.0, 80.0, M)
    gb = jax.jit(jax.grad(lambda f: _binned(False, "sum", 0.5)(f, np.arange(M), np.ones(M, bool))
                          ))(ext)
    assert np.all(np.isfinite(gb))


def test_jit_vmap_over_batches_and_bandwidth():
    rng = np.random.default_rng(4)
    xs = rng.normal(size=(3, N)) + 0.2 * BINS
    bws = jnp.array([0.5, 1.0, 2.0])
    f = jax.jit(jax.vmap(lambda x, bw: binned_mmd2(x, BINS, num_bins=M, bandwidth=bw)))
    out = f(xs, bws)
    for i in range(3):
        np.testing.assert_allclose(out[i], binned_ref(xs[i], BINS, M, (float(bws[i]),), True),
                                   rtol=3e-5, atol=3e-6)


def test_bins_beyond_num_bins_give_nan_under_jit_and_negative_ids_are_left_out():
    """One documented treatment of ids outside [0, num_bins): a negative id (the -1 of
    alignax.data.bins for unmatched samples) equals where=False, eagerly and under jit; an id
    >= num_bins raises eagerly (test_bad_input_raises) and makes the jitted result NaN instead
    of silently dropping the sample."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=N)
    unmatched = BINS.copy()
    unmatched[:3] = -1
    sliced = _binned_u(x, BINS, np.arange(N) >= 3)
    np.testing.assert_allclose(_binned_u(x, unmatched, _ALL), sliced, rtol=1e-6)
    np.testing.assert_allclose(binned_mmd2(x, unmatched, num_bins=M, bandwidth=1.3), sliced,
                               rtol=1e-6)
    beyond = BINS.copy()
    beyond[:3] = M + 2
    assert np.isnan(_binned_u(x, beyond, _ALL))
    # ...unless the offending rows are masked out
    np.testing.assert_allclose(_binned_u(x, beyond, np.arange(N) >= 3), sliced, rtol=1e-6)


def test_bad_input_raises():
    x = np.zeros(N, np.float32)
    bad = BINS.copy()
    bad[7] = M
    with pytest.raises(ValueError, match=r"bins out of range: bins\[7\] = 6 >= num_bins = 6"):
        binned_mmd2(x, bad, num_bins=M, bandwidth=1.0)
    assert float(binned_mmd2(x, np.full(N, -1, np.int32), num_bins=M, bandwidth=1.0)) == 0.0
    with pytest.raises(TypeError, match="integer"):
        binned_mmd2(x, BINS.astype(np.float32), num_bins=M, bandwidth=1.0)
    with pytest.raises(ValueError, match=r"features have 24 rows, bins \(23,\)"):
        binned_mmd2(x, BINS[:-1], num_bins=M, bandwidth=1.0)
    with pytest.raises(ValueError, match=r"where \(5,\)"):
        binned_mmd2(x, BINS, num_bins=M, bandwidth=1.0, where=np.ones(5, bool))
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        binned_mmd2(x, BINS, num_bins=M, bandwidth=-0.1)
    with pytest.raises(ValueError, match="num_bins"):
        binned_mmd2(x, BINS, num_bins=0, bandwidth=1.0)
    with pytest.raises(ValueError, match="reduction"):
        binned_mmd2(x, BINS, num_bins=M, bandwidth=1.0, reduction="max")


# ---------------------------------------------------------------- CRM and Causal DPO
B = 12
RNG = np.random.default_rng(11)
CW, CL = RNG.normal(size=B).astype(np.float32), RNG.normal(size=B).astype(np.float32)
BW, BL = RNG.integers(0, 3, B).astype(np.int32), RNG.integers(0, 3, B).astype(np.int32)


def test_conditional_and_unconditional_definitions():
    both = jax.jit(lambda w, l: [crm_regularizer(w, l, BW, BL, num_bins=3, bandwidth=0.8,
                                                 conditional=c) for c in (True, False)])
    cond, uncond = both(CW, CL)
    np.testing.assert_allclose(cond, binned_ref(CW, BW, 3, (0.8,), True)
                               + binned_ref(CL, BL, 3, (0.8,), True), rtol=3e-5, atol=3e-6)
    np.testing.assert_allclose(uncond, binned_ref(np.r_[CW, CL], np.r_[BW, BL], 3, (0.8,), True),
                               rtol=3e-5, atol=3e-6)


_crm = jax.jit(lambda w, l, lam, where: causal_reward_loss(
    w, l, BW, BL, lam=lam, num_bins=3, bandwidth="median", conditional=True, where=where))


def test_causal_reward_loss_mean_is_bt_plus_lambda_mmd():
    where = np.ones(B, bool)
    out = _crm(CW, CL, 0.7, where)
    assert out.shape == (B,) and out.dtype == jnp.float32
    bt = -np.log(1 / (1 + np.exp(-(CW.astype(np.float64) - CL))))
    pooled = np.r_[CW, CL].astype(np.float64)
    bw = np.median(np.abs(pooled[:, None] - pooled[None])[np.triu_indices(2 * B, 1)])
    reg = (binned_ref(CW, BW, 3, (bw,), True) + binned_ref(CL, BL, 3, (bw,), True))
    np.testing.assert_allclose(np.mean(out), np.mean(bt) + 0.7 * reg, rtol=1e-5)
    np.testing.assert_allclose(_crm(CW, CL, 0.0, where), bt, rtol=1e-5)
    # masked rows are 0 and the masked mean keeps the same decomposition
    where = np.arange(B) < 9
    out = np.asarray(_crm(CW, CL, 0.7, where))
    assert np.all(out[9:] == 0)
    p9 = np.r_[CW[:9], CL[:9]].astype(np.float64)
    bw9 = np.median(np.abs(p9[:, None] - p9[None])[np.triu_indices(18, 1)])
    reg9 = binned_ref(CW[:9], BW[:9], 3, (bw9,), True) + binned_ref(CL[:9], BL[:9], 3, (bw9,),
                                                                    True)
    np.testing.assert_allclose(out[:9].mean(), np.mean(bt[:9]) + 0.7 * reg9, rtol=1e-5)
    g = jax.jit(jax.grad(lambda w: jnp.mean(_crm(w, CL, 3.0, np.ones(B, bool)))))(CW)
    assert np.all(np.isfinite(g))


def test_causal_reward_loss_on_latent_features():
    feats_w, feats_l = RNG.normal(size=(B, 4)), RNG.normal(size=(B, 4))
    out = jax.jit(lambda *a: causal_reward_loss(*a, lam=2.0, num_bins=3, bandwidth=1.5,
                                                conditional=False, chosen_features=feats_w,
                                                rejected_features=feats_l))(CW, CL, BW, BL)
    reg = binned_ref(np.r_[feats_w, feats_l], np.r_[BW, BL], 3, (1.5,), True)
    bt = np.logaddexp(0.0, -(CW.astype(np.float64) - CL))
    np.testing.assert_allclose(out, bt + 2.0 * reg, rtol=3e-5)


@pytest.mark.parametrize("divergence,alpha", [("reverse_kl", None), ("jsd", None),
                                              ("alpha", 0.5)])
def test_causal_dpo_is_fdpo_plus_lambda_mmd_of_log_ratios(divergence, alpha):
    h_w = np.array([80.0, -80.0, 3.0, 0.0, -2.0, 1.0], np.float32)
    h_l = np.array([-80.0, 80.0, 3.0, 1.0, 0.5, -1.0], np.float32)
    b_w = np.array([0, 1, 0, 1, 0, 1], np.int32)
    b_l = np.array([1, 0, 1, 0, 1, 0], np.int32)
    f = jax.jit(lambda hw, hl: causal_dpo_loss(hw, hl, b_w, b_l, beta=0.1, lam=0.5, num_bins=2,
                                               bandwidth=2.0, divergence=divergence,
                                               alpha=alpha))
    out = f(h_w, h_l)
    reg = binned_ref(np.r_[h_w, h_l], np.r_[b_w, b_l], 2, (2.0,), True)  # pooled: eq. 4.4
    ref = jax.jit(lambda a, b: fdpo_loss(a, b, beta=0.1, divergence=divergence,
                                         alpha=alpha))(h_w, h_l) + 0.5 * reg
    np.testing.assert_allclose(out, ref, rtol=2e-5)
    assert np.all(np.isfinite(out))
    g = jax.jit(jax.grad(lambda hw: jnp.mean(f(hw, h_l))))(h_w)
    assert np.all(np.isfinite(g))
    bf = f(h_w.astype(jnp.bfloat16), h_l.astype(jnp.bfloat16))
    assert bf.dtype == jnp.float32


def test_bad_bandwidth_string():
    with pytest.raises(ValueError, match="'median'"):
        causal_reward_loss(CW, CL, BW, BL, lam=1.0, num_bins=3, bandwidth="mean")


# ---------------------------------------------------------------- issue 16 reproductions
@pytest.mark.parametrize("fill", [np.inf, -np.inf, np.nan, 3e38])
def test_masked_rows_change_nothing_whatever_they_hold(fill):
    """where= equals slicing, value and gradient, with inf / NaN / 3e38 in the masked rows, for
    binned MMD and both causal losses, also with lam = 0 (was: every gradient NaN, and a NaN
    row made binned_mmd2 NaN where slicing gives a number). Garbage and zeros in the masked
    rows give bit-identical results; against the sliced batch the kernel sums only run in
    another order (rtol 1e-5, as test_where_equals_slicing)."""
    n_real = 9
    where = np.arange(B) < n_real
    clean_w, clean_l = np.where(where, CW, 0.0), np.where(where, CL, 0.0)
    dirty_w = np.where(where, CW, np.float32(fill)).astype(np.float32)
    dirty_l = np.where(where, CL, np.float32(fill)).astype(np.float32)
    dirty_bins = np.where(where, BW, 7).astype(np.int32)  # even an out-of-range id
    for lam in (0.0, 2.0):
        def crm(w, l, mask, bins_w):
            return causal_reward_loss(w, l, bins_w, BL[:len(w)], lam=lam, num_bins=3, where=mask)

        def cdpo(w, l, mask, bins_w):
            return causal_dpo_loss(w, l, bins_w, BL[:len(w)], beta=0.5, lam=lam, num_bins=3,
                                   bandwidth=(0.5, 2.0), where=mask)

        for fn in (crm, cdpo):
            run = jax.jit(lambda *a, fn=fn: (fn(*a), jax.grad(lambda w, l: jnp.sum(fn(
                w, l, *a[2:])), (0, 1))(*a[:2])))
            dirty = run(dirty_w, dirty_l, where, dirty_bins)
            clean = run(clean_w, clean_l, where, BW)
            sliced = run(CW[:n_real], CL[:n_real], None, BW[:n_real])
            for got, want in zip(jax.tree.leaves(dirty), jax.tree.leaves(clean)):
                np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(dirty[0][:n_real], sliced[0], rtol=1e-5)
            assert np.all(np.asarray(dirty[0])[n_real:] == 0.0)
            for g_masked, g_sliced in zip(dirty[1], sliced[1]):
                np.testing.assert_allclose(g_masked[:n_real], g_sliced, rtol=1e-5, atol=1e-7)
                assert np.all(np.asarray(g_masked)[n_real:] == 0.0)
    x = np.where(np.arange(N) < 17, np.arange(N, dtype=np.float32) / 7, np.float32(fill))
    where_n = np.arange(N) < 17
    value, g = jax.jit(jax.value_and_grad(_binned_u))(x, BINS, where_n)
    np.testing.assert_allclose(value, binned_ref(x[:17], BINS[:17], M, (1.3,), True), rtol=1e-5,
                               atol=1e-6)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[17:] == 0.0)


def test_batch_of_zero_pairs_with_the_median_bandwidth():
    """B = 0 with bandwidth="median" (the default) raised a bare IndexError."""
    z, zi = jnp.zeros((0,)), jnp.zeros((0,), jnp.int32)
    assert causal_dpo_loss(z, z, zi, zi, beta=0.1, lam=1.0, num_bins=3).shape == (0,)
    assert causal_reward_loss(z, z, zi, zi, lam=1.0, num_bins=3).shape == (0,)
    assert float(binned_mmd2(z, zi, num_bins=3, bandwidth=1.0)) == 0.0


def test_tiny_bandwidth_in_the_causal_losses():
    """A bandwidth of 1e-19 (bandwidth^2 underflows) gave NaN: every sample is then its own
    cluster, and the binned statistic is finite with zero gradient."""
    out, g = jax.value_and_grad(lambda w: jnp.sum(causal_reward_loss(
        w, CL, BW, BL, lam=1.0, num_bins=3, bandwidth=1e-19)))(CW)
    assert np.isfinite(out) and np.all(np.isfinite(g))
    bt = jax.grad(lambda w: jnp.sum(causal_reward_loss(w, CL, BW, BL, lam=0.0, num_bins=3,
                                                       bandwidth=1.0)))(CW)
    np.testing.assert_allclose(g, bt, rtol=1e-6)  # the MMD term is flat at that bandwidth
