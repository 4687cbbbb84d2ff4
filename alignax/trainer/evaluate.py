"""Evaluation of a run: preference metrics on the held-out split, generation metrics from samples.

Preference metrics (`PreferenceEvaluator`, also run every `eval_every` steps during training)
score each held-out example once with the objective's own scoring (the policy's and the
reference's log-probs, or the reward model's scores) and report, averaged over examples:

- "loss": the objective's per-example loss (batch-level terms, an MMD or an ensemble min, are
  computed per evaluation batch; the last batch is filled up with copies of a real example,
  which count in those terms but not in the averages);
- pairs ("chosen"/"rejected"): "accuracy" (the implicit reward beta h = beta (log pi - log
  pi_ref), or the reward, ranks the chosen response first), "margin" (mean h_w - h_l, or
  r_w - r_l), and calibration (thesis §2.8.8, Figure 2.5): the task is a binary prediction
  between the two responses with probabilities softmax(s_w, s_l) of their normalised scores
  (the mean response-token log-prob under the policy; a reward model's rewards), "ece" the
  thesis' ECE of a stochastic prediction (y_hat ~ those probabilities, Remark 3; binned,
  `alignax.metrics.calibration.sampled_ece`, seeded), "ece_top_label" Guo et al.'s arg-max ECE,
  and "likelihood_accuracy" (s_w > s_l); groups use the group means;
- unlabeled pairs: "accuracy" of h_1 - h_2 against the order of the (ensemble-mean) target
  rewards, and "margin".

Generation metrics (`generation_metrics`, the `alignax eval` command) sample K responses per
held-out prompt from the policy (`alignax.eval`) and report, with 95% bootstrap intervals over
prompts: response length, entropy, distinct-n, self-BLEU, the KL estimate to the reference
(temperature 1), and the mean score of a reward model when one is given.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import alignax.eval as ev
from alignax.metrics.calibration import sampled_ece, top_label_ece
from alignax.models import load_reward_model
from alignax.models.lora import without_adapters
from alignax.objectives.registry import (PAIR_ROLES, REWARD_MODEL, UNLABELED_ROLES,
                                         ObjectiveInputs, Scores, group_mean)
from alignax.trainer.runs import Run
from alignax.training.compatibility import check_batch
from alignax.training.mesh import batch_sharding, replicated
from alignax.training.state import cast_floating, has_adapters
from alignax.training.step import (packed_role_logprobs, response_token_counts,
                                   role_logprobs, role_rewards, side_columns)

ECE_BINS = 10


def _global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """A host batch every process holds whole -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()}


class PreferenceEvaluator:
    """`evaluator(params, step) -> {metric: float}` on a prepared held-out dataset.

    The scoring function is jitted once per bucket shape; the evaluation batches (the held-out
    examples in order, `batch_size` each, the last one filled up with copies) are collated once.
    """

    def __init__(self, run: Run, dataset, *, batch_size: int, max_batches: int | None = None,
                 seed: int = 0):
        self.run, self.objective = run, run.config.objective
        self.seed = seed
        needs = self.objective.needs
        train = run.config.train
        examples = list(dataset.examples)
        if max_batches is not None:
            examples = examples[:max_batches * batch_size]
        self.batches = []  # (host batch of the read columns, number of real rows)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            rows = len(chunk)
            chunk = chunk + [chunk[0]] * (batch_size - rows)
            batch = dataset.collate(chunk, share_prompt=run.share_prompt)
            keep = check_batch(self.objective, {k: (v.shape, v.dtype) for k, v in batch.items()},
                               share_prompt=run.share_prompt)
            self.batches.append(({k: batch[k] for k in keep}, rows))
        roles = needs.roles
        share_prompt, dtype = run.share_prompt, jnp.dtype(train.compute_dtype)
        graphdef, objective = run.graphdef, self.objective

        self.lora = has_adapters(run.params)  # the reference: the base model, adapters off

        def scores_of(params, model_state, batch, adapters=True):
            model = nnx.merge(graphdef, cast_floating(params, dtype), model_state)
            if needs.model == REWARD_MODEL:
                return role_rewards(model, batch, roles)
            score = packed_role_logprobs if share_prompt else role_logprobs
            return score(model, batch, roles, chunk_size=train.chunk_size,
                         vocab_chunk_size=train.vocab_chunk_size, adapters=adapters)

        def evaluate(params, reference_params, model_state, batch, step):
            policy = scores_of(params, model_state, batch)
            reference = None
            if needs.reference and self.lora:
                reference = scores_of(params, model_state, batch, adapters=False)
            elif needs.reference:
                reference = scores_of(reference_params, model_state, batch)
            scores = {}
            for role in roles:
                group_mask = batch.get(f"{role}_group_mask")
                scores[role] = Scores(
                    policy=policy[role],
                    reference=None if reference is None else reference[role],
                    h=None if reference is None else policy[role] - reference[role],
                    num_tokens=response_token_counts(batch, role),
                    group_mask=None if group_mask is None else group_mask.astype(bool))
            columns = side_columns(batch)
            key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
            loss, _ = objective(ObjectiveInputs(scores, columns, step, key))
            return {"loss": loss, "scores": scores, "columns": columns}

        self._evaluate = jax.jit(evaluate, out_shardings=replicated(run.mesh))

    def __call__(self, params: Any, step: int, reference_params: Any = None) -> dict[str, float]:
        """Metrics of the policy `params` (and the frozen reference) at update `step`."""
        if self.objective.needs.reference and reference_params is None and not self.lora:
            raise ValueError(f"{self.objective.name} needs the reference parameters")
        outputs = []
        for batch, rows in self.batches:
            out = jax.device_get(self._evaluate(params, reference_params, self.run.model_state,
                                                _global(batch, self.run.mesh),
                                                jnp.asarray(step, jnp.int32)))
            outputs.append(jax.tree.map(lambda x: np.asarray(x)[:rows], out))
        merged = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
        return preference_metrics(self.objective, merged, seed=self.seed + step)


def _per_example(x: np.ndarray) -> np.ndarray:
    """[N, *heads] -> [N] float64 (reward heads / ensemble members averaged)."""
    return np.asarray(x, np.float64).reshape(len(x), -1).mean(-1)


def _role_values(score: Scores, *, normalised: bool, reward: bool) -> np.ndarray:
    """[N] per-example value of a role: the log-ratio h (or a reward), or the normalised score
    (mean response-token log-prob, or the reward); groups -> their members' mean."""
    if reward:
        return _per_example(score.policy)
    value = (np.asarray(score.policy) / np.maximum(np.asarray(score.num_tokens), 1.0)
             if normalised else np.asarray(score.h))
    if score.group_mask is not None:
        value = np.asarray(group_mean(jnp.asarray(value), jnp.asarray(score.group_mask)))
    return np.asarray(value, np.float64)


def preference_metrics(objective, outputs: dict, *, seed: int = 0) -> dict[str, float]:
    """The metrics of the module docstring from per-example scores of N examples."""
    needs = objective.needs
    reward = needs.model == REWARD_MODEL
    metrics = {"loss": float(np.mean(outputs["loss"], dtype=np.float64)),
               "examples": float(len(outputs["loss"]))}
    scores = outputs["scores"]
    if needs.roles == PAIR_ROLES and (reward or needs.reference):
        w = _role_values(scores["chosen"], normalised=False, reward=reward)
        l = _role_values(scores["rejected"], normalised=False, reward=reward)
        metrics["accuracy"] = float(np.mean(w > l))
        metrics["margin"] = float(np.mean(w - l))
    if needs.roles == PAIR_ROLES:
        s_w = _role_values(scores["chosen"], normalised=True, reward=reward)
        s_l = _role_values(scores["rejected"], normalised=True, reward=reward)
        # binary prediction between the two responses (thesis §2.8.8, Figure 2.5)
        probs = jax.nn.softmax(jnp.stack([s_w, s_l], axis=-1).astype(jnp.float32), axis=-1)
        labels = jnp.zeros(len(s_w), jnp.int32)  # the chosen response is the label
        metrics["likelihood_accuracy"] = float(np.mean(s_w > s_l))
        metrics["ece"] = float(sampled_ece(probs, labels, key=jax.random.PRNGKey(seed),
                                           n_bins=ECE_BINS))  # y_hat sampled, Remark 3
        metrics["ece_top_label"] = float(top_label_ece(probs, labels, n_bins=ECE_BINS))
    if needs.roles == UNLABELED_ROLES and needs.target_rewards:
        h_1 = _role_values(scores["response_1"], normalised=False, reward=False)
        h_2 = _role_values(scores["response_2"], normalised=False, reward=False)
        r_1 = _per_example(outputs["columns"]["target_rewards_1"])
        r_2 = _per_example(outputs["columns"]["target_rewards_2"])
        ordered = r_1 != r_2
        agree = np.sign(h_1 - h_2) == np.sign(r_1 - r_2)
        metrics["accuracy"] = float(np.mean(agree[ordered])) if ordered.any() else math.nan
        metrics["margin"] = float(np.mean(h_1 - h_2))
    return metrics


# ------------------------------------------------------------------ generation

def held_out_prompts(dataset, count: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` distinct prompts of a prepared dataset, left-padded: ids [P, L]
    int32 and mask [P, L] bool."""
    seen, rows = set(), []
    for example in dataset.examples:
        key = tuple(np.asarray(example.prompt_ids).tolist())
        if key not in seen:
            seen.add(key)
            rows.append(key)
        if len(rows) == count:
            break
    if len(rows) < 2:
        raise ValueError(f"generation metrics need >= 2 distinct held-out prompts (bootstrap "
                         f"intervals over prompts); the split has {len(rows)}")
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, True
    return ids, mask


def generation_metrics(run: Run, params: Any, reference_params: Any) -> dict[str, ev.Estimate]:
    """Per-prompt generation metrics of the policy `params`, summarised with bootstrap
    intervals (module docstring)."""
    spec, tokenizer = run.config.eval, run.tokenizer
    dataset = run.eval_dataset if run.eval_dataset is not None else run.dataset
    prompt_ids, prompt_mask = held_out_prompts(dataset, spec.num_prompts, tokenizer.pad_token_id)
    sampling = ev.SamplingConfig(num_samples=spec.num_samples,
                                 max_new_tokens=spec.max_new_tokens,
                                 temperature=spec.temperature, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, batch_size=spec.batch_size,
                                 prompt_length=prompt_ids.shape[1])
    policy = run.model(params)
    samples = ev.sample(policy, prompt_ids, prompt_mask, key=jax.random.PRNGKey(spec.seed),
                        config=sampling)
    scores = {}
    if spec.reward_model is not None:
        rm_scores = ev.reward_scores(load_reward_model(spec.reward_model), samples)
        scores["reward_model"] = rm_scores.reshape(-1, *rm_scores.shape[-2:]).mean(0)  # heads
    reference_logprobs = None
    if sampling.from_policy and has_adapters(params):  # the reference: the base model
        reference_logprobs = ev.response_logprobs(without_adapters(policy), samples)
    elif sampling.from_policy and reference_params is not None:
        reference_logprobs = ev.response_logprobs(run.model(reference_params), samples)
    per_prompt = ev.prompt_metrics(samples, scores=scores, reference_logprobs=reference_logprobs)
    return ev.summarize(per_prompt, seed=spec.seed)


def write_report(directory: pathlib.Path, *, step: int, preference: dict[str, float] | None,
                 generation: dict[str, ev.Estimate] | None) -> tuple[pathlib.Path, pathlib.Path]:
    """report.json and report.md in `directory` (written by process 0); returns their paths."""
    record: dict[str, Any] = {"step": step}
    lines = [f"# Evaluation at step {step}", ""]
    if preference is not None:
        record["preference"] = preference
        lines += ["## Preference metrics (held-out split)", "",
                  ev.markdown_table({"policy": preference}, digits=4), ""]
    if generation is not None:
        record["generation"] = ev.summary_record(generation)
        lines += ["## Generation metrics (mean [95% bootstrap interval over prompts])", "",
                  ev.markdown_table({"policy": generation}), ""]
    json_path, md_path = directory / "report.json", directory / "report.md"
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=1))
        md_path.write_text("\n".join(lines))
    return json_path, md_path


# ------------------------------------------------------------------ the `alignax eval` command

REPORT_DIR = "report"


def evaluate(config, *, model: Any = None, params: Any = None, tokenizer: Any = None,
             data: Any = None, eval_data: Any = None, reference: Any = None) -> dict[str, Any]:
    """Evaluates the newest checkpoint of `config`'s run (the initial model when it has none):
    preference metrics on the held-out split (when the data has one) and, for a policy,
    generation metrics; writes run_dir/report/report.{json,md}. Arguments as `train`'s.

    Returns:
      {"step", "preference": {...} or None, "generation": {name: Estimate} or None,
       "report": the Markdown path}.
    """
    from alignax.trainer.config import comparable
    from alignax.trainer.runs import build_run
    from alignax.training import Checkpointer
    from alignax.training.state import create_train_state, make_optimizer

    run = build_run(config, model=model, params=params, tokenizer=tokenizer, data=data,
                    eval_data=eval_data, reference=reference)
    spec = config.train
    optimizer, _ = make_optimizer(spec.optimizer_config())
    state, shardings = create_train_state(run.params, optimizer,
                                          key=jax.random.PRNGKey(spec.seed), mesh=run.mesh)
    reference_params = None
    if config.objective.needs.reference and not has_adapters(run.params):
        reference_params = jax.device_put(
            run.params if run.reference_params is None else run.reference_params,
            shardings.params)
    checkpointer = Checkpointer(run.run_dir / "checkpoints", config=comparable(run.saved_config),
                                save_every=spec.save_every, keep=spec.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest(state)
    finally:
        checkpointer.close()
    step = 0 if restored is None else restored[2]
    policy = state.params if restored is None else restored[0].params
    preference = None
    if run.eval_dataset is not None:
        evaluator = PreferenceEvaluator(run, run.eval_dataset, batch_size=spec.batch_size,
                                        seed=config.eval.seed)
        preference = evaluator(policy, step, reference_params)
    generation = None
    if config.objective.needs.model != REWARD_MODEL:
        generation = generation_metrics(run, policy, reference_params)
    _, markdown = write_report(run.run_dir / REPORT_DIR, step=step, preference=preference,
                               generation=generation)
    return {"step": step, "preference": preference, "generation": generation,
            "report": markdown}
