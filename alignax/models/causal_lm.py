"""`CausalLM`: what every family shares — the public forward API, the layer scan and KV-cache
decoding.

A family subclass builds its layers once with stacked parameters [L, ...]
(`alignax.models.layers.stacked`) in the attribute named by `BLOCKS`, and implements
  `embed(input_ids [B,T], positions [B,T])` -> x [B,T,D]
  `final_norm(x [B,T,D])` -> [B,T,D]
  `unembedding()` -> [D, V]
Its block is called as `block(x, positions, mask, scale=, cache=, cache_index=, adapters=)`
-> (x [B,T,D], the updated stacked (keys, values) [L,B,K,S,Dh], or None without a cache).

    x = embed(ids)
    x, cache = scan(block, (x, cache), over layer l: (params[l], scale[l]))   one traced layer
    h = final_norm(x)

The layers run under one `jax.lax.scan`, so the program holds one layer whatever the depth
(compile time does not grow with it), and each layer can be rematerialised on its own
(`alignax.models.remat`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.attention import KVCache, make_mask
from alignax.models.config import ModelConfig
from alignax.models.layers import Adapters
from alignax.models.remat import checkpoint_layer


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

    BLOCKS = "layers"  # attribute holding the stacked layers (GPT-2: "h")

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
                      segment_ids: jax.Array | None = None, *, remat: str | None = None,
                      adapters: bool = True, dropout_key: jax.Array | None = None
                      ) -> jax.Array:
        """input_ids [B, T] -> final hidden states [B, T, D] (after the last norm).

        `logits == hidden_states(...) @ unembedding()`; the trainer feeds these two to
        `alignax.logprobs.chunked_sequence_logprobs` to avoid materialising [B, T, V].
        `segment_ids` [B, T] int packs several continuations of one prefix in a row: segment 0
        is read by every token, segment j > 0 only by itself (see `make_mask`); give each
        continuation its own `positions`, counted on from the end of the prefix.

        Args:
          remat: per-layer rematerialisation policy for the backward pass: None, "dots",
            "full" or "offload" (`alignax.models.remat`); the values are the same.
          adapters: False runs the base model without its LoRA adapters (the reference of
            a LoRA policy; `alignax.models.lora`); no effect on a model without adapters.
          dropout_key: PRNG key for LoRA dropout (training); None applies no dropout.
        """
        input_ids, mask, positions = self._inputs(input_ids, attention_mask, positions)
        full = make_mask(self.arch, positions, positions, mask,
                         segment_ids=segment_ids)  # [B, T, T]
        x = self.embed(input_ids, positions)  # [B, T, D]
        x, _ = self._layers(x, positions, full, remat=remat,
                            adapters=Adapters(enabled=adapters, key=dropout_key))
        return self.final_norm(x)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, remat: str | None = None,
                 adapters: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int, attention_mask [B, T] (1 = real token), positions [B, T]
        (default cumsum(mask) - 1) -> logits [B, T, V] float32. Keywords as `hidden_states`."""
        hidden = self.hidden_states(input_ids, attention_mask, positions, remat=remat,
                                    adapters=adapters, dropout_key=dropout_key)
        return self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] float32 (accumulated in float32)."""
        return jnp.dot(hidden, self.unembedding(), preferred_element_type=jnp.float32)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KV cache with `max_length` slots, in the compute dtype."""
        return KVCache.empty(self.arch, batch_size=batch_size, max_length=max_length,
                             dtype=self.dtype)

    def decode(self, input_ids: jax.Array, cache: KVCache, *,
               attention_mask: jax.Array | None = None, positions: jax.Array,
               adapters: bool = True) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens through the model on top of `cache`.

        Args:
          input_ids: [B, T] tokens written into slots [cache.index, cache.index + T).
          cache: from `init_cache` or a previous `decode`.
          attention_mask: [B, T], False for padding among the new tokens (default all True).
          positions: [B, T] RoPE / learned positions of the new tokens.
          adapters: False decodes with the LoRA adapters switched off.

        Returns:
          (logits [B, T, V] float32, the updated cache).
        """
        input_ids, attention_mask, positions = self._inputs(input_ids, attention_mask, positions)
        start = (0, cache.index)
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, start)
        key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, start)
        mask = make_mask(self.arch, positions, key_positions, valid, cache.index)
        x = self.embed(input_ids, positions)
        x, (keys, values) = self._layers(x, positions, mask, cache=(cache.keys, cache.values),
                                         cache_index=cache.index,
                                         adapters=Adapters(enabled=adapters))
        cache = dataclasses.replace(cache, keys=keys, values=values, valid=valid,
                                    positions=key_positions,
                                    index=cache.index + input_ids.shape[1])
        return self.logits(self.final_norm(x)), cache

    def layer_scales(self) -> np.ndarray:
        """[L] float32 attention score scale of each layer (GPT-2's
        `scale_attn_by_inverse_layer_idx` divides layer l's by l + 1)."""
        cfg = self.arch
        divisor = (np.arange(1, cfg.num_layers + 1, dtype=np.float64)
                   if cfg.scale_attn_by_inverse_layer_idx else np.ones(cfg.num_layers))
        return (cfg.attn_scale / divisor).astype(np.float32)

    def _layers(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
                cache: tuple[jax.Array, jax.Array] | None = None,
                cache_index: jax.Array | None = None, remat: str | None = None,
                adapters: Adapters = Adapters()):
        """x [B, T, D] through every layer under one scan over the stacked parameters.

        With `cache` = (keys, values) [L, B, K, S, Dh], the scan carries them and layer l
        writes its T new entries at `cache_index` of its slice, in place (see `Attention`).
        Returns (x [B, T, D], the updated (keys, values), or None without a cache).
        """
        graphdef, stacked = nnx.split(getattr(self, self.BLOCKS))
        scales = jnp.asarray(self.layer_scales())  # [L]
        index = jnp.arange(self.arch.num_layers, dtype=jnp.int32)  # [L]

        def layer(carry, xs):
            x, kv = carry
            params, scale, i = xs
            block = nnx.merge(graphdef, params)
            x, kv = block(x, positions, mask, scale=scale,
                          cache=None if kv is None else (*kv, i),
                          cache_index=cache_index, adapters=adapters.fold(i))
            return (x, kv), None

        (x, cache), _ = jax.lax.scan(checkpoint_layer(layer, remat), (x, cache),
                                     (stacked, scales, index))
        return x, cache

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """ids [B, T], positions [B, T] -> x [B, T, D] (token + learned position embeddings)."""
        raise NotImplementedError

    def final_norm(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def unembedding(self) -> jax.Array:
        """[D, V] output projection in the compute dtype (tied models: embedding.T)."""
        raise NotImplementedError
