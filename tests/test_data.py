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
    assert batch["target_rewards_2"].shape == (3, 2)  # [B, E]
    np.testing.assert_allclose(batch["target_rewards_2"][:, 1], [0.0, 1.0, 2.0])
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


# --- nothing dropped silently: columns, ensemble sizes and bins are decided per dataset -------

def _unlabeled(i, **rewards):
    return {"prompt": f"Question {i}?", "response_1": " yes", "response_2": " no", **rewards}


def test_reward_columns_are_decided_per_dataset_and_refused_when_inconsistent(tmp_path):
    records = [_unlabeled(0), _unlabeled(1, target_rewards_1=1.0, target_rewards_2=0.0),
               _unlabeled(2), _unlabeled(3, target_rewards_1=0.5, target_rewards_2=0.5)]
    with pytest.raises(ValueError, match=re.escape(
            "are in 2 of 4 records but missing in records 0, 2: label every record or none")):
        prepare_dataset(records, TOK, max_length=32)
    # a JSONL file read by `datasets` fills the missing columns with None: the same error
    with pytest.raises(ValueError, match="missing in records 0, 2"):
        prepare_dataset(_write_jsonl(tmp_path / "pairs.jsonl", records), TOK, max_length=32)
    ds = prepare_dataset(records, TOK, max_length=32, errors="drop")
    assert [i for i, _ in ds.report.dropped] == [0, 2] and "2 records dropped" in str(ds.report)
    np.testing.assert_allclose(ds.collate(ds.examples)["target_rewards_1"], [1.0, 0.5])


@pytest.mark.parametrize("odd, described", [([1.0, 2.0], "a list of 2 rewards"),
                                            (0.5, "a scalar reward")])
def test_one_ensemble_size_per_dataset(odd, described):
    records = [_unlabeled(i, target_rewards_1=[0.0, 1.0, 2.0], target_rewards_2=[1.0, 1.0, 1.0])
               for i in range(4)]
    records[2] = _unlabeled(2, target_rewards_1=odd, target_rewards_2=odd)
    with pytest.raises(ValueError, match=re.escape(
            f"record 2: field 'target_rewards_1' holds {described} but 3 records hold a list of "
            "3 rewards; every record needs the same ensemble size")):
        prepare_dataset(records, TOK, max_length=32)
    ds = prepare_dataset(records, TOK, max_length=32, errors="drop")
    assert [i for i, _ in ds.report.dropped] == [2]
    assert ds.collate(ds.examples)["target_rewards_1"].size == 9  # E = 3 for B = 3


@pytest.mark.parametrize("value", [None, 1.5, "2", True])
def test_bin_fn_must_return_an_int(value):
    records = [dict(TRL[0]), dict(TRL[1]), dict(TRL[2])]
    bin_fn = lambda r: value if r is records[1] else 0  # noqa: E731
    with pytest.raises(ValueError, match=re.escape(
            f"record 1: field 'bin_fn(record)' must be an int bin, got {value!r}")):
        prepare_dataset(records, TOK, max_length=32, bin_fn=bin_fn)
    with pytest.raises(ValueError, match=re.escape("record 0: field 'bin_fn(record)'")):
        prepare_dataset(records, TOK, max_length=32, bin_fn=lambda r: value)


def test_collate_refuses_examples_with_and_without_a_bin():
    ds = prepare_dataset(TRL, TOK, max_length=32, bin_fn=lambda r: len(r["prompt"]) % 3)
    import dataclasses
    examples = [ds.examples[0], dataclasses.replace(ds.examples[1], bin=None)]
    with pytest.raises(ValueError, match=r"records \[1\] have no 'bin' but records \[0\] do"):
        ds.collate(examples)


# --- per-response bins ---------------------------------------------------------------------

def test_per_response_bins_from_a_function():
    def by_length(record, role, response):
        assert record["prompt"] and role in ("chosen", "rejected")
        return len(response) // 4

    ds = prepare_dataset(TRL, TOK, max_length=32, response_bins=by_length,
                         bin_fn=lambda r: len(r["prompt"]) % 2)
    batch = ds.collate(ds.examples)
    np.testing.assert_array_equal(batch["chosen_bin"], [len(r["chosen"]) // 4 for r in TRL])
    np.testing.assert_array_equal(batch["rejected_bin"], [len(r["rejected"]) // 4 for r in TRL])
    np.testing.assert_array_equal(batch["bin"], [len(r["prompt"]) % 2 for r in TRL])
    assert batch["chosen_bin"].dtype == np.int32 and batch["chosen_bin"].shape == (4,)
    with pytest.raises(ValueError, match=re.escape(
            "record 0: field \"response_bin_fn(record, 'chosen', chosen)\" must be an int bin, "
            "got None")):
        prepare_dataset(TRL, TOK, max_length=32, response_bins=lambda r, role, x: None)
    with pytest.raises(TypeError, match="response_bins must be"):
        prepare_dataset(TRL, TOK, max_length=32, response_bins=3)


def test_length_quantile_bins_fitted_on_train_reused_on_eval():
    from alignax.data import LengthQuantileBins
    from alignax.data.bins import assign_quantile_bins, quantile_bin_edges

    train = [{"prompt": f"Q{i}", "chosen": " yes" * (1 + i), "rejected": " no" * (1 + 2 * i)}
             for i in range(8)]
    ds = prepare_dataset(train, TOK, max_length=64, response_bins=LengthQuantileBins(num_bins=4))
    lengths = [len(TOK(r[role], add_special_tokens=False)["input_ids"]) + 1  # + EOS
               for r in train for role in ("chosen", "rejected")]
    edges = quantile_bin_edges(lengths, num_bins=4)
    assert ds.response_bins == LengthQuantileBins(num_bins=4, edges=tuple(edges))
    batch = ds.collate(ds.examples)
    np.testing.assert_array_equal(batch["chosen_bin"], assign_quantile_bins(lengths[0::2], edges))
    np.testing.assert_array_equal(batch["rejected_bin"], assign_quantile_bins(lengths[1::2], edges))
    assert set(batch["chosen_bin"]) | set(batch["rejected_bin"]) == {0, 1, 2, 3}
    # the evaluation split uses the training edges, not its own quantiles
    test = [{"prompt": "Q", "chosen": " yes" * 30, "rejected": " no"}]
    eval_ds = prepare_dataset(test, TOK, max_length=128, response_bins=ds.response_bins)
    eval_batch = eval_ds.collate(eval_ds.examples)
    assert (eval_batch["chosen_bin"].tolist(), eval_batch["rejected_bin"].tolist()) == ([3], [0])
    assert eval_ds.response_bins is ds.response_bins
    with pytest.raises(ValueError, match="edges must be 3 finite, non-decreasing"):
        LengthQuantileBins(num_bins=4, edges=(3.0, 1.0, 5.0))


def test_per_response_bins_of_grouped_and_unlabeled_records():
    records = [{"prompt": "Tell a joke.", "chosen": [" Ha.", " Hee hee."], "rejected": [" No."]},
               {"prompt": "Hi", "chosen": [" Hello!"], "rejected": [" Go.", " Bye.", " ..."]}]
    ds = prepare_dataset(records, TOK, max_length=32,
                         response_bins=lambda r, role, text: len(text))
    batch = ds.collate(ds.examples)
    np.testing.assert_array_equal(batch["chosen_bin"], [[4, 9], [7, -1]])  # -1: absent member
    np.testing.assert_array_equal(batch["rejected_bin"], [[4, -1, -1], [4, 5, 4]])
    pairs = [_unlabeled(i) for i in range(2)]
    ds = prepare_dataset(pairs, TOK, max_length=32,
                         response_bins=lambda r, role, text: int(role[-1]))
    batch = ds.collate(ds.examples)
    assert batch["response_1_bin"].tolist() == [1, 1] and batch["response_2_bin"].tolist() == [2, 2]


# --- formats: TRL's implicit prompt told apart from HH; one format per dataset --------------

IMPLICIT = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"},
            {"chosen": "Name a fruit: apple", "rejected": "Name a fruit: a chair"}]


def test_trl_implicit_prompt_format(tmp_path):
    path = _write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT)
    ds = prepare_dataset(path, TOK, max_length=64)
    assert ds.format == "implicit_prompt" and not ds.report.dropped
    # the shared prefix is the prompt; a final space goes to the responses (as TRL splits)
    explicit = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
                {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " a chair"}]
    reference = prepare_dataset(explicit, TOK, max_length=64)
    for key, value in reference.collate(reference.examples).items():
        np.testing.assert_array_equal(ds.collate(ds.examples)[key], value)
    hh = prepare_dataset(HH, TOK, max_length=128)  # HH transcripts are still HH
    assert hh.format == "hh"


@pytest.mark.parametrize("record, message", [
    ({"chosen": "Same.", "rejected": "Same."}, "'rejected' is the whole shared prefix"),
    ({"chosen": "Yes, I agree", "rejected": "Yes"}, "'rejected' is the whole shared prefix"),
    ({"chosen": "Blue.", "rejected": "Green."}, "'chosen' shares no prompt with 'rejected'"),
])
def test_implicit_prompt_records_without_a_prompt_are_refused(record, message):
    with pytest.raises(ValueError, match=re.escape(f"record 1: field {message}")):
        prepare_dataset([IMPLICIT[0], record], TOK, format="implicit_prompt", max_length=32)


def test_records_of_different_formats_are_refused():
    with pytest.raises(ValueError, match=re.escape(
            "the records do not share one format: 'hh' in records 0, 1, 2; 'implicit_prompt' in "
            "records 3, 4, 5; pass format= to choose one")):
        prepare_dataset(HH + IMPLICIT, TOK, max_length=128)
    ds = prepare_dataset(HH + IMPLICIT, TOK, format="hh", max_length=128, errors="drop")
    assert [i for i, _ in ds.report.dropped] == [3, 4, 5]
    with pytest.raises(ValueError, match=r"record 1: cannot detect the record format"):
        prepare_dataset([TRL[0], {"text": "x"}], TOK)


# --- guard rails: chat template, tokenizer vs model, local paths, truncation ----------------

def test_conversations_need_a_chat_template():
    tok = default_tokenizer()
    tok.chat_template = None
    for errors in ("raise", "drop"):
        with pytest.raises(ValueError, match=re.escape(
                "records 0, 1 are conversations, which need a chat template, but the tokenizer")):
            prepare_dataset(UF, tok, max_length=64, errors=errors)
    with pytest.raises(ValueError, match=r"set tokenizer.chat_template \(the model's own"):
        prepare_dataset(UF, tok, max_length=64)


def test_check_tokenizer_against_the_model_vocabulary():
    from alignax.data import check_tokenizer

    check_tokenizer(TOK, vocab_size=1024)
    check_tokenizer(TOK, vocab_size=2048)  # padded embeddings are fine
    with pytest.raises(ValueError, match=re.escape(
            "the tokenizer emits token ids up to 1023 (1024 tokens, specials included) but the "
            "model's vocabulary has 512 entries (vocab_size=512)")):
        check_tokenizer(TOK, vocab_size=512)
    bigger = default_tokenizer()
    bigger.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert bigger.convert_tokens_to_ids("<|tool|>") == 1024
    with pytest.raises(ValueError, match=r"ids up to 1024 .* a model with vocab_size >= 1025"):
        check_tokenizer(bigger, vocab_size=1024)
    no_pad = default_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match=re.escape("the tokenizer has no pad token; set one")):
        check_tokenizer(no_pad, vocab_size=1024)
    no_template = default_tokenizer()
    no_template.chat_template = None
    check_tokenizer(no_template, vocab_size=1024)
    with pytest.raises(ValueError, match="conversational records need a chat template"):
        check_tokenizer(no_template, vocab_size=1024, needs_chat_template=True)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        check_tokenizer(TOK, vocab_size=0)


@pytest.mark.parametrize("source", ["data/trian.jsonl", "./x", "~/x", "a/b/c", "data/tarin",
                                    "../hh"])
def test_mistyped_local_paths_are_never_sent_to_the_hub(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # so "data/tarin" names a local directory's entry
    monkeypatch.setenv("HOME", str(tmp_path))

    def hub(*args, **kwargs):
        raise AssertionError(f"sent to the hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(ValueError, match=re.escape(
            f"no such local file or directory: {source!r} (looked for")):
        load_records(source)
    with pytest.raises(ValueError, match=re.escape(
            f"no such local tokenizer directory: {source!r}")):
        prepare_dataset(TRL, source)


def test_home_relative_paths_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_jsonl(tmp_path / "trl.jsonl", TRL)
    assert prepare_dataset("~/trl.jsonl", TOK, max_length=32).format == "standard"


def test_keep_start_truncation_as_trl():
    records = [{"prompt": "word " * 8 + "END", "chosen": " yes" * 30, "rejected": " no"},
               {"prompt": "word " * 60, "chosen": " a", "rejected": " b"},
               {"prompt": "Hi", "chosen": " there", "rejected": " no"}]
    ds = prepare_dataset(records, TOK, max_length=32, truncation="keep_start")
    full_prompt = TOK(records[0]["prompt"])["input_ids"]
    assert len(full_prompt) < 32 and ds.examples[0].prompt_ids.tolist() == full_prompt
    chosen = TOK(records[0]["chosen"], add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    # the sequence is (prompt + response)[:max_length]
    assert ds.examples[0].responses["chosen"][0].tolist() == chosen[:32 - len(full_prompt)]
    assert [i for i, _ in ds.report.dropped] == [1]  # its prompt alone fills max_length
    assert "leaves no room for a response within max_length=32" in ds.report.dropped[0][1]
    assert ds.report.prompts_truncated == 0 and ds.report.responses_truncated == 1
    assert ds.prompt_buckets[-1] == 32
    default = prepare_dataset(records, TOK, max_length=32)  # keep_prompt_end: all kept
    assert len(default) == 3 and len(default.examples[1].prompt_ids) == 16
    with pytest.raises(ValueError, match="max_prompt_length applies to truncation='keep_prompt"):
        prepare_dataset(records, TOK, max_length=32, truncation="keep_start", max_prompt_length=8)
    with pytest.raises(ValueError, match="truncation must be one of"):
        prepare_dataset(records, TOK, max_length=32, truncation="keep_end")
