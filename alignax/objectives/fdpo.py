"""f-DPO (thesis eq. 2.2), IPO, and the NLL/SFT regulariser, on per-sequence log-ratios.

h = log pi_theta(y|x) - log pi_ref(y|x), one value per sequence. Every loss returns the
unreduced per-example float32 values; the caller takes the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_positive, check_same_shape
from alignax.divergences import exp_difference, get_divergence


@jax.custom_jvp
def _power_fdpo_loss(chosen_h, rejected_h, beta, power):
    """softplus(-z), z = beta (f'(u_w) - f'(u_l)) = (beta/c)(e^(-c h_l) - e^(-c h_w)), c = power.

    The derivative is written out, -beta sigmoid(-z) e^(-c h_w) for h_w and
    beta sigmoid(-z) e^(-c h_l) for h_l, each as one exp of a sum of logs: autodiff of the
    composition would multiply sigmoid(-z) = 0 by an overflowed e^(-c h) = inf and give NaN
    where the loss is a perfectly finite 0.
    """
    z = beta / power * exp_difference(rejected_h, chosen_h, power)
    return jax.nn.softplus(-z)


@_power_fdpo_loss.defjvp
def _power_fdpo_loss_jvp(primals, tangents):
    chosen_h, rejected_h, beta, power = primals
    d_chosen, d_rejected, _, _ = tangents  # beta, power enter stop_gradient-ed (see fdpo_loss)
    z = beta / power * exp_difference(rejected_h, chosen_h, power)
    log_sigmoid_neg_z = -jax.nn.softplus(z)
    grad_chosen = -beta * jnp.exp(log_sigmoid_neg_z - power * chosen_h)
    grad_rejected = beta * jnp.exp(log_sigmoid_neg_z - power * rejected_h)
    return jax.nn.softplus(-z), grad_chosen * d_chosen + grad_rejected * d_rejected


def fdpo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, beta: float | jax.Array,
              divergence: str = "reverse_kl", alpha: float | jax.Array | None = None) -> jax.Array:
    """f-DPO loss -log sigmoid(beta f'(u_w) - beta f'(u_l)), u = pi_theta/pi_ref (eq. 2.2).

    With divergence="reverse_kl" this is standard DPO, -log sigmoid(beta (h_w - h_l)), exactly.
    The difference f'(u_w) - f'(u_l) is formed in log space (see
    `Divergence.f_prime_difference`), so there is no NaN for any finite input; the loss is inf
    only where its true value exceeds float32 (forward KL / alpha at h_w << -88).

    Args:
      chosen_h: [B] log-ratios of the preferred responses (any float dtype; computed in f32).
      rejected_h: [B] log-ratios of the dispreferred responses.
      beta: > 0, strength of the divergence regulariser.
      divergence: "reverse_kl", "forward_kl", "jsd" or "alpha" (Table 2.1).
      alpha: in (0, 1), only for divergence="alpha".

    Returns:
      [B] float32 per-example losses.

    Raises:
      ValueError: mismatched shapes, beta <= 0, an inadmissible or unknown divergence
        (total_variation / chi_squared: Theorem 1), alpha outside (0, 1).

    beta and alpha are hyper-parameters: no gradient flows into them for forward KL / alpha.

    Examples:
      >>> import jax.numpy as jnp
      >>> fdpo_loss(jnp.array([0.0]), jnp.array([0.0]), beta=0.1)  # log 2
      Array([0.6931472], dtype=float32)
    """
    check_same_shape(chosen_h=chosen_h, rejected_h=rejected_h)
    check_positive("beta", beta)
    div = get_divergence(divergence, alpha=alpha)
    if div.power is not None:  # forward KL / alpha: f' ~ -e^(-c h)/c, see _power_fdpo_loss
        beta, power = jax.lax.stop_gradient((as_float32(beta), as_float32(div.power)))
        return _power_fdpo_loss(as_float32(chosen_h), as_float32(rejected_h), beta, power)
    margin = div.f_prime_difference(chosen_h, rejected_h)  # f'(u_w) - f'(u_l), [B]
    return jax.nn.softplus(-beta * margin)  # -log sigmoid(beta margin), eq. 2.2


def ipo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, tau: float | jax.Array) -> jax.Array:
    """IPO loss (h_w - h_l - 1/(2 tau))^2 (Azar et al., 2023, eq. 17).

    Args:
      chosen_h: [B] log-ratios of the preferred responses.
      rejected_h: [B] log-ratios of the dispreferred responses.
      tau: > 0, regularisation strength; the target margin is 1/(2 tau).

    Returns:
      [B] float32 per-example losses.
    """
    check_same_shape(chosen_h=chosen_h, rejected_h=rejected_h)
    check_positive("tau", tau)
    return jnp.square(as_float32(chosen_h) - as_float32(rejected_h) - 0.5 / tau)


def nll_loss(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example SFT negative log-likelihood: mean over response tokens of -log pi(y_t).

    The thesis adds this term with a weight to stabilise preference training (ch. 3,
    footnote 3); compose it as `objective + weight * nll_loss(chosen_token_logps, mask)`.
    A row whose mask is empty contributes 0 (no NaN from 0/0) and no gradient.

    Args:
      token_logps: [B, T] per-token log-probabilities of the (chosen) responses.
      mask: [B, T] bool/0-1, True on response tokens.

    Returns:
      [B] float32.
    """
    check_same_shape(token_logps=token_logps, mask=mask)
    mask = jnp.asarray(mask).astype(jnp.float32)
    logps = jnp.where(mask > 0, as_float32(token_logps), 0.0)  # keep -inf at padding out
    count = jnp.sum(mask, axis=-1)  # [B]
    return -jnp.sum(logps * mask, axis=-1) / jnp.maximum(count, 1.0)
