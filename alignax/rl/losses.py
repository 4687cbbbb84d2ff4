"""PPO's per-token losses (Schulman et al., 2017): clipped surrogate and clipped value loss.

Both return unreduced [B, T] terms; the update step sums them over the masked tokens of a
minibatch and divides by the minibatch's token count, so gradient accumulation over
micro-batches gives the same gradient as one pass over the minibatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_same_shape

_MAX_LOG_RATIO = 20.0  # ratios beyond e^20 ~ 5e8 are capped before the products below


def clipped_surrogate(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, *,
                      clip_epsilon: float | jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old, per token.

    The log-ratio is capped at +/-20 before the exponential, so rho A stays finite for any
    finite input (beyond the cap the gradient is 0, which the clip already gives whenever the
    advantage has the sign it acts on).

    Args:
      logps: [B, T] log pi of the sampled tokens (differentiated).
      old_logps: [B, T] log pi_old, from the rollout.
      advantages: [B, T].
      clip_epsilon: eps > 0.

    Returns:
      (loss [B, T], {"ratio": rho [B, T], "clipped": [B, T] bool where |rho - 1| > eps,
       "approx_kl": [B, T] (rho - 1) - log rho >= 0, the k3 estimate of KL(pi_old || pi)}).
    """
    check_same_shape(logps=logps, old_logps=old_logps, advantages=advantages)
    log_ratio = jnp.clip(as_float32(logps) - as_float32(old_logps), -_MAX_LOG_RATIO,
                         _MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    advantages = jax.lax.stop_gradient(as_float32(advantages))
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    aux = {"ratio": ratio, "clipped": jnp.abs(ratio - 1.0) > clip_epsilon,
           "approx_kl": jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio)}
    return -jnp.minimum(unclipped, clipped), aux


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, *,
                       clip_range: float | jax.Array | None) -> jax.Array:
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per token (None: no clip).

    Shapes: values, old_values, returns [B, T] -> [B, T] float32.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns)
    values, old_values = as_float32(values), jax.lax.stop_gradient(as_float32(old_values))
    returns = jax.lax.stop_gradient(as_float32(returns))
    loss = jnp.square(values - returns)
    if clip_range is not None:
        clipped = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
        loss = jnp.maximum(loss, jnp.square(clipped - returns))
    return 0.5 * loss
