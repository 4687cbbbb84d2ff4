"""Building a run from its config: run directory, tokenizer, data, model, reference, mesh.

`build_run` does it in the order that fails cheapest first, before anything compiles:

1. the mesh against the devices (`config.check_devices`);
2. the run directory: a config.json written by an earlier run must match this config outside
   `config.RESUMABLE` (`ConfigMismatchError` naming the fields); this config is saved there
   once steps 3-7 have passed;
3. the tokenizer, and the model's vocabulary and kind read from its config.json alone;
4. the raw records (train and held-out) and their format;
5. `check_tokenizer`: token ids vs the model's vocabulary, the pad token, a chat template for
   conversational records;
6. `check_compatible(objective, model=...)`: the objective vs the model kind;
7. `prepare_dataset`, then `check_compatible(objective, data=...)`: the data's format and
   columns, the bins against `num_bins`;
8. only then the weights: the model (on the mesh) and the frozen reference.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh

from alignax.data import (LengthQuantileBins, PreferenceDataset, check_tokenizer,
                          default_tokenizer, detect_format, load_records, prepare_dataset)
from alignax.data.loading import local_path
from alignax.models import (CausalLM, RewardEnsemble, RewardModel, create, create_reward_model,
                            from_pretrained, load_reward_model, tiny_config)
from alignax.models.loading import resolve_checkpoint
from alignax.objectives.registry import REWARD_MODEL
from alignax.trainer.config import (DEFAULT_TOKENIZER, TINY, DataConfig, ModelConfig,
                                    RunConfig, check_devices, config_difference,
                                    config_to_dict)
from alignax.models.lora import add_lora, default_targets, merge
from alignax.training import ConfigMismatchError, check_compatible, make_mesh, split_model
from alignax.training.state import has_adapters
from alignax.training.reference import tokenizer_hash, weights_hash

log = logging.getLogger("alignax.trainer")

CONFIG_FILE = "config.json"
EXPORT_DIR = "export"


@dataclasses.dataclass
class Run:
    """A built run: everything the train, eval and plan commands share.

    Attributes:
      config: the RunConfig.
      run_dir: the run directory (absolute).
      mesh: the ("data", "fsdp", "tensor") mesh.
      tokenizer: the transformers tokenizer.
      dataset, eval_dataset: the prepared training and held-out splits (None without one).
      graphdef, params, model_state: the model split by `split_model` (params: the initial
        float32 weights on the mesh; under LoRA the adapters, the base weights being in
        model_state).
      reference_params: the frozen reference's parameters (None when the objective uses none,
        and under LoRA, whose reference is the base model).
      saved_config: the JSON config written to run_dir/config.json (with the in-memory
        sources' fingerprints under "sources").
    """

    config: RunConfig
    run_dir: pathlib.Path
    mesh: Mesh
    tokenizer: Any
    dataset: PreferenceDataset
    eval_dataset: PreferenceDataset | None
    graphdef: nnx.GraphDef
    params: Any
    model_state: Any
    reference_params: Any
    saved_config: dict

    @property
    def share_prompt(self) -> bool:
        return self.config.share_prompt

    def model(self, params: Any = None) -> nnx.Module:
        """The model with `params` (default: the initial ones)."""
        return nnx.merge(self.graphdef, self.params if params is None else params,
                         self.model_state)


# ------------------------------------------------------------------ run directory, cache

def enable_compilation_cache(run_dir: pathlib.Path) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at run_dir/../.jax_cache unless a cache
    directory is configured already (e.g. by `JAX_COMPILATION_CACHE_DIR`); returns it."""
    if jax.config.jax_compilation_cache_dir:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    from jax.experimental.compilation_cache import compilation_cache

    directory = run_dir.parent / ".jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()  # a cache checked (and found unset) before is re-read
    return directory


def _records_fingerprint(records: Sequence[Any]) -> dict:
    text = json.dumps(list(records), sort_keys=True, default=str)
    return {"records": len(records), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def check_run_dir(config: RunConfig, sources: dict) -> tuple[pathlib.Path, dict]:
    """(run_dir, the config dict to save): checks run_dir/config.json, if an earlier run wrote
    one, against `config` and `sources` (the fingerprints of what was passed in memory).

    Raises:
      ConfigMismatchError: the run directory holds a run of another config; the message names
        every differing field.
    """
    run_dir = pathlib.Path(config.run_dir).expanduser().absolute()
    saved = {**config_to_dict(config), "sources": sources}
    path = run_dir / CONFIG_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        diffs = config_difference(previous, saved)
        if diffs:
            raise ConfigMismatchError(
                f"{run_dir} holds a run with another config; resuming it with this one would "
                f"mix two runs. Differences: {'; '.join(diffs)}. Use another run_dir, or undo "
                "the change (fields that may change on resume: alignax.trainer.config.RESUMABLE)")
    return run_dir, saved


def write_run_config(run_dir: pathlib.Path, saved: dict) -> None:
    """Writes run_dir/config.json atomically (process 0), once the run has passed its checks."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    temporary = path.with_name(CONFIG_FILE + ".tmp")
    temporary.write_text(json.dumps(saved, indent=1, sort_keys=True))
    os.replace(temporary, path)


# ------------------------------------------------------------------ tokenizer and model kind

def load_tokenizer(spec: ModelConfig, tokenizer: Any = None) -> Any:
    """The run's tokenizer: `tokenizer` if given, else what `spec` names (ModelConfig docs)."""
    if tokenizer is None:
        name = spec.tokenizer or (DEFAULT_TOKENIZER if spec.path == TINY else spec.path)
        if name == DEFAULT_TOKENIZER:
            tokenizer = default_tokenizer()
        else:
            path = local_path(name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path or name), revision=spec.revision if path is None else None)
    if spec.pad_token is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = spec.pad_token
    return tokenizer


def _hf_config(spec: ModelConfig):
    return transformers.AutoConfig.from_pretrained(
        str(resolve_checkpoint(spec.path, revision=spec.revision)), trust_remote_code=False)


def is_reward_checkpoint(hf_config) -> bool:
    """Whether an HF config is a `*ForSequenceClassification` (reward model) checkpoint's."""
    return any(a.endswith("ForSequenceClassification")
               for a in getattr(hf_config, "architectures", None) or ())


def tiny_model_config(spec: ModelConfig, tokenizer):
    """The HF config of the embedded tiny model, sized to `tokenizer`."""
    return tiny_config(spec.family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def model_class(config: RunConfig, hf_config) -> type:
    """The class `build_model` will produce, from the objective's model kind and the
    checkpoint: a causal LM, a reward model or an ensemble. A reward checkpoint for a
    log-prob objective gives RewardModel (which `check_compatible` then refuses)."""
    if config.objective.needs.model == REWARD_MODEL:
        return RewardEnsemble if config.model.ensemble else RewardModel
    return RewardModel if is_reward_checkpoint(hf_config) else CausalLM


def _vocab_size(model: nnx.Module) -> int:
    if isinstance(model, RewardEnsemble):
        return int(model.members.config.vocab_size)
    return int(model.config.vocab_size)


# ------------------------------------------------------------------ records

def _as_records(data: Any, what: str) -> list:
    if hasattr(data, "to_list"):
        return data.to_list()
    if isinstance(data, (str, os.PathLike)) or not isinstance(data, Sequence):
        raise TypeError(f"{what} must be a list of record dicts or a datasets.Dataset (give a "
                        f"path in DataConfig instead), got {type(data).__name__}")
    return list(data)


def load_splits(spec: DataConfig, *, seed: int, data: Any = None, eval_data: Any = None
                ) -> tuple[list, list | None]:
    """(training records, held-out records or None) as DataConfig describes them."""
    if data is not None and spec.path is not None:
        raise ValueError(f"DataConfig.path={spec.path!r} and in-memory data were both given; "
                         "pass one")
    if data is None and spec.path is None:
        raise ValueError("no training data: set DataConfig.path (a file, directory or hub id) "
                         "or pass data=records")
    records = (_as_records(data, "data") if data is not None
               else load_records(spec.path, split=spec.split).to_list())
    if eval_data is not None:
        return records, _as_records(eval_data, "eval_data")
    if spec.eval_path is not None or spec.eval_split is not None:
        source = spec.eval_path or spec.path
        if source is None:
            raise ValueError("DataConfig.eval_split needs DataConfig.path (the in-memory data "
                             "has no splits): pass eval_data=records")
        return records, load_records(source, split=spec.eval_split or spec.split).to_list()
    if spec.eval_fraction > 0:
        order = np.random.default_rng(seed).permutation(len(records))
        count = max(1, round(spec.eval_fraction * len(records)))
        if count >= len(records):
            raise ValueError(f"DataConfig.eval_fraction={spec.eval_fraction} of "
                             f"{len(records)} records leaves none to train on")
        held = set(order[:count].tolist())
        return ([r for i, r in enumerate(records) if i not in held],
                [r for i, r in enumerate(records) if i in held])
    return records, None


def records_format(spec: DataConfig, records: list) -> str:
    """The records' format: DataConfig.format, or the one detected from the first record
    (`prepare_dataset` checks that every record agrees)."""
    if spec.format != "auto":
        return spec.format
    try:
        return detect_format(records[0]) if records else "standard"
    except ValueError as error:
        raise ValueError(f"record 0: {error}") from None


def prepare(spec: DataConfig, records: list, tokenizer, *, response_bins=None
            ) -> PreferenceDataset:
    """`prepare_dataset` with the DataConfig's settings."""
    return prepare_dataset(records, tokenizer, format=spec.format, max_length=spec.max_length,
                           max_prompt_length=spec.max_prompt_length, truncation=spec.truncation,
                           bin_column=spec.bin_column, response_bins=response_bins,
                           errors=spec.errors)


# ------------------------------------------------------------------ models

def _reward_from_backbone(lm: CausalLM, *, num_heads, seed: int, mesh: Mesh) -> RewardModel:
    """A RewardModel whose backbone is `lm` (its lm_head dropped) and whose score head is new."""
    rm = create_reward_model(lm.config, rngs=nnx.Rngs(seed), num_heads=num_heads, mesh=mesh)
    weights = nnx.state(lm, nnx.Param)
    if "lm_head" in weights:
        del weights["lm_head"]
    nnx.update(rm.backbone, weights)
    return rm


def build_model(config: RunConfig, tokenizer, mesh: Mesh, *, hf_config=None) -> nnx.Module:
    """The model the config names, its parameters created or loaded directly on `mesh`."""
    spec, rngs = config.model, nnx.Rngs(config.model.seed)
    reward = config.objective.needs.model == REWARD_MODEL
    if spec.path == TINY:
        hf = tiny_model_config(spec, tokenizer)
        if not reward:
            return create(hf, rngs=rngs, mesh=mesh)
        if spec.ensemble:
            return RewardEnsemble.create(hf, num_members=spec.ensemble, rngs=rngs,
                                         num_heads=spec.num_heads)
        return create_reward_model(hf, rngs=rngs, num_heads=spec.num_heads, mesh=mesh)
    hf = hf_config if hf_config is not None else _hf_config(spec)
    if not reward:
        return from_pretrained(spec.path, mesh=mesh, revision=spec.revision)
    if is_reward_checkpoint(hf):
        if spec.num_heads is not None:
            raise ValueError(f"ModelConfig.num_heads={spec.num_heads}: the reward checkpoint "
                             f"{spec.path!r} has its own heads (num_labels); leave it None")
        loaded = load_reward_model(spec.path, mesh=mesh, revision=spec.revision)
        if not spec.ensemble:
            return loaded
        return RewardEnsemble.stack([loaded] * spec.ensemble)
    lm = from_pretrained(spec.path, mesh=mesh, revision=spec.revision)
    members = [_reward_from_backbone(lm, num_heads=spec.num_heads, seed=spec.seed + i, mesh=mesh)
               for i in range(spec.ensemble or 1)]
    return RewardEnsemble.stack(members) if spec.ensemble else members[0]


def _params_of(value: Any, what: str):
    """Parameters from a model (nnx.Module) or an nnx.State of parameters."""
    if isinstance(value, nnx.Module):
        return split_model(value)[1]
    if isinstance(value, nnx.State):
        return value
    raise TypeError(f"{what} must be an nnx model or its parameters (nnx.State), got "
                    f"{type(value).__name__}")


def _check_same_structure(reference, params, what: str) -> None:
    shapes = jax.tree.map(jnp.shape, params)
    ref_shapes = jax.tree.map(jnp.shape, reference)
    if jax.tree.structure(shapes) != jax.tree.structure(ref_shapes) or shapes != ref_shapes:
        raise ValueError(f"{what} does not have the policy's parameter structure and shapes "
                         "(the reference must be the same architecture)")


# ------------------------------------------------------------------ the whole run

@dataclasses.dataclass
class Prepared:
    """The checked inputs of a run, before any weights: see `prepare_inputs`."""

    tokenizer: Any
    hf_config: Any  # the checkpoint's HF config (None for "tiny" or an in-memory model)
    model_class: type
    dataset: PreferenceDataset
    eval_dataset: PreferenceDataset | None


def prepare_inputs(config: RunConfig, *, model: Any = None, tokenizer: Any = None,
                   data: Any = None, eval_data: Any = None) -> Prepared:
    """Steps 3-7 of the module docstring: tokenizer, model kind and vocabulary (from the
    checkpoint's config.json), records, `check_tokenizer`, `check_compatible` on the model
    kind, `prepare_dataset`, `check_compatible` on the data. Loads no weights."""
    objective, spec = config.objective, config.model
    tokenizer = load_tokenizer(spec, tokenizer)
    hf_config = None
    if model is not None:
        cls, vocab = type(model), _vocab_size(model)
    elif spec.path == TINY:
        cls, vocab = model_class(config, None), tiny_model_config(spec, tokenizer).vocab_size
    else:
        hf_config = _hf_config(spec)
        cls, vocab = model_class(config, hf_config), int(hf_config.vocab_size)
    records, eval_records = load_splits(config.data, seed=config.train.seed, data=data,
                                        eval_data=eval_data)
    formats = {records_format(config.data, records)}
    if eval_records is not None:
        formats.add(records_format(config.data, eval_records))
    check_tokenizer(tokenizer, vocab_size=vocab, needs_chat_template="conversational" in formats)
    check_compatible(objective, model=model if model is not None else cls)
    bins = LengthQuantileBins(num_bins=config.data.length_bins) if config.data.length_bins else None
    dataset = prepare(config.data, records, tokenizer, response_bins=bins)
    check_compatible(objective, data=dataset, share_prompt=config.share_prompt)
    eval_dataset = None
    if eval_records is not None:
        eval_dataset = prepare(config.data, eval_records, tokenizer,
                               response_bins=dataset.response_bins)
        check_compatible(objective, data=eval_dataset, share_prompt=config.share_prompt)
    return Prepared(tokenizer, hf_config, cls, dataset, eval_dataset)


def build_run(config: RunConfig, *, model: Any = None, params: Any = None, tokenizer: Any = None,
              data: Any = None, eval_data: Any = None, reference: Any = None) -> Run:
    """Builds `config`'s run in the order of the module docstring.

    Args:
      config: the RunConfig.
      model: an already-built model (CausalLM, RewardModel or RewardEnsemble) to start from
        instead of ModelConfig.path; left unchanged (under LoRA the adapters go on a copy),
        so one model can start many runs.
      params: initial parameters (an nnx.State) for the architecture ModelConfig names.
      tokenizer: a tokenizer object instead of ModelConfig.tokenizer.
      data, eval_data: records (a list of dicts in any supported format, or a
        datasets.Dataset) instead of DataConfig.path / the held-out source.
      reference: the frozen reference (a model or parameters) instead of ModelConfig.reference
        / the initial policy.
    """
    if model is not None and params is not None:
        raise ValueError("pass model= or params=, not both")
    mesh = make_mesh(check_devices(config, jax.device_count()))
    tokenizer = load_tokenizer(config.model, tokenizer)
    sources = {"tokenizer": tokenizer_hash(tokenizer)}
    if model is not None:
        sources["model"] = {"class": type(model).__name__,
                            "weights": weights_hash(split_model(model)[1])}
    if params is not None:
        sources["model"] = {"params": weights_hash(params)}
    if reference is not None:
        sources["reference"] = weights_hash(_params_of(reference, "reference"))
    for name, records in (("data", data), ("eval_data", eval_data)):
        if records is not None:
            sources[name] = _records_fingerprint(_as_records(records, name))
    run_dir, saved = check_run_dir(config, sources)
    inputs = prepare_inputs(config, model=model, tokenizer=tokenizer, data=data,
                            eval_data=eval_data)
    write_run_config(run_dir, saved)  # after the guard rails: a refused start leaves none

    # the weights, last
    if model is None:
        model = build_model(config, tokenizer, mesh, hf_config=inputs.hf_config)
        if params is not None:
            _check_same_structure(params, split_model(model)[1], "params")
            nnx.update(model, params)
    lora = config.model.lora_config(targets=default_targets(model))
    if lora is not None:  # on a copy (arrays shared): a passed-in model stays the base model
        model = add_lora(nnx.clone(model), lora, rngs=nnx.Rngs(config.model.seed + 1),
                         mesh=mesh)
    graphdef, initial, model_state = split_model(model)
    reference_params = None
    if has_adapters(initial):  # the reference is the base model: the adapters switched off
        if reference is not None:
            raise ValueError("reference=: a LoRA run's reference is its base model (the "
                             "adapters switched off); pass no reference")
    elif config.objective.needs.reference:
        if reference is not None:
            reference_params = _params_of(reference, "reference")
        elif config.model.reference is not None:
            reference_params = split_model(from_pretrained(config.model.reference, mesh=mesh))[1]
        if reference_params is not None:
            _check_same_structure(reference_params, initial, "the reference")
    return Run(config=config, run_dir=run_dir, mesh=mesh, tokenizer=tokenizer,
               dataset=inputs.dataset, eval_dataset=inputs.eval_dataset, graphdef=graphdef,
               params=initial, model_state=model_state, reference_params=reference_params,
               saved_config=saved)


def export_model(run: Run, params: Any, path: pathlib.Path) -> pathlib.Path:
    """Writes the model with `params` and the tokenizer as HF safetensors to `path`:
    a causal LM (`export_hf`; under LoRA merged weights, and the PEFT adapter in
    path/adapter), a reward model (`save_reward_model`, adapters merged), or each member of
    an ensemble to path/member_<i>. The tokenizer goes next to every checkpoint."""
    from alignax.models import save_reward_model
    from alignax.training import export_hf

    if run.config.objective.needs.model != REWARD_MODEL:  # LoRA: merged + path/adapter
        export_hf(run.graphdef, params, path, model_state=run.model_state)
        targets = [path]
    else:
        model = run.model(params)
        if has_adapters(model):  # HF reward checkpoints hold merged weights
            model = merge(model)
        model = jax.device_get(model)
        if isinstance(model, RewardEnsemble):
            targets = [path / f"member_{i}" for i in range(model.num_members)]
            for i, target in enumerate(targets):
                save_reward_model(model.member(i), target)
        else:
            save_reward_model(model, path)
            targets = [path]
    if jax.process_index() == 0:
        for target in targets:
            copy.copy(run.tokenizer).save_pretrained(str(target))
    return path
