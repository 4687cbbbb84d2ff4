"""Preference record formats: detection and validation into one parsed form.

Supported formats (the name is the `format=` argument; "auto" detects it from every record and
refuses a dataset whose records disagree):

- "standard": TRL-style `{"prompt": str, "chosen": str, "rejected": str}`.
- "implicit_prompt": TRL's standard format without a prompt column, `{"chosen": str,
  "rejected": str}` where both strings start with the prompt: the prompt is their longest common
  prefix, and a space that ends it goes to the responses instead (as TRL's `extract_prompt`
  splits such records), so "The sky is blue." / "The sky is green." gives the prompt
  "The sky is" and the responses " blue." / " green.". Unlike TRL, a prefix that ends inside a
  word is cut back to the whitespace before that word: "Pick: apple" / "Pick: a pear" gives
  "Pick:" and " apple" / " a pear", where TRL gives "Pick: a" and "pple" / " pear".
- "conversational": `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}` with
  messages `{"role": str, "content": str}`; or, as in UltraFeedback-binarized, `chosen`/`rejected`
  holding the whole conversation, in which case the prompt is their longest common message
  prefix (a string `prompt` column beside them is then ignored).
- "hh": Anthropic HH transcripts `{"chosen": str, "rejected": str}` (told apart from
  "implicit_prompt" by their "\\n\\nAssistant:" turns); the prompt is everything up to and
  including the last "\\n\\nAssistant:", and both transcripts must share it.
- "grouped": `{"prompt", "chosen": [k completions], "rejected": [l completions]}` (mDPO/mIPO);
  completions are strings, or message lists when the prompt is a message list.
- "unlabeled": `{"prompt", "response_1", "response_2"}` with optional target-reward columns
  (a float, or a list of E floats for an ensemble) for reward-model distillation.

A malformed record raises ValueError naming the record index and the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

FORMATS = ("standard", "implicit_prompt", "conversational", "hh", "grouped", "unlabeled")
HH_ASSISTANT = "\n\nAssistant:"

Messages = tuple[dict[str, str], ...]
Text = str | Messages


@dataclasses.dataclass(frozen=True)
class ParsedRecord:
    """One validated record.

    Attributes:
      index: position of the record in its dataset (for error messages and reports).
      prompt: the prompt text, or its messages.
      responses: role -> completions ("chosen"/"rejected", or "response_1"/"response_2"); one
        completion per role except in grouped records. A completion is a string when the prompt
        is, else a message tuple.
      rewards: role -> target reward: a float, or a tuple of E floats (one per ensemble member).
      bin: spurious-attribute bin of the record, or None.
      response_bins: role -> one bin per completion (from `response_bin_fn`), or empty.
    """

    index: int
    prompt: Text
    responses: dict[str, tuple[Text, ...]]
    rewards: dict[str, float | tuple[float, ...]]
    bin: int | None
    response_bins: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def _error(index: int, field: str, problem: str) -> ValueError:
    return ValueError(f"record {index}: field {field!r} {problem}")


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], Mapping)


def detect_format(record: Mapping[str, Any]) -> str:
    """Names the format of `record` (see the module docstring); ValueError if none fits.

    A missing column and a column holding None (how `datasets` fills a column that only some
    records have) are the same.

    >>> detect_format({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    'implicit_prompt'
    >>> detect_format({"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "rejected": "..."})
    'hh'
    """
    keys = {key for key, value in record.items() if value is not None}
    if {"response_1", "response_2"} <= keys:
        return "unlabeled"
    if not {"chosen", "rejected"} <= keys:
        raise ValueError(f"cannot detect the record format from columns {sorted(keys)}: expected "
                         "chosen/rejected (optionally with prompt) or prompt/response_1/response_2")
    chosen, rejected = record["chosen"], record["rejected"]
    if _is_messages(chosen) or _is_messages(record.get("prompt")):
        return "conversational"
    if isinstance(chosen, (list, tuple)):
        return "grouped"
    if "prompt" in keys:
        return "standard"
    if any(isinstance(t, str) and HH_ASSISTANT in t for t in (chosen, rejected)):
        return "hh"
    return "implicit_prompt"


def _text(index: int, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _error(index, field, f"must be a string, got {type(value).__name__}")
    return value


def _nonempty_text(index: int, field: str, value: Any) -> str:
    if not _text(index, field, value).strip():
        raise _error(index, field, "is empty")
    return value


def _messages(index: int, field: str, value: Any) -> Messages:
    if not isinstance(value, (list, tuple)):
        raise _error(index, field, f"must be a list of {{role, content}} messages, got "
                                   f"{type(value).__name__}")
    parsed = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _error(index, f"{field}[{i}]", f"must be a {{role, content}} mapping, got "
                                                 f"{type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise _error(index, f"{field}[{i}].{key}", "is missing")
            _text(index, f"{field}[{i}].{key}", message[key])
        parsed.append({"role": message["role"], "content": message["content"]})
    return tuple(parsed)


def _completion_messages(index: int, field: str, value: Messages) -> Messages:
    if not value:
        raise _error(index, field, "has no messages after the prompt")
    if value[0]["role"] != "assistant":
        raise _error(index, f"{field}[0].role", f"must be 'assistant', got {value[0]['role']!r}")
    if not any(m["content"].strip() for m in value):
        raise _error(index, field, "is empty")
    return value


def _field(record: Mapping[str, Any], index: int, field: str) -> Any:
    if field not in record or record[field] is None:
        raise _error(index, field, "is missing")
    return record[field]


def _split_conversation(record: Mapping[str, Any], index: int,
                        roles: Sequence[str]) -> tuple[Messages, dict[str, tuple[Messages, ...]]]:
    prompt = record.get("prompt")
    full = {role: _messages(index, role, _field(record, index, role)) for role in roles}
    if _is_messages(prompt) or (isinstance(prompt, (list, tuple)) and not prompt):
        prompt = _messages(index, "prompt", prompt)
        completions = full
    else:  # implicit prompt: the longest common message prefix (UltraFeedback-binarized)
        first, *others = full.values()
        n = 0
        while all(n < len(m) - 1 for m in full.values()) and all(m[n] == first[n] for m in others):
            n += 1
        prompt = first[:n]
        completions = {role: m[n:] for role, m in full.items()}
    if not prompt:
        raise _error(index, "prompt", "has no messages")
    return prompt, {role: (_completion_messages(index, role, c),) for role, c in completions.items()}


def _split_hh(record: Mapping[str, Any], index: int) -> tuple[str, dict[str, tuple[str, ...]]]:
    prompts, responses = {}, {}
    for role in ("chosen", "rejected"):
        transcript = _text(index, role, _field(record, index, role))
        cut = transcript.rfind(HH_ASSISTANT)
        if cut < 0:
            raise _error(index, role, f"has no {HH_ASSISTANT!r} turn")
        cut += len(HH_ASSISTANT)
        prompts[role] = transcript[:cut]
        responses[role] = (_nonempty_text(index, role, transcript[cut:]),)
    if prompts["chosen"] != prompts["rejected"]:
        raise _error(index, "rejected", "does not share the chosen transcript's prompt (the text "
                                        f"up to the last {HH_ASSISTANT!r})")
    return prompts["chosen"], responses


def _split_implicit(record: Mapping[str, Any],
                    index: int) -> tuple[str, dict[str, tuple[str, ...]]]:
    """The prompt of a TRL implicit-prompt record: the longest common prefix of chosen and
    rejected, minus a final space (which starts both responses instead), cut back to the start
    of a word it would end inside of."""
    chosen = _nonempty_text(index, "chosen", _field(record, index, "chosen"))
    rejected = _nonempty_text(index, "rejected", _field(record, index, "rejected"))
    n = len(os.path.commonprefix([chosen, rejected]))
    if n == min(len(chosen), len(rejected)):
        raise _error(index, "rejected" if n == len(rejected) else "chosen",
                     "is the whole shared prefix of chosen and rejected, so nothing of it is left "
                     "as a response (identical texts, or one a prefix of the other)")
    word = re.compile(r"\w")
    start = max((m.start() for m in re.finditer(r"\s", chosen[:n])), default=0)
    if n and word.match(chosen[n - 1]) and (word.match(chosen[n]) or word.match(rejected[n])) \
            and chosen[:start].strip():
        n = start  # the prefix ends inside a word: cut back to the word's start
    elif n and chosen[n - 1] == " ":
        n -= 1
    if not chosen[:n].strip():
        raise _error(index, "chosen", "shares no prompt with 'rejected' (their common prefix is "
                                      f"{chosen[:n]!r}); add a 'prompt' column")
    return chosen[:n], {role: (_nonempty_text(index, role, text[n:]),)
                        for role, text in (("chosen", chosen), ("rejected", rejected))}


def _grouped(record: Mapping[str, Any], index: int) -> tuple[Text, dict[str, tuple[Text, ...]]]:
    prompt = _field(record, index, "prompt")
    conversational = _is_messages(prompt)
    prompt = _messages(index, "prompt", prompt) if conversational else _nonempty_text(
        index, "prompt", prompt)
    responses = {}
    for role in ("chosen", "rejected"):
        group = _field(record, index, role)
        if not isinstance(group, (list, tuple)) or not group:
            raise _error(index, role, "must be a non-empty list of completions")
        responses[role] = tuple(
            _completion_messages(index, f"{role}[{k}]", _messages(index, f"{role}[{k}]", c))
            if conversational else _nonempty_text(index, f"{role}[{k}]", c)
            for k, c in enumerate(group))
    return prompt, responses


def _rewards(record: Mapping[str, Any], index: int, field: str) -> float | tuple[float, ...]:
    value = _field(record, index, field)
    values = value if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise _error(index, field, "is an empty list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _error(index, field, f"must hold finite numbers, got {value!r}")
    floats = tuple(float(v) for v in values)
    return floats if isinstance(value, (list, tuple)) else floats[0]


def _bin(index: int, field: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise _error(index, field, f"must be an int bin, got {value!r}")
    return int(value)


def parse_record(record: Mapping[str, Any], index: int, *, format: str,
                 reward_columns: tuple[str, str] | None = None, bin_column: str | None = None,
                 bin_fn: Callable[[Mapping[str, Any]], int] | None = None,
                 response_bin_fn: Callable[[Mapping[str, Any], str, Text], int] | None = None
                 ) -> ParsedRecord:
    """Validates one record of the given `format` and returns its parsed form.

    Args:
      record: a mapping of column name -> value (one row of a `datasets.Dataset`).
      index: the record's position, quoted in every error.
      format: one of FORMATS.
      reward_columns: for "unlabeled" records, the target-reward columns of response_1 and
        response_2 (e.g. ("target_rewards_1", "target_rewards_2")).
      bin_column: a column holding the spurious-attribute bin, an int (negative = no bin, as
        `alignax.data.bins` marks unmatched records; mask those with `where=bins >= 0`).
      bin_fn: or a function record -> bin (an int; None is refused, not read as "no bin").
      response_bin_fn: a function (record, role, completion) -> bin of that one response,
        called for every completion (each group member of a grouped record); the completion is
        the parsed text (or message tuple) of the response alone.

    Raises:
      ValueError: naming `index` and the offending field, for a missing field, an empty
        response, a wrong type, a bin that is not an int, or a conversation that cannot be split
        into prompt + response.

    >>> parse_record({"prompt": "Hi", "chosen": " yes", "rejected": " no"}, 0, format="standard")
    ParsedRecord(index=0, prompt='Hi', responses={'chosen': (' yes',), 'rejected': (' no',)}, rewards={}, bin=None, response_bins={})
    >>> parse_record({"prompt": "Hi", "chosen": "", "rejected": " no"}, 7, format="standard")
    Traceback (most recent call last):
    ValueError: record 7: field 'chosen' is empty
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"record {index}: must be a mapping of columns, got {type(record).__name__}")
    if format == "standard":
        prompt = _nonempty_text(index, "prompt", _field(record, index, "prompt"))
        responses = {role: (_nonempty_text(index, role, _field(record, index, role)),)
                     for role in ("chosen", "rejected")}
    elif format == "implicit_prompt":
        prompt, responses = _split_implicit(record, index)
    elif format == "conversational":
        prompt, responses = _split_conversation(record, index, ("chosen", "rejected"))
    elif format == "hh":
        prompt, responses = _split_hh(record, index)
    elif format == "grouped":
        prompt, responses = _grouped(record, index)
    elif format == "unlabeled":
        roles = ("response_1", "response_2")
        prompt = record.get("prompt")
        if _is_messages(prompt) or _is_messages(record.get("response_1")):
            prompt, responses = _split_conversation(record, index, roles)
        else:
            prompt = _nonempty_text(index, "prompt", _field(record, index, "prompt"))
            responses = {role: (_nonempty_text(index, role, _field(record, index, role)),)
                         for role in roles}
    else:
        raise ValueError(f"unknown record format {format!r}; expected one of {FORMATS} or 'auto'")

    rewards = {}
    if reward_columns is not None:
        if format != "unlabeled":
            raise ValueError(f"reward_columns apply to the 'unlabeled' format, not {format!r}")
        rewards = {role: _rewards(record, index, column)
                   for role, column in zip(("response_1", "response_2"), reward_columns)}
        first, second = (np.shape(r) for r in rewards.values())
        if first != second:
            raise _error(index, reward_columns[1], f"has shape {second} but {reward_columns[0]!r} "
                                                   f"has shape {first}")

    if bin_column is not None and bin_fn is not None:
        raise ValueError("pass bin_column or bin_fn, not both")
    bin_ = None
    if bin_column is not None:
        bin_ = _bin(index, bin_column, _field(record, index, bin_column))
    elif bin_fn is not None:
        bin_ = _bin(index, "bin_fn(record)", bin_fn(record))
    response_bins = {}
    if response_bin_fn is not None:
        response_bins = {
            role: tuple(_bin(index, f"response_bin_fn(record, {role!r}, "
                                    f"{role if len(completions) == 1 else f'{role}[{k}]'})",
                             response_bin_fn(record, role, completion))
                        for k, completion in enumerate(completions))
            for role, completions in responses.items()}
    return ParsedRecord(index=index, prompt=prompt, responses=responses, rewards=rewards,
                        bin=bin_, response_bins=response_bins)
