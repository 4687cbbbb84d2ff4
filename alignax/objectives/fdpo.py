"""f-DPO (thesis eq. 2.2), IPO, and the NLL/SFT regulariser, on per-sequence log-ratios.

h = log pi_theta(y|x) - log pi_ref(y|x), one value per sequence. Every loss returns the
unreduced per-example float32 values; the caller takes the mean.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_positive, check_same_shape, masked_mean
from alignax.divergences import Divergence, get_divergence, scaled_exp


def _power_group_z(chosen_h, rejected_h, chosen_weight, rejected_weight, scale, power,
                   with_log=False):
    """z = scale (mean_k f'(u_w,k) - mean_l f'(u_l,l)) for f'(u) = -u^(-c)/c + const, c = power.

    That is (scale/c) (S_l - S_w) with S = sum_k w_k e^(-c h_k) the weighted mean of u^-c of a
    group (weights w [B, N] summing to 1 over its valid members, 0 on padding, whose h must
    be finite). log S = -c h_min + r with r = log1p(sum_k w_k expm1(-c (h_k - h_min))): every
    expm1 argument is <= 0, so r is accurate even where c (h_k - h_min) is tiny (alpha -> 0,
    where forming e^(-c h) itself would round the group differences away). S_l - S_w is
    e^m (e^(p-m) - e^(q-m)) with p - q formed from h differences (exactly 0 at a tie) and the
    magnitude taken in log space where e^m overflows but z does not (`scaled_exp`).

    Shapes: chosen_h [B, K], rejected_h [B, L] (and weights alike) -> [B]; scale [B] or scalar.
    With `with_log`, returns (z, log |z|) instead.
    """
    c = power

    def log_sum(h, w):  # (h_min, r) with log S = -c h_min + r
        h_min = jnp.min(jnp.where(w > 0, h, jnp.inf), axis=-1)
        h_min = jnp.where(jnp.isfinite(h_min), h_min, 0.0)  # a group without weight: unused
        delta = jnp.where(w > 0, h - h_min[..., None], 0.0)  # >= 0
        return h_min, jnp.log1p(jnp.sum(w * jnp.expm1(-c * delta), axis=-1))

    min_w, r_w = log_sum(chosen_h, chosen_weight)
    min_l, r_l = log_sum(rejected_h, rejected_weight)
    m = jnp.maximum(-c * min_l + r_l, -c * min_w + r_w)  # max(log S_l, log S_w)
    d = -c * (min_l - min_w) + (r_l - r_w)  # log S_l - log S_w
    bracket = jnp.expm1(jnp.minimum(d, 0.0)) - jnp.expm1(-jnp.maximum(d, 0.0))  # (S_l-S_w)/e^m
    magnitude = jnp.abs(bracket)
    log_coef = jnp.log(scale) - jnp.log(c) + jnp.log(magnitude)
    z = jnp.sign(bracket) * scaled_exp((scale, 1.0 / c, magnitude), log_coef, m)
    return (z, log_coef + m) if with_log else z  # log |z| stays finite where z overflows


def _member_slopes(weight, scale, exponent):
    """scale w_k e^(exponent_k) per member [B, N], finite wherever the true value is."""
    return scaled_exp((scale, weight), jnp.log(scale) + jnp.log(weight), exponent)


def log_slope(name, h, power):
    """log of d f'(e^h) / dh (Table 2.1): 0 (reverse KL), log sigmoid(-h) (JSD), -c h (forward
    KL, c = 1, and alpha, c = alpha); finite for every finite h."""
    if name == "reverse_kl":
        return jnp.zeros_like(h)
    if name == "jsd":
        return -jax.nn.softplus(h)
    return -power * h


def scaled_gap(scale, a, b):
    """scale (a - b), finite wherever the true value is: where a - b overflows float32 it is
    formed as 2 (scale (a/2 - b/2)). The derivative is (scale, -scale) on both branches."""
    gap = a - b
    halves = 2.0 * (scale * (0.5 * a - 0.5 * b))
    return jnp.where(jnp.isfinite(gap), scale * gap, halves)


def _group_z(name, chosen_h, rejected_h, chosen_weight, rejected_weight, scale, power):
    """z = scale (mean_k f'(u_w,k) - mean_l f'(u_l,l)) [B], finite wherever it is in truth.

    Weighted means (weights [B, N], 1/count on valid members, padded members' h finite).
    Reverse KL: f' = h + 1, the scale applied by `scaled_gap` (a single member: standard DPO's
    beta (h_w - h_l) exactly). JSD: f' = log sigmoid(h) + log 2, a single member through
    `Divergence.f_prime_difference` (no cancellation). Forward KL / alpha: `_power_group_z`.
    """
    if name in ("forward_kl", "alpha"):
        return _power_group_z(chosen_h, rejected_h, chosen_weight, rejected_weight, scale, power)
    if name == "jsd" and chosen_h.shape[-1] == rejected_h.shape[-1] == 1:
        return scale * Divergence("jsd").f_prime_difference(chosen_h[..., 0], rejected_h[..., 0])
    g = (lambda h: h) if name == "reverse_kl" else jax.nn.log_sigmoid
    return scaled_gap(scale, jnp.sum(chosen_weight * g(chosen_h), axis=-1),
                      jnp.sum(rejected_weight * g(rejected_h), axis=-1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def group_loss(name, chosen_h, rejected_h, chosen_weight, rejected_weight, scale, power):
    """softplus(-z) = -log sigmoid(z), z of `_group_z`: the f-DPO (eq. 2.2, groups of one) and
    mDPO (§3.5.1) loss [B] of divergence `name`.

    Its derivative is written out: d/dh_w,k = -scale w_k sigmoid(-z) f''(h_w,k) and
    d/dh_l,l = scale w_l sigmoid(-z) f''(h_l,l), with f''(h) = d f'(e^h)/dh (`log_slope`), each
    as one exponential of a sum of logs. So it is finite wherever the true derivative is
    (autodiff would multiply sigmoid(-z) = 0 by an overflowed e^(-c h) and give NaN where the
    loss is a finite 0, or lose sigmoid(-h) ~ e^-88 to underflow before a large scale), and
    +/-inf exactly where the true one exceeds float32. No derivative flows into the weights,
    the scale (beta) or the power (alpha).
    """
    return jax.nn.softplus(-_group_z(name, chosen_h, rejected_h, chosen_weight,
                                     rejected_weight, scale, power))


@group_loss.defjvp
def _group_loss_jvp(name, primals, tangents):
    chosen_h, rejected_h, chosen_weight, rejected_weight, scale, power = primals
    d_chosen, d_rejected = tangents[:2]
    z = _group_z(name, *primals)
    log_sigmoid = -jax.nn.softplus(z)[..., None]  # log sigmoid(-z), [B, 1]
    scale = jnp.expand_dims(scale, -1) if jnp.ndim(scale) else scale  # per example: [B, 1]
    grad_chosen = -_member_slopes(chosen_weight, scale,
                                  log_sigmoid + log_slope(name, chosen_h, power))
    grad_rejected = _member_slopes(rejected_weight, scale,
                                   log_sigmoid + log_slope(name, rejected_h, power))
    tangent = jnp.sum(grad_chosen * d_chosen, -1) + jnp.sum(grad_rejected * d_rejected, -1)
    return jax.nn.softplus(-z), tangent


@jax.custom_jvp
def power_group_margin(chosen_h, rejected_h, chosen_weight, rejected_weight, power):
    """mean_k f'(u_w,k) - mean_l f'(u_l,l) [B] for forward KL / alpha (z of `_power_group_z`
    with scale 1), with the derivatives w_k e^(-c h_k) (chosen) and -w_l e^(-c h_l)
    (rejected) written out: finite wherever the true ones are, even where the margin is inf."""
    return _power_group_z(chosen_h, rejected_h, chosen_weight, rejected_weight, 1.0, power)


@power_group_margin.defjvp
def _power_group_margin_jvp(primals, tangents):
    chosen_h, rejected_h, chosen_weight, rejected_weight, c = primals
    d_chosen, d_rejected = tangents[:2]
    grad_chosen = _member_slopes(chosen_weight, 1.0, -c * chosen_h)
    grad_rejected = -_member_slopes(rejected_weight, 1.0, -c * rejected_h)
    tangent = jnp.sum(grad_chosen * d_chosen, -1) + jnp.sum(grad_rejected * d_rejected, -1)
    return power_group_margin(*primals), tangent


def fdpo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, beta: float | jax.Array,
              divergence: str = "reverse_kl", alpha: float | jax.Array | None = None) -> jax.Array:
    """f-DPO loss -log sigmoid(beta f'(u_w) - beta f'(u_l)), u = pi_theta/pi_ref (eq. 2.2).

    With divergence="reverse_kl" this is standard DPO, -log sigmoid(beta (h_w - h_l)), exactly.
    The difference f'(u_w) - f'(u_l) is formed in log space (see
    `Divergence.f_prime_difference`), so there is no NaN for any finite input; the loss is inf
    only where its true value exceeds float32 (e.g. forward KL at beta e^(-h_w) > 3.4e38), and
    beta (f'(u_w) - f'(u_l)) is formed so that it is finite wherever the true value is (h_w - h_l
    or e^(-h_w) may overflow while beta times it does not).

    Gradients are finite wherever the true ones are. For forward KL (c = 1) and alpha (c = alpha)
    the derivative d/dh_w = -beta sigmoid(-z) e^(-c h_w), z = beta (f'(u_w) - f'(u_l)), exceeds
    float32 at finite losses, e.g. at a tie h_w = h_l = h (loss log 2) once
    beta e^(-c h) / 2 > 3.4e38: there it is -inf (and +inf for h_l), never NaN.

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

    beta and alpha are hyper-parameters: no gradient flows into them.

    Examples:
      >>> import jax.numpy as jnp
      >>> fdpo_loss(jnp.array([0.0]), jnp.array([0.0]), beta=0.1)  # log 2
      Array([0.6931472], dtype=float32)
    """
    check_same_shape(chosen_h=chosen_h, rejected_h=rejected_h)
    check_positive("beta", beta)
    div = get_divergence(divergence, alpha=alpha)
    beta, power = jax.lax.stop_gradient(
        (as_float32(beta), as_float32(0.0 if div.power is None else div.power)))
    h_w, h_l = as_float32(chosen_h)[..., None], as_float32(rejected_h)[..., None]
    ones = jnp.ones_like(h_w)  # groups of one member: mean f'(u) = f'(u)
    return group_loss(div.name, h_w, h_l, ones, ones, beta, power)  # eq. 2.2


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
    # Halved so that h_w - h_l cannot overflow where the true square is finite (or inf - inf).
    half = (0.5 * as_float32(chosen_h) - 0.5 * as_float32(rejected_h)) - 0.25 / as_float32(tau)
    return jnp.square(2.0 * half)


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
    mask = jnp.asarray(mask) != 0
    logps = jnp.where(mask, as_float32(token_logps), 0.0)  # keep -inf at padding out
    return -masked_mean(logps, mask, axis=-1)  # finite even for log-probs near -float32 max


# ------------------------------------------------------------------------------------------
# Objective configs (the contract is in alignax.objectives.registry): SFT, f-DPO, DPO, IPO as
# registered, validated hyper-parameter dataclasses that the train step calls on its scores.
# (Imported here, below the loss functions, so that this section stays self-contained.)

import dataclasses  # noqa: E402
from typing import ClassVar  # noqa: E402

from alignax.objectives.registry import (CAUSAL_LM, GROUPED_FORMATS, PAIR_FORMATS,  # noqa: E402
                                         PAIR_ROLES, Needs, Objective, ObjectiveInputs,
                                         check_hyper, chosen_nll, pair_metrics, register)
from alignax.schedules import Hyper  # noqa: E402


def check_divergence(objective: Objective) -> None:
    """`get_divergence(objective.divergence, alpha=objective.alpha)` with the objective named."""
    try:
        get_divergence(objective.divergence, alpha=objective.alpha)
    except ValueError as error:
        raise ValueError(f"{objective.name}: {error}") from None


@register("sft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SFT(Objective):
    """Supervised fine-tuning on the chosen responses: mean over response tokens of
    -log pi(y_t) per example (`nll_loss`); grouped data: averaged over the group's members."""

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=("chosen",),
                                   formats=PAIR_FORMATS + GROUPED_FORMATS, grouped=None,
                                   reference=False)

    def loss(self, x: ObjectiveInputs, hp):
        return chosen_nll(x.scores["chosen"]), {}


@register("fdpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FDPO(Objective):
    """f-DPO (thesis eq. 2.2): `fdpo_loss` of the pair's log-ratios.

    Attributes:
      beta: > 0 (or a schedule), strength of the divergence regulariser.
      divergence: "reverse_kl" (DPO), "forward_kl", "jsd" or "alpha" (Table 2.1).
      alpha: in (0, 1), only for divergence="alpha".
      nll_weight: >= 0 (or a schedule), weight of the SFT term on the chosen responses
        (thesis ch. 3, footnote 3); 0 leaves it out.
    """

    beta: Hyper = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=PAIR_ROLES, formats=PAIR_FORMATS)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("beta", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "beta", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        check_divergence(self)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"].h, x.scores["rejected"].h  # [B] each
        loss = fdpo_loss(chosen, rejected, beta=hp["beta"], divergence=self.divergence,
                         alpha=self.alpha)  # thesis eq. 2.2
        margin = get_divergence(self.divergence, alpha=self.alpha).f_prime_difference(
            chosen, rejected)  # f'(u_w) - f'(u_l)
        return loss, {**pair_metrics(chosen, rejected, hp["beta"]),
                      "fdpo/f_prime_margin": jnp.mean(margin)}


@register("dpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPO(FDPO):
    """DPO: f-DPO with the reverse KL, -log sigmoid(beta (h_w - h_l)) (thesis eq. 2.2)."""

    divergence: str = dataclasses.field(default="reverse_kl", init=False, repr=False)
    alpha: None = dataclasses.field(default=None, init=False, repr=False)


@register("ipo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class IPO(Objective):
    """IPO, (h_w - h_l - 1/(2 tau))^2 (`ipo_loss`, Azar et al. 2023 eq. 17).

    Attributes:
      tau: > 0 (or a schedule); the target margin is 1/(2 tau).
      length_normalized: False (the IPO paper's form, on the summed log-ratios) or True
        (TRL's `loss_type="ipo"` convention: each log-ratio divided by its completion's number
        of scored tokens before the loss).
      nll_weight: >= 0 (or a schedule), as in `FDPO`.
    """

    tau: Hyper = 0.1
    length_normalized: bool = False
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=PAIR_ROLES, formats=PAIR_FORMATS)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("tau", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "tau", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        if not isinstance(self.length_normalized, bool):
            raise TypeError(f"ipo: length_normalized must be a bool, got "
                            f"{self.length_normalized!r}")

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"], x.scores["rejected"]
        h_w, h_l = chosen.h, rejected.h  # [B] each
        if self.length_normalized:  # TRL: log-ratio per scored completion token
            h_w = h_w / jnp.maximum(chosen.num_tokens, 1.0)
            h_l = h_l / jnp.maximum(rejected.num_tokens, 1.0)
        return ipo_loss(h_w, h_l, tau=hp["tau"]), pair_metrics(h_w, h_l)
