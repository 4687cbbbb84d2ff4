"""Hyper-parameter schedules as optax-style callables step -> value.

`pessimism_schedule` is the linear annealing of the pessimism weight gamma of 004 §4.1: "we
anneal gamma from 1e-4 to 1e-2 linearly during the 10k training steps". (The paper writes
gamma = alpha / beta there but gamma = beta / alpha in eq. 11; the schedule only concerns the
weight that multiplies the forward-KL term, which is what both losses here call gamma.)
"""

from __future__ import annotations

import optax


def pessimism_schedule(total_steps: int, *, init_value: float = 1e-4, end_value: float = 1e-2,
                       transition_begin: int = 0) -> optax.Schedule:
    """Linear gamma annealing from `init_value` to `end_value` over `total_steps` (004 §4.1).

    Args:
      total_steps: > 0, number of steps over which gamma rises (10k in the paper); the value
        stays at `end_value` afterwards.
      init_value: gamma at step `transition_begin` (1e-4 in the paper), >= 0.
      end_value: gamma from step transition_begin + total_steps on (1e-2 in the paper), >= 0.
      transition_begin: >= 0, steps to hold `init_value` before the ramp.

    Returns:
      A schedule `step -> gamma` (works under jax.jit with a traced integer step), to pass as
      `gamma=schedule(step)` to `pessimistic_distill_loss` / `pessimistic_dpo_loss`.

    Raises:
      ValueError: total_steps <= 0, transition_begin < 0, a negative init/end value.

    Examples:
      >>> schedule = pessimism_schedule(10_000)
      >>> [round(float(schedule(step)), 6) for step in (0, 5_000, 20_000)]
      [0.0001, 0.00505, 0.01]
    """
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(transition_begin, int) or transition_begin < 0:
        raise ValueError(f"transition_begin must be a non-negative int, got {transition_begin!r}")
    for name, value in (("init_value", init_value), ("end_value", end_value)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 (gamma weights a KL term), got {value!r}")
    return optax.linear_schedule(init_value=init_value, end_value=end_value,
                                 transition_steps=total_steps, transition_begin=transition_begin)
