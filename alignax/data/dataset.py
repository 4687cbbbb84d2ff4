"""`prepare_dataset`: raw records -> validated, tokenized, truncated `PreferenceDataset`."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import transformers

from alignax.data.batching import bucket_lengths, collate
from alignax.data.bins import LengthQuantileBins
from alignax.data.checks import chat_template_error
from alignax.data.iterator import BatchIterator
from alignax.data.loading import load_records, local_path, missing_path_error
from alignax.data.records import FORMATS, ParsedRecord, Text, detect_format, parse_record
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
      response_bins: how the per-response bins were made: a `LengthQuantileBins` with the edges
        it used (pass it to `prepare_dataset` for the evaluation split), the function, or None.
    """

    def __init__(self, examples: list[TokenizedExample], *, format: str,
                 report: TruncationReport, pad_token_id: int, buckets: Sequence[int],
                 prompt_buckets: Sequence[int], group_sizes: Mapping[str, int] | None,
                 response_bins: LengthQuantileBins | Callable | None = None):
        self.examples = examples
        self.format = format
        self.report = report
        self.pad_token_id = pad_token_id
        self.buckets = tuple(buckets)
        self.prompt_buckets = tuple(prompt_buckets)
        self.group_sizes = None if group_sizes is None else dict(group_sizes)
        self.response_bins = response_bins

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


def _indices(indices: Sequence[int], shown: int = 10) -> str:
    text = ", ".join(map(str, indices[:shown]))
    return text + (f", ... ({len(indices)} records)" if len(indices) > shown else "")


def _dataset_format(records: Sequence[Any], errors: str) -> str:
    """The one format every record has (records that fit none are left to validation with
    errors="drop"); ValueError naming the records when they disagree."""
    found: dict[str, list[int]] = collections.defaultdict(list)
    for index, record in enumerate(records):
        try:
            if not isinstance(record, Mapping):
                raise ValueError(f"must be a mapping of columns, got {type(record).__name__}")
            found[detect_format(record)].append(index)
        except ValueError as error:
            if errors == "raise":
                raise ValueError(f"record {index}: {error}") from None
    if len(found) != 1:
        listing = "; ".join(f"{name!r} in records {_indices(ix)}" for name, ix in found.items())
        raise ValueError(f"the records do not share one format: {listing or 'none fits'}; pass "
                         "format= to choose one (records that do not fit it are then refused, or "
                         "dropped with errors='drop')")
    return next(iter(found))


def _reward_columns(records: Sequence[Mapping[str, Any]], columns: tuple[str, str],
                    errors: str) -> None:
    """Every record must hold both reward columns: raise naming those without (with
    errors="drop" they are dropped by validation, each with its reason)."""
    missing = [i for i, r in enumerate(records)
               if isinstance(r, Mapping) and any(r.get(c) is None for c in columns)]
    if missing and errors == "raise":
        raise ValueError(f"target rewards {columns} are in {len(records) - len(missing)} of "
                         f"{len(records)} records but missing in records {_indices(missing)}: "
                         "label every record or none (or pass errors='drop')")


def _describe(shape: tuple[int, ...]) -> str:
    return "a scalar reward" if shape == () else f"a list of {shape[0]} rewards"


def _ensemble_size(parsed: list[ParsedRecord], column: str, errors: str,
                   report: TruncationReport) -> list[ParsedRecord]:
    """Keeps the records whose rewards have the most common shape (one ensemble size E for the
    dataset); raise naming the first other record, or drop them all with errors="drop"."""
    shapes = [np.shape(p.rewards["response_1"]) for p in parsed]
    counts = collections.Counter(shapes)
    if len(counts) < 2:
        return parsed
    expected, n = counts.most_common(1)[0]
    kept = []
    for p, shape in zip(parsed, shapes):
        if shape == expected:
            kept.append(p)
            continue
        message = (f"record {p.index}: field {column!r} holds {_describe(shape)} but {n} records "
                   f"hold {_describe(expected)}; every record needs the same ensemble size")
        if errors == "raise":
            raise ValueError(message)
        report.dropped.append((p.index, message))
    return kept


def _length_bins(examples: list[TokenizedExample], spec: LengthQuantileBins
                 ) -> tuple[list[TokenizedExample], LengthQuantileBins]:
    """Adds per-response length bins, fitting the edges on these responses if `spec` has none."""
    lengths = [n for ex in examples for role in ex.responses for n in ex.response_lengths[role]]
    fitted = spec.fit(lengths)
    bins = iter(fitted.assign(lengths).tolist())
    return [dataclasses.replace(ex, response_bins={
        role: tuple(next(bins) for _ in ex.response_lengths[role]) for role in ex.responses})
        for ex in examples], fitted


def prepare_dataset(data: str | os.PathLike | Iterable[Mapping[str, Any]],
                    tokenizer: Any = None, *,
                    format: str = "auto", max_length: int = 512,
                    max_prompt_length: int | None = None, truncation: str = "keep_prompt_end",
                    split: str = "train", reward_columns: tuple[str, str] | None = None,
                    bin_column: str | None = None,
                    bin_fn: Callable[[Mapping[str, Any]], int] | None = None,
                    response_bins: LengthQuantileBins | Callable[[Mapping[str, Any], str, Text],
                                                                 int] | None = None,
                    add_eos: bool = True, special_token_text: str = "text",
                    errors: str = "raise",
                    buckets: Sequence[int] | None = None) -> PreferenceDataset:
    """Loads (if needed), validates, renders, tokenizes and truncates preference records.

    Args:
      data: a `datasets.Dataset`, a list of record dicts, or a source for
        `alignax.data.load_records` (local file/dir or hub id; `split` selects the split).
      tokenizer: a transformers tokenizer, a local tokenizer directory or hub id (loaded with
        `AutoTokenizer`), or None for `alignax.data.default_tokenizer()`.
      format: one of `alignax.data.records.FORMATS`, or "auto" to detect it from the records
        (all of them must agree).
      max_length: the most tokens of prompt + response.
      max_prompt_length: truncation="keep_prompt_end": the most prompt tokens (default
        max_length // 2); longer prompts keep their end.
      truncation: "keep_prompt_end" (default), or "keep_start" as TRL's DPOTrainer: the whole
        prompt is kept, the response's end cut at max_length, and records whose prompt alone
        fills max_length are dropped (listed in the report). See `alignax.data.tokenize`.
      reward_columns: target-reward columns of response_1/response_2 ("unlabeled" only);
        default: ("target_rewards_1", "target_rewards_2") when any record has them, and then
        every record must (one ensemble size E for all).
      bin_column, bin_fn: a spurious-attribute bin per record, from a column or a function
        record -> int; batches carry it as "bin" [B] int32.
      response_bins: a bin per response, carried as "<role>_bin" ([B] int32; [B, K] for grouped
        data, -1 on absent members): `LengthQuantileBins(num_bins=M)` for quantiles of the
        response length in tokens fitted on this dataset's responses (all roles pooled; pass the
        returned `dataset.response_bins`, which holds the edges, for an evaluation split), or a
        function (record, role, completion) -> int.
      add_eos: end responses with the eos token.
      special_token_text: "text" (default: special-token strings in the content are tokenized as
        characters), "control" (as control tokens) or "error" (refuse such records).
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
        path = local_path(tokenizer)
        if path is not None and not path.is_dir():
            raise missing_path_error(tokenizer, "tokenizer directory")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path or tokenizer))
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its "
                         "eos token) first")
    if response_bins is not None and not (isinstance(response_bins, LengthQuantileBins)
                                          or callable(response_bins)):
        raise TypeError("response_bins must be a LengthQuantileBins or a function (record, role, "
                        f"completion) -> int, got {type(response_bins).__name__}")
    records = data.to_list() if hasattr(data, "to_list") else list(data)
    if not records:
        raise ValueError("the dataset holds no records")
    if format == "auto":
        format = _dataset_format(records, errors)
    elif format not in FORMATS:
        raise ValueError(f"unknown record format {format!r}; expected one of {FORMATS} or 'auto'")
    if (reward_columns is None and format == "unlabeled"
            and any(isinstance(r, Mapping) and r.get(c) is not None
                    for r in records for c in DEFAULT_REWARD_COLUMNS)):
        reward_columns = DEFAULT_REWARD_COLUMNS
    if reward_columns is not None:
        _reward_columns(records, reward_columns, errors)

    report = TruncationReport(num_records=len(records))
    parsed = []
    response_bin_fn = None if isinstance(response_bins, LengthQuantileBins) else response_bins
    for index, record in enumerate(records):
        try:
            parsed.append(parse_record(record, index, format=format,
                                       reward_columns=reward_columns, bin_column=bin_column,
                                       bin_fn=bin_fn, response_bin_fn=response_bin_fn))
        except ValueError as error:
            if errors == "raise":
                raise
            report.dropped.append((index, str(error)))
    if reward_columns is not None:
        parsed = _ensemble_size(parsed, reward_columns[0], errors, report)
    conversations = [p.index for p in parsed if not isinstance(p.prompt, str)]
    if conversations and getattr(tokenizer, "chat_template", None) is None:
        raise chat_template_error(tokenizer, f"records {_indices(conversations, 3)} are "
                                             "conversations, which")
    examples = tokenize_records(parsed, tokenizer, max_length=max_length,
                                max_prompt_length=max_prompt_length, add_eos=add_eos,
                                errors=errors, special_token_text=special_token_text,
                                truncation=truncation, report=report)
    report.dropped.sort()
    report.num_examples = len(examples)
    if not examples:
        raise ValueError(f"no record survived preparation: {report}")
    if isinstance(response_bins, LengthQuantileBins):
        examples, response_bins = _length_bins(examples, response_bins)
    if report.noteworthy:
        logger.warning("preparing %s data: %s", format, report)
    group_sizes = None
    if format == "grouped":
        group_sizes = {role: max(len(ex.responses[role]) for ex in examples)
                       for role in ("chosen", "rejected")}
    prompt_length = max_length if truncation == "keep_start" else (
        max_length // 2 if max_prompt_length is None else max_prompt_length)
    return PreferenceDataset(
        examples, format=format, report=report, pad_token_id=tokenizer.pad_token_id,
        buckets=bucket_lengths(max_length) if buckets is None else sorted(buckets),
        prompt_buckets=bucket_lengths(prompt_length), group_sizes=group_sizes,
        response_bins=response_bins)
