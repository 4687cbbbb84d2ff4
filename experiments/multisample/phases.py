"""The phases of a multi-sample study: training runs on `alignax.trainer`, sampling, and the
bookkeeping that makes a killed study resume where it stopped.

Every training run is one `alignax.trainer.train` call in its own run directory (checkpoints,
metrics.jsonl, TensorBoard, eval/metrics.jsonl when the run evaluates a held-out split), so a
rerun restores or skips it. The preference runs train LoRA adapters when a study sets
`lora_rank` (`preference_model_config`); the SFT runs that make their start models train
every weight. What a study computes from a finished run (sampled answers, scores) is cached
as JSON next to it (`cached`), and the study's own config is saved at the top of its run
directory (`check_study_config`): a restart under a changed config is refused with the
fields named, instead of mixing cached results of two configs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from alignax.eval import SamplingConfig, encode_prompts, sample
from alignax.objectives import Objective
from alignax import trainer
from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig, TrainResult
from alignax.trainer.cli import parse_config
from alignax.training.step import role_logprobs

STUDY_CONFIG = "study_config.json"


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes JSON atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(temporary, path)


def cached(path: pathlib.Path, compute: Callable[[], Any]) -> Any:
    """The JSON value stored at `path`, or `compute()` written there first."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


def preference_model_config(model_config: ModelConfig, *, lora_rank: int | None,
                            lora_alpha: float | None) -> ModelConfig:
    """The ModelConfig of a study's preference runs: `model_config` with the study's LoRA.

    lora_rank None trains every weight; r trains LoRA adapters of rank r on every projection
    (the trainer's default targets) with alpha `lora_alpha` (None: 2 r), the base weights
    frozen and, with the adapters off, the reference. The thesis fine-tunes with LoRA (rank
    64, alpha 128, §3.6.1).

    Raises:
      ValueError: lora_alpha without lora_rank, a rank < 1 or alpha <= 0 (the field named).
    """
    return dataclasses.replace(model_config, lora_rank=lora_rank, lora_alpha=lora_alpha)


def study_main(config_class: type, run: Callable[[Any], str], argv: Sequence[str] | None, *,
               prog: str) -> str:
    """A study's `main`: flags parsed into `config_class`, progress logged at INFO, the study
    run, its table printed and returned."""
    config = parse_config(config_class, argv, prog=prog)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    for name in ("experiments", "alignax"):
        logging.getLogger(name).setLevel(logging.INFO)
    table = run(config)
    print(table)
    return table


def check_study_config(config: Any, *, resumable: Sequence[str]) -> pathlib.Path:
    """Saves the study config (a dataclass) in its run directory, refusing a directory that
    holds a study of another config.

    Args:
      config: the study's Config; its `run_dir` field names the directory.
      resumable: fields that may differ on a restart (e.g. "seeds", "progress").

    Returns:
      The run directory.

    Raises:
      ValueError: the directory's saved config differs in other fields (all of them named).
    """
    run_dir = pathlib.Path(config.run_dir)
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists
    path = run_dir / STUDY_CONFIG
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = [f"{k}: {saved.get(k)!r} (run directory) != {current.get(k)!r} (this run)"
                 for k in sorted(set(saved) | set(current))
                 if k not in resumable and saved.get(k) != current.get(k)]
        if diffs:
            raise ValueError(f"{run_dir} holds a study run with another config; restarting it "
                             f"would mix the two. Differences: {'; '.join(diffs)}. Use another "
                             f"run_dir or undo the change (may change: {', '.join(resumable)})")
    write_json(path, current)
    return run_dir


def train_config(*, steps: int, batch_size: int, learning_rate: float, seed: int, mesh,
                 progress: bool, save_every: int | None = None, lr_schedule: str = "constant",
                 warmup_steps: int = 0) -> TrainConfig:
    """The TrainConfig of a study run: no export (the studies use the returned model), a
    checkpoint every `save_every` steps (default: only at the end; the preference runs take
    seconds, and a run killed before its end starts again)."""
    return TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                       lr_schedule=lr_schedule, warmup_steps=warmup_steps, seed=seed,
                       mesh=tuple(mesh), save_every=save_every or steps, export=False,
                       progress=progress)


def train_run(run_dir: pathlib.Path, objective: Objective, records: list[dict], *,
              train: TrainConfig, data: DataConfig, model: Any = None,
              model_config: ModelConfig = ModelConfig(), tokenizer: Any = None,
              eval_records: list[dict] | None = None) -> TrainResult:
    """One resumable `alignax.trainer.train` run of `objective` on in-memory records.

    Args:
      run_dir: the run directory (a rerun restores its newest checkpoint).
      objective: a registered objective config.
      records: the training records; eval_records: the held-out ones (with train.eval_every).
      train, data: the run's TrainConfig and DataConfig (data.path stays None).
      model: the model to start from (also the reference); None: `model_config`'s.
      model_config: the ModelConfig (the checkpoint when `model` is None, and the tokenizer).
      tokenizer: a tokenizer object instead of the model config's.
    """
    config = RunConfig(run_dir=str(run_dir), model=model_config, data=data, objective=objective,
                       train=train)
    return trainer.train(config, model=model, tokenizer=tokenizer, data=records,
                         eval_data=eval_records)


def sample_texts(model, tokenizer, prompts: Sequence[str], *, num_samples: int,
                 max_new_tokens: int, key: jax.Array, batch_size: int,
                 prompt_length: int) -> list[list[str]]:
    """P lists of `num_samples` responses sampled from `model` at temperature 1 (EOS and
    padding removed), through `alignax.eval.sample` at fixed compiled shapes."""
    ids, mask = encode_prompts(tokenizer, prompts, prompt_length=prompt_length)
    config = SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                            prompt_length=prompt_length)
    return sample(model, ids, mask, key=key, config=config).texts(tokenizer)


def seed_key(seed: int, purpose: int) -> jax.Array:
    """A PRNG key for one purpose of one seed (sampling evaluations, data)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), purpose)


def numpy_rng(seed: int, purpose: int) -> np.random.Generator:
    """A NumPy generator for one purpose of one seed (independent streams)."""
    return np.random.default_rng([seed, purpose])


@functools.partial(jax.jit, static_argnames=("graphdef", "roles", "chunk_size"))
def _role_logps(graphdef, state, columns, *, roles, chunk_size):
    """role -> [B, K] summed response log-probs of a merged model (adapters on, if any)."""
    return role_logprobs(nnx.merge(graphdef, state), columns, roles, chunk_size=chunk_size,
                         vocab_chunk_size=None)


def group_log_ratios(model, reference, dataset, *, batch_size: int,
                     chunk_size: int = 1024) -> dict[str, np.ndarray]:
    """Log-ratios h = log pi(y|x) - log pi_ref(y|x) of every member of a prepared grouped
    dataset's groups (e.g. held-out groups, to compute held-out mIPO losses).

    Args:
      model, reference: CausalLMs (the policy and the frozen reference). After a LoRA run the
        policy is the returned model (its adapters on) and the reference the model the run
        started from (the base weights without adapters); the two may differ in structure.
      dataset: a `PreferenceDataset` of "grouped" records.
      batch_size: examples per scoring call (the last call is filled up with copies).

    Returns:
      {"chosen": [G, K], "rejected": [G, L] float32 log-ratios, "chosen_mask": [G, K],
      "rejected_mask": [G, L] bool member masks}.
    """
    if dataset.format != "grouped":
        raise ValueError(f"group_log_ratios needs grouped records, got {dataset.format!r}")
    roles = ("chosen", "rejected")
    policy, base = nnx.split(model), nnx.split(reference)
    examples = list(dataset.examples)
    out = {name: [] for name in ("chosen", "rejected", "chosen_mask", "rejected_mask")}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = len(chunk)
        batch = dataset.collate(chunk + [chunk[0]] * (batch_size - rows))
        columns = {f"{r}_{c}": batch[f"{r}_{c}"] for r in roles
                   for c in ("input_ids", "attention_mask", "loss_mask")}  # [B, K, T] each
        policy_logps = jax.device_get(_role_logps(*policy, columns, roles=roles,
                                                  chunk_size=chunk_size))
        base_logps = jax.device_get(_role_logps(*base, columns, roles=roles,
                                                chunk_size=chunk_size))
        for role in roles:
            out[role].append((np.asarray(policy_logps[role])
                              - np.asarray(base_logps[role]))[:rows])
            out[f"{role}_mask"].append(batch[f"{role}_group_mask"][:rows])
    return {k: np.concatenate(v) for k, v in out.items()}
