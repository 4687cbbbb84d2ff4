"""Multi-sample Diffusion-DPO (thesis §3.6.2) on per-sample denoising errors.

For a noised sample x_t of x with noise eps, the implicit "cost" of the model is
r = ||eps - eps_theta(x_t, t)||^2 - ||eps - eps_ref(x_t, t)||^2 (a cost, hence -beta), and

    L = -log sigmoid(-beta T omega(lambda_t) (mean_{G_w} r_w - mean_{G_l} r_l)).

With one member per group this is Diffusion-DPO (Wallace et al., 2023, eq. 14). It is mDPO
(`mdpo_loss`, reverse KL) on the log-ratio proxies h = -T omega(lambda_t) r, implemented as
mDPO on -r with beta T omega(lambda_t) (the same loss, and no overflow of h); masks, empty
groups and numerics are mDPO's. The SFT term of a diffusion model
(the analogue of the NLL term, §3.6.1 footnote 3) is the chosen group's mean denoising error
of the model, and composes by addition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_positive, check_rank
from alignax.objectives.multisample import mdpo_loss


def denoising_error(noise: jax.Array, prediction: jax.Array) -> jax.Array:
    """Per-sample squared error ||noise - prediction||^2 summed over trailing axes.

    Args:
      noise: [B, K, ...] the true noise eps of each group member.
      prediction: [B, K, ...] eps_theta(x_t, t) (or eps_ref).

    Returns:
      [B, K] float32.
    """
    if jnp.shape(noise) != jnp.shape(prediction):
        raise ValueError(f"noise {jnp.shape(noise)} and prediction {jnp.shape(prediction)} "
                         "must have the same shape")
    if jnp.ndim(noise) < 2:
        raise ValueError(f"noise must be [B, K, ...], got shape {jnp.shape(noise)}")
    sq = jnp.square(as_float32(noise) - as_float32(prediction))
    return jnp.sum(sq, axis=tuple(range(2, jnp.ndim(sq))))


def diffusion_mdpo_loss(chosen_model_err: jax.Array, chosen_ref_err: jax.Array,
                        rejected_model_err: jax.Array, rejected_ref_err: jax.Array, *,
                        beta: float | jax.Array, weight: float | jax.Array = 1.0,
                        chosen_mask: jax.Array | None = None,
                        rejected_mask: jax.Array | None = None) -> jax.Array:
    """Multi-sample Diffusion-DPO loss (§3.6.2); K = L = 1 is Diffusion-DPO.

    Args:
      chosen_model_err: [B, K] ||eps_w - eps_theta(x_t^w, t)||^2 per chosen member.
      chosen_ref_err: [B, K] ||eps_w - eps_ref(x_t^w, t)||^2.
      rejected_model_err: [B, L] the same for the rejected group.
      rejected_ref_err: [B, L].
      beta: > 0.
      weight: T omega(lambda_t) >= 0, a scalar or [B] (one timestep per example).
      chosen_mask, rejected_mask: [B, K] / [B, L] valid members (default all).

    Returns:
      [B] float32 per-example losses; 0 where a group has no valid member.

    Examples:
      >>> import jax.numpy as jnp
      >>> e = jnp.ones((1, 6))
      >>> diffusion_mdpo_loss(e, e, e[:, :2], e[:, :2], beta=1.0)  # log 2
      Array([0.6931472], dtype=float32)
    """
    check_rank("chosen_model_err", chosen_model_err, 2)
    check_rank("rejected_model_err", rejected_model_err, 2)
    for name, a, b in (("chosen", chosen_model_err, chosen_ref_err),
                       ("rejected", rejected_model_err, rejected_ref_err)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"{name}_model_err {jnp.shape(a)} and {name}_ref_err "
                             f"{jnp.shape(b)} must have the same shape")
    check_positive("beta", beta)
    b = jnp.shape(chosen_model_err)[0]
    weight = as_float32(weight)
    if jnp.ndim(weight) == 0:
        weight = jnp.full((b,), weight)
    elif jnp.shape(weight) != (b,):
        raise ValueError(f"weight must be a scalar or [B] = ({b},), got {jnp.shape(weight)}")
    # Log-ratio proxy h = -T omega(lambda_t) (||eps - eps_theta||^2 - ||eps - eps_ref||^2); the
    # weight multiplies beta instead of h, so that a weight > 1 cannot overflow h where the
    # loss is finite (mDPO's reverse-KL loss depends on beta h only).
    masks = []
    for name, mask, a in (("chosen", chosen_mask, chosen_model_err),
                          ("rejected", rejected_mask, rejected_model_err)):
        if mask is not None and jnp.shape(mask) != jnp.shape(a):
            raise ValueError(f"{name}_mask {jnp.shape(mask)} must have the shape of "
                             f"{name}_model_err {jnp.shape(a)}")
        masks.append(jnp.ones(jnp.shape(a), dtype=bool) if mask is None else jnp.asarray(mask) != 0)
    chosen_r = jnp.where(masks[0], as_float32(chosen_model_err) - as_float32(chosen_ref_err),
                         0.0)  # [B, K]; errors >= 0, so |r| <= float32 max
    rejected_r = jnp.where(masks[1], as_float32(rejected_model_err)
                           - as_float32(rejected_ref_err), 0.0)  # [B, L]
    return mdpo_loss(-chosen_r, -rejected_r, beta=as_float32(beta) * weight,
                     chosen_mask=chosen_mask, rejected_mask=rejected_mask)
