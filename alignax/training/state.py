"""Train state (params, optimizer state, step, key) and the optax AdamW optimizer.

The model is kept functional: `split_model` gives a graph definition, the trainable float32
master parameters and the remaining (non-trainable) model state. Only the trainable parameters
live in the train state (and have optimizer state); the step re-merges them with the graph
definition. A model with LoRA adapters (`alignax.models.lora.add_lora`) trains its adapters
only: the base weights (bf16 or float32) are frozen model state.
"""

from __future__ import annotations

import dataclasses
import numbers
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


# Parameter groups that AdamW may leave undecayed (`OptimizerConfig.weight_decay_exclude`).
# "bias": a parameter named `bias`; "norm": a normalisation layer's scale or bias (logical axis
# "norm"); "embedding": an embedding table (named `embedding`: token and position embeddings).
DECAY_GROUPS = ("bias", "norm", "embedding")


def _linear_warmup(config: OptimizerConfig, after: optax.Schedule) -> optax.Schedule:
    if config.warmup_steps == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps), after],
        [config.warmup_steps])


def _constant(config: OptimizerConfig) -> optax.Schedule:
    return _linear_warmup(config, optax.constant_schedule(config.learning_rate))


def _cosine(config: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                              max(config.total_steps, config.warmup_steps + 1))


def _linear(config: OptimizerConfig) -> optax.Schedule:
    decay = max(config.total_steps - config.warmup_steps, 1)
    return _linear_warmup(config, optax.linear_schedule(config.learning_rate, 0.0, decay))


# name -> (config -> learning-rate schedule); the one place a schedule is registered.
SCHEDULES: dict[str, Callable[[OptimizerConfig], optax.Schedule]] = {
    "constant": _constant,  # after the linear warmup
    "cosine": _cosine,      # warmup, then cosine decay to 0 at total_steps
    "linear": _linear,      # warmup, then linear decay to 0 at total_steps
}

_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optax AdamW with a warmup + decay schedule and global-norm clipping.

    Every field is checked when the config is built (ValueError/TypeError naming the field).

    Attributes:
      learning_rate: peak learning rate, finite in float32 and >= 0.
      schedule: a name of `SCHEDULES`: "constant" (after linear warmup), "cosine" or "linear"
        decay to 0 at `total_steps`.
      warmup_steps: linear warmup from 0, 0 <= warmup_steps <= total_steps.
      total_steps: > 0, the schedule's length (the number of updates of the run).
      weight_decay: decoupled AdamW weight decay, finite and >= 0.
      weight_decay_exclude: parameter groups of `DECAY_GROUPS` that are not decayed. The
        default ("bias", "norm") matches Hugging Face Trainer (and so TRL), which decays
        every parameter except biases and normalisation weights; embeddings are decayed
        there too. Add "embedding" to leave embedding tables undecayed.
      b1, b2: Adam's moment decay rates, in [0, 1).
      eps: Adam's denominator epsilon, > 0.
      max_grad_norm: global-norm clipping threshold (> 0), or None for no clipping.
    """

    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    weight_decay_exclude: tuple[str, ...] = ("bias", "norm")
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        for name in ("learning_rate", "weight_decay", "b1", "b2", "eps"):
            if not _is_number(getattr(self, name)):
                raise TypeError(f"OptimizerConfig.{name} must be a real number, got "
                                f"{getattr(self, name)!r}")
        for name in ("warmup_steps", "total_steps"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"OptimizerConfig.{name} must be an int, got "
                                f"{getattr(self, name)!r}")
        # A value beyond float32's range becomes inf inside the step.
        if not (0 <= self.learning_rate <= _FLOAT32_MAX):
            raise ValueError(f"OptimizerConfig.learning_rate must be finite (in float32) and "
                             f">= 0, got {self.learning_rate!r}")
        if not (0 <= self.weight_decay <= _FLOAT32_MAX):
            raise ValueError(f"OptimizerConfig.weight_decay must be finite (in float32) and "
                             f">= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule: unknown schedule {self.schedule!r}; "
                             f"use one of {sorted(SCHEDULES)}")
        if self.total_steps <= 0:
            raise ValueError(f"OptimizerConfig.total_steps must be > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"OptimizerConfig.warmup_steps must be in [0, total_steps="
                             f"{self.total_steps}], got {self.warmup_steps}: the warmup cannot "
                             "be longer than the schedule (raise total_steps to the run's "
                             "number of updates)")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimizerConfig.{name} must be in [0, 1), got "
                                 f"{getattr(self, name)!r}")
        if not 0 < self.eps <= _FLOAT32_MAX:
            raise ValueError(f"OptimizerConfig.eps must be finite and > 0, got {self.eps!r}")
        if self.max_grad_norm is not None and not (
                _is_number(self.max_grad_norm) and 0 < self.max_grad_norm <= _FLOAT32_MAX):
            raise ValueError(f"OptimizerConfig.max_grad_norm must be finite and > 0, or None, "
                             f"got {self.max_grad_norm!r}")
        exclude = self.weight_decay_exclude
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(g, str) for g in exclude):
            raise TypeError("OptimizerConfig.weight_decay_exclude must be a tuple of group "
                            f"names from {DECAY_GROUPS}, got {exclude!r}")
        unknown = sorted(set(exclude) - set(DECAY_GROUPS))
        if unknown:
            raise ValueError(f"OptimizerConfig.weight_decay_exclude: unknown groups {unknown}; "
                             f"use names from {DECAY_GROUPS}")
        object.__setattr__(self, "weight_decay_exclude", tuple(exclude))


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning-rate schedule of `config` as a function of the update count."""
    return SCHEDULES[config.schedule](config)


def parameter_groups(name: str, variable: Any) -> set[str]:
    """The `DECAY_GROUPS` a parameter belongs to, from its name and logical-axis metadata.

    Args:
      name: the parameter's attribute name (e.g. "kernel", "bias", "weight", "embedding").
      variable: the `nnx.Variable` (its "out_sharding" metadata holds logical axis names; a
        norm layer's parameters carry "norm", whatever leading axes such as stacked layers
        add), or a bare array, which is grouped by its name only.
    """
    groups = set()
    if name == "bias":
        groups.add("bias")
    if name == "embedding":
        groups.add("embedding")
    if isinstance(variable, nnx.Variable):
        axes = variable.get_metadata().get("out_sharding") or ()
        if "norm" in axes:
            groups.add("norm")
    return groups


def _leaf_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [str(n) for n in names if n is not None and n != "value"]
    return names[-1] if names else ""


def weight_decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """A tree of bools over `params` (a prefix of it: one per parameter): True = decayed.

    A parameter is left undecayed when it belongs to one of the `exclude` groups
    (`parameter_groups`).
    """
    def decayed(path, variable):
        return not parameter_groups(_leaf_name(path), variable) & set(exclude)

    return jax.tree_util.tree_map_with_path(decayed, params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip_by_global_norm -> AdamW) and its schedule (the schedule is also logged as `lr`).

    Weight decay applies to the parameters outside `config.weight_decay_exclude`
    (`weight_decay_mask`).
    """
    schedule = make_schedule(config)
    exclude = config.weight_decay_exclude
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay,
                        mask=lambda params: weight_decay_mask(params, exclude))
    if config.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw), schedule


class TrainedParam(nnx.Param):
    """A parameter trained also when the model trains LoRA adapters: a new head that has no
    pretrained value to adapt (PPO's value head)."""


def has_adapters(model_or_params: Any) -> bool:
    """Whether a model (or an nnx.State) holds LoRA adapters (`nnx.LoRAParam`)."""
    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.state(model_or_params)
    return any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(
        model_or_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, other model state) of an nnx model.

    The trainable parameters are the LoRA adapters (`nnx.LoRAParam`, float32) and any
    `TrainedParam` when the model has adapters, else every `nnx.Param`; the frozen base
    weights of an adapted model go to the model state with the non-parameter state.
    """
    if has_adapters(model):
        return nnx.split(model, nnx.Any(nnx.LoRAParam, TrainedParam), ...)
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
    Optimizer moments follow their parameter; scalars (counts) are replicated. An optimizer
    that masks parts of the parameters (`optax.multi_transform`, `optax.masked`) keeps its
    `optax.MaskedNode` placeholders as they are.
    """
    param_shardings = jax.tree.map(lambda x: _param_sharding(x, mesh), params)
    replicated = NamedSharding(mesh, P())

    def masked(x):
        return isinstance(x, optax.MaskedNode)

    opt_shardings = optax.tree_map_params(
        optimizer, lambda value, sharding: value if masked(value) else sharding,
        jax.eval_shape(optimizer.init, params), param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked)
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
