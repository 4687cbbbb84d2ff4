"""Training: train state, objective adapters, the sharded train step, checkpoints and the loop.

    mesh.py        ("data", "fsdp", "tensor") mesh, multi-host start-up, global batches
    state.py       TrainState, AdamW + schedules + clipping, sharded initialisation
    compatibility.py  objective vs model, data and batch, checked before compilation
    step.py        make_train_step: one jitted, sharded, state-donating update of any objective
    reference.py   reference log-probs cached on disk under a weights/data/tokenizer key
    checkpoint.py  orbax checkpoints (async, keep K, corrupt ones skipped), HF export
    loop.py        progress bar, JSONL + TensorBoard metrics, PNG plot, NaN stop
"""

from alignax.training.checkpoint import Checkpointer
from alignax.training.compatibility import check_compatible
from alignax.training.checkpoint import ConfigMismatchError
from alignax.training.checkpoint import NonFiniteStateError
from alignax.training.checkpoint import export_hf
from alignax.training.loop import MetricsLogger
from alignax.training.loop import NonFiniteLossError
from alignax.training.loop import plot_metrics
from alignax.training.loop import train
from alignax.training.mesh import global_batch
from alignax.training.mesh import initialize_distributed
from alignax.training.mesh import make_mesh
from alignax.training.reference import WithReferenceLogps
from alignax.training.reference import cached_reference_logps
from alignax.training.state import OptimizerConfig
from alignax.training.state import TrainState
from alignax.training.state import create_train_state
from alignax.training.state import make_optimizer
from alignax.training.state import split_model
from alignax.training.step import StepConfig
from alignax.training.step import TrainStep
from alignax.training.step import make_train_step

__all__ = [
    "Checkpointer",
    "ConfigMismatchError",
    "MetricsLogger",
    "NonFiniteLossError",
    "NonFiniteStateError",
    "OptimizerConfig",
    "StepConfig",
    "TrainState",
    "TrainStep",
    "WithReferenceLogps",
    "cached_reference_logps",
    "check_compatible",
    "create_train_state",
    "export_hf",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "plot_metrics",
    "split_model",
    "train",
]
