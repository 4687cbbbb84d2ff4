"""HF config -> model class, and `create` (random init, optionally sharded on a mesh)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from alignax.models import gpt2, gpt_neox, llama
from alignax.models.causal_lm import CausalLM
from alignax.models.config import ModelConfig
from alignax.models.partitioning import DEFAULT_RULES, Rules, state_shardings

# family -> module holding params_from_hf / params_to_hf, and -> model class
FAMILY_MODULES = {"llama": llama, "gpt2": gpt2, "gpt_neox": gpt_neox}
FAMILY_CLASSES = {"llama": llama.LlamaForCausalLM, "gpt2": gpt2.GPT2LMHeadModel,
                  "gpt_neox": gpt_neox.GPTNeoXForCausalLM}


def family_module(config: Any):
    """The module (llama, gpt2, gpt_neox) that implements `config`'s architecture."""
    return FAMILY_MODULES[ModelConfig.from_hf(config).family]


def create(config: Any, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
           mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> CausalLM:
    """A randomly initialised causal LM for an HF config (Llama/Mistral/Qwen2/GPT-2/GPT-NeoX).

    Args:
      config: an HF `PretrainedConfig` (e.g. from `tiny_config` or `AutoConfig`).
      rngs: parameter initialisation draws one key from `rngs.params()`; the values do not
        depend on whether a mesh is given.
      dtype: compute (activation) dtype; param_dtype: storage dtype of the parameters.
      mesh: if given, every parameter is created directly with its NamedSharding (the init
        is jitted with out_shardings): no parameter is ever gathered on one device.
      rules: logical-axis rules (`alignax.models.partitioning.DEFAULT_RULES`).
    """
    cls = FAMILY_CLASSES[ModelConfig.from_hf(config).family]
    key = rngs.params()

    def build(key):
        return cls(config, rngs=nnx.Rngs(params=key), dtype=dtype, param_dtype=param_dtype)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(jax.random.key(0))))
    shardings = None if mesh is None else state_shardings(abstract, mesh, rules)
    init = jax.jit(lambda k: nnx.state(build(k)), out_shardings=shardings)
    return nnx.merge(graphdef, init(key))
