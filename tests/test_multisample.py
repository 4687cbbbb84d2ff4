"""mDPO / mIPO objectives (thesis §3.5): float64 references, masks, reductions, numerics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numerics_reference as ref
from alignax.objectives import fdpo_loss, group_nll_loss, ipo_loss, mdpo_loss, mipo_loss
from alignax.objectives import mipo_loss_with_metrics

B, K, L = 6, 4, 3
DIVERGENCES = (("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.3))


# ---------------------------------------------------------------- float64 NumPy references
def _f_prime64(h, name, alpha):
    h = np.asarray(h, np.float64)
    if name == "reverse_kl":
        return h + 1.0
    if name == "forward_kl":
        return -np.exp(-h)
    if name == "jsd":
        return np.log(2.0) - np.logaddexp(0.0, -h)
    return (1.0 - np.exp(-alpha * h)) / alpha


def _rows(h, mask):
    return [np.asarray(h[b], np.float64)[np.asarray(mask[b], bool)] for b in range(h.shape[0])]


def mdpo_ref(hw, hl, mw, ml, beta, name="reverse_kl", alpha=None):
    out = []
    for w, l in zip(_rows(hw, mw), _rows(hl, ml)):
        if w.size == 0 or l.size == 0:
            out.append(0.0)
            continue
        z = beta * (_f_prime64(w, name, alpha).mean() - _f_prime64(l, name, alpha).mean())
        out.append(np.logaddexp(0.0, -z))
    return np.asarray(out)


def mipo_ref(hw, hl, mw, ml, tau, unbiased=True, name="reverse_kl", alpha=None):
    out = []
    for w, l in zip(_rows(hw, mw), _rows(hl, ml)):
        if w.size == 0 or l.size == 0:
            out.append(0.0)
            continue
        gw, gl = _f_prime64(w, name, alpha), _f_prime64(l, name, alpha)
        value = (gw.mean() - gl.mean() - 0.5 / tau) ** 2
        if unbiased:
            value -= sum(g.var(ddof=1) / g.size for g in (gw, gl) if g.size >= 2)
        out.append(value)
    return np.asarray(out)


def _data(seed, scale=3.0):
    rng = np.random.default_rng(seed)
    hw = rng.normal(0.0, scale, (B, K)).astype(np.float32)
    hl = rng.normal(0.0, scale, (B, L)).astype(np.float32)
    mw = rng.random((B, K)) < 0.7
    ml = rng.random((B, L)) < 0.7
    mw[:, 0] = ml[:, 0] = True  # every example non-empty here; empty rows tested separately
    mw[1, :2] = True  # row 1 chosen group has >= 2 members; row 2 chosen has exactly one
    mw[2, 1:] = False
    return hw, hl, mw, ml


_MDPO = {d: jax.jit(lambda hw, hl, mw, ml, d=d: mdpo_loss(
    hw, hl, beta=0.7, chosen_mask=mw, rejected_mask=ml, divergence=d[0], alpha=d[1]))
    for d in DIVERGENCES}
_MIPO = {(d, u): jax.jit(lambda hw, hl, mw, ml, d=d, u=u: mipo_loss(
    hw, hl, tau=0.4, unbiased=u, chosen_mask=mw, rejected_mask=ml, divergence=d[0], alpha=d[1]))
    for d in DIVERGENCES for u in (True, False)}


@pytest.mark.parametrize("div", DIVERGENCES)
def test_mdpo_matches_float64_reference(div):
    for seed in range(3):
        hw, hl, mw, ml = _data(seed)
        got = _MDPO[div](hw, hl, mw, ml)
        assert got.dtype == jnp.float32 and got.shape == (B,)
        np.testing.assert_allclose(got, mdpo_ref(hw, hl, mw, ml, 0.7, *div), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_mipo_matches_float64_reference(div, unbiased):
    scale = 3.0 if div[0] in ("reverse_kl", "jsd") else 1.0
    for seed in range(3):
        hw, hl, mw, ml = _data(seed, scale)
        got = _MIPO[(div, unbiased)](hw, hl, mw, ml)
        want = mipo_ref(hw, hl, mw, ml, 0.4, unbiased, *div)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + np.abs(want).max()))


def test_reverse_kl_is_the_thesis_formula():
    """-log sigmoid(beta mean h_w - beta mean h_l) and (mean - mean - 1/(2 tau))^2 - s^2/K - ..."""
    hw = np.array([[0.5, -1.0, 2.0]], np.float32)
    hl = np.array([[1.0, -3.0]], np.float32)
    got_dpo, got_ipo = jax.jit(lambda a, b: (mdpo_loss(a, b, beta=0.1), mipo_loss(a, b, tau=0.5)))(hw, hl)
    z = 0.1 * (hw.mean() - hl.mean())
    np.testing.assert_allclose(got_dpo, [np.log1p(np.exp(-z))], rtol=1e-6)
    want = (hw.mean() - hl.mean() - 1.0) ** 2 - hw.var(ddof=1) / 3 - hl.var(ddof=1) / 2
    np.testing.assert_allclose(got_ipo, [want], rtol=1e-5)


# ---------------------------------------------------------------- reductions to DPO / IPO
@jax.jit
def _single_member(hw, hl):
    """(mDPO on [B, 1] groups, f-DPO) per divergence, and (plain mIPO, IPO)."""
    pairs = [(mdpo_loss(hw[:, None], hl[:, None], beta=0.3, divergence=d, alpha=a),
              fdpo_loss(hw, hl, beta=0.3, divergence=d, alpha=a)) for d, a in DIVERGENCES]
    pairs.append((mipo_loss(hw[:, None], hl[:, None], tau=0.25, unbiased=False),
                  ipo_loss(hw, hl, tau=0.25)))
    return pairs


@given(st.lists(st.floats(-50, 50), min_size=8, max_size=8))
def test_single_member_groups_are_dpo_and_ipo(values):
    v = np.asarray(values, np.float32).reshape(2, 4)
    for got, want in _single_member(v[0], v[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_masked_singletons_equal_ipo_even_when_unbiased():
    """A padded group with one valid member gets no correction: unbiased mIPO == IPO there."""
    rng = np.random.default_rng(0)
    hw, hl = rng.normal(size=(2, B, K)).astype(np.float32)
    mask = np.zeros((B, K), bool)
    mask[:, 0] = True
    got, metrics = jax.jit(lambda a, b: mipo_loss_with_metrics(
        a, b, tau=0.4, chosen_mask=mask, rejected_mask=mask))(hw, hl)
    want = (hw[:, 0].astype(np.float64) - hl[:, 0] - 1.25) ** 2  # IPO, 1/(2 tau) = 1.25
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert int(metrics["num_uncorrected_groups"]) == 2 * B
    assert int(metrics["num_empty_examples"]) == 0
    assert float(metrics["mean_variance_correction"]) == 0.0


def test_static_single_member_with_unbiased_raises():
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        mipo_loss(jnp.zeros((3, 1)), jnp.zeros((3, 4)), tau=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        mipo_loss(jnp.zeros((3, 4)), jnp.zeros((3, 1)), tau=1.0, unbiased=True)


@pytest.mark.parametrize("call", [
    lambda: mdpo_loss(jnp.zeros((3,)), jnp.zeros((3, 2)), beta=1.0),
    lambda: mdpo_loss(jnp.zeros((3, 2)), jnp.zeros((4, 2)), beta=1.0),
    lambda: mdpo_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), beta=1.0, chosen_mask=jnp.ones((3, 3))),
    lambda: mdpo_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), beta=-1.0),
    lambda: mipo_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), tau=0.0),
    lambda: mdpo_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), beta=1.0, divergence="chi_squared"),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- masks, permutations, empties
def _garbage(h, mask, fill):
    return np.where(mask, h, np.float32(fill)).astype(np.float32)


@pytest.mark.parametrize("fill", [np.inf, -np.inf, np.nan, 1e30])
def test_padded_members_affect_neither_value_nor_gradient(fill):
    hw, hl, mw, ml = _data(5)
    clean = (_garbage(hw, mw, 0.0), _garbage(hl, ml, 0.0))
    dirty = (_garbage(hw, mw, fill), _garbage(hl, ml, fill))
    for div in DIVERGENCES:
        for fn in (_MDPO[div], _MIPO[(div, True)]):
            np.testing.assert_array_equal(fn(*dirty, mw, ml), fn(*clean, mw, ml))
            grads = jax.grad(lambda a, b: jnp.sum(fn(a, b, mw, ml)), argnums=(0, 1))(*dirty)
            clean_grads = jax.grad(lambda a, b: jnp.sum(fn(a, b, mw, ml)), argnums=(0, 1))(*clean)
            for g, cg, m in zip(grads, clean_grads, (mw, ml)):
                assert np.all(np.isfinite(g))
                assert np.all(np.asarray(g)[~m] == 0.0)
                np.testing.assert_array_equal(g, cg)


def test_masks_equal_slicing():
    """A ragged row under a mask == the same row evaluated alone on its sliced members."""
    hw, hl, mw, ml = _data(7)
    @jax.jit
    def alone(w, l):
        return [(mdpo_loss(w, l, beta=0.7, divergence=d, alpha=a),
                 mipo_loss(w, l, tau=0.4, unbiased=False, divergence=d, alpha=a))
                for d, a in DIVERGENCES]
    masked = [(_MDPO[d](hw, hl, mw, ml), _MIPO[(d, False)](hw, hl, mw, ml)) for d in DIVERGENCES]
    for b in range(B):
        sliced = alone(hw[b][mw[b]][None], hl[b][ml[b]][None])
        for (m_dpo, m_ipo), (s_dpo, s_ipo) in zip(masked, sliced):
            np.testing.assert_allclose(m_dpo[b], s_dpo[0], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(m_ipo[b], s_ipo[0], rtol=1e-5, atol=1e-6)


def test_permutation_invariance_within_groups():
    hw, hl, mw, ml = _data(11)
    rng = np.random.default_rng(1)
    pw = np.stack([rng.permutation(K) for _ in range(B)])
    pl = np.stack([rng.permutation(L) for _ in range(B)])
    perm = (np.take_along_axis(hw, pw, 1), np.take_along_axis(hl, pl, 1),
            np.take_along_axis(mw, pw, 1), np.take_along_axis(ml, pl, 1))
    for fn in list(_MDPO.values()) + list(_MIPO.values()):
        np.testing.assert_allclose(fn(*perm), fn(hw, hl, mw, ml), rtol=2e-6, atol=1e-6)


def test_empty_group_gives_zero_loss_and_gradient():
    hw, hl, mw, ml = _data(3)
    mw[0] = False  # example 0: empty chosen group
    ml[4] = False  # example 4: empty rejected group
    for div in DIVERGENCES:
        for fn in (_MDPO[div], _MIPO[(div, True)]):
            loss = np.asarray(fn(hw, hl, mw, ml))
            assert loss[0] == 0.0 and loss[4] == 0.0
            gw, gl = jax.grad(lambda a, b: jnp.sum(fn(a, b, mw, ml)), argnums=(0, 1))(hw, hl)
            assert np.all(np.asarray(gw)[[0, 4]] == 0) and np.all(np.asarray(gl)[[0, 4]] == 0)
    _, metrics = jax.jit(lambda a, b: mipo_loss_with_metrics(a, b, tau=0.4, chosen_mask=mw,
                                                             rejected_mask=ml))(hw, hl)
    assert int(metrics["num_empty_examples"]) == 2
    # row 2 has a single chosen member (see _data); rows 0 and 4 are empty and not counted
    singles = sum(int(m.sum() == 1) for i, row in enumerate(zip(mw, ml)) if i not in (0, 4)
                  for m in row)
    assert int(metrics["num_uncorrected_groups"]) == singles >= 1


# ---------------------------------------------------------------- jit / vmap / grad
def test_vmap_equals_loop():
    data = [_data(s) for s in range(3)]
    stacked = [np.stack(x) for x in zip(*data)]
    for fn in (_MDPO[DIVERGENCES[0]], _MIPO[(DIVERGENCES[0], True)]):
        batched = jax.vmap(fn)(*stacked)
        for i, d in enumerate(data):
            np.testing.assert_allclose(batched[i], fn(*d), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_gradients_match_float64_finite_differences(div):
    hw, hl, mw, ml = _data(2, scale=1.0)
    eps = 1e-4
    for fn, ref in ((_MDPO[div], lambda a, b: mdpo_ref(a, b, mw, ml, 0.7, *div).sum()),
                    (_MIPO[(div, True)], lambda a, b: mipo_ref(a, b, mw, ml, 0.4, True, *div).sum())):
        gw, gl = jax.grad(lambda a, b: jnp.sum(fn(a, b, mw, ml)), argnums=(0, 1))(hw, hl)
        for g, x, which in ((gw, hw.astype(np.float64), 0), (gl, hl.astype(np.float64), 1)):
            num = np.zeros_like(x)
            for idx in np.ndindex(x.shape):
                up, dn = x.copy(), x.copy()
                up[idx] += eps
                dn[idx] -= eps
                args_up = (up, hl.astype(np.float64)) if which == 0 else (hw.astype(np.float64), up)
                args_dn = (dn, hl.astype(np.float64)) if which == 0 else (hw.astype(np.float64), dn)
                num[idx] = (ref(*args_up) - ref(*args_dn)) / (2 * eps)
            np.testing.assert_allclose(g, num, rtol=2e-3, atol=2e-4)


# ---------------------------------------------------------------- numerics
@given(st.sampled_from([80.0, -80.0, 200.0, -200.0, 1e4, -1e4, 1e30, -1e30]),
       st.integers(0, 2**16))
def test_no_nan_at_extreme_log_ratios(magnitude, seed):
    """Never NaN; and the gradient is +/-inf exactly where its true (60-digit) value exceeds
    float32, e.g. mIPO forward KL at h = -80 in every chosen member: d/dh ~ e^160 / 3 (the
    old test exempted forward KL / alpha beyond |a h| = 80 instead)."""
    rng = np.random.default_rng(seed)
    hw = (magnitude * rng.choice([-1.0, 0.5, 1.0], (B, K))).astype(np.float32)
    hl = (magnitude * rng.choice([-1.0, 0.25, 1.0], (B, L))).astype(np.float32)
    _, _, mw, ml = _data(seed)
    fns = [(k, "mdpo", f) for k, f in _MDPO.items()] + [(k[0], k[1], f) for k, f in _MIPO.items()]
    for (div, alpha), family, fn in fns:
        loss = np.asarray(fn(hw, hl, mw, ml))
        gw, gl = jax.grad(lambda a, b: jnp.sum(fn(a, b, mw, ml)), argnums=(0, 1))(hw, hl)
        assert not np.isnan(loss).any() and not np.isnan(gw).any() and not np.isnan(gl).any()
        a32 = None if alpha is None else np.float32(alpha)
        for i in range(B if abs(magnitude) <= 200 else 0):  # beyond: e^(|h|) digits, and the
            w, l = hw[i][mw[i]], hl[i][ml[i]]               # gradients undetermined in float32
            try:
                want = (ref.group_dpo(div, a32, np.float32(0.7), w, l) if family == "mdpo"
                        else ref.mipo(div, a32, np.float32(0.4), family, w, l))
            except ValueError:  # |h| = 1e30 under forward KL / alpha: beyond the reference
                continue
            grads = np.concatenate([np.asarray(gw)[i][mw[i]], np.asarray(gl)[i][ml[i]]])
            ref.assert_close(grads, want[1] + want[2], want[4] + want[5], 8, (div, family))


def test_bf16_inputs_are_computed_in_float32():
    hw, hl, mw, ml = _data(4)
    hw16, hl16 = jnp.asarray(hw, jnp.bfloat16), jnp.asarray(hl, jnp.bfloat16)
    for fn in (_MDPO[DIVERGENCES[0]], _MIPO[(DIVERGENCES[0], True)]):
        got = fn(hw16, hl16, mw, ml)
        assert got.dtype == jnp.float32
        want = fn(np.asarray(hw16, np.float32), np.asarray(hl16, np.float32), mw, ml)
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------- NLL term (§3.6.1, fn. 3)
def test_group_nll_composes():
    rng = np.random.default_rng(0)
    logps = -rng.random((B, K, 5)).astype(np.float32)
    tok_mask = rng.random((B, K, 5)) < 0.8
    tok_mask[0, 0] = False  # an empty member: nll 0
    hw, hl, mw, ml = _data(0)
    nll = jax.jit(group_nll_loss)
    got = nll(logps, tok_mask, mw)
    per = (-(logps.astype(np.float64) * tok_mask).sum(-1) / np.maximum(tok_mask.sum(-1), 1))  # [B, K]
    np.testing.assert_allclose(got, (per * mw).sum(-1) / mw.sum(-1), rtol=1e-6)

    @jax.jit
    def grads(hw, logps):
        def total(hw, logps):
            return jnp.mean(mdpo_loss(hw, hl, beta=0.5, chosen_mask=mw, rejected_mask=ml)
                            + 0.3 * group_nll_loss(logps, tok_mask, mw))
        alone = jax.grad(lambda h: jnp.mean(mdpo_loss(h, hl, beta=0.5, chosen_mask=mw,
                                                      rejected_mask=ml)))(hw)
        return jax.grad(total, argnums=(0, 1))(hw, logps), alone
    (g_h, g_lp), g_h_alone = grads(hw, logps)
    np.testing.assert_allclose(g_h, g_h_alone, rtol=1e-6)
    assert np.all(np.asarray(g_lp)[~mw] == 0.0) and np.all(np.isfinite(g_lp))
    assert math.isclose(float(jnp.sum(nll(logps, tok_mask, np.zeros((B, K), bool)))), 0.0)


# ---------------------------------------------------------------- issue 16 reproductions
def test_forward_kl_empty_group_has_zero_gradient_at_any_h():
    """An example whose rejected group is empty gives 0 with no gradient, also where e^(-a h)
    of the other group overflows (was NaN at h <= -89, and at h <= -667 for alpha = 0.5)."""
    for divergence, alpha, h in (("forward_kl", None, -100.0), ("alpha", 0.5, -667.0),
                                 ("forward_kl", None, -3e38)):
        def loss(hw, hl):
            return jnp.sum(mdpo_loss(hw, hl, beta=1.0, chosen_mask=jnp.array([[True]]),
                                     rejected_mask=jnp.array([[False]]), divergence=divergence,
                                     alpha=alpha))
        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(jnp.array([[h]]),
                                                                 jnp.array([[0.0]]))
        assert float(value) == 0.0 and float(grads[0][0, 0]) == 0.0 and float(grads[1][0, 0]) == 0


def test_forward_kl_gradient_is_finite_next_to_an_overflowing_member():
    """hw = [-1e4, 0], hl = [0]: the loss overflows (inf, its true value), d/dh_w,1 = -inf
    (true), and d/dh_w,2 = -(1/2) sigmoid(-z) e^0 = -0.5 (was NaN)."""
    def loss(hw, hl):
        return jnp.sum(mdpo_loss(hw, hl, beta=1.0, divergence="forward_kl"))
    value, (g_w, g_l) = jax.jit(jax.value_and_grad(loss, (0, 1)))(jnp.array([[-1e4, 0.0]]),
                                                                  jnp.array([[0.0]]))
    assert float(value) == np.inf
    np.testing.assert_array_equal(g_w, [[-np.inf, -0.5]])
    np.testing.assert_array_equal(g_l, [[1.0]])


def test_forward_kl_mipo_overflows_to_inf_instead_of_cancelling_to_zero():
    """mipo([[0, 0]], [[-1e4, -89]], tau=1, forward KL): the U-statistic holds the product
    e^1e4 e^89 of two distinct rejected members, far beyond float32: inf (was 0 with NaN
    gradients, D^2 and the variance cancelling). And at [[-80, 0]] the true value -2.77e34 is
    a float32 number (was 0)."""
    def loss(hw, hl):
        return jnp.sum(mipo_loss(hw, hl, tau=1.0, divergence="forward_kl"))
    run = jax.jit(jax.value_and_grad(loss, (0, 1)))
    value, (g_w, g_l) = run(jnp.array([[0.0, 0.0]]), jnp.array([[-1e4, -89.0]]))
    assert float(value) == np.inf
    want = ref.mipo("forward_kl", None, np.float32(1.0), True, [0.0, 0.0], [-1e4, -89.0])
    ref.assert_close(np.concatenate([g_w[0], g_l[0]]), want[1] + want[2], want[4] + want[5], 8)
    want = ref.mipo("forward_kl", None, np.float32(1.0), True, [0.0, 0.0], [-80.0, 0.0])
    value = run(jnp.array([[0.0, 0.0]]), jnp.array([[-80.0, 0.0]]))[0]
    ref.assert_close(value, want[0], want[3], 8)
    assert want[0] == pytest.approx(-2.7703112e34, rel=1e-6)


def test_alpha_near_zero_is_accurate_and_tends_to_reverse_kl():
    """alpha = 1e-5 / 1e-7 gave 0.135186 / 0.25 for mIPO where the exact value (and the
    reverse-KL limit) is 0.145000: now within float32 rounding of the exact value, and mDPO at
    alpha = 1e-7 within the rounding of its inputs (values and gradients, 60-digit reference)."""
    hw, hl = np.float32([[0.0, -0.5, 0.25]]), np.float32([[-0.3, 0.1]])
    mipo = jax.jit(lambda a, b, alpha: mipo_loss(a, b, tau=1.0, divergence="alpha", alpha=alpha))
    mdpo = jax.jit(jax.value_and_grad(lambda a, b, beta, alpha: jnp.sum(
        mdpo_loss(a, b, beta=beta, divergence="alpha", alpha=alpha)), (0, 1)))
    for alpha in (1e-5, 1e-7):
        a32 = np.float32(alpha)
        got = mipo(hw, hl, a32)
        want = ref.mipo("alpha", a32, np.float32(1.0), True, hw[0], hl[0])
        ref.assert_close(got, want[0], want[3], 8)
        assert abs(float(got[0]) - 0.145) < 1e-5  # the reverse-KL limit, O(alpha) away
        for scale, beta in ((1.0, 1.0), (100.0, 30.0), (-100.0, 30.0)):
            value, (g_w, g_l) = mdpo(hw * scale, hl * scale, np.float32(beta), a32)
            want = ref.group_dpo("alpha", a32, np.float32(beta), hw[0] * scale, hl[0] * scale)
            ref.assert_close(value, want[0], want[3], 8)
            ref.assert_close(np.concatenate([g_w[0], g_l[0]]), want[1] + want[2],
                             want[4] + want[5], 8)
