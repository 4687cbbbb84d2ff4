"""Per-token and per-sequence log-probabilities of next-token targets, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import check_rank, check_same_shape


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets] per position, computed in float32.

    Args:
      logits: [B, T, V] any float dtype.
      targets: [B, T] int token ids; targets[b, t] is the token position t predicts.

    Returns:
      [B, T] float32.
    """
    check_rank("logits", logits, 3)
    if logits.shape[:2] != jnp.shape(targets):
        raise ValueError(f"logits {logits.shape} must be [B, T, V] for targets {jnp.shape(targets)}")
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked positions of `token_logprobs`: log pi(y|x) per sequence.

    Args:
      logits: [B, T, V].
      targets: [B, T] int.
      mask: [B, T] bool/0-1, True on the response tokens to score.

    Returns:
      [B] float32.
    """
    check_same_shape(targets=targets, mask=mask)
    logps = token_logprobs(logits, targets)
    return jnp.sum(jnp.where(jnp.asarray(mask).astype(bool), logps, 0.0), axis=-1)
