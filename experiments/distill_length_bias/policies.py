"""The six policies of 004 Figure 2, their evaluation by the oracle, and the Figure C.1 analysis.

Methods (004 §4.1), each from pi_SFT with pi_SFT as the reference:

    dpo     DPO on D_rho (004 eq. 6)                       `alignax.objectives.DPO(beta)`
    ipo     IPO on D_rho                                   `IPO(tau)`
    d-dpo   distillation of r_rho on D_rho's pairs (eq. 7)  `Distill(beta)`
    p-dpo   DPO + gamma forward KL (eq. 13)                `PessimisticDPO(beta, gamma)`
    pd-dpo  eq. 11 with the confidence set {r_rho}          `PessimisticDistill(beta, gamma)`
    e-dpo   eq. 11 with {r_{rho,b} : b in B}                `PessimisticDistill(beta, gamma)`

gamma follows `alignax.schedules.pessimism_schedule(policy_steps)`, the linear 1e-4 -> 1e-2
annealing of 004 §4.1 over the whole run, evaluated inside the train step at each update.
The distillation methods read D_rho's pairs without their labels ("unlabeled" records, the
responses in the generator's order) with target rewards from the reward models.

Evaluation (004 §4.1): K samples per held-out prompt at temperature 1, scored by the oracle;
the per-prompt mean minus pi_SFT's per-prompt mean (its own K samples) is the oracle advantage.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from alignax.eval import SamplingConfig, encode_prompts, sample
from alignax.objectives import (DPO, IPO, Distill, Objective, PessimisticDistill,
                                PessimisticDPO, pessimistic_distill_loss)
from alignax.schedules import pessimism_schedule
from experiments.distill_length_bias.world import World, sentences, USEFUL_TIPS

METHODS = ("dpo", "ipo", "d-dpo", "p-dpo", "pd-dpo", "e-dpo")
"""The policies compared in 004 Figure 2."""

DISTILLED = ("d-dpo", "pd-dpo", "e-dpo")
"""Methods that train on unlabeled pairs with target rewards from reward models."""


def hyper_name(method: str) -> str:
    """The swept hyper-parameter: "tau" for IPO, "beta" for the others (004 §4.1)."""
    _check_method(method)
    return "tau" if method == "ipo" else "beta"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def make_objective(method: str, value: float, *, policy_steps: int) -> Objective:
    """The objective config of `method` with its swept hyper-parameter at `value`."""
    _check_method(method)
    gamma = pessimism_schedule(policy_steps)  # 004 §4.1: 1e-4 -> 1e-2 over training
    return {"dpo": lambda: DPO(beta=value),
            "ipo": lambda: IPO(tau=value),
            "d-dpo": lambda: Distill(beta=value),
            "p-dpo": lambda: PessimisticDPO(beta=value, gamma=gamma),
            "pd-dpo": lambda: PessimisticDistill(beta=value, gamma=gamma),
            "e-dpo": lambda: PessimisticDistill(beta=value, gamma=gamma)}[method]()


@dataclasses.dataclass(frozen=True)
class SampleStats:
    """Per-prompt means over K samples ([P] each) of one policy on one prompt set."""

    oracle: np.ndarray
    sentences: np.ndarray
    tokens: np.ndarray
    useful: np.ndarray  # share of the sentences that are useful tips

    def as_dict(self) -> dict[str, list[float]]:
        return {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(self).items()}


class Evaluator:
    """Samples K responses per prompt of a prompt set and scores them with the oracle.

    Every call has the same compiled shapes (`SamplingConfig.prompt_length` fixed), so every
    policy shares one compilation of the sampler.
    """

    def __init__(self, world: World, tokenizer, prompts: tuple[int, ...], *, num_samples: int,
                 max_new_tokens: int, prompt_length: int, batch_size: int):
        self.world, self.tokenizer, self.prompts = world, tokenizer, prompts
        self.prompt_ids, self.prompt_mask = encode_prompts(
            tokenizer, [world.prompts[i] for i in prompts], prompt_length=prompt_length)
        self.config = SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id,
                                     batch_size=batch_size, prompt_length=prompt_length)

    def __call__(self, model, key: jax.Array) -> SampleStats:
        samples = sample(model, self.prompt_ids, self.prompt_mask, key=key, config=self.config)
        eos = np.isin(samples.tokens, self.config.eos_ids) & samples.mask  # [P, K, N]
        return score_texts(self.world, self.prompts, samples.texts(self.tokenizer),
                           samples.lengths - eos.sum(-1))


def score_texts(world: World, prompts: tuple[int, ...], texts: list[list[str]],
                tokens: np.ndarray) -> SampleStats:
    """Per-prompt means of the oracle reward, the number of sentences, the response tokens
    (`tokens` [P, K], EOS not counted) and the share of useful tips, of P x K response texts."""
    oracle = np.array([[world.reward(p, t) for t in row] for p, row in zip(prompts, texts)])
    parts = [[sentences(t) for t in row] for row in texts]
    count = np.array([[len(s) for s in row] for row in parts], np.float64)
    useful = np.array([[sum(x in USEFUL_TIPS for x in s) / max(len(s), 1) for s in row]
                       for row in parts])
    return SampleStats(oracle.mean(1), count.mean(1), np.asarray(tokens, np.float64).mean(1),
                       useful.mean(1))


def best_members(h_1: np.ndarray, h_2: np.ndarray, rewards_1: np.ndarray,
                 rewards_2: np.ndarray, *, beta: float) -> np.ndarray:
    """[N] int: for each pair, the ensemble member whose distillation loss (004 eq. 7) against
    the policy's implicit reward is smallest (004 §4.2, Figure C.1): the "per_example_member"
    of `pessimistic_distill_loss`.

    Args:
      h_1, h_2: [N] log-ratios log pi/pi_ref of the pairs' responses under the final policy.
      rewards_1, rewards_2: [N, E] the members' target rewards.
      beta: the policy's beta.
    """
    _, aux = pessimistic_distill_loss(h_1, h_2, np.asarray(rewards_1).T,
                                      np.asarray(rewards_2).T, beta=beta, gamma=0.0)
    return np.asarray(aux["per_example_member"])
