"""Training: train state, objective adapters, the sharded train step, checkpoints and the loop.

    mesh.py        ("data", "fsdp", "tensor") mesh, multi-host start-up, global batches
    state.py       TrainState, AdamW + schedules + clipping, sharded initialisation
    objectives.py  objective by config -> function of the batch's log-probs and side columns
    step.py        make_train_step: one jitted, sharded, state-donating update
    reference.py   reference log-probs cached on disk under a weights/data/tokenizer key
    checkpoint.py  orbax checkpoints (async, keep K, corrupt ones skipped), HF export
    loop.py        progress bar, JSONL + TensorBoard metrics, PNG plot, NaN stop
"""

from alignax.training.checkpoint import Checkpointer
from alignax.training.checkpoint import ConfigMismatchError
from alignax.training.checkpoint import export_hf
from alignax.training.loop import MetricsLogger
from alignax.training.loop import NonFiniteLossError
from alignax.training.loop import plot_metrics
from alignax.training.loop import train
from alignax.training.mesh import global_batch
from alignax.training.mesh import initialize_distributed
from alignax.training.mesh import make_mesh
from alignax.training.objectives import OBJECTIVES
from alignax.training.objectives import Objective
from alignax.training.objectives import ObjectiveConfig
from alignax.training.objectives import make_objective
from alignax.training.objectives import register_objective
from alignax.training.reference import WithReferenceLogps
from alignax.training.reference import cached_reference_logps
from alignax.training.state import OptimizerConfig
from alignax.training.state import TrainState
from alignax.training.state import create_train_state
from alignax.training.state import make_optimizer
from alignax.training.state import split_model
from alignax.training.step import StepConfig
from alignax.training.step import make_train_step

__all__ = [
    "Checkpointer",
    "ConfigMismatchError",
    "MetricsLogger",
    "NonFiniteLossError",
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "OptimizerConfig",
    "StepConfig",
    "TrainState",
    "WithReferenceLogps",
    "cached_reference_logps",
    "create_train_state",
    "export_hf",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
    "make_objective",
    "make_optimizer",
    "make_train_step",
    "plot_metrics",
    "register_objective",
    "split_model",
    "train",
]
