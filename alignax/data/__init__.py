"""Preference data: record formats, tokenization, bucketed batching, resumable iteration.

    tokenizer = alignax.data.default_tokenizer()            # or AutoTokenizer.from_pretrained(...)
    alignax.data.check_tokenizer(tokenizer, vocab_size=model_vocab_size)  # before training
    dataset = alignax.data.prepare_dataset("hh.jsonl", tokenizer, max_length=256)
    print(dataset.report)                                     # what was truncated / dropped
    batches = dataset.batches(batch_size=8, seed=0)           # batches.get_state() / set_state()
"""

from alignax.data.batching import bucket_lengths
from alignax.data.batching import collate
from alignax.data.bins import LengthQuantileBins
from alignax.data.checks import check_tokenizer
from alignax.data.dataset import PreferenceDataset
from alignax.data.dataset import prepare_dataset
from alignax.data.iterator import BatchIterator
from alignax.data.loading import load_records
from alignax.data.records import ParsedRecord
from alignax.data.records import detect_format
from alignax.data.records import parse_record
from alignax.data.tokenize import TokenizedExample
from alignax.data.tokenize import TruncationReport
from alignax.data.tokenize import tokenize_records
from alignax.data.tokenizer import default_tokenizer
from alignax.data import bins  # noqa: F401  (spurious-variable bins, thesis §4.10-4.12)

__all__ = [
    "BatchIterator",
    "ParsedRecord",
    "PreferenceDataset",
    "TokenizedExample",
    "TruncationReport",
    "LengthQuantileBins",
    "bucket_lengths",
    "check_tokenizer",
    "collate",
    "default_tokenizer",
    "detect_format",
    "load_records",
    "parse_record",
    "prepare_dataset",
    "tokenize_records",
]
