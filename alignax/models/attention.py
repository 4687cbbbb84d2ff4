"""Shared causal self-attention: padding mask, explicit positions, GQA, RoPE, KV cache.

Every family calls `Attention` with an explicit boolean mask [B, T, S] (query t may read key
slot s) built once per forward by `make_mask`. Key validity comes from the attention mask
and causality from *slots* (where a token sits in the sequence or cache), while RoPE and the
sliding window use *positions* (the token's index among its row's real tokens). So a
left-padded row and the same row right-padded give the same values on their real tokens.

Shapes: B batch, T query length, S key length (T, or the cache length), H query heads,
K key/value heads (H = K * G for grouped-query attention), Dh head dim, D model dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.config import ModelConfig, RopeConfig
from alignax.models.layers import ADAPTERS_ON, Adapters, Dense


def rope_inverse_frequencies(rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] float32, incl. linear and Llama-3 rescaling."""
    dim = rope.rotary_dim
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor
                                                           - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeConfig) -> jax.Array:
    """Rotates the first `rope.rotary_dim` dims of x [B, T, N, Dh] by positions [B, T].

    The "rotate half" convention of HF Llama/NeoX: dims [0, r/2) pair with [r/2, r).
    Dims past `rotary_dim` (partial rotary, GPT-NeoX `rotary_pct`) pass through unchanged.
    """
    r = rope.rotary_dim
    inv_freq = jnp.asarray(rope_inverse_frequencies(rope))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, r]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rot, rest = x[..., :r].astype(jnp.float32), x[..., r:]
    half = jnp.concatenate([-rot[..., r // 2:], rot[..., : r // 2]], axis=-1)
    rot = (rot * cos + half * sin).astype(x.dtype)
    return jnp.concatenate([rot, rest], axis=-1) if r < x.shape[-1] else rot


QUERY_BLOCK, MAX_QUERY_BLOCKS = 64, 8


def query_blocks(length: int, *, cached: bool) -> list[tuple[int, int]]:
    """Query ranges [t0, t1) attended one at a time: blocks of at least QUERY_BLOCK rows, at
    most MAX_QUERY_BLOCKS of them (compile time grows with their number); one block when
    decoding on a cache, whose queries may read every slot.

    >>> query_blocks(192, cached=False)
    [(0, 64), (64, 128), (128, 192)]
    >>> len(query_blocks(4096, cached=False)), query_blocks(100, cached=True)
    (8, [(0, 100)])
    """
    if cached or length <= QUERY_BLOCK:
        return [(0, length)]
    size = max(QUERY_BLOCK, -(-length // MAX_QUERY_BLOCKS))
    return [(t0, min(t0 + size, length)) for t0 in range(0, length, size)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for slots [0, S), plus which slots hold real tokens.

    keys, values: [L, B, K, S, Dh], stacked over the layers like the layer parameters and
    laid out as attention reads them (the layer scan carries them and writes each layer's new
    entries in place). valid [B, S] bool, positions [B, S] int32 (RoPE position of the token
    in each slot), index: scalar int32, the next slot to write. Decoding writes T new tokens
    into slots [index, index + T).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, *, batch_size: int, max_length: int, dtype) -> KVCache:
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch_size, max_length), bool),
                   positions=jnp.zeros((batch_size, max_length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def make_mask(cfg: ModelConfig, query_positions: jax.Array, key_positions: jax.Array,
              key_valid: jax.Array, query_slot_offset: jax.Array | int = 0,
              segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean mask [B, T, S]: key slot s is real, not after the query, inside the window,
    and (with `segment_ids`) in the query's segment or the shared segment 0.

    Args:
      query_positions: [B, T] RoPE positions of the queries.
      key_positions: [B, S] positions of the keys (== query_positions without a cache).
      key_valid: [B, S] bool, False on padding.
      query_slot_offset: slot of the first query (the cache index; 0 without a cache).
      segment_ids: optional [B, T] int for a packed row without a cache (T == S): 0 marks a
        shared prefix every token may read, j > 0 a continuation that reads only segments 0
        and j, so several responses can follow one copy of their prompt.
    """
    t, s = query_positions.shape[1], key_positions.shape[1]
    q_slot = query_slot_offset + jnp.arange(t)  # [T]
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    mask = causal[None] & key_valid[:, None, :]  # [B, T, S]
    if cfg.sliding_window is not None:
        # HF Mistral: key k is visible to query q when q - k < sliding_window.
        distance = query_positions[:, :, None] - key_positions[:, None, :]
        mask = mask & (distance < cfg.sliding_window)
    if segment_ids is not None:
        if segment_ids.shape != (key_valid.shape[0], t) or t != s:
            raise ValueError(f"segment_ids {segment_ids.shape} must be [B, T] = "
                             f"{(key_valid.shape[0], t)} for a mask without a cache")
        keys = segment_ids[:, None, :]  # [B, 1, S]
        mask = mask & ((keys == 0) | (keys == segment_ids[:, :, None]))
    return mask


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with optional RoPE and KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(d, h * dh, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense(d, k * dh, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense(d, k * dh, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense(h * dh, d, axes=("heads", "embed"), use_bias=cfg.out_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, dh
        self.rope = cfg.rope
        self.dtype = dtype

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
                 scale: jax.Array | float,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | None = None,
                 adapters: Adapters = ADAPTERS_ON
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D], positions [B, T], mask [B, T, S] -> ([B, T, D], updated cache).

        `scale` multiplies the scores (a layer-dependent scalar for GPT-2's
        `scale_attn_by_inverse_layer_idx`). With `cache` = (keys, values, layer): every
        layer's keys / values [L, B, K, S, Dh] and this layer's index, the T new keys / values
        are first written at slots [cache_index, cache_index + T) of this layer, then the
        queries attend over all S slots of it (the mask hides empty ones); returns the updated
        (keys, values). Writing before reading lets XLA update the scan-carried arrays in
        place; reading first made it copy the whole cache at every layer.
        """
        b, t, _ = x.shape
        h, k, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x, adapters.fold(0)).reshape(b, t, h, dh)  # [B, T, H*Dh] -> [B, T, H, Dh]
        key = self.k_proj(x, adapters.fold(1)).reshape(b, t, k, dh)  # [B, T, K, Dh]
        value = self.v_proj(x, adapters.fold(2)).reshape(b, t, k, dh)  # [B, T, K, Dh]
        if self.rope is not None:
            q = apply_rope(q, positions, self.rope)
            key = apply_rope(key, positions, self.rope)
        key = key.transpose(0, 2, 1, 3)  # [B, T, K, Dh] -> [B, K, T, Dh]
        value = value.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        updated = None
        if cache is not None:
            keys, values, layer = cache  # [L, B, K, S, Dh] each
            start = (layer, 0, 0, cache_index, 0)
            keys = jax.lax.dynamic_update_slice(keys, key.astype(keys.dtype)[None], start)
            values = jax.lax.dynamic_update_slice(values, value.astype(values.dtype)[None], start)
            updated = (keys, values)
            key = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False)  # [B, K, S, Dh]
            value = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False)
        # Grouped-query attention as 4-D batched matmuls over (B, K), the G query heads of a
        # KV head stacked along the rows (row t * G + g): XLA:CPU differentiates these about
        # twice as fast as 5-D "btkgd,bskd->bkgts" einsums (benchmarks/trl_dpo.py).
        g, s = h // k, key.shape[2]
        q = q.reshape(b, t, k, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, dh)
        key = key.astype(q.dtype)
        value = value.astype(self.dtype)
        outs = []
        for t0, t1 in query_blocks(t, cached=cache is not None):
            # Block-causal: without a cache, query slot t reads no key slot after t, so the
            # queries [t0, t1) need keys [0, t1) only and the rest of the scores is never formed.
            end = s if cache is not None else t1
            scores = jnp.einsum("bkqd,bksd->bkqs", q[:, :, t0 * g:t1 * g], key[:, :, :end],
                                preferred_element_type=jnp.float32) * scale
            rows = jnp.broadcast_to(mask[:, None, t0:t1, None, :end],
                                    (b, 1, t1 - t0, g, end)).reshape(b, 1, (t1 - t0) * g, end)
            scores = jnp.where(rows, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, K, (t1-t0)*G, end]
            outs.append(jnp.einsum("bkqs,bksd->bkqd", probs, value[:, :, :end]))
        out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]  # [B, K, T*G, Dh]
        out = out.reshape(b, k, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h * dh)
        return self.o_proj(out, adapters.fold(3)), updated
