"""alignax.models.reward: parity with HF torch *ForSequenceClassification, heads, ensembles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from alignax.models import tiny_config
from alignax.models.reward import (
    RewardEnsemble, RewardModel, create_reward_model, last_token_index, load_reward_model,
    save_reward_model)

V, B, T = 97, 3, 9
LENGTHS = np.array([9, 6, 2])
_rng = np.random.default_rng(0)
IDS = _rng.integers(1, V, size=(B, T)).astype(np.int32)  # 0 is the pad id, never drawn
RIGHT_MASK = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.int32)
RIGHT_IDS = np.where(RIGHT_MASK == 1, IDS, 0)
score = nnx.jit(lambda model, ids, mask: model(ids, mask))
# the training mesh (alignax.training.mesh.make_mesh): Auto axes, shardings set at jit boundaries
MESH = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _left(ids, mask):
    """Moves each row's real tokens to the end (left padding)."""
    out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b, n in enumerate(mask.sum(-1)):
        out_ids[b, T - n:], out_mask[b, T - n:] = ids[b, :n], 1
    return out_ids, out_mask


def _hf_checkpoint(tmp_path, family, num_labels, **overrides):
    config = tiny_config(family, vocab_size=V, pad_token_id=0, num_labels=num_labels, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():  # O(1) weights so that a 1e-4 gap is a real tolerance
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(torch.tensor(RIGHT_IDS, dtype=torch.long),
                       attention_mask=torch.tensor(RIGHT_MASK)).logits.numpy()  # [B, E]
    return logits


@pytest.mark.parametrize("family, num_labels, overrides", [
    ("llama", 1, {}),                          # GQA (4 heads, 2 KV heads), untied
    ("qwen2", 3, {"tie_word_embeddings": True}),  # q/k/v biases, 3 heads
    ("gpt2", 1, {}),                           # learned positions, "transformer." keys
    ("gpt_neox", 2, {}),                       # partial rotary, parallel residual, 2 heads
])
def test_parity_with_hf_sequence_classification(tmp_path, family, num_labels, overrides):
    expected = _hf_checkpoint(tmp_path, family, num_labels, **overrides)
    assert np.abs(expected).max() > 0.5
    rm = load_reward_model(tmp_path)
    got = np.asarray(score(rm, RIGHT_IDS, RIGHT_MASK))
    if num_labels == 1:
        assert got.shape == (B,)
        np.testing.assert_allclose(got, expected[:, 0], atol=1e-4, rtol=0)
    else:
        assert got.shape == (num_labels, B)
        np.testing.assert_allclose(got, expected.T, atol=1e-4, rtol=0)
    left = np.asarray(score(rm, *_left(RIGHT_IDS, RIGHT_MASK)))
    np.testing.assert_allclose(left, got, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ensemble():
    return RewardEnsemble.create(tiny_config("llama", vocab_size=V, pad_token_id=0),
                                 num_members=3, rngs=nnx.Rngs(5), num_heads=2)


def test_save_round_trips_through_hf(tmp_path, ensemble):
    rm = ensemble.member(0)
    save_reward_model(rm, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = hf(torch.tensor(RIGHT_IDS, dtype=torch.long),
                      attention_mask=torch.tensor(RIGHT_MASK)).logits.numpy().T
    np.testing.assert_allclose(score(rm, RIGHT_IDS, RIGHT_MASK), expected, atol=1e-5)
    loaded = load_reward_model(tmp_path)
    assert loaded.num_heads == 2
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded), nnx.state(rm))


def test_last_token_index_and_bad_heads():
    np.testing.assert_array_equal(last_token_index(jnp.asarray(RIGHT_MASK)), LENGTHS - 1)
    np.testing.assert_array_equal(last_token_index(jnp.asarray(_left(RIGHT_IDS, RIGHT_MASK)[1])),
                                  [T - 1] * B)
    with pytest.raises(ValueError, match="num_heads"):
        RewardModel(tiny_config("llama", vocab_size=V), rngs=nnx.Rngs(0), num_heads=0)


def test_ensemble_members_are_independent_reward_models(ensemble):
    out = np.asarray(score(ensemble, RIGHT_IDS, RIGHT_MASK))
    assert out.shape == (3, 2, B)
    members = [ensemble.member(i) for i in range(3)]
    for i, member in enumerate(members):
        np.testing.assert_allclose(score(member, RIGHT_IDS, RIGHT_MASK), out[i], atol=1e-6)
    assert not np.allclose(out[0], out[1])  # distinct initialisations
    restacked = RewardEnsemble.stack(members)
    np.testing.assert_allclose(score(restacked, RIGHT_IDS, RIGHT_MASK), out, atol=1e-6)

    def loss(model):
        return jnp.mean(model(RIGHT_IDS, RIGHT_MASK) ** 2)

    grads = nnx.jit(nnx.grad(loss))(ensemble)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert all(g.shape[0] == 3 for g in leaves)  # stacked [M, ...] parameters


def test_ensemble_member_axis_is_in_front_of_the_layer_axis(ensemble):
    kernel = ensemble.members.backbone.layers.mlp.up_proj.kernel
    assert kernel.shape == (3, 2, 64, 172)  # [M, L, D, F]
    assert kernel.get_metadata()["out_sharding"] == (None, "layers", "embed", "mlp")
    member = ensemble.member(1).backbone.layers.mlp.up_proj.kernel
    assert member.shape == (2, 64, 172)
    assert member.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


def test_ensemble_remat_keeps_scores_and_gradients(ensemble):
    def loss(model, remat):
        return jnp.mean(model(RIGHT_IDS, RIGHT_MASK, remat=remat) ** 2)

    value_and_grad = nnx.jit(nnx.value_and_grad(loss), static_argnums=1)
    (plain, grads), (full, full_grads) = (value_and_grad(ensemble, r) for r in (None, "full"))
    np.testing.assert_allclose(full, plain, rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)


def test_mesh_loading_places_shards(tmp_path):
    _hf_checkpoint(tmp_path, "llama", 1)
    sharded, plain = load_reward_model(tmp_path, mesh=MESH), load_reward_model(tmp_path)
    kernel = sharded.backbone.layers.mlp.down_proj.kernel[...]  # [L, F, D]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(sharded), nnx.state(plain))
    np.testing.assert_allclose(score(sharded, RIGHT_IDS, RIGHT_MASK),
                               score(plain, RIGHT_IDS, RIGHT_MASK), atol=1e-5)


def test_mesh_creation_shards_the_same_values():
    config = tiny_config("llama", vocab_size=V)
    sharded = create_reward_model(config, rngs=nnx.Rngs(1), mesh=MESH)
    plain = create_reward_model(config, rngs=nnx.Rngs(1))
    kernel = sharded.backbone.layers.self_attn.q_proj.kernel[...]  # [L, D, H*Dh]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert sharded.score.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    # same draws; the jitted (sharded) init may round the normal sampler's last bit differently
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 nnx.state(sharded), nnx.state(plain))


def test_causal_lm_checkpoint_is_not_a_reward_model(tmp_path):
    config = tiny_config("llama", vocab_size=V)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="score.weight"):
        load_reward_model(tmp_path)
