"""Finite-response toys for reward-model distillation (004): theory checks, length-bias study.

Theory (one context, N responses, policies as logits [N]; all pure and vmappable):
- `rlhf_optimum`, `population_distill_loss`, `fit_logits` (L-BFGS under lax.scan): Theorem 1.
- `pessimistic_value` (eq. 8), `hull_pessimistic_optimum` (its exact maximiser, through the
  convex dual over the convex hull of the ensemble): Theorem 2 and where it fails.
- `bow_logprobs`, `bow_dpo_trajectory`: the bag-of-words policy of Propositions 5-6.
- `chain_pairs`, `closure_pairs`: the preference sets of Proposition 7 / Appendix B.

Length-bias study (004 §4.1, Figure 2 and Figure C.1), one jittable function per stage:
- `make_world`: prompts x responses with features, lengths, an oracle reward and pi_ref.
- `sample_preferences`: D_rho, oracle-labelled pairs in which the longer response wins in a
  fraction rho (rho may be traced, so one compilation serves every rho).
- `ensemble_masks` + `train_reward_models`: the reward models r_rho and r_{rho,b}, trained as one
  vmapped optimiser step over stacked parameters [E, D].
- `train_policy`: DPO, IPO, d-DPO, p-DPO, pd-DPO or e-DPO (static `method`), every
  hyper-parameter traced so seeds and sweeps are `jax.vmap`-ed.
- `oracle_advantage`, `best_member_per_example`: the metrics of Figure 2 and Figure C.1.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from alignax._checks import as_float32
from alignax.objectives.distill import (distill_loss, pessimistic_distill_loss,
                                        pessimistic_dpo_loss)
from alignax.objectives.fdpo import fdpo_loss, ipo_loss
from alignax.objectives.reward import bradley_terry_loss
from alignax.schedules import pessimism_schedule

METHODS = ("dpo", "ipo", "d-dpo", "p-dpo", "pd-dpo", "e-dpo")
"""The six policies compared in 004 Figure 2."""

ENSEMBLE_BIASES = (0.2, 0.4, 0.5, 0.6, 0.8)
"""b: fraction of longer-preferred pairs in the e-DPO members' sub-datasets (004 §4.1)."""


# ----------------------------------------------------------------------------- theory toys


def rlhf_optimum(rewards: jax.Array, ref_logprobs: jax.Array, *, beta) -> jax.Array:
    """log of pi_ref exp(r / beta) / Z (004 eq. 3); [..., N], [..., N] -> [..., N]."""
    return jax.nn.log_softmax(as_float32(ref_logprobs) + as_float32(rewards) / beta, axis=-1)


def forward_kl(ref_logprobs: jax.Array, logprobs: jax.Array) -> jax.Array:
    """KL(pi_ref || pi) = sum_y pi_ref (log pi_ref - log pi); [..., N] -> [...]."""
    ref_logprobs = as_float32(ref_logprobs)
    return jnp.sum(jnp.exp(ref_logprobs) * (ref_logprobs - as_float32(logprobs)), axis=-1)


def reverse_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """KL(pi || pi_ref); [..., N] -> [...]."""
    return forward_kl(logprobs, ref_logprobs)


def population_distill_loss(logits: jax.Array, rewards: jax.Array, ref_logprobs: jax.Array, *,
                            beta, pair_weights: jax.Array, divergence: str = "reverse_kl",
                            alpha=None) -> jax.Array:
    """E_rho[distill_loss] (004 eq. 7) of softmax(logits) over pairs (i, j) ~ pair_weights.

    Args:
      logits: [N] policy logits; rewards: [N] target rewards; ref_logprobs: [N].
      pair_weights: [N, N] non-negative weights of the unlabeled pair distribution rho.
      beta, divergence, alpha: as in `alignax.objectives.distill_loss`.

    Returns:
      Scalar float32.
    """
    n = rewards.shape[-1]
    h = jax.nn.log_softmax(as_float32(logits)) - as_float32(ref_logprobs)  # [N]
    first = jnp.broadcast_to(h[:, None], (n, n)).reshape(-1)  # [N*N] h_i
    second = jnp.broadcast_to(h[None, :], (n, n)).reshape(-1)  # [N*N] h_j
    r_first = jnp.broadcast_to(rewards[:, None], (n, n)).reshape(-1)
    r_second = jnp.broadcast_to(rewards[None, :], (n, n)).reshape(-1)
    per_pair = distill_loss(first, second, r_first, r_second, beta=beta, divergence=divergence,
                            alpha=alpha)
    return jnp.sum(as_float32(pair_weights).reshape(-1) * per_pair)


def fit_logits(loss_fn, init_logits: jax.Array, *, num_steps: int = 2000,
               learning_rate: float = 0.05) -> jax.Array:
    """Minimises `loss_fn(logits) -> scalar` with Adam and a cosine-decayed step (lax.scan).

    Plain first-order steps compile in well under a second (L-BFGS's line search takes ~10x
    longer to compile, which dominates these tiny problems); num_steps is static.
    """
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))

    def step(carry, _):
        logits, state = carry
        updates, state = optimizer.update(jax.grad(loss_fn)(logits), state, logits)
        return (optax.apply_updates(logits, updates), state), None

    init_logits = as_float32(init_logits)
    (logits, _), _ = jax.lax.scan(step, (init_logits, optimizer.init(init_logits)), None,
                                  length=num_steps)
    return logits


def pessimistic_value(logprobs: jax.Array, ref_logprobs: jax.Array, rewards: jax.Array, *,
                      beta) -> jax.Array:
    """The pessimistic objective of 004 eq. 8 for one context.

    min_e (E_pi[r_e] - E_ref[r_e]) - beta KL(pi || pi_ref); logprobs, ref_logprobs [N],
    rewards [E, N] -> scalar.
    """
    pi, ref = jnp.exp(as_float32(logprobs)), jnp.exp(as_float32(ref_logprobs))
    advantages = as_float32(rewards) @ (pi - ref)  # [E]
    return jnp.min(advantages) - beta * reverse_kl(logprobs, ref_logprobs)


def hull_dual(weights: jax.Array, ref_logprobs: jax.Array, rewards: jax.Array, *, beta):
    """beta KL(pi_ref || pi_{r_w}) for the mixed reward r_w = sum_e w_e r_e (004 eq. 29).

    The inner max over pi of eq. 8 at a fixed reward r equals this value (proof of Theorem 2);
    it is convex in w, and for any w in the simplex it upper-bounds the value of eq. 8.
    """
    r_w = as_float32(weights) @ as_float32(rewards)  # [N]
    return beta * forward_kl(ref_logprobs, rlhf_optimum(r_w, ref_logprobs, beta=beta))


def hull_pessimistic_optimum(ref_logprobs: jax.Array, rewards: jax.Array, *, beta,
                             num_steps: int = 3000) -> tuple[jax.Array, jax.Array]:
    """Exact maximiser of eq. 8: pi_{r_w*} with w* = argmin over the simplex of `hull_dual`.

    Eq. 8 is concave in pi and linear in r, so by Sion's theorem its max-min equals the min
    over the CONVEX HULL of the ensemble of the inner max, which is `hull_dual`. The paper's
    proof swaps max and min over the finite set S itself; the two agree when w* is a vertex.

    Returns:
      (w* [E], log pi* [N]).
    """
    num_members = rewards.shape[0]

    def dual_of_logits(v):
        return hull_dual(jax.nn.softmax(v), ref_logprobs, rewards, beta=beta)

    v = fit_logits(dual_of_logits, jnp.zeros((num_members,)), num_steps=num_steps)
    w = jax.nn.softmax(v)
    return w, rlhf_optimum(w @ as_float32(rewards), ref_logprobs, beta=beta)


def bow_logprobs(theta: jax.Array, counts: jax.Array) -> jax.Array:
    """Bag-of-words policy log pi(y) = c(y) . theta - n logsumexp(theta) (004 Prop. 5).

    theta [V], counts [..., V] (n = sum of counts) -> [...].
    """
    counts = as_float32(counts)
    return counts @ as_float32(theta) - jnp.sum(counts, -1) * jax.nn.logsumexp(theta)


def bow_dpo_trajectory(counts_w: jax.Array, counts_l: jax.Array, *, beta, learning_rate,
                       num_steps: int) -> jax.Array:
    """Plain gradient descent on DPO for one pair under the bag-of-words policy, theta_0 = 0.

    pi_ref = pi_{theta=0} (004 Prop. 5-6). counts_w, counts_l [V] -> thetas [num_steps + 1, V].
    """
    def loss_fn(theta):
        h = bow_logprobs(theta, jnp.stack([counts_w, counts_l])) - bow_logprobs(
            jnp.zeros_like(theta), jnp.stack([counts_w, counts_l]))  # [2]
        return fdpo_loss(h[:1], h[1:], beta=beta)[0]

    def step(theta, _):
        theta = theta - learning_rate * jax.grad(loss_fn)(theta)
        return theta, theta

    theta0 = jnp.zeros(counts_w.shape, jnp.float32)
    _, thetas = jax.lax.scan(step, theta0, None, length=num_steps)
    return jnp.concatenate([theta0[None], thetas])


def chain_pairs(n: int) -> tuple[jax.Array, jax.Array]:
    """D of Proposition 7: y_i < y_{i+1}, as (winner [n-1], loser [n-1]) indices."""
    losers = jnp.arange(n - 1)
    return losers + 1, losers


def closure_pairs(n: int) -> tuple[jax.Array, jax.Array]:
    """The transitive closure of `chain_pairs(n)`: y_i < y_j for all i < j (n(n-1)/2 pairs)."""
    loser, winner = jnp.triu_indices(n, k=1)
    return winner, loser


# ------------------------------------------------------------------ length-bias study (§4.1)


class World(NamedTuple):
    """P prompts x N responses. features [P, N, D] (last column: standardised length)."""

    features: jax.Array
    lengths: jax.Array  # [P, N] token counts
    oracle: jax.Array  # [P, N] oracle reward r*(x, y)
    ref_logprobs: jax.Array  # [P, N] log pi_ref(y | x), the SFT policy


class Preferences(NamedTuple):
    """Oracle-labelled pairs, long-preferred block first: [n] each."""

    prompt: jax.Array
    chosen: jax.Array
    rejected: jax.Array
    longer_chosen: jax.Array  # bool
    num_longer_chosen: jax.Array  # scalar int: pairs [0, k) have the longer response chosen


def make_world(key: jax.Array, *, num_prompts: int, num_responses: int, num_features: int,
               length_weight: float = 0.5, hidden_weight: float = 1.0,
               ref_temperature: float = 1.0) -> World:
    """A finite-response summarisation analogue with a length-liking oracle.

    Each response has `num_features - 1` observed quality features q ~ N(0, 1), as many hidden
    ones z ~ N(0, 1) and a length L ~ Uniform{8, ..., 64}; l = standardised log L. The oracle
    is r* = u . q + hidden_weight * v . z + length_weight * l with u, v ~ N(0, I / (D - 1)), so
    it prefers longer responses at equal quality, like the TL;DR oracle of 004 §4.1. Policies
    and reward models see only phi = (q, l): part of what the oracle rewards is out of their
    reach, as for real reward models, so a length-biased D_rho can tilt what they learn about
    length (with a fully observed oracle every D_rho is separable by the oracle itself and the
    bias washes out). pi_ref = softmax(N(0, ref_temperature^2)) per prompt, independent of
    quality (an SFT policy that knows nothing of the reward).
    """
    # one normal draw and one integer draw, sliced (each random call site costs compile time)
    k_normal, k_len = jax.random.split(key)
    p, n, q = num_prompts, num_responses, num_features - 1
    sizes = (p * n * q, p * n * q, p * n, q, q)  # quality, hidden, ref logits, u, v
    noise = jax.random.normal(k_normal, (sum(sizes),))
    parts = jnp.split(noise, list(itertools.accumulate(sizes))[:-1])
    quality, hidden = parts[0].reshape(p, n, q), parts[1].reshape(p, n, q)
    ref_logits = parts[2].reshape(p, n)
    u, v = parts[3] / jnp.sqrt(float(q)), parts[4] / jnp.sqrt(float(q))
    lengths = jax.random.randint(k_len, (p, n), 8, 65)
    log_len = jnp.log(lengths.astype(jnp.float32))
    std_len = (log_len - jnp.log(24.0)) / 0.6  # roughly zero-mean, unit-scale
    oracle = quality @ u + hidden_weight * (hidden @ v) + length_weight * std_len
    features = jnp.concatenate([quality, std_len[..., None]], axis=-1)  # [P, N, D]
    ref_logprobs = jax.nn.log_softmax(ref_temperature * ref_logits, axis=-1)
    return World(features, lengths, oracle, ref_logprobs)


def sample_preferences(key: jax.Array, world: World, *, rho, num_pairs: int, train_prompts: int,
                       pool_factor: int = 8) -> Preferences:
    """D_rho: oracle-labelled pairs of pi_ref samples in which the longer response wins in a
    fraction rho (004 §4.1).

    A pool of pool_factor * num_pairs pairs (prompt uniform over the first `train_prompts`,
    both responses drawn from pi_ref) keeps those whose lengths differ by >= 10%; the winner is
    the response with the higher oracle reward. round(rho * num_pairs) pairs are then drawn
    from the longer-wins class and the rest from the shorter-wins class (rho may be traced).
    If a class holds too few pool pairs, pairs are reused (it never happens at the notebook's
    sizes; `longer_chosen` lets the caller check the realised fraction).
    """
    pool = pool_factor * num_pairs
    num_responses = world.ref_logprobs.shape[-1]
    # one uniform draw [pool, 3 + 2N], sliced: prompt, two orderings, Gumbel noise of two samples
    uniform = jax.random.uniform(key, (pool, 3 + 2 * num_responses), minval=1e-7, maxval=1.0)
    prompt = jnp.minimum((uniform[:, 0] * train_prompts).astype(jnp.int32), train_prompts - 1)
    gumbel = -jnp.log(-jnp.log(uniform[:, 3:].reshape(pool, 2, num_responses)))
    pair = jnp.argmax(world.ref_logprobs[prompt][:, None, :] + gumbel, axis=-1)  # [pool, 2]
    a, b = pair[:, 0], pair[:, 1]
    len_a, len_b = world.lengths[prompt, a], world.lengths[prompt, b]
    distinct = jnp.maximum(len_a, len_b) >= 1.1 * jnp.minimum(len_a, len_b)
    a_wins = world.oracle[prompt, a] > world.oracle[prompt, b]
    chosen, rejected = jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)
    longer_chosen = world.lengths[prompt, chosen] > world.lengths[prompt, rejected]

    def order(u, in_class):  # pool indices, members of the class first, in random order
        return jnp.argsort(u + 2.0 * ~in_class)

    long_order = order(uniform[:, 1], distinct & longer_chosen)
    short_order = order(uniform[:, 2], distinct & ~longer_chosen)
    num_long = jnp.round(rho * num_pairs).astype(jnp.int32)
    slot = jnp.arange(num_pairs)
    idx = jnp.where(slot < num_long, long_order[slot],
                    short_order[jnp.clip(slot - num_long, 0, pool - 1)])  # [n]
    return Preferences(prompt[idx], chosen[idx], rejected[idx], longer_chosen[idx], num_long)


def ensemble_masks(num_longer_chosen, num_pairs: int,
                   biases: tuple[float, ...] = ENSEMBLE_BIASES) -> jax.Array:
    """[1 + len(biases), n] weights of the reward models' sub-datasets of D_rho.

    Row 0 is all of D_rho (r_rho of d-DPO / pd-DPO). Row 1 + i is D_{rho, b_i}: the largest
    subset in which the longer response wins in a fraction b_i (004 §4.1), i.e. m = floor(min(
    k / b, (n - k) / (1 - b))) pairs, round(b m) from the long block [0, k) and the rest from
    the short block [k, n) (both blocks are already in random order).
    """
    k = as_float32(num_longer_chosen)
    slot = jnp.arange(num_pairs)
    rows = [jnp.ones((num_pairs,), jnp.float32)]
    for b in biases:
        m = jnp.floor(jnp.minimum(k / b, (num_pairs - k) / (1.0 - b)))
        take_long = jnp.round(b * m)
        take_short = m - take_long
        rows.append(((slot < take_long) | ((slot >= k) & (slot < k + take_short))).astype(
            jnp.float32))
    return jnp.stack(rows)


def _scores(params: jax.Array, features: jax.Array) -> jax.Array:
    """Linear reward model r(x, y) = w . phi(x, y): params [D], features [..., D] -> [...]."""
    return features @ params


def _ensemble_scores(params: jax.Array, features: jax.Array) -> jax.Array:
    """Stacked linear reward models: params [E, D], features [..., D] -> [E, ...]."""
    return jnp.einsum("ed,...d->e...", params, features)


def train_reward_models(world: World, prefs: Preferences, masks: jax.Array, *,
                        num_steps: int, learning_rate: float = 0.05,
                        weight_decay: float = 1e-2) -> jax.Array:
    """Bradley-Terry reward models on the masked sub-datasets, stacked params [E, D].

    One optax step updates all E members at once (`jax.vmap` over the stacked parameters);
    full-batch weighted BT loss plus weight_decay * |w|^2 (strictly convex), Adam from w = 0,
    lax.scan over num_steps. Member e depends only on masks[e].
    """
    phi_w = world.features[prefs.prompt, prefs.chosen]  # [n, D]
    phi_l = world.features[prefs.prompt, prefs.rejected]
    num_members, dim = masks.shape[0], world.features.shape[-1]

    def member_loss(params, mask):
        bt = bradley_terry_loss(_scores(params, phi_w), _scores(params, phi_l))  # [n]
        return jnp.sum(mask * bt) / jnp.maximum(jnp.sum(mask), 1.0) + weight_decay * jnp.sum(
            params ** 2)

    optimizer = optax.adam(learning_rate)
    grads_fn = jax.vmap(jax.grad(member_loss))  # one vmapped step over stacked params

    def step(carry, _):
        params, opt_state = carry
        updates, opt_state = jax.vmap(optimizer.update)(grads_fn(params, masks), opt_state,
                                                        params)
        return (optax.apply_updates(params, updates), opt_state), None

    params = jnp.zeros((num_members, dim), jnp.float32)
    (params, _), _ = jax.lax.scan(step, (params, jax.vmap(optimizer.init)(params)), None,
                                  length=num_steps)
    return params


def policy_logprobs(theta: jax.Array, world: World, prompts: jax.Array) -> jax.Array:
    """log pi_theta(. | x), pi_theta ∝ pi_ref exp(theta . phi); theta [D], prompts [M] -> [M, N]."""
    return jax.nn.log_softmax(world.ref_logprobs[prompts] + world.features[prompts] @ theta,
                              axis=-1)


class Hyper(NamedTuple):
    """Traced hyper-parameters of `train_policy` (vmap over them for sweeps)."""

    beta: jax.Array  # DPO / distillation strength
    tau: jax.Array  # IPO regularisation (target margin 1 / (2 tau))
    gamma_scale: jax.Array  # multiplies the 1e-4 -> 1e-2 pessimism schedule


def _objective(method: str, h_w, h_l, r_w, r_l, hyper: Hyper, gamma):
    """Mini-batch loss and per-example arg-min member for one method (004 §4.1)."""
    no_member = jnp.full(h_w.shape, -1, jnp.int32)
    if method == "dpo":
        return jnp.mean(fdpo_loss(h_w, h_l, beta=hyper.beta)), no_member
    if method == "ipo":
        return jnp.mean(ipo_loss(h_w, h_l, tau=hyper.tau)), no_member
    if method == "d-dpo":
        return jnp.mean(distill_loss(h_w, h_l, r_w[0], r_l[0], beta=hyper.beta)), no_member
    if method == "p-dpo":
        return jnp.mean(pessimistic_dpo_loss(h_w, h_l, beta=hyper.beta, gamma=gamma)), no_member
    if method in ("pd-dpo", "e-dpo"):
        members = slice(0, 1) if method == "pd-dpo" else slice(1, None)
        loss, aux = pessimistic_distill_loss(h_w, h_l, r_w[members], r_l[members],
                                             beta=hyper.beta, gamma=gamma)
        return loss, aux["per_example_member"]
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def train_policy(method: str, key: jax.Array, world: World, prefs: Preferences,
                 reward_params: jax.Array, hyper: Hyper, *, num_steps: int, batch_size: int,
                 learning_rate: float = 0.05) -> jax.Array:
    """Trains pi_theta ∝ pi_ref exp(theta . phi) on D_rho with one of `METHODS` -> theta [D].

    Mini-batches of `batch_size` pairs (drawn with fold_in(key, step)); the pessimistic min
    over reward models is taken per mini-batch (004 footnote 2) and gamma follows
    gamma_scale * `pessimism_schedule(num_steps)` (004 §4.1). reward_params [1 + B, D]: row 0
    is r_rho (d-DPO, pd-DPO), rows 1.. the ensemble r_{rho, b} (e-DPO). Adam from theta = 0
    (pi_theta = pi_ref). method is static; everything in `hyper` may be traced.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    schedule = pessimism_schedule(num_steps)
    optimizer = optax.adam(learning_rate)
    num_pairs = prefs.prompt.shape[0]

    def loss_fn(theta, idx, step):
        prompts = prefs.prompt[idx]
        logp = policy_logprobs(theta, world, prompts)  # [b, N]
        h = logp - world.ref_logprobs[prompts]
        rows = jnp.arange(idx.shape[0])
        h_w, h_l = h[rows, prefs.chosen[idx]], h[rows, prefs.rejected[idx]]
        r_w = _ensemble_scores(reward_params, world.features[prompts, prefs.chosen[idx]])  # [E, b]
        r_l = _ensemble_scores(reward_params, world.features[prompts, prefs.rejected[idx]])
        gamma = hyper.gamma_scale * schedule(step)
        return _objective(method, h_w, h_l, r_w, r_l, hyper, gamma)[0]

    def step(carry, step_index):
        theta, opt_state = carry
        idx = jax.random.randint(jax.random.fold_in(key, step_index), (batch_size,), 0,
                                 num_pairs)
        grad = jax.grad(loss_fn)(theta, idx, step_index)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        return (optax.apply_updates(theta, updates), opt_state), None

    theta = jnp.zeros((world.features.shape[-1],), jnp.float32)
    (theta, _), _ = jax.lax.scan(step, (theta, optimizer.init(theta)), jnp.arange(num_steps))
    return theta


def oracle_advantage(theta: jax.Array, world: World, prompts: jax.Array) -> jax.Array:
    """Mean over prompts of E_{pi_theta}[r*] - E_{pi_ref}[r*] (the y-axis of 004 Figure 2)."""
    logp = policy_logprobs(theta, world, prompts)  # [M, N]
    oracle = world.oracle[prompts]
    ref = jnp.exp(world.ref_logprobs[prompts])
    return jnp.mean(jnp.sum((jnp.exp(logp) - ref) * oracle, axis=-1))


def best_member_per_example(theta: jax.Array, world: World, prefs: Preferences,
                            reward_params: jax.Array, *, beta) -> jax.Array:
    """[n] int32: for each pair of D_rho, the ensemble member r_{rho,b} (rows 1.. of
    reward_params) whose distillation loss against the policy's implicit reward is smallest
    (004 §4.2 / Figure C.1)."""
    rows = jnp.arange(prefs.prompt.shape[0])
    h = policy_logprobs(theta, world, prefs.prompt) - world.ref_logprobs[prefs.prompt]
    h_w, h_l = h[rows, prefs.chosen], h[rows, prefs.rejected]
    r_w = _ensemble_scores(reward_params[1:], world.features[prefs.prompt, prefs.chosen])  # [B, n]
    r_l = _ensemble_scores(reward_params[1:], world.features[prefs.prompt, prefs.rejected])
    _, aux = pessimistic_distill_loss(h_w, h_l, r_w, r_l, beta=beta, gamma=0.0)
    return aux["per_example_member"]


def bootstrap_interval(values: jax.Array, key: jax.Array, *, num_resamples: int = 1000,
                       level: float = 0.95) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, lo, hi): percentile bootstrap interval of the mean over the last axis [..., S]."""
    num = values.shape[-1]
    idx = jax.random.randint(key, (num_resamples, num), 0, num)
    means = jnp.mean(values[..., idx], axis=-1)  # [..., R]
    tail = (1.0 - level) / 2.0
    return (jnp.mean(values, -1), jnp.quantile(means, tail, axis=-1),
            jnp.quantile(means, 1.0 - tail, axis=-1))


class StudyConfig(NamedTuple):
    """Sizes of the length-bias study (static). Prompts [0, train) give D_rho; the next `val`
    prompts select hyper-parameters; the rest are the test set of Figure 2."""

    num_prompts: int = 96
    train_prompts: int = 32
    val_prompts: int = 32
    num_responses: int = 16
    num_features: int = 8
    length_weight: float = 0.5
    hidden_weight: float = 1.5
    num_pairs: int = 256
    reward_steps: int = 300
    policy_steps: int = 400
    batch_size: int = 32


def prepare_study(key: jax.Array, rho, *, config: StudyConfig):
    """World, D_rho and the reward models [1 + len(ENSEMBLE_BIASES), D] for one seed and rho.

    Named key purposes: 0 world, 1 pairs (3 is the policy's, in `evaluate_method`). rho may be
    traced (vmap over rho values).
    """
    k_world, k_pairs = (jax.random.fold_in(key, i) for i in range(2))
    world = make_world(k_world, num_prompts=config.num_prompts,
                       num_responses=config.num_responses, num_features=config.num_features,
                       length_weight=config.length_weight, hidden_weight=config.hidden_weight)
    prefs = sample_preferences(k_pairs, world, rho=rho, num_pairs=config.num_pairs,
                               train_prompts=config.train_prompts)
    masks = ensemble_masks(prefs.num_longer_chosen, config.num_pairs)
    reward_params = train_reward_models(world, prefs, masks, num_steps=config.reward_steps)
    return world, prefs, reward_params


def evaluate_method(method: str, key: jax.Array, world: World, prefs: Preferences,
                    reward_params: jax.Array, hypers: Hyper, *, config: StudyConfig):
    """Trains `method` at every hyper-parameter setting (vmapped) and scores it.

    Returns a dict of: "val", "test" [H] oracle advantages over pi_ref on the validation and
    test prompts; "members" [H, n] the best-matching ensemble member per pair of D_rho
    (Figure C.1; computed for every method, meaningful for e-DPO).
    """
    val = jnp.arange(config.train_prompts, config.train_prompts + config.val_prompts)
    test = jnp.arange(config.train_prompts + config.val_prompts, config.num_prompts)
    k_policy = jax.random.fold_in(key, 3)

    def one(hyper):
        theta = train_policy(method, k_policy, world, prefs, reward_params, hyper,
                             num_steps=config.policy_steps, batch_size=config.batch_size)
        return {"val": oracle_advantage(theta, world, val),
                "test": oracle_advantage(theta, world, test),
                "members": best_member_per_example(theta, world, prefs, reward_params,
                                                   beta=hyper.beta)}

    return jax.vmap(one)(hypers)
