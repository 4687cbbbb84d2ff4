"""The tiny DPO training setup the mesh, multi-process and shared-prompt tests compare runs of.

Imported by test modules (pytest puts `tests/` on the path) and by the multi-process test's
worker script (it runs from `tests/`).
"""

from __future__ import annotations

import chex
import jax
from flax import nnx

from alignax.models import create
from alignax.training.objectives import ObjectiveConfig, make_objective
from alignax.training.state import (OptimizerConfig, create_train_state, make_optimizer,
                                    split_model)
from alignax.training.step import StepConfig, make_train_step


def tiny_dpo_step(mesh, model_config, *, objective: ObjectiveConfig = ObjectiveConfig(beta=0.5),
                  step_config: StepConfig = StepConfig(chunk_size=32, vocab_chunk_size=32),
                  max_traces: int | None = None):
    """A model of `model_config` created sharded on `mesh`, its train state, a frozen copy as
    the reference, and the jitted step.

    The learning rate is DPO-sized (1e-4): Adam turns a ~0 gradient into a ~lr-sized update, so
    a large lr lets float32 rounding dominate comparisons of parameters between runs.

    Returns:
      (step, state, state shardings, reference params).
    """
    graphdef, params, rest = split_model(create(model_config, rngs=nnx.Rngs(0), mesh=mesh))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-4))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    reference = jax.tree.map(lambda x: x.copy(), state.params)
    if max_traces is not None:
        chex.clear_trace_counter()
    step = make_train_step(graphdef, make_objective(objective), optimizer, schedule, mesh=mesh,
                           state_shardings=shardings, model_state=rest, config=step_config,
                           max_traces=max_traces)
    return step, state, shardings, reference
