"""PPO on the finite-response toy converges to the exact regularised optimum (thesis §2.5),
which pins the divergence conventions of `alignax.rl.penalties`; PPO(reward) with the thesis'
penalty f(u)/u does not for JS, forward KL and alpha, and the test measures why (§2.8.1).

One instance, beta = 2, 3 seeds vmapped; one compilation per divergence and penalty form serves
both placements (`placement_study`: `beta_reward` / `beta_loss` are traced).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.rl.bandit import PLACEMENTS, BanditPPOConfig, placement_study
from alignax.rl.penalties import PenaltyConfig
from alignax.toy.bandit import optimal_policy, random_instance

BETA = 2.0
SEEDS = 3
INSTANCE = random_instance(jax.random.key(3), num_responses=6)
DIVERGENCES = [("reverse_kl", None), ("jsd", None), ("forward_kl", None), ("alpha", 0.5)]
TOLERANCE = 0.01  # total variation to the optimum


def total_variation(log_p, log_q):
    return 0.5 * np.abs(np.exp(np.asarray(log_p)) - np.exp(np.asarray(log_q))).sum(-1)


@functools.cache
def optimum(divergence, alpha):
    return optimal_policy(INSTANCE.reward, INSTANCE.ref_logprobs, beta=BETA,
                          divergence=divergence, alpha=alpha)


@functools.cache
def runs(divergence, alpha, reward_penalty):
    """{placement: (log pi [SEEDS, N], history)} for PPO(reward) and PPO(loss)."""
    config = BanditPPOConfig(penalty=PenaltyConfig(divergence, alpha,
                                                   reward_penalty=reward_penalty),
                             num_iterations=150, batch_size=128, learning_rate=0.1)
    study = jax.jit(functools.partial(placement_study, INSTANCE.reward, INSTANCE.ref_logprobs,
                                      beta=BETA, config=config))
    log_pi, history = jax.device_get(study(keys=jax.random.split(jax.random.key(0), SEEDS)))
    return {placement: (log_pi[i], jax.tree.map(lambda x: x[i], history))
            for i, placement in enumerate(PLACEMENTS)}


def test_the_optima_differ_enough_to_pin_the_divergence():
    # The test below could not tell the divergences (or their directions) apart otherwise.
    ref = INSTANCE.ref_logprobs
    for divergence, alpha in DIVERGENCES:
        assert total_variation(optimum(divergence, alpha), ref) > 0.15
    assert total_variation(optimum("forward_kl", None), optimum("reverse_kl", None)) > 0.05
    assert total_variation(optimum("jsd", None), optimum("reverse_kl", None)) > 0.1


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_ppo_loss_reaches_the_optimum(divergence, alpha):
    log_pi, _ = runs(divergence, alpha, "f_over_u")["loss"]
    tv = total_variation(log_pi, optimum(divergence, alpha))
    assert (tv < TOLERANCE).all(), tv


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_ppo_reward_with_the_f_prime_penalty_reaches_the_optimum(divergence, alpha):
    form = "f_over_u" if divergence == "reverse_kl" else "f_prime"  # identical for reverse KL
    log_pi, history = runs(divergence, alpha, form)["reward"]
    tv = total_variation(log_pi, optimum(divergence, alpha))
    assert (tv < TOLERANCE).all(), tv
    assert np.abs(history["penalty_max"]).max() < 5.0  # f'(u) - f'(1) stays in a small range


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES[1:])
def test_ppo_reward_with_the_thesis_penalty_collapses(divergence, alpha):
    # §2.8.1: with r - beta f(u)/u as a frozen reward, a response whose probability falls gets
    # a larger penalty (d(f(u)/u)/d pi < 0 below the reference), so it falls further: the policy
    # collapses onto few responses, min pi -> 0, and the penalty of the rare samples of the
    # vanishing responses explodes (forward KL: t log t with t = pi_ref/pi -> inf), while the
    # f'(u) - f'(1) penalty of the same divergence stays bounded.
    log_pi, history = runs(divergence, alpha, "f_over_u")["reward"]
    best, _ = runs(divergence, alpha, "f_prime")["reward"]
    tv = total_variation(log_pi, optimum(divergence, alpha))
    assert (tv > 0.3).all(), tv
    optimum_min = float(jnp.exp(jnp.min(optimum(divergence, alpha))))
    assert (history["min_prob"][:, -1] < 1e-3 * optimum_min).all()
    assert (history["penalty_max"].max(-1) > 1e3).all(), history["penalty_max"].max(-1)
    assert (total_variation(best, optimum(divergence, alpha)) < TOLERANCE).all()
