"""alignax.data iterator: seeded shuffling, epochs, exact save/restore, sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignax.data import default_tokenizer, prepare_dataset

TOK = default_tokenizer()
RECORDS = [{"prompt": f"Question {i}?", "chosen": " yes" * (1 + i % 7), "rejected": " no"}
           for i in range(23)]
DATASET = prepare_dataset(RECORDS, TOK, max_length=64)


def _indices(iterator, n):
    return [next(iterator)["record_index"].tolist() for _ in range(n)]


def test_same_seed_same_order_other_seed_other_order():
    a = _indices(DATASET.batches(batch_size=4, seed=7), 10)
    b = _indices(DATASET.batches(batch_size=4, seed=7), 10)
    c = _indices(DATASET.batches(batch_size=4, seed=8), 10)
    assert a == b and a != c
    ordered = _indices(DATASET.batches(batch_size=4, seed=7, shuffle=False), 2)
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_each_epoch_is_a_fresh_permutation():
    it = DATASET.batches(batch_size=1, seed=3)
    epochs = [sum(_indices(it, 23), []) for _ in range(3)]
    assert all(sorted(e) == list(range(23)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    finite = DATASET.batches(batch_size=5, seed=3, num_epochs=2)
    assert len(list(finite)) == 9  # 46 examples, last partial batch dropped


@pytest.mark.parametrize("consumed", [0, 1, 5, 11])
def test_state_restores_the_exact_stream(consumed):
    it = DATASET.batches(batch_size=4, seed=11)
    _indices(it, consumed)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = [next(it) for _ in range(6)]
    resumed = DATASET.batches(batch_size=4, seed=11)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(6))):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_state_from_other_settings_is_refused():
    state = DATASET.batches(batch_size=4, seed=11).get_state()
    with pytest.raises(ValueError, match="iterator state was saved with"):
        DATASET.batches(batch_size=4, seed=12).set_state(state)


def test_shards_partition_the_dataset():
    shards = [sum(_indices(DATASET.batches(batch_size=1, seed=0, shard_index=i, shard_count=3,
                                           num_epochs=1), len(range(i, 23, 3))), [])
              for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(23))
    with pytest.raises(ValueError, match="shard_index"):
        DATASET.batches(batch_size=1, seed=0, shard_index=3, shard_count=3)
