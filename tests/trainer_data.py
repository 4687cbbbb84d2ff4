"""Local files for the trainer tests: a tiny HF checkpoint written by `save_pretrained` (with the
embedded tokenizer saved beside it), tiny reward-model checkpoints, and JSONL records in the
supported formats. Imported by test_trainer*.py (pytest puts `tests/` on the path)."""

from __future__ import annotations

import json
import pathlib

from flax import nnx

from alignax.data import default_tokenizer
from alignax.models import create, create_reward_model, save_pretrained, save_reward_model
from alignax.models import tiny_config

GOOD = ("Sure, here is a helpful answer.", "I am glad to help with that.",
        "Here are the steps you asked for.", "Happy to explain it step by step.")
BAD = ("No.", "Go away.", "I will not answer.", "Ask someone else.")


def model_config(vocab_size: int = 1024, **overrides):
    """The tests' tiny Llama: hidden 32, 1 layer, 2 heads on 1 KV head, the embedded
    tokenizer's special ids."""
    tokenizer = default_tokenizer()
    return tiny_config("llama", vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, **overrides)


def write_checkpoint(directory: pathlib.Path, *, seed: int = 0, **overrides) -> pathlib.Path:
    """A causal LM checkpoint (config.json + model.safetensors) with its tokenizer."""
    save_pretrained(create(model_config(**overrides), rngs=nnx.Rngs(seed)), directory)
    default_tokenizer().save_pretrained(str(directory))
    return directory


def write_reward_model(directory: pathlib.Path, *, seed: int, num_heads: int | None = None
                       ) -> pathlib.Path:
    """A `LlamaForSequenceClassification` checkpoint with the embedded tokenizer."""
    model = create_reward_model(model_config(), rngs=nnx.Rngs(seed), num_heads=num_heads)
    save_reward_model(model, directory)
    default_tokenizer().save_pretrained(str(directory))
    return directory


def hh_records(count: int) -> list[dict]:
    """Anthropic-HH transcripts: a helpful chosen and a curt rejected answer."""
    records = []
    for i in range(count):
        prompt = f"\n\nHuman: Question {i}: how do I fix my bike?\n\nAssistant:"
        records.append({"chosen": f"{prompt} {GOOD[i % 4]}", "rejected": f"{prompt} {BAD[i % 4]}"})
    return records


def pair_records(count: int) -> list[dict]:
    """Standard pairs with a per-record bin column (2 bins)."""
    return [{"prompt": f"Question {i}: how do I fix my bike?", "chosen": " " + GOOD[i % 4],
             "rejected": " " + BAD[i % 4], "bin": i % 2} for i in range(count)]


def grouped_records(count: int) -> list[dict]:
    return [{"prompt": f"Question {i}:", "chosen": [" " + GOOD[i % 4], " " + GOOD[(i + 1) % 4]],
             "rejected": [" " + BAD[i % 4], " " + BAD[(i + 1) % 4]]} for i in range(count)]


def unlabeled_records(count: int, *, members: int | None = None) -> list[dict]:
    """Unlabeled pairs with target rewards: floats, or lists of `members` floats."""
    records = []
    for i in range(count):
        r1, r2 = 1.0 + 0.1 * (i % 3), -0.5
        records.append({"prompt": f"Question {i}:", "response_1": " " + GOOD[i % 4],
                        "response_2": " " + BAD[i % 4],
                        "target_rewards_1": r1 if members is None else [r1 + m for m in
                                                                        range(members)],
                        "target_rewards_2": r2 if members is None else [r2] * members})
    return records


def write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
