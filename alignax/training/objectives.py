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
from alignax.objectives import (bradley_terry_loss, causal_dpo_loss, causal_reward_loss,
                                distill_loss, fdpo_loss, ipo_loss, pessimistic_distill_loss,
                                pessimistic_dpo_loss)
from alignax.objectives.multisample import mdpo_loss, mipo_loss_with_metrics

Metrics = dict[str, jax.Array]
ObjectiveFn = Callable[..., tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective, and its hyper-parameters (unused fields are ignored by an objective).

    name: a key of `OBJECTIVES` ("sft", "bradley_terry", "causal_reward", "fdpo", "dpo",
      "ipo", "mdpo", "mipo", "causal_dpo",
      "distill", "pessimistic_distill" (pd-DPO with one reward, e-DPO with an ensemble),
      "pessimistic_dpo").
    beta, divergence, alpha: f-DPO temperature and divergence (all log-ratio objectives).
    tau: IPO / mIPO regularisation; unbiased: mIPO's variance correction (Prop. 1).
    lam, num_bins, bandwidth, conditional: Causal DPO's MMD weight, number of bins of the
      "bin" column, Gaussian bandwidth (None: median heuristic), conditional variant.
    gamma: weight of the forward-KL term of the pessimistic objectives (004 eq. 11, 13).
    margin: Bradley-Terry margin of the reward-model objectives ("bradley_terry",
      "causal_reward", which train a RewardModel instead of a policy).
    nll_weight: weight of the SFT term mean_t -log pi(y_w,t) added to every objective
      (thesis ch. 3, footnote 3); 0 disables it.
    """

    name: str = "fdpo"
    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None
    tau: float = 0.1
    unbiased: bool = True
    lam: float = 1.0
    num_bins: int = 2
    bandwidth: float | None = None
    conditional: bool = False
    gamma: float = 0.0
    margin: float = 0.0
    nll_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class Objective:
    """An adapter plus what the step must compute for it.

    Attributes:
      name: for logs.
      fn: (policy_logps, reference_logps, batch, *, step, key) -> (loss [B], metrics).
      roles: batch column prefixes whose sequences are scored ("chosen", "rejected", ...).
      uses_reference: whether `reference_logps` is needed.
      scores: "logprobs" (a CausalLM policy: summed response log-probs per role) or
        "rewards" (a RewardModel being trained: its scalar score per role, in place of
        `policy_logps`).
    """

    name: str
    fn: ObjectiveFn
    roles: tuple[str, ...] = ("chosen", "rejected")
    uses_reference: bool = True
    scores: str = "logprobs"

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


def _mdpo(config: ObjectiveConfig) -> Objective:
    """Multi-sample DPO on grouped batches: chosen/rejected log-probs [B, K] (§3.5.1)."""

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del step, key
        chosen_h, rejected_h = _log_ratios(policy_logps, reference_logps, "chosen", "rejected")
        chosen_mask, rejected_mask = batch["chosen_group_mask"], batch["rejected_group_mask"]
        loss = mdpo_loss(chosen_h, rejected_h, beta=config.beta, chosen_mask=chosen_mask,
                         rejected_mask=rejected_mask, divergence=config.divergence,
                         alpha=config.alpha)
        return loss, pairwise_reward_metrics(_group_mean(chosen_h, chosen_mask),
                                             _group_mean(rejected_h, rejected_mask), config.beta)

    return Objective("mdpo", fn)


def _mipo(config: ObjectiveConfig) -> Objective:
    """Multi-sample IPO with the unbiased mini-batch estimator (Prop. 1) on grouped batches."""

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del step, key
        chosen_h, rejected_h = _log_ratios(policy_logps, reference_logps, "chosen", "rejected")
        chosen_mask, rejected_mask = batch["chosen_group_mask"], batch["rejected_group_mask"]
        loss, extra = mipo_loss_with_metrics(
            chosen_h, rejected_h, tau=config.tau, unbiased=config.unbiased,
            chosen_mask=chosen_mask, rejected_mask=rejected_mask, divergence=config.divergence,
            alpha=config.alpha)
        return loss, {**pairwise_reward_metrics(_group_mean(chosen_h, chosen_mask),
                                                _group_mean(rejected_h, rejected_mask), 1.0),
                      **{f"mipo/{k}": v for k, v in extra.items()}}

    return Objective("mipo", fn)


def _group_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, K] -> [B] mean over the valid members of each group."""
    mask = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(h * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _causal_dpo(config: ObjectiveConfig) -> Objective:
    """Causal DPO (thesis eq. 4.4): f-DPO + lam * binned MMD^2 of the log-ratios over "bin"."""
    bandwidth = "median" if config.bandwidth is None else config.bandwidth

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del step, key
        chosen_h, rejected_h = _log_ratios(policy_logps, reference_logps, "chosen", "rejected")
        chosen_bins = batch.get("chosen_bin", batch["bin"])
        rejected_bins = batch.get("rejected_bin", batch["bin"])
        loss = causal_dpo_loss(chosen_h, rejected_h, chosen_bins, rejected_bins,
                               beta=config.beta, lam=config.lam, num_bins=config.num_bins,
                               bandwidth=bandwidth, divergence=config.divergence,
                               alpha=config.alpha, conditional=config.conditional)
        dpo = fdpo_loss(chosen_h, rejected_h, beta=config.beta, divergence=config.divergence,
                        alpha=config.alpha)
        return loss, {**pairwise_reward_metrics(chosen_h, rejected_h, config.beta),
                      "causal/mmd_term": jnp.mean(loss - dpo)}

    return Objective("causal_dpo", fn)


def _distill(config: ObjectiveConfig) -> Objective:
    """d-DPO on unlabeled pairs with target rewards (004 eq. 7)."""

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del step, key
        h_1, h_2 = _log_ratios(policy_logps, reference_logps, "response_1", "response_2")
        loss = distill_loss(h_1, h_2, batch["target_rewards_1"], batch["target_rewards_2"],
                            beta=config.beta, divergence=config.divergence, alpha=config.alpha)
        return loss, {"distill/implicit_margin": jnp.mean(config.beta * (h_1 - h_2))}

    return Objective("distill", fn, roles=("response_1", "response_2"))


def _pessimistic_distill(config: ObjectiveConfig) -> Objective:
    """pd-DPO / e-DPO (004 eq. 11): min over the target-reward ensemble [E, B] of the batch
    distillation loss plus gamma * forward KL, the pair responses standing in for pi_ref draws.
    The loss is a batch scalar (the min is per mini-batch), spread evenly over the B rows."""

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del step, key
        h_1, h_2 = _log_ratios(policy_logps, reference_logps, "response_1", "response_2")
        rewards_1, rewards_2 = batch["target_rewards_1"], batch["target_rewards_2"]
        if rewards_1.ndim == 1:  # one target reward model: pd-DPO, E = 1
            rewards_1, rewards_2 = rewards_1[None], rewards_2[None]
        loss, aux = pessimistic_distill_loss(h_1, h_2, rewards_1, rewards_2, beta=config.beta,
                                             gamma=config.gamma, divergence=config.divergence,
                                             alpha=config.alpha)
        return jnp.broadcast_to(loss, h_1.shape), {
            "pessimistic/argmin_member": aux["member"], "pessimistic/distill": aux["distill"],
            "pessimistic/forward_kl": aux["forward_kl"],
            "pessimistic/gamma": jnp.asarray(config.gamma, jnp.float32)}

    return Objective("pessimistic_distill", fn, roles=("response_1", "response_2"))


def _pessimistic_dpo(config: ObjectiveConfig) -> Objective:
    """p-DPO (004 eq. 13): f-DPO plus gamma * forward KL on the pair responses."""

    def fn(policy_logps, reference_logps, batch, *, step, key):
        del batch, step, key
        chosen_h, rejected_h = _log_ratios(policy_logps, reference_logps, "chosen", "rejected")
        loss = pessimistic_dpo_loss(chosen_h, rejected_h, beta=config.beta, gamma=config.gamma,
                                    divergence=config.divergence, alpha=config.alpha)
        return loss, {**pairwise_reward_metrics(chosen_h, rejected_h, config.beta),
                      "pessimistic/gamma": jnp.asarray(config.gamma, jnp.float32)}

    return Objective("pessimistic_dpo", fn)


def _reward_metrics(chosen_r: jax.Array, rejected_r: jax.Array) -> Metrics:
    return {"rewards/chosen": jnp.mean(chosen_r), "rewards/rejected": jnp.mean(rejected_r),
            "rewards/margins": jnp.mean(chosen_r - rejected_r),
            "rewards/accuracies": jnp.mean((chosen_r > rejected_r).astype(jnp.float32))}


def _bradley_terry(config: ObjectiveConfig) -> Objective:
    """Reward-model training: -log sigmoid(r_w - r_l - margin) on the model's scores."""

    def fn(rewards, reference_logps, batch, *, step, key):
        del reference_logps, batch, step, key
        loss = bradley_terry_loss(rewards["chosen"], rewards["rejected"], margin=config.margin)
        return loss, _reward_metrics(rewards["chosen"], rewards["rejected"])

    return Objective("bradley_terry", fn, uses_reference=False, scores="rewards")


def _causal_reward(config: ObjectiveConfig) -> Objective:
    """Causal reward model (thesis §4.5.1): Bradley-Terry + lam * binned MMD^2 over "bin"."""
    bandwidth = "median" if config.bandwidth is None else config.bandwidth

    def fn(rewards, reference_logps, batch, *, step, key):
        del reference_logps, step, key
        chosen_r, rejected_r = rewards["chosen"], rewards["rejected"]
        loss = causal_reward_loss(chosen_r, rejected_r, batch.get("chosen_bin", batch["bin"]),
                                  batch.get("rejected_bin", batch["bin"]), lam=config.lam,
                                  num_bins=config.num_bins, bandwidth=bandwidth,
                                  conditional=config.conditional, margin=config.margin)
        plain = bradley_terry_loss(chosen_r, rejected_r, margin=config.margin)
        return loss, {**_reward_metrics(chosen_r, rejected_r),
                      "causal/mmd_term": jnp.mean(loss - plain)}

    return Objective("causal_reward", fn, uses_reference=False, scores="rewards")


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
    "bradley_terry": _bradley_terry,
    "causal_reward": _causal_reward,
    "mdpo": _mdpo,
    "mipo": _mipo,
    "causal_dpo": _causal_dpo,
    "distill": _distill,
    "pessimistic_distill": _pessimistic_distill,
    "pessimistic_dpo": _pessimistic_dpo,
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
    if "chosen" not in objective.roles or objective.scores != "logprobs":
        raise ValueError(f"nll_weight needs chosen responses; {objective.name} scores "
                         f"{objective.roles}")

    def fn(policy_logps, reference_logps, batch, *, step, key):
        loss, metrics = objective(policy_logps, reference_logps, batch, step=step, key=key)
        nll = -policy_logps["chosen"] / jnp.maximum(response_token_count(batch, "chosen"), 1.0)
        if nll.ndim == 2:  # grouped [B, K]: mean over the chosen group's members
            nll = _group_mean(nll, batch["chosen_group_mask"])
        return loss + weight * nll, {**metrics, "nll": jnp.mean(nll)}

    return dataclasses.replace(objective, name=f"{objective.name}+nll", fn=fn)


def make_objective(config: ObjectiveConfig) -> Objective:
    """The adapter named by `config.name`, with the NLL term when `config.nll_weight` != 0."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.name!r}; known: {sorted(OBJECTIVES)}")
    return with_nll(OBJECTIVES[config.name](config), config.nll_weight)
