"""The training phases of `experiments.fdpo_frontier`, each resumable from its run directory.

    sft_reference     SFT of the embedded model on the task's demonstrations -> pi_ref
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
from alignax.data import BatchIterator, prepare_dataset
from alignax.objectives import FDPO, SFT
from alignax.rl import (ActorCritic, FunctionReward, KLControllerConfig, PenaltyConfig,
                        PPOConfig, PPOTrainer, RolloutConfig, ValueHead, make_ppo_optimizer,
                        prompt_batches, resume, train_ppo)
from alignax.training.checkpoint import Checkpointer
from alignax.training.loop import MetricsLogger, NonFiniteLossError, train
from alignax.training.reference import WithReferenceLogps, cached_reference_logps
from alignax.training.state import OptimizerConfig, create_train_state, make_optimizer
from alignax.training.step import StepConfig, make_train_step

log = logging.getLogger("experiments.fdpo_frontier")

Evaluate = Callable[[object, int], dict[str, np.ndarray]]
"""evaluate(policy params, evaluation index) -> name -> [P] per-prompt metrics."""


# ---------------------------------------------------------------- the reference

def sft_arrays(tokenizer, examples: Sequence[tuple[str, str]], *, length: int
               ) -> dict[str, np.ndarray]:
    """Demonstrations -> SFT batch columns [R, length]: bos + prompt + response + eos, right
    padded, the loss on the response (and eos) tokens only.

    Raises:
      ValueError: naming the first demonstration longer than `length` tokens.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    fulls = tokenizer([p + r for p, r in examples], add_special_tokens=False)["input_ids"]
    ids = np.full((len(examples), length), pad, np.int32)
    attention = np.zeros((len(examples), length), np.int32)
    loss = np.zeros((len(examples), length), bool)
    for i, (prompt, full) in enumerate(zip(prompts, fulls)):
        row = [bos, *full, eos]
        if len(row) > length:
            raise ValueError(f"demonstration {i} ({examples[i]!r}) has {len(row)} tokens, more "
                             f"than sft_length={length}")
        ids[i, :len(row)], attention[i, :len(row)] = row, 1
        loss[i, 1 + len(prompt):len(row)] = True  # response + eos
    return {"chosen_input_ids": ids, "chosen_attention_mask": attention,
            "chosen_loss_mask": loss}


class ArrayBatches(BatchIterator):
    """A seeded, resumable iterator of batches over the rows of equal-length arrays."""

    def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int):
        rows = len(next(iter(arrays.values())))
        super().__init__(list(range(rows)),
                         lambda index: {k: v[np.asarray(index)] for k, v in arrays.items()},
                         batch_size=batch_size, seed=seed)


def sft_reference(graphdef, params, rest, arrays: dict[str, np.ndarray], *, run: pathlib.Path,
                  mesh, steps: int, batch_size: int, learning_rate: float, seed: int,
                  config: dict, progress: bool):
    """SFT of `params` on the demonstrations (cosine schedule); checkpointed at the end, so a
    second call restores instead of training. Returns the SFT'd parameters."""
    optimizer, schedule = make_optimizer(OptimizerConfig(
        learning_rate=learning_rate, schedule="cosine", warmup_steps=min(20, steps),
        total_steps=steps))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(seed),
                                          mesh=mesh)
    batches = ArrayBatches(arrays, batch_size=batch_size, seed=seed)
    checkpointer = Checkpointer(run / "checkpoints", config=config, save_every=steps, keep=1)
    try:
        restored = checkpointer.restore_latest(state, batches=batches)
        if restored is not None:
            state = restored[0]
            log.info("reference: restored the SFT checkpoint of step %d", int(state.step))
        if int(state.step) < steps:
            step = make_train_step(graphdef, SFT(), optimizer, schedule, mesh=mesh,
                                   state_shardings=shardings, model_state=rest,
                                   config=StepConfig(vocab_chunk_size=None))
            logger = MetricsLogger(run, tensorboard=False)
            try:
                state = train(step, state, batches, num_steps=steps, mesh=mesh,
                              checkpointer=checkpointer, logger=logger, progress=progress,
                              description="sft reference")
            finally:
                logger.close()
    finally:
        checkpointer.close()
    return state.params


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
