"""Batched, jitted sampling with a KV cache: temperature, top-k, top-p, EOS, padded prompts.

    prefill:  decode(prompt [B, P]) into cache slots [0, P)      -> next-token logits [B, V]
    loop i:   token_i ~ filter(logits / temperature)             (argmax when temperature == 0)
              decode(token_i) into slot P + i at position len_b + i
    stop when every row has emitted EOS or after max_new_tokens.

Prompts may be left-padded (the usual layout) or right-padded: positions come from the mask
and the next-token logits are read at each row's last real token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.causal_lm import CausalLM, default_positions


def filter_logits(logits: jax.Array, *, temperature: float | jax.Array,
                  top_k: int | jax.Array | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
    """logits [B, V] -> float32 logits / temperature with tokens outside top-k / top-p at -inf.

    top-k keeps the k largest (and ties with the k-th); top-p then keeps the smallest set of
    most likely remaining tokens whose probability reaches `top_p` (at least one token): HF's
    warpers, in HF's order. `top_k` / `top_p` may be traced scalars (no recompilation per
    value); None skips the filter.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is None and top_p is None:
        return logits
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    threshold = jnp.full(logits.shape[:1] + (1,), -jnp.inf)  # [B, 1]
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, logits.shape[-1])
        threshold = jax.lax.dynamic_slice_in_dim(ordered, k - 1, 1, axis=-1)  # k-th largest
        ordered = jnp.where(ordered < threshold, -jnp.inf, ordered)
    if top_p is not None:
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better ones
        keep = mass_before < top_p  # the most likely token always has mass_before == 0
        threshold = jnp.maximum(threshold, jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1,
                                                   keepdims=True))
    return jnp.where(logits < threshold, -jnp.inf, logits)


def generate(model: CausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, *, key: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Samples continuations of a batch of prompts.

    Args:
      model: a CausalLM.
      prompt_ids: [B, P] int token ids (left-padded, or right-padded).
      prompt_mask: [B, P], 1 on real prompt tokens; every row needs at least one.
      key: PRNG key; the result is a deterministic function of it (token i uses
        `fold_in(key, i)`).
      max_new_tokens: N, the number of tokens generated per row at most.
      temperature: softmax temperature; 0 means greedy (argmax) decoding.
      top_k: keep only the k most likely tokens (None: all).
      top_p: nucleus sampling mass in (0, 1] (None: all).
      eos_token_id: one id or several; a row stops after emitting one (it is kept, mask True).
      pad_token_id: written after a row has stopped.

    Returns:
      tokens [B, N] int32 and mask [B, N] bool (True on generated tokens, EOS included).
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids [B, P] and prompt_mask [B, P] must match, got "
                         f"{prompt_ids.shape} and {prompt_mask.shape}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not isinstance(prompt_mask, jax.core.Tracer):
        empty = np.flatnonzero(~np.asarray(prompt_mask).astype(bool).any(-1))
        if empty.size:
            raise ValueError(f"prompt rows {empty.tolist()} have no real token (all padding)")
    eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).astype(int).tolist()
    sampling = (jnp.float32(temperature), jnp.int32(top_k or 0),
                jnp.float32(1.0 if top_p is None else top_p),
                jnp.asarray(eos or [-1], jnp.int32))  # -1: no token ever matches
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_ids.astype(jnp.int32), prompt_mask.astype(bool),
                     key, sampling, max_new_tokens=int(max_new_tokens),
                     pad_token_id=int(pad_token_id))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_token_id"))
def _generate(graphdef, state, prompt_ids, prompt_mask, key, sampling, *, max_new_tokens,
              pad_token_id):
    """The jitted loop. `sampling` = (temperature, top_k (0: off), top_p (1: off), EOS ids [E])
    is traced, so new values do not recompile (only a new number of EOS ids does)."""
    model: CausalLM = nnx.merge(graphdef, state)
    temperature, top_k, top_p, eos = sampling
    b, p = prompt_ids.shape
    cache = model.init_cache(b, p + max_new_tokens)
    logits, cache = model.decode(prompt_ids, cache, attention_mask=prompt_mask,
                                 positions=default_positions(prompt_mask))  # [B, P, V]
    last = jnp.max(jnp.where(prompt_mask, jnp.arange(p), 0), axis=-1)  # [B] last real token
    logits = logits[jnp.arange(b), last]  # [B, V]
    position = prompt_mask.sum(-1).astype(jnp.int32)  # [B] position of the first new token
    vocab = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)

    def sample(logits, i):
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = jax.lax.cond(  # the sort of top-k / top-p only runs when one is on
            (top_k > 0) | (top_p < 1.0),
            lambda x: filter_logits(x, temperature=t, top_k=jnp.where(top_k > 0, top_k, vocab),
                                    top_p=top_p),
            lambda x: x.astype(jnp.float32) / t, logits)
        sampled = jax.random.categorical(jax.random.fold_in(key, i), filtered)
        return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, logits, position, done, tokens, mask = carry
        token = jnp.where(done, pad_token_id, sample(logits, i))  # [B]
        tokens = tokens.at[:, i].set(token)
        mask = mask.at[:, i].set(~done)
        done = done | jnp.isin(token, eos)
        step_logits, cache = model.decode(token[:, None], cache, positions=position[:, None])
        return i + 1, cache, step_logits[:, 0], position + 1, done, tokens, mask

    init = (jnp.zeros((), jnp.int32), cache, logits, position, jnp.zeros((b,), bool),
            jnp.full((b, max_new_tokens), pad_token_id, jnp.int32),
            jnp.zeros((b, max_new_tokens), bool))
    _, _, _, _, _, tokens, mask = jax.lax.while_loop(cond, body, init)
    return tokens, mask
