"""Theory checks on the finite-response toy (thesis ch. 2): Theorem 1, Theorem 2, alpha limits.

Every jitted function below is built once at module level with fixed shapes; betas, alphas and
instances are traced (vmapped), so each divergence name compiles once.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.divergences import f_divergence, get_divergence
from alignax.metrics.calibration import ece_difference_bounds, stochastic_ece
from alignax.toy import bandit

N = 6
NUM_INSTANCES = 4
BETAS = jnp.array([0.3, 1.0, 3.0])
DIVERGENCES = [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.3),
               ("alpha", 0.7)]
INSTANCES = jax.vmap(lambda k: bandit.random_instance(k, num_responses=N))(
    jax.random.split(jax.random.key(20261122), NUM_INSTANCES))


def _tv(log_p, log_q):
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


@functools.cache
def _optimum_and_trained(name: str):
    """jit(vmap over instances x betas) of (optimal_policy, train_fdpo_policy); alpha is traced."""

    def one(reward, ref, beta, alpha):
        alpha = alpha if name == "alpha" else None
        optimum = bandit.optimal_policy(reward, ref, beta=beta, divergence=name, alpha=alpha)
        trained, losses = bandit.train_fdpo_policy(reward, ref, beta=beta, divergence=name,
                                              alpha=alpha, num_steps=1500, learning_rate=0.05)
        return optimum, trained, losses

    over_betas = jax.vmap(one, in_axes=(None, None, 0, None))
    return jax.jit(jax.vmap(over_betas, in_axes=(0, 0, None, None)))


@functools.cache
def _optimum(name: str):
    """jit of optimal_policy for one instance; beta and alpha traced."""

    def one(reward, ref, beta, alpha):
        return bandit.optimal_policy(reward, ref, beta=beta, divergence=name,
                                     alpha=alpha if name == "alpha" else None)

    return jax.jit(one)


# --- Theorem 1 -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_gradient_descent_on_population_fdpo_recovers_optimal_policy(name, alpha):
    """Theorem 1: the minimiser of the population f-DPO loss (eq. 2.2) is pi* of §2.5."""
    optimum, trained, losses = _optimum_and_trained(name)(
        INSTANCES.reward, INSTANCES.ref_logprobs, BETAS, jnp.float32(alpha or 0.5))
    tv = _tv(optimum, trained)  # [instances, betas]
    assert float(jnp.max(tv)) < 1e-3, tv
    # Not trivially satisfied: the optimum is far from the reference start, relative to tv.
    moved = _tv(optimum, INSTANCES.ref_logprobs[:, None, :])
    assert bool(jnp.all(tv < 0.01 * moved)), (tv, moved)
    assert bool(jnp.all(losses[..., -1] < losses[..., 0]))


def _numpy_f_prime_inverse(name, alpha, v):
    """(f')^-1(v) in float64 from Table 2.1 (not through alignax.divergences)."""
    if name == "reverse_kl":
        return np.exp(v - 1.0)  # f' = log u + 1
    if name == "forward_kl":
        return -1.0 / v  # f' = -1/u
    if name == "jsd":
        return np.exp(v) / (2.0 - np.exp(v))  # f' = log(2u/(1+u))
    return (1.0 - alpha * v) ** (-1.0 / alpha)  # f' = (1 - u^-a)/a


def _numpy_optimal_policy(name, alpha, reward, ref_logprobs, beta):
    """float64 reference: bisection on lambda of sum pi_ref (f')^-1((r - lambda)/beta) = 1."""
    r, ref = np.asarray(reward, np.float64), np.exp(np.asarray(ref_logprobs, np.float64))
    sup = {"reverse_kl": np.inf, "forward_kl": 0.0, "jsd": np.log(2.0)}.get(name)
    sup = 1.0 / alpha if sup is None else sup
    lo = r.max() - beta * sup if np.isfinite(sup) else r.min() - 10.0 * beta - 10.0
    hi = r.max() + 10.0 * beta + 10.0

    def mass(lam):
        return np.sum(ref * _numpy_f_prime_inverse(name, alpha, (r - lam) / beta))

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) > 1.0 else (lo, mid)
    pi = ref * _numpy_f_prime_inverse(name, alpha, (r - hi) / beta)
    return pi / pi.sum()


@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_optimal_policy_matches_float64_reference(name, alpha):
    for i in range(NUM_INSTANCES):
        for beta in (0.05, 0.3, 1.0, 3.0, 30.0):
            got = _optimum(name)(INSTANCES.reward[i], INSTANCES.ref_logprobs[i], beta,
                                 jnp.float32(alpha or 0.5))
            want = _numpy_optimal_policy(name, alpha, INSTANCES.reward[i],
                                         INSTANCES.ref_logprobs[i], beta)
            np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)), want, atol=2e-6)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), log_beta=st.floats(-4.0, 4.0))
def test_reverse_kl_optimum_is_the_closed_form(seed, log_beta):
    """Reverse KL: pi* = softmax(log pi_ref + r / beta) (DPO, Rafailov et al. 2023)."""
    reward, ref = bandit.random_instance(jax.random.key(seed), num_responses=N, reward_scale=2.0)
    beta = float(np.exp(log_beta))
    got = _optimum("reverse_kl")(reward, ref, beta, jnp.float32(0.5))
    want = jax.nn.log_softmax(ref + reward / beta)
    np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-6)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), log_beta=st.floats(-4.0, 4.5),
                  which=st.sampled_from(DIVERGENCES), alpha=st.floats(0.05, 0.95))
def test_optimal_policy_satisfies_kkt_stationarity(seed, log_beta, which, alpha):
    """r(y) - beta f'(pi*(y)/pi_ref(y)) = lambda for every y (proof of Theorem 1, eq. 2.1)."""
    name, _ = which
    reward, ref = bandit.random_instance(jax.random.key(seed), num_responses=N, reward_scale=2.0)
    beta = float(np.exp(log_beta))
    log_pi = _optimum(name)(reward, ref, beta, jnp.float32(alpha))
    assert abs(float(jnp.sum(jnp.exp(log_pi))) - 1.0) < 1e-6
    assert bool(jnp.all(jnp.isfinite(log_pi)))
    div = get_divergence(name, alpha=alpha if name == "alpha" else None)
    multiplier = reward - beta * div.f_prime(log_pi - ref)  # [N], constant in y
    spread = float(jnp.max(multiplier) - jnp.min(multiplier))
    # float32: log pi carries ~1e-7 absolute error, amplified by beta through f'.
    assert spread < 2e-5 * (1.0 + float(jnp.max(jnp.abs(reward)))) + 2e-6 * beta, spread


@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_large_beta_gives_the_reference(name, alpha):
    reward, ref = INSTANCES.reward[0], INSTANCES.ref_logprobs[0]
    distances = [float(_tv(_optimum(name)(reward, ref, beta, jnp.float32(alpha or 0.5)), ref))
                 for beta in (1.0, 10.0, 100.0, 1e4)]
    assert all(b < a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 1e-4, distances


def test_alpha_limits_tend_to_reverse_and_forward_kl():
    """alpha -> 0: reverse-KL optimum; alpha -> 1: forward-KL optimum; error ~ linear."""
    alphas = jnp.array([1e-1, 1e-2, 1e-3])
    over_alpha = jax.vmap(_optimum("alpha"), in_axes=(None, None, None, 0))
    for i in range(NUM_INSTANCES):
        reward, ref = INSTANCES.reward[i], INSTANCES.ref_logprobs[i]
        for beta in (0.3, 3.0):
            rkl = _optimum("reverse_kl")(reward, ref, beta, jnp.float32(0.5))
            fkl = _optimum("forward_kl")(reward, ref, beta, jnp.float32(0.5))
            to_rkl = np.asarray(_tv(over_alpha(reward, ref, beta, alphas), rkl))
            to_fkl = np.asarray(_tv(over_alpha(reward, ref, beta, 1.0 - alphas), fkl))
            for err in (to_rkl, to_fkl):
                # each 10x step of alpha (or 1 - alpha) shrinks the error about 10x
                assert np.all(err[1:] < 0.2 * err[:-1]), err
                assert err[-1] < 1e-3, err


def test_expected_reward_decreases_in_beta_and_beta_for_reward_matches_it():
    reward, ref = INSTANCES.reward[1], INSTANCES.ref_logprobs[1]
    for name, alpha in DIVERGENCES:
        rewards = [float(bandit.expected_reward(_optimum(name)(reward, ref, beta,
                                                               jnp.float32(alpha or 0.5)), reward))
                   for beta in (0.1, 0.3, 1.0, 3.0, 10.0)]
        assert all(b < a for a, b in zip(rewards, rewards[1:])), (name, rewards)
        target = 0.5 * (float(bandit.expected_reward(ref, reward)) + float(jnp.max(reward)))
        beta = jax.jit(functools.partial(bandit.beta_for_reward, divergence=name, alpha=alpha))(
            target, reward, ref)
        reached = bandit.expected_reward(_optimum(name)(reward, ref, beta,
                                                        jnp.float32(alpha or 0.5)), reward)
        assert abs(float(reached) - target) < 1e-4, (name, float(beta), float(reached), target)


# --- population loss ---------------------------------------------------------------------------

def _numpy_population_loss(name, alpha, logits, reward, ref_logprobs, beta):
    """float64 loop over ordered pairs of eq. 2.2 under Bradley-Terry labels, pi_ref x pi_ref."""
    logits, r = np.asarray(logits, np.float64), np.asarray(reward, np.float64)
    log_ref = np.asarray(ref_logprobs, np.float64)
    log_pi = logits - np.log(np.sum(np.exp(logits)))
    u = np.exp(log_pi - log_ref)
    f_prime = {"reverse_kl": lambda u: np.log(u) + 1.0, "forward_kl": lambda u: -1.0 / u,
               "jsd": lambda u: np.log(2.0 * u / (1.0 + u)),
               "alpha": lambda u: (1.0 - u ** (-alpha)) / alpha}[name]

    def nll(i, j):  # -log sigmoid(beta (f'(u_i) - f'(u_j)))
        return np.log1p(np.exp(-beta * (f_prime(u[i]) - f_prime(u[j]))))

    total = 0.0
    for i in range(len(r)):
        for j in range(len(r)):
            p_i = 1.0 / (1.0 + np.exp(r[j] - r[i]))
            total += np.exp(log_ref[i] + log_ref[j]) * (p_i * nll(i, j) + (1 - p_i) * nll(j, i))
    return total


@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_population_loss_matches_float64_reference(name, alpha):
    logits = jax.random.normal(jax.random.key(3), (N,))
    reward, ref = INSTANCES.reward[2], INSTANCES.ref_logprobs[2]
    got = jax.jit(functools.partial(bandit.population_fdpo_loss, beta=0.7, divergence=name,
                                    alpha=alpha))(logits, reward, ref)
    want = _numpy_population_loss(name, alpha, logits, reward, ref, 0.7)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_population_loss_is_stationary_at_the_optimum_for_any_pair_weights(name, alpha):
    """Theorem 1 does not depend on which pairs are compared, as long as all of them can be."""
    reward, ref = INSTANCES.reward[3], INSTANCES.ref_logprobs[3]
    optimum = bandit.optimal_policy(reward, ref, beta=1.0, divergence=name, alpha=alpha)
    pi_ref = jnp.exp(ref)
    weights = jnp.stack([pi_ref[:, None] * pi_ref[None, :], jnp.full((N, N), 1.0 / N**2)])

    @jax.jit
    def grads(logits):  # [2 weightings, N]
        return jax.vmap(lambda w: jax.grad(bandit.population_fdpo_loss)(
            logits, reward, ref, beta=1.0, divergence=name, alpha=alpha, pair_weights=w))(weights)

    at_optimum, at_start = grads(optimum), grads(ref)
    scale = jnp.max(jnp.abs(at_start), axis=-1)  # [2]
    assert bool(jnp.all(jnp.max(jnp.abs(at_optimum), axis=-1) < 1e-5 * scale + 1e-6)), at_optimum


def test_bad_inputs_raise():
    reward, ref = INSTANCES.reward[0], INSTANCES.ref_logprobs[0]
    with pytest.raises(ValueError, match="shape mismatch"):
        bandit.optimal_policy(reward, ref[:3], beta=1.0)
    with pytest.raises(ValueError, match="total_variation"):
        bandit.optimal_policy(reward, ref, beta=1.0, divergence="total_variation")
    with pytest.raises(ValueError, match="chi_squared"):
        bandit.population_fdpo_loss(ref, reward, ref, beta=1.0, divergence="chi_squared")
    with pytest.raises(ValueError, match="pair_weights"):
        bandit.population_fdpo_loss(ref, reward, ref, beta=1.0, pair_weights=jnp.ones((N, 2)))
    with pytest.raises(ValueError, match="rank 1"):
        bandit.optimal_policy(reward[None], ref[None], beta=1.0)


def test_policy_statistics():
    reward, ref = INSTANCES.reward[0], INSTANCES.ref_logprobs[0]
    p, q = np.exp(np.asarray(ref, np.float64)), np.full(N, 1.0 / N)
    np.testing.assert_allclose(float(bandit.expected_reward(ref, reward)),
                               np.sum(p * np.asarray(reward, np.float64)), rtol=1e-6)
    np.testing.assert_allclose(float(bandit.policy_entropy(ref)), -np.sum(p * np.log(p)), rtol=1e-6)
    kl = bandit.divergence_from_reference(jnp.log(jnp.asarray(q, jnp.float32)), ref)
    np.testing.assert_allclose(float(kl), np.sum(q * np.log(q / p)), rtol=1e-5)


# --- Theorem 2 ---------------------------------------------------------------------------------

def _random_pairs(key, *, contexts, closeness):
    """Random policies pi_1, pi_2 (pi_2 a perturbation of pi_1 of size `closeness`) and truth."""
    k1, k2, k3 = jax.random.split(key, 3)
    logits_1 = 2.0 * jax.random.normal(k1, (contexts, N))
    logits_2 = logits_1 + closeness * jax.random.normal(k2, (contexts, N))
    truth = jax.nn.softmax(2.0 * jax.random.normal(k3, (contexts, N)))
    return jax.nn.softmax(logits_1), jax.nn.softmax(logits_2), truth


@jax.jit
def _ece_differences_and_bounds(keys, closeness):
    """For each key: (ECE(pi_1) - ECE(pi_2), bounds) for both orders of a random pair."""

    def one(key):
        p1, p2, truth = _random_pairs(key, contexts=8, closeness=closeness)
        out = []
        for a, b in ((p1, p2), (p2, p1)):
            out.append((stochastic_ece(a, truth) - stochastic_ece(b, truth),
                        ece_difference_bounds(a, b, truth)))
        return out

    return jax.vmap(one)(keys)


@pytest.mark.parametrize("closeness", [0.01, 0.3, 3.0])
def test_theorem2_ece_difference_is_below_each_bound_of_the_proof(closeness):
    keys = jax.random.split(jax.random.key(7), 64)
    for diff, bounds in _ece_differences_and_bounds(keys, closeness):
        slack = 1e-6
        chain = [diff, bounds["inner"], bounds["l1_m"], bounds["tv"]]
        for lower, upper in zip(chain, chain[1:]):
            assert bool(jnp.all(lower <= upper + slack)), (chain, bounds)
        for divergence_bound in ("kl_12", "kl_21", "jsd"):  # Remarks 1-2
            assert bool(jnp.all(bounds["tv"] <= bounds[divergence_bound] + slack)), bounds
        assert float(jnp.max(jnp.abs(diff))) > 0.0  # the ECEs do differ


def test_theorem2_bounds_vanish_for_identical_policies():
    """With pi_1 = pi_2 every bound is 0, so the ECEs must agree exactly. The bounds are 0
    exactly, on any backend: |pi_1 - pi_2| is 0, and KL / JS are formed as p log1p(t) with
    t = (p - q)/q, (p1 - p2)/(p1 + p2) exactly 0 (JS through rel_entr(p, (p + p)/2) and a
    square root was 3.3e-4 on CPUs with AVX-512)."""
    p1, _, truth = _random_pairs(jax.random.key(0), contexts=8, closeness=0.0)
    bounds = jax.jit(ece_difference_bounds)(p1, p1, truth)
    assert all(float(v) == 0.0 for v in bounds.values()), bounds


@hypothesis.given(seed=st.integers(0, 2**31 - 1), sharpness=st.floats(0.1, 30.0))
def test_pinsker_and_jensen_shannon_inequalities_float64(seed, sharpness):
    """The psi_f used in Remarks 1-2, in nats: TV <= sqrt(KL/2) (Pinsker), TV <= sqrt(2 JS)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(N, 1.0 / sharpness))
    q = rng.dirichlet(np.full(N, 1.0 / sharpness))
    p, q = np.clip(p, 1e-300, None), np.clip(q, 1e-300, None)
    tv = 0.5 * np.sum(np.abs(p - q))
    kl = np.sum(p * np.log(p / q))
    m = 0.5 * (p + q)
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert tv <= np.sqrt(kl / 2.0) + 1e-12
    assert tv <= np.sqrt(2.0 * js) + 1e-12


def test_table_2_1_jsd_is_twice_jensen_shannon():
    """The f-divergence "jsd" of Table 2.1 is KL(p||m) + KL(q||m) = 2 JS (ece_difference_bounds
    states Remark 1 with the usual JS)."""
    p1, p2, _ = _random_pairs(jax.random.key(1), contexts=8, closeness=1.0)
    mid = 0.5 * (p1 + p2)
    js = 0.5 * jnp.sum(p1 * jnp.log(p1 / mid) + p2 * jnp.log(p2 / mid), axis=-1)
    table = f_divergence("jsd", jnp.log(p1), jnp.log(p2))
    np.testing.assert_allclose(np.asarray(table), 2.0 * np.asarray(js), rtol=1e-4, atol=1e-7)
