"""Llama 2/3, Mistral and Qwen2: pre-norm RMSNorm blocks, RoPE, GQA, SwiGLU MLP.

    x = embed(ids)                                   [B, T, D]
    for each layer:
        x = x + attn(rmsnorm(x))                     q/k/v/o projections, RoPE, GQA
        x = x + down(silu(gate(rmsnorm(x))) * up(.)) [B, T, F] inside
    h = rmsnorm(x); logits = h @ lm_head             [B, T, V] (tied: embed.T)

Qwen2 adds biases to q/k/v; Llama `attention_bias` adds them to q/k/v/o; Mistral may use a
sliding window (`ModelConfig.sliding_window`). HF weight names are mapped in `hf_names`.
The blocks' parameters are stacked [L, ...] ("layers"); the HF maps here name each layer's
tensors separately (path ("layers", i, ...)), and loading / saving stack and unstack them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alignax.models.attention import Attention
from alignax.models.causal_lm import CausalLM
from alignax.models.config import ModelConfig
from alignax.models.layers import (ADAPTERS_ON, Adapters, Dense, Embed, RMSNorm, activation,
                                   stacked)


class LlamaMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); gate/up [D, F], down [F, D]."""

    def __init__(self, cfg: ModelConfig, **kw):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), use_bias=bias, **kw)
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), use_bias=bias, **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), use_bias=bias, **kw)
        self.act = cfg.activation

    def __call__(self, x: jax.Array, adapters: Adapters = ADAPTERS_ON) -> jax.Array:
        gate = activation(self.act)(self.gate_proj(x, adapters.fold(4)))  # [B, T, F]
        return self.down_proj(gate * self.up_proj(x, adapters.fold(5)), adapters.fold(6))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        norm_kw = dict(eps=cfg.norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = LlamaMLP(cfg, **kw)

    def __call__(self, x, positions, mask, *, scale, cache=None, cache_index=None,
                 adapters: Adapters = ADAPTERS_ON):
        """x [B, T, D] -> ([B, T, D], the updated stacked cache; None without one)."""
        h, cache = self.self_attn(self.input_layernorm(x), positions, mask, scale=scale,
                                cache=cache, cache_index=cache_index, adapters=adapters)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), adapters)
        return x, cache


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        cfg = self._setup(config, dtype=dtype, param_dtype=param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.layers = stacked(
            lambda r: LlamaBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype),
            cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                              use_bias=False, **kw))

    def embed(self, input_ids, positions):
        return self.embed_tokens(input_ids)  # [B, T, D]

    def final_norm(self, x):
        return self.norm(x)

    def unembedding(self) -> jax.Array:
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T.astype(self.dtype)  # [V, D] -> [D, V]
        return self.lm_head.kernel[...].astype(self.dtype)


# LoRA targets (alignax.models.lora): name -> the Dense inside a block; and the PEFT module of
# each target inside HF's layer "model.layers.{i}.".
LORA_TARGETS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"),
                "v": ("self_attn", "v_proj"), "o": ("self_attn", "o_proj"),
                "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                "down": ("mlp", "down_proj")}
PEFT_FAN_IN_FAN_OUT = False
PEFT_LAYER = "model.layers.{}."
PEFT_MODULES = {name: ".".join(path) for name, path in LORA_TARGETS.items()}


def hf_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Our parameter path -> (HF safetensors key, transpose?). torch Linear weights are
    [out, in]; our kernels are [in, out]."""
    names: dict[tuple, tuple[str, bool]] = {
        ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False),
        ("norm", "weight"): ("model.norm.weight", False),
    }
    if not cfg.tie_word_embeddings:
        names[("lm_head", "kernel")] = ("lm_head.weight", True)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names[("layers", i, "input_layernorm", "weight")] = (p + "input_layernorm.weight", False)
        names[("layers", i, "post_attention_layernorm", "weight")] = (
            p + "post_attention_layernorm.weight", False)
        projections = [("self_attn", n, cfg.qkv_bias) for n in ("q_proj", "k_proj", "v_proj")]
        projections += [("self_attn", "o_proj", cfg.out_bias)]
        projections += [("mlp", n, cfg.mlp_bias) for n in ("gate_proj", "up_proj", "down_proj")]
        for module, proj, bias in projections:
            names[("layers", i, module, proj, "kernel")] = (f"{p}{module}.{proj}.weight", True)
            if bias:
                names[("layers", i, module, proj, "bias")] = (f"{p}{module}.{proj}.bias", False)
    return names


def params_from_hf(cfg: ModelConfig, read, keys=None) -> dict[tuple, Callable[[], Any]]:
    """{our parameter path: load() -> np.ndarray}, each load reading `read(hf_key)` only when
    called; `keys`: the checkpoint's tensor names."""
    def load(key: str, transpose: bool) -> Callable[[], Any]:
        return lambda: read(key).T if transpose else read(key)

    return {path: load(key, transpose) for path, (key, transpose) in hf_names(cfg).items()}


def params_to_hf(cfg: ModelConfig, params: dict[tuple, Any]) -> dict[str, Any]:
    """Our {parameter path: np.ndarray} -> {HF safetensors key: np.ndarray}."""
    return {key: (params[path].T if transpose else params[path])
            for path, (key, transpose) in hf_names(cfg).items()}
