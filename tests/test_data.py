"""alignax.data: record formats on local files in real hub layouts, truncation, batching."""

from __future__ import annotations

import json
import re

import datasets
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alignax.data import (
    bucket_lengths, default_tokenizer, load_records, parse_record, prepare_dataset)
from alignax.data.tokenize import truncate
from alignax.data.tokenizer import TOKENIZER_PATH, train_default_tokenizer
from alignax.logprobs import next_token_targets, sequence_logprobs

TOK = default_tokenizer()

# Anthropic/hh-rlhf layout: two full transcripts, the prompt is shared up to the last
# "\n\nAssistant:" (multi-turn in record 0).
HH = [
    {"chosen": "\n\nHuman: What is a good way to learn to cook?\n\nAssistant: Start with simple "
               "recipes.\n\nHuman: Which ones?\n\nAssistant: Eggs, rice and soup are easy.",
     "rejected": "\n\nHuman: What is a good way to learn to cook?\n\nAssistant: Start with simple "
                 "recipes.\n\nHuman: Which ones?\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Is the moon a planet?\n\nAssistant: No, it is Earth's satellite.",
     "rejected": "\n\nHuman: Is the moon a planet?\n\nAssistant: Yes."},
    {"chosen": "\n\nHuman: Say something nice.\n\nAssistant: You are doing great!",
     "rejected": "\n\nHuman: Say something nice.\n\nAssistant: No."},
]

# TRL standard preference layout (e.g. trl-lib datasets in "standard" form).
TRL = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Write a review of the film.", "chosen": " The film was wonderful.",
     "rejected": " bad"},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " chair"},
]


def _uf_record(i: int, question: str, good: str, bad: str) -> dict:
    # HuggingFaceH4/ultrafeedback_binarized layout: chosen/rejected hold the whole conversation
    # (user turn included), beside a string prompt, a messages copy and the two scores.
    chosen = [{"content": question, "role": "user"}, {"content": good, "role": "assistant"}]
    rejected = [{"content": question, "role": "user"}, {"content": bad, "role": "assistant"}]
    return {"prompt": question, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.5}


UF = [_uf_record(0, "How do I keep a plant alive?", "Water it weekly and give it light.", "Ignore it."),
      _uf_record(1, "What is 3 + 4?", "3 + 4 = 7.", "It is 8.")]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _decode(ids, mask):
    return TOK.decode(np.asarray(ids)[np.asarray(mask, bool)])


def test_default_tokenizer_is_the_shipped_training_run_and_round_trips():
    shipped = json.loads(TOKENIZER_PATH.read_text())["model"]
    fresh = json.loads(train_default_tokenizer().to_str())["model"]
    assert shipped["vocab"] == fresh["vocab"] and shipped["merges"] == fresh["merges"]
    assert (len(TOK), TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id) == (1024, 0, 1, 2)
    text = "Ünïcode 🤖, tabs\tand  spaces\n\nHuman: hi"
    ids = TOK(text)["input_ids"]
    assert ids[0] == TOK.bos_token_id and TOK.decode(ids[1:]) == text
    prompt = [{"role": "user", "content": "hi"}]
    rendered = TOK.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = TOK.apply_chat_template(prompt + [{"role": "assistant", "content": "yo"}], tokenize=False)
    assert full == rendered + "yo" + TOK.eos_token


def test_hh_jsonl_splits_at_last_assistant_turn(tmp_path):
    path = _write_jsonl(tmp_path / "hh.jsonl", HH)
    ds = prepare_dataset(path, TOK, max_length=128)
    assert ds.format == "hh" and len(ds) == 3 and not ds.report.dropped
    batch = ds.collate(ds.examples)
    for j, record in enumerate(HH):
        for role in ("chosen", "rejected"):
            ids, attention = batch[f"{role}_input_ids"][j], batch[f"{role}_attention_mask"][j]
            loss = batch[f"{role}_loss_mask"][j]
            cut = record[role].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            # the response is exactly the text after the last assistant marker, plus eos
            assert _decode(ids, loss) == record[role][cut:] + TOK.eos_token
            assert TOK.decode(ids[attention.astype(bool)]) == TOK.bos_token + record[role] + TOK.eos_token
            assert not loss[~attention.astype(bool)].any()


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_trl_standard_files(tmp_path, suffix):
    path = tmp_path / f"trl.{suffix}"
    frame = pd.DataFrame(TRL)
    {"parquet": frame.to_parquet, "csv": lambda p: frame.to_csv(p, index=False),
     "jsonl": lambda p: frame.to_json(p, orient="records", lines=True)}[suffix](path)
    records = load_records(path)
    assert records.column_names == ["prompt", "chosen", "rejected"] and len(records) == 4
    ds = prepare_dataset(records, TOK, max_length=64)
    batch = ds.collate(ds.examples)
    assert ds.format == "standard"
    for j, record in enumerate(TRL):
        assert _decode(batch["chosen_input_ids"][j], batch["chosen_loss_mask"][j]) == \
            record["chosen"] + TOK.eos_token
        prompt = batch["prompt_input_ids"][j][batch["prompt_attention_mask"][j].astype(bool)]
        assert TOK.decode(prompt) == TOK.bos_token + record["prompt"]
        assert batch["prompt_attention_mask"][j, -1] == 1  # prompts are left-padded


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_ultrafeedback_conversations_use_the_chat_template(tmp_path, suffix):
    path = tmp_path / f"uf.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(path, UF)
    else:
        pd.DataFrame(UF).to_parquet(path)
    ds = prepare_dataset(load_records(path), TOK, max_length=64)
    assert ds.format == "conversational"
    batch = ds.collate(ds.examples)
    for j, record in enumerate(UF):
        question, good = record["chosen"][0]["content"], record["chosen"][1]["content"]
        attended = batch["chosen_attention_mask"][j].astype(bool)
        assert TOK.decode(batch["chosen_input_ids"][j][attended]) == \
            f"<|user|>\n{question}\n<|assistant|>\n{good}<|eos|>"
        assert _decode(batch["chosen_input_ids"][j], batch["chosen_loss_mask"][j]) == good + "<|eos|>"
        bad = record["rejected"][1]["content"]
        assert _decode(batch["rejected_input_ids"][j], batch["rejected_loss_mask"][j]) == bad + "<|eos|>"


def test_tokenizer_from_a_saved_directory(tmp_path):
    TOK.save_pretrained(tmp_path / "tok")
    a = prepare_dataset(UF, str(tmp_path / "tok"), max_length=64)
    b = prepare_dataset(UF, TOK, max_length=64)
    for x, y in zip(a.collate(a.examples).values(), b.collate(b.examples).values()):
        np.testing.assert_array_equal(x, y)


def test_trl_conversational_with_explicit_prompt_matches_implicit_prompt():
    explicit = [{"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
                for r in UF]
    a = prepare_dataset(explicit, TOK, max_length=64)
    b = prepare_dataset(UF, TOK, max_length=64)
    for x, y in zip(a.collate(a.examples).values(), b.collate(b.examples).values()):
        np.testing.assert_array_equal(x, y)


def test_masks_feed_sequence_logprobs():
    ds = prepare_dataset(TRL, TOK, max_length=32)
    batch = ds.collate(ds.examples)
    ids, loss = batch["chosen_input_ids"], batch["chosen_loss_mask"]
    logits = np.random.default_rng(0).normal(size=(*ids.shape, len(TOK))).astype(np.float32)
    targets, mask = next_token_targets(jnp.asarray(ids), jnp.asarray(loss))
    got = sequence_logprobs(jnp.asarray(logits), targets, mask)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    expected = [sum(logp[b, t - 1, ids[b, t]] for t in np.flatnonzero(loss[b]))
                for b in range(len(ids))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_grouped_records_pad_groups_with_masked_members():
    records = [{"prompt": "Tell a joke.", "chosen": [" Ha.", " Hee hee."], "rejected": [" No."]},
               {"prompt": "Hi", "chosen": [" Hello!"], "rejected": [" Go.", " Bye.", " ..."]}]
    ds = prepare_dataset(records, TOK, max_length=32)
    batch = ds.collate(ds.examples)
    assert ds.format == "grouped" and ds.group_sizes == {"chosen": 2, "rejected": 3}
    assert batch["chosen_input_ids"].shape == (2, 2, 32)
    np.testing.assert_array_equal(batch["chosen_group_mask"], [[1, 1], [1, 0]])
    np.testing.assert_array_equal(batch["rejected_group_mask"], [[1, 0, 0], [1, 1, 1]])
    assert _decode(batch["rejected_input_ids"][1, 2], batch["rejected_loss_mask"][1, 2]) == " ...<|eos|>"
    absent = ~batch["chosen_group_mask"]
    assert not batch["chosen_loss_mask"][absent].any()
    assert (batch["chosen_attention_mask"][absent].sum(-1) == 1).all()  # no fully masked row


def test_unlabeled_pairs_with_rewards_and_bins():
    scalar = [{"prompt": f"p{i}", "response_1": " a" * (i + 1), "response_2": " b",
               "target_rewards_1": 0.5 * i, "target_rewards_2": -1.0, "length_bin": i % 2}
              for i in range(3)]
    ds = prepare_dataset(scalar, TOK, max_length=32, bin_column="length_bin")
    batch = ds.collate(ds.examples)
    assert ds.format == "unlabeled"
    np.testing.assert_allclose(batch["target_rewards_1"], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(batch["bin"], [0, 1, 0])
    ensemble = [{**r, "target_rewards_1": [1.0, 2.0], "target_rewards_2": [3.0, float(i)]}
                for i, r in enumerate(scalar)]
    ds = prepare_dataset(ensemble, TOK, max_length=32,
                         bin_fn=lambda r: len(r["response_1"]) // 4)
    batch = ds.collate(ds.examples)
    assert batch["target_rewards_2"].shape == (2, 3)  # [E, B]
    np.testing.assert_allclose(batch["target_rewards_2"][1], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(batch["bin"], [0, 1, 1])


MALFORMED = [
    ({"prompt": "p", "rejected": " r"}, "standard", "'chosen' is missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": " r"}, "standard", "'chosen' is empty"),
    ({"prompt": 3, "chosen": "c", "rejected": " r"}, "standard", "'prompt' must be a string"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}, "hh",
     "'chosen' has no"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "hh",
     "'rejected' does not share"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "conversational",
     "'prompt[0].content' is missing"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "conversational",
     "'chosen[0].role' must be 'assistant'"),
    ({"prompt": "p", "chosen": [" a", ""], "rejected": [" b"]}, "grouped", "'chosen[1]' is empty"),
    ({"prompt": "p", "chosen": [], "rejected": [" b"]}, "grouped", "'chosen' must be a non-empty"),
    ({"prompt": "p", "response_1": " a", "response_2": " b", "target_rewards_1": float("nan"),
      "target_rewards_2": 1.0}, "unlabeled", "'target_rewards_1' must hold finite"),
    ({"prompt": "p", "response_1": " a", "response_2": " b", "target_rewards_1": [1.0, 2.0],
      "target_rewards_2": [1.0]}, "unlabeled", "'target_rewards_2' has shape"),
]


@pytest.mark.parametrize("bad, format, message", MALFORMED)
def test_malformed_record_names_index_and_field(bad, format, message):
    good = {"standard": TRL[0], "hh": HH[1], "conversational": {"prompt": UF[0]["chosen"][:1],
            "chosen": UF[0]["chosen"][1:], "rejected": UF[0]["rejected"][1:]},
            "grouped": {"prompt": "p", "chosen": [" a"], "rejected": [" b"]},
            "unlabeled": {"prompt": "p", "response_1": " a", "response_2": " b",
                          "target_rewards_1": 1.0, "target_rewards_2": 0.0}}[format]
    records = [good, good, good, bad, good]
    with pytest.raises(ValueError, match=re.escape(f"record 3: field {message}")):
        prepare_dataset(records, TOK, format=format, max_length=32)
    ds = prepare_dataset(records, TOK, format=format, max_length=32, errors="drop")
    assert [i for i, _ in ds.report.dropped] == [3] and len(ds) == 4
    assert ds.report.num_records == 5 and "1 records dropped" in str(ds.report)
    assert [ex.index for ex in ds.examples] == [0, 1, 2, 4]


def test_auto_detection_and_unknown_columns():
    with pytest.raises(ValueError, match="cannot detect the record format"):
        prepare_dataset([{"text": "x"}], TOK)
    with pytest.raises(ValueError, match="pass one split"):
        prepare_dataset(datasets.DatasetDict({"train": datasets.Dataset.from_list(TRL)}), TOK)
    with pytest.raises(ValueError, match="'chosen' must be a string"):
        parse_record({"prompt": "p", "chosen": 1, "rejected": "r"}, 0, format="standard")


def test_truncation_is_counted_and_keeps_prompt_end(caplog):
    records = [{"prompt": "word " * 100 + "END", "chosen": " yes" * 50, "rejected": " no"}]
    ds = prepare_dataset(records, TOK, max_length=40, max_prompt_length=16)
    ex, report = ds.examples[0], ds.report
    full_prompt = TOK(records[0]["prompt"])["input_ids"]
    full_chosen = TOK(records[0]["chosen"], add_special_tokens=False)["input_ids"] + [2]
    assert len(ex.prompt_ids) == 16 and ex.prompt_ids[0] == TOK.bos_token_id
    assert list(ex.prompt_ids[1:]) == full_prompt[-15:]  # the end of the prompt survives
    chosen, rejected = ex.responses["chosen"][0], ex.responses["rejected"][0]
    assert list(chosen) == full_chosen[:24] and TOK.decode(rejected) == " no<|eos|>"
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)
    assert report.prompt_tokens_cut == len(full_prompt) - 16
    assert report.response_tokens_cut == len(full_chosen) - 24
    assert "1 prompts truncated" in caplog.text


@given(st.lists(st.integers(3, 99), min_size=1, max_size=60), st.integers(0, 3),
       st.lists(st.integers(0, 80), min_size=1, max_size=3), st.integers(2, 40),
       st.integers(1, 40))
def test_truncate_properties(prompt, lead_bos, lengths, max_prompt, extra):
    prompt = [1] * min(lead_bos, 1) + prompt
    responses = [list(range(5, 5 + n)) for n in lengths]
    max_length = max_prompt + extra
    kept, cut_responses, prompt_cut, response_cuts = truncate(
        prompt, responses, max_length=max_length, max_prompt_length=max_prompt, bos_token_id=1)
    assert len(kept) == min(len(prompt), max_prompt) and prompt_cut == len(prompt) - len(kept)
    if prompt_cut and prompt[0] == 1:
        assert kept[0] == 1 and list(kept[1:]) == prompt[len(prompt) - len(kept) + 1:]
    elif prompt_cut:
        assert list(kept) == prompt[-len(kept):]
    for full, r, cut in zip(responses, cut_responses, response_cuts):
        assert len(kept) + len(r) <= max_length and list(r) == full[:len(r)]
        assert cut == len(full) - len(r) and (len(r) >= 1 or not full)


def test_bucketed_lengths_bound_shapes():
    records = [{"prompt": "q" * n, "chosen": " a" * n, "rejected": " b"} for n in range(1, 60, 3)]
    ds = prepare_dataset(records, TOK, max_length=128)
    shapes = {ds.collate(ds.examples[i:i + 2])["chosen_input_ids"].shape[1]
              for i in range(0, len(ds), 2)}
    assert shapes <= set(bucket_lengths(128)) and len(shapes) > 1
    assert ds.buckets == (32, 64, 128)


def test_hub_id_offline_fails_clearly(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not load 'alignax-test/no-such-dataset'"):
        load_records("alignax-test/no-such-dataset")
