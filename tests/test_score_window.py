"""The unpacked rows' scoring window: only response positions reach the unembedding.

`role_logprobs` gathers each row's scored span (per-row offset, width T/4, T/2 or T chosen in
the program) before the unembedding. The log-probs and their gradients must equal scoring all
T positions of every row (the path before the window existed) up to float32 summation order,
for batches with varied prompt lengths whose widest response picks each of the three widths,
with spans clipped at the end of the row, and with absent group members (empty masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tiny_training import EPS, GRADIENT_RTOL, relative_errors

from alignax.data import TokenizedExample
from alignax.data.batching import collate
from alignax.logprobs import chunked_sequence_logprobs, next_token_targets
from alignax.models import create, tiny_config
from alignax.training.mesh import BATCH_AXES, make_mesh
from alignax.training.step import role_logprobs, score_windows, sharded_sequence_logprobs

VOCAB, LENGTH = 61, 32  # windows 8, 16, 32
BLOCKS = dict(chunk_size=24, vocab_chunk_size=32)  # neither divides N*W or V: shifted blocks
# A log-prob here is a sum of <= 31 same-signed token terms (condition 1), each from a dot of
# D = 64 terms and a log-sum-exp over V = 61: rounding differences of ~log2(64 * 61) eps per
# term, in a different summation order: 2^5 eps relative. Gradients: GRADIENT_RTOL.
LOGP_RTOL = 2 ** 5 * EPS


def full_rows(model, batch, roles):
    """Every position of every row through the unembedding (no window)."""
    out = {}
    for role in roles:
        ids = batch[f"{role}_input_ids"]
        flat = {k: batch[f"{role}_{k}"].reshape(-1, ids.shape[-1])
                for k in ("input_ids", "attention_mask", "loss_mask")}
        hidden = model.hidden_states(flat["input_ids"], attention_mask=flat["attention_mask"])
        targets, mask = next_token_targets(
            flat["input_ids"], flat["loss_mask"].astype(bool) & flat["attention_mask"].astype(bool))
        out[role] = chunked_sequence_logprobs(hidden, model.unembedding(), targets, mask,
                                              **BLOCKS).reshape(ids.shape[:-1])
    return out


@pytest.fixture(scope="module")
def scorers():
    graphdef, params, rest = nnx.split(create(tiny_config("llama", vocab_size=VOCAB),
                                              rngs=nnx.Rngs(0)), nnx.Param, ...)

    def make(score):
        def weighted(params, batch, weights, roles):
            logps = score(nnx.merge(graphdef, params, rest), batch, roles)
            return sum(jnp.sum(weights[r] * logps[r]) for r in roles), logps
        return jax.jit(jax.value_and_grad(weighted, has_aux=True), static_argnums=3)

    windowed = make(lambda m, b, roles: role_logprobs(m, b, roles, **BLOCKS))
    return params, windowed, make(full_rows)


def example(index, prompt, responses):
    return TokenizedExample(index=index, prompt_ids=np.asarray(prompt, np.int32),
                            responses={r: tuple(np.asarray(x, np.int32) for x in v)
                                       for r, v in responses.items()}, rewards={}, bin=None)


def batch_of(lengths, group_sizes=None, seed=0):
    """lengths: per example (prompt length, {role: [response lengths]})."""
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(1, VOCAB, n)  # noqa: E731
    examples = [example(i, draw(p), {r: [draw(n) for n in v] for r, v in rs.items()})
                for i, (p, rs) in enumerate(lengths)]
    return collate(examples, buckets=(LENGTH,), prompt_buckets=(LENGTH,), pad_token_id=0,
                   group_sizes=group_sizes)


CASES = {  # name -> (lengths, group sizes, window the widest span needs)
    # varied prompts (1..28 tokens) with short responses; 28 + 3 ends at the row's last
    # columns, so its window is clipped to end at T
    "quarter": ([(1, {"chosen": [7], "rejected": [2]}), (28, {"chosen": [3], "rejected": [4]}),
                 (13, {"chosen": [5], "rejected": [8]}), (20, {"chosen": [1], "rejected": [6]})],
                None, 8),
    "half": ([(2, {"chosen": [16], "rejected": [9]}), (17, {"chosen": [12], "rejected": [3]}),
              (25, {"chosen": [4], "rejected": [7]}), (9, {"chosen": [1], "rejected": [14]})],
             None, 16),
    "full": ([(1, {"chosen": [30], "rejected": [2]}), (24, {"chosen": [8], "rejected": [5]}),
              (5, {"chosen": [20], "rejected": [26]}), (30, {"chosen": [2], "rejected": [1]})],
             None, 32),
    # groups of 3 with absent members (empty masks) and a one-token response (empty: position
    # 0 of a response is scored from the prompt's last token, so one token is one target)
    "groups": ([(6, {"chosen": [4, 9], "rejected": [1]}), (19, {"chosen": [2], "rejected": [5, 3, 7]})],
               {"chosen": 3, "rejected": 3}, 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_windowed_logprobs_and_gradients_equal_full_rows(scorers, case):
    lengths, groups, window = CASES[case]
    batch = {k: jnp.asarray(v) for k, v in batch_of(lengths, groups).items()}
    roles = ("chosen", "rejected")
    # the widest scored span (response length) picks `window` of score_windows(T)
    span = max(int(batch[f"{r}_loss_mask"].sum(-1).max()) for r in roles)
    windows = score_windows(LENGTH)
    assert windows == (8, 16, 32) and min(w for w in windows if w >= span) == window
    rng = np.random.default_rng(1)
    weights = {r: jnp.asarray(rng.choice([-1.0, 1.0], batch[f"{r}_loss_mask"].shape[:-1]),
                              jnp.float32) for r in roles}  # mixed signs: a DPO-like gradient
    params, windowed, full = scorers
    (_, got), got_grads = windowed(params, batch, weights, roles)
    (_, want), want_grads = full(params, batch, weights, roles)
    for role in roles:
        assert np.all(np.asarray(want[role])[np.asarray(batch[f"{role}_loss_mask"].sum(-1)) > 0]
                      < 0)  # every scored row has a real (negative) log-prob
        np.testing.assert_allclose(got[role], want[role], rtol=LOGP_RTOL, atol=0)
    errors = relative_errors(got_grads, want_grads)
    assert max(errors.values()) <= GRADIENT_RTOL, errors


def test_each_batch_shard_scores_only_its_own_rows():
    """On a batch-sharded mesh the chunk loops run per shard (`sharded_sequence_logprobs`):
    the compiled program gathers no rows (without the shard_map, a dynamic slice of the
    sharded positions makes XLA all-gather them, and every device scores every chunk of the
    global batch), and values and gradients equal one program over all rows."""
    mesh = make_mesh((4, 2, 1))  # 8 batch shards
    rows, length, dim = 16, 12, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    sharded = NamedSharding(mesh, P(BATCH_AXES))
    hidden = jax.device_put(jax.random.normal(keys[0], (rows, length, dim)), sharded)
    unembedding = jax.device_put(0.3 * jax.random.normal(keys[1], (dim, VOCAB)),
                                 NamedSharding(mesh, P()))
    targets = jax.device_put(jax.random.randint(keys[2], (rows, length), 0, VOCAB), sharded)
    mask = jax.device_put(np.arange(length)[None, :] >= np.arange(rows)[:, None] % length,
                          sharded)  # row r scores its positions from r mod T on (row 0: all)
    weights = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], rows), jnp.float32)

    def loss(on_mesh):
        def weighted(hidden, unembedding):
            logps = sharded_sequence_logprobs(hidden, unembedding, targets, mask,
                                              chunk_size=8, vocab_chunk_size=32,
                                              mesh=mesh if on_mesh else None)
            return jnp.sum(weights * logps), logps
        return jax.jit(jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True))

    program = {on: loss(on).lower(hidden, unembedding).compile().as_text() for on in (0, 1)}
    assert "all-gather" in program[0] and "all-gather" not in program[1]
    (_, got), got_grads = loss(True)(hidden, unembedding)
    (_, want), want_grads = loss(False)(hidden, unembedding)
    np.testing.assert_allclose(got, want, rtol=LOGP_RTOL, atol=0)
    errors = relative_errors(got_grads, want_grads)
    assert max(errors.values()) <= GRADIENT_RTOL, errors
