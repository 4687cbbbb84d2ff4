"""The layer scan: one traced layer for any depth, per-layer remat policies, the stacked KV cache.

HF parity of the scanned models (every family, padded batches, GPT-2's per-layer attention
scale) is in test_models.py; greedy decoding against HF `generate` in test_generate.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import alignax.models as am
from alignax.models.remat import check_remat

VOCAB, B, T = 97, 4, 96


@pytest.fixture(scope="module")
def model():
    config = am.tiny_config("llama", vocab_size=VOCAB, num_hidden_layers=3)
    return am.create(config, rngs=nnx.Rngs(0))


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    mask = (np.arange(T)[None] >= np.array([0, 5, 17, 40])[:, None]).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def loss(params, graphdef, ids, mask, remat):
    """Mean next-token log-likelihood of the real tokens."""
    model = nnx.merge(graphdef, params)
    logits = model(ids, mask, remat=remat)  # [B, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    real = mask[:, 1:] * mask[:, :-1]
    return -jnp.sum(token * real) / jnp.sum(real)


@pytest.fixture(scope="module")
def compiled(model):
    """remat -> (XLA temp bytes, (loss, gradients)) of one compiled value-and-grad."""
    graphdef, params = nnx.split(model)
    ids, mask = batch()
    out = {}
    for remat in (None, "dots", "full"):
        step = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 4)).lower(
            params, graphdef, ids, mask, remat).compile()
        out[remat] = (step.memory_analysis().temp_size_in_bytes, step(params, ids, mask))
    return out


def test_layers_run_under_one_scan_of_the_depth(model):
    ids, mask = batch()
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p).hidden_states(ids, mask))(params)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [3]
    assert model.layers.mlp.up_proj.kernel.shape == (3, 64, 172)


def test_remat_policies_give_the_same_loss_and_gradients(compiled):
    value, grads = compiled[None][1]
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for remat in ("dots", "full"):
        other_value, other_grads = compiled[remat][1]
        # recomputation runs the same float32 ops again; only XLA's fusion may reassociate
        # a few sums, a rounding-level difference (eps = 1.2e-7) per op.
        np.testing.assert_allclose(other_value, value, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)


def test_full_remat_keeps_less_than_dots_and_dots_less_than_none(compiled):
    """XLA's accounting of the live intermediates of the compiled backward pass."""
    temp = {remat: compiled[remat][0] for remat in compiled}
    assert temp["full"] < temp["dots"] < temp[None]


def test_unknown_and_unsupported_policies_are_refused(model):
    ids, mask = batch()
    with pytest.raises(ValueError, match="remat must be one of .*'everything'"):
        model.hidden_states(ids, mask, remat="everything")
    with pytest.raises(ValueError, match="'cpu' backend .*use remat='dots'"):
        check_remat("offload", backend="cpu")
    for backend in ("gpu", "tpu"):
        check_remat("offload", backend=backend)  # accepted where host offloading exists
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="remat='offload'"):
            model.hidden_states(ids, mask, remat="offload")


def test_stacked_cache_decodes_in_chunks_like_one_forward(model):
    ids, mask = batch()
    ids, mask = ids[:, :24], jnp.ones((B, 24), jnp.int32)
    full = nnx.jit(lambda m, i: m(i))(model, ids)  # [B, 24, V]
    cache = model.init_cache(B, 32)
    assert cache.keys.shape == (3, B, 2, 32, 16)  # [L, B, K, S, Dh]
    decode = nnx.jit(lambda m, i, c, p: m.decode(i, c, positions=p))
    positions = jnp.broadcast_to(jnp.arange(24), (B, 24))
    first, cache = decode(model, ids[:, :10], cache, positions[:, :10])
    second, cache = decode(model, ids[:, 10:], cache, positions[:, 10:])
    assert int(cache.index) == 24
    assert not bool(cache.valid[:, 24:].any()) and bool(cache.valid[:, :24].all())
    chunked = np.concatenate([first, second], axis=1)
    np.testing.assert_allclose(chunked, full, atol=2e-5, rtol=0)
