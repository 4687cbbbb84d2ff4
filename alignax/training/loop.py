"""The training loop: progress bar, JSONL + TensorBoard metrics, PNG plot, checkpoints, NaN stop.

    state = train(step, state, batches, num_steps=..., mesh=mesh, reference_params=ref,
                  checkpointer=ckpt, logger=MetricsLogger(run_dir))

`batches` is any iterator of numpy batch dicts with `get_state()` / `set_state()` (e.g.
`alignax.data.BatchIterator`); its position is saved with every checkpoint, so a resumed run
sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import matplotlib
import numpy as np
import tqdm
from jax.sharding import Mesh

from alignax.training.checkpoint import Checkpointer, NonFiniteStateError
from alignax.training.mesh import global_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)

log = logging.getLogger(__name__)

PLOTTED = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient or state became NaN/inf; the message says what was checkpointed."""


class MetricsLogger:
    """Writes each step's scalar metrics to `metrics.jsonl` and TensorBoard events in `run_dir`.

    Only process 0 writes. `train` calls `resume(start_step)` first, so a resumed run's
    replayed steps replace the records it had logged after its checkpoint.

    Args:
      run_dir: the run directory (created).
      tensorboard: also write TensorBoard event files (tensorboardX).
    """

    def __init__(self, run_dir: str | pathlib.Path, *, tensorboard: bool = True):
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._primary = jax.process_index() == 0
        self._file = self.path.open("a") if self._primary else None
        self._tensorboard = tensorboard and self._primary
        self._writer = None  # created at the first record, after any `resume`
        self._purge_step = None

    def resume(self, step: int) -> None:
        """Drops the records of the steps after `step`, which a run resumed at `step` redoes.

        metrics.jsonl is rewritten (atomically) with the records up to `step`; lines that do
        not parse (a record cut short by a kill) are dropped with a warning naming them.
        TensorBoard is told to discard its events from step + 1 on (`purge_step`).
        """
        if not self._primary:
            return
        self._file.close()
        kept, dropped, unreadable = [], 0, []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                unreadable.append(number)
                continue
            if record_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if unreadable:
            log.warning("%s: dropping unreadable lines %s (e.g. a record cut short by a kill)",
                        self.path, unreadable)
        if dropped:
            log.info("%s: dropping %d records after step %d (the resumed run logs them again)",
                     self.path, dropped, step)
        if dropped or unreadable:
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)
        self._file = self.path.open("a")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one record {"step": step, **metrics} (process 0 only)."""
        if not self._primary:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard and self._writer is None:
            from tensorboardX import SummaryWriter
            # tensorboardX names files by the second: a unique suffix keeps a restart within
            # the same second from overwriting the previous writer's file.
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=self._purge_step,
                                         filename_suffix=f".{uuid.uuid4().hex[:8]}")
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl, keeping the last record of each step (after a resume)."""
    by_step = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(path: str | pathlib.Path, out: str | pathlib.Path,
                 names: tuple[str, ...] = PLOTTED, title: str = "") -> None:
    """A PNG with one panel per metric name found in the metrics.jsonl at `path`."""
    records = read_metrics(path)
    names = [n for n in names if any(n in r for r in records)]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3))
    for ax, name in zip(np.atleast_1d(axes), names):
        steps = [r["step"] for r in records if name in r]
        ax.plot(steps, [r[name] for r in records if name in r])
        ax.set_xlabel("step")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _newest(checkpointer: Checkpointer) -> str:
    latest = checkpointer.latest_step()
    return "none" if latest is None else f"step {latest}"


def _save_final(checkpointer: Checkpointer | None, step: int, state: Any,
                data_state: Any) -> str:
    """Checkpoints the state a run stops with; returns a sentence saying what is on disk."""
    if checkpointer is None:
        return f"the last state (step {step}) was not saved: no checkpointer was given"
    try:
        checkpointer.save(step, state, data_state=data_state, force=True)
        checkpointer.wait()
    except NonFiniteStateError as error:
        return (f"the state at step {step} was not checkpointed ({error}); the newest "
                f"checkpoint on disk is {_newest(checkpointer)}")
    if step not in checkpointer.all_steps():
        return f"the last state (step {step}) is not on disk"
    return f"the last good state (step {step}) was checkpointed"


def train(step: Callable, state: Any, batches: Iterator[dict], *, num_steps: int, mesh: Mesh,
          reference_params: Any = None, checkpointer: Checkpointer | None = None,
          logger: MetricsLogger | None = None, progress: bool = True, description: str = "train",
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> Any:
    """Runs `step` until `state.step == num_steps`; returns the final state.

    Each step: next batch -> global sharded arrays -> step -> host metrics (+ tokens_per_sec,
    step_time) -> logger -> checkpoint if due (with the iterator position after this batch).
    The final state is always checkpointed. A non-finite loss or gradient (the step then
    returns its input state unchanged) checkpoints that last good state and raises
    `NonFiniteLossError`; the message says whether it was saved (the Checkpointer refuses a
    state holding NaN/inf, e.g. one that an earlier update made non-finite) and which
    checkpoint is the newest on disk. An iterator that runs out first also checkpoints the
    last state, then raises ValueError. A state already at or after `num_steps` (a finished
    run started again) returns unchanged, with a log line.

    Args:
      step: from `make_train_step`, `(state, batch, reference_params) -> (state, metrics)`.
      state: the (possibly restored) train state; `state.step` is where the loop starts.
      batches: iterator of numpy batch dicts positioned for `state.step`.
      num_steps: total number of updates of the run, > 0.
      logger: its records after `state.step` (left by the run this one resumes) are dropped
        first (`MetricsLogger.resume`).
      on_step: optional callback(step, metrics) after each logged step.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or \
            num_steps <= 0:
        raise ValueError(f"num_steps must be an int > 0, got {num_steps!r}")
    start = int(state.step)
    if logger is not None:
        logger.resume(start)
    if start >= num_steps:
        log.info("%s: the state is already at step %d of num_steps=%d, nothing to train",
                 description, start, num_steps)
        return state
    bar = tqdm.tqdm(total=num_steps, initial=start, desc=description, disable=not progress,
                    dynamic_ncols=True)
    data_state = batches.get_state()
    try:
        for index in range(start, num_steps):
            try:
                batch = next(batches)
            except StopIteration:
                saved = _save_final(checkpointer, index, state, data_state)
                raise ValueError(f"the batch iterator ran out after step {index} of "
                                 f"num_steps={num_steps}; {saved}") from None
            batch = global_batch(batch, mesh)
            began = time.perf_counter()
            state, metrics = step(state, batch, reference_params)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - began
            metrics["step_time"] = elapsed
            metrics["tokens_per_sec"] = metrics["num_tokens"] / elapsed
            if not metrics["update_applied"] or not math.isfinite(metrics["loss"]):
                saved = _save_final(checkpointer, index, state, data_state)
                raise NonFiniteLossError(
                    f"non-finite loss {metrics['loss']}, grad norm {metrics['grad_norm']} or "
                    f"update norm {metrics.get('update_norm')} at step {index + 1}; {saved}")
            data_state = batches.get_state()
            if logger is not None:
                logger.log(index + 1, metrics)
            if on_step is not None:
                on_step(index + 1, metrics)
            bar.update(1)
            live = {"loss": ("loss", ".4f"), "margin": ("rewards/margins", ".3f"),
                    "acc": ("rewards/accuracies", ".2f")}  # objectives without pairs (SFT) omit some
            bar.set_postfix({label: format(metrics[key], spec) for label, (key, spec) in live.items()
                             if key in metrics})
            if checkpointer is not None:
                try:
                    checkpointer.save(index + 1, state, data_state=data_state,
                                      force=index + 1 == num_steps)
                except NonFiniteStateError as error:
                    raise NonFiniteLossError(
                        f"the update of step {index + 1} left a non-finite state, which was not "
                        f"checkpointed ({error}); the newest checkpoint on disk is "
                        f"{_newest(checkpointer)}") from error
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state
