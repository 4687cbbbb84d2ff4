"""Rollouts: prompts -> sampled responses -> per-token log-probs of the policy and the reference,
and the critic's values. Two jitted phases, each compiled once for a run's shapes:

    generate  prompt_ids [B, P] (left-padded), prompt_mask -> responses [B*K, N], mask [B*K, N]
              (`alignax.models.generate`, KV cache; K = samples_per_prompt, rows b*K .. b*K+K-1
              answer prompt b)
    score     -> old_logps, ref_logps, old_values [B*K, N] on the response tokens (0 elsewhere)

Response token n is predicted by the hidden state of column P - 1 + n of the concatenated
[prompt, response] row, which is also where V(s_n), the value before emitting it, is read. The
log-probs come from `chunked_token_logprobs`: never a [B, T, V] array.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from alignax.logprobs import chunked_token_logprobs
from alignax.models.generate import generate
from alignax.rl.config import PPOConfig
from alignax.rl.models import ActorCritic
from alignax.rl.rewards import sequences
from alignax.training.mesh import batch_sharding, replicated
from alignax.training.state import cast_floating

ROLLOUT_KEY, UPDATE_KEY = 0, 1
"""fold_in tags of the two purposes of each iteration's key, fold_in(root key, iteration)."""


def response_columns(x: jax.Array, prompt_length: int, num_tokens: int) -> jax.Array:
    """[B, P + N, ...] per-column array -> [B, N, ...]: the columns that predict the response."""
    return x[:, prompt_length - 1:prompt_length - 1 + num_tokens]


def score_responses(model: ActorCritic, batch: dict[str, jax.Array], *, temperature: float,
                    chunk_size: int, vocab_chunk_size: int | None, entropy: bool = True,
                    remat: str | None = None
                    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Per-token log-probs, entropies and values of the policy on the batch's responses.

    Args:
      model: the actor-critic.
      batch: "prompt_input_ids", "prompt_attention_mask" [B, P] and "response_ids",
        "response_mask" [B, N].
      temperature: the sampling temperature (the policy is softmax(logits / temperature)).
      chunk_size, vocab_chunk_size: `chunked_token_logprobs` blocks.
      entropy: also compute each position's entropy (None otherwise).
      remat: per-layer rematerialisation of the forward (`alignax.models.remat`).

    Returns:
      (logps [B, N], entropies [B, N] or None, values [B, N] or None without a critic),
      float32.
    """
    prompt_length, num_tokens = (batch["prompt_input_ids"].shape[1],
                                 batch["response_ids"].shape[1])
    ids, mask = sequences(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                          batch["response_ids"], batch["response_mask"])
    hidden, values = model.forward(ids, mask, remat=remat)  # [B, P + N, D], [B, P + N]
    hidden = response_columns(hidden, prompt_length, num_tokens)  # [B, N, D]
    if temperature != 1.0:
        hidden = hidden.astype(jnp.float32) / temperature  # logits / tau
    out = chunked_token_logprobs(
        hidden, model.policy.unembedding(), batch["response_ids"], chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size, return_entropy=entropy)
    logps, entropies = out if entropy else (out, None)
    if values is not None:
        values = response_columns(values, prompt_length, num_tokens)
    return logps, entropies, values


def reference_logprobs(policy, batch: dict[str, jax.Array], *, temperature: float,
                       chunk_size: int, vocab_chunk_size: int | None,
                       adapters: bool = True) -> jax.Array:
    """[B, N] per-token log-probs of the responses under a bare causal LM (the reference;
    adapters=False: a LoRA policy's base model)."""
    prompt_length, num_tokens = (batch["prompt_input_ids"].shape[1],
                                 batch["response_ids"].shape[1])
    ids, mask = sequences(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                          batch["response_ids"], batch["response_mask"])
    hidden = response_columns(policy.hidden_states(ids, mask, adapters=adapters),
                              prompt_length, num_tokens)
    if temperature != 1.0:
        hidden = hidden.astype(jnp.float32) / temperature
    return chunked_token_logprobs(hidden, policy.unembedding(), batch["response_ids"],
                                  chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)


def make_generate(policy_graphdef: nnx.GraphDef, policy_rest: Any, *, config: PPOConfig,
                  mesh: Mesh, param_shardings: Any, max_traces: int | None = None) -> Callable:
    """`generate(policy_params, prompt_ids, prompt_mask, root_key, iteration) -> (responses,
    mask)`, jitted with the batch sharded over ("data", "fsdp").

    The key is fold_in(fold_in(root_key, iteration), ROLLOUT_KEY), taken on device, so the
    iteration is a traced value: nothing recompiles from one iteration to the next.
    """
    rollout, dtype = config.rollout, jnp.dtype(config.compute_dtype)
    eos = rollout.eos_token_id
    eos = list(eos) if isinstance(eos, tuple) else eos

    def fn(params, prompt_ids, prompt_mask, root_key, iteration):
        key = jax.random.fold_in(jax.random.fold_in(root_key, iteration), ROLLOUT_KEY)
        if rollout.samples_per_prompt > 1:  # [B, P] -> [B*K, P], prompt b in rows bK..bK+K-1
            prompt_ids = jnp.repeat(prompt_ids, rollout.samples_per_prompt, axis=0)
            prompt_mask = jnp.repeat(prompt_mask, rollout.samples_per_prompt, axis=0)
        model = nnx.merge(policy_graphdef, cast_floating(params, dtype), policy_rest)
        return generate(model, prompt_ids, prompt_mask, key=key,
                        max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                        top_k=rollout.top_k, top_p=rollout.top_p, eos_token_id=eos,
                        pad_token_id=rollout.pad_token_id)

    if max_traces is not None:
        fn = chex.assert_max_traces(fn, n=max_traces)
    batch = batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(param_shardings, batch, batch, replicated(mesh),
                                     replicated(mesh)),
                   out_shardings=(batch, batch))


def make_score(graphdef: nnx.GraphDef, rest: Any, policy_graphdef: nnx.GraphDef,
               policy_rest: Any, *, config: PPOConfig, mesh: Mesh, param_shardings: Any,
               reference_shardings: Any, max_traces: int | None = None) -> Callable:
    """`score(params, reference_params, batch) -> {"old_logps", "ref_logps", "old_values"}`,
    each [B, N] float32 and 0 off the response mask (values 0 without a critic).

    A LoRA policy (`reference_shardings` None) is its own reference with the adapters off:
    reference_params is then None."""
    dtype = jnp.dtype(config.compute_dtype)
    blocks = dict(temperature=config.rollout.temperature, chunk_size=config.chunk_size,
                  vocab_chunk_size=config.vocab_chunk_size)

    def fn(params, reference_params, batch):
        model = nnx.merge(graphdef, cast_floating(params, dtype), rest)
        logps, _, values = score_responses(model, batch, entropy=False, **blocks)
        if reference_params is None:  # a LoRA policy: the base model is the reference
            ref_logps = reference_logprobs(model.policy, batch, adapters=False, **blocks)
        else:
            reference = nnx.merge(policy_graphdef, cast_floating(reference_params, dtype),
                                  policy_rest)
            ref_logps = reference_logprobs(reference, batch, **blocks)
        mask = batch["response_mask"]
        values = jnp.zeros_like(logps) if values is None else values
        return {"old_logps": jnp.where(mask, logps, 0.0),
                "ref_logps": jnp.where(mask, ref_logps, 0.0),
                "old_values": jnp.where(mask, values, 0.0)}

    if max_traces is not None:
        fn = chex.assert_max_traces(fn, n=max_traces)
    batch = batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(param_shardings, reference_shardings, batch),
                   out_shardings=batch)
