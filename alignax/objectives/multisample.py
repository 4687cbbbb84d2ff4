"""Multi-sample preference objectives: mDPO and mIPO on groups of log-ratios (thesis §3.5).

A preference is given between two *groups* of responses to one prompt, G_w (K members) and
G_l (L members). The group's implicit reward is the mean of its members' implicit rewards
(the geometric mean of the likelihoods, §3.5.1), so with h = log pi_theta(y|x) - log pi_ref(y|x):

    mDPO:  -log sigmoid(beta mean_k h_w,k - beta mean_l h_l,l)
    mIPO:  (mean_k h_w,k - mean_l h_l,l - 1/(2 tau))^2 - var_w / K - var_l / L   (Prop. 1)

Composition with chapter 2: under an f-divergence the implicit reward of a response is
beta f'(u), u = pi_theta/pi_ref, so a group's reward is the group mean of beta f'(u)
(`divergence=`); "reverse_kl" (f'(u) = log u + 1, the +1 cancels) is the thesis exactly.

Ragged groups: `chosen_mask` [B, K] / `rejected_mask` [B, L] mark the valid members. Padded
members affect neither the value nor the gradient, whatever they hold (inf/NaN-producing
garbage included): they are replaced before any arithmetic ("double where").

Degenerate groups:
  * a group with exactly one valid member has no sample variance; mIPO applies no variance
    correction to it (its term is the plain, biased one) and `mipo_loss_with_metrics` counts
    it in "num_uncorrected_groups";
  * an example whose chosen or rejected group has no valid member has loss 0 and zero
    gradient (it is padding), counted in "num_empty_examples".
A *static* group size K < 2 or L < 2 with `unbiased=True` raises ValueError: no member of
that side could ever be corrected, which is almost certainly a mistake (use unbiased=False).

The NLL/SFT regulariser (thesis §3.6.1, footnote 3) composes by addition:
`mdpo_loss(...) + weight * group_nll_loss(chosen_token_logps, chosen_token_mask, chosen_mask)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_positive, check_rank
from alignax.divergences import get_divergence
from alignax.objectives.fdpo import nll_loss

_LOG_SPLIT = 40.0  # s = e^40: (x s) s stays finite for |x| <= 1 (e^80 < float32 max ~ e^88.7)


def _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask):
    """Checks ranks/shapes and returns the two boolean masks ([B, K], [B, L])."""
    check_rank("chosen_h", chosen_h, 2)
    check_rank("rejected_h", rejected_h, 2)
    if jnp.shape(chosen_h)[0] != jnp.shape(rejected_h)[0]:
        raise ValueError(f"batch size mismatch: chosen_h {jnp.shape(chosen_h)}, "
                         f"rejected_h {jnp.shape(rejected_h)}")
    masks = []
    for name, h, mask in (("chosen", chosen_h, chosen_mask),
                          ("rejected", rejected_h, rejected_mask)):
        if mask is None:
            masks.append(jnp.ones(jnp.shape(h), dtype=bool))
            continue
        if jnp.shape(mask) != jnp.shape(h):
            raise ValueError(f"{name}_mask {jnp.shape(mask)} must have the shape of "
                             f"{name}_h {jnp.shape(h)}")
        masks.append(jnp.asarray(mask) != 0)
    return masks[0], masks[1]


def _member_values(div, h, mask):
    """Per-member f'(u) in a scaled form, safe for any value at padded members.

    Returns (g_scaled [B, N], log_scale [B, N]) with f'(u) = g_scaled * exp(log_scale) up to an
    additive constant (constants cancel in a difference of group means and in variances). The
    magnitudes are kept in log space for forward KL / alpha, whose f'(u) = -u^(-a)/a overflows
    float32 for h below about -88/a while its log magnitude does not.
    """
    h = jnp.where(mask, as_float32(h), 0.0)  # first where: padded garbage never enters math
    if div.power is not None:  # forward KL (a = 1) / alpha
        a = div.power
        log_mag = -a * h - jnp.log(a)  # log |f'(u) - 1/a| = log(u^-a / a)
        return -jnp.ones_like(h), log_mag
    g = h if div.name == "reverse_kl" else jax.nn.log_sigmoid(h)  # jsd: log(2u/(1+u)) - log 2
    return g, jnp.zeros_like(h)


def _scaled_stats(g, log_mag, mask, log_s):
    """Masked mean and Bessel variance of v = g exp(log_mag) divided by s = exp(log_s [B]).

    Returns (mean [B], var [B], count [B]) of v / s; var is 0 where count < 2.
    """
    maskf = mask.astype(jnp.float32)
    count = jnp.sum(maskf, axis=-1)  # [B]
    v = jnp.where(mask, g * jnp.exp(jnp.where(mask, log_mag - log_s[:, None], 0.0)), 0.0)
    mean = jnp.sum(v, axis=-1) / jnp.maximum(count, 1.0)
    dev = jnp.where(mask, v - mean[:, None], 0.0)
    var = jnp.sum(jnp.square(dev), axis=-1) / jnp.maximum(count - 1.0, 1.0)  # K-1 denominator
    return mean, jnp.where(count >= 2.0, var, 0.0), count


def _row_log_scale(g, log_mag, mask, floor):
    """log of max(floor, max over valid members of |g| exp(log_mag)), per row, no gradient."""
    log_abs = jnp.where(mask, jnp.log(jnp.maximum(jnp.abs(g), 1e-30)) + log_mag, -jnp.inf)
    return jax.lax.stop_gradient(jnp.maximum(jnp.max(log_abs, axis=-1), floor))


def _safe_masks(chosen_mask, rejected_mask):
    """Examples with an empty group get all-True masks (their values are zeroed anyway)."""
    empty = ~(jnp.any(chosen_mask, axis=-1) & jnp.any(rejected_mask, axis=-1))  # [B]
    return empty, chosen_mask | empty[:, None], rejected_mask | empty[:, None]


def _margin(div, chosen_h, rejected_h, chosen_mask, rejected_mask, beta=None):
    """(mean_k f'(u_w,k) - mean_l f'(u_l,l) [B], zero_rows [B]) on validated boolean masks.

    zero_rows marks examples whose mDPO loss is 0: an empty group, or (when `beta` is given)
    a margin so large that -log sigmoid(beta margin) underflows to 0; their margin reads 0.
    """
    empty, cm, rm = _safe_masks(chosen_mask, rejected_mask)
    if div.power is None:  # reverse KL, JSD
        means = []
        for h, mask, safe in ((chosen_h, chosen_mask, cm), (rejected_h, rejected_mask, rm)):
            g, _ = _member_values(div, h, mask)
            weight = safe.astype(jnp.float32) / jnp.sum(safe, axis=-1, keepdims=True)  # [B, N]
            means.append(jnp.sum(weight * g, axis=-1))  # weight first: no overflow of the sum
        return jnp.where(empty, 0.0, means[0] - means[1]), empty
    # mean_k f'(u_k) = f'(u_eff), log u_eff = -(1/a) log mean_k u_k^(-a): a log-mean-exp.
    a = div.power
    h_eff = []
    for h, mask, safe in ((chosen_h, chosen_mask, cm), (rejected_h, rejected_mask, rm)):
        x = jnp.where(mask, -a * as_float32(h), 0.0)  # -a h, [B, N]
        m = jax.lax.stop_gradient(jnp.max(jnp.where(safe, x, -jnp.inf), axis=-1))  # [B]
        total = jnp.sum(jnp.where(safe, jnp.exp(x - m[:, None]), 0.0), axis=-1)  # >= 1
        log_mean = m + jnp.log(total) - jnp.log(jnp.sum(safe, axis=-1).astype(jnp.float32))
        h_eff.append(-log_mean / a)  # log u_eff, [B]
    if beta is not None:
        # margin = (e^p - e^q)/a with p = -a h_eff_l, q = -a h_eff_w. Where beta * margin > 104,
        # -log sigmoid(-beta margin) is exactly 0 in float32; the margin itself may overflow
        # there (and 0 * inf = NaN in its gradient), so those rows are computed on zeros.
        p_, q_ = -a * h_eff[1], -a * h_eff[0]
        gap = jnp.abs(p_ - q_)
        log_margin = (jnp.maximum(p_, q_) + jnp.log(-jnp.expm1(-jnp.maximum(gap, 1e-30)))
                      - jnp.log(a))
        saturated = (p_ > q_) & (jnp.log(as_float32(beta)) + log_margin > math.log(104.0))
        saturated = jax.lax.stop_gradient(saturated)
        h_eff = [jnp.where(saturated, 0.0, h) for h in h_eff]
        empty = empty | saturated
    return jnp.where(empty, 0.0, div.f_prime_difference(h_eff[0], h_eff[1])), empty


def group_margin(chosen_h: jax.Array, rejected_h: jax.Array, *, divergence: str = "reverse_kl",
                 alpha: float | jax.Array | None = None, chosen_mask: jax.Array | None = None,
                 rejected_mask: jax.Array | None = None) -> jax.Array:
    """Difference of group means of f'(u): mean_k f'(u_w,k) - mean_l f'(u_l,l), [B] float32.

    For reverse KL this is mean_k h_w - mean_l h_l (§3.5.1). Forward KL / alpha use
    mean_k f'(u_k) = f'(u_eff) with log u_eff = -(1/a) log mean_k u_k^(-a), so the difference is
    taken by `Divergence.f_prime_difference` without forming inf - inf. Examples with an empty
    group give 0.

    Args:
      chosen_h: [B, K] log-ratios of the preferred group.
      rejected_h: [B, L] log-ratios of the dispreferred group.
      divergence, alpha: as in `fdpo_loss`.
      chosen_mask, rejected_mask: [B, K] / [B, L] valid members (default: all valid).
    """
    chosen_mask, rejected_mask = _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask)
    div = get_divergence(divergence, alpha=alpha)
    return _margin(div, chosen_h, rejected_h, chosen_mask, rejected_mask)[0]


def mdpo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, beta: float | jax.Array,
              chosen_mask: jax.Array | None = None, rejected_mask: jax.Array | None = None,
              divergence: str = "reverse_kl", alpha: float | jax.Array | None = None) -> jax.Array:
    """Multi-sample DPO: -log sigmoid(beta mean_k f'(u_w,k) - beta mean_l f'(u_l,l)) (§3.5.1).

    With reverse KL (default) this is the thesis' L_mDPO, -log sigmoid(beta mean h_w -
    beta mean h_l); with K = L = 1 it is DPO (`fdpo_loss`) exactly. The estimator is biased
    for the population mDPO objective (the sigmoid is non-linear, §3.5.2).

    Args:
      chosen_h: [B, K] log-ratios of the preferred group (any float dtype; computed in f32).
      rejected_h: [B, L] log-ratios of the dispreferred group; L may differ from K.
      beta: > 0.
      chosen_mask, rejected_mask: [B, K] / [B, L] bool or 0/1, valid members (default all).
      divergence, alpha: f-divergence of the implicit reward (Table 2.1), as in `fdpo_loss`.

    Returns:
      [B] float32 per-example losses; 0 (and no gradient) where a group has no valid member.

    Raises:
      ValueError: ranks other than 2, batch or mask shape mismatches, beta <= 0, bad divergence.

    Examples:
      >>> import jax.numpy as jnp
      >>> mdpo_loss(jnp.zeros((1, 3)), jnp.zeros((1, 2)), beta=0.1)  # log 2
      Array([0.6931472], dtype=float32)
    """
    check_positive("beta", beta)
    chosen_mask, rejected_mask = _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask)
    div = get_divergence(divergence, alpha=alpha)
    margin, zero = _margin(div, chosen_h, rejected_h, chosen_mask, rejected_mask, beta=beta)
    return jnp.where(zero, 0.0, jax.nn.softplus(-beta * margin))  # -log sigmoid(beta margin)


def _unscale(x, log_s):
    """x * s^2 for s = exp(log_s) [B]: exact (with exact gradient) while s^2 fits in float32,
    +/-inf beyond, and 0 (never 0 * inf = NaN) where x is exactly 0."""
    s = jnp.exp(jnp.minimum(log_s, _LOG_SPLIT))
    rest = jnp.exp(jnp.maximum(log_s - _LOG_SPLIT, 0.0))  # 1 unless s > e^40
    out = (x * s) * s
    big = log_s > _LOG_SPLIT
    return jnp.where(big, jnp.where(x == 0.0, 0.0, (out * rest) * rest), out)


def mipo_loss_with_metrics(chosen_h: jax.Array, rejected_h: jax.Array, *, tau: float | jax.Array,
                           unbiased: bool = True, chosen_mask: jax.Array | None = None,
                           rejected_mask: jax.Array | None = None, divergence: str = "reverse_kl",
                           alpha: float | jax.Array | None = None):
    """`mipo_loss` plus metrics about its variance correction.

    Returns:
      (loss [B] float32, metrics) where metrics is a dict of scalars:
        "num_uncorrected_groups": int32, groups (chosen or rejected, in non-empty examples)
          with exactly one valid member, which get no variance correction;
        "num_empty_examples": int32, examples with an empty group (loss 0);
        "mean_variance_correction": float32, batch mean of var_w/K + var_l/L (0 if biased).
    """
    check_positive("tau", tau)
    chosen_mask, rejected_mask = _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask)
    k, l = jnp.shape(chosen_h)[1], jnp.shape(rejected_h)[1]
    if unbiased and min(k, l) < 2:
        raise ValueError(
            f"unbiased=True needs at least 2 members per group to estimate a variance "
            f"(Proposition 1), got chosen_h {jnp.shape(chosen_h)} and rejected_h "
            f"{jnp.shape(rejected_h)}; use unbiased=False for single samples (IPO)")
    div = get_divergence(divergence, alpha=alpha)
    empty, cm, rm = _safe_masks(chosen_mask, rejected_mask)
    c = 0.5 / as_float32(tau)  # target margin 1/(2 tau)
    gw, lw = _member_values(div, chosen_h, chosen_mask)
    gl, ll = _member_values(div, rejected_h, rejected_mask)
    # Common per-row scale s >= max(1, c, |f'(u)|): every square below stays <= ~4 in float32,
    # and the result is s^2 times a homogeneous quadratic, so it is inf only on true overflow.
    log_s = jnp.maximum(_row_log_scale(gw, lw, cm, 0.0), _row_log_scale(gl, ll, rm, 0.0))
    log_s = jnp.maximum(log_s, jax.lax.stop_gradient(jnp.log(jnp.maximum(c, 1e-30))))
    mean_w, var_w, n_w = _scaled_stats(gw, lw, cm, log_s)
    mean_l, var_l, n_l = _scaled_stats(gl, ll, rm, log_s)
    scale = jnp.exp(-log_s)
    plain = jnp.square(mean_w - mean_l - c * scale)  # thesis' mIPO, divided by s^2
    correction = var_w / jnp.maximum(n_w, 1.0) + var_l / jnp.maximum(n_l, 1.0)  # Prop. 1
    scaled = plain - correction if unbiased else plain
    loss = jnp.where(empty, 0.0, _unscale(scaled, log_s))
    correction = (jnp.where(empty | (correction == 0.0), 0.0, _unscale(correction, log_s))
                  if unbiased else jnp.zeros_like(loss))
    single = (jnp.sum(chosen_mask, -1) == 1).astype(jnp.int32) + (jnp.sum(rejected_mask, -1) == 1)
    metrics = {
        "num_uncorrected_groups": jnp.sum(jnp.where(empty, 0, single)).astype(jnp.int32),
        "num_empty_examples": jnp.sum(empty).astype(jnp.int32),
        "mean_variance_correction": jnp.mean(correction),
    }
    return loss, metrics


def mipo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, tau: float | jax.Array,
              unbiased: bool = True, chosen_mask: jax.Array | None = None,
              rejected_mask: jax.Array | None = None, divergence: str = "reverse_kl",
              alpha: float | jax.Array | None = None) -> jax.Array:
    """Multi-sample IPO with the unbiased mini-batch estimator of Proposition 1 (§3.5.2).

        (mean_k g_w,k - mean_l g_l,l - 1/(2 tau))^2 - var_w / K - var_l / L

    with g = h (reverse KL, the thesis) or g = f'(u) (other divergences), var the sample
    variance with the K-1 (L-1) denominator and K, L the numbers of valid members. Over random
    groups it is unbiased for (E g_w - E g_l - 1/(2 tau))^2 (Prop. 1), so its value can be
    negative. `unbiased=False` drops the correction (the thesis' plain L_mIPO, biased upwards by
    Var(g_w)/K + Var(g_l)/L); with K = L = 1 and unbiased=False it is IPO exactly.

    A group with one valid member gets no correction; an example with an empty group gives 0
    (see the module docstring and `mipo_loss_with_metrics`).

    Args:
      chosen_h: [B, K] log-ratios of the preferred group (any float dtype; computed in f32).
      rejected_h: [B, L] log-ratios of the dispreferred group.
      tau: > 0; the target margin is 1/(2 tau).
      unbiased: subtract the Bessel-corrected variances over the group sizes (Prop. 1).
      chosen_mask, rejected_mask: [B, K] / [B, L] valid members (default all).
      divergence, alpha: f-divergence of the implicit reward (Table 2.1).

    Returns:
      [B] float32 per-example losses.

    Raises:
      ValueError: static K < 2 or L < 2 with unbiased=True; bad ranks/shapes; tau <= 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> mipo_loss(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]]), tau=0.5)  # (2-1)^2 - 2/2
      Array([0.], dtype=float32)
    """
    return mipo_loss_with_metrics(chosen_h, rejected_h, tau=tau, unbiased=unbiased,
                                  chosen_mask=chosen_mask, rejected_mask=rejected_mask,
                                  divergence=divergence, alpha=alpha)[0]


def group_nll_loss(token_logps: jax.Array, token_mask: jax.Array,
                   group_mask: jax.Array | None = None) -> jax.Array:
    """NLL/SFT term of a group (§3.6.1, footnote 3): mean over valid members of `nll_loss`.

    Args:
      token_logps: [B, K, T] per-token log-probabilities of the chosen group's responses.
      token_mask: [B, K, T] True on response tokens.
      group_mask: [B, K] valid members (default all).

    Returns:
      [B] float32; 0 with no gradient for a row without valid members.
    """
    check_rank("token_logps", token_logps, 3)
    if jnp.shape(token_mask) != jnp.shape(token_logps):
        raise ValueError(f"token_mask {jnp.shape(token_mask)} must have the shape of "
                         f"token_logps {jnp.shape(token_logps)}")
    b, k, t = jnp.shape(token_logps)
    if group_mask is None:
        group_mask = jnp.ones((b, k), dtype=bool)
    elif jnp.shape(group_mask) != (b, k):
        raise ValueError(f"group_mask {jnp.shape(group_mask)} must be [B, K] = {(b, k)}")
    group_mask = jnp.asarray(group_mask) != 0
    per_member = nll_loss(jnp.reshape(token_logps, (b * k, t)),  # [B*K, T]
                          jnp.reshape(token_mask, (b * k, t)))
    per_member = jnp.where(group_mask, jnp.reshape(per_member, (b, k)), 0.0)  # [B, K]
    count = jnp.sum(group_mask, axis=-1)
    return jnp.sum(per_member, axis=-1) / jnp.maximum(count, 1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------
# Objective configs (the contract is in alignax.objectives.registry): mDPO and mIPO on the
# step's grouped scores [B, K].

import dataclasses  # noqa: E402
from typing import ClassVar  # noqa: E402

from alignax.objectives.fdpo import check_divergence  # noqa: E402
from alignax.objectives.registry import (CAUSAL_LM, GROUPED_FORMATS, PAIR_ROLES,  # noqa: E402
                                         Needs, Objective, ObjectiveInputs, check_hyper,
                                         group_mean, pair_metrics, register)
from alignax.schedules import Hyper  # noqa: E402

_GROUPED = Needs(model=CAUSAL_LM, roles=PAIR_ROLES, formats=GROUPED_FORMATS, grouped=True)


@register("mdpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MDPO(Objective):
    """Multi-sample DPO (§3.5.1) on groups of chosen / rejected responses: `mdpo_loss`.

    Attributes:
      beta: > 0 (or a schedule).
      divergence, alpha: f-divergence of the implicit reward (Table 2.1), as in `FDPO`.
      nll_weight: >= 0 (or a schedule), weight of the SFT term averaged over the chosen group
        (`group_nll_loss`, thesis ch. 3 footnote 3).
    """

    beta: Hyper = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = _GROUPED
    hyper_parameters: ClassVar[tuple[str, ...]] = ("beta", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "beta", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        check_divergence(self)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"], x.scores["rejected"]  # h, masks [B, K] / [B, L]
        loss = mdpo_loss(chosen.h, rejected.h, beta=hp["beta"], chosen_mask=chosen.group_mask,
                         rejected_mask=rejected.group_mask, divergence=self.divergence,
                         alpha=self.alpha)  # §3.5.1
        return loss, pair_metrics(group_mean(chosen.h, chosen.group_mask),
                                  group_mean(rejected.h, rejected.group_mask), hp["beta"])


@register("mipo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MIPO(Objective):
    """Multi-sample IPO with the unbiased mini-batch estimator of Proposition 1: `mipo_loss`.

    Attributes:
      tau: > 0 (or a schedule); the target margin is 1/(2 tau).
      unbiased: subtract var_w/K + var_l/L (Prop. 1); needs groups of >= 2 members.
      divergence, alpha: as in `MDPO`.
      nll_weight: >= 0 (or a schedule), as in `MDPO`.
    """

    tau: Hyper = 0.1
    unbiased: bool = True
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = _GROUPED
    hyper_parameters: ClassVar[tuple[str, ...]] = ("tau", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "tau", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        check_divergence(self)
        if not isinstance(self.unbiased, bool):
            raise TypeError(f"mipo: unbiased must be a bool, got {self.unbiased!r}")

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"], x.scores["rejected"]
        loss, extra = mipo_loss_with_metrics(
            chosen.h, rejected.h, tau=hp["tau"], unbiased=self.unbiased,
            chosen_mask=chosen.group_mask, rejected_mask=rejected.group_mask,
            divergence=self.divergence, alpha=self.alpha)  # Prop. 1
        return loss, {**pair_metrics(group_mean(chosen.h, chosen.group_mask),
                                     group_mean(rejected.h, rejected.group_mask)),
                      **{f"mipo/{k}": v for k, v in extra.items()}}
