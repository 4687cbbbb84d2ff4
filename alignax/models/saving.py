"""`save_pretrained`: CausalLM -> HF directory (config.json + safetensors) that
`transformers.AutoModelForCausalLM.from_pretrained`, vLLM and `from_pretrained` here all load.

Tensors keep the model's parameter dtype; large models are split into shards
model-0000i-of-0000n.safetensors with a model.safetensors.index.json, as HF writes them. The
stacked [L, ...] layer parameters are written as HF's per-layer tensors. A model with LoRA
adapters is refused: save `alignax.models.lora.merge(model)` (or the adapters alone with
`alignax.models.lora.save_adapter`).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from alignax.models.causal_lm import CausalLM
from alignax.models.loading import INDEX_FILE, SINGLE_FILE
from alignax.models.registry import family_module

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
                 "gpt_neox": "GPTNeoXForCausalLM"}


def _host_array(value: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def refuse_adapters(model: nnx.Module) -> None:
    """ValueError if `model` holds LoRA adapters, which HF base-model files cannot hold."""
    lora = [".".join(map(str, p))
            for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    if lora:
        raise ValueError(f"the model has LoRA adapters ({lora[:2]}"
                         f"{' ...' if len(lora) > 2 else ''}): save "
                         "alignax.models.lora.merge(model) for merged weights, or "
                         "alignax.models.lora.save_adapter(model, path) for the adapters alone")


def host_params(model: nnx.Module, *, layers: str) -> dict[tuple, np.ndarray]:
    """{per-layer parameter path: host array} of a CausalLM without adapters: a stacked
    [L, ...] variable under the attribute `layers` becomes L entries (layers, i, ...), the
    form the family modules' `params_to_hf` read."""
    refuse_adapters(model)
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = _host_array(variable[...])
        if path[0] == layers:
            out.update({(layers, i, *path[1:]): layer for i, layer in enumerate(value)})
        else:
            out[path] = value
    return out


def save_pretrained(model: CausalLM, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Writes `model` to directory `path` in HF format; returns the directory.

    Args:
      model: a CausalLM from `create` or `from_pretrained` (sharded arrays are gathered to the
        host one at a time; in a multi-host job every process calls this, process 0 writes).
      path: output directory (created).
      max_shard_bytes: above this total size the weights are split into index-linked shards.

    Raises:
      ValueError: the model has LoRA adapters (merge them first).
    """
    params = host_params(model, layers=model.BLOCKS)
    tensors = family_module(model.config).params_to_hf(model.arch, params)
    if jax.process_index() != 0:
        return pathlib.Path(path)
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [ARCHITECTURES[config.model_type]]
    config.dtype = str(np.dtype(model.param_dtype))
    config.save_pretrained(directory)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE,
                  *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return directory
