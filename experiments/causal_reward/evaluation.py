"""What the studies measure on a policy or a reward model, at fixed compiled shapes.

    sample_texts(policy, prompts, ...)        N sampled responses per prompt, decoded   [P][N]
    pair_scores(reward_model, batches)        reward of each pair's two responses       [R], [R]
    pair_logprobs(policy, batches)            log pi(response | prompt) of both          [R], [R]

Pairs come as a `PreferenceDataset` (so prompts and responses are tokenized exactly as in
training, bos and eos included); they are scored in fixed batches of `batch_size` rows (the last
one filled up with copies of row 0, whose outputs are dropped), so every policy and reward
model of a study shares one compilation per function.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from alignax.data import PreferenceDataset, prepare_dataset
from alignax.eval import SamplingConfig, sample
from alignax.models import CausalLM, RewardModel
from alignax.training.step import role_logprobs, role_rewards

ROLES = ("chosen", "rejected")


def left_pad(prompts: Sequence[np.ndarray], *, width: int, pad_token_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [P, width] int32 ids and bool mask of tokenized prompts.

    >>> ids, mask = left_pad([np.array([5, 6]), np.array([7])], width=3, pad_token_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[0, 5, 6], [0, 0, 7]], [[False, True, True], [False, False, True]])
    """
    long = [i for i, p in enumerate(prompts) if len(p) > width]
    if long:
        raise ValueError(f"prompts {long[:8]} are longer than width={width} tokens")
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, True
    return ids, mask


def sample_texts(policy: CausalLM, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *,
                 num_samples: int, max_new_tokens: int, seed: int, tokenizer,
                 batch_size: int = 256) -> list[list[str]]:
    """`num_samples` responses per prompt at temperature 1, decoded without special tokens.

    Args:
      policy: the CausalLM.
      prompt_ids, prompt_mask: [P, L] left-padded prompts (L fixed per study: one compile).
      num_samples, max_new_tokens: N and the length cap.
      seed: the sampling key.
      tokenizer: decodes the responses and gives eos / pad.
      batch_size: rows per generate call.
    """
    config = SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                            prompt_length=prompt_ids.shape[1])
    samples = sample(policy, prompt_ids, prompt_mask, key=jax.random.PRNGKey(seed),
                     config=config)
    return samples.texts(tokenizer)


def prepare_pairs(records: Sequence[Mapping[str, Any]], tokenizer, *, max_length: int,
                  max_prompt_length: int, format: str = "auto", **kwargs) -> PreferenceDataset:
    """Pairs tokenized as the study's training data (one padded length: `max_length`)."""
    return prepare_dataset(list(records), tokenizer, format=format, max_length=max_length,
                           max_prompt_length=max_prompt_length, buckets=(max_length,), **kwargs)


def _rows(dataset: PreferenceDataset, batch_size: int):
    """Fixed-size collated batches over the dataset, and the real rows of each."""
    examples = list(dataset.examples)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        real = len(chunk)
        chunk += [examples[0]] * (batch_size - real)  # filler rows: dropped below
        batch = dataset.collate(chunk)
        yield {k: v for k, v in batch.items() if k.split("_", 1)[0] in ROLES}, real


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scores(graphdef, state, batch):
    return role_rewards(nnx.merge(graphdef, state), batch, ROLES)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logprobs(graphdef, state, batch):
    return role_logprobs(nnx.merge(graphdef, state), batch, ROLES, chunk_size=1024,
                         vocab_chunk_size=None)


def _over_pairs(fn, model: nnx.Module, dataset: PreferenceDataset, batch_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    graphdef, state = nnx.split(model)
    chosen, rejected = [], []
    for batch, real in _rows(dataset, batch_size):
        out = jax.device_get(fn(graphdef, state, batch))
        chosen.append(np.asarray(out["chosen"])[:real])
        rejected.append(np.asarray(out["rejected"])[:real])
    return np.concatenate(chosen).astype(np.float64), np.concatenate(rejected).astype(np.float64)


def pair_scores(reward_model: RewardModel, dataset: PreferenceDataset, *,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of every pair's chosen and rejected response: [R], [R] float64."""
    return _over_pairs(_scores, reward_model, dataset, batch_size)


def pair_logprobs(policy: CausalLM, dataset: PreferenceDataset, *,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """log pi(response | prompt) (eos included) of every pair's two responses: [R], [R]."""
    return _over_pairs(_logprobs, policy, dataset, batch_size)


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs whose chosen response scores higher (ties count half), in [0, 1].

    >>> pairwise_accuracy(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0]))
    0.5
    """
    diff = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))
