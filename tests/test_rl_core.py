"""alignax.rl's pure pieces: the §2.8.2 estimator under samples of the policy, the penalty
conventions of §2.6.1 / §2.8.1, GAE against a float64 NumPy reference, PPO's losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.divergences import f_divergence, get_divergence
from alignax.rl.advantages import (explained_variance, gae, group_advantages, masked_mean,
                                   masked_whiten)
from alignax.rl.config import PPOConfig, RolloutConfig
from alignax.rl.kl_control import KLControllerConfig, update_coef
from alignax.rl.losses import clipped_surrogate, clipped_value_loss
from alignax.rl.penalties import (PenaltyConfig, divergence_estimate, loss_penalty,
                                  reward_penalty)
from alignax.rl.step import normalize_scores, prepare_batch

DIVERGENCES = [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.5),
               ("alpha", 0.2)]
N = 12  # responses of the finite distributions


def finite_pair(seed: int, *, scale: float = 1.0):
    """log pi, log pi_ref over N responses; log-ratios have std ~ scale."""
    rng = np.random.default_rng(seed)
    ref = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 1, N), jnp.float32))
    pi = jax.nn.log_softmax(ref + scale * jnp.asarray(rng.normal(0, 1, N), jnp.float32))
    return pi, ref


# ---------------------------------------------------------------- conventions (§2.6.1, §2.8.1)

def test_reward_penalties_are_the_thesis_formulas_in_t():
    # §2.8.1: r_RKL = r + beta log t, r_JS = r - beta (t log t - (t+1) log((t+1)/2)),
    # r_FKL = r - beta t log t with t = pi_ref / pi; here phi(h) at h = log(pi / pi_ref).
    h = np.linspace(-4.0, 4.0, 17)
    t = np.exp(-h)
    thesis = {"reverse_kl": -np.log(t), "jsd": t * np.log(t) - (t + 1) * np.log((t + 1) / 2),
              "forward_kl": t * np.log(t)}
    for name, want in thesis.items():
        got = reward_penalty(PenaltyConfig(name), jnp.asarray(h, jnp.float32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_mean_penalty_under_the_policy_is_the_f_dpo_divergence(divergence, alpha):
    # E_pi[f(u)/u] = E_ref[f(u)] = D_f(pi, pi_ref), the divergence f-DPO's `divergence` is.
    pi, ref = finite_pair(0)
    config = PenaltyConfig(divergence, alpha)
    mean = jnp.sum(jnp.exp(pi) * reward_penalty(config, pi - ref))
    np.testing.assert_allclose(mean, f_divergence(divergence, pi, ref, alpha=alpha), rtol=1e-5)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_f_prime_penalty_has_the_divergence_gradient_as_its_score_function_gradient(divergence,
                                                                                   alpha):
    # E_pi[phi grad log pi] = grad D_f(pi, pi_ref) for phi = f'(u) - f'(1), w.r.t. the logits.
    pi, ref = finite_pair(1)
    config = PenaltyConfig(divergence, alpha, reward_penalty="f_prime")
    logits = pi
    phi = jax.lax.stop_gradient(reward_penalty(config, pi - ref))
    score_gradient = jax.grad(lambda z: jnp.sum(jnp.exp(pi) * phi * jax.nn.log_softmax(z)))(logits)
    exact = jax.grad(lambda z: f_divergence(divergence, jax.nn.log_softmax(z), ref,
                                            alpha=alpha))(logits)
    np.testing.assert_allclose(score_gradient, exact, rtol=1e-4, atol=1e-6)
    if divergence == "reverse_kl":  # both penalties are log u, the usual per-token KL
        np.testing.assert_allclose(phi, reward_penalty(PenaltyConfig(divergence), pi - ref),
                                   rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- §2.8.2 estimator, RL setting

@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_estimator_is_unbiased_from_policy_samples(divergence, alpha):
    pi, ref = finite_pair(2)
    config = PenaltyConfig(divergence, alpha)
    exact = float(f_divergence(divergence, pi, ref, alpha=alpha))
    terms = divergence_estimate(config, pi - ref)  # [N], one per response
    np.testing.assert_allclose(jnp.sum(jnp.exp(pi) * terms), exact, rtol=1e-5)  # expectation
    samples = jax.random.categorical(jax.random.key(0), pi, shape=(200_000,))
    draws = np.float64(terms[samples])
    half_width = 4.0 * draws.std() / np.sqrt(draws.size)  # 4 sigma: a 6e-5 two-sided tail
    assert abs(draws.mean() - exact) < half_width, (draws.mean(), exact, half_width)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_loss_penalty_is_unbiased_in_value_and_gradient_from_old_policy_samples(divergence,
                                                                                alpha):
    # PPO(loss) after some updates: samples from pi_old, current policy pi != pi_old. The
    # expected term equals D_f(pi, pi_ref) and the expected gradient grad D_f(pi, pi_ref).
    old, ref = finite_pair(3)
    logits = old + 0.3 * jnp.asarray(np.random.default_rng(3).normal(0, 1, N), jnp.float32)
    config = PenaltyConfig(divergence, alpha, placement="loss")

    def expected_term(z):
        return jnp.sum(jnp.exp(old) * loss_penalty(config, jax.nn.log_softmax(z), old, ref))

    def exact(z):
        return f_divergence(divergence, jax.nn.log_softmax(z), ref, alpha=alpha)

    np.testing.assert_allclose(expected_term(logits), exact(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(expected_term)(logits), jax.grad(exact)(logits),
                               rtol=1e-4, atol=1e-6)
    # At pi = pi_old its value is the §2.8.2 estimator from samples of pi.
    np.testing.assert_allclose(loss_penalty(config, old, old, ref),
                               divergence_estimate(config, old - ref), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_estimator_has_lower_variance_than_the_naive_one_near_the_reference(divergence, alpha):
    # Regime: log-ratios of std ~0.1 (a policy near its reference, as PPO keeps it). Exact
    # variances under pi of the naive per-sample f(u)/u and of the §2.8.2 terms: the control
    # variate removes the O(h) part, so the variance drops from O(h^2) to O(h^4). JS and alpha
    # have f'(1) = 0 in Table 2.1 (their generators are centred already): there the two coincide
    # and the naive terms are O(h^2) already.
    pi, ref = finite_pair(4, scale=0.1)
    p = np.float64(jnp.exp(pi))
    config = PenaltyConfig(divergence, alpha)

    def variance(terms):
        terms = np.float64(terms)
        return p @ terms**2 - (p @ terms) ** 2

    naive = variance(reward_penalty(config, pi - ref))
    estimator = variance(divergence_estimate(config, pi - ref))
    if float(config.div.f_prime(0.0)) == 0.0:
        np.testing.assert_allclose(estimator, naive, rtol=1e-4)
        assert naive < 0.01 * variance(pi - ref)  # O(h^4) against the O(h^2) of h itself
    else:
        assert estimator < 0.01 * naive, (estimator, naive)


def test_penalties_are_finite_for_extreme_log_ratios():
    h = jnp.array([-200.0, -80.0, -1e-6, 0.0, 1e-6, 80.0, 200.0])
    for divergence, alpha in DIVERGENCES:
        for form in ("f_over_u", "f_prime"):
            config = PenaltyConfig(divergence, alpha, reward_penalty=form)
            assert not bool(jnp.any(jnp.isnan(reward_penalty(config, h))))
        value, grad = jax.vmap(jax.value_and_grad(
            lambda x: loss_penalty(PenaltyConfig(divergence, alpha), x, -3.0, -3.0 - x)))(h)
        assert not bool(jnp.any(jnp.isnan(value) | jnp.isnan(grad))), (divergence, value, grad)


def test_penalty_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="placement must be one of"):
        PenaltyConfig(placement="critic")
    with pytest.raises(ValueError, match="level must be one of"):
        PenaltyConfig(level="prompt")
    with pytest.raises(ValueError, match="needs alpha"):
        PenaltyConfig("alpha")
    with pytest.raises(ValueError, match="not admissible"):
        PenaltyConfig("chi_squared")


# ---------------------------------------------------------------- GAE on ragged rollouts

def np_gae(rewards, values, lengths, gamma, lam):
    """float64 loop over each row's first `length` tokens; the episode ends after them."""
    advantages, returns = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b, length in enumerate(lengths):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(length)):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t]
            advantages[b, t], returns[b, t] = next_advantage, next_advantage + values[b, t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.0), (0.99, 0.7)])
def test_gae_matches_float64_on_ragged_rows_and_ignores_garbage_padding(gamma, lam):
    rng = np.random.default_rng(0)
    b, t = 6, 9
    lengths = np.array([9, 1, 4, 0, 7, 2])  # EOS at different steps, one empty row
    mask = np.arange(t)[None, :] < lengths[:, None]
    rewards, values = rng.normal(0, 1, (2, b, t)).astype(np.float32)
    want = np_gae(np.float64(rewards), np.float64(values), lengths, gamma, lam)
    run = jax.jit(lambda r, v, m: gae(r, v, m, gamma=gamma, lam=lam))
    got = run(rewards, values, mask)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    garbage = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)
    noisy = [np.where(mask, x, garbage[rng.integers(0, 4, x.shape)]) for x in (rewards, values)]
    for g, w in zip(run(*noisy, mask), got):
        np.testing.assert_array_equal(g, w)


def test_masked_statistics_ignore_padding():
    x = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, 5.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    assert float(masked_mean(x, mask)) == pytest.approx(2.0)
    white = masked_whiten(x, mask)
    np.testing.assert_allclose(white[mask], (np.array([1, 2, 3]) - 2) / np.sqrt(2 / 3), rtol=1e-6)
    assert (white[~mask] == 0).all()
    assert float(explained_variance(x, x, mask)) == pytest.approx(1.0)


def test_group_advantages_rloo_and_grpo():
    scores = np.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], np.float32)  # two groups of three
    rloo = group_advantages(scores, group_size=3, baseline="rloo")
    np.testing.assert_allclose(rloo, [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0],
                               rtol=1e-6)
    grpo = group_advantages(scores, group_size=3, baseline="grpo")
    groups = scores.reshape(2, 3)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(grpo, want.reshape(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="group_size must be >= 2 and divide the batch"):
        group_advantages(scores, group_size=4)


# ---------------------------------------------------------------- losses and KL control

def test_clipped_surrogate_and_value_loss_against_numpy():
    rng = np.random.default_rng(5)
    logps, old, adv = rng.normal(0, 0.3, (3, 4, 5)).astype(np.float32)
    loss, aux = clipped_surrogate(logps, old, adv, clip_epsilon=0.2)
    ratio = np.exp(np.float64(logps) - old)
    want = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux["clipped"], np.abs(ratio - 1) > 0.2)
    np.testing.assert_allclose(aux["approx_kl"], ratio - 1 - np.log(ratio), rtol=1e-4, atol=1e-7)
    values, old_values, returns = rng.normal(0, 1, (3, 4, 5)).astype(np.float32)
    clipped = old_values + np.clip(values - old_values, -0.5, 0.5)
    want = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    np.testing.assert_allclose(clipped_value_loss(values, old_values, returns, clip_range=0.5),
                               want, rtol=1e-6)
    # Gradients flow only where the ratio is unclipped on the pessimistic side.
    grad = jax.grad(lambda lp: jnp.sum(clipped_surrogate(lp, old, adv, clip_epsilon=0.2)[0]))(
        logps)
    active = np.where(adv >= 0, ratio < 1.2, ratio > 0.8)
    np.testing.assert_allclose(grad, np.where(active, -ratio * adv, 0.0), rtol=1e-5, atol=1e-7)


def test_surrogate_is_finite_for_extreme_ratios():
    logps = jnp.array([[-300.0, 300.0, 0.0]])
    loss, aux = clipped_surrogate(logps, jnp.zeros_like(logps), jnp.array([[-1.0, -1.0, 1.0]]),
                                  clip_epsilon=0.2)
    grad = jax.grad(lambda lp: jnp.sum(clipped_surrogate(
        lp, jnp.zeros_like(lp), jnp.array([[-1.0, -1.0, 1.0]]), clip_epsilon=0.2)[0]))(logps)
    assert bool(jnp.all(jnp.isfinite(loss)) & jnp.all(jnp.isfinite(grad)))


def test_adaptive_controller_follows_ziegler_and_fixed_stays():
    config = KLControllerConfig(init_coef=0.1, target=6.0, horizon=10000)
    coef = 0.1
    for kl, n in [(12.0, 512), (6.0, 512), (1.0, 512)]:
        want = coef * (1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * n / 10000)
        coef = float(update_coef(config, coef, kl, n))
        assert coef == pytest.approx(want, rel=1e-6)
    assert float(update_coef(KLControllerConfig(init_coef=0.1), 0.1, 100.0, 512)) == \
        pytest.approx(0.1)
    with pytest.raises(ValueError, match="target must be > 0"):
        KLControllerConfig(target=0.0)


def test_alpha_penalty_interpolates_between_the_kls():
    # alpha -> 0 is reverse KL and alpha -> 1 forward KL (Table 2.1's convention), up to the
    # mean-zero term f'(1)(u - 1) that the centred alpha generator lacks: in the limits its
    # per-sample penalty f(u)/u tends to the KLs' §2.8.2 terms.
    h = jnp.linspace(-2.0, 2.0, 9)
    for alpha, limit in ((1e-4, "reverse_kl"), (1 - 1e-4, "forward_kl")):
        np.testing.assert_allclose(reward_penalty(PenaltyConfig("alpha", alpha), h),
                                   divergence_estimate(PenaltyConfig(limit), h),
                                   rtol=2e-3, atol=2e-3)
    assert get_divergence("alpha", alpha=0.3).conjugate().alpha == pytest.approx(0.7)


# ---------------------------------------------------------------- rollout batch -> advantages

def test_running_reward_moments_match_numpy_over_batches():
    config = PPOConfig(reward_normalization="running", reward_clip=1.5)
    rng = np.random.default_rng(7)
    batches = [rng.normal(3.0, 2.0, n).astype(np.float32) for n in (8, 5, 11)]
    moments = jnp.zeros(3, jnp.float32)
    for i, scores in enumerate(batches):
        processed, moments = normalize_scores(config, jnp.asarray(scores), moments)
        seen = np.concatenate(batches[:i + 1]).astype(np.float64)
        np.testing.assert_allclose(moments, [seen.size, seen.mean(), ((seen - seen.mean())**2)
                                             .sum()], rtol=1e-5)
        want = np.clip((scores - seen.mean()) / seen.std(), -1.5, 1.5)
        np.testing.assert_allclose(processed, want, rtol=1e-4, atol=1e-5)
    batch_config = PPOConfig(reward_normalization="batch")
    processed, _ = normalize_scores(batch_config, jnp.asarray(batches[0]), jnp.zeros(3))
    np.testing.assert_allclose(processed, (batches[0] - batches[0].mean()) / batches[0].std(),
                               rtol=1e-4, atol=1e-5)


def rollout_batch(seed=0, *, rows=4, length=5):
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 2, 3, 1])[:rows]
    mask = np.arange(length)[None, :] < lengths[:, None]
    old, ref = rng.normal(-2.0, 0.5, (2, rows, length)).astype(np.float32)
    return {"response_mask": mask, "old_logps": np.where(mask, old, 0.0),
            "ref_logps": np.where(mask, ref, 0.0),
            "old_values": np.where(mask, rng.normal(0, 1, (rows, length)), 0.0).astype(
                np.float32),
            "scores": rng.normal(0, 1, rows).astype(np.float32)}, lengths


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_ppo_reward_places_the_score_and_the_penalty(level, divergence):
    batch, lengths = rollout_batch()
    penalty = PenaltyConfig(divergence, level=level)
    config = PPOConfig(penalty=penalty, gamma=1.0, lam=1.0, whiten_advantages=False)
    prepared, _, metrics = prepare_batch(config, batch, jnp.float32(0.3), jnp.zeros(3))
    h = np.float64(batch["old_logps"] - batch["ref_logps"])
    rewards = np.zeros(h.shape)
    for b, n in enumerate(lengths):  # the score on the last token, penalties per token / row
        rewards[b, n - 1] = batch["scores"][b]
        if level == "token":
            rewards[b, :n] -= 0.3 * np.float64(reward_penalty(penalty, h[b, :n]))
        else:
            rewards[b, n - 1] -= 0.3 * float(reward_penalty(penalty, h[b, :n].sum()))
    advantages, returns = np_gae(rewards, np.float64(batch["old_values"]), lengths, 1.0, 1.0)
    np.testing.assert_allclose(prepared["advantages"], advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prepared["returns"], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["kl"], np.mean([h[b, :n].sum() for b, n in
                                                       enumerate(lengths)]), rtol=1e-5)


def test_ppo_loss_keeps_the_reward_and_grpo_broadcasts_group_advantages():
    batch, lengths = rollout_batch(1)
    config = PPOConfig(penalty=PenaltyConfig("jsd", placement="loss"), advantage="grpo",
                       rollout=RolloutConfig(samples_per_prompt=2), whiten_advantages=False)
    prepared, _, metrics = prepare_batch(config, batch, jnp.float32(0.3), jnp.zeros(3))
    groups = batch["scores"].reshape(2, 2)  # no penalty in the reward under PPO(loss)
    per_row = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
               ).reshape(-1)
    np.testing.assert_allclose(prepared["advantages"],
                               np.where(batch["response_mask"], per_row[:, None], 0.0),
                               rtol=1e-5, atol=1e-6)
    assert metrics["return"] == pytest.approx(batch["scores"].mean(), rel=1e-6)
