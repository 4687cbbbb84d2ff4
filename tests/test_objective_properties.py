"""Properties of every objective family over the whole finite float32 range (issue 16).

Each family is checked, value and gradient, against the 60-digit mpmath references of
tests/numerics_reference.py at inputs drawn from the whole finite float32 range (|h| up to
3.4e38, exact ties, near ties one ulp apart, the overflow edges of e^h), for every divergence
of Table 2.1 with alpha near 0 and 1, and extreme beta / tau / gamma. Padded entries hold inf,
NaN or 3e38 and must change nothing (value and gradient equal those of the sliced input);
groups may be empty; B = 0 works; bf16 inputs give the float32 result of their values.

Tolerance: ROUNDINGS * eps * sensitivity (numerics_reference.assert_close), the first-order
effect of perturbing every input and hyper-parameter by ROUNDINGS roundings, eps = 2^-24. The
implementations are backward stable with a handful of roundings per input (measured: at most
~3.5 over these draws); 8 leaves room without hiding an error of a few orders of magnitude,
which is what every failure of issue 16 was (NaN, inf for a finite value, a relative error of
7% at alpha = 1e-5, a wrong factor 2 at a zero). A result may be +/-inf only where the
perturbed true value may exceed float32 and must be where it surely does.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import numerics_reference as ref
from alignax.objectives import (binned_mmd2, bradley_terry_loss, diffusion_mdpo_loss,
                                distill_loss, fdpo_loss, ipo_loss, mdpo_loss, mipo_loss, nll_loss,
                                pessimistic_distill_loss, pessimistic_dpo_loss)

ROUNDINGS = ref.ROUNDINGS
F32 = np.finfo(np.float32)
DIVERGENCES = ["reverse_kl", "forward_kl", "jsd", "alpha"]
# alpha near 0 (the reverse-KL limit), inside, near 1 (forward KL); traced, so one compilation
alphas = st.sampled_from([1e-6, 0.3, 0.999])
EXTREMES = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 80.0, -80.0, 88.72, -88.72, 89.0, -89.0,
            200.0, -200.0, 667.0, -667.0, 1e4, -1e4, 3e38, -3e38, float(F32.max),
            -float(F32.max)]
GARBAGE = [np.inf, -np.inf, np.nan, 3e38, -3e38]
B, K, L = 3, 3, 2

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
log_ratio = st.one_of(st.floats(-100, 100, width=32), st.sampled_from(EXTREMES), finite32)


@st.composite
def groups(draw, rows, width):
    """[rows, width] float32 log-ratios: free draws, exact ties and members one ulp apart."""
    base = draw(st.lists(log_ratio, min_size=rows * width, max_size=rows * width))
    h = np.asarray(base, np.float32).reshape(rows, width)
    if draw(st.booleans()):  # near ties around one value
        center = np.float32(draw(log_ratio))
        steps = draw(st.lists(st.integers(-3, 3), min_size=rows * width, max_size=rows * width))
        up = -np.inf if center == F32.max else np.inf  # one ulp up or down, staying finite
        down = np.inf if center == -F32.max else -np.inf
        h = np.asarray([center if s == 0 else np.nextafter(center, np.float32(up if s > 0
                                                                              else down))
                        for s in steps], np.float32).reshape(rows, width)
    return h


masks = functools.partial(st.lists, st.booleans())


def _reference_or_none(fn, *args):
    """The mpmath reference, or None where it would need more than MAX_DIGITS digits (|h| of
    order 1e4 and beyond under forward KL / alpha): such draws get the structural checks."""
    try:
        return fn(*args)
    except ValueError:
        return None


def _check_structure(loss, grads, nonnegative):
    loss = np.asarray(loss)
    assert not np.isnan(loss).any(), loss
    if nonnegative:
        assert (loss >= 0).all(), loss
    for g in grads:
        assert not np.isnan(np.asarray(g, np.float32)).any(), g


def _with_garbage(h, mask, fill):
    return np.where(mask, h, np.float32(fill)).astype(np.float32)


def _alpha(name, alpha):
    """alpha as the float32 the kernels see (None for the other divergences)."""
    return np.float32(alpha) if name == "alpha" else None


def _kw(name, alpha):
    return dict(divergence=name, alpha=alpha if name == "alpha" else None)


# ----------------------------------------------------------------------------- f-DPO
@functools.cache
def _fdpo(name):
    def loss(h_w, h_l, beta, alpha):
        return fdpo_loss(h_w, h_l, beta=beta, **_kw(name, alpha))
    total = lambda *a: jnp.sum(loss(*a))  # noqa: E731
    return jax.jit(lambda *a: (loss(*a), *jax.grad(total, (0, 1))(*a)))


@pytest.mark.parametrize("name", DIVERGENCES)
@given(h=groups(2, B), beta=st.sampled_from([1e-30, 1e-3, 0.1, 1.0, 30.0, 1e30]), alpha=alphas)
def test_fdpo_matches_mpmath(name, h, beta, alpha):
    beta, alpha = np.float32(beta), _alpha(name, alpha)
    loss, g_w, g_l = _fdpo(name)(h[0], h[1], beta, alpha)
    _check_structure(loss, (g_w, g_l), nonnegative=True)
    for i in range(B):
        want = _reference_or_none(ref.group_dpo, name, alpha, beta, [h[0, i]], [h[1, i]])
        if want is None:
            continue
        what = (name, alpha, beta, h[0, i], h[1, i])
        ref.assert_close(loss[i], want[0], want[3], ROUNDINGS, what)
        ref.assert_close([g_w[i], g_l[i]], want[1] + want[2], want[4] + want[5], ROUNDINGS, what)


# ----------------------------------------------------------------------------- mDPO / mIPO
@functools.cache
def _groups(name):
    """One compiled (mDPO, mIPO, plain mIPO) with loss and gradients per divergence."""
    def families(h_w, h_l, m_w, m_l, beta, tau, alpha):
        kw = dict(chosen_mask=m_w, rejected_mask=m_l, **_kw(name, alpha))
        fns = {"mdpo": lambda a, b: mdpo_loss(a, b, beta=beta, **kw),
               "mipo": lambda a, b: mipo_loss(a, b, tau=tau, unbiased=True, **kw),
               "mipo_biased": lambda a, b: mipo_loss(a, b, tau=tau, unbiased=False, **kw)}
        return {k: (fn(h_w, h_l), *jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b)), (0, 1))(
            h_w, h_l)) for k, fn in fns.items()}
    return jax.jit(families)


@pytest.mark.parametrize("name", DIVERGENCES)
@given(h_w=groups(B, K), h_l=groups(B, L), m_w=masks(min_size=B * K, max_size=B * K),
       m_l=masks(min_size=B * L, max_size=B * L),
       beta=st.sampled_from([1e-30, 1e-3, 0.1, 1.0, 30.0, 1e30]),
       tau=st.sampled_from([1e-30, 1e-3, 0.1, 1.0, 1e3, 1e30]), alpha=alphas,
       fill=st.sampled_from(GARBAGE))
def test_mdpo_and_mipo_match_mpmath(name, h_w, h_l, m_w, m_l, beta, tau, alpha, fill):
    """mDPO, mIPO (Prop. 1) and plain mIPO on ragged groups (empty ones included) whose
    padded members hold inf / NaN / 3e38."""
    m_w, m_l = np.reshape(m_w, (B, K)), np.reshape(m_l, (B, L))
    beta, tau, alpha = np.float32(beta), np.float32(tau), _alpha(name, alpha)
    out = _groups(name)(_with_garbage(h_w, m_w, fill), _with_garbage(h_l, m_l, fill), m_w, m_l,
                        beta, tau, alpha)
    for family, (loss, g_w, g_l) in out.items():
        _check_structure(loss, (g_w, g_l), nonnegative=family == "mdpo")
        # padded members: no gradient, whatever they hold
        assert (np.asarray(g_w)[~m_w] == 0).all() and (np.asarray(g_l)[~m_l] == 0).all()
        for i in range(B):
            w, l = h_w[i][m_w[i]], h_l[i][m_l[i]]
            if w.size == 0 or l.size == 0:  # an empty group: 0, no gradient
                assert loss[i] == 0 and (g_w[i] == 0).all() and (g_l[i] == 0).all()
                continue
            if family == "mdpo":
                want = _reference_or_none(ref.group_dpo, name, alpha, beta, w, l)
            else:
                want = _reference_or_none(ref.mipo, name, alpha, tau, family == "mipo", w, l)
            if want is None:
                continue
            what = (family, name, alpha, beta, tau, w, l)
            ref.assert_close(loss[i], want[0], want[3], ROUNDINGS, what)
            ref.assert_close(np.concatenate([g_w[i][m_w[i]], g_l[i][m_l[i]]]),
                             want[1] + want[2], want[4] + want[5], ROUNDINGS, what)


# ----------------------------------------------------------------------------- distillation
@functools.cache
def _distill(name):
    def loss(h1, h2, r1, r2, beta, where, alpha):
        return distill_loss(h1, h2, r1, r2, beta=beta, where=where, **_kw(name, alpha))
    total = lambda *a: jnp.sum(loss(*a))  # noqa: E731
    return jax.jit(lambda *a: (loss(*a), *jax.grad(total, (0, 1, 2, 3))(*a)))


@pytest.mark.parametrize("name", DIVERGENCES)
@given(h=groups(2, B), r=groups(2, B), where=masks(min_size=B, max_size=B),
       beta=st.sampled_from([1e-30, 1e-3, 0.1, 1.0, 30.0, 1e30]), alpha=alphas,
       fill=st.sampled_from(GARBAGE))
def test_distill_matches_mpmath(name, h, r, where, beta, alpha, fill):
    where, beta, alpha = np.asarray(where), np.float32(beta), _alpha(name, alpha)
    args = [_with_garbage(x, where, fill) for x in (h[0], h[1], r[0], r[1])]
    loss, *grads = _distill(name)(*args, beta, where, alpha)
    _check_structure(loss, grads, nonnegative=True)
    for i in range(B):
        if not where[i]:
            assert loss[i] == 0 and all(g[i] == 0 for g in grads)
            continue
        want = _reference_or_none(ref.distill, name, alpha, beta, h[0, i], h[1, i], r[0, i],
                                  r[1, i])
        if want is None:
            continue
        what = (name, alpha, beta, h[:, i], r[:, i])
        ref.assert_close(loss[i], want[0], want[2], ROUNDINGS, what)
        ref.assert_close([g[i] for g in grads], want[1], want[3], ROUNDINGS, what)


@functools.cache
def _pessimistic(name):
    def loss(h1, h2, r1, r2, beta, gamma, alpha):
        return pessimistic_distill_loss(h1, h2, r1, r2, beta=beta, gamma=gamma,
                                        **_kw(name, alpha))[0]
    return jax.jit(lambda *a: (loss(*a), *jax.grad(loss, (0, 1))(*a)))


@pytest.mark.parametrize("name", DIVERGENCES)
@given(h=groups(2, B), r=groups(4, B), beta=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
       gamma=st.sampled_from([0.0, 1e-4, 1.0, 1e3]), alpha=alphas)
def test_pessimistic_distill_matches_mpmath(name, h, r, beta, gamma, alpha):
    """004 eq. 11 with E = 2 members: min_e mean_b distill + gamma mean(-h) over the 2B pair
    responses; the gradient is that of the arg-min member (a subgradient of the min)."""
    beta, gamma, alpha = np.float32(beta), np.float32(gamma), _alpha(name, alpha)
    r1, r2 = r[:2], r[2:]
    loss, g1, g2 = _pessimistic(name)(h[0], h[1], r1, r2, beta, gamma, alpha)
    _check_structure(loss, (g1, g2), nonnegative=False)
    members = []
    for e in range(2):
        per = [_reference_or_none(ref.distill, name, alpha, beta, h[0, i], h[1, i], r1[e, i],
                                  r2[e, i], 1.0 / B) for i in range(B)]
        if any(p is None for p in per):
            return
        members.append((sum(p[0] for p in per), per))
    values = [m[0] for m in members]
    best = members[int(np.argmin(values))][1]
    fkl = -float(np.mean(np.float64(h)))
    want = min(values) + float(gamma) * fkl
    sens = sum(p[2] for p in best) + float(gamma) * float(np.mean(np.abs(np.float64(h))))
    what = (name, alpha, beta, gamma, h, r)
    ref.assert_close(loss, want, sens, ROUNDINGS, what)
    resolution = ROUNDINGS * ref.EPS32 * sum(p[2] for m in members for p in m[1]) + ref.TINY
    if abs(values[0] - values[1]) <= resolution:
        return  # float32 cannot tell the members apart: the subgradient may be either's
    want_g = [[p[1][j] - float(gamma) / (2 * B) for p in best] for j in (0, 1)]
    sens_g = [[p[3][j] + float(gamma) / (2 * B) for p in best] for j in (0, 1)]
    ref.assert_close(np.concatenate([g1, g2]), want_g[0] + want_g[1], sens_g[0] + sens_g[1],
                     ROUNDINGS, what)


@functools.cache
def _pdpo(name):
    def loss(h_w, h_l, beta, gamma, where, alpha):
        return pessimistic_dpo_loss(h_w, h_l, beta=beta, gamma=gamma, where=where,
                                    **_kw(name, alpha))
    total = lambda *a: jnp.sum(loss(*a))  # noqa: E731
    return jax.jit(lambda *a: (loss(*a), *jax.grad(total, (0, 1))(*a)))


@pytest.mark.parametrize("name", DIVERGENCES)
@given(h=groups(2, B), where=masks(min_size=B, max_size=B),
       beta=st.sampled_from([1e-3, 0.1, 1.0, 30.0]), gamma=st.sampled_from([0.0, 1e-2, 1.0, 1e3]),
       alpha=alphas, fill=st.sampled_from(GARBAGE))
def test_pessimistic_dpo_matches_mpmath(name, h, where, beta, gamma, alpha, fill):
    """004 eq. 13: f-DPO + gamma * -(h_w + h_l)/2 per example."""
    where, beta, gamma = np.asarray(where), np.float32(beta), np.float32(gamma)
    alpha = _alpha(name, alpha)
    loss, g_w, g_l = _pdpo(name)(*(_with_garbage(x, where, fill) for x in h), beta, gamma,
                                 where, alpha)
    _check_structure(loss, (g_w, g_l), nonnegative=False)
    g = float(gamma)
    for i in range(B):
        if not where[i]:
            assert loss[i] == 0 and g_w[i] == 0 and g_l[i] == 0
            continue
        want = _reference_or_none(ref.group_dpo, name, alpha, beta, [h[0, i]], [h[1, i]])
        if want is None:
            continue
        penalty = -(float(h[0, i]) + float(h[1, i])) / 2
        what = (name, alpha, beta, gamma, h[:, i])
        ref.assert_close(loss[i], want[0] + g * penalty,
                         want[3] + g * (abs(float(h[0, i])) + abs(float(h[1, i]))) / 2,
                         ROUNDINGS, what)
        ref.assert_close([g_w[i], g_l[i]], [want[1][0] - g / 2, want[2][0] - g / 2],
                         [want[4][0] + g / 2, want[5][0] + g / 2], ROUNDINGS, what)


# ----------------------------------------------------------------------------- the rest
@jax.jit
def _closed_forms(h, margin):
    """BT loss and gradient, IPO (tau = 1/4), NLL of -|h| ([2, B] as [B', T])."""
    bt = lambda a: bradley_terry_loss(a, h[1], margin=margin)  # noqa: E731
    return (bt(h[0]), jax.grad(lambda a: jnp.sum(bt(a)))(h[0]), ipo_loss(h[0], h[1], tau=0.25),
            nll_loss(-jnp.abs(h), jnp.ones(h.shape, bool)))


@given(h=groups(2, B), margin=st.sampled_from([0.0, -3e38, 3e38, 1.0]))
def test_bradley_terry_ipo_and_nll_match_mpmath(h, margin):
    """BT, IPO and the NLL term over the whole float32 range: never NaN, inf only beyond
    float32, gradients finite (BT's is bounded by 1)."""
    m = np.float32(margin)
    loss, g, ipo, nll = _closed_forms(h, m)
    gap = [ref._mp(a) - ref._mp(b) - ref._mp(m) for a, b in zip(*h)]
    want = [ref.mpmath.log1p(ref.mpmath.exp(-x)) for x in gap]
    sens = [w + (abs(float(a)) + abs(float(b)) + abs(float(m))) / (1 + ref.mpmath.exp(x))
            for w, x, a, b in zip(want, gap, *h)]  # sigmoid(-gap) per unit of each input
    ref.assert_close(loss, [float(w) for w in want], [float(v) for v in sens], ROUNDINGS)
    assert not np.isnan(g).any() and (np.abs(g) <= 1).all()
    d = [ref._mp(a) - ref._mp(b) - 2 for a, b in zip(*h)]  # IPO: (h_w - h_l - 2)^2
    ref.assert_close(ipo, [float(x * x) for x in d],
                     [float(x * x + 2 * abs(x) * (abs(float(a)) + abs(float(b)) + 2))
                      for x, a, b in zip(d, *h)], ROUNDINGS)
    logps = -np.abs(h)
    ref.assert_close(nll, -np.mean(np.float64(logps), 1), np.mean(np.abs(np.float64(logps)), 1),
                     ROUNDINGS)


# Shapes and dtypes are handled before any divergence-specific code; one divergence of each
# kind of f' (linear in h: reverse KL; a power of u: alpha) covers both code paths after it.
LINEAR_AND_POWER = [("reverse_kl", None), ("alpha", 0.3)]


@pytest.mark.parametrize("name,alpha", LINEAR_AND_POWER)
def test_batch_of_zero_examples(name, alpha):
    """B = 0 works for every family: empty [0] outputs and gradients (0 for the batch
    statistic of eq. 11), no error."""
    kw = dict(divergence=name, alpha=alpha)

    @jax.jit
    def everything(z, g):
        r = jnp.zeros((2, 0))
        return [fdpo_loss(z, z, beta=0.1, **kw),
                jax.grad(lambda a: jnp.sum(fdpo_loss(a, z, beta=0.1, **kw)))(z),
                mdpo_loss(g, g, beta=0.1, **kw), mipo_loss(g, g, tau=0.1, **kw),
                jax.grad(lambda a: jnp.sum(mipo_loss(a, g, tau=0.1, **kw)))(g),
                distill_loss(z, z, z, z, beta=0.1, **kw),
                pessimistic_dpo_loss(z, z, beta=0.1, gamma=0.1, **kw),
                pessimistic_distill_loss(z, z, r, r, beta=0.1, gamma=0.1, **kw)[0],
                diffusion_mdpo_loss(g, g, g, g, beta=0.1)]

    out = everything(jnp.zeros((0,)), jnp.zeros((0, K)))
    assert [o.shape for o in out] == [(0,), (0,), (0,), (0,), (0, K), (0,), (0,), (), (0,)]
    assert float(out[7]) == 0.0


def test_bf16_inputs_give_the_float32_result_of_their_values():
    """bf16 log-ratios (an LM's dtype) are computed in float32: the result equals that of the
    float32 values they hold, and gradients come back in bf16, the float32 ones rounded. The
    conversion happens before any divergence-specific code; each family is run with another
    divergence (mIPO: tests/test_multisample.py::test_bf16_inputs_are_computed_in_float32)."""
    families = (lambda a, b: fdpo_loss(a[:, 0], b[:, 0], beta=0.1, divergence="forward_kl"),
                lambda a, b: mdpo_loss(a, b, beta=0.1, divergence="alpha", alpha=0.3),
                lambda a, b: pessimistic_dpo_loss(a[:, 0], b[:, 0], beta=0.1, gamma=0.5,
                                                  divergence="jsd"),
                lambda a, b: distill_loss(a[:, 0], b[:, 0], a[:, 1], b[:, 1], beta=0.1))

    def run(h):
        return [(fn(h, h[::-1]), jax.grad(lambda a: jnp.sum(fn(a, h[::-1])))(h))
                for fn in families]

    h = jnp.asarray([[0.5, -89.0, 3e38], [-1e4, 0.0, -3e38]], jnp.bfloat16)
    both = jax.jit(lambda h: (run(h), run(h.astype(jnp.float32))))(h)
    for (out16, g16), (out32, g32) in zip(*both):
        assert out16.dtype == jnp.float32 and g16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(out16, out32)
        np.testing.assert_array_equal(np.asarray(g16, np.float32),
                                      np.asarray(g32.astype(jnp.bfloat16), np.float32))


# ----------------------------------------------------------------------------- causal
N_ROWS, NUM_BINS = 10, 3


def _binned_mmd2_64(x, bins, widths, unbiased):
    """float64 brute force of the "sum" reduction (pairs of bins with enough samples)."""
    need = 2 if unbiased else 1
    kept = [m for m in range(NUM_BINS) if np.sum(bins == m) >= need]
    total = 0.0
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            xa, xb = x[bins == a], x[bins == b]
            def mean_k(p, q, skip):
                k = sum(np.exp(-((p[:, None] - q[None]) ** 2).sum(-1) / (2 * s * s))
                        for s in widths)
                if skip:
                    return (k.sum() - np.trace(k)) / (len(p) * (len(p) - 1))
                return k.mean()
            total += mean_k(xa, xa, unbiased) + mean_k(xb, xb, unbiased) - 2 * mean_k(xa, xb, 0)
    return total


@functools.cache
def _binned(unbiased, dim):
    def value(x, bins, where, width):
        return binned_mmd2(x, bins, num_bins=NUM_BINS, bandwidth=(width, 3.0 * width),
                           unbiased=unbiased, where=where)
    return jax.jit(jax.value_and_grad(value))


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dim", [1, 12])  # explicit differences / the centred Gram path
@given(x=st.lists(st.one_of(st.floats(-3, 3, width=32), st.sampled_from([1e4, -1e4, 3e38])),
                  min_size=N_ROWS * 12, max_size=N_ROWS * 12),
       bins=st.lists(st.integers(-1, NUM_BINS - 1), min_size=N_ROWS, max_size=N_ROWS),
       where=masks(min_size=N_ROWS, max_size=N_ROWS), fill=st.sampled_from(GARBAGE),
       width=st.sampled_from([1e-19, 0.3, 1.0, 1e3]))
def test_binned_mmd2_matches_float64_and_ignores_left_out_rows(unbiased, dim, x, bins, where,
                                                               fill, width):
    """Binned MMD^2 (eq. 4.3, §4.5.1) over features up to 3e38 and bandwidths down to 1e-19
    against float64: rows with where=False or bin -1 hold inf / NaN / 3e38 and change nothing;
    value and gradient are finite; the gradient matches float64 central differences."""
    x = np.asarray(x, np.float32).reshape(N_ROWS, 12)[:, :dim]
    bins, where = np.asarray(bins, np.int32), np.asarray(where)
    kept = where & (bins >= 0)
    dirty = np.where(kept[:, None], x, np.float32(fill)).astype(np.float32)
    width = np.float32(width)
    value, grad = _binned(unbiased, dim)(dirty, bins, where, width)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), (value, grad)
    assert np.all(np.asarray(grad)[~kept] == 0.0)
    x64, widths = np.float64(x[kept]), (float(width), 3.0 * float(width))
    want = _binned_mmd2_64(x64, bins[kept], widths, unbiased)
    # kernel entries each within a few ulps, summed with weights <= 1 per pair of bins
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=64 * ref.EPS32)
    if dim == 1 and np.abs(x64).max(initial=0) < 100:  # gradient away from the flat tails
        step = 1e-6 * max(float(width), 1e-3)
        for row in np.flatnonzero(kept)[:3]:
            hi, lo = x64.copy(), x64.copy()
            i = int(np.sum(kept[:row]))
            hi[i] += step
            lo[i] -= step
            fd = (_binned_mmd2_64(hi, bins[kept], widths, unbiased)
                  - _binned_mmd2_64(lo, bins[kept], widths, unbiased)) / (2 * step)
            np.testing.assert_allclose(grad[row, 0], fd, rtol=1e-3,
                                       atol=1e-3 * (1 + abs(fd)) / max(float(width), 1e-3))
