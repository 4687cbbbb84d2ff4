"""Rendering (chat templates) and tokenization of parsed records, with counted truncation.

Every tokenized sequence is `prompt_ids + response_ids`. The rules (decided here):

- **Boundary.** `prompt_ids` is the prompt tokenized alone: exactly the ids `generate` will be
  given (with the tokenizer's special tokens, e.g. a bos, unless a chat template rendered the
  prompt and holds them itself). `response_ids` is what follows `prompt_ids` in the tokenization
  of the whole text prompt + response, so the sequence is the whole text's own tokenization
  whenever that begins with `prompt_ids` (as TRL's DPOTrainer splits). With a BPE tokenizer it
  does not when one token would straddle the boundary: "The sky is " + "blue." tokenizes whole as
  "... is", " blue", "." but the prompt alone ends "... is", " ". The prompt ids are kept (they
  are what the model will be given) and the response is tokenized on its own ("blue", "."): the
  ids a model given `prompt_ids` has to generate to continue with exactly that text. The sequence
  still decodes to prompt + response (checked), `TruncationReport.boundaries_retokenized` counts
  these responses, and a response that cannot be tokenized on its own without changing its text
  (a tokenizer that adds a prefix space) is refused with its record index.
- **Content is text.** Special-token strings inside a record's prompt or responses ("<|eos|>" in
  a response) are tokenized as ordinary characters (`split_special_tokens=True`), so no EOS or
  pad id appears inside a response; a chat template's own special tokens are still control
  tokens (the template is rendered once more with placeholders in place of the messages to tell
  its text from theirs). `special_token_text="control"` reads them as control tokens instead (for
  prompts that already hold a rendered chat template), "error" refuses such records; the report
  lists the records that hold such text in every case.
- **EOS.** Each response ends with `tokenizer.eos_token_id`: it is appended unless the response's
  ids already end with it. A chat template that closes the turn with EOS and then writes only
  whitespace ("<|im_end|>\\n") counts as ending with it, and so does a (non-chat) response whose
  text ends with the EOS token's text ("Done.<|eos|>": that final EOS is the control token, as
  TRL reads it; any other special-token text is text).
- **Truncation.** `truncation="keep_prompt_end"` (default) keeps the END of the prompt (and its
  leading bos) within `max_prompt_length`, then cuts the response to the remaining budget.
  `truncation="keep_start"` (TRL's DPOTrainer) keeps the prompt whole and cuts the response's end
  at `max_length`; a record whose prompt alone has `max_length` tokens or more is dropped and
  listed in the report. Every cut is counted in a `TruncationReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from alignax.data.records import ParsedRecord

SPECIAL_TOKEN_TEXT = ("text", "control", "error")
TRUNCATIONS = ("keep_prompt_end", "keep_start")

# A piece of a rendered sequence: (text, whether special-token strings in it are plain text), or
# the id of a control token a chat template wrote.
Piece = tuple[str, bool] | int
# A span [start, end) of a rendered text: a control token's id, or None for text.
Span = tuple[int, int, int | None]


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One record as token ids (int32, unpadded, already truncated).

    Attributes:
      index: the record's position in its dataset.
      prompt_ids: [P] prompt tokens.
      responses: role -> tuple of [R] response-token arrays (k of them for a grouped record).
      rewards: role -> target reward(s), as in `ParsedRecord`.
      bin: spurious-attribute bin of the record, or None.
      response_bins: role -> one bin per response (k for a grouped record), or empty.
      response_lengths: role -> each response's token count before truncation (EOS included).
    """

    index: int
    prompt_ids: np.ndarray
    responses: dict[str, tuple[np.ndarray, ...]]
    rewards: dict
    bin: int | None
    response_bins: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    response_lengths: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TruncationReport:
    """What preparing a dataset cut, dropped or read specially; `str(report)` summarises it.

    Attributes:
      num_records: records read.
      num_examples: examples kept (num_records - len(dropped)).
      prompts_truncated: prompts whose beginning was cut.
      responses_truncated: responses whose end was cut (each chosen/rejected/group member counts).
      prompt_tokens_cut, response_tokens_cut: tokens removed in total.
      boundaries_retokenized: responses tokenized on their own because a token of the whole text
        straddled the prompt/response boundary (module docstring).
      special_token_text: indices of the records whose content holds special-token text.
      dropped: (record index, reason) of each record left out (with errors="drop", or a prompt
        too long for truncation="keep_start").
    """

    num_records: int = 0
    num_examples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0
    boundaries_retokenized: int = 0
    special_token_text: list[int] = dataclasses.field(default_factory=list)
    dropped: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def noteworthy(self) -> bool:
        """Whether anything was cut, dropped, retokenized or held special-token text."""
        return bool(self.dropped or self.prompts_truncated or self.responses_truncated
                    or self.boundaries_retokenized or self.special_token_text)

    def __str__(self) -> str:
        text = (f"{self.num_examples}/{self.num_records} records kept; "
                f"{self.prompts_truncated} prompts truncated ({self.prompt_tokens_cut} tokens "
                f"cut from their start), {self.responses_truncated} responses truncated "
                f"({self.response_tokens_cut} tokens cut from their end); "
                f"{len(self.dropped)} records dropped")
        if self.dropped:
            shown = "; ".join(reason for _, reason in self.dropped[:3])
            text += f" (e.g. {shown})"
        if self.boundaries_retokenized:
            text += (f"; {self.boundaries_retokenized} responses tokenized apart from their "
                     "prompt (a token straddled the boundary, e.g. a prompt ending in a space)")
        if self.special_token_text:
            shown = ", ".join(map(str, self.special_token_text[:5]))
            text += (f"; {len(self.special_token_text)} records hold special-token text "
                     f"(records {shown}{', ...' if len(self.special_token_text) > 5 else ''})")
        return text


def _special_strings(tokenizer) -> dict[str, int]:
    """Special-token text -> id, longest first (so a regex alternation prefers the longest)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return {t: tokenizer.convert_tokens_to_ids(t)
            for t in sorted((t for t in tokens if t), key=len, reverse=True)}


@dataclasses.dataclass(frozen=True)
class RenderedRecord:
    """A parsed record as text: the prompt, and prompt + response for each response.

    Attributes:
      record: the parsed record.
      prompt: the prompt text (`fulls[k][2]` starts with it).
      fulls: (role, field, prompt + response text) per response, in role order.
      chat: whether a chat template rendered the texts (the template holds the special tokens).
      spans: per full text, its spans (a control token or text, module `Span`).
      split_special: whether special-token strings in the text spans are text.
      special_text: the first special-token string found in the record's content, or None.
      eos_text: per full text, whether its response text ended with the EOS token's text (cut
        off here; the response then ends with the EOS token).
    """

    record: ParsedRecord
    prompt: str
    fulls: tuple[tuple[str, str, str], ...]
    chat: bool
    spans: tuple[tuple[Span, ...], ...]
    split_special: bool
    special_text: str | None
    eos_text: tuple[bool, ...]

    def pieces(self, k: int, start: int, end: int) -> list[Piece]:
        """The pieces of `fulls[k]`'s text [start, end)."""
        text, out = self.fulls[k][2], []
        for a, b, control in self.spans[k]:
            lo, hi = max(a, start), min(b, end)
            if lo >= hi:
                continue
            if control is None:
                out.append((text[lo:hi], self.split_special))
            elif (lo, hi) != (a, b):
                raise ValueError(f"record {self.record.index}: the chat template's special token "
                                 f"{text[a:b]!r} straddles the prompt/response boundary")
            else:
                out.append(control)
        return out


def _find_special(texts: Sequence[str], specials: dict[str, int]) -> str | None:
    """The first special-token string found in `texts`, or None."""
    if specials:
        pattern = _special_pattern(tuple(specials))
        for text in texts:
            if found := pattern.search(text):
                return found.group(0)
    return None


@functools.lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in specials))  # longest first


def _template_spans(tokenizer, messages: list[dict], rendered: str, specials: dict[str, int],
                    index: int) -> tuple[Span, ...]:
    """Spans of `rendered` (the chat template applied to `messages`): the template's own special
    tokens as control tokens, everything else (its text and the messages' content) as text.

    The template is rendered again with a placeholder for each message's content, so a special
    token is the template's only if it lies outside every placeholder.
    """
    marks = [f"\ue000{k}\ue001" for k in range(len(messages))]
    masked = tokenizer.apply_chat_template(
        [{**m, "content": mark} for m, mark in zip(messages, marks)], tokenize=False)
    pattern = _special_pattern(tuple(specials))
    spans: list[Span] = []
    rebuilt: list[str] = []

    def add(text: str, control: int | None = None) -> None:
        start = spans[-1][1] if spans else 0
        if control is None and spans and spans[-1][2] is None:
            spans[-1] = (spans[-1][0], start + len(text), None)  # merge adjacent text
        elif text:
            spans.append((start, start + len(text), control))
        rebuilt.append(text)

    for piece in re.split("(\ue000\\d+\ue001)", masked):
        mark = re.fullmatch("\ue000(\\d+)\ue001", piece)
        if mark:
            add(messages[int(mark.group(1))]["content"])
            continue
        last = 0
        for match in pattern.finditer(piece):
            add(piece[last:match.start()])
            add(match.group(0), specials[match.group(0)])
            last = match.end()
        add(piece[last:])
    if "".join(rebuilt) != rendered:
        raise ValueError(f"record {index}: its messages hold special-token text, and the chat "
                         "template does not copy message contents verbatim, so its own special "
                         "tokens cannot be told from that text; pass special_token_text="
                         "'control' or 'error', or remove the text")
    return tuple(spans)


def render(record: ParsedRecord, tokenizer, *, special_token_text: str = "text",
           specials: dict[str, int] | None = None) -> RenderedRecord:
    """Turns a parsed record into prompt text and prompt + response texts.

    Message lists go through `tokenizer.apply_chat_template`: the prompt is rendered with
    `add_generation_prompt=True`, and each response is what rendering prompt + response adds
    after it.

    Raises:
      ValueError: naming the record, if the template renders prompt + response with another
        prompt prefix, or the content holds special-token text and special_token_text="error".
    """
    specials = _special_strings(tokenizer) if specials is None else specials
    index = record.index
    fields = [(role, role if len(completions) == 1 else f"{role}[{k}]", completion)
              for role, completions in record.responses.items()
              for k, completion in enumerate(completions)]
    eos = tokenizer.eos_token
    if isinstance(record.prompt, str):
        prompt, chat = record.prompt, False
        eos_text = tuple(bool(eos) and special_token_text != "control" and c.endswith(eos)
                         for *_, c in fields)
        fields = [(role, field, c[:len(c) - len(eos)] if cut else c)
                  for (role, field, c), cut in zip(fields, eos_text)]
        fulls = tuple((role, field, prompt + completion) for role, field, completion in fields)
        special = _find_special([prompt, *(c for *_, c in fields)], specials)
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"record {index}: field 'prompt' is a conversation but the "
                             "tokenizer has no chat template; set tokenizer.chat_template")
        chat, eos_text = True, (False,) * len(fields)
        prompt_messages = list(record.prompt)
        prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True,
                                               tokenize=False)
        conversations, texts = [], []
        for role, field, completion in fields:
            conversation = prompt_messages + list(completion)
            full = tokenizer.apply_chat_template(conversation, tokenize=False)
            if not full.startswith(prompt):
                raise ValueError(f"record {index}: field {field!r}: the chat template renders "
                                 "prompt + response with a different prompt prefix than the "
                                 "prompt alone, so the response cannot be split off")
            conversations.append(conversation)
            texts.append((role, field, full))
        fulls = tuple(texts)
        special = _find_special(
            [m["content"] for m in prompt_messages]
            + [m["content"] for *_, completion in fields for m in completion], specials)
    if special is not None and special_token_text == "error":
        raise ValueError(f"record {index}: its content holds the special-token text "
                         f"{special!r}; remove it, or pass special_token_text='text' (tokenize "
                         "it as characters) or 'control'")
    if chat and special is not None and special_token_text == "text":
        spans = tuple(_template_spans(tokenizer, conversation, full, specials, index)
                      for conversation, (*_, full) in zip(conversations, fulls))
    else:
        spans = tuple(((0, len(full), None),) for *_, full in fulls)
    return RenderedRecord(record=record, prompt=prompt, fulls=fulls, chat=chat, spans=spans,
                          split_special=special_token_text == "text" and not (
                              chat and special is None),
                          special_text=special, eos_text=eos_text)


def _encode(tokenizer, sequences: Sequence[tuple[list[Piece], bool]]) -> list[list[int]]:
    """Token ids of each (pieces, add_special_tokens) sequence, with one batched tokenizer call
    per kind of text piece. add_special_tokens applies to single-piece sequences only."""
    jobs: dict[tuple[bool, bool], list[tuple[int, int, str]]] = collections.defaultdict(list)
    for i, (pieces, add_special) in enumerate(sequences):
        for j, piece in enumerate(pieces):
            if not isinstance(piece, int):
                text, split = piece
                jobs[add_special and len(pieces) == 1, split].append((i, j, text))
    parts: list[list] = [[[p] if isinstance(p, int) else None for p in pieces]
                         for pieces, _ in sequences]
    for (add_special, split), items in jobs.items():
        encoded = tokenizer([text for *_, text in items], add_special_tokens=add_special,
                            split_special_tokens=split)["input_ids"]
        for (i, j, _), ids in zip(items, encoded):
            parts[i][j] = list(ids)
    return [[t for part in sequence for t in part] for sequence in parts]


def _ends_with_eos(ids: Sequence[int], eos: int, tokenizer, chat: bool) -> bool:
    """Whether `ids` end with EOS, or (chat templates) with EOS and then whitespace only."""
    j = len(ids)
    while chat and j and ids[j - 1] != eos and not tokenizer.decode(ids[j - 1:j]).strip():
        j -= 1
    return j > 0 and ids[j - 1] == eos


def truncate(prompt_ids: Sequence[int], response_ids: Sequence[Sequence[int]], *, max_length: int,
             max_prompt_length: int, bos_token_id: int | None
             ) -> tuple[np.ndarray, list[np.ndarray], int, list[int]]:
    """Truncates one prompt (keeping its end and leading bos) and the responses that follow it.

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
                     max_prompt_length: int | None = None, add_eos: bool = True,
                     errors: str = "raise", special_token_text: str = "text",
                     truncation: str = "keep_prompt_end",
                     report: TruncationReport | None = None) -> list[TokenizedExample]:
    """Tokenizes and truncates parsed records (rules in the module docstring), counting every
    cut in `report`.

    Args:
      records: parsed records (see `alignax.data.records.parse_record`).
      tokenizer: a transformers tokenizer.
      max_length: the most tokens of prompt + response in one sequence.
      max_prompt_length: truncation="keep_prompt_end" only: the most prompt tokens
        (< max_length, so every response keeps >= 1); default max_length // 2.
      add_eos: end each response with `tokenizer.eos_token_id` (unless it already ends with it).
      errors: "raise", or "drop" to leave out (and list in `report.dropped`) a record whose
        conversation cannot be rendered or whose response tokenizes to nothing.
      special_token_text: "text" (default), "control" or "error": how special-token strings in
        the records' content are read.
      truncation: "keep_prompt_end" (default) or "keep_start" (TRL's).
      report: a TruncationReport to add counts to.

    Raises:
      ValueError: with errors="raise", naming the record index and field.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if truncation == "keep_start":
        if max_prompt_length is not None:
            raise ValueError("max_prompt_length applies to truncation='keep_prompt_end'; "
                             "truncation='keep_start' keeps the whole prompt")
        max_prompt_length = max_length - 1
    elif max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got max_prompt_length="
                         f"{max_prompt_length}, max_length={max_length}")
    if errors not in ("raise", "drop"):
        raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}")
    if special_token_text not in SPECIAL_TOKEN_TEXT:
        raise ValueError(f"special_token_text must be one of {SPECIAL_TOKEN_TEXT}, got "
                         f"{special_token_text!r}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token")
    report = TruncationReport() if report is None else report
    specials = _special_strings(tokenizer)

    def fail(index: int, message: str) -> None:
        if errors == "raise":
            raise ValueError(message)
        report.dropped.append((index, message))

    rendered: list[RenderedRecord] = []
    for record in records:
        try:
            rendered.append(render(record, tokenizer, special_token_text=special_token_text,
                                   specials=specials))
        except ValueError as error:
            fail(record.index, str(error))
    report.special_token_text.extend(r.record.index for r in rendered if r.special_text)

    # prompt alone, then prompt + each response: one batched call per kind of text
    sequences = []
    for r in rendered:
        sequences.append((r.pieces(0, 0, len(r.prompt)), not r.chat))
        sequences.extend((r.pieces(k, 0, len(full)), not r.chat) for k, (*_, full) in
                         enumerate(r.fulls))
    encoded = iter(_encode(tokenizer, sequences))
    prompts, fulls = [], []
    for r in rendered:
        prompts.append(next(encoded))
        fulls.append([next(encoded) for _ in r.fulls])
    # a chat template split into pieces must tokenize as the whole rendered text does, up to
    # the content's special-token text (which the pieces read as text)
    split = [(i, k) for i, r in enumerate(rendered) if r.chat and r.split_special
             for k in range(len(r.fulls))]
    whole = _encode(tokenizer, [([(rendered[i].fulls[k][2], False)], False) for i, k in split])
    bad = {i for (i, k), ids in zip(split, whole)
           if tokenizer.decode(ids) != tokenizer.decode(fulls[i][k])}
    # responses whose whole-text tokens do not start with the prompt's: tokenized on their own
    straddling = [(i, k) for i, (prompt, full_ids) in enumerate(zip(prompts, fulls))
                  for k, ids in enumerate(full_ids) if ids[:len(prompt)] != prompt]
    alone = dict(zip(straddling, _encode(tokenizer, [
        (rendered[i].pieces(k, len(rendered[i].prompt), len(rendered[i].fulls[k][2])), False)
        for i, k in straddling])))

    examples = []
    for i, (r, prompt) in enumerate(zip(rendered, prompts)):
        index = r.record.index
        if i in bad:
            fail(index, f"record {index}: the chat template's text tokenizes differently in "
                        "pieces (its special tokens strip whitespace, or the tokenizer adds a "
                        "prefix space); its content holds special-token text "
                        f"{r.special_text!r}: remove it, or pass special_token_text='control'")
            continue
        response_ids, problem = [], None
        for k, (_, field, _) in enumerate(r.fulls):
            full = fulls[i][k]
            if (i, k) not in alone:
                ids = full[len(prompt):]
            else:
                ids = alone[i, k]
                if tokenizer.decode(prompt + ids) != tokenizer.decode(full):
                    problem = (f"record {index}: field {field!r}: a token straddles the "
                               "prompt/response boundary and the response cannot be tokenized "
                               "on its own without changing its text; end the prompt at a word "
                               "boundary (move its trailing whitespace into the responses)")
                    break
            if not ids:
                problem = f"record {index}: field {field!r} tokenizes to no tokens"
                break
            if (add_eos or r.eos_text[k]) and not _ends_with_eos(ids, eos, tokenizer, r.chat):
                ids = ids + [eos]
            response_ids.append(ids)
        if problem is not None:
            fail(index, problem)
            continue
        if truncation == "keep_start" and len(prompt) >= max_length:
            report.dropped.append((index, f"record {index}: its prompt of {len(prompt)} tokens "
                                          f"leaves no room for a response within max_length="
                                          f"{max_length} (truncation='keep_start')"))
            continue
        report.boundaries_retokenized += sum((i, k) in alone for k in range(len(r.fulls)))
        kept_prompt, responses, prompt_cut, response_cuts = truncate(
            prompt, response_ids, max_length=max_length, max_prompt_length=max_prompt_length,
            bos_token_id=tokenizer.bos_token_id)
        report.prompts_truncated += prompt_cut > 0
        report.prompt_tokens_cut += prompt_cut
        report.responses_truncated += sum(cut > 0 for cut in response_cuts)
        report.response_tokens_cut += sum(response_cuts)
        by_role: dict[str, list[np.ndarray]] = {}
        lengths: dict[str, list[int]] = {}
        for (role, _, _), ids, full_ids in zip(r.fulls, responses, response_ids):
            by_role.setdefault(role, []).append(ids)
            lengths.setdefault(role, []).append(len(full_ids))
        examples.append(TokenizedExample(
            index=index, prompt_ids=kept_prompt,
            responses={role: tuple(ids) for role, ids in by_role.items()},
            rewards=r.record.rewards, bin=r.record.bin,
            response_bins=r.record.response_bins,
            response_lengths={role: tuple(n) for role, n in lengths.items()}))
    return examples
