"""experiments.multisample_numbers: the task's builders and metrics against hand values, the
shared method / report pieces, the whole study at smoke size, restarted, and once with LoRA
(adapters trained on the frozen reference, which stays the log-ratios' reference)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from alignax.data import prepare_dataset
from alignax.models.lora import without_adapters
from alignax.trainer import ModelConfig
from alignax.trainer.cli import parse_config
from alignax.trainer.runs import load_tokenizer
from alignax.training.state import has_adapters
from experiments import EXPERIMENTS, multisample_numbers
from experiments.multisample import numbers, report
from experiments.multisample.methods import Method, records
from experiments.multisample.phases import group_log_ratios


def test_registered_and_cli():
    assert "multisample_numbers" in EXPERIMENTS
    config = parse_config(multisample_numbers.Config, ["--seeds", "0", "4", "--ks", "2", "4",
                                                       "--nll_weights", "0.1", "0"])
    assert config.seeds == (0, 4) and config.ks == (2, 4) and config.nll_weights == (0.1, 0.0)
    lora = parse_config(multisample_numbers.Config, ["--lora_rank", "64", "--lora_alpha", "128"])
    assert (lora.lora_rank, lora.lora_alpha) == (64, 128.0)
    with pytest.raises(ValueError, match="lora_alpha is set but lora_rank is None"):
        dataclasses.replace(multisample_numbers.Config(), lora_alpha=16.0)
    with pytest.raises(ValueError, match="lora_rank must be an int >= 1"):
        dataclasses.replace(multisample_numbers.Config(), lora_rank=0)
    with pytest.raises(ValueError, match=r"\(>= 2\)"):
        dataclasses.replace(multisample_numbers.Config(), ks=(1, 3))


def test_favourite_and_ranges():
    assert [numbers.favourite(a, b) for a, b in [(531, 540), (537, 537), (538, 546), (8, 13),
                                                 (0, 20), (990, 1000)]] == [537, 537, 538, 8,
                                                                             7, 997]
    rng = np.random.default_rng(0)
    ranges = numbers.training_ranges(rng, 500, low=0, high=1000, min_gap=5, max_gap=10)
    gaps = ranges[:, 1] - ranges[:, 0]
    assert ranges[:, 0].min() >= 0 and ranges[:, 0].max() <= 1000
    assert set(gaps.tolist()) == set(range(5, 11))
    wide = numbers.unconstrained_ranges(rng, 500, low=0, high=1000)
    assert np.all(wide[:, 0] < wide[:, 1]) and wide.min() >= 0 and wide.max() <= 1000
    assert np.mean(wide[:, 1] - wide[:, 0] > 10) > 0.9  # no gap constraint


def test_answer_distributions():
    rng = np.random.default_rng(1)
    ranges = numbers.training_ranges(rng, 400, low=0, high=1000, min_gap=5, max_gap=10)
    fav = np.array([numbers.favourite(a, b) for a, b in ranges])
    always = numbers.reference_draws(rng, ranges, size=8, favourite_share=1.0)
    assert np.all(always == fav[:, None])
    never = numbers.reference_draws(rng, ranges, size=8, favourite_share=0.0)
    assert np.all((never >= ranges[:, :1]) & (never <= ranges[:, 1:]))
    # share 0.6: P(favourite) = 0.6 + 0.4 / C per draw; 3200 draws, 6 binomial sds of slack
    half = numbers.reference_draws(rng, ranges, size=8, favourite_share=0.6)
    expected = np.mean(0.6 + 0.4 / (ranges[:, 1] - ranges[:, 0] + 1))
    assert abs(np.mean(half == fav[:, None]) - expected) < 6 * math.sqrt(0.25 / half.size)
    few = numbers.few_number_draws(rng, ranges, size=16)
    assert all(len(set(row)) <= 2 for row in few.tolist())
    assert np.all((few >= ranges[:, :1]) & (few <= ranges[:, 1:]))
    groups = numbers.preference_groups(rng, ranges, size=5, favourite_share=0.6)
    assert groups["chosen"].shape == groups["rejected"].shape == (400, 5)
    for name in ("chosen", "rejected"):
        assert np.all((groups[name] >= ranges[:, :1]) & (groups[name] <= ranges[:, 1:]))
    few_rows = groups["rejected"][groups["rejected_kind"] == 1]
    assert all(len(set(row)) <= 2 for row in few_rows.tolist())
    assert set(groups["rejected_kind"].tolist()) == {0, 1}


def test_parse_and_uniformity_against_hand_values():
    values = numbers.parse_answers([[" 1", "1", "2 ", " 3"], [" 1", " 9", "x", "1"]])
    assert values.tolist() == [[1, 1, 2, 3], [1, 9, -1, 1]]
    u = numbers.uniformity(values, [[1, 4], [1, 2]])
    # prompt 0: counts (2, 1, 1, 0) of 4 answers in [1, 4]
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    np.testing.assert_allclose(u["entropy"], [h0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(u["kl_to_uniform"], [math.log(4) - h0, math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(u["out_of_range"], [0.0, 0.5])
    # TV: prompt 0 (|.5-.25| + 0 + 0 + |0-.25|) / 2; prompt 1 (|.5-.5| + |0-.5| + .5) / 2
    np.testing.assert_allclose(u["tv_to_uniform"], [0.25, 0.5])
    nothing_inside = numbers.uniformity([[0, 5]], [[1, 4]])
    assert nothing_inside["entropy"][0] == 0.0 and nothing_inside["out_of_range"][0] == 1.0
    with pytest.raises(ValueError, match="ranges"):
        numbers.uniformity([[1, 2]], [[1, 2], [3, 4]])


def test_methods_and_nested_records():
    assert Method("mdpo", 3, 1.0).label == "mDPO k=3, NLL 1"
    assert Method("dpo", 1, 0.0).label == "DPO, no NLL" and Method("ipo", 1).key == "ipo_k1_nll0"
    for bad in (("dpo", 3), ("mipo", 1), ("nope", 2)):
        with pytest.raises(ValueError):
            Method(*bad)
    with pytest.raises(ValueError, match="NLL term alone"):
        Method("nll_only", 3, 1.0)
    assert Method("mipo_biased", 2).objective(beta=0.1, tau=0.5).unbiased is False
    assert Method("mdpo", 2, 0.5).objective(beta=0.2, tau=0.5).nll_weight == 0.5
    prompts, chosen, rejected = ["p0", "p1"], [["a", "b", "c"]] * 2, [["x", "y", "z"]] * 2
    assert records(prompts, chosen, rejected, Method("dpo", 1))[0] == {
        "prompt": "p0", "chosen": "a", "rejected": "x"}
    assert records(prompts, chosen, rejected, Method("mipo", 2))[1] == {
        "prompt": "p1", "chosen": ["a", "b"], "rejected": ["x", "y"]}
    with pytest.raises(ValueError, match="fewer than k=4"):
        records(prompts, chosen, rejected, Method("mdpo", 4))


def test_win_rates_against_hand_values():
    a = np.array([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])  # [S = 2, P = 3]
    b = np.array([[2.0, 2.0, 1.0], [4.0, 1.0, 0.0]])
    rates = report.unit_rates(a, b)
    np.testing.assert_allclose(rates["win_rate"], [0.0, 0.5, 1.0, 1.0, 0.0, 0.5])
    estimate = report.win_rate(a, b)
    assert estimate["win_rate"].mean == pytest.approx(0.5) and estimate["tie"].mean == \
        pytest.approx(2 / 6)
    assert report.win_rate(a, b, higher_is_better=False)["win_rate"].mean == pytest.approx(0.5)
    assert report.seed_spread(a, b) == (0.5, 0.5)
    # ties within float32 rounding of equal entropies
    near = report.unit_rates(np.array([[1.0]]), np.array([[1.0 + 1e-7]]))
    assert near["tie"].tolist() == [1.0]
    # K paired samples per prompt: [S, P, K]
    k = report.unit_rates(np.array([[[1, 0, 3, 3]]]), np.array([[[0, 0, 4, 3]]]))
    np.testing.assert_allclose(k["win_rate"], [0.5])


def test_smoke_study_runs_end_to_end_and_resumes(tmp_path):
    run_dir = tmp_path / "numbers"
    config = dataclasses.replace(multisample_numbers.SMOKE, run_dir=str(run_dir),
                                 results_dir=str(tmp_path / "results"))
    table = multisample_numbers.run(config)
    assert len(table.splitlines()) == 2 + 1 + 2  # header, rule, the thesis' row, 2 test sets x 1 k
    assert "| thesis (Llama-3-8B, entropy) | 0.95 | 0.99 |" in table
    summary = (run_dir / "summary.md").read_text()
    for part in ("Table 3.1 layout", "total-variation", "What keeps unbiased mIPO bounded",
                 "Findings"):
        assert part in summary
    for name in ("summary.md", "figure_3_3.png", "mipo_bounded.png"):
        assert (tmp_path / "results" / name).stat().st_size > 500
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved["table_3_1"]) == {"train_like, NLL 1, k=2", "unconstrained, NLL 1, k=2"}
    seed_dir = run_dir / "seed_0"
    keys = [m.key for m in multisample_numbers.methods(config)]
    for key in keys:
        answers = json.loads((seed_dir / key / "answers.json").read_text())
        assert np.asarray(answers["test"]).shape == (2 * config.test_prompts,
                                                     config.samples_per_prompt)
        assert len(answers["figure"]) == config.figure_samples
        assert (seed_dir / key / "metrics.jsonl").exists()
    bounded = sorted(p.name for p in (seed_dir / "bounded").iterdir() if p.is_dir())
    assert bounded == sorted(m.key for m in multisample_numbers.bounded_methods(config))
    assert (seed_dir / "bounded" / "reference_evaluation.json").exists()  # step 0
    for key in bounded:
        assert sorted(p.name for p in (seed_dir / "bounded" / key).glob("evaluation_*")) == [
            f"evaluation_{step}.json" for step in config.bounded_eval_steps]
    # a restart reuses every finished run and cached result: nothing is retrained or resampled
    stamps = {p: p.stat().st_mtime_ns for p in seed_dir.rglob("*.json")}
    again = multisample_numbers.run(config)
    assert again == table
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a run killed before its answers were cached is restored from its checkpoint and
    # evaluated again with the same keys: the same answers
    lost = seed_dir / keys[0] / "answers.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    assert multisample_numbers.run(config) == table
    assert json.loads(lost.read_text())["test"] == before["test"]
    # a restart with another config is refused, naming the field
    with pytest.raises(ValueError, match="beta"):
        multisample_numbers.run(dataclasses.replace(config, beta=0.5))


def test_smoke_study_with_lora_trains_adapters_on_the_frozen_reference(tmp_path):
    run_dir = tmp_path / "lora"
    config = dataclasses.replace(multisample_numbers.SMOKE, run_dir=str(run_dir), lora_rank=2,
                                 lora_alpha=4.0)
    table = multisample_numbers.run(config)  # 6 preference runs from one reference model
    assert len(table.splitlines()) == 5 and (run_dir / "summary.md").stat().st_size > 500
    # the study's held-out log-ratios: h = 0 at step 0 (the reference against itself, plain
    # mIPO exactly (1 / (2 tau))^2 = 1); after training the policy's adapters move them (by
    # ~1e-4 here; float32 rounding of the summed log-probs is ~1e-6)
    seed_dir = run_dir / "seed_0" / "bounded"
    initial = json.loads((seed_dir / "reference_evaluation.json").read_text())
    for method in multisample_numbers.bounded_methods(config):
        trained = json.loads((seed_dir / method.key / "evaluation_2.json").read_text())
        assert abs(trained["heldout_plain_mipo"] - initial["heldout_plain_mipo"]) > 1e-5
    # the finished runs re-opened (restored from their checkpoints, not trained again)
    tokenizer = load_tokenizer(ModelConfig(config.model))
    reference, start = multisample_numbers.reference_policy(config, tokenizer)
    assert not has_adapters(reference)  # the reference's SFT trained every weight
    base = jax.tree.map(np.array, nnx.state(reference))
    data = multisample_numbers.seed_data(config, 0)
    heldout = prepare_dataset(multisample_numbers.method_records(data["heldout"],
                                                                  Method("mipo", 2)),
                              tokenizer, max_length=multisample_numbers.MAX_LENGTH,
                              max_prompt_length=multisample_numbers.PROMPT_LENGTH)
    for method in multisample_numbers.methods(config):
        metrics = run_dir / "seed_0" / method.key / "metrics.jsonl"
        stamp = metrics.stat().st_mtime_ns
        result = multisample_numbers.policy_run(config, 0, method, data, start)
        assert metrics.stat().st_mtime_ns == stamp  # restored, not trained again
        # only the adapters trained; the base weights are the reference's
        assert {path[-1] for path, _ in nnx.to_flat_state(result.params)} == {"lora_a",
                                                                              "lora_b"}
        jax.tree.map(np.testing.assert_array_equal,
                     nnx.state(without_adapters(result.model)), base)
        # log-ratios against the reference: zero with the adapters off, not with them on
        h = group_log_ratios(result.model, reference, heldout, batch_size=len(heldout))
        off = group_log_ratios(without_adapters(result.model), reference, heldout,
                               batch_size=len(heldout))
        assert np.abs(h["chosen"]).max() > 1e-5
        assert np.abs(off["chosen"]).max() == np.abs(off["rejected"]).max() == 0.0
    jax.tree.map(np.testing.assert_array_equal, nnx.state(reference), base)  # untouched


def test_build_md_paper_commands_are_the_paper_configs():
    """BUILD.md's paper-scale commands parse to the two studies' PAPER configs."""
    import pathlib
    import re
    import shlex

    from experiments import multisample_label_noise

    text = (pathlib.Path(__file__).parents[1] / "BUILD.md").read_text().replace("\\\n", " ")
    for module in (multisample_numbers, multisample_label_noise):
        name = module.__name__
        line = re.search(rf"^python -m {re.escape(name)} (.*)$", text, re.M)
        assert line is not None, f"BUILD.md has no command for {name}"
        assert parse_config(module.Config, shlex.split(line.group(1))) == module.PAPER
