"""`train(config)`: one resumable run of any registered objective, end to end.

    result = alignax.trainer.train(RunConfig(run_dir="runs/sft", data=DataConfig("pairs.jsonl"),
                                             objective=SFT(), train=TrainConfig(steps=200)))
    dpo = alignax.trainer.train(dpo_config, model=result.model)  # SFT policy = start + reference

What a run does, in `run_dir`:
- builds the run (`alignax.trainer.runs.build_run`: every guard rail before anything compiles);
- restores the newest good checkpoint (model, optimizer, step, key, data position) when there is
  one, else starts at step 0; the reference is the initial policy (or ModelConfig.reference);
- trains with the shared-prompt step wherever the objective allows it, logging every step to
  metrics.jsonl, TensorBoard and (optionally) Weights & Biases, with a progress bar of the
  objective's own metrics;
- every `eval_every` steps and at the end evaluates the held-out split (eval/metrics.jsonl) and
  stops early when `early_stopping_metric` has not improved for `early_stopping_patience`
  evaluations (a rerun then stops at the same step instead of training on);
- exports the final model with its tokenizer as HF safetensors to run_dir/export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

from alignax.trainer.config import RunConfig, comparable
from alignax.trainer.evaluate import PreferenceEvaluator
from alignax.trainer.runs import EXPORT_DIR, Run, build_run, enable_compilation_cache, export_model
from alignax.training import Checkpointer, MetricsLogger, TrainState
from alignax.training import train as train_loop
from alignax.training.loop import read_metrics
from alignax.training.state import create_train_state, has_adapters, make_optimizer
from alignax.training.step import StepConfig, make_train_step

log = logging.getLogger("alignax.trainer")

# Step metrics that are not the objective's own (left off the progress bar).
_GENERIC = ("loss", "grad_norm", "update_norm", "lr", "num_tokens", "update_applied",
            "step_time", "tokens_per_sec")
_BAR_METRICS = 3  # the objective's metrics shown next to the loss


@dataclasses.dataclass
class TrainResult:
    """What a finished (or early-stopped) run hands to the next step of a script.

    Attributes:
      run_dir: the run directory.
      model: the trained model (a CausalLM, RewardModel or RewardEnsemble with the final
        parameters); pass it as `model=` (and so as the reference) to the next run.
      params: the final parameters (nnx.State); `graphdef`, `model_state`: the rest of the model.
      tokenizer: the run's tokenizer.
      state: the final TrainState (step, optimizer state, key).
      metrics: the last step's training metrics; eval_history: every evaluation's metrics.
      export_dir: run_dir/export (HF safetensors + tokenizer), or None without export.
      stopped_early: whether early stopping ended the run before `steps`.
    """

    run_dir: pathlib.Path
    model: nnx.Module
    params: Any
    graphdef: nnx.GraphDef
    model_state: Any
    tokenizer: Any
    state: TrainState
    metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    export_dir: pathlib.Path | None
    stopped_early: bool


class _Wandb:
    """Weights & Biases logging (optional import: `TrainConfig.wandb` names the project)."""

    def __init__(self, config: RunConfig, run: Run):
        import wandb

        id_file = run.run_dir / "wandb_id"
        if not id_file.exists() and jax.process_index() == 0:
            id_file.write_text(wandb.util.generate_id())
        self.run = wandb.init(project=config.train.wandb, dir=str(run.run_dir),
                              config=run.saved_config, id=id_file.read_text().strip(),
                              resume="allow") if jax.process_index() == 0 else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _segment_ends(start: int, steps: int, eval_every: int) -> list[int]:
    """The steps at which training pauses (to evaluate) after `start`, ending at `steps`."""
    ends = set(range(eval_every, steps, eval_every)) if eval_every else set()
    return sorted(e for e in ends | {steps} if e > start)


def _improved(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _early_stop(history: list[dict], config: RunConfig) -> bool:
    """Whether the evaluations so far trigger early stopping."""
    train = config.train
    name = train.early_stopping_metric
    if name is None:
        return False
    best, waited = None, 0
    for record in history:
        if name not in record:
            raise ValueError(f"TrainConfig.early_stopping_metric={name!r} is not an evaluation "
                             f"metric of {config.objective.name}; it has "
                             f"{sorted(k for k in record if k != 'step')}")
        value = record[name]
        if math.isfinite(value) and _improved(value, best, mode=train.early_stopping_mode,
                                              min_delta=train.early_stopping_min_delta):
            best, waited = value, 0
        else:
            waited += 1
    return waited >= train.early_stopping_patience


def make_step(run: Run, optimizer, schedule, shardings):
    """The run's jitted train step (shared-prompt scoring wherever the objective allows)."""
    train = run.config.train
    step_config = StepConfig(grad_accum_steps=train.grad_accum_steps, remat=train.remat,
                             compute_dtype=train.compute_dtype, chunk_size=train.chunk_size,
                             vocab_chunk_size=train.vocab_chunk_size,
                             share_prompt=run.share_prompt)
    return make_train_step(run.graphdef, run.config.objective, optimizer, schedule,
                           mesh=run.mesh, state_shardings=shardings,
                           model_state=run.model_state, config=step_config,
                           reference="base" if has_adapters(run.params) else "model")


def train(config: RunConfig, *, model: Any = None, params: Any = None, tokenizer: Any = None,
          data: Any = None, eval_data: Any = None, reference: Any = None) -> TrainResult:
    """Trains (or resumes) the run `config` describes; see the module docstring.

    Args:
      config: the RunConfig (validated when built).
      model: start from this model (CausalLM / RewardModel / RewardEnsemble) instead of
        ModelConfig.path; it is also the default reference.
      params: initial parameters (nnx.State) for the architecture ModelConfig names.
      tokenizer: a tokenizer object instead of ModelConfig.tokenizer.
      data, eval_data: records (list of dicts in any supported format, or a datasets.Dataset)
        instead of DataConfig.path / the held-out source.
      reference: the frozen reference (model or parameters) instead of the initial policy.

    Returns:
      A TrainResult.

    Raises:
      ValueError / TypeError: a guard rail (tokenizer, objective vs model or data, bins, a
        changed config in an existing run directory), before anything compiles.
      alignax.training.NonFiniteLossError: the loss or gradient became NaN/inf (the last good
        state is checkpointed).
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be an alignax.trainer.RunConfig, got "
                        f"{type(config).__name__}")
    if config.train.compilation_cache:
        enable_compilation_cache(pathlib.Path(config.run_dir).expanduser().absolute())
    run = build_run(config, model=model, params=params, tokenizer=tokenizer, data=data,
                    eval_data=eval_data, reference=reference)
    spec = config.train
    optimizer, schedule = make_optimizer(spec.optimizer_config())
    state, shardings = create_train_state(run.params, optimizer, key=jax.random.PRNGKey(spec.seed),
                                          mesh=run.mesh)
    reference_params = run.reference_params
    lora = has_adapters(run.params)  # the reference: the base model, adapters off
    if config.objective.needs.reference and reference_params is None and not lora:
        reference_params = jax.tree.map(jnp.copy, state.params)  # the initial policy, frozen
    elif reference_params is not None:
        reference_params = jax.device_put(reference_params, shardings.params)
    step = make_step(run, optimizer, schedule, shardings)
    batches = run.dataset.batches(batch_size=spec.batch_size // jax.process_count(),
                                  seed=spec.seed, share_prompt=run.share_prompt,
                                  shard_index=jax.process_index(),
                                  shard_count=jax.process_count())
    checkpointer = Checkpointer(run.run_dir / "checkpoints", config=comparable(run.saved_config),
                                save_every=spec.save_every, keep=spec.keep_checkpoints)
    evaluator = None
    if spec.eval_every and run.eval_dataset is not None:
        evaluator = PreferenceEvaluator(run, run.eval_dataset, batch_size=spec.batch_size,
                                        max_batches=spec.eval_batches, seed=spec.seed)
    restored = checkpointer.restore_latest(state, batches=batches)
    if restored is not None:
        state, _, at = restored
        log.info("%s: resumed from step %d", run.run_dir, at)
    start = int(state.step)

    logger = MetricsLogger(run.run_dir, tensorboard=spec.tensorboard)
    eval_logger = MetricsLogger(run.run_dir / "eval", tensorboard=spec.tensorboard)
    eval_logger.resume(start)
    eval_path = run.run_dir / "eval" / "metrics.jsonl"
    history = read_metrics(eval_path) if eval_path.exists() else []
    wandb = _Wandb(config, run) if spec.wandb else None
    bar = tqdm.tqdm(total=spec.steps, initial=min(start, spec.steps), disable=not spec.progress,
                    desc=f"{config.objective.name}", dynamic_ncols=True)
    last: dict[str, float] = {}

    def on_step(index: int, metrics: dict[str, float]) -> None:
        last.clear()
        last.update(metrics)
        bar.update(1)
        own = sorted((k for k in metrics if k not in _GENERIC
                      and not k.startswith(("logps/", "scores/"))),
                     key=lambda k: ("accurac" not in k, "margin" not in k))  # these first
        shown = {"loss": f"{metrics['loss']:.4f}",
                 **{k.split("/")[-1]: f"{metrics[k]:.3g}" for k in own[:_BAR_METRICS]}}
        bar.set_postfix(shown)
        if wandb is not None:
            wandb.log(index, metrics)

    # a run stopped between its checkpoint and its evaluation evaluates that step first
    pending = (evaluator is not None and 0 < start <= spec.steps
               and (start % spec.eval_every == 0 or start == spec.steps)
               and all(r["step"] != start for r in history))
    stopped = _early_stop(history, config)
    try:
        for end in ([] if stopped else [start] * pending
                    + _segment_ends(start, spec.steps, spec.eval_every)):
            if end > int(state.step):
                state = train_loop(step, state, batches, num_steps=end, mesh=run.mesh,
                                   reference_params=reference_params, checkpointer=checkpointer,
                                   logger=logger, progress=False, on_step=on_step,
                                   description=config.objective.name)
            if evaluator is not None:
                metrics = evaluator(state.params, end, reference_params)
                eval_logger.log(end, metrics)
                history.append({"step": end, **metrics})
                if wandb is not None:
                    wandb.log(end, {f"eval/{k}": v for k, v in metrics.items()})
                log.info("eval at step %d: %s", end, json.dumps(metrics))
                if _early_stop(history, config):
                    stopped = True
                    log.info("early stopping at step %d: %s did not improve for %d evaluations",
                             end, spec.early_stopping_metric, spec.early_stopping_patience)
                    break
    finally:
        bar.close()
        logger.close()
        eval_logger.close()
        checkpointer.close()
        if wandb is not None:
            wandb.close()
    if not last and (run.run_dir / "metrics.jsonl").exists():
        records = read_metrics(run.run_dir / "metrics.jsonl")
        last = {k: v for k, v in records[-1].items() if k != "step"} if records else {}
    export_dir = None
    if spec.export:
        export_dir = export_model(run, state.params, run.run_dir / EXPORT_DIR)
    return TrainResult(run_dir=run.run_dir, model=run.model(state.params), params=state.params,
                       graphdef=run.graphdef, model_state=run.model_state,
                       tokenizer=run.tokenizer, state=state, metrics=last,
                       eval_history=history, export_dir=export_dir, stopped_early=stopped)
