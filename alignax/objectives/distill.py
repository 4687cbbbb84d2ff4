"""Reward-model distillation (004 eq. 7), its pessimistic ensemble form (eq. 11) and p-DPO (eq. 13).

h = log pi_theta(y|x) - log pi_ref(y|x), one value per sequence. The distillation loss regresses
the policy's implicit reward difference beta (h_1 - h_2) onto a target reward model's difference
r_1 - r_2 on unlabeled pairs, so the log-partition function cancels (004 §3.1).

Composition with an f-divergence (`divergence=`, Table 2.1 of the thesis): the f-regularised
RLHF optimum is pi* = pi_ref (f')^-1((r - lambda)/beta), i.e. r = beta f'(u*) + lambda, so the
f-distillation loss (r_1 - r_2 - beta (f'(u_1) - f'(u_2)))^2 is minimised by that optimum under
the support condition of Theorem 1 (tested in tests/test_distill_theory.py); "reverse_kl" is eq. 7
exactly. The forward-KL penalty of eq. 11 / eq. 13 is NOT the right pessimism term for other
divergences: the derivation of Theorem 2 (004 eq. 29) uses f = u log u; for a general f the same
steps give beta E_ref[(u - 1) f'(u) - f(u)] instead of beta KL(pi_ref || pi_theta). With
divergence != "reverse_kl" the pessimistic losses below therefore combine an f-distillation (or
f-DPO) term with the paper's forward-KL regulariser as a heuristic, without Theorem 2's guarantee.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from alignax._checks import (as_float32, check_positive, check_rank, check_same_shape,
                             masked_mean)
from alignax.divergences import Divergence, get_divergence, scaled_exp
from alignax.objectives.fdpo import _power_group_z, fdpo_loss, log_slope


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _mask(where, shape: tuple[int, ...], name: str) -> jax.Array:
    """Returns `where` as a bool array of `shape` (all True when None)."""
    if where is None:
        return jnp.ones(shape, dtype=bool)
    if tuple(jnp.shape(where)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(where))}")
    return jnp.asarray(where).astype(bool)


def _half_residual(name, h_1, h_2, r_1, r_2, beta, power):
    """rho = (r_1 - r_2)/2 - (beta/2) (f'(u_1) - f'(u_2)), half the residual of 004 eq. 7, as
    (rho, sign, log |rho|): rho is inf only beyond float32, its logarithm is always finite
    (the halves of r_1 - r_2 and of the gap cannot overflow; beta times the gap may)."""
    if name in ("forward_kl", "alpha"):  # f' = -u^-c/c + const, see `_power_group_z`
        ones = jnp.ones_like(h_1)[..., None]
        gap, log_gap = _power_group_z(h_1[..., None], h_2[..., None], ones, ones, 0.5 * beta,
                                      power, with_log=True)  # (beta/2) (f'(u_1) - f'(u_2))
    else:
        half = (0.5 * h_1 - 0.5 * h_2 if name == "reverse_kl"  # f'(u_1) - f'(u_2) = h_1 - h_2
                else 0.5 * Divergence("jsd").f_prime_difference(h_1, h_2))  # |.| <= f32 max
        gap, log_gap = beta * half, jnp.log(beta) + jnp.log(jnp.abs(half))
    reward = 0.5 * r_1 - 0.5 * r_2
    # log |rho| by halves while the gap is finite; beyond it, |reward| < |gap| and log1p applies
    finite = jnp.isfinite(gap)
    log_near = jnp.log(jnp.abs(0.5 * reward - 0.5 * gap)) + math.log(2.0)
    ratio = jnp.exp(jnp.log(jnp.abs(reward)) - log_gap) * jnp.sign(reward) * jnp.sign(gap)
    log_far = log_gap + jnp.log1p(-jnp.minimum(jnp.where(finite, 0.0, ratio), 1.0 - 2.0**-24))
    sign = jnp.where(finite, jnp.sign(0.5 * reward - 0.5 * gap), -jnp.sign(gap))
    return reward - gap, sign, jnp.where(finite, log_near, log_far)


def _weighted_square(rho, log_rho, weight):
    """weight (2 rho)^2, finite wherever it is in truth (also where rho alone overflows)."""
    plain = jnp.square(rho * (2.0 * jnp.sqrt(weight)))
    logs = scaled_exp(4.0 * weight, jnp.log(4.0 * weight), 2.0 * log_rho)
    return jnp.where(jnp.isfinite(rho), plain, logs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _weighted_squared_residual(name, h_1, h_2, r_1, r_2, beta, power, weight):
    """weight (r_1 - r_2 - beta (f'(u_1) - f'(u_2)))^2 = weight (2 rho)^2 (004 eq. 7).

    The derivative is written out: d/dh_1 = -4 w beta rho f''_1 with f''_1 = d f'(e^h_1)/dh_1
    (and +4 w beta rho f''_2 for h_2), d/dr_1 = -d/dr_2 = 4 w rho, each from log |rho|: 0 where
    the residual is 0 (never 0 * inf), finite wherever the true one is, even where rho itself
    overflows. No derivative flows into beta, power or weight.
    """
    rho, _, log_rho = _half_residual(name, h_1, h_2, r_1, r_2, beta, power)
    return _weighted_square(rho, log_rho, weight)


@_weighted_squared_residual.defjvp
def _weighted_squared_residual_jvp(name, primals, tangents):
    h_1, h_2, r_1, r_2, beta, power, weight = primals
    d_h1, d_h2, d_r1, d_r2 = tangents[:4]
    rho, sign, log_rho = _half_residual(name, h_1, h_2, r_1, r_2, beta, power)
    coef = (jnp.abs(rho), beta, 4.0 * weight)
    log_coef = log_rho + jnp.log(beta) + jnp.log(4.0 * weight)
    slope_1 = -sign * scaled_exp(coef, log_coef, log_slope(name, h_1, power))
    slope_2 = sign * scaled_exp(coef, log_coef, log_slope(name, h_2, power))
    slope_r = jnp.where(jnp.isfinite(rho), rho * (4.0 * weight),  # 4 w rho = 2 w residual
                        sign * scaled_exp(4.0 * weight, jnp.log(4.0 * weight), log_rho))
    tangent = slope_1 * d_h1 + slope_2 * d_h2 + slope_r * (d_r1 - d_r2)
    return _weighted_square(rho, log_rho, weight), tangent


def _squared_residual(h_1, h_2, r_1, r_2, *, beta, divergence, alpha, weight=1.0,
                      log=False) -> jax.Array:
    """weight (r_1 - r_2 - beta (f'(u_1) - f'(u_2)))^2, broadcasting r [..., B] against h [B].

    Finite wherever the true value is (no inf - inf between r_1 - r_2 and beta (f'(u_1) -
    f'(u_2)) at extreme finite inputs), gradients too (`_weighted_squared_residual`). `weight`
    (> 0) scales the value before squaring, so that a batch mean of terms each beyond float32
    can still be finite. No gradient flows into beta / alpha. With `log`, returns the natural
    log of the value instead (finite even where the value overflows; no gradient).
    """
    div = get_divergence(divergence, alpha=alpha)
    h_1, h_2, r_1, r_2 = jnp.broadcast_arrays(*(as_float32(v) for v in (h_1, h_2, r_1, r_2)))
    beta, power, weight = jax.lax.stop_gradient(
        (jnp.broadcast_to(as_float32(beta), h_1.shape),
         as_float32(0.0 if div.power is None else div.power),
         jnp.broadcast_to(as_float32(weight), h_1.shape)))
    if log:
        args = jax.lax.stop_gradient((h_1, h_2, r_1, r_2))
        log_rho = _half_residual(div.name, *args, beta, power)[2]
        return 2.0 * log_rho + jnp.log(4.0 * weight)
    return _weighted_squared_residual(div.name, h_1, h_2, r_1, r_2, beta, power, weight)


def _argmin(values: jax.Array, logs: jax.Array, axis: int) -> jax.Array:
    """argmin of `values` along `axis`, decided on their logs `logs` where every value there
    overflowed (then float32 cannot order the values themselves)."""
    overflow = jnp.all(jnp.isinf(values), axis=axis, keepdims=True)
    return jnp.argmin(jnp.where(overflow, logs, values), axis=axis)


@jax.custom_jvp
def _sum_or_fallback(a: jax.Array, b: jax.Array, fallback: jax.Array) -> jax.Array:
    """a + b, or `fallback` where a + b is inf - inf; the derivative is da + db always.

    `fallback` is the same sum formed at a scale where the two terms cannot both overflow (the
    caller builds it from stop-gradient inputs): a value-only repair, so a term beyond float32
    next to a finite or opposite one never turns the loss into NaN.
    """
    total = a + b
    return jnp.where(jnp.isnan(total), fallback, total)


@_sum_or_fallback.defjvp
def _sum_or_fallback_jvp(primals, tangents):
    return _sum_or_fallback(*primals), tangents[0] + tangents[1]


def _downscale(gamma) -> tuple[jax.Array, jax.Array]:
    """(k, 2^-k) with 2^k >= 2 (gamma + 1): at that scale gamma * (a value <= float32 max) is
    finite and a first term beyond float32 still leaves a sum beyond float32 (no gradient)."""
    gamma = jax.lax.stop_gradient(as_float32(gamma))
    k = (jnp.ceil(jnp.log2(gamma + 1.0)) + 1.0).astype(jnp.int32)
    return k, jnp.ldexp(jnp.float32(1.0), -k)


def distill_loss(h_1: jax.Array, h_2: jax.Array, target_rewards_1: jax.Array,
                 target_rewards_2: jax.Array, *, beta: float | jax.Array,
                 divergence: str = "reverse_kl", alpha: float | jax.Array | None = None,
                 where: jax.Array | None = None) -> jax.Array:
    """Reward-model distillation loss (r_1 - r_2 - beta (h_1 - h_2))^2 (004 eq. 7).

    Matches reward differences, so no partition function is needed; with full support of the
    pair distribution its minimiser is the RLHF optimum pi_ref exp(r / beta) / Z (Theorem 1).
    With another divergence, beta (h_1 - h_2) becomes beta (f'(u_1) - f'(u_2)) and the minimiser
    is the f-regularised optimum pi_ref (f')^-1((r - lambda)/beta) (see the module docstring).

    Args:
      h_1: [B] log-ratios of the first responses (any float dtype; computed in float32).
      h_2: [B] log-ratios of the second responses.
      target_rewards_1: [B] target reward model scores r(x, y_1).
      target_rewards_2: [B] target reward model scores r(x, y_2).
      beta: > 0, the KL strength of the RLHF objective being distilled.
      divergence: "reverse_kl" (eq. 7), "forward_kl", "jsd" or "alpha".
      alpha: in (0, 1), only with divergence="alpha".
      where: optional [B] bool, False for padded examples: their loss is 0 with zero gradient
        whatever their (possibly non-finite) inputs.

    Returns:
      [B] float32 per-example losses; inf only where the true value exceeds float32.

    Raises:
      ValueError: mismatched shapes, rank != 1, beta <= 0, a bad divergence / alpha.

    Examples:
      >>> import jax.numpy as jnp
      >>> distill_loss(jnp.array([1.0]), jnp.array([0.0]), jnp.array([2.0]), jnp.array([0.0]),
      ...              beta=0.5)  # (2 - 0.5 * 1)^2
      Array([2.25], dtype=float32)
    """
    check_rank("h_1", h_1, 1)
    check_same_shape(h_1=h_1, h_2=h_2, target_rewards_1=target_rewards_1,
                     target_rewards_2=target_rewards_2)
    check_positive("beta", beta)
    mask = _mask(where, jnp.shape(h_1), "where")
    h_1, h_2, r_1, r_2 = (jnp.where(mask, as_float32(v), 0.0)
                          for v in (h_1, h_2, target_rewards_1, target_rewards_2))
    loss = _squared_residual(h_1, h_2, r_1, r_2, beta=beta, divergence=divergence, alpha=alpha)
    return jnp.where(mask, loss, 0.0)


def forward_kl_estimate(reference_h: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Monte-Carlo estimate of KL(pi_ref || pi_theta): the mean of -h over responses y ~ pi_ref.

    KL(pi_ref || pi_theta) = E_{y ~ pi_ref}[log pi_ref(y) - log pi_theta(y)] = E_ref[-h]
    (the regulariser of 004 eq. 11 and eq. 13). The estimate is unbiased only when the
    responses really are pi_ref samples; §5 of the paper uses the preference completions.

    Args:
      reference_h: [...] log-ratios of responses sampled from pi_ref (any shape).
      where: optional bool of the same shape; False entries are left out of the mean.

    Returns:
      float32 scalar (0 when every entry is masked).
    """
    mask = _mask(where, jnp.shape(reference_h), "reference_where")
    return masked_mean(-as_float32(reference_h), mask, axis=None)


def pessimistic_distill_loss(h_1: jax.Array, h_2: jax.Array, target_rewards_1: jax.Array,
                             target_rewards_2: jax.Array, *, beta: float | jax.Array,
                             gamma: float | jax.Array, reference_h: jax.Array | None = None,
                             divergence: str = "reverse_kl",
                             alpha: float | jax.Array | None = None,
                             where: jax.Array | None = None,
                             reference_where: jax.Array | None = None
                             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pessimistic (ensemble) distillation, 004 eq. 11, on one mini-batch.

    loss = min_e mean_b distill_loss(h_1, h_2, r^e_1, r^e_2)  +  gamma * mean(-reference_h).

    The min over ensemble members is taken on this mini-batch (004 footnote 2), so it is the
    caller's batch that defines it: this function returns a scalar, not per-example values.
    E = 1 gives pd-DPO (the singleton confidence set {r_tgt}); E > 1 gives e-DPO. The gradient
    flows through the arg-min member only (a subgradient of the min).

    Args:
      h_1: [B] log-ratios of the first responses.
      h_2: [B] log-ratios of the second responses.
      target_rewards_1: [E, B] ensemble scores of the first responses ([B] means E = 1).
      target_rewards_2: [E, B] ensemble scores of the second responses.
      beta: > 0, KL strength of the distilled RLHF objective.
      gamma: >= 0, weight of the forward-KL term (gamma = beta / alpha of eq. 10-11).
      reference_h: log-ratios of responses drawn from pi_ref, any shape. None: the 2B pair
        responses (h_1, h_2) stand in for pi_ref samples, as in 004 §5.
      divergence, alpha: f-divergence of the distillation term (module docstring: the
        forward-KL term keeps Theorem 2's meaning only for "reverse_kl").
      where: optional [B] bool mask of real (non-padded) pairs.
      reference_where: optional bool mask shaped like reference_h (default: `where` applied to
        both pair responses when reference_h is None, all True otherwise).

    Returns:
      (loss, aux): loss is a float32 scalar; aux holds
        "member": int32 scalar, the arg-min ensemble member on this batch;
        "member_losses": [E] batch-mean distillation loss of every member;
        "per_example_member": [B] int32, the member whose distillation loss is smallest on each
          example (the analysis of 004 Figure C.1; -1 on masked examples);
        "distill": the min over members; "forward_kl": the forward-KL estimate.

    Raises:
      ValueError: shape mismatches, beta <= 0, gamma < 0, bad divergence.
    """
    check_rank("h_1", h_1, 1)
    check_same_shape(h_1=h_1, h_2=h_2)
    check_same_shape(target_rewards_1=target_rewards_1, target_rewards_2=target_rewards_2)
    if jnp.ndim(target_rewards_1) == 1:
        target_rewards_1 = jnp.asarray(target_rewards_1)[None]  # [B] -> [1, B]
        target_rewards_2 = jnp.asarray(target_rewards_2)[None]
    check_rank("target_rewards_1", target_rewards_1, 2)
    if jnp.shape(target_rewards_1)[1] != jnp.shape(h_1)[0]:
        raise ValueError(f"target_rewards_1 must have shape [E, B] with B = {jnp.shape(h_1)[0]} "
                         f"(h_1 {jnp.shape(h_1)}), got {jnp.shape(target_rewards_1)}")
    check_positive("beta", beta)
    _check_nonnegative("gamma", gamma)
    mask = _mask(where, jnp.shape(h_1), "where")  # [B]
    h_1, h_2 = (jnp.where(mask, as_float32(v), 0.0) for v in (h_1, h_2))
    r_1, r_2 = (jnp.where(mask, as_float32(v), 0.0) for v in (target_rewards_1, target_rewards_2))

    count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)

    def member_losses_at(scale, args):  # [E] batch means of the member losses, times scale
        per_example = _squared_residual(*args, beta=beta, divergence=divergence, alpha=alpha,
                                        weight=scale / count)  # [E, B], each / count already
        return per_example, jnp.sum(jnp.where(mask[None], per_example, 0.0), axis=1)

    # min over the confidence set, per mini-batch (fn. 2). The arg-min is found on values only
    # and the gradient taken through that member alone: the others may have infinite
    # derivatives that a 0 cotangent would turn into NaN.
    per_example, member_losses = member_losses_at(
        1.0, jax.lax.stop_gradient((h_1, h_2, r_1, r_2)))
    log_per_example = _squared_residual(h_1, h_2, r_1, r_2, beta=beta, divergence=divergence,
                                        alpha=alpha, weight=1.0 / count, log=True)  # [E, B]
    log_member = jax.nn.logsumexp(jnp.where(mask[None], log_per_example, -jnp.inf), axis=1)
    member = _argmin(member_losses, log_member, axis=0)
    distill = member_losses_at(1.0, (h_1, h_2, r_1[member][None], r_2[member][None]))[1][0]

    if reference_h is None:
        reference_h = jnp.stack([h_1, h_2])  # [2, B]: the pair completions as pi_ref samples
        reference_mask = jnp.stack([mask, mask]) if reference_where is None else _mask(
            reference_where, (2,) + jnp.shape(h_1), "reference_where")
    else:
        reference_mask = _mask(reference_where, jnp.shape(reference_h), "reference_where")
    forward_kl = forward_kl_estimate(reference_h, where=reference_mask)
    # 004 eq. 11. Where distill is beyond float32 and gamma * forward_kl below -float32 max,
    # the value comes from the same sum at scale 2^-k (see _sum_or_fallback).
    k, scale = _downscale(gamma)
    _, scaled = member_losses_at(scale, jax.lax.stop_gradient((h_1, h_2, r_1, r_2)))
    fallback = jnp.ldexp(jnp.min(scaled) + jax.lax.stop_gradient(gamma * scale * forward_kl), k)
    loss = _sum_or_fallback(distill, gamma * forward_kl, fallback)

    aux = {
        "member": member.astype(jnp.int32),
        "member_losses": member_losses,
        "per_example_member": jnp.where(mask, _argmin(per_example, log_per_example, axis=0),
                                        -1).astype(jnp.int32),
        "distill": distill,
        "forward_kl": forward_kl,
    }
    return loss, aux


def pessimistic_dpo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, beta: float | jax.Array,
                         gamma: float | jax.Array, divergence: str = "reverse_kl",
                         alpha: float | jax.Array | None = None,
                         reference_h: jax.Array | None = None,
                         where: jax.Array | None = None) -> jax.Array:
    """Pessimistic DPO (p-DPO), 004 eq. 13: f-DPO plus gamma times a forward-KL estimate.

    Per example: fdpo_loss(h_w, h_l) + gamma * mean(-h) over the example's pi_ref samples. With
    reference_h None the two completions stand in for pi_ref samples (004 §5), i.e. the term
    is -(h_w + h_l) / 2; its batch mean is the forward-KL estimate over the 2B completions.
    The paper's §5 analysis sums the two completions' -log pi instead of averaging, so its
    alpha of Proposition 3 equals 2 beta / gamma here. Composes with the divergence of the
    f-DPO term; the forward-KL term is Theorem 2's only for "reverse_kl" (module docstring).

    Args:
      chosen_h: [B] log-ratios of the preferred responses.
      rejected_h: [B] log-ratios of the dispreferred responses.
      beta: > 0, DPO strength.
      gamma: >= 0, forward-KL weight (annealed 1e-4 -> 1e-2 in 004 §4.1: alignax.schedules).
      divergence, alpha: as in `fdpo_loss`.
      reference_h: optional [B] or [B, K] log-ratios of pi_ref samples for each example's
        prompt (mean over K).
      where: optional [B] bool mask; masked examples give 0 with zero gradient.

    Returns:
      [B] float32 per-example losses.

    Raises:
      ValueError: mismatched shapes, beta <= 0, gamma < 0, bad divergence.

    Examples:
      >>> import jax.numpy as jnp
      >>> pessimistic_dpo_loss(jnp.array([0.0]), jnp.array([0.0]), beta=0.1, gamma=0.5)  # log 2
      Array([0.6931472], dtype=float32)
    """
    check_rank("chosen_h", chosen_h, 1)
    check_same_shape(chosen_h=chosen_h, rejected_h=rejected_h)
    _check_nonnegative("gamma", gamma)
    mask = _mask(where, jnp.shape(chosen_h), "where")
    chosen_h, rejected_h = (jnp.where(mask, as_float32(v), 0.0) for v in (chosen_h, rejected_h))
    if reference_h is None:
        # completions as pi_ref samples (004 §5); not 0.5 h_w + 0.5 h_l, which XLA's simplifier
        # rewrites as 0.5 (h_w + h_l) under jit, -inf at h = 3e38 and NaN times gamma = 0
        pair = jnp.stack([chosen_h, rejected_h], axis=-1)  # [B, 2]
        penalty = -masked_mean(pair, jnp.ones(jnp.shape(pair), bool), axis=-1)
    else:
        batch = jnp.shape(chosen_h)[0]
        if jnp.ndim(reference_h) not in (1, 2) or jnp.shape(reference_h)[0] != batch:
            raise ValueError(f"reference_h must have shape [B] or [B, K] with B = "
                             f"{jnp.shape(chosen_h)[0]}, got {jnp.shape(reference_h)}")
        ref = as_float32(reference_h).reshape(jnp.shape(chosen_h)[0], -1)  # [B, K]
        penalty = -masked_mean(ref, jnp.broadcast_to(mask[:, None], ref.shape), axis=1)  # [B]
    dpo = fdpo_loss(chosen_h, rejected_h, beta=beta, divergence=divergence, alpha=alpha)
    # 004 eq. 13. Where dpo is beyond float32 (then it is linear in beta: softplus(-z) = -z)
    # and gamma * penalty below -float32 max, the value is the same sum at scale 2^-k.
    k, scale = _downscale(gamma)
    args = jax.lax.stop_gradient((chosen_h, rejected_h, beta, gamma * scale * penalty))
    fallback = jnp.ldexp(fdpo_loss(*args[:2], beta=args[2] * scale, divergence=divergence,
                                   alpha=alpha) + args[3], k)
    return jnp.where(mask, _sum_or_fallback(dpo, gamma * penalty, fallback), 0.0)


# ------------------------------------------------------------------------------------------
# Objective configs (the contract is in alignax.objectives.registry): d-DPO, pd-DPO / e-DPO
# and p-DPO on the step's scores and the batch's target rewards.

import dataclasses  # noqa: E402
from typing import ClassVar  # noqa: E402

from alignax.objectives.fdpo import check_divergence  # noqa: E402
from alignax.objectives.registry import (CAUSAL_LM, PAIR_FORMATS, PAIR_ROLES,  # noqa: E402
                                         UNLABELED_FORMATS, UNLABELED_ROLES, Needs, Objective,
                                         ObjectiveInputs, check_hyper, pair_metrics, register)
from alignax.schedules import Hyper  # noqa: E402


def _check_fields(objective: Objective) -> None:
    check_hyper(objective, "beta", low=0.0)
    if "gamma" in objective.hyper_parameters:
        check_hyper(objective, "gamma", low=0.0, inclusive=True)
    if "nll_weight" in objective.hyper_parameters:
        check_hyper(objective, "nll_weight", low=0.0, inclusive=True)
    check_divergence(objective)


@register("distill")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Distill(Objective):
    """d-DPO (004 eq. 7): `distill_loss` of unlabeled pairs against one target reward model's
    scores "target_rewards_1" / "target_rewards_2" [B] (an ensemble: `PessimisticDistill`).

    Attributes:
      beta: > 0 (or a schedule), the KL strength of the distilled RLHF objective.
      divergence, alpha: as in `FDPO` (module docstring: the f-distillation loss).
    """

    beta: Hyper = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=UNLABELED_ROLES,
                                   formats=UNLABELED_FORMATS, target_rewards=True)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("beta",)

    def __post_init__(self):
        _check_fields(self)

    def loss(self, x: ObjectiveInputs, hp):
        h_1, h_2 = x.scores["response_1"].h, x.scores["response_2"].h  # [B] each
        loss = distill_loss(h_1, h_2, x.columns["target_rewards_1"],
                            x.columns["target_rewards_2"], beta=hp["beta"],
                            divergence=self.divergence, alpha=self.alpha)  # 004 eq. 7
        return loss, {"distill/implicit_margin": jnp.mean(hp["beta"] * (h_1 - h_2))}


@register("pessimistic_distill")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PessimisticDistill(Objective):
    """pd-DPO (one target reward, [B]) and e-DPO (an ensemble, [B, E]), 004 eq. 11:
    `pessimistic_distill_loss`, the min over the ensemble of the batch distillation loss plus
    gamma times the forward KL, the pair responses standing in for pi_ref samples (004 §5).

    The min is taken over the batch (004 footnote 2): the loss is a batch scalar, spread
    evenly over the B rows. With gradient accumulation it is taken per micro-batch, so the
    update differs from a full-batch one.

    Attributes:
      gamma: >= 0 (or a schedule, e.g. `alignax.schedules.pessimism_schedule`, the linear
        1e-4 -> 1e-2 annealing of 004 §4.1), weight of the forward-KL term.
      beta: > 0 (or a schedule).
      divergence, alpha: of the distillation term, as in `Distill`.
    """

    gamma: Hyper
    beta: Hyper = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=UNLABELED_ROLES,
                                   formats=UNLABELED_FORMATS, target_rewards=True,
                                   ensemble=True, batch_level=True)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("gamma", "beta")

    def __post_init__(self):
        _check_fields(self)

    def loss(self, x: ObjectiveInputs, hp):
        h_1, h_2 = x.scores["response_1"].h, x.scores["response_2"].h  # [B] each
        rewards_1, rewards_2 = x.columns["target_rewards_1"], x.columns["target_rewards_2"]
        if rewards_1.ndim == 2:  # the batch's [B, E] -> the loss's [E, B]
            rewards_1, rewards_2 = rewards_1.T, rewards_2.T
        loss, aux = pessimistic_distill_loss(h_1, h_2, rewards_1, rewards_2, beta=hp["beta"],
                                             gamma=hp["gamma"], divergence=self.divergence,
                                             alpha=self.alpha)  # 004 eq. 11
        return jnp.broadcast_to(loss, h_1.shape), {
            "pessimistic/argmin_member": aux["member"], "pessimistic/distill": aux["distill"],
            "pessimistic/forward_kl": aux["forward_kl"]}


@register("pessimistic_dpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PessimisticDPO(Objective):
    """p-DPO (004 eq. 13): f-DPO plus gamma times the forward KL estimated on the pair's
    completions (`pessimistic_dpo_loss`).

    Attributes:
      gamma: >= 0 (or a schedule, e.g. `alignax.schedules.pessimism_schedule`).
      beta: > 0 (or a schedule).
      divergence, alpha: of the f-DPO term, as in `FDPO`.
      nll_weight: >= 0 (or a schedule), as in `FDPO`.
    """

    gamma: Hyper
    beta: Hyper = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=PAIR_ROLES, formats=PAIR_FORMATS)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("gamma", "beta", "nll_weight")

    def __post_init__(self):
        _check_fields(self)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"].h, x.scores["rejected"].h  # [B] each
        loss = pessimistic_dpo_loss(chosen, rejected, beta=hp["beta"], gamma=hp["gamma"],
                                    divergence=self.divergence, alpha=self.alpha)  # 004 eq. 13
        return loss, pair_metrics(chosen, rejected, hp["beta"])
