"""The PPO loop: prompts -> iterations, with checkpoints that resume exactly, metrics, a
progress bar and a PNG plot.

    state = resume(checkpointer, trainer.init_state(key), prompts)   # or the fresh state
    state = train_ppo(trainer, state, prompts, num_iterations=200, checkpointer=checkpointer,
                      logger=MetricsLogger(run_dir), plot_path=run_dir / "ppo.png")

`prompts` is an iterator of {"prompt_input_ids", "prompt_attention_mask"} numpy batches with
`get_state()` / `set_state()` (e.g. `alignax.data.BatchIterator`); its position is saved with
every checkpoint. The whole PPO state (parameters, optimizer, update count, key, iteration,
beta, reward statistics) is in the checkpoint and every random draw derives from the key and
the iteration, so a run killed at any point and restarted from its last checkpoint produces
the same parameters as one that never stopped.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tqdm

from alignax.data.iterator import BatchIterator
from alignax.rl.step import PPOState
from alignax.rl.trainer import PPOTrainer
from alignax.training.checkpoint import Checkpointer
from alignax.training.loop import MetricsLogger, NonFiniteLossError, plot_metrics
from alignax.training.mesh import global_batch

PLOTTED = ("reward", "kl", "divergence", "kl_coef", "entropy", "clip_fraction", "value_loss",
           "explained_variance", "approx_kl")
"""The panels `train_ppo` plots (those a run reports)."""


def prompt_batches(prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, batch_size: int,
                   seed: int) -> BatchIterator:
    """A seeded, resumable iterator of prompt batches over the rows of left-padded arrays.

    Args:
      prompt_ids, prompt_mask: [num_prompts, P] (left-padded, e.g. a tokenizer with
        `padding_side="left"`).
      batch_size: prompts per batch (per process on several hosts: the global batch is
        `batch_size * process_count`).
      seed: shuffling seed (reshuffled every epoch).

    Yields:
      {"prompt_input_ids": [batch_size, P] int32, "prompt_attention_mask": [batch_size, P] bool}.
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [num_prompts, P], got "
                         f"{prompt_ids.shape} and {prompt_mask.shape}")
    arrays = {"prompt_input_ids": prompt_ids.astype(np.int32),
              "prompt_attention_mask": prompt_mask.astype(bool)}

    def collate(rows):
        return {k: v[np.asarray(rows)] for k, v in arrays.items()}

    return BatchIterator(list(range(len(prompt_ids))), collate, batch_size=batch_size, seed=seed,
                         shard_index=jax.process_index(), shard_count=jax.process_count())


def resume(checkpointer: Checkpointer, state: PPOState, prompts: Any) -> PPOState:
    """The newest readable checkpoint's state (and the prompt iterator moved to its position),
    or `state` unchanged when there is none. `state` is the template (structure, shardings)."""
    restored = checkpointer.restore_latest(state)
    if restored is None:
        return state
    state, data_state, _ = restored
    prompts.set_state(data_state)
    return state


def train_ppo(trainer: PPOTrainer, state: PPOState, prompts: Iterator[dict], *,
              num_iterations: int, checkpointer: Checkpointer | None = None,
              logger: MetricsLogger | None = None, plot_path: str | pathlib.Path | None = None,
              progress: bool = True,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> PPOState:
    """Runs PPO iterations until `state.iteration == num_iterations`; returns the final state.

    Each iteration: next prompts -> global sharded arrays -> `trainer.iteration` (rollout,
    scoring, update) -> metrics (logger, progress bar, callback) -> checkpoint if due (with the
    prompt iterator's position after these prompts). The final state is always checkpointed and
    the plot written. A minibatch whose loss or gradient is not finite is skipped (its update not
    applied); if no update of an iteration could be applied, the state (parameters unchanged)
    is checkpointed and `NonFiniteLossError` raised.

    Args:
      trainer: the PPO phases.
      state: the (possibly restored, see `resume`) state; its iteration is where the loop starts.
      prompts: iterator of prompt batches positioned for `state.iteration`.
      num_iterations: total rollout batches of the run.
      checkpointer, logger: optional `Checkpointer` and `MetricsLogger`.
      plot_path: where to write a PNG of `PLOTTED` (needs a logger).
      on_iteration: optional callback(iteration, metrics) after each iteration, before that
        iteration's checkpoint is written.
    """
    start = int(state.iteration)
    bar = tqdm.tqdm(total=num_iterations, initial=start, desc="ppo", disable=not progress,
                    dynamic_ncols=True)
    try:
        for index in range(start, num_iterations):
            batch = global_batch(next(prompts), trainer.mesh)
            state, metrics = trainer.iteration(state, batch["prompt_input_ids"],
                                               batch["prompt_attention_mask"])
            if metrics["update_applied"] == 0.0:  # every minibatch update was skipped
                if checkpointer is not None:  # parameters as before this iteration
                    checkpointer.save(index + 1, state, data_state=prompts.get_state(),
                                      force=True)
                    checkpointer.wait()
                raise NonFiniteLossError(
                    f"no PPO update could be applied at iteration {index + 1} (loss "
                    f"{metrics['loss']}, grad norm {metrics['grad_norm']}); the unchanged "
                    f"parameters were checkpointed")
            data_state = prompts.get_state()
            if logger is not None:
                logger.log(index + 1, metrics)
            if on_iteration is not None:
                on_iteration(index + 1, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}",
                            beta=f"{metrics['kl_coef']:.3g}")
            if checkpointer is not None:
                checkpointer.save(index + 1, state, data_state=data_state,
                                  force=index + 1 == num_iterations)
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
        if plot_path is not None and logger is not None:
            plot_metrics(logger.path, plot_path, names=PLOTTED, title="PPO")
    return state
