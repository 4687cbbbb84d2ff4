"""Hyper-parameter schedules: serialisable dataclasses `step -> value`, and their evaluation.

Any float hyper-parameter of an objective (beta, gamma, lam, tau, the NLL weight, a margin) may
be a schedule of the update count instead of a constant. The train step evaluates it at
`state.step` inside the jitted program (`value_at`), so annealing costs no recompilation.

Two kinds of schedule are accepted:

- the dataclasses below (`Constant`, `Linear`, `Cosine`): frozen, comparable and serialisable
  (`to_config` / `from_config`), so a run config can hold them and a checkpoint written under
  another schedule is recognised as a different run;
- any optax-style callable `step -> value` (e.g. `optax.warmup_cosine_decay_schedule(...)`),
  for library users; it cannot be serialised and is range-checked only at step 0.

`pessimism_schedule` is the linear annealing of the pessimism weight gamma of 004 §4.1: "we
anneal gamma from 1e-4 to 1e-2 linearly during the 10k training steps". (The paper writes
gamma = alpha / beta there but gamma = beta / alpha in eq. 11; the schedule only concerns the
weight that multiplies the forward-KL term, which is what both losses here call gamma.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax


def _check_steps(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < int(positive):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {kind} int, got {value!r}")


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Constant:
    """`value` at every step.

    >>> float(Constant(0.1)(7))
    0.1
    """

    value: float

    def __post_init__(self):
        _check_finite("value", self.value)

    def __call__(self, step) -> jax.Array:
        return jnp.full(jnp.shape(step), self.value, jnp.float32)

    def bounds(self) -> tuple[float, float]:
        """(smallest, largest) value the schedule takes."""
        return self.value, self.value


@dataclasses.dataclass(frozen=True)
class Linear:
    """`init_value` until `transition_begin`, then linear to `end_value` over `transition_steps`.

    >>> [round(float(Linear(0.0, 1.0, transition_steps=4)(s)), 2) for s in (0, 1, 4, 9)]
    [0.0, 0.25, 1.0, 1.0]
    """

    init_value: float
    end_value: float
    transition_steps: int
    transition_begin: int = 0

    def __post_init__(self):
        _check_finite("init_value", self.init_value)
        _check_finite("end_value", self.end_value)
        _check_steps("transition_steps", self.transition_steps, positive=True)
        _check_steps("transition_begin", self.transition_begin, positive=False)

    def __call__(self, step) -> jax.Array:
        return optax.linear_schedule(self.init_value, self.end_value, self.transition_steps,
                                     self.transition_begin)(step)

    def bounds(self) -> tuple[float, float]:
        return min(self.init_value, self.end_value), max(self.init_value, self.end_value)


@dataclasses.dataclass(frozen=True)
class Cosine:
    """Half-cosine from `init_value` to `end_value` over `decay_steps`, then `end_value`.

    >>> [round(float(Cosine(1.0, 0.0, decay_steps=4)(s)), 2) for s in (0, 2, 4, 9)]
    [1.0, 0.5, 0.0, 0.0]
    """

    init_value: float
    end_value: float
    decay_steps: int

    def __post_init__(self):
        _check_finite("init_value", self.init_value)
        _check_finite("end_value", self.end_value)
        _check_steps("decay_steps", self.decay_steps, positive=True)

    def __call__(self, step) -> jax.Array:
        if self.init_value == 0.0:  # optax's alpha = end / init is undefined; go through 1
            return self.end_value * (1.0 - optax.cosine_decay_schedule(1.0, self.decay_steps)(step))
        return optax.cosine_decay_schedule(self.init_value, self.decay_steps,
                                           alpha=self.end_value / self.init_value)(step)

    def bounds(self) -> tuple[float, float]:
        return min(self.init_value, self.end_value), max(self.init_value, self.end_value)


SCHEDULES = {cls.__name__: cls for cls in (Constant, Linear, Cosine)}
"""Serialisable schedule classes by name (the "schedule" key of `to_config`)."""

Schedule = Union[Constant, Linear, Cosine]
Hyper = Union[float, Schedule, Callable[[jax.Array], jax.Array]]
"""A hyper-parameter: a number, a schedule dataclass, or an optax-style callable of the step."""


def pessimism_schedule(total_steps: int, *, init_value: float = 1e-4, end_value: float = 1e-2,
                       transition_begin: int = 0) -> Linear:
    """Linear gamma annealing from `init_value` to `end_value` over `total_steps` (004 §4.1).

    Args:
      total_steps: > 0, number of steps over which gamma rises (10k in the paper); the value
        stays at `end_value` afterwards.
      init_value: gamma at step `transition_begin` (1e-4 in the paper), >= 0.
      end_value: gamma from step transition_begin + total_steps on (1e-2 in the paper), >= 0.
      transition_begin: >= 0, steps to hold `init_value` before the ramp.

    Returns:
      A `Linear` schedule `step -> gamma` (works under jax.jit with a traced integer step), to
      pass as `gamma=` of `PessimisticDPO` / `PessimisticDistill` (evaluated at every train
      step), or to call yourself: `pessimistic_dpo_loss(..., gamma=schedule(step))`.

    Raises:
      ValueError: total_steps <= 0, transition_begin < 0, a negative init/end value.

    Examples:
      >>> schedule = pessimism_schedule(10_000)
      >>> [round(float(schedule(step)), 6) for step in (0, 5_000, 20_000)]
      [0.0001, 0.00505, 0.01]
    """
    for name, value in (("init_value", init_value), ("end_value", end_value)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 (gamma weights a KL term), got {value!r}")
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    return Linear(init_value, end_value, transition_steps=total_steps,
                  transition_begin=transition_begin)


def value_at(value: Hyper, step) -> float | jax.Array:
    """The hyper-parameter `value` at `step` (a traced int32 scalar inside the train step).

    A plain number is returned unchanged (so a constant stays a Python float for the loss
    functions' eager checks); a schedule is evaluated and returned as a float32 array.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return jnp.asarray(value(step), jnp.float32)


def is_constant(value: Hyper) -> bool:
    """Whether `value` is a plain number (not a schedule)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_hyper(name: str, value: Hyper, *, low: float, inclusive: bool = False,
                high: float | None = None) -> None:
    """Raises ValueError unless every value of `value` lies in (low, high) (or [low, high)).

    A number is checked directly, a schedule dataclass over its whole range (`bounds()`), an
    opaque callable at step 0 (its only value that can be known without running it).

    Raises:
      TypeError: `value` is neither a number nor callable (e.g. a string or a bool).
      ValueError: a value out of range, or not finite.
    """
    if high is None:
        interval = "finite" if low == -math.inf else f"{'>=' if inclusive else '>'} {low:g}"
    else:
        interval = f"in {'[' if inclusive else '('}{low:g}, {high:g})"
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or callable(value)):
        raise TypeError(f"{name} must be a number or a schedule (alignax.schedules), got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, (int, float)):
        values, where = (float(value),), ""
    elif isinstance(value, tuple(SCHEDULES.values())):
        values, where = value.bounds(), f" (schedule {value!r})"
    else:
        values, where = (float(jax.device_get(value(0))),), " (the schedule's value at step 0)"
    for v in values:
        above = v >= low if inclusive else v > low
        below = high is None or v < high
        if not (math.isfinite(v) and above and below):
            raise ValueError(f"{name} must be {interval}, got {v!r}{where}")


def to_config(value: Hyper) -> Any:
    """A JSON-able form of a hyper-parameter: the number, or {"schedule": name, **fields}.

    Raises:
      TypeError: an opaque callable, which has no serialisable form (use a schedule dataclass).
    """
    if isinstance(value, tuple(SCHEDULES.values())):
        return {"schedule": type(value).__name__, **dataclasses.asdict(value)}
    if callable(value):
        raise TypeError(f"cannot serialise the schedule {value!r}: use one of "
                        f"{sorted(SCHEDULES)} from alignax.schedules in a run config")
    return value


def from_config(config: Any) -> Hyper:
    """Inverse of `to_config`.

    >>> from_config(to_config(Linear(0.0, 1.0, transition_steps=10)))
    Linear(init_value=0.0, end_value=1.0, transition_steps=10, transition_begin=0)
    """
    if isinstance(config, dict) and "schedule" in config:
        fields = {k: v for k, v in config.items() if k != "schedule"}
        if config["schedule"] not in SCHEDULES:
            raise ValueError(f"unknown schedule {config['schedule']!r}; known: {sorted(SCHEDULES)}")
        return SCHEDULES[config["schedule"]](**fields)
    return config
