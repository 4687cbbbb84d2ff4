"""experiments.multisample_label_noise: the oracle, the labels and Remark 1's agreement against
hand values, the whole study at smoke size, restarted, and once with LoRA (adapters trained on
the frozen weaker generator)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from alignax.models.lora import without_adapters
from alignax.trainer import ModelConfig
from alignax.trainer.cli import parse_config
from alignax.trainer.runs import load_tokenizer
from alignax.training.state import has_adapters
from experiments import EXPERIMENTS, multisample_label_noise
from experiments.multisample import arithmetic


def test_registered_and_cli():
    assert "multisample_label_noise" in EXPERIMENTS
    config = parse_config(multisample_label_noise.Config, ["--ks", "1", "3", "--families",
                                                           "ipo", "--high", "20"])
    assert config.ks == (1, 3) and config.families == ("ipo",) and config.high == 20
    with pytest.raises(ValueError, match="must hold 1"):
        dataclasses.replace(multisample_label_noise.Config(), ks=(2, 3))
    with pytest.raises(ValueError, match="both"):
        dataclasses.replace(multisample_label_noise.Config(), weak_model="some/model")
    assert (multisample_label_noise.PAPER.lora_rank, multisample_label_noise.PAPER.lora_alpha
            ) == (64, 128.0)
    with pytest.raises(ValueError, match="lora_alpha is set but lora_rank is None"):
        dataclasses.replace(multisample_label_noise.Config(), lora_alpha=16.0)
    methods = multisample_label_noise.methods(multisample_label_noise.Config(), "ipo")
    assert [(m.name, m.k) for m in methods] == [("ipo", 1), ("mipo", 2), ("mipo", 3)]


def test_oracle_reward_against_hand_values():
    operands = np.array([[2, 3], [40, 50]])
    values = np.array([[5, 7, -1], [90, 0, 75]])
    np.testing.assert_array_equal(arithmetic.oracle_reward(values, operands, max_error=10),
                                  [[0, -2, -10], [0, -10, -10]])
    np.testing.assert_array_equal(arithmetic.oracle_reward(values, operands, max_error=100),
                                  [[0, -2, -100], [0, -90, -15]])
    assert arithmetic.prompt(2, 3) == "Item: 2 + 3 =" and arithmetic.answer(5) == " 5"
    with pytest.raises(ValueError, match="operands"):
        arithmetic.oracle_reward(values, operands[:1], max_error=10)


def test_labels_and_agreement_against_hand_values():
    strong = np.array([[0.0, -1.0, -5.0], [-3.0, 0.0, 0.0], [-2.0, -2.0, 0.0]])
    weak = np.array([[-1.0, 0.0, 0.0], [0.0, -4.0, 0.0], [-2.0, -2.0, -1.0]])
    # k = 1: strong - weak = (1, -3, 0); k = 2: (0, 1, 0); k = 3: (-5, 1, 1)
    assert arithmetic.label_swaps(strong, weak, 1, clean=True).tolist() == [False, True, False]
    assert arithmetic.label_swaps(strong, weak, 2, clean=True).tolist() == [False, False, False]
    assert arithmetic.label_swaps(strong, weak, 3, clean=True).tolist() == [True, False, False]
    assert not arithmetic.label_swaps(strong, weak, 3, clean=False).any()
    assert arithmetic.label_agreement(strong, weak, 1) == pytest.approx(
        {"agree": 1 / 3, "tie": 1 / 3, "disagree": 1 / 3})
    assert arithmetic.label_agreement(strong, weak, 3) == pytest.approx(
        {"agree": 2 / 3, "tie": 0.0, "disagree": 1 / 3})
    with pytest.raises(ValueError, match="k=4"):
        arithmetic.label_swaps(strong, weak, 4, clean=True)


def test_labelled_records_swap_the_groups_the_oracle_prefers():
    groups = {"operands": [[1, 1], [2, 2]],
              "strong_texts": [[" 2", " 2"], [" 5", " 4"]], "weak_texts": [[" 3", ""], [" 4", " 9"]],
              "strong_rewards": np.array([[0.0, 0.0], [-1.0, 0.0]]),
              "weak_rewards": np.array([[-1.0, -10.0], [0.0, -5.0]])}
    dpo = multisample_label_noise.methods(multisample_label_noise.Config(), "dpo")
    noisy = multisample_label_noise.labelled_records(groups, dpo[0], "noisy")
    clean = multisample_label_noise.labelled_records(groups, dpo[0], "clean")
    assert [r["chosen"] for r in noisy] == [" 2", " 5"]
    assert [(r["chosen"], r["rejected"]) for r in clean] == [(" 2", " 3"), (" 4", " 5")]
    group = multisample_label_noise.labelled_records(groups, dpo[1], "clean")  # k = 2
    assert group[0] == {"prompt": "Item: 1 + 1 =", "chosen": [" 2", " 2"],
                        "rejected": [" 3", multisample_label_noise.EMPTY]}
    assert group[1]["chosen"] == [" 5", " 4"]  # sums -1 vs -5: the default label stands


def test_smoke_study_runs_end_to_end_and_resumes(tmp_path):
    run_dir = tmp_path / "noise"
    config = dataclasses.replace(multisample_label_noise.SMOKE, run_dir=str(run_dir),
                                 results_dir=str(tmp_path / "results"))
    table = multisample_label_noise.run(config)
    # clean and noisy k = 2 vs k = 1, noisy vs clean at k = 1 and 2
    assert len(table.splitlines()) == 2 + 4  # header, rule, 4 comparisons
    summary = (run_dir / "summary.md").read_text()
    for part in ("Figure 3.11's comparisons", "Remark 1", "Oracle reward per policy",
                 "The thesis' claims", "Findings"):
        assert part in summary
    assert (tmp_path / "results" / "figure_3_11.png").stat().st_size > 500
    saved = json.loads((run_dir / "summary.json").read_text())
    assert len(saved["comparisons"]) == 4 and set(saved["label_agreement"]) == {"1", "2"}
    groups = json.loads((run_dir / "seed_0" / "groups.json").read_text())
    assert np.asarray(groups["strong"]).shape == (config.num_groups, max(config.ks))
    for label in multisample_label_noise.LABELS:
        for method in multisample_label_noise.methods(config, "dpo"):
            answers = json.loads((run_dir / "seed_0" / label / method.key / "answers.json")
                                 .read_text())
            assert np.asarray(answers["test"]).shape == (config.test_prompts,
                                                         config.samples_per_prompt)
    # a restart reuses every finished run and cached sample: no training step is logged again
    # (metrics.jsonl) and no cached group or answer is rewritten (the trainer rewrites its
    # config.json when it restores a finished run, the study its own config and summary)
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
              if p.name == "metrics.jsonl" or (p.suffix == ".json" and "summary" not in p.name
                                               and p.name not in ("study_config.json",
                                                                  "config.json"))}
    training_logs = [p for p in stamps if p.name == "metrics.jsonl" and p.parent.name != "eval"]
    assert len(training_logs) == 2 + len(multisample_label_noise.LABELS) * len(config.ks)
    assert multisample_label_noise.run(config) == table
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_smoke_study_with_lora_trains_adapters_on_the_weaker_generator(tmp_path):
    run_dir = tmp_path / "lora"
    config = dataclasses.replace(multisample_label_noise.SMOKE, run_dir=str(run_dir),
                                 lora_rank=2, lora_alpha=4.0)
    table = multisample_label_noise.run(config)  # 4 preference runs from one start model
    assert len(table.splitlines()) == 2 + 4 and (run_dir / "summary.md").stat().st_size > 500
    # the finished runs re-opened (restored from their checkpoints, not trained again)
    tokenizer = load_tokenizer(ModelConfig(config.model))
    models = multisample_label_noise.generators(config, tokenizer)
    assert not has_adapters(models["weak"]) and not has_adapters(models["strong"])  # SFT: full
    assert models["start"]["model_config"].lora_rank == 2
    base = jax.tree.map(np.array, nnx.state(models["weak"]))
    groups = multisample_label_noise.seed_groups(config, 0, models, tokenizer)
    for label in multisample_label_noise.LABELS:
        for method in multisample_label_noise.methods(config, "dpo"):
            metrics = run_dir / "seed_0" / label / method.key / "metrics.jsonl"
            stamp = metrics.stat().st_mtime_ns
            result = multisample_label_noise.policy_run(config, 0, method, label, groups,
                                                        models["start"])
            assert metrics.stat().st_mtime_ns == stamp  # restored, not trained again
            # only the adapters trained; the base weights are the weaker generator's
            assert {path[-1] for path, _ in nnx.to_flat_state(result.params)} == {"lora_a",
                                                                                  "lora_b"}
            jax.tree.map(np.testing.assert_array_equal,
                         nnx.state(without_adapters(result.model)), base)
            lora_b = [v for path, v in nnx.to_flat_state(result.params) if path[-1] == "lora_b"]
            assert max(float(np.abs(b[...]).max()) for b in lora_b) > 0  # B starts at 0
    assert not has_adapters(models["weak"])  # the start model: untouched by the 4 runs
    jax.tree.map(np.testing.assert_array_equal, nnx.state(models["weak"]), base)
