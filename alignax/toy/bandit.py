"""Finite-response ("bandit") toy for f-DPO: exact optima and the population f-DPO loss.

A context has N responses. A policy is a categorical over them, held as logits [N]; the
reference policy is given as log-probabilities [N] and the true reward as r [N]. Everything is
a pure function of one context, so studies `jax.vmap` over contexts, betas, alpha (traced) and
seeds; the divergence *name* is static (a Python string).

- `optimal_policy`: the exact maximiser of E_pi[r] - beta D_f(pi, pi_ref) (thesis §2.5),
  pi* = pi_ref (f')^-1((r - lambda)/beta), lambda found by bisection.
- `population_fdpo_loss`: eq. 2.2 in expectation over response pairs with Bradley-Terry labels
  P(y_i > y_j) = sigmoid(r_i - r_j). Its minimiser is pi* (Theorem 1), which
  `train_fdpo_policy` (gradient descent with optax under `lax.scan`) lets the tests check.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from alignax._checks import as_float32, check_rank, check_same_shape
from alignax.divergences import f_divergence, get_divergence
from alignax.metrics.calibration import predictive_entropy
from alignax.objectives.fdpo import fdpo_loss


class BanditInstance(NamedTuple):
    """One context of the toy: true rewards and reference log-probabilities, both [N]."""

    reward: jax.Array
    ref_logprobs: jax.Array


def random_instance(key: jax.Array, *, num_responses: int, reward_scale: float = 1.0,
                    ref_scale: float = 1.0) -> BanditInstance:
    """Draws r ~ N(0, reward_scale^2) and pi_ref = softmax(N(0, ref_scale^2)), each [N].

    `jax.vmap(lambda k: random_instance(k, num_responses=N))(keys)` gives a batch of contexts.
    """
    reward_key, ref_key = jax.random.split(key)
    reward = reward_scale * jax.random.normal(reward_key, (num_responses,))
    ref_logits = ref_scale * jax.random.normal(ref_key, (num_responses,))
    return BanditInstance(reward, jax.nn.log_softmax(ref_logits))


def _check_instance(reward: jax.Array, ref_logprobs: jax.Array) -> None:
    check_rank("reward", reward, 1)
    check_same_shape(reward=reward, ref_logprobs=ref_logprobs)


def optimal_policy(reward: jax.Array, ref_logprobs: jax.Array, *, beta: float | jax.Array,
                   divergence: str = "reverse_kl", alpha: float | jax.Array | None = None,
                   num_iterations: int = 100) -> jax.Array:
    """log pi* for max_pi E_pi[r] - beta D_f(pi, pi_ref) over the simplex (thesis §2.5, Thm 1).

    The KKT conditions give pi*(y) = pi_ref(y) (f')^-1((r(y) - lambda)/beta) with every
    multiplier of pi(y) >= 0 zero, because 0 is not in dom(f') (proof of Theorem 1, §2.8.7).
    Write lambda = max(r) - beta s, so v(y) = (r(y) - max r)/beta + s. The mass
    G(s) = sum_y pi_ref(y) (f')^-1(v(y)) increases with s. With d = (r - max r)/beta <= 0,
    s = f'(1) makes every v <= f'(1), so G <= 1; s = f'(1) - min d makes every v >= f'(1), so
    G >= 1; and the domain v < sup f' needs s < sup f' (where G -> inf). So the root lies in
    [f'(1), min(f'(1) - min d, sup f')]. Bisection on that bracket runs
    `num_iterations` halvings (float32 reaches adjacent floats well before 100); the result is
    renormalised, which moves it by float32 rounding only.

    Args:
      reward: [N] true rewards r(y).
      ref_logprobs: [N] log pi_ref(y) (finite: Theorem 1 needs pi_ref > 0).
      beta: > 0, may be traced (vmap over betas).
      divergence: "reverse_kl", "forward_kl", "jsd" or "alpha" (static).
      alpha: in (0, 1) for divergence="alpha"; may be traced.
      num_iterations: bisection steps (static).

    Returns:
      [N] float32 log pi*(y).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> r, ref = jnp.array([1.0, 0.0]), jnp.log(jnp.array([0.5, 0.5]))
      >>> [round(float(p), 4) for p in jnp.exp(optimal_policy(r, ref, beta=1.0))]
      [0.7311, 0.2689]
    """
    _check_instance(reward, ref_logprobs)
    div = get_divergence(divergence, alpha=alpha)
    r, log_ref = as_float32(reward), as_float32(ref_logprobs)
    beta = as_float32(beta)
    d = (r - jnp.max(r)) / beta  # [N], <= 0, max 0
    f_prime_one = div.f_prime(jnp.float32(0.0))
    sup = jnp.asarray(div.f_prime_sup, jnp.float32)
    hi = jnp.minimum(f_prime_one - jnp.min(d), sup)  # G(hi) >= 1 (or hi = sup: G -> inf)
    lo = f_prime_one  # G(lo) <= 1

    def log_mass(s):  # log G(s)
        return jax.nn.logsumexp(log_ref + div.f_prime_inverse(d + s))

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        too_much = log_mass(mid) >= 0.0  # G decreasing in lambda, increasing in s
        return jnp.where(too_much, lo, mid), jnp.where(too_much, mid, hi)

    lo, hi = jax.lax.fori_loop(0, num_iterations, halve, (lo, hi))
    log_pi = log_ref + div.f_prime_inverse(d + lo)  # lo keeps v < sup f' strictly
    return log_pi - jax.nn.logsumexp(log_pi)


def bradley_terry_probs(reward: jax.Array) -> jax.Array:
    """[N, N] P(y_i preferred to y_j) = sigmoid(r_i - r_j) (Bradley-Terry, thesis §2.4.1)."""
    r = as_float32(reward)
    return jax.nn.sigmoid(r[:, None] - r[None, :])


def population_fdpo_loss(logits: jax.Array, reward: jax.Array, ref_logprobs: jax.Array, *,
                         beta: float | jax.Array, divergence: str = "reverse_kl",
                         alpha: float | jax.Array | None = None,
                         pair_weights: jax.Array | None = None) -> jax.Array:
    """Expected f-DPO loss (eq. 2.2) of the policy softmax(logits) under Bradley-Terry labels.

    A pair (y_i, y_j) is drawn with probability pair_weights[i, j] (default pi_ref x pi_ref),
    y_i is labelled preferred with probability sigmoid(r_i - r_j), and the loss is
      sum_ij w_ij [sigmoid(r_i - r_j) l(h_i, h_j) + sigmoid(r_j - r_i) l(h_j, h_i)],
    l = `alignax.objectives.fdpo_loss`, h = log pi - log pi_ref. When every off-diagonal weight
    is positive, the unique minimiser over policies is `optimal_policy` (Theorem 1): each pair
    term is a cross-entropy minimised when beta (f'(u_i) - f'(u_j)) = r_i - r_j (eq. 2.1).

    Args:
      logits: [N] policy logits.
      reward: [N] true rewards.
      ref_logprobs: [N] log pi_ref.
      beta, divergence, alpha: as in `fdpo_loss`.
      pair_weights: optional [N, N] non-negative weights summing to 1.

    Returns:
      Scalar float32.
    """
    _check_instance(reward, ref_logprobs)
    check_same_shape(logits=logits, reward=reward)
    n = reward.shape[0]
    log_ref = as_float32(ref_logprobs)
    h = jax.nn.log_softmax(as_float32(logits)) - log_ref  # [N]
    if pair_weights is None:
        ref = jnp.exp(log_ref)
        pair_weights = ref[:, None] * ref[None, :]  # [N, N]
    elif jnp.shape(pair_weights) != (n, n):
        raise ValueError(f"pair_weights must have shape ({n}, {n}), got {jnp.shape(pair_weights)}")
    first = jnp.broadcast_to(h[:, None], (n, n)).reshape(-1)  # [N*N] h_i
    second = jnp.broadcast_to(h[None, :], (n, n)).reshape(-1)  # [N*N] h_j
    loss_first_wins = fdpo_loss(first, second, beta=beta, divergence=divergence, alpha=alpha)
    loss_second_wins = fdpo_loss(second, first, beta=beta, divergence=divergence, alpha=alpha)
    p_first = bradley_terry_probs(reward).reshape(-1)  # [N*N]
    per_pair = p_first * loss_first_wins + (1.0 - p_first) * loss_second_wins
    return jnp.sum(as_float32(pair_weights).reshape(-1) * per_pair)


def train_fdpo_policy(reward: jax.Array, ref_logprobs: jax.Array, *, beta: float | jax.Array,
                 divergence: str = "reverse_kl", alpha: float | jax.Array | None = None,
                 num_steps: int = 2000, learning_rate: float = 0.05,
                 pair_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Gradient descent (Adam, cosine-decayed step) on `population_fdpo_loss` from pi_ref.

    The policy starts at the reference (logits = ref_logprobs, h = 0), as DPO does.

    Args:
      reward, ref_logprobs: [N] the instance.
      beta, divergence, alpha, pair_weights: as in `population_fdpo_loss`.
      num_steps: optimiser steps, run under `lax.scan` (static).
      learning_rate: peak Adam step size (static).

    Returns:
      (log pi [N] of the trained policy, losses [num_steps] before each step).
    """
    _check_instance(reward, ref_logprobs)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))

    def loss_fn(logits):
        return population_fdpo_loss(logits, reward, ref_logprobs, beta=beta,
                                    divergence=divergence, alpha=alpha,
                                    pair_weights=pair_weights)

    def step(carry, _):
        logits, opt_state = carry
        loss, grad = jax.value_and_grad(loss_fn)(logits)
        updates, opt_state = optimizer.update(grad, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), loss

    logits = as_float32(ref_logprobs)
    (logits, _), losses = jax.lax.scan(step, (logits, optimizer.init(logits)), None,
                                       length=num_steps)
    return jax.nn.log_softmax(logits), losses


def expected_reward(logprobs: jax.Array, reward: jax.Array) -> jax.Array:
    """E_pi[r] = sum_y pi(y) r(y); logprobs, reward [N] -> scalar."""
    check_same_shape(logprobs=logprobs, reward=reward)
    return jnp.sum(jnp.exp(as_float32(logprobs)) * as_float32(reward))


def divergence_from_reference(logprobs: jax.Array, ref_logprobs: jax.Array, *,
                              divergence: str = "reverse_kl",
                              alpha: float | jax.Array | None = None) -> jax.Array:
    """D_f(pi, pi_ref) = sum_y pi_ref(y) f(pi(y)/pi_ref(y)) (Table 2.1); [N], [N] -> scalar."""
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return f_divergence(divergence, logprobs, ref_logprobs, alpha=alpha)


def policy_entropy(logprobs: jax.Array) -> jax.Array:
    """Entropy of the policy in nats; [N] -> scalar (`alignax.metrics.predictive_entropy`)."""
    return predictive_entropy(logprobs)


def beta_for_reward(target_reward: float | jax.Array, reward: jax.Array,
                    ref_logprobs: jax.Array, *, divergence: str = "reverse_kl",
                    alpha: float | jax.Array | None = None, log_beta_range=(-8.0, 8.0),
                    num_iterations: int = 40) -> jax.Array:
    """The beta at which the optimum of `divergence` reaches E_pi*[r] = target_reward.

    E_pi*[r] decreases in beta (from max r at beta -> 0 to E_ref[r] at beta -> inf), so
    bisection on log beta within `log_beta_range` finds it; a target outside the reachable
    range returns the nearer end of that range.

    Args:
      target_reward: scalar, strictly between E_ref[r] and max r; may be traced.
      reward, ref_logprobs: [N] the instance.
      divergence, alpha: as in `optimal_policy`.
      log_beta_range: (lo, hi) natural-log bounds of the search (static).
      num_iterations: bisection steps (static).

    Returns:
      Scalar float32 beta.
    """
    _check_instance(reward, ref_logprobs)

    def reward_at(log_beta):
        log_pi = optimal_policy(reward, ref_logprobs, beta=jnp.exp(log_beta),
                                divergence=divergence, alpha=alpha)
        return expected_reward(log_pi, reward)

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        too_greedy = reward_at(mid) > target_reward  # beta too small
        return jnp.where(too_greedy, mid, lo), jnp.where(too_greedy, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_iterations, halve,
                               (jnp.float32(log_beta_range[0]), jnp.float32(log_beta_range[1])))
    return jnp.exp(0.5 * (lo + hi))
