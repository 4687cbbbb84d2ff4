"""`from_pretrained`: HF config.json + safetensors (single file or sharded) -> CausalLM.

The config goes through transformers' `AutoConfig` (never `trust_remote_code`); weights are
read tensor by tensor from safetensors with the NumPy backend (never pickle), converted by the
family module's `params_from_hf`, stacked over the layers, and placed directly with their
target sharding when a mesh is given (`jax.make_array_from_callback`: each device receives
only its shard). Weights must be floating point and finite; a sharded index may not point
outside the checkpoint directory; a path-like name is never tried as a hub id.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable

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
    """A local directory, or a hub id downloaded (config + safetensors only) to the HF cache.

    A name that can only be a path is never sent to the hub: a `PathLike`, a name starting
    with ".", "/" or "~", one with several "/" or a backslash, one that is no valid repo id,
    and "dir/name" when the folder "dir" exists here (a mistyped path inside it). Such a name
    that does not exist raises FileNotFoundError saying the local directory is missing.
    """
    name = os.fspath(path_or_hub_id)
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name!r} is a file, not a checkpoint directory (pass the "
                                "directory holding config.json and the safetensors weights)")
    if _path_like(path_or_hub_id):
        raise FileNotFoundError(f"local checkpoint directory {name!r} does not exist"
                                f"{_did_you_mean(path)}")
    try:
        local = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=_HUB_PATTERNS,
            local_files_only=huggingface_hub.constants.HF_HUB_OFFLINE)
    except Exception as err:  # offline, unknown repo, gated repo, network error
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"there is no local directory {name!r} either. If you are offline, download it "
            f"first (`huggingface-cli download {name}`) or pass a local directory holding "
            "config.json and *.safetensors."
        ) from err
    return pathlib.Path(local)


def _path_like(name: str | os.PathLike) -> bool:
    if not isinstance(name, str):
        return True
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except huggingface_hub.errors.HFValidationError:
        return True
    return "/" in name and pathlib.Path(name.split("/")[0]).is_dir()


def _did_you_mean(path: pathlib.Path) -> str:
    parent = path.parent
    if not parent.is_dir():
        return f" (nor does its parent {str(parent)!r})"
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()
                                                  if p.is_dir()], n=3)
    return f"; did you mean {[str(parent / c) for c in close]}?" if close else ""


class SafetensorsReader:
    """Lazy key -> np.ndarray access over model.safetensors or a sharded index.

    Every tensor read must have a floating dtype (an int or bool tensor cannot be a weight:
    ValueError naming it). With `check_finite`, each tensor read is checked once for NaN/inf
    (one pass over its values); `raise_if_nonfinite()` then names every offending tensor.
    A sharded index may only name shard files inside the checkpoint directory.
    """

    def __init__(self, directory: pathlib.Path, *, check_finite: bool = True,
                 single_file: str = SINGLE_FILE, index_file: str | None = INDEX_FILE):
        self.directory = directory
        if index_file is not None and (directory / index_file).is_file():
            self.files = _index_files(directory, index_file)
        elif (directory / single_file).is_file():
            with safe_open(directory / single_file, framework="np") as f:
                self.files = {key: directory / single_file for key in f.keys()}
        else:
            found = sorted(p.name for p in directory.iterdir())
            expected = single_file if index_file is None else f"{single_file} or {index_file}"
            raise FileNotFoundError(
                f"no {expected} in {directory} (found {found}); "
                "pickle checkpoints (*.bin, *.pt) are never loaded: convert them to "
                "safetensors first")
        self.check_finite = check_finite
        self.used: set[str] = set()
        self.nonfinite: dict[str, tuple[int, int]] = {}  # key -> (non-finite count, size)
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
        tensor = self._open[file].get_tensor(key)
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise ValueError(f"tensor {key!r} has dtype {tensor.dtype}, which cannot hold a "
                             f"weight (a floating dtype is expected) ({file})")
        if self.check_finite and key not in self.used and not np.isfinite(tensor).all():
            self.nonfinite[key] = (int(np.size(tensor) - np.isfinite(tensor).sum()),
                                   int(np.size(tensor)))
        self.used.add(key)
        return tensor

    def unused(self) -> list[str]:
        return sorted(k for k in self.files if k not in self.used and not _IGNORED_KEYS.search(k))

    def raise_if_nonfinite(self) -> None:
        """ValueError naming every tensor read so far that holds NaN or inf."""
        if self.nonfinite:
            bad = ", ".join(f"{key} ({count} of {size} values)"
                            for key, (count, size) in sorted(self.nonfinite.items()))
            raise ValueError(f"checkpoint tensors hold NaN/inf values: {bad} "
                             f"({self.directory}); pass check_finite=False to load them anyway")


def _index_files(directory: pathlib.Path, index_file: str) -> dict[str, pathlib.Path]:
    """key -> shard file of a sharded index, refusing shard paths outside `directory`."""
    index = json.loads((directory / index_file).read_text())
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{directory / index_file} has no 'weight_map' object")
    files = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index_file} maps {key!r} to {shard!r}, not a file name "
                             f"({directory})")
        parts = pathlib.PurePosixPath(shard.replace("\\", "/"))
        if parts.is_absolute() or ".." in parts.parts or pathlib.PureWindowsPath(shard).drive:
            raise ValueError(f"{index_file} maps {key!r} to {shard!r}, outside the checkpoint "
                             f"directory {directory}: shard paths must be relative and inside it")
        files[key] = directory / parts
    return files


def read_tensors(path_or_hub_id: str | os.PathLike, names: Iterable[str], *,
                 revision: str | None = None) -> dict[str, np.ndarray]:
    """Selected tensors of a checkpoint by HF key (e.g. a classifier's "score.weight")."""
    reader = SafetensorsReader(resolve_checkpoint(path_or_hub_id, revision=revision))
    tensors = {name: reader(name) for name in names}
    reader.raise_if_nonfinite()
    return tensors


def place(array: np.ndarray, variable: nnx.Variable, mesh: Mesh | None,
          rules: Rules) -> jax.Array:
    """Host array -> device array; on a mesh each device receives only its shard."""
    if mesh is None:
        return jax.device_put(array)
    axes = variable.get_metadata().get("out_sharding") or (None,) * array.ndim
    sharding = logical_to_mesh_sharding(axes, mesh, rules, array.shape)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def assign_params(variables: dict[tuple, nnx.Variable], sources: dict[tuple, Callable], *,
                  layers: tuple, num_layers: int, mesh: Mesh | None, rules: Rules,
                  directory: pathlib.Path) -> None:
    """Sets every (abstract) variable from the family's per-tensor loads, placed on `mesh`.

    `sources` maps our per-layer paths, e.g. ("layers", 3, "mlp", "up_proj", "kernel"), to
    load() -> np.ndarray; a variable under the path prefix `layers` is stacked [L, ...] from
    layers 0..L-1. One variable is on the host at a time (cast to its dtype).
    """
    missing = []
    for path, variable in variables.items():
        stacked = path[:len(layers)] == layers
        rest = path[len(layers):]
        names = [(*layers, i, *rest) for i in range(num_layers)] if stacked else [path]
        if any(name not in sources for name in names):
            missing.append(".".join(map(str, path)))
            continue
        array = np.empty(variable.shape, variable.dtype)
        for i, name in enumerate(names):
            part = np.asarray(sources[name]())
            expected = variable.shape[1:] if stacked else variable.shape
            if part.shape != expected:
                raise ValueError(f"parameter {'.'.join(map(str, name))}: checkpoint shape "
                                 f"{part.shape} != model shape {expected} ({directory})")
            if stacked:
                array[i] = part
            else:
                array[...] = part
        variable.set_value(place(array, variable, mesh, rules))
    if missing:
        raise ValueError(f"parameters not found in the checkpoint: {missing}")


def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32,
                    param_dtype=jnp.float32, mesh: Mesh | None = None,
                    rules: Rules = DEFAULT_RULES, revision: str | None = None,
                    lm_head: bool = True, check_finite: bool = True) -> CausalLM:
    """Loads an HF causal-LM checkpoint (Llama/Mistral/Qwen2, GPT-2, GPT-NeoX/Pythia).

    Per-layer tensors ("model.layers.3.mlp.up_proj.weight") are stacked into the model's
    [L, ...] layer parameters.

    Args:
      path_or_hub_id: a directory with config.json and model.safetensors (or a sharded
        model.safetensors.index.json), or a hub id such as "EleutherAI/pythia-160m".
      dtype: compute dtype; param_dtype: storage dtype the weights are cast to.
      mesh: if given, each parameter is placed with its NamedSharding (see `partitioning`).
      rules: logical-axis rules.
      revision: hub revision (branch, tag or commit).
      lm_head: False to load a backbone only (e.g. from a `*ForSequenceClassification`
        checkpoint): an untied lm_head is set to zeros and tensors left unread are allowed.
      check_finite: refuse weights holding NaN or inf (each tensor is checked once as read).

    Raises:
      OSError: a hub id could not be fetched (offline, unknown or gated repo).
      FileNotFoundError: no safetensors weights in the directory, or a path-like name that
        does not exist.
      ValueError: unsupported architecture, a tensor missing / of the wrong shape / of a
        non-floating dtype / holding NaN or inf, a sharded index naming files outside the
        directory, or (with lm_head=True) checkpoint tensors that the model does not use.
    """
    directory = resolve_checkpoint(path_or_hub_id, revision=revision)
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    arch = ModelConfig.from_hf(config)
    cls = FAMILY_CLASSES[arch.family]
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)))
    variables = dict(nnx.to_flat_state(abstract))
    reader = SafetensorsReader(directory, check_finite=check_finite)

    def read(key: str) -> np.ndarray:
        if not lm_head and key == "lm_head.weight" and key not in reader.files:
            return np.zeros((arch.vocab_size, arch.hidden_size), np.float32)
        return reader(key)

    sources = family_module(config).params_from_hf(arch, read, set(reader.keys()))
    assign_params(variables, sources, layers=(cls.BLOCKS,), num_layers=arch.num_layers,
                  mesh=mesh, rules=rules, directory=directory)
    unused = reader.unused()
    if lm_head and unused and not (arch.tie_word_embeddings and unused == ["lm_head.weight"]):
        raise ValueError(f"checkpoint tensors the {arch.model_type} model does not use: "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''} ({directory})")
    reader.raise_if_nonfinite()
    return nnx.merge(graphdef, nnx.from_flat_state(variables))
