"""The run config: typed, frozen dataclasses, validated when built (configs as code).

    config = RunConfig(
        run_dir="runs/dpo",
        model=ModelConfig("EleutherAI/pythia-160m"),      # or "tiny", or a local directory
        data=DataConfig("hh.jsonl", max_length=512, eval_fraction=0.05),
        objective=DPO(beta=0.1),                           # any registered objective
        train=TrainConfig(steps=1000, batch_size=8, learning_rate=5e-7),
    )

Every field is checked in `__post_init__` (a ValueError / TypeError naming the field), and a
local path that does not exist is refused there, before any model or data loads. What needs
the devices (the mesh against the device count) is checked by `check_devices`, which the
trainer calls first. `config_to_dict` / `config_from_dict` give the JSON form saved in the run
directory (`config.json`); a run resumed under a config that differs outside `RESUMABLE` is
refused with the fields named (`config_difference`). `load_config_file("cfg.py")` reads the
config a Python file defines (the `alignax` command's CONFIG argument).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
import os
import pathlib
import runpy
from typing import Annotated, Any, Mapping, Union

import tyro

from alignax.data.loading import local_path, missing_path_error
from alignax.data.records import FORMATS
from alignax.data.tokenize import TRUNCATIONS
from alignax.objectives import (DPO, OBJECTIVES, Objective, objective_from_config,
                                objective_to_config)
from alignax.training.state import SCHEDULES as LR_SCHEDULES
from alignax.models.lora import LoRAConfig
from alignax.models.remat import REMAT_POLICIES

TINY = "tiny"
"""`ModelConfig.path` of the embedded tiny model (`alignax.models.tiny_config`), initialised
from `ModelConfig.seed`, with the embedded tokenizer."""

DEFAULT_TOKENIZER = "default"
"""`ModelConfig.tokenizer` of the embedded tokenizer (`alignax.data.default_tokenizer`)."""

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")
COMPUTE_DTYPES = ("float32", "bfloat16")
STOP_MODES = ("min", "max")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(owner: str, name: str, value: Any, *, allow_zero: bool = False,
                  optional: bool = False) -> None:
    if optional and value is None:
        return
    low = 0 if allow_zero else 1
    if not _is_int(value) or value < low:
        kind = "an int >= 0" if allow_zero else "an int >= 1"
        raise ValueError(f"{owner}.{name} must be {kind}{' or None' if optional else ''}, "
                         f"got {value!r}")


def _choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}: unknown value {value!r}; use one of {list(choices)}")


def _local_path_exists(owner: str, name: str, source: str | None, what: str) -> None:
    """A path-like value must exist locally (a hub id cannot be checked offline)."""
    if source is None or source in (TINY, DEFAULT_TOKENIZER):
        return
    if not isinstance(source, str):
        raise TypeError(f"{owner}.{name} must be a string (a local path or a hub id), got "
                        f"{type(source).__name__}")
    path = local_path(source)
    if path is not None and not path.exists():
        raise ValueError(f"{owner}.{name}: {missing_path_error(source, what)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model to train (and its tokenizer and reference).

    Attributes:
      path: "tiny" (the embedded tiny model, `tiny_config(family)` sized to the tokenizer), a
        local Hugging Face checkpoint directory or a hub id. A reward-model objective starts
        from a `*ForSequenceClassification` checkpoint as it is, and from a causal LM's
        backbone with a new score head.
      family: the architecture of "tiny": "llama", "mistral", "qwen2", "gpt2" or "gpt_neox".
      tokenizer: None (the checkpoint's own tokenizer; the embedded one for "tiny"),
        "default" (the embedded tokenizer), or a local directory / hub id.
      pad_token: a token (e.g. the eos token's text) to pad with when the tokenizer has none.
      reference: the frozen reference policy: None (the initial policy) or a checkpoint.
      num_heads: reward models: None (one score) or E heads on one backbone ([B, E] scores).
      ensemble: reward models: None, or M independently initialised members trained together
        (`RewardEnsemble`, one vmapped forward, [B, M] scores).
      seed: initialises "tiny" models and new reward heads.
      revision: the hub revision (branch, tag or commit) of a hub id.
      lora_rank: None (train every weight) or r: train only LoRA adapters of rank r
        (`alignax.models.lora`); the base weights are frozen and are the reference of
        DPO-family objectives (the model with its adapters off, no second copy).
      lora_alpha: the adapters' alpha (update scaled by alpha / r); None: 2 r (the seeds'
        r = 64, alpha = 128).
      lora_dropout: dropout on the adapters' input, in [0, 1).
      lora_targets: projections to adapt (q, k, v, o, gate, up, down, score); None: every
        projection of the family, and the score head of a reward model.
    """

    path: str = TINY
    _: dataclasses.KW_ONLY
    family: str = "llama"
    tokenizer: str | None = None
    pad_token: str | None = None
    reference: str | None = None
    num_heads: int | None = None
    ensemble: int | None = None
    seed: int = 0
    revision: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self):
        _choice("ModelConfig", "family", self.family, FAMILIES)
        _local_path_exists("ModelConfig", "path", self.path, "model directory")
        _local_path_exists("ModelConfig", "tokenizer", self.tokenizer, "tokenizer directory")
        _local_path_exists("ModelConfig", "reference", self.reference, "reference directory")
        _positive_int("ModelConfig", "num_heads", self.num_heads, optional=True)
        _positive_int("ModelConfig", "ensemble", self.ensemble, optional=True)
        _positive_int("ModelConfig", "seed", self.seed, allow_zero=True)
        if self.pad_token is not None and not (isinstance(self.pad_token, str) and self.pad_token):
            raise ValueError(f"ModelConfig.pad_token must be a non-empty string or None, got "
                             f"{self.pad_token!r}")
        _positive_int("ModelConfig", "lora_rank", self.lora_rank, optional=True)
        if self.lora_rank is None:
            given = [f"lora_{n}" for n, default in (("alpha", None), ("dropout", 0.0),
                                                    ("targets", None))
                     if getattr(self, f"lora_{n}") != default]
            if given:
                raise ValueError(f"ModelConfig.{given[0]} is set but lora_rank is None: set "
                                 "lora_rank to train LoRA adapters")
            return
        if self.reference is not None:
            raise ValueError("ModelConfig.reference: a LoRA run's reference is its base model "
                             "(adapters off); leave reference None or lora_rank None")
        for name in ("lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise TypeError(f"ModelConfig.{name} must be a number, got {value!r}")
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str):
                raise TypeError(f"ModelConfig.lora_targets must be a tuple of names, got "
                                f"{self.lora_targets!r}")
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        try:
            self.lora_config(targets=self.lora_targets or ("q",))
        except ValueError as error:
            raise ValueError(f"ModelConfig.lora_*: {error}") from None

    def lora_config(self, *, targets: tuple[str, ...]) -> LoRAConfig | None:
        """The LoRAConfig of this model (None without lora_rank), with `targets` when
        lora_targets is None."""
        if self.lora_rank is None:
            return None
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)
        return LoRAConfig(rank=self.lora_rank, alpha=alpha, dropout=float(self.lora_dropout),
                          targets=tuple(self.lora_targets or targets))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The preference data (`alignax.data.prepare_dataset`) and its held-out split.

    Attributes:
      path: a local JSONL / JSON / Parquet / CSV file or dataset directory, or a hub dataset
        id; None when the records are passed to `alignax.trainer.train(data=...)`.
      split: the split of `path` to train on.
      format: "auto" (detected from every record) or one of `alignax.data.records.FORMATS`.
      max_length, max_prompt_length, truncation: as in `prepare_dataset`.
      eval_path / eval_split: where the held-out split comes from: another source, another
        split of `path` (e.g. "test"), or neither, and then ...
      eval_fraction: ... this share of the training records, drawn with `TrainConfig.seed`
        (0: no held-out split).
      bin_column: a per-record bin column of a spurious attribute ("bin" [B]).
      length_bins: M per-response length-quantile bins fitted on the training split
        (`alignax.data.LengthQuantileBins`, thesis §4.10), applied to the held-out split too.
      errors: "raise" (a malformed record is an error naming it) or "drop" (listed in the
        report).
    """

    path: str | None = None
    _: dataclasses.KW_ONLY
    split: str = "train"
    format: str = "auto"
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: str = "keep_prompt_end"
    eval_path: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.0
    bin_column: str | None = None
    length_bins: int | None = None
    errors: str = "raise"

    def __post_init__(self):
        _local_path_exists("DataConfig", "path", self.path, "file or directory")
        _local_path_exists("DataConfig", "eval_path", self.eval_path, "file or directory")
        _choice("DataConfig", "format", self.format, ("auto", *FORMATS))
        _choice("DataConfig", "truncation", self.truncation, TRUNCATIONS)
        _choice("DataConfig", "errors", self.errors, ("raise", "drop"))
        _positive_int("DataConfig", "max_length", self.max_length)
        _positive_int("DataConfig", "max_prompt_length", self.max_prompt_length, optional=True)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"DataConfig.max_prompt_length={self.max_prompt_length} must be "
                             f"< max_length={self.max_length} (room for the response)")
        if self.length_bins is not None and (not _is_int(self.length_bins)
                                             or self.length_bins < 2):
            raise ValueError(f"DataConfig.length_bins must be an int >= 2 or None, got "
                             f"{self.length_bins!r}")
        if not _is_number(self.eval_fraction) or not 0 <= self.eval_fraction < 1:
            raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got "
                             f"{self.eval_fraction!r}")
        sources = [self.eval_path is not None or self.eval_split is not None,
                   self.eval_fraction > 0]
        if all(sources):
            raise ValueError("DataConfig: give the held-out split either as eval_path / "
                             "eval_split or as eval_fraction, not both")

    @property
    def has_eval(self) -> bool:
        """Whether the config names a held-out split."""
        return self.eval_path is not None or self.eval_split is not None or self.eval_fraction > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: steps, batch, optimizer (AdamW), step layout, checkpoints, logging.

    Attributes:
      steps: updates in total (> 0); may change on resume.
      batch_size: global batch (a multiple of the mesh's data x fsdp size and of
        grad_accum_steps).
      learning_rate, lr_schedule ("constant", "cosine", "linear"), warmup_steps, weight_decay,
        max_grad_norm: `alignax.training.OptimizerConfig` (its total_steps is `steps`).
      grad_accum_steps, remat, compute_dtype, chunk_size, vocab_chunk_size:
        `alignax.training.StepConfig`.
      share_prompt: score each prompt once for all its responses (the same loss and gradient,
        less work); None: on for every log-prob objective (off for reward models).
      mesh: (data, fsdp, tensor) sizes; one may be -1 for the remaining devices.
      seed: the run's PRNG key, the data order and the held-out draw.
      save_every, keep_checkpoints: checkpoint cadence and how many to keep.
      eval_every: evaluate on the held-out split every N steps and at the end (0: never).
      eval_batches: batches per evaluation (None: the whole held-out split).
      early_stopping_metric: an evaluation metric ("loss", "accuracy", "ece", ...) to stop on,
        or None; early_stopping_mode: "min" or "max"; early_stopping_patience: evaluations
        without an improvement of more than early_stopping_min_delta before stopping; the
        run then ends with (and exports) the state of that evaluation, not the best one.
      export: write the final model with its tokenizer as HF safetensors to run_dir/export.
      progress: show a progress bar; tensorboard: write TensorBoard events; wandb: a Weights &
        Biases project to log to (needs `pip install wandb`; never a dependency).
      compilation_cache: use JAX's persistent compilation cache in the run directory's parent
        (`.jax_cache`) unless one is configured already, so a rerun does not recompile.
    """

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    remat: str | None = None
    compute_dtype: str = "float32"
    chunk_size: int = 1024
    vocab_chunk_size: int | None = 8192
    share_prompt: bool | None = None
    mesh: tuple[int, int, int] = (-1, 1, 1)
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int | None = None
    early_stopping_metric: str | None = None
    early_stopping_mode: str = "min"
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 0.0
    export: bool = True
    progress: bool = True
    tensorboard: bool = True
    wandb: str | None = None
    compilation_cache: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum_steps", "chunk_size", "save_every",
                     "keep_checkpoints", "early_stopping_patience"):
            _positive_int("TrainConfig", name, getattr(self, name))
        for name in ("warmup_steps", "seed", "eval_every"):
            _positive_int("TrainConfig", name, getattr(self, name), allow_zero=True)
        _positive_int("TrainConfig", "eval_batches", self.eval_batches, optional=True)
        _positive_int("TrainConfig", "vocab_chunk_size", self.vocab_chunk_size, optional=True)
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} is not a multiple of "
                             f"grad_accum_steps={self.grad_accum_steps}")
        _choice("TrainConfig", "lr_schedule", self.lr_schedule, tuple(LR_SCHEDULES))
        _choice("TrainConfig", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.remat is not None:
            _choice("TrainConfig", "remat", self.remat, tuple(REMAT_POLICIES))
        _choice("TrainConfig", "early_stopping_mode", self.early_stopping_mode, STOP_MODES)
        mesh = self.mesh
        if (not isinstance(mesh, (tuple, list)) or len(mesh) != 3
                or not all(_is_int(s) and (s >= 1 or s == -1) for s in mesh)
                or list(mesh).count(-1) > 1):
            raise ValueError(f"TrainConfig.mesh must be 3 ints (data, fsdp, tensor), each >= 1 "
                             f"or one of them -1 (the remaining devices), got {mesh!r}")
        object.__setattr__(self, "mesh", tuple(int(s) for s in mesh))
        if self.early_stopping_metric is not None and self.eval_every == 0:
            raise ValueError("TrainConfig.early_stopping_metric needs evaluations: set "
                             "eval_every > 0 (and a held-out split in DataConfig)")
        if not _is_number(self.early_stopping_min_delta) or self.early_stopping_min_delta < 0:
            raise ValueError(f"TrainConfig.early_stopping_min_delta must be >= 0, got "
                             f"{self.early_stopping_min_delta!r}")
        if self.wandb is not None and importlib.util.find_spec("wandb") is None:
            raise ValueError(f"TrainConfig.wandb={self.wandb!r} needs Weights & Biases, which "
                             "is not installed: pip install wandb (or set wandb=None)")
        self.optimizer_config()  # the optimizer's own checks (learning rate, warmup, ...)

    def optimizer_config(self):
        """The `alignax.training.OptimizerConfig` of this run (total_steps = steps)."""
        from alignax.training.state import OptimizerConfig

        try:
            return OptimizerConfig(learning_rate=self.learning_rate, schedule=self.lr_schedule,
                                   warmup_steps=self.warmup_steps, total_steps=self.steps,
                                   weight_decay=self.weight_decay,
                                   max_grad_norm=self.max_grad_norm)
        except (TypeError, ValueError) as error:
            raise type(error)(f"TrainConfig: {error}".replace("OptimizerConfig.total_steps",
                                                              "steps")) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """`alignax eval`: generation metrics from samples of the trained policy.

    Attributes:
      num_prompts: held-out prompts to sample from (at most the split's size).
      num_samples: K responses per prompt (>= 2: self-BLEU and distinct-n compare them).
      max_new_tokens, temperature: sampling; temperature 1 keeps the KL estimate valid.
      reward_model: a reward-model checkpoint (`*ForSequenceClassification`, the policy's
        tokenizer) whose scores are reported, or None.
      batch_size: rows per generation call.
      seed: the sampling key and the bootstrap.
    """

    num_prompts: int = 32
    num_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    reward_model: str | None = None
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            _positive_int("EvalConfig", name, getattr(self, name))
        _positive_int("EvalConfig", "seed", self.seed, allow_zero=True)
        if not _is_int(self.num_samples) or self.num_samples < 2:
            raise ValueError(f"EvalConfig.num_samples must be an int >= 2 (diversity compares "
                             f"samples), got {self.num_samples!r}")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"EvalConfig.temperature must be > 0, got {self.temperature!r}")
        _local_path_exists("EvalConfig", "reward_model", self.reward_model, "reward model")


def objective_choices():
    """The registered objective configs as one union, each a command-line choice under its
    registered name (`objective:dpo`, `objective:mipo`, ...), read when the parser is built
    (objectives registered by a config file are included). Subclasses come before their base
    classes (DPO before FDPO), so a configured DPO() is not taken for an FDPO."""
    ordered = sorted(OBJECTIVES.items(), key=lambda item: -len(item[1].__mro__))
    return Union[tuple(Annotated[cls, tyro.conf.subcommand(name)] for name, cls in ordered)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: a model, data, an objective and how to train and evaluate it, in `run_dir`.

    Attributes:
      run_dir: where checkpoints, metrics, config.json and the export go; a rerun resumes.
      model, data, train, eval: the parts above.
      objective: any registered objective config (`alignax.objectives`, e.g. `DPO(beta=0.1)`;
        its hyper-parameters may be schedules of the step, `alignax.schedules`).
    """

    run_dir: str
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: Annotated[Objective, tyro.conf.arg(constructor_factory=objective_choices)] = DPO()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if not isinstance(self.run_dir, (str, os.PathLike)) or not str(self.run_dir):
            raise ValueError(f"RunConfig.run_dir must be a directory path, got {self.run_dir!r}")
        object.__setattr__(self, "run_dir", str(self.run_dir))
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                          ("eval", EvalConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")
        if not isinstance(self.objective, Objective):
            raise TypeError(f"RunConfig.objective must be a registered objective config (e.g. "
                            f"alignax.objectives.DPO(beta=0.1)), got "
                            f"{type(self.objective).__name__}")
        if self.train.eval_every and not self.data.has_eval:
            raise ValueError("TrainConfig.eval_every needs a held-out split: set "
                             "DataConfig.eval_path, eval_split or eval_fraction")
        reward = self.objective.needs.model == "reward_model"
        if not reward and (self.model.num_heads or self.model.ensemble):
            raise ValueError(f"ModelConfig.num_heads / ensemble are for reward models; "
                             f"{self.objective.name} trains a causal LM")
        if reward and self.train.share_prompt:
            raise ValueError(f"TrainConfig.share_prompt packs responses for log-prob "
                             f"objectives; {self.objective.name} trains a reward model")
        if not reward and "score" in (self.model.lora_targets or ()):
            raise ValueError(f"ModelConfig.lora_targets: 'score' is a reward model's head; "
                             f"{self.objective.name} trains a causal LM")

    @property
    def share_prompt(self) -> bool:
        """Whether the step scores shared prompts (the default for every log-prob objective)."""
        if self.train.share_prompt is not None:
            return self.train.share_prompt
        return self.objective.needs.model == "causal_lm"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """`alignax label`: score unlabeled pairs with reward models, for distillation (004 §4.1).

    Attributes:
      data: records with "prompt", "response_1", "response_2" (a local file or hub id).
      output: the JSONL file to write: each record with "target_rewards_1" / "target_rewards_2",
        a float per response, or a list of E floats for an ensemble (the "unlabeled" format).
      reward_models: one checkpoint (one score, or E scores from a multi-head model), or
        several stacked into a `RewardEnsemble` (E = their number x heads).
      tokenizer: None (the first reward model's own), "default" or a directory / hub id.
      split, max_length, batch_size: reading, truncation and the batch per forward pass.
    """

    data: str
    output: str
    reward_models: tuple[str, ...]
    tokenizer: str | None = None
    split: str = "train"
    max_length: int = 512
    batch_size: int = 16

    def __post_init__(self):
        _local_path_exists("LabelConfig", "data", self.data, "file or directory")
        if isinstance(self.reward_models, str):
            object.__setattr__(self, "reward_models", (self.reward_models,))
        if not self.reward_models:
            raise ValueError("LabelConfig.reward_models needs at least one checkpoint")
        object.__setattr__(self, "reward_models", tuple(self.reward_models))
        for path in self.reward_models:
            _local_path_exists("LabelConfig", "reward_models", path, "reward model")
        _local_path_exists("LabelConfig", "tokenizer", self.tokenizer, "tokenizer directory")
        _positive_int("LabelConfig", "max_length", self.max_length)
        _positive_int("LabelConfig", "batch_size", self.batch_size)
        if not str(self.output).endswith(".jsonl"):
            raise ValueError(f"LabelConfig.output must be a .jsonl file, got {self.output!r}")


# ------------------------------------------------------------------ JSON form and resume

RESUMABLE = ("train.steps", "train.save_every", "train.keep_checkpoints", "train.eval_every",
             "train.eval_batches", "train.early_stopping_metric", "train.early_stopping_mode",
             "train.early_stopping_patience", "train.early_stopping_min_delta",
             "train.export", "train.progress", "train.tensorboard", "train.wandb",
             "train.compilation_cache", "data.eval_path", "data.eval_split", "eval")
"""Fields (dotted; "eval" = the whole EvalConfig) a resumed run may change. Any other
difference from the run directory's config.json is refused, naming the fields."""


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The JSON form of a run config (the objective via `objective_to_config`)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Objective):
            out[field.name] = objective_to_config(value)
        elif dataclasses.is_dataclass(value):
            out[field.name] = {k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(value).items()}
        else:
            out[field.name] = value
    return out


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Inverse of `config_to_dict`."""
    parts = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
    kwargs: dict[str, Any] = {"run_dir": data["run_dir"],
                              "objective": objective_from_config(data["objective"])}
    for name, cls in parts.items():
        fields = dict(data.get(name, {}))
        if "mesh" in fields:
            fields["mesh"] = tuple(fields["mesh"])
        kwargs[name] = cls(**fields)
    return RunConfig(**kwargs)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 5}} -> {"train.steps": 5} (nested mappings, schedules included)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def comparable(data: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without the `RESUMABLE` fields (what a resume must match)."""
    return {k: v for k, v in _flatten(data).items()
            if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)}


def config_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields (outside `RESUMABLE`) in which two config dicts differ, as
    "objective.beta: 0.1 (run directory) != 0.2 (this run)"."""
    a, b = comparable(saved), comparable(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            diffs.append(f"{key}: {'missing' if x is missing else repr(x)} (run directory) != "
                         f"{'missing' if y is missing else repr(y)} (this run)")
    return diffs


def load_config_file(spec: str | os.PathLike, *, expected: type = RunConfig) -> Any:
    """The config a Python file defines: CONFIG is "path.py" (its variable `config`) or
    "path.py:name" (the variable `name`).

    The file is run as a script (`runpy.run_path`), so it may import anything and compute its
    config; it must bind the variable to an instance of `expected`.

    Raises:
      ValueError: no such file, no such variable, or a value of another type.
    """
    text = str(spec)
    path, _, name = text.partition(":") if text.count(":") == 1 and not os.path.exists(
        text) else (text, "", "")
    name = name or "config"
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"no such config file: {path!r} (looked for {str(file.absolute())!r}); "
                         "CONFIG is a Python file that defines `config`")
    namespace = runpy.run_path(str(file), run_name="__alignax_config__")
    if name not in namespace:
        defined = sorted(k for k, v in namespace.items() if isinstance(v, expected))
        raise ValueError(f"{path} defines no variable {name!r}; it defines "
                         f"{expected.__name__} values {defined or 'none'}")
    value = namespace[name]
    if not isinstance(value, expected):
        raise ValueError(f"{path}:{name} is a {type(value).__name__}, not a {expected.__name__}")
    return value


def check_devices(config: RunConfig, device_count: int) -> tuple[int, int, int]:
    """The mesh shape of `config` on `device_count` devices (-1 resolved), checked against
    them and against the batch, before anything loads.

    Raises:
      ValueError: the mesh needs more devices than there are, or the batch does not split.
    """
    shape = list(config.train.mesh)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if device_count % known:
            raise ValueError(f"TrainConfig.mesh={config.train.mesh}: {device_count} devices do "
                             f"not divide into the fixed axes' {known}")
        shape[shape.index(-1)] = device_count // known
    if math.prod(shape) > device_count:
        raise ValueError(f"TrainConfig.mesh={config.train.mesh} needs {math.prod(shape)} "
                         f"devices, this process sees {device_count}")
    shards = shape[0] * shape[1]
    if config.train.batch_size % shards:
        raise ValueError(f"TrainConfig.batch_size={config.train.batch_size} does not split "
                         f"over the mesh's data x fsdp = {shards} devices (mesh {tuple(shape)})")
    return tuple(shape)
