"""`label(config)`: target rewards of unlabeled pairs from a reward model or an ensemble.

Reward-model distillation (004 §4.1) trains on pairs (x, y_1, y_2) labelled with a reward
model's scores r(x, y_1), r(x, y_2) (d-DPO), or with an ensemble's (pd-DPO / e-DPO). `label`
reads records with "prompt", "response_1", "response_2" (the "unlabeled" format), scores both
responses with

- one reward model (one score per response), or one multi-head model (E scores), or
- several checkpoints stacked into a `RewardEnsemble` (one vmapped forward, M x heads scores),

and writes every record with "target_rewards_1" / "target_rewards_2" added: a float per
response for a single score, a list of E floats for an ensemble. The output is JSONL that
`prepare_dataset` reads back as the "unlabeled" format, with [B] or [B, E] target rewards.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from alignax.data import check_tokenizer, load_records, prepare_dataset
from alignax.models import RewardEnsemble, load_reward_model
from alignax.trainer.config import LabelConfig, ModelConfig
from alignax.trainer.runs import load_tokenizer
from alignax.objectives.registry import UNLABELED_ROLES
from alignax.training.step import role_rewards

REWARD_COLUMNS = ("target_rewards_1", "target_rewards_2")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, batch):
    """{role: [B, *heads]} rewards of both responses."""
    return role_rewards(nnx.merge(graphdef, state), batch, UNLABELED_ROLES)


def label(config: LabelConfig) -> pathlib.Path:
    """Writes `config.output` (see the module docstring); returns its path.

    Raises:
      ValueError: a record that is not an unlabeled pair (naming it), or a tokenizer whose ids
        exceed the reward models' vocabulary.
    """
    models = [load_reward_model(path) for path in config.reward_models]
    model = models[0] if len(models) == 1 else RewardEnsemble.stack(models)
    tokenizer = load_tokenizer(ModelConfig(config.reward_models[0],
                                           tokenizer=config.tokenizer))
    check_tokenizer(tokenizer, vocab_size=int(models[0].config.vocab_size))
    records = load_records(config.data, split=config.split).to_list()
    # the records' own target-reward columns, if any, are replaced
    stripped = [{k: v for k, v in r.items() if k not in REWARD_COLUMNS} for r in records]
    dataset = prepare_dataset(stripped, tokenizer, format="unlabeled",
                              max_length=config.max_length)
    graphdef, state = nnx.split(model)
    rewards = {role: [None] * len(records) for role in UNLABELED_ROLES}
    examples = list(dataset.examples)
    for start in range(0, len(examples), config.batch_size):
        chunk = examples[start:start + config.batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[0]] * (config.batch_size - rows)  # one compiled batch shape
        batch = dataset.collate(chunk)
        columns = {f"{role}_{name}": batch[f"{role}_{name}"] for role in UNLABELED_ROLES
                   for name in ("input_ids", "attention_mask")}
        scores = jax.device_get(_score(graphdef, state, columns))
        for role in UNLABELED_ROLES:
            values = np.asarray(scores[role], np.float64).reshape(config.batch_size, -1)
            for index, row in zip(batch["record_index"][:rows], values[:rows]):
                rewards[role][index] = float(row[0]) if row.size == 1 else row.tolist()
    output = pathlib.Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    with temporary.open("w") as f:
        for index, record in enumerate(stripped):
            labelled = {**record, REWARD_COLUMNS[0]: rewards["response_1"][index],
                        REWARD_COLUMNS[1]: rewards["response_2"][index]}
            f.write(json.dumps(labelled) + "\n")
    os.replace(temporary, output)
    return output
