"""A seeded, resumable batch iterator built on grain's MapDataset.

Shuffling is a seeded global permutation, redrawn every epoch (grain's `shuffle` + `repeat`);
the position is grain's `{"next_index": n}` plus our own settings, a JSON-able dict that
`set_state` restores exactly. Sharding for multi-host input is a strided slice of the example
list taken before shuffling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain


class BatchIterator(Iterator[dict]):
    """Yields collated batches in a deterministic order.

    Args:
      examples: the examples to iterate over (any sequence).
      collate_fn: list of examples -> batch.
      batch_size: examples per batch.
      seed: shuffling seed.
      shuffle: False keeps the dataset order.
      num_epochs: None repeats forever (batches then run across epoch boundaries).
      drop_remainder: drop a final partial batch (only reachable with a finite num_epochs).
      shard_index, shard_count: read only examples shard_index, shard_index + shard_count, ...
      read_options: grain.ReadOptions for prefetching (default: 1 thread, 4 batches).
    """

    def __init__(self, examples: Sequence, collate_fn: Callable[[Sequence], dict], *,
                 batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, shard_index: int = 0, shard_count: int = 1,
                 read_options: grain.ReadOptions | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, "
                             f"{shard_count}")
        dataset = grain.MapDataset.source(examples)[shard_index::shard_count]
        if len(dataset) < batch_size and drop_remainder:
            raise ValueError(f"shard {shard_index}/{shard_count} holds {len(dataset)} examples, "
                             f"fewer than batch_size={batch_size}")
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.repeat(num_epochs, reseed_each_epoch=True)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate_fn)
        options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
        self._settings = {"seed": seed, "shuffle": shuffle, "batch_size": batch_size,
                          "shard_index": shard_index, "shard_count": shard_count,
                          "num_examples": len(examples)}
        self._iterator = dataset.to_iter_dataset(options).__iter__()

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position: a JSON-able dict (grain's state plus the settings it is valid for)."""
        return {**self._settings, "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position from `get_state`; the next batch is the one that followed it.

        Raises:
          ValueError: if the state was saved by an iterator with other settings or data size.
        """
        saved = {key: state.get(key) for key in self._settings}
        if saved != self._settings:
            raise ValueError(f"iterator state was saved with {saved}, but this iterator has "
                             f"{self._settings}")
        self._iterator.set_state(state["grain"])
