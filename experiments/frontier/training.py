"""The training phases of `experiments.fdpo_frontier`, each resumable from its run directory.

    sft_reference     SFT of the embedded model on the task's demonstrations -> pi_ref
                      (`alignax.trainer.train`)
    preference_pairs  K reference samples per training prompt, every non-tied pair labelled by a
                      draw from the oracle's Bradley-Terry probability -> "standard" records
    FDPORun           f-DPO (thesis eq. 2.2, Algorithm 1) from pi_ref on those pairs
    PPORun            PPO(reward) / PPO(loss) from pi_ref against the oracle (`alignax.rl`)

A run evaluates its policy at fixed steps (`evaluate(params, index)`) and appends each result to
`evals.jsonl`; a checkpoint is written at every evaluation, so a killed run restarts from its
last evaluated step, and a finished run (its last evaluation on disk) is skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import alignax.eval as ev
from alignax.data import prepare_dataset
from alignax.objectives import FDPO, SFT
from alignax.rl import (ActorCritic, FunctionReward, KLControllerConfig, PenaltyConfig,
                        PPOConfig, PPOTrainer, RolloutConfig, ValueHead, make_ppo_optimizer,
                        prompt_batches, resume, train_ppo)
from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig
from alignax.trainer import train as trainer_train
from alignax.training.checkpoint import Checkpointer
from alignax.training.loop import MetricsLogger, NonFiniteLossError, train
from alignax.training.reference import WithReferenceLogps, cached_reference_logps
from alignax.training.state import OptimizerConfig, create_train_state, make_optimizer
from alignax.training.step import StepConfig, make_train_step

log = logging.getLogger("experiments.fdpo_frontier")

Evaluate = Callable[[object, int], dict[str, np.ndarray]]
"""evaluate(policy params, evaluation index) -> name -> [P] per-prompt metrics."""


# ---------------------------------------------------------------- the reference

def sft_reference(model, tokenizer, examples: Sequence[tuple[str, str]], *, run: pathlib.Path,
                  mesh: tuple[int, int, int], steps: int, batch_size: int,
                  learning_rate: float, max_length: int, seed: int, progress: bool):
    """SFT of `model` on the (prompt, response) demonstrations with `alignax.trainer.train`
    in `run` (cosine schedule; the loss on the response and EOS tokens); a finished run is
    restored from its checkpoint instead of trained again. Returns (graphdef, params,
    model_state) of the SFT'd model."""
    # SFT reads the chosen response only; the standard format needs a "rejected" column
    records = [{"prompt": p, "chosen": r, "rejected": r} for p, r in examples]
    run_config = RunConfig(
        run_dir=str(run), model=ModelConfig("tiny", seed=seed),
        data=DataConfig(max_length=max_length), objective=SFT(),
        train=TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                          lr_schedule="cosine", warmup_steps=min(20, steps), share_prompt=False,
                          vocab_chunk_size=None, mesh=mesh, seed=seed, save_every=steps,
                          keep_checkpoints=1, export=False, progress=progress,
                          tensorboard=False, compilation_cache=False))
    result = trainer_train(run_config, model=model, data=records, tokenizer=tokenizer)
    return result.graphdef, result.params, result.model_state


# ---------------------------------------------------------------- preference data

def preference_pairs(reference_model, tokenizer, prompts: Sequence[str], *,
                     sampling: ev.SamplingConfig, oracle, label_probability, key: jax.Array,
                     seed: int) -> tuple[list[dict], dict]:
    """Oracle-labelled preference records from K reference samples per prompt.

    Every pair (i, j) of a prompt's K samples whose rewards differ becomes one record; which
    one is "chosen" is a draw with probability `label_probability(r_i, r_j)` (the oracle's
    Bradley-Terry model, noisy like human labels). Pairs with an empty response (the sample
    was EOS alone) are left out and counted.

    Returns:
      (records {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}, stats).
    """
    ids, mask = ev.encode_prompts(tokenizer, prompts, prompt_length=sampling.prompt_length)
    samples = ev.sample(reference_model, ids, mask, key=key, config=sampling)
    texts = samples.texts(tokenizer)
    rng = np.random.default_rng(seed)
    records, ties, empty = [], 0, 0
    for prompt, row in zip(prompts, texts):
        rewards = np.asarray(oracle(row), np.float64)
        for i, j in itertools.combinations(range(len(row)), 2):
            if rewards[i] == rewards[j]:
                ties += 1
                continue
            if not row[i].strip() or not row[j].strip():
                empty += 1
                continue
            first = rng.random() < label_probability(rewards[i], rewards[j])
            c, r = (i, j) if first else (j, i)
            records.append({"prompt": prompt, "chosen": row[c], "rejected": row[r],
                            "chosen_reward": float(rewards[c]),
                            "rejected_reward": float(rewards[r])})
    flips = sum(r["chosen_reward"] < r["rejected_reward"] for r in records)
    stats = {"prompts": len(prompts), "samples_per_prompt": sampling.num_samples,
             "pairs": len(records), "ties_left_out": ties, "empty_left_out": empty,
             "labels_against_the_oracle": flips,
             "reference_reward": float(np.mean(oracle([t for row in texts for t in row])))}
    return records, stats


# ---------------------------------------------------------------- evaluation log

def check_run_config(run: pathlib.Path, expected: dict) -> None:
    """Writes run/config.json on first use; later raises ValueError naming the fields that
    differ, so finished results are never mixed with another config's."""
    path = run / "config.json"
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as read back
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in expected.keys() | saved.keys()
                         if expected.get(k) != saved.get(k))
        if changed:
            raise ValueError(f"{run} was run with another config ({', '.join(changed)} differ): "
                             f"use another --run_dir, or restore those values")
    else:
        run.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(expected, indent=1))


class EvalLog:
    """evals.jsonl of one run: {"step": s, "metrics": {name: [P] values}} per evaluation."""

    def __init__(self, run: pathlib.Path):
        run.mkdir(parents=True, exist_ok=True)
        self.path = run / "evals.jsonl"
        self.records: dict[int, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    self.records[record["step"]] = record

    def keep_until(self, step: int) -> None:
        """Forgets (and rewrites the file without) the evaluations after `step`."""
        self.records = {s: r for s, r in self.records.items() if s <= step}
        self.path.write_text("".join(json.dumps(self.records[s]) + "\n"
                                     for s in sorted(self.records)))

    def add(self, step: int, metrics: dict[str, np.ndarray], **extra) -> None:
        record = {"step": step, **extra,
                  "metrics": {k: np.asarray(v, np.float64).tolist() for k, v in metrics.items()}}
        self.records[step] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def evaluation_steps(total: int, every: int) -> list[int]:
    """The steps evaluated after step 0: every `every` steps and the last one."""
    return sorted({*range(every, total, every), total})


# ---------------------------------------------------------------- f-DPO

@dataclasses.dataclass
class FDPORun:
    """f-DPO from the reference on one seed's pairs; one compiled step per (divergence, beta),
    shared by the seeds (`step_for`)."""

    graphdef: object
    rest: object
    mesh: object
    steps: int
    batch_size: int
    learning_rate: float
    adam_eps: float
    progress: bool

    def __post_init__(self):
        self.optimizer, self.schedule = make_optimizer(OptimizerConfig(
            learning_rate=self.learning_rate, total_steps=self.steps, eps=self.adam_eps))
        self._steps: dict[FDPO, object] = {}

    def step_for(self, objective: FDPO, shardings):
        if objective not in self._steps:
            self._steps[objective] = make_train_step(
                self.graphdef, objective, self.optimizer, self.schedule, mesh=self.mesh,
                state_shardings=shardings, model_state=self.rest,
                config=StepConfig(vocab_chunk_size=None), reference="cached")
        return self._steps[objective]

    def run(self, objective: FDPO, reference_params, dataset, reference_logps, *,
            run: pathlib.Path, seed: int, eval_every: int, evaluate: Evaluate,
            config: dict) -> dict[int, dict]:
        """Trains (or resumes, or skips) one run; returns its evaluations by step (step 0, the
        reference, is evaluated by the caller)."""
        check_run_config(run, config)
        evals = EvalLog(run)
        ends = evaluation_steps(self.steps, eval_every)
        if ends[-1] in evals.records or evals.records.get(-1):
            return evals.records
        began = time.perf_counter()
        state, shardings = create_train_state(reference_params, self.optimizer,
                                              key=jax.random.PRNGKey(seed), mesh=self.mesh)
        batches = WithReferenceLogps(dataset.batches(batch_size=self.batch_size, seed=seed),
                                     reference_logps)
        step = self.step_for(objective, shardings)
        checkpointer = Checkpointer(run / "checkpoints", config=config, save_every=eval_every,
                                    keep=2)
        logger = MetricsLogger(run, tensorboard=False)
        try:
            restored = checkpointer.restore_latest(state, batches=batches)
            if restored is not None:
                state = restored[0]
            evals.keep_until(int(state.step))
            for index, end in enumerate(ends, start=1):
                if end < int(state.step) or end in evals.records:
                    continue  # evaluated before the kill (or a restored step past it)
                try:
                    state = train(step, state, batches, num_steps=end, mesh=self.mesh,
                                  checkpointer=checkpointer, logger=logger,
                                  progress=self.progress, description=run.name)
                except NonFiniteLossError as error:  # recorded, the sweep goes on
                    log.warning("%s stopped: %s", run, error)
                    evals.add(-1, {}, stopped=str(error))
                    break
                evals.add(end, evaluate(state.params, index))
        finally:
            logger.close()
            checkpointer.close()
        log.info("%s: %.1f s", run, time.perf_counter() - began)
        return evals.records


def reference_logps_for(graphdef, params, rest, dataset, tokenizer, *, cache_dir: pathlib.Path,
                        batch_size: int):
    """log pi_ref of every pair's responses, computed once (cached on disk, keyed by weights,
    data and tokenizer)."""
    return cached_reference_logps(cache_dir, graphdef, params, dataset, tokenizer,
                                  ("chosen", "rejected"), batch_size=batch_size,
                                  model_state=rest, vocab_chunk_size=None)


def pairs_dataset(records: list[dict], tokenizer, *, max_length: int):
    """The records as an alignax PreferenceDataset with one padded length (one compilation)."""
    return prepare_dataset(records, tokenizer, format="standard", max_length=max_length,
                           buckets=(max_length,))


# ---------------------------------------------------------------- PPO

@dataclasses.dataclass(frozen=True)
class PPOVariant:
    """One PPO baseline of Figure 2.2: a divergence and where its penalty goes.

    placement "reward" with form "f_over_u" is the thesis' PPO(reward) (r - beta f(u)/u);
    "reward" with "f_prime" the ablation whose fixed point is the regularised optimum;
    "loss" is PPO(loss) (beta D_f by SGD through the §2.8.2 estimator).
    """

    divergence: str
    alpha: float | None
    placement: str
    form: str = "f_over_u"

    @property
    def label(self) -> str:
        name = "PPO(loss)" if self.placement == "loss" else (
            "PPO(reward)" if self.form == "f_over_u" else "PPO(reward, f')")
        return name

    @property
    def slug(self) -> str:
        return "ppo_loss" if self.placement == "loss" else f"ppo_reward_{self.form}"


class PPORun:
    """PPO runs from the reference; one `PPOTrainer` (one compilation) per variant, shared by
    coefficients and seeds (beta lives in the PPO state)."""

    def __init__(self, graphdef, reference_params, rest, tokenizer, oracle, *, mesh,
                 hidden_size: int, rollout: RolloutConfig, iterations: int,
                 prompts_per_iteration: int, learning_rate: float, adam_eps: float,
                 epochs: int, minibatches: int, whiten_advantages: bool, level: str,
                 progress: bool):
        self.graphdef, self.reference_params, self.rest = graphdef, reference_params, rest
        self.mesh, self.hidden_size, self.rollout = mesh, hidden_size, rollout
        self.iterations, self.prompts_per_iteration = iterations, prompts_per_iteration
        self.epochs, self.minibatches = epochs, minibatches
        self.whiten_advantages, self.level, self.progress = whiten_advantages, level, progress
        self.optimizer = make_ppo_optimizer(OptimizerConfig(
            learning_rate=learning_rate, total_steps=iterations * epochs * minibatches,
            eps=adam_eps))

        def reward(prompt_ids, prompt_mask, response_ids, response_mask):
            texts = tokenizer.batch_decode([row[m] for row, m in zip(response_ids,
                                                                      response_mask.astype(bool))],
                                           skip_special_tokens=True)
            return oracle(texts)

        self.reward = FunctionReward(reward)
        self._trainers: dict[PPOVariant, PPOTrainer] = {}

    def trainer_for(self, variant: PPOVariant) -> PPOTrainer:
        if variant not in self._trainers:
            config = PPOConfig(
                penalty=PenaltyConfig(variant.divergence, variant.alpha,
                                      placement=variant.placement, level=self.level,
                                      reward_penalty=variant.form),
                kl=KLControllerConfig(), rollout=self.rollout, epochs=self.epochs,
                minibatches=self.minibatches, whiten_advantages=self.whiten_advantages,
                vocab_chunk_size=None)
            policy = nnx.merge(self.graphdef, self.reference_params, self.rest)
            self._trainers[variant] = PPOTrainer(
                ActorCritic(policy, ValueHead.zeros(self.hidden_size)), self.reward,
                config=config, mesh=self.mesh, optimizer=self.optimizer)
        return self._trainers[variant]

    def run(self, variant: PPOVariant, coef: float, prompt_ids, prompt_mask, *,
            run: pathlib.Path, seed: int, eval_every: int, evaluate: Evaluate,
            config: dict) -> dict[int, dict]:
        """Trains (or resumes, or skips) one run at penalty coefficient `coef`; returns its
        evaluations by step (as `FDPORun.run`)."""
        check_run_config(run, config)
        evals = EvalLog(run)
        ends = evaluation_steps(self.iterations, eval_every)
        if ends[-1] in evals.records or evals.records.get(-1):
            return evals.records
        began = time.perf_counter()
        trainer = self.trainer_for(variant)
        state = trainer.init_state(jax.random.PRNGKey(seed))
        state = dataclasses.replace(state, kl_coef=jax.device_put(
            jnp.float32(coef), trainer.state_shardings.kl_coef))
        prompts = prompt_batches(prompt_ids, prompt_mask, batch_size=self.prompts_per_iteration,
                                 seed=seed)
        checkpointer = Checkpointer(run / "checkpoints", config=config, save_every=eval_every,
                                    keep=2)
        logger = MetricsLogger(run, tensorboard=False)
        try:
            state = resume(checkpointer, state, prompts)
            logger.resume(int(state.iteration))
            evals.keep_until(int(state.iteration))
            for index, end in enumerate(ends, start=1):
                if end < int(state.iteration) or end in evals.records:
                    continue  # evaluated before the kill (or a restored step past it)
                try:
                    state = train_ppo(trainer, state, prompts, num_iterations=end,
                                      checkpointer=checkpointer, logger=logger,
                                      progress=self.progress)
                except NonFiniteLossError as error:
                    log.warning("%s stopped: %s", run, error)
                    evals.add(-1, {}, stopped=str(error))
                    break
                evals.add(end, evaluate(state.train.params["policy"], index))
        finally:
            logger.close()
            checkpointer.close()
        log.info("%s: %.1f s", run, time.perf_counter() - began)
        return evals.records
