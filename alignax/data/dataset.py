"""`prepare_dataset`: raw records -> validated, tokenized, truncated `PreferenceDataset`."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import transformers

from alignax.data.batching import bucket_lengths, collate
from alignax.data.iterator import BatchIterator
from alignax.data.loading import load_records
from alignax.data.records import FORMATS, detect_format, parse_record
from alignax.data.tokenize import TokenizedExample, TruncationReport, tokenize_records
from alignax.data.tokenizer import default_tokenizer

logger = logging.getLogger("alignax.data")

DEFAULT_REWARD_COLUMNS = ("target_rewards_1", "target_rewards_2")


class PreferenceDataset(Sequence[TokenizedExample]):
    """Tokenized preference examples plus what is needed to batch them.

    Attributes:
      examples: the TokenizedExamples, in record order.
      format: the record format (see `alignax.data.records.FORMATS`).
      report: the TruncationReport of preparation.
      pad_token_id: id written at padded positions.
      buckets: allowed padded sequence lengths T; prompt_buckets: allowed prompt lengths P.
      group_sizes: role -> K (the largest group in the dataset) for grouped data, else None.
    """

    def __init__(self, examples: list[TokenizedExample], *, format: str,
                 report: TruncationReport, pad_token_id: int, buckets: Sequence[int],
                 prompt_buckets: Sequence[int], group_sizes: Mapping[str, int] | None):
        self.examples = examples
        self.format = format
        self.report = report
        self.pad_token_id = pad_token_id
        self.buckets = tuple(buckets)
        self.prompt_buckets = tuple(prompt_buckets)
        self.group_sizes = None if group_sizes is None else dict(group_sizes)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def collate(self, examples: Sequence[TokenizedExample], *,
                share_prompt: bool = False) -> dict:
        """Pads `examples` into one batch (see `alignax.data.batching`); `share_prompt` adds
        the packed one-prompt-many-responses columns."""
        return collate(examples, buckets=self.buckets, prompt_buckets=self.prompt_buckets,
                       pad_token_id=self.pad_token_id, group_sizes=self.group_sizes,
                       share_prompt=share_prompt)

    def batches(self, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True, shard_index: int = 0,
                shard_count: int = 1, read_options: grain.ReadOptions | None = None,
                share_prompt: bool = False) -> BatchIterator:
        """A seeded, resumable iterator of padded batches (`alignax.data.iterator`); set
        `share_prompt` for a step with `StepConfig(share_prompt=True)`."""
        collate_fn = functools.partial(self.collate, share_prompt=share_prompt)
        return BatchIterator(self.examples, collate_fn, batch_size=batch_size, seed=seed,
                             shuffle=shuffle, num_epochs=num_epochs,
                             drop_remainder=drop_remainder, shard_index=shard_index,
                             shard_count=shard_count, read_options=read_options)


def prepare_dataset(data: str | os.PathLike | Iterable[Mapping[str, Any]],
                    tokenizer: Any = None, *,
                    format: str = "auto", max_length: int = 512,
                    max_prompt_length: int | None = None, split: str = "train",
                    reward_columns: tuple[str, str] | None = None, bin_column: str | None = None,
                    bin_fn: Callable[[Mapping[str, Any]], int] | None = None,
                    add_eos: bool = True, errors: str = "raise",
                    buckets: Sequence[int] | None = None) -> PreferenceDataset:
    """Loads (if needed), validates, renders, tokenizes and truncates preference records.

    Args:
      data: a `datasets.Dataset`, a list of record dicts, or a source for
        `alignax.data.load_records` (local file/dir or hub id; `split` selects the split).
      tokenizer: a transformers tokenizer, a local tokenizer directory or hub id (loaded with
        `AutoTokenizer`), or None for `alignax.data.default_tokenizer()`.
      format: one of "standard", "conversational", "hh", "grouped", "unlabeled", or "auto" to
        detect it from the first record.
      max_length: the most tokens of prompt + response.
      max_prompt_length: the most prompt tokens (default max_length // 2); longer prompts keep
        their end.
      reward_columns: target-reward columns of response_1/response_2 ("unlabeled" only);
        default: ("target_rewards_1", "target_rewards_2") when the records have them.
      bin_column, bin_fn: a spurious-attribute bin per record, from a column or a function.
      add_eos: end responses with the eos token.
      errors: "raise" (a malformed record raises ValueError with its index and field) or "drop"
        (it is left out and listed in `report.dropped`; never silently).
      buckets: allowed padded lengths (default `bucket_lengths(max_length)`).

    Returns:
      A PreferenceDataset; its `report` says what was truncated or dropped (also logged as a
      warning on the "alignax.data" logger when anything was).
    """
    if errors not in ("raise", "drop"):
        raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}")
    if isinstance(data, (str, os.PathLike)):
        data = load_records(data, split=split)
    if isinstance(data, Mapping):  # e.g. a datasets.DatasetDict
        raise ValueError(f"pass one split of the dataset (e.g. data[{split!r}]), not a mapping "
                         f"with keys {sorted(data)}")
    if tokenizer is None:
        tokenizer = default_tokenizer()
    elif isinstance(tokenizer, (str, os.PathLike)):  # a local directory or a hub id
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its "
                         "eos token) first")
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    records = data.to_list() if hasattr(data, "to_list") else list(data)
    if not records:
        raise ValueError("the dataset holds no records")
    if format == "auto":
        format = detect_format(records[0])
    elif format not in FORMATS:
        raise ValueError(f"unknown record format {format!r}; expected one of {FORMATS} or 'auto'")
    if (reward_columns is None and format == "unlabeled"
            and set(DEFAULT_REWARD_COLUMNS) <= set(records[0])):
        reward_columns = DEFAULT_REWARD_COLUMNS

    report = TruncationReport(num_records=len(records))
    parsed = []
    for index, record in enumerate(records):
        try:
            parsed.append(parse_record(record, index, format=format,
                                       reward_columns=reward_columns, bin_column=bin_column,
                                       bin_fn=bin_fn))
        except ValueError as error:
            if errors == "raise":
                raise
            report.dropped.append((index, str(error)))
    examples = tokenize_records(parsed, tokenizer, max_length=max_length,
                                max_prompt_length=max_prompt_length, add_eos=add_eos,
                                errors=errors, report=report)
    report.dropped.sort()
    report.num_examples = len(examples)
    if not examples:
        raise ValueError(f"no record survived preparation: {report}")
    if report.dropped or report.prompts_truncated or report.responses_truncated:
        logger.warning("preparing %s data: %s", format, report)
    group_sizes = None
    if format == "grouped":
        group_sizes = {role: max(len(ex.responses[role]) for ex in examples)
                       for role in ("chosen", "rejected")}
    return PreferenceDataset(
        examples, format=format, report=report, pad_token_id=tokenizer.pad_token_id,
        buckets=bucket_lengths(max_length) if buckets is None else sorted(buckets),
        prompt_buckets=bucket_lengths(max_prompt_length), group_sizes=group_sizes)
