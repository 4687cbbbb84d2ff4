"""Objective adapters: an objective chosen by config, as a function of the batch's log-ratios.

An adapter is `objective(policy_logps, reference_logps, batch, *, step, key) -> (loss [B], metrics)`:

- `policy_logps` / `reference_logps`: role -> per-sequence log-probs, [B] for a pair's
  "chosen"/"rejected" responses (`reference_logps` is None for objectives that need no
  reference);
- `batch`: the whole batch, for side columns (masks, "bin", target rewards);
- `step`: [] int32 update count (for schedules of the objective's hyper-parameters);
- `key`: PRNG key of this (micro-)step, `fold_in(root key, step)`, for stochastic objectives;
- returns unreduced per-example float32 losses and a dict of scalar metrics.

The step (`alignax.training.step.make_train_step`) computes the log-probs of the roles an
adapter declares and never looks inside the objective, so a new objective needs no change to
the loop: register a builder with `register_objective`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from alignax.divergences import get_divergence
from alignax.objectives import fdpo_loss, ipo_loss

Metrics = dict[str, jax.Array]
ObjectiveFn = Callable[..., tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective, and its hyper-parameters (unused fields are ignored by an objective).

    name: a key of `OBJECTIVES` ("fdpo", "dpo", "ipo", ...).
    nll_weight: weight of the SFT term mean_t -log pi(y_w,t) added to every objective
      (thesis ch. 3, footnote 3); 0 disables it.
    """

    name: str = "fdpo"
    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None
    tau: float = 0.1
    nll_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class Objective:
    """An adapter plus what the step must compute for it.

    Attributes:
      name: for logs.
      fn: (policy_logps, reference_logps, batch, *, step, key) -> (loss [B], metrics).
      roles: batch column prefixes whose sequences are scored ("chosen", "rejected", ...).
      uses_reference: whether `reference_logps` is needed.
    """

    name: str
    fn: ObjectiveFn
    roles: tuple[str, ...] = ("chosen", "rejected")
    uses_reference: bool = True

    def __call__(self, policy_logps, reference_logps, batch, *, step, key):
        return self.fn(policy_logps, reference_logps, batch, step=step, key=key)


def response_token_count(batch, role: str) -> jax.Array:
    """[B] number of scored response tokens of `role` (loss-mask positions after the first)."""
    loss_mask = jnp.asarray(batch[f"{role}_loss_mask"]).astype(jnp.float32)
    return jnp.sum(loss_mask[..., 1:], axis=-1)  # position 0 is never a next-token target


def pairwise_reward_metrics(chosen_h: jax.Array, rejected_h: jax.Array, beta: float) -> Metrics:
    """TRL-style implicit-reward metrics beta * h of a pair batch ([B] each)."""
    chosen_r, rejected_r = beta * chosen_h, beta * rejected_h
    return {"rewards/chosen": jnp.mean(chosen_r), "rewards/rejected": jnp.mean(rejected_r),
            "rewards/margins": jnp.mean(chosen_r - rejected_r),
            "rewards/accuracies": jnp.mean((chosen_r > rejected_r).astype(jnp.float32))}


def _log_ratios(policy_logps, reference_logps, *roles):
    return tuple(policy_logps[r] - reference_logps[r] for r in roles)


def _fdpo(config: ObjectiveConfig) -> Objective:
    divergence = get_divergence(config.divergence, alpha=config.alpha)

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del batch, step, key
        chosen_h, rejected_h = _log_ratios(policy_logps, reference_logps, "chosen", "rejected")
        loss = fdpo_loss(chosen_h, rejected_h, beta=config.beta, divergence=config.divergence,
                         alpha=config.alpha)  # thesis eq. 2.2
        margin = divergence.f_prime_difference(chosen_h, rejected_h)
        return loss, {**pairwise_reward_metrics(chosen_h, rejected_h, config.beta),
                      "fdpo/f_prime_margin": jnp.mean(margin)}

    return Objective(f"fdpo[{config.divergence}]", fn)


def _dpo(config: ObjectiveConfig) -> Objective:
    return _fdpo(dataclasses.replace(config, divergence="reverse_kl", alpha=None))


def _ipo(config: ObjectiveConfig) -> Objective:
    def fn(policy_logps, reference_logps, batch, *, step, key):
        del batch, step, key
        chosen_h, rejected_h = _log_ratios(policy_logps, reference_logps, "chosen", "rejected")
        return (ipo_loss(chosen_h, rejected_h, tau=config.tau),
                pairwise_reward_metrics(chosen_h, rejected_h, 1.0))

    return Objective("ipo", fn)


def _sft(config: ObjectiveConfig) -> Objective:
    """Supervised fine-tuning on the "chosen" responses: mean_t -log pi(y_t) per example."""
    del config

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del reference_logps, step, key
        count = response_token_count(batch, "chosen")
        return -policy_logps["chosen"] / jnp.maximum(count, 1.0), {}

    return Objective("sft", fn, roles=("chosen",), uses_reference=False)


OBJECTIVES: dict[str, Callable[[ObjectiveConfig], Objective]] = {
    "sft": _sft,
    "fdpo": _fdpo,
    "dpo": _dpo,
    "ipo": _ipo,
}
"""Objective name -> builder from an `ObjectiveConfig`."""


def register_objective(name: str, builder: Callable[[ObjectiveConfig], Objective]) -> None:
    """Adds an objective builder under `name` (a new objective needs nothing else)."""
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    OBJECTIVES[name] = builder


def with_nll(objective: Objective, weight: float) -> Objective:
    """`objective` plus weight * mean_t -log pi(y_w,t) on the chosen responses ([B])."""
    if weight == 0.0:
        return objective

    def fn(policy_logps, reference_logps, batch, *, step, key):
        loss, metrics = objective(policy_logps, reference_logps, batch, step=step, key=key)
        nll = -policy_logps["chosen"] / jnp.maximum(response_token_count(batch, "chosen"), 1.0)
        return loss + weight * nll, {**metrics, "nll": jnp.mean(nll)}

    return dataclasses.replace(objective, name=f"{objective.name}+nll", fn=fn)


def make_objective(config: ObjectiveConfig) -> Objective:
    """The adapter named by `config.name`, with the NLL term when `config.nll_weight` != 0."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.name!r}; known: {sorted(OBJECTIVES)}")
    return with_nll(OBJECTIVES[config.name](config), config.nll_weight)
