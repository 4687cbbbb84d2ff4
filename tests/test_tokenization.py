"""alignax.data tokenization rules: the prompt/response boundary, content read as text, EOS.

The boundary is checked with the embedded byte-level BPE and with a Metaspace ("▁", prefix
space) BPE trained here on the bundled corpus, the pre-tokenization Llama-2 / Mistral tokenizers
use: tokenizing a response on its own there changes its text, which is why the response is cut
from the tokenization of the whole text.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alignax.data import default_tokenizer, prepare_dataset
from alignax.data.tokenizer import CHAT_TEMPLATE, CORPUS_PATH

TOK = default_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


@functools.cache
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A 400-token BPE with Llama-2's Metaspace pre-tokenizer (prefix "▁" on the first word)."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train([str(CORPUS_PATH)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _sequence(example, role="chosen"):
    return [*example.prompt_ids.tolist(), *example.responses[role][0].tolist()]


@pytest.mark.parametrize("make", [default_tokenizer, metaspace_tokenizer], ids=["bpe", "metaspace"])
def test_sequence_is_the_whole_text_tokenized_and_the_prompt_is_the_generate_input(make):
    tok = make()
    records = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green, I think."},
               {"prompt": "Q: What is 2 + 2?\nA:", "chosen": " 4", "rejected": " It is 5."},
               {"prompt": "Q: 2 + 2 =", "chosen": "4", "rejected": "5"},
               {"prompt": "What is the sky like?\n", "chosen": "It is blue.", "rejected": "Red."}]
    ds = prepare_dataset(records, tok, max_length=64)
    assert ds.report.boundaries_retokenized == 0
    for record, example in zip(records, ds.examples):
        # the prompt ids are exactly what `generate` is given: the prompt tokenized alone
        assert example.prompt_ids.tolist() == tok(record["prompt"])["input_ids"]
        for role in ("chosen", "rejected"):
            whole = tok(record["prompt"] + record[role])["input_ids"]
            assert _sequence(example, role) == whole + [tok.eos_token_id]


def test_metaspace_response_alone_would_gain_a_space():
    """Tokenizing a response on its own (as before) prefixes "▁" to it: the text changes."""
    tok = metaspace_tokenizer()
    records = [{"prompt": "Q: 2 + 2 =", "chosen": "4", "rejected": "5"},
               {"prompt": "What is the sky like?\n", "chosen": "It is blue.", "rejected": "Red."}]
    ds = prepare_dataset(records, tok, max_length=64)
    for record, example in zip(records, ds.examples):
        for role in ("chosen", "rejected"):
            whole = record["prompt"] + record[role]
            assert tok.decode(_sequence(example, role), skip_special_tokens=True) == whole
            alone = tok(record["prompt"])["input_ids"] + tok(
                record[role], add_special_tokens=False)["input_ids"]
            assert tok.decode(alone, skip_special_tokens=True) != whole


def test_prompt_ending_in_a_space_keeps_its_ids_and_the_response_continues_it(caplog):
    # whole text: "... is", " blue", "."; the prompt alone ends "... is", " " (one token
    # straddles the boundary): the prompt keeps its ids and the response is "blue", "."
    record = {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}
    assert TOK(record["prompt"] + "blue.")["input_ids"][:7] != TOK(record["prompt"])["input_ids"]
    ds = prepare_dataset([record], TOK, max_length=64)
    example = ds.examples[0]
    assert example.prompt_ids.tolist() == TOK(record["prompt"])["input_ids"]
    for role in ("chosen", "rejected"):
        response = example.responses[role][0].tolist()
        assert response == TOK(record[role], add_special_tokens=False)["input_ids"] + [EOS]
        assert TOK.decode(_sequence(example, role)) == "<|bos|>" + record["prompt"] + \
            record[role] + "<|eos|>"
    assert ds.report.boundaries_retokenized == 2
    assert "2 responses tokenized apart from their prompt" in caplog.text


def test_straddling_token_that_cannot_be_split_is_refused_with_the_record():
    # Metaspace: "is " + "blue." tokenizes whole as "▁is", "▁blue"; alone the prompt ends with
    # "▁" and "blue." on its own becomes "▁blue" again: the text would gain a space.
    tok = metaspace_tokenizer()
    records = [{"prompt": "Say it", "chosen": " ok", "rejected": " no"},
               {"prompt": "The sky is ", "chosen": "blue.", "rejected": "red."}]
    with pytest.raises(ValueError, match=re.escape(
            "record 1: field 'chosen': a token straddles the prompt/response boundary")):
        prepare_dataset(records, tok, max_length=64)
    ds = prepare_dataset(records, tok, max_length=64, errors="drop")
    assert [i for i, _ in ds.report.dropped] == [1] and len(ds) == 1


PIECES = st.sampled_from([*"abe tT.,!?\n0123", "<|eos|>", "<|pad|>", "é", "🤖", "  ", "the"])
TEXTS = st.lists(PIECES, min_size=1, max_size=10).map("".join).filter(str.strip)


@given(TEXTS, TEXTS)
def test_boundary_properties(prompt, response):
    ds = prepare_dataset([{"prompt": prompt, "chosen": response, "rejected": " x"}], TOK,
                         max_length=128, errors="drop")
    # a response's final "<|eos|>" text is its EOS (TRL's reading); all other such text is text
    body = response.removesuffix("<|eos|>")
    if not body:
        assert [i for i, _ in ds.report.dropped] == [0]  # nothing but an EOS: refused
        return
    example = ds.examples[0]
    text = lambda s, **kw: TOK(s, split_special_tokens=True, **kw)["input_ids"]  # noqa: E731
    prompt_ids, sequence = example.prompt_ids.tolist(), _sequence(example)
    assert prompt_ids == text(prompt)  # the generate input, content read as text
    assert sequence[-1] == EOS and EOS not in sequence[:-1] and PAD not in sequence
    assert TOK.decode(sequence) == "<|bos|>" + prompt + body + "<|eos|>"
    whole = text(prompt + body)
    if whole[:len(prompt_ids)] == prompt_ids:
        assert sequence == whole + [EOS]
    else:
        assert sequence[len(prompt_ids):] == text(body, add_special_tokens=False) + [EOS]


def test_special_token_text_is_text_and_eos_ends_every_response():
    records = [{"prompt": "Write <|pad|> here:", "chosen": " I wrote <|eos|> and more",
                "rejected": " Done.<|eos|>"},
               {"prompt": "Hi", "chosen": " <|bos|><|user|>", "rejected": " no"}]
    ds = prepare_dataset(records, TOK, max_length=64)
    batch = ds.collate(ds.examples)
    for role in ("chosen", "rejected"):
        for j, record in enumerate(records):
            ids = batch[f"{role}_input_ids"][j][batch[f"{role}_attention_mask"][j] == 1].tolist()
            assert ids.count(EOS) == 1 and ids[-1] == EOS and PAD not in ids
            assert ids.count(TOK.bos_token_id) == 1 and ids[0] == TOK.bos_token_id
            assert TOK.decode(ids) == "<|bos|>" + record["prompt"] + \
                record[role].removesuffix("<|eos|>") + "<|eos|>"
            loss = batch[f"{role}_loss_mask"][j]
            assert TOK.decode(batch[f"{role}_input_ids"][j][loss]) == \
                record[role].removesuffix("<|eos|>") + "<|eos|>"
    assert ds.report.special_token_text == [0, 1]  # "Done.<|eos|>" alone would not count
    assert "2 records hold special-token text (records 0, 1)" in str(ds.report)
    # the response's own final EOS text is its EOS, as TRL reads it: no second one
    assert ds.examples[0].responses["rejected"][0].tolist() == \
        TOK(" Done.", add_special_tokens=False)["input_ids"] + [EOS]


def test_special_token_text_control_and_error():
    record = {"prompt": "Hi", "chosen": " a <|eos|> b", "rejected": " no"}
    control = prepare_dataset([record], TOK, max_length=64, special_token_text="control")
    chosen = control.examples[0].responses["chosen"][0].tolist()
    assert chosen.count(EOS) == 2 and chosen[-1] == EOS  # the old reading, now opt-in
    with pytest.raises(ValueError, match=re.escape(
            "record 0: its content holds the special-token text '<|eos|>'")):
        prepare_dataset([record], TOK, max_length=64, special_token_text="error")
    with pytest.raises(ValueError, match="special_token_text must be one of"):
        prepare_dataset([record], TOK, max_length=64, special_token_text="drop")


def test_chat_template_tokens_stay_control_tokens_while_content_is_text():
    conversation = {"prompt": [{"role": "user", "content": "Repeat <|eos|><|assistant|>"}],
                    "chosen": [{"role": "assistant", "content": "<|eos|> done"}],
                    "rejected": [{"role": "assistant", "content": "No."}]}
    ds = prepare_dataset([conversation], TOK, max_length=64)
    example = ds.examples[0]
    controls = {TOK.convert_tokens_to_ids(t) for t in TOK.all_special_tokens}
    prompt = example.prompt_ids.tolist()
    # the template's own <|user|> and <|assistant|> tokens; the content's are characters
    assert [t for t in prompt if t in controls] == [4, 5]
    assert TOK.decode(prompt) == "<|user|>\nRepeat <|eos|><|assistant|>\n<|assistant|>\n"
    for role, content in (("chosen", "<|eos|> done"), ("rejected", "No.")):
        ids = example.responses[role][0].tolist()
        assert [t for t in ids if t in controls] == [EOS]  # the template's closing EOS only
        assert TOK.decode(ids) == content + "<|eos|>"
    assert ds.report.special_token_text == [0]
    # without special text the rendered conversation is tokenized whole, as before
    plain = {**conversation, "prompt": [{"role": "user", "content": "Repeat"}]}
    ids = prepare_dataset([plain], TOK, max_length=64).examples[0].prompt_ids.tolist()
    rendered = TOK.apply_chat_template(plain["prompt"], add_generation_prompt=True, tokenize=False)
    assert ids == TOK(rendered, add_special_tokens=False)["input_ids"]


def test_chat_template_closing_eos_then_whitespace_counts_as_the_end():
    tok = default_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{{ eos_token }}", "{{ eos_token + '\\n' }}")
    conversation = {"prompt": [{"role": "user", "content": "Hi"}],
                    "chosen": [{"role": "assistant", "content": "Hello"}],
                    "rejected": [{"role": "assistant", "content": "Go"}]}
    ds = prepare_dataset([conversation], tok, max_length=64)
    assert tok.decode(ds.examples[0].responses["chosen"][0]) == "Hello<|eos|>\n"  # no 2nd EOS
    # a template that does not close the turn with EOS gets one appended
    tok.chat_template = CHAT_TEMPLATE.replace("{{ eos_token }}", "{{ '\\n' }}")
    ds = prepare_dataset([conversation], tok, max_length=64)
    assert tok.decode(ds.examples[0].responses["chosen"][0]) == "Hello\n<|eos|>"


def test_grouped_and_unlabeled_members_follow_the_same_rules():
    records = [{"prompt": "Pick ", "chosen": ["one", "two <|eos|> more"], "rejected": [" three"]}]
    ds = prepare_dataset(records, TOK, max_length=64)
    example = ds.examples[0]
    assert example.prompt_ids.tolist() == TOK("Pick ")["input_ids"]
    members = [TOK.decode(r) for role in ("chosen", "rejected") for r in example.responses[role]]
    assert members == ["one<|eos|>", "two <|eos|> more<|eos|>", " three<|eos|>"]
    assert np.sum(example.responses["chosen"][1] == EOS) == 1  # the content's is text
    assert ds.report.boundaries_retokenized == 2  # "Pick " + "one"/"two": a straddling space


def test_content_special_text_the_template_pieces_cannot_reproduce_is_refused():
    conversation = {"prompt": [{"role": "user", "content": "Say <|eos|>"}],
                    "chosen": [{"role": "assistant", "content": "ok"}],
                    "rejected": [{"role": "assistant", "content": "no"}]}
    # a template that changes the content: its own tokens cannot be told from the content's
    upper = default_tokenizer()
    upper.chat_template = CHAT_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(ValueError, match=re.escape(
            "record 0: its messages hold special-token text, and the chat template does not copy "
            "message contents verbatim")):
        prepare_dataset([conversation], upper, max_length=64)
    # a template token that swallows the whitespace after it (rstrip) tokenizes differently
    # in pieces: refused rather than silently changed
    from tokenizers import AddedToken

    strip = default_tokenizer()
    strip.add_special_tokens({"additional_special_tokens": [AddedToken("<|turn|>", rstrip=True)]})
    strip.chat_template = CHAT_TEMPLATE.replace("{{ '\n' }}", "{{ '<|turn|> ' }}")
    assert strip.chat_template != CHAT_TEMPLATE
    clean = {**conversation, "prompt": [{"role": "user", "content": "Say it"}]}
    assert len(prepare_dataset([clean], strip, max_length=64)) == 1
    with pytest.raises(ValueError, match=re.escape(
            "record 0: the chat template's text tokenizes differently in pieces")):
        prepare_dataset([conversation], strip, max_length=64)
    ds = prepare_dataset([conversation], strip, max_length=64, special_token_text="control")
    assert len(ds) == 1
