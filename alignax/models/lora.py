"""LoRA adapters on any family's projections, with PEFT's conventions and the base model as
the reference.

Low-rank adaptation (Hu et al., 2021) adds to a projection y = x W (+ b), W [in, out], a
trainable low-rank update, and freezes W:

    y = x W (+ b) + (alpha / r) * dropout(x) A B      A [in, r], B [r, out]

A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default, torch's Linear init), B = 0, so a fresh adapter
leaves the model unchanged. Targets by name: "q", "k", "v", "o" (attention projections),
"gate", "up", "down" (MLP; GPT-2 and GPT-NeoX have no "gate"), and "score" (the head of a
`RewardModel` / `RewardEnsemble`). The adapter of a scanned layer is stacked like its base
kernel ([L, in, r], [L, r, out]; [M, L, ...] in an ensemble), and its A / B take the kernel's
logical axis names for "in" / "out" (the rank axis is replicated), so adapters follow their
base weight's partition rules. A and B are `nnx.LoRAParam`s (flax's own `nnx.LoRA` module),
float32 whatever the base weights' dtype.

How a trainer uses it:

    model = alignax.models.from_pretrained(path, param_dtype=jnp.bfloat16, mesh=mesh)
    add_lora(model, LoRAConfig(rank=64, alpha=128, targets=("q", "k", "v", "o")),
             rngs=nnx.Rngs(0), mesh=mesh)
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    # adapters: the trainable state (give only it to the optimizer); base: the frozen rest.

    def loss(adapters, base, ids, mask, key):
        model = nnx.merge(graphdef, adapters, base)
        policy = model.hidden_states(ids, mask, dropout_key=key)        # adapters on
        reference = model.hidden_states(ids, mask, adapters=False)      # the base model
        ...  # reference under jax.lax.stop_gradient; gradients reach `adapters` only

`adapters=False` (on `CausalLM.hidden_states` / `__call__` / `decode`, `RewardModel` and
`RewardEnsemble`) skips every adapter: the same parameters and forward code give the base
model exactly, so no second copy of the weights is needed for the reference. `dropout_key`
turns on adapter dropout (None: none).

Export: `save_pretrained(merge(model), dir)` writes merged HF weights (W + (alpha/r) A B);
`save_adapter(model, dir)` writes the adapters alone as a PEFT LoRA adapter
(adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
loads onto the HF base model; `load_adapter(model, dir)` reads one onto our model. GPT-2's
c_attn and GPT-NeoX's query_key_value fuse q, k and v: their q/k/v adapters are exported as
one adapter of the fused module (A's concatenated, B block-diagonal; rank and alpha scaled so
(alpha/r) is unchanged), and a fused PEFT adapter is imported as q/k/v adapters sharing its A.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from alignax.models.causal_lm import CausalLM
from alignax.models.layers import Dense, stacked
from alignax.models.loading import SafetensorsReader, place
from alignax.models.partitioning import DEFAULT_RULES, Rules, state_shardings
from alignax.models.registry import family_module
from alignax.models.reward import RewardEnsemble, RewardModel

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "score")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT's default A init (torch kaiming_uniform_(a=sqrt(5))): U(-1/sqrt(in), 1/sqrt(in)).
PEFT_A_INIT = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (the update is scaled by alpha / r), targets, input dropout rate."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive and finite, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets must be distinct names from {TARGETS}, "
                             f"got {self.targets!r}")
        object.__setattr__(self, "targets", targets)


class LoRAAdapter(nnx.LoRA):
    """flax's `nnx.LoRA` (lora_a [in, r], lora_b [r, out], both `nnx.LoRAParam`, float32) with
    PEFT's scale alpha / r and dropout on its input. Set as `Dense.lora`."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 dropout: float, axes: tuple[str | None, str | None], rngs: nnx.Rngs):
        def metadata(names):
            return {"out_sharding": names, "eager_sharding": False}

        super().__init__(in_features, rank, out_features, param_dtype=jnp.float32,
                         a_initializer=PEFT_A_INIT, rngs=rngs,
                         a_metadata=metadata((axes[0], None)),
                         b_metadata=metadata((None, axes[1])))
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank
        self.dropout = float(dropout)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """x [N, in] -> (alpha / r) * dropout(x) @ A @ B [N, out] (float32 or wider)."""
        if self.dropout and key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        return super().__call__(x) * self.scale


def add_lora(model: CausalLM | RewardModel | RewardEnsemble, config: LoRAConfig, *,
             rngs: nnx.Rngs, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_RULES) -> CausalLM | RewardModel | RewardEnsemble:
    """Attaches a fresh adapter (A random, B zero) to each target projection; returns `model`
    (changed in place).

    Args:
      model: a CausalLM, RewardModel or RewardEnsemble of any family.
      config: rank, alpha, targets, dropout.
      rngs: A is drawn from `rngs.params()` (independently per target, layer and member).
      mesh: if given, the adapters are created directly with their NamedShardings.
      rules: logical-axis rules.

    Raises:
      ValueError: a target the family does not have ("gate" on GPT-2), "score" on a causal
        LM, or a projection that already has an adapter.
    """
    specs = [(dense, config.rank, config.alpha) for _, dense in
             _target_modules(model, config.targets)]
    _attach(specs, dropout=config.dropout, key=rngs.params(), mesh=mesh, rules=rules)
    return model


def default_targets(model: CausalLM | RewardModel | RewardEnsemble) -> tuple[str, ...]:
    """Every projection the model's family can adapt, and "score" for a reward model."""
    if isinstance(model, RewardEnsemble):
        return default_targets(model.members)
    if isinstance(model, RewardModel):
        return (*family_module(model.backbone.config).LORA_TARGETS, "score")
    if isinstance(model, CausalLM):
        return tuple(family_module(model.config).LORA_TARGETS)
    raise TypeError(f"LoRA adapts a CausalLM, RewardModel or RewardEnsemble, got "
                    f"{type(model).__name__}")


def without_adapters(model: CausalLM | RewardModel | RewardEnsemble):
    """A copy of `model` without its adapters: the base model (the arrays are shared, not
    copied), for code that takes a plain model, e.g. sampling's reference log-probs."""
    model = nnx.clone(model)
    for _, dense in adapted_projections(model):
        dense.lora = None
    return model


def merge(model: CausalLM | RewardModel | RewardEnsemble):
    """A copy of `model` with each adapter folded into its kernel, W + (alpha/r) A B (computed
    in float32, stored in W's dtype), and no adapters: `save_pretrained` /
    `save_reward_model` write it as plain HF weights."""
    model = nnx.clone(model)
    for _, dense in adapted_projections(model):
        lora, kernel = dense.lora, dense.kernel[...]
        delta = jnp.matmul(lora.lora_a[...].astype(jnp.float32),
                           lora.lora_b[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST) * lora.scale  # [..., in, out]
        merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        dense.kernel.set_value(jax.device_put(merged, kernel.sharding))
        dense.lora = None
    return model


def save_adapter(model: CausalLM, path: str | os.PathLike) -> pathlib.Path:
    """Writes the adapters of a causal LM as a PEFT LoRA adapter directory; returns it.

    adapter_model.safetensors holds, per layer i and HF module m,
    "base_model.model.{m}.lora_A.weight" [r, in] and "...lora_B.weight" [out, r]
    (torch Linear layout); adapter_config.json the rank, alpha (per module where they differ:
    `rank_pattern` / `alpha_pattern`), dropout and target modules.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_adapter writes a causal LM's adapters in PEFT's CAUSAL_LM "
                        f"layout, got {type(model).__name__}; merge() a reward model instead")
    family, arch = family_module(model.config), model.arch
    blocks = getattr(model, model.BLOCKS)
    adapted = {t: _module(blocks, path).lora for t, path in family.LORA_TARGETS.items()
               if _module(blocks, path).lora is not None}
    if not adapted:
        raise ValueError("the model has no LoRA adapters to save")
    dropouts = {a.dropout for a in adapted.values()}
    if len(dropouts) > 1:
        raise ValueError(f"PEFT stores one lora_dropout; the adapters use {sorted(dropouts)}")
    tensors, ranks, alphas = {}, {}, {}
    for module in dict.fromkeys(family.PEFT_MODULES[t] for t in adapted):
        members = [t for t in family.LORA_TARGETS if family.PEFT_MODULES[t] == module]
        a, b, rank, alpha = _export_module(family, arch, [adapted.get(t) for t in members])
        for i in range(arch.num_layers):
            name = _PEFT_PREFIX + family.PEFT_LAYER.format(i) + module
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
        ranks[module], alphas[module] = rank, alpha
    # the most common (r, alpha) is the default; the other modules go into the patterns
    rank, alpha = collections.Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model.config, "_name_or_path", "") or None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropouts.pop(),
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "fan_in_fan_out": family.PEFT_FAN_IN_FAN_OUT, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(directory / ADAPTER_WEIGHTS),
                                metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def load_adapter(model: CausalLM, path: str | os.PathLike, *, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES) -> CausalLM:
    """Attaches a PEFT LoRA adapter directory (as `save_adapter` or `peft` write it) to a causal
    LM loaded from the adapter's base model; returns `model` (changed in place).

    Every tensor of the file must map to a projection alignax adapts, on every layer; rank and
    alpha follow PEFT's `r` / `lora_alpha` and their `rank_pattern` / `alpha_pattern`.

    Raises:
      FileNotFoundError: no adapter_config.json / adapter_model.safetensors.
      ValueError: a configuration alignax does not implement (DoRA, rsLoRA, LoRA biases,
        `modules_to_save`, a subset of layers), tensors it cannot place (named), a rank
        that disagrees with the config, or non-finite / non-floating tensors.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"load_adapter reads PEFT CAUSAL_LM adapters onto a CausalLM, got "
                        f"{type(model).__name__}")
    directory = pathlib.Path(path).expanduser()
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    _check_peft_config(config, directory)
    reader = SafetensorsReader(directory, single_file=ADAPTER_WEIGHTS, index_file=None)
    family, arch = family_module(model.config), model.arch
    blocks = getattr(model, model.BLOCKS)
    specs, values = [], []
    for module in dict.fromkeys(family.PEFT_MODULES.values()):
        names = [_PEFT_PREFIX + family.PEFT_LAYER.format(i) + module
                 for i in range(arch.num_layers)]
        present = [i for i, n in enumerate(names) if f"{n}.lora_A.weight" in reader.files]
        if not present:
            continue
        if len(present) != arch.num_layers:
            raise ValueError(f"the adapter has {module} on layers {present} only; alignax "
                             f"adapters span all {arch.num_layers} layers ({directory})")
        a = np.stack([reader(f"{n}.lora_A.weight").T for n in names])  # [L, in, r]
        b = np.stack([reader(f"{n}.lora_B.weight").T for n in names])  # [L, r, out]
        rank, alpha = _peft_rank_alpha(config, names, directory)
        if a.shape[-1] != rank or b.shape[-2] != rank:
            raise ValueError(f"{names[0]}: lora_A / lora_B have rank {a.shape[-1]} / "
                             f"{b.shape[-2]}, the config says r={rank} ({directory})")
        members = [t for t in family.LORA_TARGETS if family.PEFT_MODULES[t] == module]
        parts = family.split_qkv(arch, b) if len(members) > 1 else (b,)
        for target, part in zip(members, parts):
            specs.append((_module(blocks, family.LORA_TARGETS[target]), rank, alpha))
            values.append((f"{module} ({target})", a, part))
    unused = reader.unused()
    if unused:
        raise ValueError(f"adapter tensors alignax cannot place: {unused[:6]}"
                         f"{' ...' if len(unused) > 6 else ''} ({directory})")
    if not specs:
        raise ValueError(f"no LoRA tensors of a {arch.model_type} model in {directory}")
    reader.raise_if_nonfinite()
    adapters = _attach(specs, dropout=float(config.get("lora_dropout", 0.0)),
                       key=jax.random.key(0), mesh=mesh, rules=rules)
    for adapter, (module, a, b) in zip(adapters, values):
        for variable, array in ((adapter.lora_a, a), (adapter.lora_b, b)):
            if array.shape != variable.shape:
                raise ValueError(f"the adapter of {module} stacks to {array.shape}, the model "
                                 f"needs {variable.shape} ({directory})")
            variable.set_value(place(array.astype(np.float32), variable, mesh, rules))
    return model


# --------------------------------------------------------------------------- internals

def _module(root: nnx.Module, path: Sequence[str]) -> Any:
    for name in path:
        root = getattr(root, name)
    return root


def _target_modules(model, targets: Sequence[str]) -> list[tuple[str, Dense]]:
    """(target, Dense) of each named target of a CausalLM / RewardModel / RewardEnsemble."""
    if isinstance(model, RewardEnsemble):
        return _target_modules(model.members, targets)
    if isinstance(model, RewardModel):
        backbone, score = model.backbone, model.score
    elif isinstance(model, CausalLM):
        backbone, score = model, None
    else:
        raise TypeError(f"LoRA adapts a CausalLM, RewardModel or RewardEnsemble, got "
                        f"{type(model).__name__}")
    family = family_module(backbone.config)
    blocks = getattr(backbone, backbone.BLOCKS)
    out = []
    for target in targets:
        if target == "score":
            if score is None:
                raise ValueError("LoRA target 'score' is a reward model's head; a causal LM "
                                 "has none")
            out.append((target, score))
        elif target not in family.LORA_TARGETS:
            raise ValueError(f"a {backbone.arch.model_type} model has no {target!r} projection "
                             f"(its LoRA targets: {sorted(family.LORA_TARGETS)}"
                             f"{' and score' if score is not None else ''})")
        else:
            out.append((target, _module(blocks, family.LORA_TARGETS[target])))
    return out


def adapted_projections(model: nnx.Module) -> list[tuple[tuple, Dense]]:
    """(path, Dense) of every projection of `model` holding an adapter (`Dense.lora`)."""
    return [(path, node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Dense) and node.lora is not None]


def _stacked_adapter(dense: Dense, *, rank: int, alpha: float, dropout: float,
                     rngs: nnx.Rngs) -> LoRAAdapter:
    """An adapter shaped like `dense`'s kernel [*lead, in, out]: A [*lead, in, r],
    B [*lead, r, out], the lead axes (layers, members) named as the kernel's."""
    kernel = dense.kernel
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    fan_in, fan_out = kernel.shape[-2:]

    def make(rngs: nnx.Rngs) -> LoRAAdapter:
        return LoRAAdapter(fan_in, fan_out, rank=rank, alpha=alpha, dropout=dropout,
                           axes=names[-2:], rngs=rngs)

    def stack(inner: Callable, size: int, name: str | None) -> Callable:
        return lambda rngs: stacked(inner, size, rngs, name=name)

    for size, name in reversed(list(zip(kernel.shape[:-2], names[:-2]))):
        make = stack(make, size, name)
    return make(rngs)


def _attach(specs: Sequence[tuple[Dense, int, float]], *, dropout: float, key: jax.Array,
            mesh: Mesh | None, rules: Rules) -> list[LoRAAdapter]:
    """Builds one adapter per (dense, rank, alpha) (jitted, sharded on `mesh`) and sets it as
    `dense.lora`."""
    taken = [type(d).__name__ for d, _, _ in specs if d.lora is not None]
    if taken:
        raise ValueError(f"{len(taken)} target projection(s) already have a LoRA adapter")

    def build(keys):
        return nnx.List([_stacked_adapter(dense, rank=rank, alpha=alpha, dropout=dropout,
                                          rngs=nnx.Rngs(params=keys[i]))
                         for i, (dense, rank, alpha) in enumerate(specs)])

    keys = jax.random.split(key, len(specs))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(keys)))
    shardings = None if mesh is None else state_shardings(abstract, mesh, rules)
    adapters = nnx.merge(graphdef, jax.jit(lambda k: nnx.state(build(k)),
                                           out_shardings=shardings)(keys))
    for (dense, _, _), adapter in zip(specs, adapters):
        dense.lora = adapter
    return list(adapters)


def _export_module(family, arch, adapters: list[LoRAAdapter | None]):
    """One HF module's (A [L, in, R], B [L, R, out], R, alpha) from the adapters of its
    members (one member, or q/k/v of a fused module; None where a member has no adapter)."""
    present = [a for a in adapters if a is not None]
    host = [(np.asarray(jax.device_get(a.lora_a[...]), np.float32),
             np.asarray(jax.device_get(a.lora_b[...]), np.float32)) if a is not None else None
            for a in adapters]
    if len(adapters) == 1:
        (a, b), = host
        return a, b, a.shape[-1], present[0].alpha
    scales = {a.scale for a in present}
    if len(scales) > 1:
        raise ValueError(f"q/k/v adapters of a fused module need one alpha/r, got {scales}")
    a = np.concatenate([h[0] for h in host if h is not None], axis=-1)  # [L, in, R]
    rank, blocks, start = a.shape[-1], [], 0
    for adapter, h in zip(adapters, host):
        out = arch.num_heads * arch.head_dim  # q, k and v of a fused module: D each
        block = np.zeros((*a.shape[:-2], rank, out), np.float32)  # [L, R, D]
        if h is not None:
            block[..., start:start + h[0].shape[-1], :] = h[1]
            start += h[0].shape[-1]
        blocks.append(block)
    return a, family.fuse_qkv(arch, *blocks), rank, scales.pop() * rank


def _check_peft_config(config: dict, directory: pathlib.Path) -> None:
    def refuse(what):
        raise ValueError(f"the PEFT adapter in {directory} uses {what}, which alignax's LoRA "
                         "does not implement")

    if config.get("peft_type") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r} (only 'LORA' is read)")
    if config.get("use_dora"):
        refuse("DoRA (use_dora)")
    if config.get("use_rslora"):
        refuse("rank-stabilised scaling (use_rslora)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse(f"trained biases (bias={config.get('bias')!r})")
    if config.get("modules_to_save"):
        refuse(f"fully trained modules (modules_to_save={config['modules_to_save']})")
    if config.get("layers_to_transform") is not None:
        refuse("a subset of layers (layers_to_transform)")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters",
                "alora_invocation_tokens", "use_qalora", "use_bdlora"):
        if config.get(key):
            refuse(f"{key}={config[key]!r}")
    if not 0.0 <= float(config.get("lora_dropout", 0.0)) < 1.0:
        refuse(f"lora_dropout={config.get('lora_dropout')!r}")


def _peft_rank_alpha(config: dict, names: list[str], directory: pathlib.Path
                     ) -> tuple[int, float]:
    """(r, lora_alpha) of a module from PEFT's config and patterns (matched as PEFT does:
    a pattern key matches a module name that ends with "." + key, or equals it)."""
    def lookup(pattern: dict, default, name: str):
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    found = {(lookup(config.get("rank_pattern") or {}, config["r"], n),
              lookup(config.get("alpha_pattern") or {}, config["lora_alpha"], n))
             for n in names}
    if len(found) > 1:
        raise ValueError(f"{names[0]}: rank/alpha differ between layers {sorted(found)}; "
                         f"alignax adapters share them across layers ({directory})")
    rank, alpha = found.pop()
    return int(rank), float(alpha)
