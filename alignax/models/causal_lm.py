"""`CausalLM`: what every family shares — the public forward API and KV-cache decoding.

A family subclass builds its layers in `__init__` and implements two methods:
  `_body(input_ids [B,T], positions [B,T], mask [B,T,S], cache, cache_index)`
      -> (hidden [B,T,D] after the final norm, updated per-layer (k, v) tuples or None)
  `unembedding()` -> [D, V]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alignax.models.attention import KVCache, make_mask
from alignax.models.config import ModelConfig


class HFConfig:
    """Holds the HF config as a static, hashable attribute of the module graph.

    Equal when the configs' JSON is equal (taken once, at construction), so two models loaded
    from the same checkpoint (policy and reference) share jit-compiled functions.
    """

    def __init__(self, config):
        self.value = config
        self._json = config.to_json_string(use_diff=False)

    def __hash__(self) -> int:
        return hash(self._json)

    def __eq__(self, other) -> bool:
        return isinstance(other, HFConfig) and other._json == self._json


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """positions [B, T] = cumsum(mask) - 1 (0 on leading pads): left padding keeps positions."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class CausalLM(nnx.Module):
    """Decoder-only LM. `model(input_ids, attention_mask, positions)` -> logits [B, T, V]."""

    def _setup(self, config: Any, *, dtype, param_dtype) -> ModelConfig:
        self._hf_config = HFConfig(config)
        self.arch = ModelConfig.from_hf(config)
        self.dtype = dtype
        self.param_dtype = param_dtype
        return self.arch

    @property
    def config(self):
        """The Hugging Face config this model was built from (saved back as config.json)."""
        return self._hf_config.value

    def _inputs(self, input_ids, attention_mask, positions):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}")
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(attention_mask)
        if positions.shape != input_ids.shape:
            raise ValueError(f"positions shape {positions.shape} != input_ids shape "
                             f"{input_ids.shape}")
        # Pad ids never reach the embedding (any pad value, even out of vocabulary, is inert).
        input_ids = jnp.where(attention_mask, input_ids, 0)
        return input_ids, attention_mask, positions.astype(jnp.int32)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] -> final hidden states [B, T, D] (after the last norm).

        `logits == hidden_states(...) @ unembedding()`; the trainer feeds these two to
        `alignax.logprobs.chunked_sequence_logprobs` to avoid materialising [B, T, V].
        `segment_ids` [B, T] int packs several continuations of one prefix in a row: segment 0
        is read by every token, segment j > 0 only by itself (see `make_mask`); give each
        continuation its own `positions`, counted on from the end of the prefix.
        """
        input_ids, mask, positions = self._inputs(input_ids, attention_mask, positions)
        full = make_mask(self.arch, positions, positions, mask,
                         segment_ids=segment_ids)  # [B, T, T]
        hidden, _ = self._body(input_ids, positions, full, None, None)
        return hidden

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int, attention_mask [B, T] (1 = real token), positions [B, T]
        (default cumsum(mask) - 1) -> logits [B, T, V] float32."""
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        return self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] float32 (accumulated in float32)."""
        return jnp.dot(hidden, self.unembedding(), preferred_element_type=jnp.float32)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KV cache with `max_length` slots, in the compute dtype."""
        return KVCache.empty(self.arch, batch_size=batch_size, max_length=max_length,
                             dtype=self.dtype)

    def decode(self, input_ids: jax.Array, cache: KVCache, *,
               attention_mask: jax.Array | None = None, positions: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens through the model on top of `cache`.

        Args:
          input_ids: [B, T] tokens written into slots [cache.index, cache.index + T).
          cache: from `init_cache` or a previous `decode`.
          attention_mask: [B, T], False for padding among the new tokens (default all True).
          positions: [B, T] RoPE / learned positions of the new tokens.

        Returns:
          (logits [B, T, V] float32, the updated cache).
        """
        input_ids, attention_mask, positions = self._inputs(input_ids, attention_mask, positions)
        start = (0, cache.index)
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, start)
        key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, start)
        mask = make_mask(self.arch, positions, key_positions, valid, cache.index)
        layers = tuple(zip(cache.keys, cache.values))
        hidden, layers = self._body(input_ids, positions, mask, layers, cache.index)
        cache = dataclasses.replace(
            cache, keys=tuple(kv[0] for kv in layers), values=tuple(kv[1] for kv in layers),
            valid=valid, positions=key_positions, index=cache.index + input_ids.shape[1])
        return self.logits(hidden), cache

    def unembedding(self) -> jax.Array:
        """[D, V] output projection in the compute dtype (tied models: embedding.T)."""
        raise NotImplementedError

    def _body(self, input_ids, positions, mask, cache, cache_index):
        raise NotImplementedError
