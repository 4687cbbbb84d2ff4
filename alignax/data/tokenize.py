"""Rendering (chat templates) and tokenization of parsed records, with counted truncation.

Layout of every tokenized sequence: `prompt_ids + response_ids`. The prompt is tokenized with
the tokenizer's special tokens (e.g. a bos) unless it came from a chat template, which already
holds them; the response is tokenized without special tokens and ends with the eos token unless
the rendered response already contains it (chat templates that close a turn with eos).

Truncation to `max_length` keeps the END of the prompt (and its leading bos, if any) within
`max_prompt_length`, then cuts the response to the remaining budget. Nothing is dropped: every
cut is counted in a `TruncationReport`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from alignax.data.records import ParsedRecord


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One record as token ids (int32, unpadded, already truncated).

    Attributes:
      index: the record's position in its dataset.
      prompt_ids: [P] prompt tokens.
      responses: role -> tuple of [R] response-token arrays (k of them for a grouped record).
      rewards: role -> target reward(s), as in `ParsedRecord`.
      bin: spurious-attribute bin, or None.
    """

    index: int
    prompt_ids: np.ndarray
    responses: dict[str, tuple[np.ndarray, ...]]
    rewards: dict
    bin: int | None


@dataclasses.dataclass
class TruncationReport:
    """What preparing a dataset cut or dropped; `str(report)` is a one-paragraph summary.

    Attributes:
      num_records: records read.
      num_examples: examples kept (num_records - len(dropped)).
      prompts_truncated: prompts whose beginning was cut.
      responses_truncated: responses whose end was cut (each chosen/rejected/group member counts).
      prompt_tokens_cut, response_tokens_cut: tokens removed in total.
      dropped: (record index, reason) of each record left out (only with errors="drop").
    """

    num_records: int = 0
    num_examples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0
    dropped: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.num_examples}/{self.num_records} records kept; "
                f"{self.prompts_truncated} prompts truncated ({self.prompt_tokens_cut} tokens "
                f"cut from their start), {self.responses_truncated} responses truncated "
                f"({self.response_tokens_cut} tokens cut from their end); "
                f"{len(self.dropped)} records dropped")
        if self.dropped:
            shown = "; ".join(reason for _, reason in self.dropped[:3])
            text += f" (e.g. {shown})"
        return text


def render(record: ParsedRecord, tokenizer) -> tuple[str, dict[str, tuple[str, ...]], bool]:
    """Turns a parsed record into prompt text and response texts.

    Message lists go through `tokenizer.apply_chat_template`: the prompt is rendered with
    `add_generation_prompt=True`, and each response is what rendering prompt + response adds
    after it.

    Returns:
      (prompt_text, role -> response texts, whether a chat template was applied).
    """
    if isinstance(record.prompt, str):
        return record.prompt, record.responses, False
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"record {record.index}: field 'prompt' is a conversation but the "
                         "tokenizer has no chat template; set tokenizer.chat_template")
    prompt_messages = list(record.prompt)
    prompt_text = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True,
                                                tokenize=False)
    responses = {}
    for role, completions in record.responses.items():
        texts = []
        for k, completion in enumerate(completions):
            full = tokenizer.apply_chat_template(prompt_messages + list(completion), tokenize=False)
            if not full.startswith(prompt_text):
                field = role if len(completions) == 1 else f"{role}[{k}]"
                raise ValueError(f"record {record.index}: field {field!r}: the chat template "
                                 "renders prompt + response with a different prompt prefix than "
                                 "the prompt alone, so the response cannot be split off")
            texts.append(full[len(prompt_text):])
        responses[role] = tuple(texts)
    return prompt_text, responses, True


def truncate(prompt_ids: Sequence[int], response_ids: Sequence[Sequence[int]], *, max_length: int,
             max_prompt_length: int, bos_token_id: int | None
             ) -> tuple[np.ndarray, list[np.ndarray], int, list[int]]:
    """Truncates one prompt and the responses that follow it.

    Returns:
      (prompt [P'], responses [R'_i], prompt tokens cut, response tokens cut per response).
    """
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    prompt_cut = max(0, len(prompt) - max_prompt_length)
    if prompt_cut:
        keep_bos = bos_token_id is not None and prompt[0] == bos_token_id
        tail = prompt[len(prompt) - max_prompt_length + keep_bos:]  # keep the prompt's end
        prompt = np.concatenate([prompt[:1], tail]) if keep_bos else tail
    budget = max_length - len(prompt)
    responses = [np.asarray(r[:budget], dtype=np.int32) for r in response_ids]
    return prompt, responses, prompt_cut, [max(0, len(r) - budget) for r in response_ids]


def tokenize_records(records: Sequence[ParsedRecord], tokenizer, *, max_length: int,
                     max_prompt_length: int, add_eos: bool = True, errors: str = "raise",
                     report: TruncationReport | None = None) -> list[TokenizedExample]:
    """Tokenizes and truncates parsed records, counting every cut in `report`.

    Args:
      records: parsed records (see `alignax.data.records.parse_record`).
      tokenizer: a transformers (fast) tokenizer.
      max_length: the most tokens of prompt + response in one sequence.
      max_prompt_length: the most prompt tokens (< max_length, so every response keeps >= 1).
      add_eos: end each response with `tokenizer.eos_token_id` (unless it already holds it).
      errors: "raise", or "drop" to leave out (and list in `report.dropped`) a record whose
        conversation cannot be rendered or whose response tokenizes to nothing.
      report: a TruncationReport to add counts to.

    Raises:
      ValueError: with errors="raise", naming the record index and field.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got max_prompt_length="
                         f"{max_prompt_length}, max_length={max_length}")
    if errors not in ("raise", "drop"):
        raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token")
    report = TruncationReport() if report is None else report

    def fail(index: int, message: str) -> None:
        if errors == "raise":
            raise ValueError(message)
        report.dropped.append((index, message))

    rendered = []
    for record in records:
        try:
            rendered.append((record, *render(record, tokenizer)))
        except ValueError as error:
            fail(record.index, str(error))
    prompt_ids: list = [None] * len(rendered)
    for chat, special in ((False, True), (True, False)):
        group = [i for i, r in enumerate(rendered) if r[3] == chat]
        if group:  # one batched (Rust-side) call per kind
            encoded = tokenizer([rendered[i][1] for i in group], add_special_tokens=special)
            for i, ids in zip(group, encoded["input_ids"]):
                prompt_ids[i] = ids
    flat = [text for *_, responses, _ in rendered for texts in responses.values() for text in texts]
    flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])

    examples = []
    for (record, _, texts, _), prompt in zip(rendered, prompt_ids):
        fields = [(role, role if len(role_texts) == 1 else f"{role}[{k}]")
                  for role, role_texts in texts.items() for k in range(len(role_texts))]
        response_ids = [list(next(flat_ids)) for _ in fields]
        empty = [field for (_, field), ids in zip(fields, response_ids) if not ids]
        if empty:
            fail(record.index, f"record {record.index}: field {empty[0]!r} tokenizes to no tokens")
            continue
        for ids in response_ids:
            if add_eos and eos not in ids:
                ids.append(eos)
        prompt, responses, prompt_cut, response_cuts = truncate(
            prompt, response_ids, max_length=max_length, max_prompt_length=max_prompt_length,
            bos_token_id=tokenizer.bos_token_id)
        report.prompts_truncated += prompt_cut > 0
        report.prompt_tokens_cut += prompt_cut
        report.responses_truncated += sum(cut > 0 for cut in response_cuts)
        report.response_tokens_cut += sum(response_cuts)
        by_role: dict[str, list[np.ndarray]] = {}
        for (role, _), ids in zip(fields, responses):
            by_role.setdefault(role, []).append(ids)
        examples.append(TokenizedExample(
            index=record.index, prompt_ids=prompt,
            responses={role: tuple(ids) for role, ids in by_role.items()},
            rewards=record.rewards, bin=record.bin))
    return examples
