"""The default experiment end to end on a shrunk config, its CLI, oracle and prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignax.data import default_tokenizer
from experiments import fdpo_sentiment
from alignax.trainer.cli import parse_config
from experiments.fdpo_sentiment import Config, oracle_reward, positive_token_ids

SMALL = ["--sft_steps", "4", "--sft_batch_size", "4", "--sft_length", "32", "--num_prompts", "32",
         "--eval_prompts", "4", "--eval_samples", "2", "--samples_per_prompt", "4",
         "--response_length", "8", "--train_steps", "4", "--batch_size", "4",
         "--eval_every", "2", "--save_every", "2", "--progress", "False", "--mesh", "1", "1", "1"]


def test_cli_overrides_any_field():
    config = parse_config(Config, ["--divergences", "jsd", "alpha_0.3", "--beta", "0.5",
                                   "--mesh", "2", "2", "2", "--export", "True", "--run_dir", "x"])
    assert config.divergences == ("jsd", "alpha_0.3") and config.beta == 0.5
    assert config.mesh == (2, 2, 2) and config.export is True and config.run_dir == "x"
    assert config.train_steps == Config().train_steps
    with pytest.raises(SystemExit):
        parse_config(Config, ["--no_such_field", "1"])
    assert fdpo_sentiment.divergence_config("alpha_0.3") == ("alpha", 0.3)
    assert fdpo_sentiment.divergence_config("jsd") == ("jsd", None)


def test_oracle_is_the_share_of_positive_words():
    tokenizer = default_tokenizer()
    positive = positive_token_ids(tokenizer)
    good = tokenizer.encode(" great", add_special_tokens=False)
    assert len(good) == 1 and good[0] in positive
    tokens = np.array([[good[0], 5, good[0], 7], [5, 5, 5, 5]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_allclose(oracle_reward(tokens, mask, positive), [2 / 3, 0.0])


def test_default_experiment_runs_end_to_end(tmp_path):
    run = tmp_path / "run"
    table = fdpo_sentiment.main(["--run_dir", str(run), "--divergences", "reverse_kl", "forward_kl",
                                 *SMALL])
    assert "| reverse_kl |" in table and "| forward_kl |" in table
    summary = json.loads((run / "summary.json").read_text())
    for name in ("reverse_kl", "forward_kl"):
        records = summary["results"][name]
        assert [r["step"] for r in records] == [0, 2, 4]
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 0 is the reference
        assert all(np.isfinite(r["oracle_reward"]) and r["entropy_per_token"] > 0 for r in records)
        assert (run / name / "metrics.jsonl").exists() and (run / name / "metrics.png").exists()
        assert list((run / name / "tensorboard").glob("events.*"))
        assert (run / name / "checkpoints" / "4").is_dir()
    assert (run / "reward_vs_kl.png").stat().st_size > 1000
    assert (run / "summary.md").read_text().count("|") > 20
    assert (run / "sft" / "checkpoints" / "4").is_dir()
    # started again with the same flags, everything is restored or skipped, not retrained
    again = fdpo_sentiment.main(["--run_dir", str(run), "--divergences", "reverse_kl", *SMALL])
    assert again.splitlines()[3] == table.splitlines()[3]


def test_lora_flags_train_adapters_against_the_base(tmp_path):
    with pytest.raises(ValueError, match="--lora_alpha needs --lora_rank"):
        fdpo_sentiment.main(["--lora_alpha", "8", *SMALL])
    run = tmp_path / "run"
    fdpo_sentiment.main(["--run_dir", str(run), "--divergences", "reverse_kl", "--lora_rank",
                         "4", "--lora_alpha", "8", "--export", "True", *SMALL])
    records = json.loads((run / "summary.json").read_text())["results"]["reverse_kl"]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 0: fresh adapters, B = 0
    assert all(np.isfinite(r["kl"]) and np.isfinite(r["oracle_reward"]) for r in records)
    assert (run / "reverse_kl" / "hf" / "model.safetensors").exists()  # merged weights
    assert (run / "reverse_kl" / "hf" / "adapter" / "adapter_config.json").exists()
