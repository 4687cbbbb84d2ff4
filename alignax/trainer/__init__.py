"""The trainer: one config and one call (or one `alignax` command) per run, for every objective.

    from alignax.objectives import DPO
    from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig, train

    result = train(RunConfig(run_dir="runs/dpo", model=ModelConfig("tiny"),
                             data=DataConfig("hh.jsonl", max_length=256),
                             objective=DPO(beta=0.1), train=TrainConfig(steps=100)))
    result.model, result.tokenizer, result.metrics, result.export_dir   # what comes next needs

Modules (small, one concern each):

    config.py    the typed, frozen, validated configs (RunConfig = ModelConfig + DataConfig +
                 objective + TrainConfig + EvalConfig; LabelConfig), their JSON form, the
                 resume comparison, CONFIG files
    runs.py      building a run from a config: run directory, tokenizer, data, model,
                 reference, mesh, with every guard rail before anything compiles; export
    train.py     `train`: resume, the shared-prompt step, periodic evaluation, early stopping,
                 JSONL / TensorBoard / W&B metrics, progress bar, export
    evaluate.py  preference metrics on a held-out split (loss, accuracy, margins, §2.8.8 ECE),
                 generation metrics from samples (`alignax.eval`), `evaluate` (alignax eval)
    label.py     `label`: target rewards of unlabeled pairs from a reward model or ensemble
    plan.py      `plan`: per-device memory of the compiled step from abstract shapes only
    cli.py       the `alignax` console script (tyro): train / eval / label / plan CONFIG
"""

from alignax.trainer.config import DataConfig
from alignax.trainer.config import EvalConfig
from alignax.trainer.config import LabelConfig
from alignax.trainer.config import ModelConfig
from alignax.trainer.config import RunConfig
from alignax.trainer.config import TrainConfig
from alignax.trainer.config import config_from_dict
from alignax.trainer.config import config_to_dict
from alignax.trainer.config import load_config_file
from alignax.trainer.evaluate import evaluate
from alignax.trainer.label import label
from alignax.trainer.plan import plan
from alignax.trainer.train import TrainResult
from alignax.trainer.train import train

__all__ = [
    "DataConfig",
    "EvalConfig",
    "LabelConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "label",
    "load_config_file",
    "plan",
    "train",
]
