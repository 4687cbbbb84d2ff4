"""Reward sources for rollouts: a reward model, a reward ensemble (reduced), or a function.

Every source is called as `reward(prompt_ids [B, P], prompt_mask [B, P], response_ids [B, N],
response_mask [B, N]) -> [B] float32`, with left-padded prompts and right-padded responses
(the layout `alignax.models.generate` produces).

- `ModelReward(reward_model)`: a `RewardModel` scores the concatenated sequence at its last
  real token; with E heads ([E, B]) or a `RewardEnsemble` ([M, B], [M, E, B]) the scores are
  reduced over the leading axes: "mean", "min" (the pessimistic reward of reward-model
  distillation, over the ensemble), "max", or any function [K, B] -> [B].
- `FunctionReward(fn)`: a programmatic oracle, a Python function of NumPy arrays (run on the
  host) or, with `jit=True`, a JAX function (compiled once).

Normalisation and clipping of the scores are options of the PPO step (`PPOConfig`), because
running statistics belong to the checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.reward import RewardEnsemble, RewardModel

REDUCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "mean": lambda scores: jnp.mean(scores, axis=0),
    "min": lambda scores: jnp.min(scores, axis=0),
    "max": lambda scores: jnp.max(scores, axis=0),
}
"""Reductions of [K, B] scores (ensemble members x heads, flattened) to [B]."""


def sequences(prompt_ids: jax.Array, prompt_mask: jax.Array, response_ids: jax.Array,
              response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(input_ids [B, P + N], attention_mask [B, P + N]): prompt then response.

    Left padding before the prompt and right padding after the response; positions from
    `cumsum(mask) - 1` make them contiguous.
    """
    ids = jnp.concatenate([jnp.asarray(prompt_ids), jnp.asarray(response_ids)], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask).astype(bool),
                            jnp.asarray(response_mask).astype(bool)], axis=1)
    return ids.astype(jnp.int32), mask


class ModelReward:
    """Scores rollouts with a `RewardModel` or a `RewardEnsemble` (frozen).

    Args:
      model: the reward model or ensemble (its tokenizer must be the policy's).
      reduction: "mean", "min", "max" or a function [K, B] -> [B], applied when the model
        returns several scores per sequence (heads and/or members, flattened to K).
    """

    def __init__(self, model: RewardModel | RewardEnsemble, *,
                 reduction: str | Callable[[jax.Array], jax.Array] = "mean"):
        if not isinstance(model, (RewardModel, RewardEnsemble)):
            raise TypeError(f"model must be a RewardModel or RewardEnsemble, got "
                            f"{type(model).__name__}")
        if isinstance(reduction, str) and reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)} or a function, "
                             f"got {reduction!r}")
        reduce = REDUCTIONS[reduction] if isinstance(reduction, str) else reduction
        self.graphdef, self.state = nnx.split(model)

        @jax.jit
        def score(state, prompt_ids, prompt_mask, response_ids, response_mask):
            ids, mask = sequences(prompt_ids, prompt_mask, response_ids, response_mask)
            scores = nnx.merge(self.graphdef, state)(ids, mask)  # [B], [E, B], [M(, E), B]
            if scores.ndim == 1:
                return scores
            return reduce(scores.reshape(-1, scores.shape[-1])).astype(jnp.float32)

        self._score = score

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
        return self._score(self.state, prompt_ids, prompt_mask, response_ids, response_mask)


class FunctionReward:
    """A programmatic reward: `fn(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`.

    Args:
      fn: the oracle. Without `jit` it receives NumPy arrays on the host (any Python code,
        e.g. decoding text; single-process runs); with `jit=True` it receives JAX arrays and
        must be traceable.
      jit: compile `fn` with `jax.jit`.
    """

    def __init__(self, fn: Callable, *, jit: bool = False):
        self.fn = jax.jit(fn) if jit else fn
        self.jit = jit

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
        args = (prompt_ids, prompt_mask, response_ids, response_mask)
        if not self.jit:
            args = tuple(np.asarray(jax.device_get(a)) for a in args)
        scores = jnp.asarray(self.fn(*args), jnp.float32)
        if scores.shape != (np.shape(response_ids)[0],):
            raise ValueError(f"the reward function returned shape {scores.shape}, expected "
                             f"[B] = ({np.shape(response_ids)[0]},)")
        return scores
