"""GPT-2: learned positions, pre-norm LayerNorm blocks, fused-qkv attention, GELU MLP, tied head.

    x = wte(ids) + wpe(positions)                    [B, T, D]
    for each layer:
        x = x + attn(ln_1(x))                        c_attn [D, 3D] split into q/k/v
        x = x + c_proj(gelu(c_fc(ln_2(x))))          [B, T, F] inside
    h = ln_f(x); logits = h @ wte.T                  [B, T, V]

HF stores Conv1D weights as [in, out] (our layout): no transposes, only the q/k/v split.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.attention import Attention
from alignax.models.causal_lm import CausalLM
from alignax.models.config import ModelConfig
from alignax.models.layers import Dense, Embed, LayerNorm, activation


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.c_fc = Dense(d, f, axes=("embed", "mlp"), use_bias=True, **kw)
        self.c_proj = Dense(f, d, axes=("mlp", "embed"), use_bias=True, **kw)
        self.act = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(activation(self.act)(self.c_fc(x)))  # [B, T, F] inside


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, **kw):
        norm_kw = dict(eps=cfg.norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        scale = cfg.attn_scale / (layer_idx + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
        self.ln_1 = LayerNorm(cfg.hidden_size, **norm_kw)
        self.attn = Attention(cfg, scale=scale, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, **norm_kw)
        self.mlp = GPT2MLP(cfg, **kw)

    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        """x [B, T, D] -> ([B, T, D], updated (k, v) cache of this layer)."""
        h, cache = self.attn(self.ln_1(x), positions, mask, cache, cache_index)
        x = x + h
        x = x + self.mlp(self.ln_2(x))
        return x, cache


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        cfg = self._setup(config, dtype=dtype, param_dtype=param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                         init_std=0.01, **kw)
        self.h = nnx.List([GPT2Block(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                              use_bias=False, **kw))

    def _body(self, input_ids, positions, mask, cache, cache_index):
        x = self.wte(input_ids) + self.wpe(positions)  # [B, T, D]
        new_cache = []
        for i, block in enumerate(self.h):
            x, layer_cache = block(x, positions, mask, None if cache is None else cache[i],
                                   cache_index)
            new_cache.append(layer_cache)
        return self.ln_f(x), (None if cache is None else tuple(new_cache))

    def unembedding(self) -> jax.Array:
        if self.lm_head is None:
            return self.wte.embedding[...].T.astype(self.dtype)  # [V, D] -> [D, V]
        return self.lm_head.kernel[...].astype(self.dtype)


def params_from_hf(cfg: ModelConfig, read, keys=None):
    """Yields (our parameter path, array) from `read(hf_key) -> np.ndarray`.

    `keys` (the checkpoint's tensor names) tells the "transformer." prefix that HF's
    GPT2LMHeadModel writes from the bare names of the original hub checkpoints; None means
    prefixed.
    """
    p = "" if keys is not None and "wte.weight" in keys else "transformer."
    yield ("wte", "embedding"), read(p + "wte.weight")
    yield ("wpe", "embedding"), read(p + "wpe.weight")
    yield ("ln_f", "weight"), read(p + "ln_f.weight")
    yield ("ln_f", "bias"), read(p + "ln_f.bias")
    if not cfg.tie_word_embeddings:
        yield ("lm_head", "kernel"), read("lm_head.weight").T  # [V, D] -> [D, V]
    for i in range(cfg.num_layers):
        h = f"{p}h.{i}."
        for norm in ("ln_1", "ln_2"):
            yield ("h", i, norm, "weight"), read(f"{h}{norm}.weight")
            yield ("h", i, norm, "bias"), read(f"{h}{norm}.bias")
        kernel = read(f"{h}attn.c_attn.weight")  # [D, 3D] = [D, q | k | v]
        bias = read(f"{h}attn.c_attn.bias")  # [3D]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            yield ("h", i, "attn", name, "kernel"), np.split(kernel, 3, axis=1)[j]
            yield ("h", i, "attn", name, "bias"), np.split(bias, 3)[j]
        yield ("h", i, "attn", "o_proj", "kernel"), read(f"{h}attn.c_proj.weight")
        yield ("h", i, "attn", "o_proj", "bias"), read(f"{h}attn.c_proj.bias")
        for name in ("c_fc", "c_proj"):
            yield ("h", i, "mlp", name, "kernel"), read(f"{h}mlp.{name}.weight")
            yield ("h", i, "mlp", name, "bias"), read(f"{h}mlp.{name}.bias")


def params_to_hf(cfg: ModelConfig, params: dict[tuple, Any]) -> dict[str, Any]:
    """Our {parameter path: np.ndarray} -> {HF safetensors key: np.ndarray} (GPT2LMHeadModel)."""
    out = {"transformer.wte.weight": params[("wte", "embedding")],
           "transformer.wpe.weight": params[("wpe", "embedding")],
           "transformer.ln_f.weight": params[("ln_f", "weight")],
           "transformer.ln_f.bias": params[("ln_f", "bias")]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = params[("lm_head", "kernel")].T
    for i in range(cfg.num_layers):
        h, ours = f"transformer.h.{i}.", ("h", i)
        for norm in ("ln_1", "ln_2"):
            out[f"{h}{norm}.weight"] = params[(*ours, norm, "weight")]
            out[f"{h}{norm}.bias"] = params[(*ours, norm, "bias")]
        qkv = [(*ours, "attn", n) for n in ("q_proj", "k_proj", "v_proj")]
        out[f"{h}attn.c_attn.weight"] = np.concatenate([params[(*q, "kernel")] for q in qkv], 1)
        out[f"{h}attn.c_attn.bias"] = np.concatenate([params[(*q, "bias")] for q in qkv])
        out[f"{h}attn.c_proj.weight"] = params[(*ours, "attn", "o_proj", "kernel")]
        out[f"{h}attn.c_proj.bias"] = params[(*ours, "attn", "o_proj", "bias")]
        for name in ("c_fc", "c_proj"):
            out[f"{h}mlp.{name}.weight"] = params[(*ours, "mlp", name, "kernel")]
            out[f"{h}mlp.{name}.bias"] = params[(*ours, "mlp", name, "bias")]
    return out
