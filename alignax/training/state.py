"""Train state (params, optimizer state, step, key) and the optax AdamW optimizer.

The model is kept functional: `nnx.split(model, nnx.Param, ...)` gives a graph definition, the
trainable float32 master parameters and the remaining (non-trainable) model state. Only the
parameters live in the train state; the step re-merges them with the graph definition.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes; donated to the jitted step.

    Attributes:
      params: nnx.State of float32 master parameters.
      opt_state: optax state for `params`.
      step: [] int32, number of applied updates.
      key: [2] uint32 root PRNG key of the run (`fold_in(key, step)` inside the step).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optax AdamW with a warmup + decay schedule and global-norm clipping.

    schedule: "constant" (after linear warmup), "cosine" or "linear" decay to 0 at
    `total_steps`.
    """

    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning-rate schedule of `config` as a function of the update count."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup,
                                                  max(config.total_steps, warmup + 1))
    if config.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup),
             optax.linear_schedule(lr, 0.0, max(config.total_steps - warmup, 1))], [warmup])
    raise ValueError(f"unknown schedule {config.schedule!r}: use 'constant', 'cosine' or 'linear'")


def make_optimizer(config: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip_by_global_norm -> AdamW) and its schedule (the schedule is also logged as `lr`)."""
    schedule = make_schedule(config)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw), schedule


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, other model state) of an nnx model."""
    return nnx.split(model, nnx.Param, ...)


def _param_sharding(x: jax.Array, mesh: Mesh) -> NamedSharding:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape:
        return NamedSharding(mesh, sharding.spec)
    return NamedSharding(mesh, P())


def state_shardings(params: nnx.State, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """Shardings of every train-state leaf, derived with `jax.eval_shape` (nothing allocated).

    Parameters keep the sharding they were created with (`alignax.models.create(mesh=...)`
    applies the logical partition rules); parameters without a mesh sharding are replicated.
    Optimizer moments follow their parameter; scalars (counts) are replicated.
    """
    param_shardings = jax.tree.map(lambda x: _param_sharding(x, mesh), params)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, P())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated,
                      key=replicated)


def create_train_state(params: nnx.State, optimizer: optax.GradientTransformation, *,
                       key: jax.Array, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """A fresh train state laid out on `mesh`, and the matching tree of shardings.

    Args:
      params: float32 master parameters (already sharded or on one device).
      optimizer: the optax transformation.
      key: root PRNG key of the run, [2] uint32 (`jax.random.PRNGKey`).
      mesh: the training mesh.
    """
    shardings = state_shardings(params, optimizer, mesh)

    def init(params, key):
        return TrainState(params=params, opt_state=optimizer.init(params),
                          step=jnp.zeros((), jnp.int32), key=key)

    init = jax.jit(init, out_shardings=shardings)
    return init(jax.device_put(params, shardings.params), jnp.asarray(key, jnp.uint32)), shardings


def cast_floating(tree: Any, dtype: Callable | Any) -> Any:
    """Casts every floating leaf of `tree` to `dtype` (bf16 compute from f32 masters)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)
