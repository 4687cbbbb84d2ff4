"""Loading raw preference records with Hugging Face `datasets`: a hub name, a local dataset
directory, or one local JSONL / JSON / Parquet / CSV file."""

from __future__ import annotations

import os
import pathlib

import datasets

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_records(source: str | os.PathLike, *, split: str = "train",
                 **load_kwargs) -> datasets.Dataset:
    """Loads one split of raw records.

    Args:
      source: a local file (.jsonl, .json, .parquet, .csv), a local directory `datasets` can
        read, or a hub dataset id such as "Anthropic/hh-rlhf".
      split: the split to return ("train", "test", "train_prefs", slices like "train[:1%]").
      **load_kwargs: passed to `datasets.load_dataset` (e.g. data_dir="harmless-base",
        cache_dir=...).

    Raises:
      ValueError: an unsupported local file type.
      RuntimeError: a hub dataset that cannot be fetched (offline, unknown id), chained to the
        `datasets` error.

    >>> load_records("no/such-file.jsonl")
    Traceback (most recent call last):
    ValueError: no such file: 'no/such-file.jsonl'
    """
    path = pathlib.Path(source)
    if path.suffix in _BUILDERS or path.is_file():
        if path.suffix not in _BUILDERS:
            raise ValueError(f"cannot load {str(path)!r}: expected one of "
                             f"{sorted(_BUILDERS)}, a dataset directory or a hub id")
        if not path.is_file():
            raise ValueError(f"no such file: {str(path)!r}")
        return datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split=split,
                                     **load_kwargs)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, **load_kwargs)
    try:
        return datasets.load_dataset(str(source), split=split, **load_kwargs)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise RuntimeError(f"could not load {str(source)!r} from the Hugging Face hub ({error}); "
                           "offline, pass a local file or directory instead, or run once online "
                           "so that `datasets` caches it") from error
