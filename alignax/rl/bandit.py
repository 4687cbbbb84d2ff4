"""PPO on the finite-response toy (`alignax.toy.bandit`): a tabular policy over N responses.

One context, responses y in {0..N-1}, a policy softmax(logits [N]) started at pi_ref and a
scalar critic (the value of the context). Each iteration samples `batch_size` responses from
the current policy, scores them with the true reward r[y] (plus optional Gaussian noise), and
runs the same PPO pieces as the language-model trainer on one-token episodes: the penalty of
`alignax.rl.penalties` in the reward or the loss, `gae`, `clipped_surrogate`,
`clipped_value_loss`, several epochs of shuffled minibatches, Adam with a cosine-decayed step.
Its fixed point can be compared with `alignax.toy.bandit.optimal_policy`, the exact maximiser
of E_pi[r] - beta D_f(pi, pi_ref). The placement is given by the two traced coefficients
`beta_reward` (PPO(reward)) and `beta_loss` (PPO(loss)): set one of them to 0. Everything is a
pure function of (instance, key, coefficients), so one compilation per divergence serves both
placements, seeds and betas under `jax.vmap`; the config (divergence, reward_penalty) is static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from alignax._checks import as_float32, check_rank, check_same_shape
from alignax.rl.advantages import gae
from alignax.rl.losses import clipped_surrogate, clipped_value_loss
from alignax.rl.penalties import PenaltyConfig, loss_penalty, reward_penalty


@dataclasses.dataclass(frozen=True)
class BanditPPOConfig:
    """Static settings of `train_bandit_ppo` (hashable: one compilation per config).

    Attributes:
      penalty: the divergence and PPO(reward)'s penalty form (`PenaltyConfig`; its placement
        is ignored: `beta_reward` / `beta_loss` decide, and its level is moot for one token).
      num_iterations: rollout batches.
      batch_size: responses sampled per iteration.
      epochs, minibatches: PPO passes over each batch and minibatches per pass.
      learning_rate: peak Adam step of the policy logits and the critic (cosine decay to 0).
      clip_epsilon: PPO's ratio clip.
      value_clip: the critic's clip range (None: unclipped).
      reward_noise: std of Gaussian noise added to each sampled reward (0: exact rewards).
    """

    penalty: PenaltyConfig = PenaltyConfig()
    num_iterations: int = 400
    batch_size: int = 256
    epochs: int = 4
    minibatches: int = 4
    learning_rate: float = 0.05
    clip_epsilon: float = 0.2
    value_clip: float | None = None
    reward_noise: float = 0.0

    def __post_init__(self):
        if self.batch_size % self.minibatches:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of minibatches "
                             f"{self.minibatches}")


def train_bandit_ppo(reward: jax.Array, ref_logprobs: jax.Array, *, key: jax.Array,
                     beta_reward: float | jax.Array = 0.0, beta_loss: float | jax.Array = 0.0,
                     config: BanditPPOConfig = BanditPPOConfig()
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO with an f-divergence penalty on one context of the finite-response toy.

    Args:
      reward: [N] true rewards.
      ref_logprobs: [N] log pi_ref (finite).
      key: PRNG key (sampling, noise, minibatch order).
      beta_reward: coefficient of the penalty in the reward, PPO(reward) (may be traced).
      beta_loss: coefficient of the divergence loss term, PPO(loss) (may be traced).
      config: static settings.

    Returns:
      (log pi [N] after training, history of [num_iterations] float32 arrays:
       "penalty_mean", "penalty_std", "penalty_min", "penalty_max": phi(h) of PPO(reward)'s
       penalty over each batch (computed for either placement), "min_prob": min_y pi(y) at the
       start of each iteration).
    """
    check_rank("reward", reward, 1)
    check_same_shape(reward=reward, ref_logprobs=ref_logprobs)
    reward, ref_logprobs = as_float32(reward), as_float32(ref_logprobs)
    penalty, batch = config.penalty, config.batch_size
    minibatch = batch // config.minibatches
    num_updates = config.num_iterations * config.epochs * config.minibatches
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, num_updates))

    def loss_fn(params, rows):
        logits, value = params
        logps = jax.nn.log_softmax(logits)[rows["y"]][:, None]  # [M, 1]
        surrogate, _ = clipped_surrogate(logps, rows["old_logps"], rows["advantages"],
                                         clip_epsilon=config.clip_epsilon)
        values = jnp.broadcast_to(value, logps.shape)
        loss = jnp.mean(surrogate) + jnp.mean(clipped_value_loss(
            values, rows["old_values"], rows["returns"], clip_range=config.value_clip))
        divergence = jnp.mean(loss_penalty(penalty, logps, rows["old_logps"], rows["ref_logps"]))
        return loss + beta_loss * divergence  # PPO(loss): beta D_f as its own term (§2.6.1)

    def update(carry, rows):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, rows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def iteration(carry, index):
        params, opt_state = carry
        logits, value = params
        sample_key, noise_key, order_key = jax.random.split(jax.random.fold_in(key, index), 3)
        log_pi = jax.nn.log_softmax(logits)
        y = jax.random.categorical(sample_key, logits, shape=(batch,))  # [B]
        old_logps, ref_logps = log_pi[y][:, None], ref_logprobs[y][:, None]  # [B, 1]
        scores = reward[y] + config.reward_noise * jax.random.normal(noise_key, (batch,))
        phi = reward_penalty(penalty, old_logps - ref_logps)  # [B, 1]
        rewards = scores[:, None] - beta_reward * phi  # PPO(reward) (§2.6.1)
        old_values = jnp.broadcast_to(value, (batch, 1))
        advantages, returns = gae(rewards, old_values, jnp.ones((batch, 1), bool), gamma=1.0,
                                  lam=1.0)
        rows = {"y": y, "old_logps": old_logps, "ref_logps": ref_logps,
                "advantages": advantages, "old_values": old_values, "returns": returns}
        orders = jax.vmap(lambda k: jax.random.permutation(k, batch))(
            jax.random.split(order_key, config.epochs))  # [epochs, B]
        order = orders.reshape(config.epochs * config.minibatches, minibatch)
        minibatches = jax.tree.map(lambda x: x[order], rows)  # [epochs * M, B/M, ...]
        (params, opt_state), _ = jax.lax.scan(update, (params, opt_state), minibatches)
        stats = {"penalty_mean": jnp.mean(phi), "penalty_std": jnp.std(phi),
                 "penalty_min": jnp.min(phi), "penalty_max": jnp.max(phi),
                 "min_prob": jnp.exp(jnp.min(log_pi))}
        return (params, opt_state), stats

    params = (ref_logprobs, jnp.zeros((), jnp.float32))  # policy starts at the reference
    (params, _), history = jax.lax.scan(iteration, (params, optimizer.init(params)),
                                        jnp.arange(config.num_iterations))
    return jax.nn.log_softmax(params[0]), history


PLACEMENTS = ("reward", "loss")


def placement_study(reward: jax.Array, ref_logprobs: jax.Array, *, keys: jax.Array,
                    beta: float | jax.Array, config: BanditPPOConfig = BanditPPOConfig()
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO(reward) and PPO(loss) at one beta, over seeds, in one vmapped computation.

    Args:
      reward, ref_logprobs: [N] the instance.
      keys: [S] PRNG keys, one run per key and placement.
      beta: the penalty coefficient of both placements.
      config: static settings (divergence and PPO(reward)'s penalty form in `config.penalty`).

    Returns:
      (log pi [2, S, N], history of [2, S, num_iterations] arrays), the leading axis in the
      order of `PLACEMENTS` ("reward", "loss").

    Examples:
      >>> import jax
      >>> from alignax.toy.bandit import random_instance
      >>> instance = random_instance(jax.random.key(0), num_responses=4)
      >>> log_pi, history = placement_study(*instance, keys=jax.random.split(
      ...     jax.random.key(1), 2), beta=1.0, config=BanditPPOConfig(num_iterations=3))
      >>> log_pi.shape, history["min_prob"].shape
      ((2, 2, 4), (2, 2, 3))
    """
    coefficients = jnp.array([[1.0, 0.0], [0.0, 1.0]]) * beta  # (beta_reward, beta_loss)

    def one(coefs, key):
        return train_bandit_ppo(reward, ref_logprobs, key=key, beta_reward=coefs[0],
                                beta_loss=coefs[1], config=config)

    return jax.vmap(lambda c: jax.vmap(lambda k: one(c, k))(keys))(coefficients)
