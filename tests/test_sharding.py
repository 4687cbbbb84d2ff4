"""Sharded == single-device training on 8 simulated CPU devices (conftest sets them up).

For each mesh (data, fsdp, tensor) in (8,1,1), (2,4,1), (2,2,2) the same tiny Llama is trained
3 DPO steps of plain SGD on the same batch; each step's loss and gradient must equal the
single-device run's to GRADIENT_RTOL (2^7 float32 eps per parameter tensor, in norm: see
tests/tiny_training.py), the state must stay laid out as declared, and the step must be traced
once (`chex.assert_max_traces`). Every objective on every mesh: tests/test_parity.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tiny_training import GRADIENT_RTOL, relative_errors, tiny_step

from alignax.models import tiny_config
from alignax.training.mesh import batch_sharding, global_batch, make_mesh

VOCAB, BATCH, LENGTH, STEPS = 64, 8, 16, 3
CONFIG = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1)


def pair_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """A pair batch of random tokens: prompts of 6 tokens, responses up to the end, some padding."""
    rng = np.random.default_rng(seed)
    batch = {}
    for role in ("chosen", "rejected"):
        lengths = rng.integers(10, LENGTH + 1, BATCH)
        attention = np.arange(LENGTH)[None, :] < lengths[:, None]
        batch[f"{role}_input_ids"] = np.where(attention, rng.integers(1, VOCAB, (BATCH, LENGTH)),
                                              0).astype(np.int32)
        batch[f"{role}_attention_mask"] = attention.astype(np.int32)
        batch[f"{role}_loss_mask"] = attention & (np.arange(LENGTH)[None, :] >= 6)
    return batch


def train(shape):
    """3 steps on a mesh of `shape`: (losses, gradients per step, final state, shardings)."""
    mesh = make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    step, state, shardings, reference = tiny_step(mesh, CONFIG, max_traces=1)
    batch = global_batch(pair_batch(), mesh)
    losses, gradients = [], []
    for _ in range(STEPS):
        state, metrics = step(state, batch, reference)
        losses.append(float(metrics["loss"]))
        gradients.append(jax.device_get(state.opt_state))  # sgd_recording_gradients' state
    return losses, gradients, state, shardings


@pytest.fixture(scope="module")
def single_device():
    return train((1, 1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_matches_single_device(shape, single_device):
    losses, gradients, state, shardings = train(shape)
    ref_losses, ref_gradients, _, _ = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=GRADIENT_RTOL)
    assert ref_losses[-1] < ref_losses[0]  # the run actually trains
    for step, (got, want) in enumerate(zip(gradients, ref_gradients)):
        errors = relative_errors(got, want)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= GRADIENT_RTOL, (
            f"step {step + 1}: gradient of {worst} off by {errors[worst]:.2e} on mesh {shape}")
    # the state stays laid out as declared: parameters sharded per the logical rules
    assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                                            state.params, shardings.params)))
    if shape[2] > 1:  # tensor parallelism really splits the MLP
        gate = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                if "gate_proj" in jax.tree_util.keystr(p)][0]
        assert len({str(s.index) for s in gate.addressable_shards}) > 1


def test_batch_is_split_over_data_and_fsdp():
    mesh = make_mesh((2, 2, 2))
    array = global_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)["x"]
    assert array.sharding == batch_sharding(mesh)
    assert {shard.data.shape for shard in array.addressable_shards} == {(2, 3)}


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 4, 1))
    assert make_mesh((1, 1, 1)).devices.size == 1  # a smaller mesh takes the first devices
    with pytest.raises(ValueError, match=r"\(data, fsdp, tensor\)"):
        make_mesh((8, 1))
    assert make_mesh((2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
