"""GPT-NeoX / Pythia: LayerNorm blocks, partial rotary, (optionally) parallel residual.

    x = embed_in(ids)                                           [B, T, D]
    for each layer:
        a = attn(input_layernorm(x))                            RoPE on the first rotary_pct
        parallel:   x = x + a + mlp(post_attention_layernorm(x))      of each head's dims
        sequential: x = x + a; x = x + mlp(post_attention_layernorm(x))
    h = final_layer_norm(x); logits = h @ embed_out             [B, T, V]

HF fuses q/k/v per head: query_key_value.weight is [3D, D] with rows ordered [H, (q,k,v), Dh];
we split it into separate q/k/v kernels so attention (and its sharding) is shared. The
layers' parameters are stacked [L, ...].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.attention import Attention
from alignax.models.causal_lm import CausalLM
from alignax.models.config import ModelConfig
from alignax.models.layers import (ADAPTERS_ON, Adapters, Dense, Embed, LayerNorm, activation,
                                   stacked)


class GPTNeoXMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dense_h_to_4h = Dense(d, f, axes=("embed", "mlp"), use_bias=True, **kw)
        self.dense_4h_to_h = Dense(f, d, axes=("mlp", "embed"), use_bias=True, **kw)
        self.act = cfg.activation

    def __call__(self, x: jax.Array, adapters: Adapters = ADAPTERS_ON) -> jax.Array:
        h = activation(self.act)(self.dense_h_to_4h(x, adapters.fold(4)))  # [B, T, F]
        return self.dense_4h_to_h(h, adapters.fold(5))


class GPTNeoXLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        norm_kw = dict(eps=cfg.norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.input_layernorm = LayerNorm(cfg.hidden_size, **norm_kw)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, **norm_kw)
        self.attention = Attention(cfg, **kw)
        self.mlp = GPTNeoXMLP(cfg, **kw)
        self.parallel_residual = cfg.parallel_residual

    def __call__(self, x, positions, mask, *, scale, cache=None, cache_index=None,
                 adapters: Adapters = ADAPTERS_ON):
        """x [B, T, D] -> ([B, T, D], the updated stacked cache; None without one)."""
        a, cache = self.attention(self.input_layernorm(x), positions, mask, scale=scale,
                                cache=cache, cache_index=cache_index, adapters=adapters)
        if self.parallel_residual:
            return x + a + self.mlp(self.post_attention_layernorm(x), adapters), cache
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), adapters), cache


class GPTNeoXForCausalLM(CausalLM):
    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        cfg = self._setup(config, dtype=dtype, param_dtype=param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_in = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.layers = stacked(
            lambda r: GPTNeoXLayer(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype),
            cfg.num_layers, rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,
                                          param_dtype=param_dtype)
        self.embed_out = (None if cfg.tie_word_embeddings else
                          Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                                use_bias=False, **kw))

    def embed(self, input_ids, positions):
        return self.embed_in(input_ids)  # [B, T, D]

    def final_norm(self, x):
        return self.final_layer_norm(x)

    def unembedding(self) -> jax.Array:
        if self.embed_out is None:
            return self.embed_in.embedding[...].T.astype(self.dtype)  # [V, D] -> [D, V]
        return self.embed_out.kernel[...].astype(self.dtype)


_NAMES = ("q_proj", "k_proj", "v_proj")

# LoRA targets (alignax.models.lora): name -> the Dense inside a layer; and the PEFT module of
# each target inside HF's layer "gpt_neox.layers.{i}." (q, k and v share the fused one).
LORA_TARGETS = {"q": ("attention", "q_proj"), "k": ("attention", "k_proj"),
                "v": ("attention", "v_proj"), "o": ("attention", "o_proj"),
                "up": ("mlp", "dense_h_to_4h"), "down": ("mlp", "dense_4h_to_h")}
PEFT_FAN_IN_FAN_OUT = False
PEFT_LAYER = "gpt_neox.layers.{}."
PEFT_MODULES = {"q": "attention.query_key_value", "k": "attention.query_key_value",
                "v": "attention.query_key_value", "o": "attention.dense",
                "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}


def fuse_qkv(cfg: ModelConfig, q, k, v):
    """q, k, v [..., D] (output features) -> [..., 3D] in query_key_value's [H, (q, k, v), Dh]
    order."""
    h, dh = cfg.num_heads, cfg.head_dim
    heads = [x.reshape(*x.shape[:-1], h, 1, dh) for x in (q, k, v)]
    fused = np.concatenate(heads, axis=-2)  # [..., H, 3, Dh]
    return fused.reshape(*fused.shape[:-3], 3 * h * dh)


def split_qkv(cfg: ModelConfig, fused):
    """The inverse of `fuse_qkv`: [..., 3D] -> (q, k, v) [..., D] each."""
    h, dh = cfg.num_heads, cfg.head_dim
    fused = fused.reshape(*fused.shape[:-1], h, 3, dh)
    return tuple(fused[..., j, :].reshape(*fused.shape[:-3], h * dh) for j in range(3))


def params_from_hf(cfg: ModelConfig, read, keys=None) -> dict[tuple, Callable[[], Any]]:
    """{our parameter path: load() -> np.ndarray}, each load reading `read(hf_key)` only when
    called.

    The output head is "embed_out.weight" in Pythia checkpoints and "lm_head.weight" in those
    written by transformers >= 5; `keys` (the checkpoint's tensor names) picks, None means
    "embed_out.weight".
    """
    def load(key: str, transform: Callable = lambda w: w) -> Callable[[], Any]:
        return lambda: transform(read(key))

    out = {("embed_in", "embedding"): load("gpt_neox.embed_in.weight"),
           ("final_layer_norm", "weight"): load("gpt_neox.final_layer_norm.weight"),
           ("final_layer_norm", "bias"): load("gpt_neox.final_layer_norm.bias")}
    if not cfg.tie_word_embeddings:
        head = "lm_head.weight" if keys is not None and "lm_head.weight" in keys else \
            "embed_out.weight"
        out[("embed_out", "kernel")] = load(head, np.transpose)  # [V, D] -> [D, V]
    for i in range(cfg.num_layers):
        p, ours = f"gpt_neox.layers.{i}.", ("layers", i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[(*ours, norm, "weight")] = load(f"{p}{norm}.weight")
            out[(*ours, norm, "bias")] = load(f"{p}{norm}.bias")
        for j, name in enumerate(_NAMES):
            # query_key_value [3D, D], rows [H, (q, k, v), Dh] -> q/k/v kernels [D, D]
            out[(*ours, "attention", name, "kernel")] = load(
                f"{p}attention.query_key_value.weight", lambda w, j=j: split_qkv(cfg, w.T)[j])
            if cfg.qkv_bias:
                out[(*ours, "attention", name, "bias")] = load(
                    f"{p}attention.query_key_value.bias", lambda w, j=j: split_qkv(cfg, w)[j])
        out[(*ours, "attention", "o_proj", "kernel")] = load(f"{p}attention.dense.weight",
                                                             np.transpose)
        if cfg.out_bias:
            out[(*ours, "attention", "o_proj", "bias")] = load(f"{p}attention.dense.bias")
        for name in ("dense_h_to_4h", "dense_4h_to_h"):
            out[(*ours, "mlp", name, "kernel")] = load(f"{p}mlp.{name}.weight", np.transpose)
            out[(*ours, "mlp", name, "bias")] = load(f"{p}mlp.{name}.bias")
    return out


def params_to_hf(cfg: ModelConfig, params: dict[tuple, Any]) -> dict[str, Any]:
    """Our {parameter path: np.ndarray} -> {HF safetensors key: np.ndarray} (Pythia names)."""
    out = {"gpt_neox.embed_in.weight": params[("embed_in", "embedding")],
           "gpt_neox.final_layer_norm.weight": params[("final_layer_norm", "weight")],
           "gpt_neox.final_layer_norm.bias": params[("final_layer_norm", "bias")]}
    if not cfg.tie_word_embeddings:
        out["embed_out.weight"] = params[("embed_out", "kernel")].T
    for i in range(cfg.num_layers):
        p, ours = f"gpt_neox.layers.{i}.", ("layers", i, "attention")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = params[("layers", i, norm, "weight")]
            out[f"{p}{norm}.bias"] = params[("layers", i, norm, "bias")]
        out[f"{p}attention.query_key_value.weight"] = fuse_qkv(
            cfg, *(params[(*ours, n, "kernel")] for n in _NAMES)).T  # [D, 3D] -> [3D, D]
        if cfg.qkv_bias:
            out[f"{p}attention.query_key_value.bias"] = fuse_qkv(
                cfg, *(params[(*ours, n, "bias")] for n in _NAMES))
        out[f"{p}attention.dense.weight"] = params[(*ours, "o_proj", "kernel")].T
        if cfg.out_bias:
            out[f"{p}attention.dense.bias"] = params[(*ours, "o_proj", "bias")]
        for name in ("dense_h_to_4h", "dense_4h_to_h"):
            out[f"{p}mlp.{name}.weight"] = params[("layers", i, "mlp", name, "kernel")].T
            out[f"{p}mlp.{name}.bias"] = params[("layers", i, "mlp", name, "bias")]
    return out
