"""Propositions 1-2 and Remark 1 of thesis ch. 3 on simulated groups (exact or within CIs).

Monte Carlo assertions use fixed seeds and 5-sigma bands, so they test the theorem, not luck.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.objectives import mipo_loss
from alignax.toy.multisample import (sum_win_probability_discrete, sum_win_probability_gamma,
                                     sum_win_probability_normal)

N_MAX, M_MAX = 3, 5
C = 0.7  # the constant of Prop. 1: tau = 1/(2c)


@jax.jit
def _both(fp, fq, mp, mq):
    kw = dict(tau=0.5 / C, chosen_mask=mp, rejected_mask=mq)
    return mipo_loss(fp, fq, unbiased=True, **kw), mipo_loss(fp, fq, unbiased=False, **kw)


# (sampler, mean, variance) in float64; f(x) = x is folded into the distribution.
DISTRIBUTIONS = {
    "normal": (lambda rng, s: rng.normal(1.0, 2.0, s), 1.0, 4.0),
    "exponential": (lambda rng, s: rng.exponential(1.5, s), 1.5, 2.25),
    "bernoulli3": (lambda rng, s: 3.0 * (rng.random(s) < 0.3), 0.9, 9 * 0.21),
    "uniform": (lambda rng, s: rng.uniform(-1.0, 2.0, s), 0.5, 0.75),
    "gamma": (lambda rng, s: rng.gamma(0.5, 2.0, s), 1.0, 2.0),
}
PAIRS = [("normal", "exponential", 3, 5), ("bernoulli3", "uniform", 2, 5),
         ("gamma", "normal", 3, 2), ("exponential", "bernoulli3", 2, 3)]
TRIALS = 200_000


@pytest.mark.parametrize("p,q,n,m", PAIRS)
def test_proposition_1_unbiased_and_the_exact_bias_of_the_plain_estimator(p, q, n, m):
    (sp, mu_p, var_p), (sq, mu_q, var_q) = DISTRIBUTIONS[p], DISTRIBUTIONS[q]
    rng = np.random.default_rng(hash((p, q)) % 2**32)
    fp = np.zeros((TRIALS, N_MAX), np.float32)
    fq = np.zeros((TRIALS, M_MAX), np.float32)
    fp[:, :n], fq[:, :m] = sp(rng, (TRIALS, n)), sq(rng, (TRIALS, m))
    mp = np.broadcast_to(np.arange(N_MAX) < n, fp.shape)
    mq = np.broadcast_to(np.arange(M_MAX) < m, fq.shape)
    unbiased, biased = (np.asarray(v, np.float64) for v in _both(fp, fq, mp, mq))
    target = (mu_p - mu_q - C) ** 2
    se = unbiased.std(ddof=1) / np.sqrt(TRIALS)
    assert abs(unbiased.mean() - target) < 5 * se, (unbiased.mean(), target, se)
    # The plain estimator is off by exactly sigma_p^2/n + sigma_q^2/m in expectation ...
    bias = var_p / n + var_q / m
    se_b = biased.std(ddof=1) / np.sqrt(TRIALS)
    assert abs(biased.mean() - target - bias) < 5 * se_b, (biased.mean() - target, bias)
    # ... and per draw it differs from the unbiased one by s_p^2/n + s_q^2/m (float64 check).
    x, y = fp[:, :n].astype(np.float64), fq[:, :m].astype(np.float64)
    correction = x.var(axis=1, ddof=1) / n + y.var(axis=1, ddof=1) / m
    np.testing.assert_allclose(biased - unbiased, correction, rtol=1e-3, atol=1e-4)


K_GRID = np.array([4, 8, 16, 32, 64, 128])


@jax.jit
def _variance_curve(fp, fq):
    def at(k):
        mask = jnp.broadcast_to(jnp.arange(fp.shape[1]) < k, fp.shape)
        return mipo_loss(fp, fq, tau=0.5 / C, chosen_mask=mask, rejected_mask=mask)
    return jax.vmap(at)(jnp.asarray(K_GRID))  # [len(K_GRID), T]


@pytest.mark.parametrize("gap,slope", [(1.0, -1.0), (0.0, -2.0)])
def test_proposition_2_variance_decays_as_one_over_k(gap, slope):
    """Var = O((s^2/k)(s^2/k + d^2)), d = mu_p - mu_q - c: slope -1 when d != 0; when d = 0
    the bound itself is O(1/k^2), which the fit shows too."""
    rng = np.random.default_rng(3)
    trials = 20_000
    fp = rng.normal(C + gap, 1.0, (trials, K_GRID[-1])).astype(np.float32)
    fq = rng.exponential(1.0, (trials, K_GRID[-1])).astype(np.float32) - 1.0  # mean 0, var 1
    variance = np.asarray(_variance_curve(fp, fq), np.float64).var(axis=1, ddof=1)
    fitted = np.polyfit(np.log(K_GRID[2:]), np.log(variance[2:]), 1)[0]
    assert abs(fitted - slope) < 0.12, (fitted, variance)
    if gap:  # delta method: leading term 4 d^2 (s_p^2 + s_q^2) / k, here 8 / k
        np.testing.assert_allclose(variance[-1] * K_GRID[-1], 4 * gap**2 * (1.0 + 1.0), rtol=0.1)


def test_remark_1_normal_is_monotone_and_tends_to_one():
    k = np.arange(1, 201)
    p = sum_win_probability_normal(k, mean_x=0.5, std_x=1.0, mean_y=0.0, std_y=2.0)
    assert np.all(np.diff(p) > 0) and p[-1] > 0.99
    # Monte Carlo agrees with the closed form
    rng = np.random.default_rng(0)
    for kk in (1, 5, 25):
        x = rng.normal(0.5, 1.0, (100_000, kk)).sum(1)
        y = rng.normal(0.0, 2.0, (100_000, kk)).sum(1)
        assert abs(np.mean(x > y) - p[kk - 1]) < 5 * np.sqrt(p[kk - 1] * (1 - p[kk - 1]) / 1e5)


@pytest.mark.parametrize("shape_x,shape_y", [(1.2, 1.0), (0.5, 0.3), (3.0, 2.5)])
def test_remark_1_gamma_sums_are_monotone_in_k(shape_x, shape_y):
    """Continuous, skewed, same scale: P(Beta(k a_x, k a_y) > 1/2), exact in float64."""
    p = sum_win_probability_gamma(np.arange(1, 101), shape_x=shape_x, shape_y=shape_y)
    assert np.all(np.diff(p) > 0) and p[0] > 0.5


def test_remark_1_is_only_approximate_for_skewed_discrete_laws():
    """X = +1 (0.9) / -5 (0.1), Y = 0: E X = 0.4 > 0, yet P(sum X > 0) falls from 0.9 while a
    single -5 outweighs the +1s, ties at k = 6 make it dip again, and it tends to 1 later."""
    law = dict(values_x=[1, -5], probs_x=[0.9, 0.1], values_y=[0], probs_y=[1.0])
    p = [sum_win_probability_discrete(k, **law)[0] for k in range(1, 8)]
    np.testing.assert_allclose(p[:6], [0.9 ** k for k in range(1, 7)], rtol=1e-12)
    assert sum_win_probability_discrete(6, **law)[1] == pytest.approx(6 * 0.9**5 * 0.1)
    np.testing.assert_allclose(p[6], 0.9**7 + 7 * 0.9**6 * 0.1, rtol=1e-12)
    assert sum_win_probability_discrete(400, **law)[0] > 0.99


def test_remark_1_ties_break_monotonicity_of_the_strict_win():
    """X in {0, 2} (0.4, 0.6), Y = 1: sums tie only at even k, so the strict win oscillates."""
    law = dict(values_x=[0, 2], probs_x=[0.4, 0.6], values_y=[1], probs_y=[1.0])
    (p1, t1), (p2, t2), (p3, t3) = (sum_win_probability_discrete(k, **law) for k in (1, 2, 3))
    assert (p1, t1) == pytest.approx((0.6, 0.0))
    assert (p2, t2) == pytest.approx((0.36, 0.48))  # down: half of the mass now ties
    assert (p3, t3) == pytest.approx((0.648, 0.0))
    assert p2 + t2 / 2 == pytest.approx(p1)  # counting ties as 1/2 removes the dip here


def test_unbiased_mipo_is_unbounded_below_on_a_fixed_data_set():
    """Issue 14: the unbiased estimator (Prop. 1) is unbounded below on a fixed data set when
    the policy can fit individual responses. Spreading a group's members (h_1, h_2) = (m + s,
    m - s) leaves the mean difference alone and subtracts var/K = s^2: the loss is
    (m - c)^2 - s^2 exactly, while the plain (biased) estimator stays (m - c)^2 >= 0. Gradient
    descent on a 10-arm policy (one logit per response, uniform reference) follows it down."""
    spreads = jnp.array([0.0, 1.0, 10.0, 100.0])
    chosen = jnp.stack([0.3 + spreads, 0.3 - spreads], -1)  # [4, 2]
    unbiased, biased = _both(chosen, jnp.zeros((4, 2)), jnp.ones((4, 2), bool),
                             jnp.ones((4, 2), bool))
    h = np.asarray(chosen, np.float64)  # the float32 inputs exactly
    d, s2 = h.mean(-1) - C, h.var(-1, ddof=1) / 2
    np.testing.assert_allclose(unbiased, d ** 2 - s2, rtol=1e-6)
    np.testing.assert_allclose(biased, d ** 2, rtol=1e-6)
    assert float(unbiased[-1]) < -9999.0

    arms_w, arms_l = np.array([[0, 1], [2, 3], [4, 5]]), np.array([[6, 7], [8, 9], [0, 9]])

    @functools.partial(jax.jit, static_argnums=0)
    def descend(unbiased_flag):
        def loss(logits):
            h = jax.nn.log_softmax(logits) + jnp.log(10.0)  # log pi - log pi_ref, uniform ref
            return jnp.mean(mipo_loss(h[arms_w], h[arms_l], tau=0.5 / C, unbiased=unbiased_flag))

        def step(logits, _):
            return logits - 0.5 * jax.grad(loss)(logits), loss(logits)
        return jax.lax.scan(step, jnp.zeros(10), None, length=40)[1]

    path = descend(True)  # gradient descent, step 0.5: no bound is ever reached
    assert bool(jnp.all(jnp.diff(path) < 0)) and float(path[-1]) < -1e3, path
    assert float(jnp.min(descend(False))) >= 0.0
