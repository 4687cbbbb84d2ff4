"""The tiny training setup the mesh, multi-process and shared-prompt tests compare runs of.

Imported by test modules (pytest puts `tests/` on the path) and by the multi-process test's
worker script (it runs from `tests/`).

Parity of two runs is checked on what the claim is about: the gradient the real step computed
(recorded by `sgd_recording_gradients`) and the loss, with a tolerance derived from float32.
Adam-updated parameters are not compared: Adam's g / (sqrt(v) + eps) turns the float32
rounding of a ~0 gradient component into an lr-sized difference.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignax.models import create
from alignax.objectives import DPO
from alignax.training.state import create_train_state, split_model
from alignax.training.step import StepConfig, make_train_step

EPS = float(np.finfo(np.float32).eps)  # 2^-23
GRADIENT_RTOL = 2 ** 7 * EPS  # ~1.5e-5, see `relative_errors`


def sgd_recording_gradients(learning_rate: float) -> optax.GradientTransformation:
    """Plain SGD (params -= lr * g) whose optimizer state is the last gradient it applied, so a
    test reads the gradient the real train step computed from `state.opt_state`."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        del state, params
        return jax.tree.map(lambda g: -learning_rate * g, grads), grads

    return optax.GradientTransformation(init, update)


def relative_errors(tree, reference) -> dict[str, float]:
    """Per leaf ||x - ref|| / ||ref|| (float64 on the host), keyed by the leaf's path.

    Two runs that differ only in how XLA splits and orders the float32 reductions (mesh,
    micro-batches, packing) give gradients that differ by rounding alone. A gradient entry is a
    sum over the batch's token rows (n <= 2^9 here); summed in blocks and trees, as XLA does,
    its rounding error is ~log2(n) eps times the sum's condition number kappa = sum |terms| /
    |sum| (Higham, Accuracy and Stability of Numerical Algorithms, §4.2). With log2(n) <= 9
    and kappa up to ~10 (the DPO gradient is a difference of the chosen and the rejected
    log-prob gradients) that is <= 2^7 eps per leaf, in norm: GRADIENT_RTOL. (Measured: at most
    48 eps, on every mesh of tests/test_parity.py, with and without --xla_cpu_max_isa=AVX2.)
    """
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    ref = dict((jax.tree_util.keystr(p), np.asarray(x, np.float64))
               for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(reference))[0])
    return {jax.tree_util.keystr(p): float(np.linalg.norm(np.asarray(x, np.float64) - ref[
        jax.tree_util.keystr(p)]) / max(np.linalg.norm(ref[jax.tree_util.keystr(p)]), 1e-30))
        for p, x in flat}


def tiny_step(mesh, model_config, *, objective=DPO(beta=0.5),
              step_config: StepConfig = StepConfig(chunk_size=32, vocab_chunk_size=32),
              learning_rate: float = 0.5, create_model=create, max_traces: int | None = None):
    """A model of `model_config` created sharded on `mesh`, its train state under
    `sgd_recording_gradients(learning_rate)`, a frozen copy as the reference, and the jitted
    step.

    Returns:
      (step, state, state shardings, reference params or None).
    """
    graphdef, params, rest = split_model(create_model(model_config, rngs=nnx.Rngs(0), mesh=mesh))
    optimizer = sgd_recording_gradients(learning_rate)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    reference = jax.tree.map(lambda x: x.copy(), state.params) if objective.needs.reference else None
    if max_traces is not None:
        chex.clear_trace_counter()
    step = make_train_step(graphdef, objective, optimizer, optax.constant_schedule(learning_rate),
                           mesh=mesh, state_shardings=shardings, model_state=rest,
                           config=step_config, max_traces=max_traces)
    return step, state, shardings, reference
