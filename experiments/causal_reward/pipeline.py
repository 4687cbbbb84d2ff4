"""Causal reward models end to end on language models (thesis ch. 4): `Config`, `run`, `main`.

    python -m experiments.causal_reward                                   # all four studies
    python -m experiments.causal_reward --studies sycophancy,concept --seeds 0,1,2

For each study in `config.studies` (`studies.STUDIES`):

1. data: the study's builder (embedded default: programmatic data in the embedded tokenizer's
   reach; or the thesis' datasets, `PAPER`), written as JSONL under <study>/data;
2. SFT of the policy on the chosen responses;
3. reward models from the SFT model: vanilla Bradley-Terry, and the conditional and
   unconditional CRM (Bradley-Terry + lambda * binned MMD^2 of the rewards over the bins of the
   spurious variable, `alignax.objectives.CausalReward`) for each lambda of `lambdas`; with
   `lora_rank` > 0 (the thesis: rank 64, alpha 128) they train LoRA adapters on every
   projection and on the score head, the SFT weights frozen, and are used merged
   (`alignax.models.lora.merge`) by the metrics and PPO; SFT, PPO and DPO fine-tune every
   parameter, as in the thesis;
4. PPO of the SFT policy against each reward model, once per seed (the thesis averages three
   PPO runs), initial reverse-KL coefficient `kl_coef` (thesis: 0.01); the length study adds
   Figure 4.2's grid: the vanilla RM with a length penalty, and every RM under each KL
   coefficient of `length_kl_coefs`;
5. the §4.8 extension: DPO and Causal DPO (`alignax.objectives.CausalDPO`) on the same pairs,
   once per seed;
6. the chapter's metric on every policy and on every reward model, the table in the thesis'
   layout next to its numbers (mean and 95% t-interval over seeds) and the figure, written to
   <study>/results.md, results.json and PNGs; all studies' tables in summary.md.

The MMD regulariser, as configured here (the thesis gives no kernel, bandwidth or estimator):
Gaussian kernels of fixed bandwidths `bandwidth` on the scalar rewards, the biased
(V-statistic) estimator, averaged over the pairs of bins (`reduction="mean"`), with lambda
ramped linearly from 0 over the first `lambda_warmup` share of the reward model's steps. Why:
the unbiased estimator summed over pairs goes negative and the optimiser drives it down
without bound (the discrimination study's 60 bins have 1,770 pairs); the mean over pairs keeps
one lambda meaningful for 2, 10 or 60 bins, so the thesis' grid applies as written; the
median-heuristic bandwidth, recomputed from the rewards every step without a gradient, lets
each step shrink the MMD by shrinking the rewards, which collapses them to a constant; and
the ramp lets the Bradley-Terry term find the true signal before the regulariser weighs in.

The embedded default (`Config()`) is sized for a shared 2-core machine (about 10-13 min per
study at a load average of 5-8): lambdas {1, 3, 10} of the thesis' grid, an SFT long enough
that the policy writes each study's response format, 100 reward-model steps, PPO of 16
iterations x 32 prompts per seed and 30 DPO steps. `--lambdas 0.1 0.3 0.5 1 3 5 10
--ppo_iterations 40 --rm_steps 300` is the longer run the same code supports. Each study's
results end in a "Claims" list: the chapter's claim per CRM policy against the vanilla-RM
policy (and Causal DPO against DPO), with the per-seed difference, its 95% t-interval and a
verdict (reproduced / opposite / inconclusive), generated from the numbers.

What the committed embedded run (`experiments/results/causal_reward/`) shows; every verdict
below is one of its generated "Claims" lines. Length: every CRM policy (both kinds, every
lambda) and Causal DPO give shorter responses than the vanilla-RM policy and DPO; the
unconditional CRMs at lambda 3 and 10 no longer rank the SFT samples by length (Figure 4.2
right), while the
conditional CRMs still rank longer samples first, as the vanilla RM does; the
win score against the SFT policy is higher for every CRM policy in the point estimate but
clears its interval only for the unconditional CRM at lambda 3 (also against the
length-penalty baseline). Discrimination: both CRM kinds lower the implicit scores (lambda 1
and 10), the unconditional CRM also the explicit ones, and all CRM policies but one decide as
the merit says more often than the vanilla-RM policy; Causal DPO avoids the collapse of DPO, whose
decisions stop following the merit. Sycophancy: the vanilla-RM policy answers with the phrase
on nearly every sample (Table 4.1's direction); five of the six CRM policies' percentages are
lower in the point estimate, all inconclusive at 3 seeds, and PPO against every reward model trades the
correct answer away for the phrase at this size, while Causal DPO keeps most correct answers
and puts the phrase in fewer samples than DPO. Concept: the reward models reach (nearly) full
test accuracy with no Bias@C to remove (the embedded films data do not make the concept a usable
shortcut for a 2-layer model), so the CRM comparisons are inconclusive; DPO collapses the
classifier while Causal DPO keeps a higher Acc@C. At the reward-model level the CRMs meet the
regulariser partly by shrinking the reward scale (the "reward std" column) and partly by
dropping the spurious preference (sycophancy: the phrase's reward gain is smaller under every
CRM); no training loss went negative.

Everything is resumable: a phase restores its newest checkpoint and trains only what is
missing, and a policy's or reward model's measurements are cached as JSON beside it, so a
killed run started again with the same config recomputes only what was not finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.data import default_tokenizer, prepare_dataset
from alignax.models import RewardModel, create, from_pretrained, tiny_config
from alignax.models.lora import LoRAConfig, default_targets, merge
from alignax.objectives import DPO, SFT, BradleyTerry, CausalDPO, CausalReward
from alignax.rl import ModelReward
from alignax.schedules import Linear
from alignax.training.mesh import initialize_distributed, make_mesh
from experiments.causal_reward import length
from experiments.causal_reward.discrimination import decision_prompt
from experiments.causal_reward.evaluation import left_pad
from experiments.causal_reward.phases import (Phases, PPOSettings, RunSettings, fingerprint_of,
                                              reward_model_from_policy)
from experiments.causal_reward.studies import STUDIES, Context, Study
from experiments.causal_reward.tables import row_key
from alignax.trainer.cli import parse_config

log = logging.getLogger("experiments.causal_reward")

CRM_KINDS = ("conditional", "unconditional")


@dataclasses.dataclass(frozen=True)
class Config:
    """Causal reward models (thesis ch. 4): sycophancy, length, concept and discrimination."""

    run_dir: str = "runs/causal_reward"
    studies: tuple[str, ...] = ("sycophancy", "length", "concept", "discrimination")
    seeds: tuple[int, ...] = (0, 1, 2)  # PPO / DPO runs and sampling (reward models: seed 0)
    data_seed: int = 0
    # data: "arithmetic" / "corpus" / "films" / "decisions" (embedded), or a hub id / local file
    num_train: int = 1024
    num_test: int = 0  # 0: each study's default test size
    sycophancy_data: str = "arithmetic"
    length_data: str = "corpus"
    length_bins: int = 10  # M of the length bins (thesis: 10, 20, 30)
    concept_data: str = "films"
    concept_dataset: str = "imdb"  # which of the thesis' datasets concept_data is (table block)
    concept: str = "acting"
    discrimination_data: str = "decisions"
    discrim_eval_data: str = "Anthropic/discrim-eval"
    eval_decisions: int = 0  # decision templates of the embedded evaluation sets (0: all 6)
    # models
    model: str = "tiny"  # "tiny" (embedded Llama, hidden_size x num_layers) or an HF id / dir
    tokenizer: str = "default"  # "default" (embedded) or an HF id / dir
    hidden_size: int = 64
    num_layers: int = 2
    lora_rank: int = 0  # LoRA adapters of the reward models (thesis: 64); 0: full fine-tuning
    lora_alpha: float = 0.0  # LoRA alpha (thesis: 128; scale alpha / rank); 0: 2 * lora_rank
    mesh: tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    compute_dtype: str = "float32"
    max_length: int = 512  # caps on the budgets measured from each study's data
    max_new_tokens: int = 64
    # (max_prompt_length, max_length, max_new_tokens) of every study, each at least what the
    # study's data need (one set of shapes: the studies share compiled steps); (): measured
    token_budgets: tuple[int, ...] = ()
    # SFT on the chosen responses
    sft_steps: int = 600
    sft_batch_size: int = 32
    sft_learning_rate: float = 1e-3
    # reward models
    rm_steps: int = 100
    rm_batch_size: int = 32
    rm_learning_rate: float = 1e-3
    crm_kinds: tuple[str, ...] = CRM_KINDS
    lambdas: tuple[float, ...] = (1.0, 3.0, 10.0)
    bandwidth: tuple[float, ...] = (1.0,)
    mmd_reduction: str = "mean"
    mmd_unbiased: bool = False
    lambda_warmup: float = 0.5
    # PPO against each reward model
    ppo_iterations: int = 16
    ppo_batch_size: int = 32
    ppo_learning_rate: float = 3e-4
    critic_learning_rate: float = 1e-3
    kl_coef: float = 0.01
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    length_kl_coefs: tuple[float, ...] = (0.01,)
    length_penalties: tuple[float, ...] = (0.0, 0.02)  # per response token
    # DPO and Causal DPO (§4.8) on the pairs
    dpo_steps: int = 30
    dpo_batch_size: int = 32
    dpo_learning_rate: float = 3e-4
    dpo_beta: float = 0.1
    causal_dpo_lambda: float = 1.0
    # evaluation
    eval_samples: int = 10  # N samples per test prompt (thesis: 50)
    eval_batch_size: int = 256  # rows per sampling / scoring call (the last one padded)
    # running
    save_every: int = 50
    progress: bool = True
    plots: bool = True  # a metrics.png per phase
    results_dir: str = ""  # also copy summary.md and each study's results and figures here

    def __post_init__(self):
        unknown = set(self.studies) - set(STUDIES)
        if not self.studies or unknown:
            raise ValueError(f"studies must be some of {list(STUDIES)}, got {self.studies}")
        if set(self.crm_kinds) - set(CRM_KINDS):
            raise ValueError(f"crm_kinds must be some of {CRM_KINDS}, got {self.crm_kinds}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name in ("lambdas", "length_kl_coefs"):
            values = getattr(self, name)
            if not all(v > 0 and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite and > 0, got {values}")
        if any(c < 0 for c in self.length_penalties):
            raise ValueError(f"length_penalties must be >= 0, got {self.length_penalties}")
        if not 0 <= self.lambda_warmup < 1:
            raise ValueError(f"lambda_warmup must be in [0, 1), got {self.lambda_warmup}")
        if self.token_budgets and not (
                len(self.token_budgets) == 3 and min(self.token_budgets) > 0
                and self.token_budgets[0] < self.token_budgets[1]):
            raise ValueError(f"token_budgets must be (max_prompt_length < max_length, "
                             f"max_new_tokens), all > 0, or empty, got {self.token_budgets}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if int(self.lora_rank) != self.lora_rank or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha >= 0):
            raise ValueError(f"lora_alpha must be finite and >= 0, got {self.lora_alpha!r}")
        if self.lora_alpha and not self.lora_rank:
            raise ValueError(f"lora_alpha={self.lora_alpha:g} needs lora_rank > 0")

    @property
    def adapter_alpha(self) -> float:
        """The reward models' LoRA alpha: lora_alpha, or 2 * lora_rank when it is 0."""
        return self.lora_alpha or 2.0 * self.lora_rank


SMOKE = dataclasses.replace(
    Config(), run_dir="runs/causal_reward_smoke", seeds=(0,), num_train=64, num_test=8,
    hidden_size=32, num_layers=1,
    length_bins=3, lambdas=(1.0,), sft_steps=4, sft_batch_size=8, rm_steps=4, rm_batch_size=8,
    ppo_iterations=1, ppo_batch_size=8, ppo_epochs=1, ppo_minibatches=1, dpo_steps=2,
    dpo_batch_size=8, eval_samples=2, length_penalties=(0.0, 0.01), save_every=2,
    eval_decisions=2, token_budgets=(68, 80, 40), eval_batch_size=64, progress=False,
    plots=False)
"""Smoke size: every phase of every study runs, a few steps each, one seed, the discrimination
evaluation over 2 of its 6 decision templates, every study at the same token budgets (the
largest the studies' data need), so the studies share compiled steps (the test suite runs
it)."""

PAPER = dataclasses.replace(
    Config(), run_dir="runs/causal_reward_paper", model="meta-llama/Meta-Llama-3-8B",
    tokenizer="meta-llama/Meta-Llama-3-8B", hidden_size=0, num_layers=0,
    lora_rank=64, lora_alpha=128.0, mesh=(1, -1, 1), compute_dtype="bfloat16",
    num_train=1_000_000, num_test=0,
    sycophancy_data="sycophancy_eval_answer.jsonl", length_data="tatsu-lab/alpaca_farm",
    length_bins=10, concept_data="imdb_concepts.jsonl", concept_dataset="imdb",
    discrimination_data="Anthropic/hh-rlhf", discrim_eval_data="Anthropic/discrim-eval",
    max_length=1024, max_new_tokens=256,
    sft_steps=2000, sft_batch_size=128, sft_learning_rate=2e-5,
    rm_steps=500, rm_batch_size=64, rm_learning_rate=1e-4,
    lambdas=(0.1, 0.3, 0.5, 1.0, 3.0, 5.0, 10.0),
    ppo_iterations=200, ppo_batch_size=128, ppo_learning_rate=5e-7, critic_learning_rate=9e-6,
    kl_coef=0.01, ppo_epochs=1, ppo_minibatches=8, length_kl_coefs=(0.003, 0.01, 0.03, 0.1),
    length_penalties=(0.0, 1e-3, 1e-4, 1e-5, 5e-4, 1e-6, 5e-6),
    dpo_steps=500, dpo_batch_size=64, dpo_learning_rate=5e-7, eval_samples=50)
"""The thesis' settings (Tables 4.4-4.6, §4.9-4.12) as far as they map onto these phases,
LoRA rank 64 / alpha 128 reward models included; the data paths are in BUILD.md."""


# ---------------------------------------------------------------- policies of a study

@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """One trained policy of a study (besides the SFT policy).

    Attributes:
      method: "ppo", "dpo" or "causal_dpo".
      reward: the reward model key of a PPO run ("vanilla", "conditional@1", ...).
      kl_coef: PPO's KL coefficient.
      length_penalty: per-token penalty subtracted from the reward (the length baseline).
    """

    method: str
    reward: str | None = None
    kl_coef: float | None = None
    length_penalty: float = 0.0

    def name(self, config: Config) -> str:
        """The results key: the reward model key for the default PPO run (a table row), with
        "+lp<c>" / "+kl<c>" for the length grid; "dpo" / "causal_dpo"."""
        if self.method != "ppo":
            return self.method
        name = self.reward
        if self.length_penalty:
            name += f"+lp{self.length_penalty:g}"
        if self.kl_coef != config.kl_coef:
            name += f"+kl{self.kl_coef:g}"
        return name


def reward_model_keys(config: Config) -> list[str]:
    """"vanilla", then "<kind>@<lambda>" for each CRM kind and lambda."""
    return ["vanilla"] + [row_key(kind, lam) for kind in config.crm_kinds
                          for lam in config.lambdas]


def policy_specs(config: Config, study: str) -> list[PolicySpec]:
    """PPO against every reward model (the length study: over its KL grid, and the vanilla RM
    over the length penalties), then DPO and Causal DPO."""
    specs = [PolicySpec("ppo", key, config.kl_coef) for key in reward_model_keys(config)]
    if study == "length":
        specs = []
        for kl in sorted({config.kl_coef, *config.length_kl_coefs}):
            specs += [PolicySpec("ppo", "vanilla", kl, penalty)
                      for penalty in sorted({0.0, *config.length_penalties})]
            specs += [PolicySpec("ppo", key, kl) for key in reward_model_keys(config)[1:]]
    return specs + [PolicySpec("dpo"), PolicySpec("causal_dpo")]


class LengthPenalizedReward:
    """The length baseline's reward: r - coefficient * (response tokens) (`length_penalty`)."""

    def __init__(self, reward, *, coefficient: float):
        self.reward, self.coefficient = reward, coefficient

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask):
        rewards = self.reward(prompt_ids, prompt_mask, response_ids, response_mask)
        return length.length_penalty(rewards, jnp.sum(jnp.asarray(response_mask, jnp.float32),
                                                      axis=-1), coefficient=self.coefficient)


# ---------------------------------------------------------------- one study

def _json(path: pathlib.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a killed run never leaves a half-written result


def cached(path: pathlib.Path, fingerprint: dict, compute) -> Any:
    """compute()'s JSON-able value, stored at `path` with its fingerprint; read back when the
    fingerprint matches."""
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("fingerprint") == fingerprint:
            return stored["value"]
        log.info("%s: computed under another config, recomputing", path)
    began = time.perf_counter()
    value = compute()
    _json(path, {"fingerprint": fingerprint, "value": value})
    log.info("%s: %.1f s", path, time.perf_counter() - began)  # training included, if any
    return value


def _budgets(config: Config, name: str, data, tokenizer) -> dict[str, int]:
    """Token budgets measured on the study's records: the longest prompt and response (+ eos)
    with a margin of 8, capped by config.max_length / max_new_tokens; or
    config.token_budgets.

    Raises:
      ValueError: a budget of config.token_budgets below the measured one.
    """
    records = [r for split in data.splits.values() for r in split]
    probe = prepare_dataset(records, tokenizer, max_length=config.max_length,
                            max_prompt_length=config.max_length - 1)
    prompt = max(len(ex.prompt_ids) for ex in probe.examples)
    response = max(n for ex in probe.examples for lens in ex.response_lengths.values()
                   for n in lens)
    if data.evaluation:  # decision questions: an HH prompt of their own
        prompt = max(prompt, max(len(tokenizer.encode(decision_prompt(q)))
                                 for rows in data.evaluation.values() for q in rows))
    max_prompt = min(prompt + 8, config.max_length - 1)
    measured = (max_prompt, min(8 * math.ceil((max_prompt + response + 8) / 8), config.max_length),
                min(response + 4, config.max_new_tokens))
    if config.token_budgets:
        if any(given < need for given, need in zip(config.token_budgets, measured)):
            raise ValueError(f"token_budgets {tuple(config.token_budgets)}: the {name} study "
                             f"needs at least {measured}")
        measured = tuple(config.token_budgets)
    return {"max_prompt_length": measured[0], "max_length": measured[1],
            "max_new_tokens": measured[2], "prompt_width": measured[0]}


def _base_model(config: Config, tokenizer, mesh) -> nnx.Module:
    if config.model == "tiny":
        return create(tiny_config("llama", vocab_size=len(tokenizer),
                                  hidden_size=config.hidden_size,
                                  num_hidden_layers=config.num_layers,
                                  intermediate_size=round(config.hidden_size * 2.6875),
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id),
                      rngs=nnx.Rngs(config.data_seed), mesh=mesh)
    return from_pretrained(config.model, mesh=mesh)


def reward_lora(config: Config, model: RewardModel) -> LoRAConfig | None:
    """The reward models' adapters (None: full fine-tuning): rank `lora_rank`, alpha
    `adapter_alpha`, on every projection of the backbone and the score head."""
    if not config.lora_rank:
        return None
    return LoRAConfig(rank=config.lora_rank, alpha=config.adapter_alpha,
                      targets=default_targets(model))


def reward_objective(config: Config, key: str, num_bins: int):
    """Bradley-Terry for "vanilla", else the CRM of the key's kind and lambda (module doc)."""
    kind, lam = key.split("@") if "@" in key else (key, None)
    if lam is None:
        return BradleyTerry()
    lam = float(lam)
    ramp = int(config.lambda_warmup * config.rm_steps)
    return CausalReward(lam=Linear(0.0, lam, ramp) if ramp else lam, num_bins=num_bins,
                        bandwidth=tuple(config.bandwidth), conditional=kind == "conditional",
                        unbiased=config.mmd_unbiased, reduction=config.mmd_reduction)


def run_study(config: Config, study: Study, *, tokenizer, mesh, data, budgets: dict[str, int],
              train_steps: dict) -> str:
    """Every phase of one study (module docstring); returns its results (Markdown).

    Args:
      data: the study's `StudyData` (`study.build(config)`).
      budgets: its token budgets (`_budgets`).
      train_steps: compiled train steps shared between studies (`Phases`).
    """
    began = time.perf_counter()
    directory = pathlib.Path(config.run_dir) / study.name
    runner = Phases(RunSettings(save_every=config.save_every, progress=config.progress,
                                plots=config.plots, compute_dtype=config.compute_dtype),
                    train_steps=train_steps)
    data.write(directory / "data")
    binning, num_bins = study.binning(config, data)
    kwargs = dict(max_length=budgets["max_length"],
                  max_prompt_length=budgets["max_prompt_length"], buckets=(budgets["max_length"],))
    train = prepare_dataset(data.splits["train"], tokenizer, **binning, **kwargs)
    if train.response_bins is not None:  # fitted length bins: the test split uses their edges
        binning = {**binning, "response_bins": train.response_bins}
    test = prepare_dataset(data.splits["test"], tokenizer, **binning, **kwargs)
    ctx = Context(config=config, directory=directory, tokenizer=tokenizer, data=data,
                  train=train, test=test, num_bins=num_bins, **budgets)
    model_fp = fingerprint_of(model=config.model, tokenizer=config.tokenizer,
                              hidden_size=config.hidden_size, num_layers=config.num_layers,
                              compute_dtype=config.compute_dtype, data=data.info,
                              budgets=budgets, study=study.name)
    sft_fp = {**model_fp, "sft": fingerprint_of(steps=config.sft_steps,
                                                batch_size=config.sft_batch_size,
                                                learning_rate=config.sft_learning_rate)}
    cache: dict[str, Any] = {}

    def sft_policy():
        if "sft" not in cache:
            cache["sft"] = runner.supervised(
                directory / "sft", model=_base_model(config, tokenizer, mesh), objective=SFT(),
                dataset=train, steps=config.sft_steps, batch_size=config.sft_batch_size,
                learning_rate=config.sft_learning_rate, seed=config.data_seed,
                fingerprint=sft_fp)
        return cache["sft"]

    def rm_fingerprint(key):
        lora = {"lora": fingerprint_of(rank=config.lora_rank, alpha=config.adapter_alpha)
                } if config.lora_rank else {}  # full fine-tuning keeps its earlier fingerprint
        return {**sft_fp, "rm": fingerprint_of(
            key=key, objective=reward_objective(config, key, num_bins), steps=config.rm_steps,
            batch_size=config.rm_batch_size, learning_rate=config.rm_learning_rate, **lora)}

    def reward_model(key):
        """The trained reward model `key`, its LoRA adapters (if any) merged."""
        if ("rm", key) not in cache:
            initial = reward_model_from_policy(sft_policy(), seed=config.data_seed)
            lora = reward_lora(config, initial)
            trained = runner.supervised(
                directory / "rm" / key, model=initial,
                objective=reward_objective(config, key, num_bins), dataset=train,
                steps=config.rm_steps, batch_size=config.rm_batch_size,
                learning_rate=config.rm_learning_rate, seed=config.data_seed,
                fingerprint=rm_fingerprint(key), lora=lora)
            cache[("rm", key)] = trained if lora is None else merge(trained)
        return cache[("rm", key)]

    def outputs(name: str, seed: int, fingerprint: dict, policy_fn):
        path = directory / name / f"seed{seed}" / "outputs.json"
        return cached(path, {**fingerprint, "eval_samples": config.eval_samples, "seed": seed},
                      lambda: study.policy_outputs(ctx, policy_fn(), seed))

    # the SFT policy's outputs first: the length study ranks its samples with every RM
    policies: dict[str, list] = {"sft": [outputs("sft", seed, sft_fp, sft_policy)
                                         for seed in config.seeds]}
    ctx.sft_outputs = policies["sft"][0]
    reward_models = {key: cached(directory / "rm" / key / "metrics.json",
                                 {**rm_fingerprint(key), "eval_samples": config.eval_samples,
                                  "sft_outputs_seed": config.seeds[0]},
                                 lambda key=key: study.reward_model_metrics(ctx, reward_model(key)))
                     for key in reward_model_keys(config)}
    train_prompts = _distinct_prompts(ctx)
    for spec in policy_specs(config, study.name):
        name = spec.name(config)
        policies[name] = []
        for seed in config.seeds:
            run = directory / spec.method / name / f"seed{seed}" if spec.method == "ppo" else \
                directory / spec.method / f"seed{seed}"
            fp, train_fn = _policy_phase(config, spec, seed, run, ctx, sft_fp, rm_fingerprint,
                                         sft_policy, reward_model, train_prompts, runner)
            policies[name].append(cached(run / "outputs.json",
                                         {**fp, "eval_samples": config.eval_samples},
                                         lambda: study.policy_outputs(ctx, train_fn(), seed)))
    table = study.report(ctx, reward_models, policies)
    minutes = (time.perf_counter() - began) / 60
    _json(directory / "results.json", {"config": dataclasses.asdict(config),
                                       "budgets": budgets, "num_bins": num_bins,
                                       "reward_models": reward_models,
                                       "data": data.info, "minutes": minutes})
    (directory / "results.md").write_text(table, encoding="utf-8")
    log.info("%s: done in %.1f min", study.name, minutes)
    return table


def _distinct_prompts(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """The training split's distinct prompts, left-padded (PPO's prompt set)."""
    seen: dict[bytes, np.ndarray] = {}
    for ex in ctx.train.examples:
        seen.setdefault(ex.prompt_ids.tobytes(), ex.prompt_ids)
    return left_pad(list(seen.values()), width=ctx.prompt_width,
                    pad_token_id=ctx.tokenizer.pad_token_id)


def _policy_phase(config, spec, seed, run, ctx, sft_fp, rm_fingerprint, sft_policy,
                  reward_model, prompts, runner):
    """(fingerprint, train()) of one PPO / DPO / Causal DPO run."""
    if spec.method == "ppo":
        ppo = PPOSettings(iterations=config.ppo_iterations, batch_size=config.ppo_batch_size,
                          max_new_tokens=ctx.max_new_tokens,
                          learning_rate=config.ppo_learning_rate,
                          critic_learning_rate=config.critic_learning_rate,
                          epochs=config.ppo_epochs, minibatches=config.ppo_minibatches)
        fp = {**rm_fingerprint(spec.reward),
              "ppo": fingerprint_of(settings=ppo, spec=spec, seed=seed)}

        def train():
            rm = reward_model(spec.reward)
            reward = ModelReward(rm)
            if spec.length_penalty:
                reward = LengthPenalizedReward(reward, coefficient=spec.length_penalty)
            return runner.ppo(run, policy=sft_policy(), reward_model=rm, reward=reward,
                              prompt_ids=prompts[0], prompt_mask=prompts[1],
                              tokenizer=ctx.tokenizer, settings=ppo, kl_coef=spec.kl_coef,
                              seed=seed, fingerprint=fp)
        return fp, train
    if spec.method == "dpo":
        objective = DPO(beta=config.dpo_beta)
    else:
        objective = CausalDPO(lam=config.causal_dpo_lambda, num_bins=ctx.num_bins,
                              beta=config.dpo_beta, bandwidth=tuple(config.bandwidth),
                              unbiased=config.mmd_unbiased, reduction=config.mmd_reduction)
    fp = {**sft_fp, spec.method: fingerprint_of(objective=objective, steps=config.dpo_steps,
                                                batch_size=config.dpo_batch_size,
                                                learning_rate=config.dpo_learning_rate,
                                                seed=seed)}

    def train():
        sft = sft_policy()
        return runner.supervised(run, model=sft, objective=objective, dataset=ctx.train,
                                 steps=config.dpo_steps, batch_size=config.dpo_batch_size,
                                 learning_rate=config.dpo_learning_rate, seed=seed,
                                 fingerprint=fp, reference=sft)
    return fp, train


# ---------------------------------------------------------------- all studies

def _tokenizer(config: Config):
    if config.tokenizer == "default":
        return default_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run(config: Config) -> str:
    """Runs every study of `config` into `config.run_dir`; returns summary.md's text.

    Raises:
      ValueError: `token_budgets` below what a study's data need (before any training).
    """
    mesh = make_mesh(config.mesh)
    tokenizer = _tokenizer(config)
    data = {name: STUDIES[name].build(config) for name in config.studies}
    budgets = {name: _budgets(config, name, data[name], tokenizer) for name in config.studies}
    train_steps: dict = {}
    tables = [run_study(config, STUDIES[name], tokenizer=tokenizer, mesh=mesh, data=data[name],
                        budgets=budgets[name], train_steps=train_steps)
              for name in config.studies]
    summary = ("# Causal reward models on the embedded model (thesis ch. 4)\n\n"
               if config.model == "tiny" else f"# Causal reward models ({config.model})\n\n")
    summary += _settings(config) + "\n\n"
    summary += "\n".join(tables)
    path = pathlib.Path(config.run_dir) / "summary.md"
    path.write_text(summary, encoding="utf-8")
    if config.results_dir:
        _publish(config, summary)
    return summary


def _settings(config: Config) -> str:
    """The run's settings in one paragraph (generated from the config)."""
    model = (f"the embedded Llama (hidden {config.hidden_size}, {config.num_layers} layers)"
             if config.model == "tiny" else config.model)
    tuning = ("full fine-tuning" if not config.lora_rank else
              f"reward models: LoRA rank {config.lora_rank}, alpha {config.adapter_alpha:g} on "
              f"every projection and the score head, SFT / PPO / DPO: full fine-tuning")
    return (f"Model: {model}, {tuning}. SFT {config.sft_steps} steps; reward models "
            f"{config.rm_steps} steps (batch {config.rm_batch_size}, lr "
            f"{config.rm_learning_rate:g}), CRM kinds {', '.join(config.crm_kinds)} at lambda "
            f"in {{{', '.join(f'{v:g}' for v in config.lambdas)}}}, MMD^2: "
            f"{'unbiased' if config.mmd_unbiased else 'biased (V-statistic)'} estimator, "
            f"{config.mmd_reduction} over bin pairs, Gaussian bandwidth(s) "
            f"{', '.join(f'{v:g}' for v in config.bandwidth)}, lambda ramped from 0 over the "
            f"first {config.lambda_warmup:.0%} of the steps; PPO {config.ppo_iterations} "
            f"iterations x {config.ppo_batch_size} prompts (KL coefficient {config.kl_coef:g}, "
            f"{config.ppo_epochs} epochs x {config.ppo_minibatches} minibatches); DPO / Causal "
            f"DPO {config.dpo_steps} steps (beta {config.dpo_beta:g}, Causal DPO lambda "
            f"{config.causal_dpo_lambda:g}); N = {config.eval_samples} samples per test prompt; "
            f"seeds {', '.join(map(str, config.seeds))} (PPO, DPO and sampling; data and reward "
            f"models: seed {config.data_seed}).")


def _publish(config: Config, summary: str) -> None:
    """summary.md, and each study's results.md, results.json and figures, into
    config.results_dir (the committed copy of a run)."""
    target = pathlib.Path(config.results_dir)
    target.mkdir(parents=True, exist_ok=True)
    (target / "summary.md").write_text(summary, encoding="utf-8")
    for name in config.studies:
        source = pathlib.Path(config.run_dir) / name
        (target / name).mkdir(exist_ok=True)
        for path in [source / "results.md", source / "results.json",
                     *sorted(source.glob("*.png"))]:
            shutil.copyfile(path, target / name / path.name)


def main(argv: Sequence[str] | None = None) -> str:
    config = parse_config(Config, argv, prog="python -m experiments.causal_reward")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    initialize_distributed()
    summary = run(config)
    print(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
