"""Bradley-Terry reward learning: the pairwise loss, a reward-centering term, accuracy/margin.

These are the reward-model halves of the causal reward objective of thesis §4.5.1
(`alignax.objectives.causal` adds the MMD regulariser). Every loss returns unreduced
per-example float32 values; the caller takes the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_same_shape


def bradley_terry_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
                       margin: float | jax.Array = 0.0) -> jax.Array:
    """Bradley-Terry negative log-likelihood -log sigmoid(r_w - r_l - margin).

    The first term of the causal reward objective of thesis §4.5.1 (with margin 0). A positive
    margin asks the chosen reward to exceed the rejected one by at least about `margin`
    (Touvron et al., 2023, Llama 2 eq. 2). Computed as softplus(-(r_w - r_l - margin)): finite
    for any finite input, linear (not inf) for very negative margins.

    Args:
      chosen_rewards: [B] rewards r(x, y_w) of the preferred responses (any float dtype).
      rejected_rewards: [B] rewards r(x, y_l) of the dispreferred responses.
      margin: scalar or [B], the required reward gap.

    Returns:
      [B] float32 per-example losses.

    Raises:
      ValueError: if the two reward arrays have different shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> bradley_terry_loss(jnp.array([0.0, 1.0]), jnp.array([0.0, 0.0]))
      Array([0.6931472, 0.3132617], dtype=float32)
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    gap = as_float32(chosen_rewards) - as_float32(rejected_rewards) - as_float32(margin)
    return jax.nn.softplus(-gap)  # -log sigmoid(r_w - r_l - margin), §4.5.1


def reward_centering_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
                          coefficient: float | jax.Array) -> jax.Array:
    """Reward-centering auxiliary term coefficient * (r_w + r_l)^2 (Eisenstein et al., 2023).

    The Bradley-Terry likelihood only sees reward differences, so rewards can drift by a
    per-prompt constant; this term pins the pair mean to zero. Add it to
    `bradley_terry_loss` (typical coefficient 0.01).

    Args:
      chosen_rewards: [B] rewards of the preferred responses.
      rejected_rewards: [B] rewards of the dispreferred responses.
      coefficient: >= 0 weight.

    Returns:
      [B] float32.
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if isinstance(coefficient, (int, float)) and coefficient < 0:
        raise ValueError(f"coefficient must be >= 0, got {coefficient!r}")
    total = as_float32(chosen_rewards) + as_float32(rejected_rewards)
    return as_float32(coefficient) * jnp.square(total)


def reward_accuracy(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
    """Per-pair ranking accuracy: 1 if r_w > r_l, 0.5 on a tie, 0 otherwise. [B] float32."""
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    gap = as_float32(chosen_rewards) - as_float32(rejected_rewards)
    return jnp.where(gap > 0, 1.0, jnp.where(gap == 0, 0.5, 0.0)).astype(jnp.float32)


def reward_margin(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
    """Per-pair reward margin r_w - r_l. [B] float32."""
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return as_float32(chosen_rewards) - as_float32(rejected_rewards)


# ------------------------------------------------------------------------------------------
# Objective config (the contract is in alignax.objectives.registry): Bradley-Terry reward
# model training on the step's reward-model scores.

import dataclasses  # noqa: E402
import math  # noqa: E402
from typing import ClassVar  # noqa: E402

from alignax.objectives.registry import (PAIR_FORMATS, PAIR_ROLES, REWARD_MODEL,  # noqa: E402
                                         Needs, Objective, ObjectiveInputs, check_hyper,
                                         pair_metrics, register)
from alignax.schedules import Hyper  # noqa: E402


def per_example(x: jax.Array) -> jax.Array:
    """[B, *heads] -> [B]: the mean over any reward heads / ensemble members after the batch."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


@register("bradley_terry")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BradleyTerry(Objective):
    """Reward-model training, -log sigmoid(r_w - r_l - margin) (`bradley_terry_loss`, §4.5.1).

    Trains a `RewardModel` (or a multi-head model / `RewardEnsemble`: every head's loss,
    averaged). Attributes: margin (any finite number, or a schedule).
    """

    margin: Hyper = 0.0

    needs: ClassVar[Needs] = Needs(model=REWARD_MODEL, roles=PAIR_ROLES, formats=PAIR_FORMATS,
                                   reference=False)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("margin",)

    def __post_init__(self):
        check_hyper(self, "margin", low=-math.inf)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"].policy, x.scores["rejected"].policy  # [B, *heads]
        loss = bradley_terry_loss(chosen, rejected, margin=hp["margin"])
        return per_example(loss), pair_metrics(per_example(chosen), per_example(rejected))
