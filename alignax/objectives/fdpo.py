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
