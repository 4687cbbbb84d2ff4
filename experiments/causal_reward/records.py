"""What every study's data builder returns: record splits in a trainer/TRL format, as JSONL.

A builder returns a `StudyData`: named splits ("train", "test", ...) of JSON-able record dicts
in the "standard" format (`{"prompt", "chosen", "rejected"}`) or the Anthropic "hh" format
(`{"chosen", "rejected"}` transcripts), so the same files feed `alignax.data.prepare_dataset`
and TRL's `RewardTrainer` / `DPOTrainer` / `PPOTrainer` (which ignore the extra columns). Extra
columns carry what the study's metric needs (the correct answer, the oracle quality, the
concept, the demographic bin); their names are listed in each study's docstring.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from alignax.data.records import HH_ASSISTANT

RECORD_FORMATS = ("standard", "hh")
HH_HUMAN = "\n\nHuman:"


@dataclasses.dataclass(frozen=True)
class StudyData:
    """The records of one study, by split.

    Attributes:
      study: the study's name ("sycophancy", "length", "concept", "discrimination").
      format: "standard" or "hh" (every split's records have it).
      splits: split name -> preference records (JSON-able dicts) in `format`.
      evaluation: evaluation set name -> prompt-only records a study's metric is computed on
        (e.g. the discrimination study's decision questions), written beside the splits.
      info: how the data was made (the builder's arguments, counts, coverage), JSON-able.
    """

    study: str
    format: str
    splits: dict[str, list[dict[str, Any]]]
    evaluation: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.format not in RECORD_FORMATS:
            raise ValueError(f"format must be one of {RECORD_FORMATS}, got {self.format!r}")
        clash = set(self.splits) & set(self.evaluation)
        if clash:
            raise ValueError(f"names used by both splits and evaluation sets: {sorted(clash)}")

    def write(self, directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
        """Writes `<name>.jsonl` per split and evaluation set, and `info.json`, under
        `directory`; returns the name -> path map."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {name: write_jsonl(records, directory / f"{name}.jsonl")
                 for name, records in {**self.splits, **self.evaluation}.items()}
        (directory / "info.json").write_text(
            json.dumps({"study": self.study, "format": self.format, **self.info}, indent=2,
                       sort_keys=True) + "\n", encoding="utf-8")
        return paths


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
    """One JSON object per line (UTF-8, keys in record order)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (blank lines skipped); ValueError naming a bad line."""
    records = []
    with pathlib.Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON: {error}") from None
    return records


def hh_prompt(human: str) -> str:
    """One-turn HH prompt: "\\n\\nHuman: {human}\\n\\nAssistant:"."""
    return f"{HH_HUMAN} {human}{HH_ASSISTANT}"


def hh_pair(human: str, chosen: str, rejected: str) -> dict[str, str]:
    """An HH record: both transcripts share `hh_prompt(human)`; responses start with a space."""
    prompt = hh_prompt(human)
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def hh_split(transcript: str) -> tuple[str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:", response) of an HH transcript."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"not an HH transcript (no {HH_ASSISTANT!r}): {transcript[:60]!r}")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def split_sizes(num_records: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Split sizes from fractions summing to 1 (the last split takes the rounding remainder).

    >>> split_sizes(100, {"train": 0.9, "validation": 0.05, "test": 0.05})
    {'train': 90, 'validation': 5, 'test': 5}
    """
    total = sum(fractions.values())
    if not fractions or any(f < 0 for f in fractions.values()) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    names = list(fractions)
    sizes = {name: int(round(num_records * fractions[name])) for name in names[:-1]}
    sizes[names[-1]] = num_records - sum(sizes.values())
    if sizes[names[-1]] < 0:
        raise ValueError(f"split fractions {dict(fractions)} round past {num_records} records")
    return sizes
