"""Reward models: a causal-LM backbone + a linear `score` head read at the last real token.

    h = backbone.hidden_states(ids, mask)       [B, T, D]  (after the final norm)
    last = max{t : mask[b, t] = 1}              [B]        (right or left padding)
    r = h[b, last_b] @ score                    [B, E]     score kernel [D, E]

With one head (`num_heads=None`) the model returns [B]; with `num_heads=E` it returns [E, B],
E heads on one shared backbone (the multi-head ensemble of reward-model distillation, 004 §5).
`RewardEnsemble` holds M whole reward models with stacked parameters [M, ...] (member axis in
front of the backbone's layer axis: [M, L, ...]) and runs them in one vmapped forward ->
[M, B]. `load_reward_model` / `save_reward_model` read and write Hugging Face
`*ForSequenceClassification` checkpoints (`score.weight` [E, D], no lm_head). Both models take
the backbone's call-time keywords (`remat`, `adapters`, `dropout_key`).
"""

from __future__ import annotations

import copy
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import transformers
from flax import nnx
from jax.sharding import Mesh

from alignax.models.causal_lm import CausalLM, HFConfig
from alignax.models.config import ModelConfig
from alignax.models.layers import Adapters, Dense
from alignax.models.loading import SafetensorsReader, assign_params, resolve_checkpoint
from alignax.models.partitioning import DEFAULT_RULES, Rules, state_shardings
from alignax.models.registry import FAMILY_CLASSES, family_module
from alignax.models.saving import host_params, refuse_adapters

_SEQUENCE_CLASSIFICATION = {"llama": "LlamaForSequenceClassification",
                            "mistral": "MistralForSequenceClassification",
                            "qwen2": "Qwen2ForSequenceClassification",
                            "gpt2": "GPT2ForSequenceClassification",
                            "gpt_neox": "GPTNeoXForSequenceClassification"}


def _backbone_config(config: Any) -> Any:
    """A copy of `config` whose causal LM has no separate lm_head (a classifier has none)."""
    backbone = copy.deepcopy(config)
    backbone.tie_word_embeddings = True
    return backbone


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """[B, T] mask -> [B] int32 index of the last real token (works for left or right padding).

    >>> last_token_index(jnp.array([[1, 1, 0], [0, 1, 1]]))
    Array([1, 2], dtype=int32)
    """
    t = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(attention_mask.astype(bool), t, 0), axis=-1)


class RewardModel(nnx.Module):
    """`rm(input_ids [B, T], attention_mask [B, T]) -> [B]` float32 ([E, B] with E heads).

    Args:
      config: an HF config of a supported family (Llama/Mistral/Qwen2/GPT-2/GPT-NeoX); its
        sequence-classification form (`num_labels`) is irrelevant here, `num_heads` decides.
      rngs: draws the backbone's and the head's initial parameters.
      num_heads: None for one scalar head ([B] outputs), or E for E heads ([E, B] outputs).
      dtype, param_dtype: compute and storage dtypes of the backbone; scores are float32.
    """

    def __init__(self, config: Any, *, rngs: nnx.Rngs, num_heads: int | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if num_heads is not None and num_heads < 1:
            raise ValueError(f"num_heads must be None or >= 1, got {num_heads}")
        backbone_config = _backbone_config(config)
        family = ModelConfig.from_hf(backbone_config).family
        self.backbone: CausalLM = FAMILY_CLASSES[family](
            backbone_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self._hf_config = HFConfig(config)
        self.num_heads = num_heads
        std = float(getattr(config, "initializer_range", 0.02))
        self.score = Dense(self.backbone.arch.hidden_size, num_heads or 1, axes=("embed", None),
                           use_bias=False, rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype,
                           init_std=std, precision=jax.lax.Precision.HIGHEST)  # kernel [D, E]

    @property
    def config(self):
        """The HF config the model was built from (saved back by `save_reward_model`)."""
        return self._hf_config.value

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, remat: str | None = None,
                 adapters: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T], attention_mask [B, T] (1 = real token) -> [B] or [E, B] float32.

        remat, adapters, dropout_key: as `CausalLM.hidden_states` (the score head's adapter
        follows `adapters` too).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        hidden = self.backbone.hidden_states(input_ids, attention_mask, positions, remat=remat,
                                             adapters=adapters,
                                             dropout_key=keys[0])  # [B, T, D]
        last = last_token_index(attention_mask)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        scores = self.score(pooled.astype(jnp.float32),
                            Adapters(enabled=adapters, key=keys[1]))  # [B, E] float32
        return scores[:, 0] if self.num_heads is None else scores.T


def create_reward_model(config: Any, *, rngs: nnx.Rngs, num_heads: int | None = None,
                        dtype=jnp.float32, param_dtype=jnp.float32, mesh: Mesh | None = None,
                        rules: Rules = DEFAULT_RULES) -> RewardModel:
    """A randomly initialised RewardModel; with a mesh, parameters are created sharded."""
    key = rngs.params()

    def build(key):
        return RewardModel(config, rngs=nnx.Rngs(params=key), num_heads=num_heads, dtype=dtype,
                           param_dtype=param_dtype)

    if mesh is None:
        return build(key)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(jax.random.key(0))))
    init = jax.jit(lambda k: nnx.state(build(k)),
                   out_shardings=state_shardings(abstract, mesh, rules))
    return nnx.merge(graphdef, init(key))


def load_reward_model(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, mesh: Mesh | None = None,
                      rules: Rules = DEFAULT_RULES, revision: str | None = None,
                      check_finite: bool = True) -> RewardModel:
    """Loads an HF `*ForSequenceClassification` checkpoint (safetensors only, no remote code).

    `num_labels == 1` gives a scalar-head model ([B] outputs); `num_labels = E > 1` gives E
    heads ([E, B]). Backbone weights come from the family's HF key map; the head from
    `score.weight` [E, D] (stored transposed, [D, E]). With a mesh, each parameter is placed
    directly with its sharding.

    Raises:
      OSError / FileNotFoundError: as `alignax.models.from_pretrained`.
      ValueError: as `from_pretrained` (missing, misshapen, non-floating or non-finite
        tensors, an index pointing outside the directory), or checkpoint tensors the model
        does not use (e.g. a causal LM's lm_head: load that with `from_pretrained` instead).
    """
    directory = resolve_checkpoint(path_or_hub_id, revision=revision)
    config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    num_labels = int(getattr(config, "num_labels", 1))
    num_heads = None if num_labels == 1 else num_labels
    reader = SafetensorsReader(directory, check_finite=check_finite)
    model = nnx.eval_shape(lambda: RewardModel(config, rngs=nnx.Rngs(0), num_heads=num_heads,
                                               dtype=dtype, param_dtype=param_dtype))
    graphdef, abstract = nnx.split(model)
    backbone = family_module(model.backbone.config).params_from_hf(
        model.backbone.arch, reader, set(reader.keys()))
    sources = {("backbone", *path): load for path, load in backbone.items()}
    sources[("score", "kernel")] = lambda: reader("score.weight").T  # [E, D] -> [D, E]
    variables = dict(nnx.to_flat_state(abstract))
    assign_params(variables, sources, layers=("backbone", model.backbone.BLOCKS),
                  num_layers=model.backbone.arch.num_layers, mesh=mesh, rules=rules,
                  directory=directory)
    unused = reader.unused()
    if unused:
        raise ValueError(f"checkpoint tensors a reward model does not use: {unused[:8]} "
                         f"({directory})")
    reader.raise_if_nonfinite()
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def save_reward_model(model: RewardModel, path: str | os.PathLike) -> None:
    """Writes `model` as an HF `*ForSequenceClassification` checkpoint (config.json +
    model.safetensors) that `transformers.AutoModelForSequenceClassification` loads."""
    refuse_adapters(model)
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.num_labels = model.num_heads or 1
    config.architectures = [_SEQUENCE_CLASSIFICATION[config.model_type]]
    params = host_params(model.backbone, layers=model.backbone.BLOCKS)
    tensors = family_module(_backbone_config(config)).params_to_hf(model.backbone.arch, params)
    tensors["score.weight"] = np.asarray(jax.device_get(model.score.kernel[...])).T  # [E, D]
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(directory))


def _map_variables(state, fn):
    """Applies fn(variable) -> variable to every Variable of an nnx.State."""
    return jax.tree.map(fn, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _stack_states(states: Sequence[Any]):
    """Stacks same-structure states leaf-wise -> leaves [M, ...], with a leading (replicated)
    member axis added to each parameter's logical `out_sharding` names."""
    def stack(*variables):
        axes = variables[0].get_metadata().get("out_sharding")
        values = jnp.stack([v[...] for v in variables])  # [M, ...]
        if axes is None:
            return variables[0].replace(values)
        return variables[0].replace(values, out_sharding=(None, *axes))

    return jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))


class RewardEnsemble(nnx.Module):
    """M reward models with stacked parameters (leading axis [M]), one vmapped forward.

    `ens(input_ids [B, T], attention_mask [B, T]) -> [M, B]` ([M, E, B] with E heads).
    Build it randomly (`RewardEnsemble.create(config, num_members=M, rngs=...)`) or from
    trained or loaded models (`RewardEnsemble.stack(models)`); `member(i)` returns one
    RewardModel. Parameters keep their logical sharding names behind a replicated member axis.

    Args:
      members: a RewardModel whose every parameter has a leading member axis [M, ...].
      num_members: M.
    """

    def __init__(self, members: RewardModel, *, num_members: int):
        self.members = members
        self.num_members = num_members

    @classmethod
    def create(cls, config: Any, *, num_members: int, rngs: nnx.Rngs,
               num_heads: int | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32) -> RewardEnsemble:
        """M independently initialised reward models (one jitted, vmapped initialisation)."""
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        keys = jax.random.split(rngs.params(), num_members)  # one init key per member

        def build(key):
            return RewardModel(config, rngs=nnx.Rngs(params=key), num_heads=num_heads,
                               dtype=dtype, param_dtype=param_dtype)

        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(jax.random.key(0))))
        values = jax.jit(jax.vmap(lambda k: jax.tree.leaves(nnx.state(build(k)))))(keys)
        leaves = iter(values)  # [M, ...] each, in the abstract state's leaf order
        state = _map_variables(abstract, lambda v: v.replace(
            next(leaves), **({} if v.get_metadata().get("out_sharding") is None else
                             {"out_sharding": (None, *v.get_metadata()["out_sharding"])})))
        return cls(nnx.merge(graphdef, state), num_members=num_members)

    @classmethod
    def stack(cls, models: Sequence[RewardModel]) -> RewardEnsemble:
        """Stacks same-architecture reward models (e.g. several loaded checkpoints)."""
        if not models:
            raise ValueError("need at least one reward model to stack")
        graphdef, first = nnx.split(models[0])
        states = [first] + [nnx.state(m) for m in models[1:]]
        shapes = [jax.tree.map(jnp.shape, s) for s in states]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("reward models to stack must share one architecture and head count")
        return cls(nnx.merge(graphdef, _stack_states(states)), num_members=len(models))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, remat: str | None = None,
                 adapters: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """[B, T] inputs -> [M, B] (or [M, E, B]) float32 scores of every member.

        remat, adapters, dropout_key: as `RewardModel.__call__` (member m's dropout draws
        from `fold_in(dropout_key, m)`).
        """
        keys = (None if dropout_key is None else
                jax.vmap(lambda m: jax.random.fold_in(dropout_key, m))(
                    jnp.arange(self.num_members)))  # [M] keys

        # jax.vmap over the split state, not nnx.vmap over the module: under LoRA training
        # the adapters are traced by the gradient and the frozen base is not, a mix of trace
        # levels nnx.vmap refuses.
        graphdef, state = nnx.split(self.members)

        def forward(state, key):
            member = nnx.merge(graphdef, state)
            return member(input_ids, attention_mask, positions, remat=remat, adapters=adapters,
                          dropout_key=key)

        return jax.vmap(forward, in_axes=(0, None if keys is None else 0))(state, keys)

    def member(self, i: int) -> RewardModel:
        """Member i as a standalone RewardModel (a copy of its parameters)."""
        graphdef, state = nnx.split(self.members)

        def pick(v):
            axes = v.get_metadata().get("out_sharding")
            return v.replace(v[...][i], **({} if axes is None else {"out_sharding": axes[1:]}))

        return nnx.merge(graphdef, _map_variables(state, pick))
