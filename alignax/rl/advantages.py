"""Advantages: GAE on ragged (EOS-terminated) rollouts, group baselines, masked whitening.

Rollouts are [B, T] arrays over response tokens with a mask that is True on the tokens a row
generated (EOS included) and False after it stopped. A row's episode ends at its last masked
token: there the next state's value is 0. Nothing read at a masked-out position reaches a
result (padded rewards and values may hold anything, inf and NaN included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_rank, check_same_shape

GROUP_BASELINES = ("rloo", "grpo")


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float | jax.Array,
        lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al., 2016) over ragged rows.

        delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t
        A_t     = delta_t + gamma lam m_{t+1} A_{t+1}        (0 where m_t is False)
        R_t     = A_t + V_t                                   (the value target)

    m_{t+1} = mask[:, t + 1] (False past the last column), so the value after a row's last
    token is 0 and a gap in a mask ends the episode there.

    Args:
      rewards: [B, T] per-token rewards (the score on the last token plus any penalties).
      values: [B, T] V(s_t), the value of the state before token t.
      mask: [B, T] bool/0-1.
      gamma, lam: discount and GAE lambda in [0, 1] (may be traced).

    Returns:
      (advantages [B, T], returns [B, T]) float32, 0 where mask is False.

    Examples:
      >>> import jax.numpy as jnp
      >>> adv, ret = gae(jnp.array([[0.0, 1.0, 9.0]]), jnp.array([[0.5, 0.5, 9.0]]),
      ...                jnp.array([[1, 1, 0]]), gamma=1.0, lam=1.0)
      >>> adv, ret  # the padded 9s are ignored
      (Array([[0.5, 0.5, 0. ]], dtype=float32), Array([[1., 1., 0.]], dtype=float32))
    """
    check_rank("rewards", rewards, 2)
    check_same_shape(rewards=rewards, values=values, mask=mask)
    mask = jnp.asarray(mask).astype(bool)
    rewards = jnp.where(mask, as_float32(rewards), 0.0)
    values = jnp.where(mask, as_float32(values), 0.0)
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # [B, T] m_{t+1}
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))  # [B, T] V_{t+1} (0 if masked)
    deltas = rewards + gamma * next_values - values  # [B, T]
    decay = jnp.where(next_mask, gamma * lam, 0.0)  # [B, T]

    def backward(next_advantage, xs):  # one column, from the last to the first
        delta, carry_on, valid = xs  # [B] each
        advantage = jnp.where(valid, delta + carry_on * next_advantage, 0.0)
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros(rewards.shape[:1], jnp.float32),
                                 (deltas.T, decay.T, mask.T), reverse=True)  # [T, B]
    advantages = advantages.T  # [B, T]
    return advantages, jnp.where(mask, advantages + values, 0.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the True entries of mask (0 if there are none); any shapes that match."""
    mask = jnp.asarray(mask).astype(bool)
    total = jnp.sum(jnp.where(mask, as_float32(x), 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1)


def masked_variance(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance of x over the True entries of mask (two-pass, no cancellation)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(jnp.where(mask, as_float32(x) - mean, 0.0)), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries; 0 elsewhere.

    With shift_mean=False the mean is added back (only the scale changes). Shapes: any, x and
    mask alike; statistics over all masked entries of the batch.
    """
    check_same_shape(x=x, mask=mask)
    x, mask = as_float32(x), jnp.asarray(mask).astype(bool)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_variance(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over masked entries (1: perfect critic)."""
    residual = masked_variance(as_float32(returns) - as_float32(values), mask)
    return 1.0 - residual / jnp.maximum(masked_variance(returns, mask), 1e-12)


def group_advantages(scores: jax.Array, *, group_size: int, baseline: str = "rloo",
                     eps: float = 1e-6) -> jax.Array:
    """Critic-free advantages from groups of responses to one prompt (rows b*K .. b*K + K - 1).

    "rloo" (REINFORCE leave-one-out, Ahmadian et al., 2024): R_i - mean_{j != i} R_j.
    "grpo" (Shao et al., 2024): (R_i - mean_j R_j) / (std_j R_j + eps).

    Args:
      scores: [B] total reward of each response, B a multiple of group_size.
      group_size: K >= 2 responses per prompt.
      baseline: "rloo" or "grpo".

    Returns:
      [B] float32.
    """
    check_rank("scores", scores, 1)
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"baseline must be one of {GROUP_BASELINES}, got {baseline!r}")
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch, got group_size="
                         f"{group_size} for scores {scores.shape}")
    groups = as_float32(scores).reshape(-1, group_size)  # [B/K, K]
    mean = jnp.mean(groups, axis=1, keepdims=True)
    if baseline == "rloo":
        out = (groups - mean) * group_size / (group_size - 1)  # R_i - (sum - R_i)/(K - 1)
    else:
        out = (groups - mean) / (jnp.std(groups, axis=1, keepdims=True) + eps)
    return out.reshape(-1)
