"""Per-token and per-sequence log-probabilities of next-token targets, in float32.

`sequence_logprobs` takes materialised logits [B, T, V]. `chunked_sequence_logprobs` takes the
final hidden states [B, T, D] and the unembedding [D, V] instead, and computes the same values
and gradients block by block, so the [B, T, V] logits (4.2 GB in float32 at B=4, T=2048,
V=128,256) never exist: only one [chunk_size, vocab_chunk_size] block of them at a time.
`chunked_token_logprobs` is the per-token form on the same machinery, optionally with each
position's entropy (what PPO needs: log-probs of sampled tokens and an entropy bonus).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from alignax._checks import check_rank, check_same_shape


def _check_integer(name: str, x) -> None:
    """Raises TypeError unless `x` holds integer token ids."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {jnp.result_type(x)}")


def _check_floating(name: str, x) -> None:
    """Raises TypeError unless `x` is a floating-point array."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def _check_chunk(name: str, value) -> None:
    """Raises ValueError unless `value` is a positive Python int (a static block size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets] per position, computed in float32.

    Args:
      logits: [B, T, V] any float dtype.
      targets: [B, T] int token ids; targets[b, t] is the token position t predicts.

    Returns:
      [B, T] float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> token_logprobs(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))  # log(1/4)
      Array([[-1.3862944, -1.3862944]], dtype=float32)
    """
    check_rank("logits", logits, 3)
    if logits.shape[:2] != jnp.shape(targets):
        raise ValueError(f"logits {logits.shape} must be [B, T, V] for targets {jnp.shape(targets)}")
    _check_integer("targets", targets)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked positions of `token_logprobs`: log pi(y|x) per sequence.

    Args:
      logits: [B, T, V].
      targets: [B, T] int.
      mask: [B, T] bool/0-1, True on the response tokens to score.

    Returns:
      [B] float32 (0 for a sequence with an empty mask).
    """
    check_same_shape(targets=targets, mask=mask)
    logps = token_logprobs(logits, targets)
    return jnp.sum(jnp.where(jnp.asarray(mask).astype(bool), logps, 0.0), axis=-1)


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifts (input ids, response mask) into next-token targets and the mask that scores them.

    The logits at position t predict the token at t + 1, so targets[:, t] = input_ids[:, t + 1]
    and mask[:, t] = loss_mask[:, t + 1]; the last column has no next token (target 0, masked).

    Args:
      input_ids: [B, T] int token ids.
      loss_mask: [B, T] bool/0-1, True on the response tokens whose log-prob is scored.

    Returns:
      (targets [B, T] int32, mask [B, T] bool).

    Examples:
      >>> import jax.numpy as jnp
      >>> targets, mask = next_token_targets(jnp.array([[5, 6, 7]]), jnp.array([[0, 1, 1]]))
      >>> targets, mask
      (Array([[6, 7, 0]], dtype=int32), Array([[ True,  True, False]], dtype=bool))
    """
    check_rank("input_ids", input_ids, 2)
    check_same_shape(input_ids=input_ids, loss_mask=loss_mask)
    _check_integer("input_ids", input_ids)
    input_ids = jnp.asarray(input_ids).astype(jnp.int32)
    loss_mask = jnp.asarray(loss_mask).astype(bool)
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))  # [B, T]: last column 0
    mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))  # [B, T]: last column False
    return targets, mask


def chunked_sequence_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                              mask: jax.Array, *, chunk_size: int,
                              vocab_chunk_size: int | None = None) -> jax.Array:
    """`sequence_logprobs(hidden @ unembedding, targets, mask)` without the [B, T, V] logits.

    The B*T positions are cut into chunks of `chunk_size` tokens and the vocabulary into chunks
    of `vocab_chunk_size` entries; only one [chunk_size, vocab_chunk_size] float32 block of
    logits exists at a time. The forward pass keeps a running log-sum-exp over vocabulary
    chunks; a custom VJP recomputes each block's softmax in the backward pass and accumulates
    d hidden and d unembedding in place, so the memory floor is the inputs, their gradients and
    one block. Values and gradients (w.r.t. `hidden` and `unembedding`) equal the naive path's
    up to float32 summation order. Where a chunk size does not divide B*T (or V), the last
    chunk is shifted back to end at the boundary and the entries the previous chunk already
    covered are masked out, which needs no padded copy of `hidden` or `unembedding`. Under an
    explicit-sharding mesh (`jax.set_mesh`) the loops run in auto sharding mode and the result
    keeps the batch sharding of `hidden`.

    Args:
      hidden: [B, T, D] final hidden states, any float dtype (each block is cast to float32).
      unembedding: [D, V] output projection, any float dtype; logits = hidden @ unembedding.
      targets: [B, T] int; targets[b, t] is the token that position t predicts.
      mask: [B, T] bool/0-1, True on the positions to score (as in `sequence_logprobs`).
      chunk_size: positions per chunk (static; clipped to B*T).
      vocab_chunk_size: vocabulary entries per chunk (static; None or >= V means all of V).
        Chunking the vocabulary also keeps the backward pass from forming a [D, V] temporary
        per chunk: each block updates its own column slice of d unembedding.

    Returns:
      [B] float32 log pi(y|x) (0 for a sequence with an empty mask).

    Raises:
      ValueError: wrong ranks, hidden/unembedding/targets/mask shapes that do not agree, or a
        chunk size that is not a positive int.
      TypeError: non-float hidden/unembedding or non-integer targets.

    Examples:
      >>> import jax.numpy as jnp
      >>> hidden, unembedding = jnp.zeros((2, 5, 3)), jnp.zeros((3, 7))  # uniform over V = 7
      >>> targets, mask = jnp.ones((2, 5), jnp.int32), jnp.array([[1, 1, 1, 0, 0]] * 2)
      >>> chunked_sequence_logprobs(hidden, unembedding, targets, mask, chunk_size=4,
      ...                           vocab_chunk_size=3)  # 3 log(1/7)
      Array([-5.8377304, -5.8377304], dtype=float32)
    """
    return _chunked_per_token(hidden, unembedding, targets, mask, chunk_size=chunk_size,
                              vocab_chunk_size=vocab_chunk_size, with_entropy=False)


def chunked_token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, *,
                           chunk_size: int, vocab_chunk_size: int | None = None,
                           return_entropy: bool = False
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`token_logprobs(hidden @ unembedding, targets)` without the [B, T, V] logits.

    The chunked machinery of `chunked_sequence_logprobs` (same blocks, same custom VJP), per
    position. With `return_entropy`, also the entropy of each position's next-token
    distribution, H = -sum_v p_v log p_v with p = softmax(hidden @ unembedding), accumulated over
    vocabulary chunks as a sum of non-negative terms (no cancellation, H >= 0 exactly) and
    differentiable: dH/dlogits = -p (log p + H), recomputed per block in the backward pass.

    Args:
      hidden: [B, T, D] final hidden states, any float dtype (divide them by a sampling
        temperature to score a tempered policy: logits / tau = (hidden / tau) @ unembedding).
      unembedding: [D, V].
      targets: [B, T] int; targets[b, t] is the token that position t predicts.
      chunk_size, vocab_chunk_size: as in `chunked_sequence_logprobs`.
      return_entropy: also return the per-position entropies (static).

    Returns:
      logps [B, T] float32, or (logps [B, T], entropies [B, T]) float32.

    Raises:
      ValueError / TypeError: as `chunked_sequence_logprobs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> hidden, unembedding = jnp.zeros((1, 2, 3)), jnp.zeros((3, 4))  # uniform over V = 4
      >>> chunked_token_logprobs(hidden, unembedding, jnp.array([[0, 3]]), chunk_size=2,
      ...                        vocab_chunk_size=3, return_entropy=True)  # log(1/4), log 4
      (Array([[-1.3862944, -1.3862944]], dtype=float32), Array([[1.3862944, 1.3862944]], dtype=float32))
    """
    return _chunked_per_token(hidden, unembedding, targets, None, chunk_size=chunk_size,
                              vocab_chunk_size=vocab_chunk_size, with_entropy=return_entropy)


def _chunked_per_token(hidden, unembedding, targets, mask, *, chunk_size, vocab_chunk_size,
                       with_entropy):
    """Validates, then runs `_chunked_token_stats` over the B*T positions.

    Returns the [B, T] log-probs (and [B, T] entropies with `with_entropy`), or, given a [B, T]
    `mask`, their masked sums over T, [B].
    """
    check_rank("hidden", hidden, 3)
    check_rank("unembedding", unembedding, 2)
    _check_floating("hidden", hidden)
    _check_floating("unembedding", unembedding)
    _check_integer("targets", targets)
    batch, length, dim = hidden.shape
    if unembedding.shape[0] != dim:
        raise ValueError(f"unembedding {unembedding.shape} must be [D, V] with D = {dim} for "
                         f"hidden {hidden.shape}")
    if (batch, length) != jnp.shape(targets):
        raise ValueError(f"targets {jnp.shape(targets)} must be [B, T] = {(batch, length)} for "
                         f"hidden {hidden.shape}")
    if mask is not None:
        check_same_shape(targets=targets, mask=mask)
    _check_chunk("chunk_size", chunk_size)
    if vocab_chunk_size is not None:
        _check_chunk("vocab_chunk_size", vocab_chunk_size)
    vocab = unembedding.shape[1]
    if vocab == 0:
        raise ValueError(f"unembedding {unembedding.shape} has an empty vocabulary")
    if batch * length == 0:
        if mask is not None:
            return jnp.zeros((batch,), jnp.float32)
        empty = jnp.zeros((batch, length), jnp.float32)
        return (empty, empty) if with_entropy else empty
    token_chunk = min(chunk_size, batch * length)
    vocab_chunk = vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)

    def chunked(hidden, unembedding, targets, *mask):
        logps, entropies = _chunked_token_stats(
            hidden.reshape(batch * length, dim), unembedding,  # [N = B*T, D]
            targets.reshape(-1).astype(jnp.int32), token_chunk, vocab_chunk, with_entropy)
        logps = logps.reshape(batch, length)  # [N] -> [B, T]
        if mask:
            return jnp.sum(jnp.where(mask[0].astype(bool), logps, 0.0), axis=-1)  # [B]
        return (logps, entropies.reshape(batch, length)) if with_entropy else logps

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types:
        # Under explicit sharding the loops' carries would need hand-written shardings; let the
        # partitioner place them instead, and give the result the batch sharding of `hidden`.
        spec = jax.typeof(hidden).sharding.spec
        rows = spec[0] if spec else None
        out = P(rows) if mask is not None else P(rows, None)
        chunked = jax.sharding.auto_axes(
            chunked, out_sharding=(out, out) if with_entropy and mask is None else out)
    masks = () if mask is None else (jnp.asarray(mask),)
    return chunked(hidden, unembedding, jnp.asarray(targets), *masks)


def _chunk_window(size: int, chunk: int, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start of chunk `index` of `size` (the last one shifted to end at `size`) and a [chunk]
    bool marking the entries no earlier chunk covered."""
    start = jnp.minimum(index * chunk, size - chunk)
    fresh = start + jnp.arange(chunk) >= index * chunk  # [chunk]
    return start, fresh


def _num_chunks(size: int, chunk: int) -> int:
    return -(-size // chunk)


def _forward(hidden, unembedding, targets, token_chunk, vocab_chunk, with_entropy):
    """Per-token log-probs [N], log-sum-exps [N] and (with_entropy, else zeros) entropies [N],
    one [token_chunk, vocab_chunk] block at a time: lse = logaddexp over vocabulary chunks (a
    running log-sum-exp), and the entropy as S = sum_v p_v (lse - l_v) over the entries seen so
    far, each term >= 0. When a chunk moves the running lse from a to a' >= a, the earlier terms
    become e^(a - a') (S + a' - a): every piece stays non-negative, so H never cancels."""
    num_tokens, vocab = hidden.shape[0], unembedding.shape[1]

    def token_step(carry, i):
        logps, lses, entropies = carry  # [N] each
        t0, _ = _chunk_window(num_tokens, token_chunk, i)
        h = lax.dynamic_slice_in_dim(hidden, t0, token_chunk).astype(jnp.float32)  # [Tc, D]
        y = lax.dynamic_slice_in_dim(targets, t0, token_chunk)  # [Tc]

        def vocab_step(inner, j):
            lse, picked, entropy = inner  # [Tc] each
            v0, fresh = _chunk_window(vocab, vocab_chunk, j)
            w = lax.dynamic_slice_in_dim(unembedding, v0, vocab_chunk, axis=1)
            logits = h @ w.astype(jnp.float32)  # [Tc, Vc]
            logits = jnp.where(fresh, logits, -jnp.inf)
            is_target = (v0 + jnp.arange(vocab_chunk) == y[:, None]) & fresh  # [Tc, Vc]
            picked = picked + jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
            new_lse = jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1))
            if with_entropy:
                gap = new_lse[:, None] - logits  # [Tc, Vc] -log p, +inf on stale entries
                block = jnp.sum(jnp.where(fresh, jnp.exp(-gap) * gap, 0.0), axis=-1)
                earlier = jnp.where(lse == -jnp.inf, 0.0,  # first chunk: nothing seen yet
                                    jnp.exp(lse - new_lse) * (entropy + (new_lse - lse)))
                entropy = earlier + block
            return (new_lse, picked, entropy), None

        init = (jnp.full((token_chunk,), -jnp.inf, jnp.float32),  # running log-sum-exp
                jnp.zeros((token_chunk,), jnp.float32),  # target logit
                jnp.zeros((token_chunk,), jnp.float32))  # running entropy
        (lse, picked, entropy), _ = lax.scan(vocab_step, init,
                                             jnp.arange(_num_chunks(vocab, vocab_chunk)))
        # Overlapping rows of a shifted last chunk are recomputed identically: plain overwrite.
        logps = lax.dynamic_update_slice_in_dim(logps, picked - lse, t0, axis=0)
        lses = lax.dynamic_update_slice_in_dim(lses, lse, t0, axis=0)
        entropies = lax.dynamic_update_slice_in_dim(entropies, entropy, t0, axis=0)
        return (logps, lses, entropies), None

    init = (jnp.zeros((num_tokens,), jnp.float32),) * 3
    (logps, lses, entropies), _ = lax.scan(token_step, init,
                                           jnp.arange(_num_chunks(num_tokens, token_chunk)))
    return logps, lses, entropies


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_token_stats(hidden, unembedding, targets, token_chunk, vocab_chunk, with_entropy):
    """[N, D], [D, V], [N] int -> (log softmax(hidden @ unembedding)[targets] [N], entropies [N]
    (zeros unless with_entropy)), float32."""
    logps, _, entropies = _forward(hidden, unembedding, targets, token_chunk, vocab_chunk,
                                   with_entropy)
    return logps, entropies


def _chunked_token_stats_fwd(hidden, unembedding, targets, token_chunk, vocab_chunk,
                             with_entropy):
    logps, lses, entropies = _forward(hidden, unembedding, targets, token_chunk, vocab_chunk,
                                      with_entropy)
    return (logps, entropies), (hidden, unembedding, targets, lses, entropies)


def _chunked_token_stats_bwd(token_chunk, vocab_chunk, with_entropy, residuals, cotangents):
    """d logp_n / d logits_n = onehot(y_n) - softmax_n and d H_n / d logits_n =
    -p_n (log p_n + H_n), recomputed per block from the saved log-sum-exp (and entropy);
    d hidden = dlogits @ W^T and d W = hidden^T @ dlogits, both accumulated into their own
    slices (no [N, V] and no per-chunk [D, V] temporary)."""
    hidden, unembedding, targets, lses, entropies = residuals
    num_tokens, vocab = hidden.shape[0], unembedding.shape[1]
    d_logps, d_entropies = (c.astype(jnp.float32) for c in cotangents)

    def token_step(carry, i):
        d_hidden, d_unembedding = carry  # [N, D], [D, V] float32
        t0, fresh_rows = _chunk_window(num_tokens, token_chunk, i)
        h = lax.dynamic_slice_in_dim(hidden, t0, token_chunk).astype(jnp.float32)  # [Tc, D]
        y = lax.dynamic_slice_in_dim(targets, t0, token_chunk)  # [Tc]
        lse = lax.dynamic_slice_in_dim(lses, t0, token_chunk)  # [Tc]
        entropy = lax.dynamic_slice_in_dim(entropies, t0, token_chunk)  # [Tc]
        # Rows a previous chunk already handled get a zero cotangent: no double counting.
        g = jnp.where(fresh_rows, lax.dynamic_slice_in_dim(d_logps, t0, token_chunk), 0.0)
        g_entropy = jnp.where(fresh_rows, lax.dynamic_slice_in_dim(d_entropies, t0, token_chunk),
                              0.0)

        def vocab_step(inner, j):
            d_h, d_w = inner  # [Tc, D], [D, V]
            v0, fresh = _chunk_window(vocab, vocab_chunk, j)
            w = lax.dynamic_slice_in_dim(unembedding, v0, vocab_chunk, axis=1).astype(jnp.float32)
            log_probs = h @ w - lse[:, None]  # [Tc, Vc] log softmax block
            probs = jnp.exp(log_probs)
            onehot = (v0 + jnp.arange(vocab_chunk) == y[:, None]).astype(jnp.float32)
            d_logits = g[:, None] * (onehot - probs)  # [Tc, Vc]
            if with_entropy:
                d_logits = d_logits - g_entropy[:, None] * probs * (log_probs + entropy[:, None])
            d_logits = jnp.where(fresh, d_logits, 0.0)
            d_h = d_h + jnp.einsum("tv,dv->td", d_logits, w)
            d_w_block = lax.dynamic_slice_in_dim(d_w, v0, vocab_chunk, axis=1)
            d_w_block = d_w_block + jnp.einsum("td,tv->dv", h, d_logits)  # [D, Vc]
            return (d_h, lax.dynamic_update_slice_in_dim(d_w, d_w_block, v0, axis=1)), None

        init = (jnp.zeros_like(h), d_unembedding)
        (d_h, d_unembedding), _ = lax.scan(vocab_step, init,
                                           jnp.arange(_num_chunks(vocab, vocab_chunk)))
        d_h = lax.dynamic_slice_in_dim(d_hidden, t0, token_chunk) + d_h  # zero on stale rows
        return (lax.dynamic_update_slice_in_dim(d_hidden, d_h, t0, axis=0), d_unembedding), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(unembedding.shape, jnp.float32))
    (d_hidden, d_unembedding), _ = lax.scan(token_step, init,
                                            jnp.arange(_num_chunks(num_tokens, token_chunk)))
    return d_hidden.astype(hidden.dtype), d_unembedding.astype(unembedding.dtype), None


_chunked_token_stats.defvjp(_chunked_token_stats_fwd, _chunked_token_stats_bwd)
