"""GPT-2: learned positions, pre-norm LayerNorm blocks, fused-qkv attention, GELU MLP, tied head.

    x = wte(ids) + wpe(positions)                    [B, T, D]
    for each layer:
        x = x + attn(ln_1(x))                        c_attn [D, 3D] split into q/k/v
        x = x + c_proj(gelu(c_fc(ln_2(x))))          [B, T, F] inside
    h = ln_f(x); logits = h @ wte.T                  [B, T, V]

HF stores Conv1D weights as [in, out] (our layout): no transposes, only the q/k/v split.
The blocks' parameters are stacked [L, ...] in `h`; `scale_attn_by_inverse_layer_idx` enters
the layer scan as a per-layer scale (`CausalLM.layer_scales`).
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


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.c_fc = Dense(d, f, axes=("embed", "mlp"), use_bias=True, **kw)
        self.c_proj = Dense(f, d, axes=("mlp", "embed"), use_bias=True, **kw)
        self.act = cfg.activation

    def __call__(self, x: jax.Array, adapters: Adapters = ADAPTERS_ON) -> jax.Array:
        h = activation(self.act)(self.c_fc(x, adapters.fold(4)))  # [B, T, F]
        return self.c_proj(h, adapters.fold(5))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        norm_kw = dict(eps=cfg.norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.ln_1 = LayerNorm(cfg.hidden_size, **norm_kw)
        self.attn = Attention(cfg, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, **norm_kw)
        self.mlp = GPT2MLP(cfg, **kw)

    def __call__(self, x, positions, mask, *, scale, cache=None, cache_index=None,
                 adapters: Adapters = ADAPTERS_ON):
        """x [B, T, D] -> ([B, T, D], the updated stacked cache; None without one)."""
        h, cache = self.attn(self.ln_1(x), positions, mask, scale=scale, cache=cache,
                           cache_index=cache_index, adapters=adapters)
        x = x + h
        x = x + self.mlp(self.ln_2(x), adapters)
        return x, cache


class GPT2LMHeadModel(CausalLM):
    BLOCKS = "h"

    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        cfg = self._setup(config, dtype=dtype, param_dtype=param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                         init_std=0.01, **kw)
        self.h = stacked(lambda r: GPT2Block(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype),
                         cfg.num_layers, rngs)
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                              use_bias=False, **kw))

    def embed(self, input_ids, positions):
        return self.wte(input_ids) + self.wpe(positions)  # [B, T, D]

    def final_norm(self, x):
        return self.ln_f(x)

    def unembedding(self) -> jax.Array:
        if self.lm_head is None:
            return self.wte.embedding[...].T.astype(self.dtype)  # [V, D] -> [D, V]
        return self.lm_head.kernel[...].astype(self.dtype)


# LoRA targets (alignax.models.lora): name -> the Dense inside a block; and the PEFT module of
# each target inside HF's block "transformer.h.{i}." (q, k and v share the fused c_attn).
LORA_TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
                "o": ("attn", "o_proj"), "up": ("mlp", "c_fc"), "down": ("mlp", "c_proj")}
PEFT_LAYER = "transformer.h.{}."
PEFT_FAN_IN_FAN_OUT = True  # HF Conv1D weights are [in, out]
PEFT_MODULES = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
                "up": "mlp.c_fc", "down": "mlp.c_proj"}


def fuse_qkv(cfg: ModelConfig, q, k, v):
    """q, k, v [..., D] (output features) -> c_attn's [..., 3D] = [q | k | v]."""
    return np.concatenate([q, k, v], axis=-1)


def split_qkv(cfg: ModelConfig, fused):
    """The inverse of `fuse_qkv`: [..., 3D] -> (q, k, v) [..., D] each."""
    return tuple(np.split(fused, 3, axis=-1))


def params_from_hf(cfg: ModelConfig, read, keys=None) -> dict[tuple, Callable[[], Any]]:
    """{our parameter path: load() -> np.ndarray}, each load reading `read(hf_key)` only when
    called.

    `keys` (the checkpoint's tensor names) tells the "transformer." prefix that HF's
    GPT2LMHeadModel writes from the bare names of the original hub checkpoints; None means
    prefixed.
    """
    p = "" if keys is not None and "wte.weight" in keys else "transformer."

    def load(key: str, transform: Callable = lambda w: w) -> Callable[[], Any]:
        return lambda: transform(read(key))

    out = {("wte", "embedding"): load(p + "wte.weight"),
           ("wpe", "embedding"): load(p + "wpe.weight"),
           ("ln_f", "weight"): load(p + "ln_f.weight"),
           ("ln_f", "bias"): load(p + "ln_f.bias")}
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = load("lm_head.weight", np.transpose)  # [V, D] -> [D, V]
    for i in range(cfg.num_layers):
        h = f"{p}h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[("h", i, norm, "weight")] = load(f"{h}{norm}.weight")
            out[("h", i, norm, "bias")] = load(f"{h}{norm}.bias")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            # c_attn [D, 3D] = [D, q | k | v], bias [3D]
            out[("h", i, "attn", name, "kernel")] = load(
                f"{h}attn.c_attn.weight", lambda w, j=j: split_qkv(cfg, w)[j])
            out[("h", i, "attn", name, "bias")] = load(
                f"{h}attn.c_attn.bias", lambda w, j=j: split_qkv(cfg, w)[j])
        out[("h", i, "attn", "o_proj", "kernel")] = load(f"{h}attn.c_proj.weight")
        out[("h", i, "attn", "o_proj", "bias")] = load(f"{h}attn.c_proj.bias")
        for name in ("c_fc", "c_proj"):
            out[("h", i, "mlp", name, "kernel")] = load(f"{h}mlp.{name}.weight")
            out[("h", i, "mlp", name, "bias")] = load(f"{h}mlp.{name}.bias")
    return out


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
        out[f"{h}attn.c_attn.weight"] = fuse_qkv(cfg, *(params[(*q, "kernel")] for q in qkv))
        out[f"{h}attn.c_attn.bias"] = fuse_qkv(cfg, *(params[(*q, "bias")] for q in qkv))
        out[f"{h}attn.c_proj.weight"] = params[(*ours, "attn", "o_proj", "kernel")]
        out[f"{h}attn.c_proj.bias"] = params[(*ours, "attn", "o_proj", "bias")]
        for name in ("c_fc", "c_proj"):
            out[f"{h}mlp.{name}.weight"] = params[(*ours, "mlp", name, "kernel")]
            out[f"{h}mlp.{name}.bias"] = params[(*ours, "mlp", name, "bias")]
    return out
