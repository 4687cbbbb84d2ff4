"""Scores of sampled responses: reward models, reward ensembles, programmatic oracles, judges.

Every scorer returns one value per sample, [P, K] (an ensemble adds its member axes in front),
ready for `alignax.eval.prompt_metrics`. Reward models read prompt + response in the samples'
token ids, so they must share the policy's tokenizer; a reward model with another tokenizer is
a text function (`text_scores`) that re-tokenises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from alignax.eval.sampling import Samples, _in_batches
from alignax.models import RewardEnsemble, RewardModel


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rewards(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)  # [..., B]


def reward_scores(reward_model: RewardModel | RewardEnsemble, samples: Samples) -> np.ndarray:
    """Reward of every (prompt, response) sample.

    Args:
      reward_model: a RewardModel ([B] or [E, B] with E heads) or a RewardEnsemble ([M, B] or
        [M, E, B]), reading the samples' token ids.
      samples: from `alignax.eval.sample`.

    Returns:
      float32 [P, K], or [E, P, K] / [M, P, K] / [M, E, P, K]: reduce an ensemble as the study
      needs (004's pessimistic reward is `.min(0)`, the plain ensemble `.mean(0)`).
    """
    if not isinstance(reward_model, (RewardModel, RewardEnsemble)):
        raise TypeError(f"reward_model must be a RewardModel or RewardEnsemble, got "
                        f"{type(reward_model).__name__}")
    graphdef, state = nnx.split(reward_model)
    sequences = samples.sequences()
    rows = {"input_ids": sequences["input_ids"], "attention_mask": sequences["attention_mask"]}

    def score(_, batch):
        return _rewards(graphdef, state, batch["input_ids"], batch["attention_mask"])

    scores = _in_batches(score, rows, samples.config.batch_size)  # [..., P K]
    return scores.reshape(scores.shape[:-1] + samples.tokens.shape[:2]).astype(np.float32)


def token_scores(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], samples: Samples
                 ) -> np.ndarray:
    """A programmatic score of the response tokens, fn(tokens [R, N], mask [R, N]) -> [R].

    fn is any NumPy or JAX function (called once on all R = P K responses, sample k of prompt
    p in row p K + k). For an oracle that needs the prompt, use `text_scores` or index
    `samples.prompt_ids` by row // K inside fn.

    Returns:
      [P, K] float64 (fn's values, e.g. rewards, or integer labels / booleans as numbers).
    """
    tokens = samples.tokens.reshape(-1, samples.tokens.shape[-1])  # [P K, N]
    out = np.asarray(fn(tokens, samples.mask.reshape(tokens.shape)))
    if out.shape != (tokens.shape[0],):
        raise ValueError(f"the score function must return [R] = ({tokens.shape[0]},) values for "
                         f"R = P K responses, got shape {out.shape}")
    return out.astype(np.float64).reshape(samples.tokens.shape[:2])


def text_scores(fn: Callable[[str, str], float], prompts: Sequence[str],
                responses: Sequence[Sequence[str]]) -> np.ndarray:
    """fn(prompt, response) -> a number, for every sample: [P, K] float64.

    Args:
      fn: the oracle, e.g. "1.0 if the response is an integer in the prompt's [a, b]".
      prompts: P prompt texts.
      responses: P lists of K response texts (`Samples.texts(tokenizer)`).
    """
    responses = [list(r) for r in responses]
    _check_ragged("responses", responses, len(prompts))
    values = [[fn(p, r) for r in rows] for p, rows in zip(prompts, responses)]
    try:
        return np.asarray(values, np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"the score function must return numbers: {e}") from None


def judge_pairs(judge: Callable[[str, object, object], int], prompts: Sequence[str],
                responses_a: Sequence[Sequence], responses_b: Sequence[Sequence]) -> np.ndarray:
    """Outcomes of policy A's sample k against policy B's sample k under a judge: [P, K] int8.

    Args:
      judge: judge(prompt, response_a, response_b) -> +1 (A better), 0 (tie), -1 (B better);
        responses are whatever the lists hold (texts, or token lists from `Samples.responses`).
      prompts: P prompts.
      responses_a, responses_b: P lists of K responses each, paired by position.

    Returns:
      int8 [P, K] for `alignax.metrics.win_rates`.
    """
    responses_a = [list(r) for r in responses_a]
    responses_b = [list(r) for r in responses_b]
    _check_ragged("responses_a", responses_a, len(prompts))
    _check_ragged("responses_b", responses_b, len(prompts))
    if len(responses_a[0]) != len(responses_b[0]):
        raise ValueError(f"responses_a has K = {len(responses_a[0])} per prompt, responses_b "
                         f"{len(responses_b[0])}: they are compared pairwise")
    outcomes = np.asarray([[judge(p, a, b) for a, b in zip(ra, rb)]
                           for p, ra, rb in zip(prompts, responses_a, responses_b)])
    bad = np.argwhere(~np.isin(outcomes, (-1, 0, 1)))
    if bad.size:
        raise ValueError(f"the judge must return +1, 0 or -1; got {outcomes[tuple(bad[0])]!r} "
                         f"at (prompt, sample) {tuple(bad[0].tolist())}")
    return outcomes.astype(np.int8)


def _check_ragged(name: str, rows: list[list], num_prompts: int) -> None:
    """Raises ValueError unless rows holds num_prompts lists of one common length K >= 1."""
    if len(rows) != num_prompts:
        raise ValueError(f"{name} has {len(rows)} prompts' responses for {num_prompts} prompts")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"{name} must hold the same number K >= 1 of responses for every "
                         f"prompt, got counts {sorted(lengths)}")
