"""The training loop: progress bar, JSONL + TensorBoard metrics, PNG plot, checkpoints, NaN stop.

    state = train(step, state, batches, num_steps=..., mesh=mesh, reference_params=ref,
                  checkpointer=ckpt, logger=MetricsLogger(run_dir))

`batches` is any iterator of numpy batch dicts with `get_state()` / `set_state()` (e.g.
`alignax.data.BatchIterator`); its position is saved with every checkpoint, so a resumed run
sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable, Iterator

import jax
import matplotlib
import numpy as np
import tqdm
from jax.sharding import Mesh

from alignax.training.checkpoint import Checkpointer
from alignax.training.mesh import global_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)

PLOTTED = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the last good state was checkpointed first."""


class MetricsLogger:
    """Writes each step's scalar metrics to `metrics.jsonl` and TensorBoard events in `run_dir`.

    Args:
      run_dir: the run directory (created).
      tensorboard: also write TensorBoard event files (tensorboardX).
    """

    def __init__(self, run_dir: str | pathlib.Path, *, tensorboard: bool = True):
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one record {"step": step, **metrics} (process 0 only)."""
        if jax.process_index() != 0:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(name, float(value), int(step))

    def close(self) -> None:
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


def train(step: Callable, state: Any, batches: Iterator[dict], *, num_steps: int, mesh: Mesh,
          reference_params: Any = None, checkpointer: Checkpointer | None = None,
          logger: MetricsLogger | None = None, progress: bool = True, description: str = "train",
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> Any:
    """Runs `step` until `state.step == num_steps`; returns the final state.

    Each step: next batch -> global sharded arrays -> step -> host metrics (+ tokens_per_sec,
    step_time) -> logger -> checkpoint if due (with the iterator position after this batch).
    The final state is always checkpointed. A non-finite loss or gradient (the step then
    returns its input state unchanged) saves that last good state and raises
    `NonFiniteLossError`.

    Args:
      step: from `make_train_step`, `(state, batch, reference_params) -> (state, metrics)`.
      state: the (possibly restored) train state; `state.step` is where the loop starts.
      batches: iterator of numpy batch dicts positioned for `state.step`.
      num_steps: total number of updates of the run.
      on_step: optional callback(step, metrics) after each logged step.
    """
    start = int(state.step)
    bar = tqdm.tqdm(total=num_steps, initial=start, desc=description, disable=not progress,
                    dynamic_ncols=True)
    data_state = batches.get_state()
    try:
        for index in range(start, num_steps):
            batch = global_batch(next(batches), mesh)
            began = time.perf_counter()
            state, metrics = step(state, batch, reference_params)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - began
            metrics["step_time"] = elapsed
            metrics["tokens_per_sec"] = metrics["num_tokens"] / elapsed
            if not metrics["update_applied"] or not math.isfinite(metrics["loss"]):
                if checkpointer is not None:
                    checkpointer.save(index, state, data_state=data_state, force=True)
                    checkpointer.wait()
                raise NonFiniteLossError(
                    f"non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']} at "
                    f"step {index + 1}; the last good state (step {index}) was checkpointed")
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
                checkpointer.save(index + 1, state, data_state=data_state,
                                  force=index + 1 == num_steps)
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state
