"""Loading raw preference records with Hugging Face `datasets`: a hub name, a local dataset
directory, or one local JSONL / JSON / Parquet / CSV file.

A source is a local path, never sent to the hub, when it exists locally or cannot be a hub id:
anything that is not of the form "name" / "owner/name" (so "./x", "~/x", "/x", "a/b/c"), ends in
a file suffix we read ("data/trian.jsonl"), or starts with an existing local directory
("data/tarin" next to a "data/" directory). A missing local path is reported as such.
"""

from __future__ import annotations

import os
import pathlib

import datasets
from huggingface_hub.utils import HFValidationError, validate_repo_id

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def local_path(source: str | os.PathLike) -> pathlib.Path | None:
    """The local path `source` names (`~` expanded), or None when it reads as a hub id.

    >>> local_path("Anthropic/hh-rlhf") is None
    True
    >>> [str(local_path(s)) for s in ("./data/x", "data/trian.jsonl", "a/b/c")]
    ['data/x', 'data/trian.jsonl', 'a/b/c']
    """
    path = pathlib.Path(source).expanduser()
    if isinstance(source, os.PathLike) or path.exists() or path.suffix in _BUILDERS:
        return path
    text = str(source)
    try:
        validate_repo_id(text)
    except HFValidationError:
        return path
    if "/" in text and pathlib.Path(text.split("/")[0]).is_dir():
        return path
    return None


def missing_path_error(source: str | os.PathLike, what: str) -> ValueError:
    """The error for a local path (see `local_path`) that does not exist."""
    path = pathlib.Path(source).expanduser()
    return ValueError(f"no such local {what}: {str(source)!r} (looked for {str(path.absolute())!r})"
                      "; a Hugging Face hub id has the form 'name' or 'owner/name'")


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
      ValueError: a local path (module docstring) that does not exist, or an unsupported local
        file type.
      RuntimeError: a hub dataset that cannot be fetched (offline, unknown id), chained to the
        `datasets` error.

    >>> load_records("no/such-file.jsonl")
    Traceback (most recent call last):
    ValueError: no such local file or directory: 'no/such-file.jsonl' (looked for '...no/such-file.jsonl'); a Hugging Face hub id has the form 'name' or 'owner/name'
    """
    path = local_path(source)
    if path is not None:
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split, **load_kwargs)
        if not path.is_file():
            raise missing_path_error(source, "file or directory")
        if path.suffix not in _BUILDERS:
            raise ValueError(f"cannot load {str(path)!r}: expected one of "
                             f"{sorted(_BUILDERS)}, a dataset directory or a hub id")
        return datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split=split,
                                     **load_kwargs)
    try:
        return datasets.load_dataset(str(source), split=split, **load_kwargs)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise RuntimeError(f"could not load {str(source)!r} from the Hugging Face hub ({error}); "
                           "offline, pass a local file or directory instead, or run once online "
                           "so that `datasets` caches it") from error
