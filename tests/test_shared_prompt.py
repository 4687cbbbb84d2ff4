"""Shared-prompt packing: one copy of the prompt, then every response, scored in one row.

The packed layout (`alignax.data.batching`, `share_prompt=True`) must give the same per-role
log-probs as the unpacked rows for every model family (learned and rotary positions, GQA, a
sliding window), for grouped batches with absent members, and the same training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_training import GRADIENT_RTOL, relative_errors, tiny_step

from alignax.data import TokenizedExample
from alignax.data.batching import collate
from alignax.models import create, create_reward_model, tiny_config
from alignax.models.attention import make_mask
from alignax.models.config import ModelConfig
from alignax.training.mesh import global_batch, make_mesh
from alignax.objectives import DPO, BradleyTerry
from alignax.training.state import split_model
from alignax.training.step import StepConfig, packed_role_logprobs, role_logprobs

VOCAB = 61


def example(index, prompt, **responses) -> TokenizedExample:
    return TokenizedExample(index=index, prompt_ids=np.asarray(prompt, np.int32),
                            responses={r: tuple(np.asarray(x, np.int32) for x in v)
                                       for r, v in responses.items()},
                            rewards={}, bin=None)


def random_examples(n, *, seed, roles=("chosen", "rejected"), group=None):
    """Prompts of 1-9 tokens, responses of 1-8 (groups of 1..group members)."""
    rng = np.random.default_rng(seed)
    draw = lambda low, high: rng.integers(1, VOCAB, rng.integers(low, high + 1))  # noqa: E731
    out = []
    for i in range(n):
        sizes = {r: 1 if group is None else int(rng.integers(1, group + 1)) for r in roles}
        out.append(example(i, draw(1, 9), **{r: [draw(1, 8) for _ in range(k)]
                                              for r, k in sizes.items()}))
    return out


def test_packed_columns_layout_by_hand():
    ex = example(0, [5, 6, 7], rejected=[[10, 11, 12]], chosen=[[8, 9]])
    batch = collate([ex], buckets=(8, 16), prompt_buckets=(4,), pad_token_id=0,
                    share_prompt=True)
    # sorted roles: chosen (segment 1) then rejected (segment 2); L = bucket 8, R = 8
    np.testing.assert_array_equal(batch["packed_input_ids"], [[5, 6, 7, 8, 9, 10, 11, 12]])
    np.testing.assert_array_equal(batch["packed_attention_mask"], [[1] * 8])
    np.testing.assert_array_equal(batch["packed_positions"], [[0, 1, 2, 3, 4, 3, 4, 5]])
    np.testing.assert_array_equal(batch["packed_segment_ids"], [[0, 0, 0, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(batch["packed_score_index"][0, :, :3], [[2, 3, 0], [2, 5, 6]])
    np.testing.assert_array_equal(batch["packed_score_targets"][0, :, :3],
                                  [[8, 9, 0], [10, 11, 12]])
    np.testing.assert_array_equal(batch["packed_score_mask"][0],
                                  [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    # the unpacked columns are still there, unchanged
    plain = collate([ex], buckets=(8, 16), prompt_buckets=(4,), pad_token_id=0)
    for key, value in plain.items():
        np.testing.assert_array_equal(batch[key], value)


def test_packed_length_may_exceed_the_largest_row_bucket():
    ex = example(0, [1] * 6, chosen=[[2] * 10], rejected=[[3] * 10])  # rows of 16, packed 26
    batch = collate([ex], buckets=(8, 16), prompt_buckets=(8,), pad_token_id=0,
                    share_prompt=True)
    assert batch["chosen_input_ids"].shape == (1, 16)
    assert batch["packed_input_ids"].shape == (1, 32)  # L buckets 8, 12, 16, 24, 32
    assert batch["packed_score_index"].shape == (1, 2, 12)  # R buckets 8, 12, 16
    assert batch["packed_attention_mask"].sum() == 26


def test_grouped_packing_with_absent_and_empty_members():
    ex = example(0, [4, 5], chosen=[[6], [7, 8]], rejected=[[9, 9, 9]])
    batch = collate([ex], buckets=(8,), prompt_buckets=(4,), pad_token_id=0,
                    group_sizes={"chosen": 3, "rejected": 2}, share_prompt=True)
    # members: chosen 6 | chosen 7 8 | chosen (absent) | rejected 9 9 9 | rejected (absent)
    np.testing.assert_array_equal(batch["packed_segment_ids"][0, :8], [0, 0, 1, 2, 2, 4, 4, 4])
    np.testing.assert_array_equal(batch["packed_score_mask"][0].sum(-1), [1, 2, 0, 3, 0])
    np.testing.assert_array_equal(batch["packed_score_index"][0, 3, :3], [1, 5, 6])


def test_make_mask_segments_and_shape_error():
    cfg = ModelConfig.from_hf(tiny_config("llama", vocab_size=VOCAB))
    positions = jnp.array([[0, 1, 2, 2, 3]])
    segments = jnp.array([[0, 0, 1, 2, 2]])
    mask = make_mask(cfg, positions, positions, jnp.ones((1, 5), bool), segment_ids=segments)
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 0, 1, 0],   # response 2 does not read response 1
                         [1, 1, 0, 1, 1]], bool)
    np.testing.assert_array_equal(mask[0], expected)
    with pytest.raises(ValueError, match="segment_ids"):
        make_mask(cfg, positions, positions, jnp.ones((1, 5), bool), segment_ids=segments[:, :4])


FAMILIES = {
    "llama": {},
    "gpt2": {},
    "gpt_neox": {},
    "mistral-window": {"sliding_window": 4},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_logprobs_equal_unpacked(family):
    name = family.split("-")[0]
    model = create(tiny_config(name, vocab_size=VOCAB, **FAMILIES[family]), rngs=nnx.Rngs(1))
    batch = collate(random_examples(6, seed=3), buckets=(8, 16, 32), prompt_buckets=(16,),
                    pad_token_id=0, share_prompt=True)
    roles = ("chosen", "rejected")
    score = lambda f: jax.jit(lambda b: f(model, b, roles, chunk_size=16,  # noqa: E731
                                          vocab_chunk_size=32))(batch)
    plain, packed = score(role_logprobs), score(packed_role_logprobs)
    for role in roles:
        assert packed[role].shape == (6,)
        np.testing.assert_allclose(packed[role], plain[role], rtol=2e-5, atol=2e-5)


def test_packed_logprobs_equal_unpacked_for_groups():
    model = create(tiny_config("llama", vocab_size=VOCAB), rngs=nnx.Rngs(2))
    data = random_examples(5, seed=4, group=3)
    batch = collate(data, buckets=(32,), prompt_buckets=(16,), pad_token_id=0,
                    group_sizes={"chosen": 3, "rejected": 3}, share_prompt=True)
    roles = ("rejected", "chosen")
    plain = role_logprobs(model, batch, roles, chunk_size=32, vocab_chunk_size=None)
    packed = packed_role_logprobs(model, batch, roles, chunk_size=32, vocab_chunk_size=None)
    assert list(packed) == list(roles)
    for role in roles:
        assert packed[role].shape == (5, 3)
        np.testing.assert_allclose(packed[role], plain[role], rtol=2e-5, atol=2e-5)
        absent = ~batch[f"{role}_group_mask"]
        assert absent.any() and np.all(np.asarray(packed[role])[absent] == 0.0)


def test_a_response_never_sees_another():
    """Changing the chosen response leaves the packed rejected log-probs bitwise unchanged."""
    model = create(tiny_config("llama", vocab_size=VOCAB), rngs=nnx.Rngs(3))
    data = random_examples(4, seed=5)
    other = [example(ex.index, ex.prompt_ids, chosen=[(ex.responses["chosen"][0] * 7) % VOCAB],
                     rejected=ex.responses["rejected"]) for ex in data]
    score = jax.jit(lambda b: packed_role_logprobs(model, b, ("chosen", "rejected"),
                                                   chunk_size=64, vocab_chunk_size=None))
    kw = dict(buckets=(32,), prompt_buckets=(16,), pad_token_id=0, share_prompt=True)
    first, second = score(collate(data, **kw)), score(collate(other, **kw))
    np.testing.assert_array_equal(first["rejected"], second["rejected"])
    assert not np.allclose(first["chosen"], second["chosen"])


def _step(config: StepConfig, objective=DPO(beta=0.2), mesh_shape=(1, 1, 1), create_model=create):
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    step, state, _, reference = tiny_step(mesh, tiny_config("llama", vocab_size=VOCAB),
                                          step_config=config, objective=objective,
                                          create_model=create_model)
    return step, state, reference, mesh


def test_train_step_with_shared_prompt_matches_the_unpacked_step():
    """Unpacked on one device vs packed on one device and on a (2, 2, 2) mesh (batch, FSDP and
    tensor parallel: the hidden-state gather runs on batch-sharded rows), 3 SGD steps with 2
    micro-batches: the same loss and gradient at every step (tolerance: tests/tiny_training.py)."""
    batch = collate(random_examples(8, seed=6), buckets=(16, 32), prompt_buckets=(16,),
                    pad_token_id=0, share_prompt=True)
    results = {}
    for share, mesh_shape in ((False, (1, 1, 1)), (True, (1, 1, 1)), (True, (2, 2, 2))):
        step, state, reference, mesh = _step(StepConfig(chunk_size=64, share_prompt=share,
                                                        grad_accum_steps=2),
                                             mesh_shape=mesh_shape)
        losses, gradients = [], []
        for _ in range(3):
            state, metrics = step(state, global_batch(batch, mesh), reference)
            losses.append(float(metrics["loss"]))
            gradients.append(jax.device_get(state.opt_state))  # sgd_recording_gradients' state
        results[share, mesh_shape] = (losses, gradients, metrics)
    unpacked = results[False, (1, 1, 1)]
    assert unpacked[0][-1] < unpacked[0][0]  # the run actually trains
    for key in ((True, (1, 1, 1)), (True, (2, 2, 2))):
        losses, gradients, metrics = results[key]
        np.testing.assert_allclose(losses, unpacked[0], rtol=GRADIENT_RTOL)
        assert float(metrics["num_tokens"]) == float(unpacked[2]["num_tokens"])
        for got, want in zip(gradients, unpacked[1]):
            assert max(relative_errors(got, want).values()) <= GRADIENT_RTOL, key


def test_shared_prompt_errors():
    step, state, reference, _ = _step(StepConfig(share_prompt=True))
    plain = collate(random_examples(2, seed=7), buckets=(32,), prompt_buckets=(16,),
                    pad_token_id=0)
    with pytest.raises(ValueError, match="share_prompt=True"):
        step(state, plain, reference)
    with pytest.raises(ValueError, match="share_prompt packs responses for log-prob objectives"):
        _step(StepConfig(share_prompt=True), objective=BradleyTerry(),
              create_model=create_reward_model)


def test_cached_reference_logps_with_shared_prompt():
    from alignax.data import PreferenceDataset, TruncationReport
    from alignax.training.reference import compute_reference_logps

    graphdef, params, rest = split_model(create(tiny_config("llama", vocab_size=VOCAB),
                                                rngs=nnx.Rngs(4)))
    dataset = PreferenceDataset(random_examples(7, seed=8), format="standard",
                                report=TruncationReport(), pad_token_id=0, buckets=(16, 32),
                                prompt_buckets=(16,), group_sizes=None)
    tables = [compute_reference_logps(graphdef, params, dataset, ("chosen", "rejected"),
                                      batch_size=4, model_state=rest, chunk_size=64,
                                      share_prompt=share) for share in (False, True)]
    for role in ("chosen", "rejected"):
        assert tables[1][role].shape == (7,) and np.isfinite(tables[1][role]).all()
        np.testing.assert_allclose(tables[1][role], tables[0][role], rtol=2e-5, atol=2e-5)
