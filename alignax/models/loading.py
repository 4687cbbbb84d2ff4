"""`from_pretrained`: HF config.json + safetensors (single file or sharded) -> CausalLM.

The config goes through transformers' `AutoConfig` (never `trust_remote_code`); weights are
read tensor by tensor from safetensors with the NumPy backend (never pickle), converted by the
family module's `params_from_hf`, and placed directly with their target sharding when a mesh is
given (`jax.make_array_from_callback`: each device receives only its shard).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from alignax.models.causal_lm import CausalLM
from alignax.models.partitioning import DEFAULT_RULES, Rules, logical_to_mesh_sharding
from alignax.models.registry import FAMILY_CLASSES, family_module
from alignax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                 "*.safetensors.index.json"]
# Buffers that older checkpoints store but that are recomputed, never learned.
_IGNORED_KEYS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|"
                           r"attention\.bias|attention\.masked_bias)$")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, *, revision: str | None = None
                       ) -> pathlib.Path:
    """A local directory, or a hub id downloaded (config + safetensors only) to the HF cache."""
    path = pathlib.Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name!r} is not a checkpoint directory")
    try:
        local = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=_HUB_PATTERNS,
            local_files_only=huggingface_hub.constants.HF_HUB_OFFLINE)
    except Exception as err:  # offline, unknown repo, gated repo, network error
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "If you are offline, download it first (`huggingface-cli download "
            f"{name}`) or pass a local directory holding config.json and *.safetensors."
        ) from err
    return pathlib.Path(local)


class SafetensorsReader:
    """Lazy key -> np.ndarray access over model.safetensors or a sharded index."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        if (directory / INDEX_FILE).is_file():
            index = json.loads((directory / INDEX_FILE).read_text())
            self.files = {key: directory / f for key, f in index["weight_map"].items()}
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, framework="np") as f:
                self.files = {key: directory / SINGLE_FILE for key in f.keys()}
        else:
            found = sorted(p.name for p in directory.iterdir())
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (found {found}); "
                "pickle checkpoints (*.bin, *.pt) are never loaded: convert them to "
                "safetensors first")
        self.used: set[str] = set()
        self._open: dict[pathlib.Path, object] = {}

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise ValueError(f"tensor {key!r} missing from the checkpoint in {self.directory} "
                             f"(it has {len(self.files)} tensors, e.g. "
                             f"{sorted(self.files)[:4]})")
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="np")
        self.used.add(key)
        return self._open[file].get_tensor(key)

    def unused(self) -> list[str]:
        return sorted(k for k in self.files if k not in self.used and not _IGNORED_KEYS.search(k))


def read_tensors(path_or_hub_id: str | os.PathLike, names: Iterable[str], *,
                 revision: str | None = None) -> dict[str, np.ndarray]:
    """Selected tensors of a checkpoint by HF key (e.g. a classifier's "score.weight")."""
    reader = SafetensorsReader(resolve_checkpoint(path_or_hub_id, revision=revision))
    return {name: reader(name) for name in names}


def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32,
                    param_dtype=jnp.float32, mesh: Mesh | None = None,
                    rules: Rules = DEFAULT_RULES, revision: str | None = None,
                    lm_head: bool = True) -> CausalLM:
    """Loads an HF causal-LM checkpoint (Llama/Mistral/Qwen2, GPT-2, GPT-NeoX/Pythia).

    Args:
      path_or_hub_id: a directory with config.json and model.safetensors (or a sharded
        model.safetensors.index.json), or a hub id such as "EleutherAI/pythia-160m".
      dtype: compute dtype; param_dtype: storage dtype the weights are cast to.
      mesh: if given, each parameter is placed with its NamedSharding (see `partitioning`).
      rules: logical-axis rules.
      revision: hub revision (branch, tag or commit).
      lm_head: False to load a backbone only (e.g. from a `*ForSequenceClassification`
        checkpoint): an untied lm_head is set to zeros and tensors left unread are allowed.

    Raises:
      OSError: a hub id could not be fetched (offline, unknown or gated repo).
      FileNotFoundError: no safetensors weights in the directory.
      ValueError: unsupported architecture, a tensor missing / of the wrong shape, or (with
        lm_head=True) checkpoint tensors that the model does not use.
    """
    directory = resolve_checkpoint(path_or_hub_id, revision=revision)
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    arch = ModelConfig.from_hf(config)
    cls = FAMILY_CLASSES[arch.family]
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)))
    variables = dict(nnx.to_flat_state(abstract))
    reader = SafetensorsReader(directory)

    def read(key: str) -> np.ndarray:
        if not lm_head and key == "lm_head.weight" and key not in reader.files:
            return np.zeros((arch.vocab_size, arch.hidden_size), np.float32)
        return reader(key)

    loaded = set()
    for path, array in family_module(config).params_from_hf(arch, read, set(reader.keys())):
        variable = variables[path]
        if array.shape != variable.shape:
            raise ValueError(f"parameter {'.'.join(map(str, path))}: checkpoint shape "
                             f"{array.shape} != model shape {variable.shape} ({directory})")
        array = np.asarray(array).astype(variable.dtype)
        variable.set_value(_place(array, variable, mesh, rules))
        loaded.add(path)
    missing = sorted(".".join(map(str, p)) for p in variables if p not in loaded)
    if missing:
        raise ValueError(f"parameters not found in the checkpoint: {missing}")
    unused = reader.unused()
    if lm_head and unused and not (arch.tie_word_embeddings and unused == ["lm_head.weight"]):
        raise ValueError(f"checkpoint tensors the {arch.model_type} model does not use: "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''} ({directory})")
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def _place(array: np.ndarray, variable: nnx.Variable, mesh: Mesh | None,
           rules: Rules) -> jax.Array:
    if mesh is None:
        return jax.device_put(array)
    axes = variable.get_metadata().get("out_sharding") or (None,) * array.ndim
    sharding = logical_to_mesh_sharding(axes, mesh, rules, array.shape)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
