"""experiments.fdpo_frontier: the task's grammar and oracle, the divergence estimator and the
pair metrics against hand values and exact sums, the claim checks on hand-made records, and the
study end to end at SMOKE size (outputs, then a restart after a simulated kill that reproduces
the uninterrupted run's numbers)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from alignax.data import default_tokenizer
from alignax.divergences import f_divergence
from experiments import EXPERIMENTS, fdpo_frontier
from alignax.trainer.cli import parse_config
from experiments.frontier import report, task
from experiments.frontier.evaluation import mixture_divergence_terms, pair_metrics
from experiments.frontier.training import evaluation_steps

TOKENIZER = default_tokenizer()
DIVERGENCES = [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.3),
               ("alpha", 0.5), ("alpha", 0.7)]


# ---------------------------------------------------------------- the task

def test_prompts_split_into_disjoint_train_and_held_out_sets():
    prompts = task.prompts()
    assert len(prompts) == len(set(prompts)) == 180
    assert prompts[0] == "The acting is" and prompts[-1] == "I think the second act felt"
    train, held_out = task.split_prompts(36, seed=3)
    assert len(held_out) == 36 and len(train) == 144 and not set(train) & set(held_out)
    assert task.split_prompts(36, seed=3) == (train, held_out)  # seeded
    with pytest.raises(ValueError, match="num_eval"):
        task.split_prompts(180, seed=0)


def test_oracle_reward_by_hand():
    assert task.reward(" absolutely brilliant!") == 1.0
    assert task.reward(" dull.") == 0.25  # (-0.5 + 1) / 2
    assert task.reward(" awful, but the cast was very good.") == pytest.approx(0.375)
    assert task.reward(" slow, and this movie felt simple.") == 0.5
    # outside the grammar: 0, however positive the words
    for text in (" brilliant brilliant", " brilliant", " good. great.", "", " nice."):
        assert task.reward(text) == 0.0 and not task.well_formed(text)
    np.testing.assert_array_equal(task.rewards([" bad.", " superb!"]), [0.0, 1.0])


def test_grammar_samples_are_well_formed_and_tokenise_as_single_word_adjectives():
    rng = np.random.default_rng(0)
    responses = [task.sample_response(rng) for _ in range(300)]
    assert all(task.well_formed(r) for r in responses)
    rewards = task.rewards(responses)
    assert set(np.unique(rewards)) <= set(np.arange(0, 1.0001, 0.125))
    # the grammar's mean reward is task.expected_sft_reward(): 300 draws, std <= 0.35 each
    assert abs(rewards.mean() - task.expected_sft_reward()) < 4 * 0.35 / math.sqrt(300)
    for word in task.LEXICON:
        assert len(TOKENIZER.encode(" " + word, add_special_tokens=False)) == 1, word


def test_preference_probability_is_bradley_terry():
    p = task.preference_probability(np.array([1.0, 0.25, 0.5]), np.array([0.5, 0.5, 0.5]),
                                    temperature=0.1)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([5.0, -2.5, 0.0]))), rtol=1e-12)
    np.testing.assert_array_equal(
        task.preference_probability(np.array([1.0, 0.0, 0.5]), np.array([0.5, 0.5, 0.5]),
                                    temperature=0), [1.0, 0.0, 0.5])


# ---------------------------------------------------------------- estimators and metrics

@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_mixture_estimator_is_unbiased_on_a_finite_distribution(name, alpha):
    # Its expectation under half pi, half pi_ref is sum_y (pi + pi_ref)/2 T(h(y)), exactly
    # D_f(pi, pi_ref); both sides in float32 terms of moderate size, summed in float64.
    rng = np.random.default_rng(1)
    logits_pi, logits_ref = rng.normal(size=12) * 2.5, rng.normal(size=12)
    log_pi = logits_pi - np.log(np.exp(logits_pi).sum())
    log_ref = logits_ref - np.log(np.exp(logits_ref).sum())
    terms = mixture_divergence_terms(name, log_pi - log_ref, alpha=alpha)
    expectation = np.sum(0.5 * (np.exp(log_pi) + np.exp(log_ref)) * terms)
    exact = float(f_divergence(name, jnp.asarray(log_pi), jnp.asarray(log_ref), alpha=alpha))
    assert exact > 0.1
    np.testing.assert_allclose(expectation, exact, rtol=2e-5)
    assert (terms >= 0).all()


@pytest.mark.parametrize("name,alpha", DIVERGENCES)
def test_mixture_estimator_terms_are_finite_and_grow_slowly(name, alpha):
    h = np.array([-300.0, -40.0, -1e-4, 0.0, 1e-4, 40.0, 300.0])
    terms = mixture_divergence_terms(name, h, alpha=alpha)
    assert np.isfinite(terms).all() and terms[3] == 0.0
    assert terms.max() <= 2 * 300 + 10  # at most ~2 |h|: no exp(|h|) blow-up


def test_pair_metrics_by_hand():
    # one prompt, two pairs: (a, b) scores from length-normalised log-probs
    logps = np.array([[-2.0, -6.0, -3.0, -3.0]])
    lengths = np.array([[2, 3, 1, 1]])  # scores -1, -2, -3, -3
    log_ratios = np.array([[0.5, -0.5, 0.1, 0.2]])
    rewards = np.array([[1.0, 0.25, 0.5, 0.5]])  # pair 2 is tied: left out of accuracy
    probability = np.array([[0.9, 0.5]])
    out = pair_metrics(logps, log_ratios, lengths, rewards, probability)
    p = 1 / (1 + np.exp(-1.0))  # softmax(-1, -2)[0]
    ece_1 = p * abs(0.9 - p) + (1 - p) * abs(0.1 - (1 - p))
    ece_2 = 0.5 * 0.0 + 0.5 * 0.0  # p = 0.5 = P*
    np.testing.assert_allclose(out["ece"], [(ece_1 + ece_2) / 2], rtol=1e-6)
    np.testing.assert_array_equal(out["accuracy"], [1.0])
    tied = pair_metrics(logps, log_ratios, lengths, np.full((1, 4), 0.5), probability)
    assert np.isnan(tied["accuracy"]).all()
    # the reference itself (h = 0 everywhere) orders no pair: accuracy 1/2, not 0
    at_reference = pair_metrics(logps, np.zeros((1, 4)), lengths, rewards, probability)
    np.testing.assert_array_equal(at_reference["accuracy"], [0.5])


def test_evaluation_steps():
    assert evaluation_steps(100, 25) == [25, 50, 75, 100]
    assert evaluation_steps(30, 20) == [20, 30]
    assert evaluation_steps(4, 10) == [4]


# ---------------------------------------------------------------- claims on hand-made records

def test_dominance_and_collapse_rules():
    assert report.dominated((1.0, 0.5), [(0.8, 0.5)])
    assert report.dominated((1.0, 0.5), [(1.0, 0.6)])
    assert not report.dominated((1.0, 0.5), [(1.0, 0.5), (0.5, 0.4), (1.2, 0.9)])
    reference = {"entropy/token": np.array([2.0, 2.0])}

    def run(well_formed, entropy, stopped=None):
        return {"stopped": stopped, "evals": {0: {}, 10: {"well_formed": np.array(well_formed),
                                                      "entropy/token": np.array(entropy)}}}

    assert not report.collapsed(run([0.9, 0.6], [1.0, 1.0]), reference)
    assert report.collapsed(run([0.4, 0.5], [1.0, 1.0]), reference)  # mean 0.45 < 0.5
    assert report.collapsed(run([1.0, 1.0], [0.4, 0.5]), reference)  # 0.45 < 0.25 * 2
    assert report.collapsed(run([1.0, 1.0], [1.0, 1.0], stopped="non-finite"), reference)


# ---------------------------------------------------------------- the study end to end

def test_registered_and_configurable(capsys):
    assert "fdpo_frontier" in EXPERIMENTS
    config = parse_config(fdpo_frontier.Config, ["--divergences", "jsd", "alpha_0.3", "--betas",
                                                 "0.2", "--table_beta", "0.2", "--mesh", "2", "2",
                                                 "2", "--top_p", "0.95", "--run_dir", "x"])
    assert config.divergences == ("jsd", "alpha_0.3") and config.betas == (0.2,)
    assert config.mesh == (2, 2, 2) and config.top_p == 0.95
    assert fdpo_frontier.divergence_spec("alpha_0.3") == ("alpha", 0.3)
    for bad, message in ((["--divergences", "jsdd"], "jsdd"),
                         (["--divergences", "alpha_1.5"], "alpha"),
                         (["--table_beta", "0.7"], "table_beta"),
                         (["--ppo_variants", "reward", "kl"], "kl"),
                         (["--temperatures", "0.6", "1.4"], "1.0")):
        with pytest.raises(SystemExit):  # before any model or data is built
            parse_config(fdpo_frontier.Config, bad)
        assert message in " ".join(capsys.readouterr().err.split()), bad
    for config in (fdpo_frontier.SMOKE, fdpo_frontier.FULL, fdpo_frontier.PAPER):
        assert isinstance(config, fdpo_frontier.Config)
    assert fdpo_frontier.parse([]) == fdpo_frontier.Config()
    full = fdpo_frontier.parse(["full", "--seeds", "7"])  # a preset, then overrides
    assert full == dataclasses.replace(fdpo_frontier.FULL, seeds=(7,))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    config = dataclasses.replace(fdpo_frontier.SMOKE,
                                 run_dir=str(tmp_path_factory.mktemp("frontier") / "run"))
    return config, fdpo_frontier.run(config)


def test_smoke_run_writes_every_output(smoke):
    config, text = smoke
    out = fdpo_frontier.pathlib.Path(config.run_dir)
    for name in ("frontier.png", "entropy.png", "ece.png"):
        assert (out / name).stat().st_size > 5000, name
    assert "## Claims of the thesis, checked on this run" in text
    assert "- Does the coefficient restrain PPO?" in text and "  - jsd: PPO(reward) " in text
    for row in ("f-DPO jsd (beta 0.1)", "PPO(reward) jsd (coef 0.1)", "PPO(loss) jsd (coef 0.1)"):
        assert f"| {row} |" in text, row
    assert (out / "results.md").read_text() == text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seeds"] == list(config.seeds)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fdpo = [r for r in records if r["method"] == "f-DPO" and r["coef"] == 0.1]
    assert [r["step"] for r in fdpo] == [0, 2, 4]
    for r in records:
        assert r["seeds"] == len(config.seeds)
        assert r["mis/jsd"] >= 0 and 0 <= r["score/oracle"] <= 1 and r["entropy/sequence"] > 0
    assert fdpo[0]["mis/jsd"] == fdpo[0]["mis/reverse_kl"] == 0.0  # step 0 is the reference
    final = fdpo[-1]
    for key in ("T1/self_bleu", "T1.4/distinct_2", "ece", "well_formed"):
        assert key in final
    for seed in config.seeds:
        run = out / f"seed_{seed}" / "fdpo" / "jsd_beta0.1"
        assert [json.loads(l)["step"] for l in (run / "evals.jsonl").read_text().splitlines()] \
            == [2, 4]
        assert (out / f"seed_{seed}" / "ppo_loss" / "jsd_coef0.1" / "evals.jsonl").exists()


def test_restart_after_a_kill_reproduces_the_run(smoke):
    config, text = smoke
    run = fdpo_frontier.pathlib.Path(config.run_dir) / "seed_1" / "fdpo" / "jsd_beta0.1"
    evals = run / "evals.jsonl"
    lines = evals.read_text().splitlines()
    final = json.loads(lines[-1])
    assert final["step"] == 4
    # killed before step 4 was checkpointed and evaluated: its checkpoint and record are gone
    shutil.rmtree(run / "checkpoints" / "4")
    evals.write_text(lines[0] + "\n")
    again = fdpo_frontier.run(config)
    redone = json.loads(evals.read_text().splitlines()[-1])
    assert redone["step"] == 4
    for name, values in final["metrics"].items():  # resumed at step 2: the same policy
        np.testing.assert_array_equal(redone["metrics"][name], values, err_msg=name)
    assert again == text
    with pytest.raises(ValueError, match="fdpo_learning_rate"):  # results never mix configs
        fdpo_frontier.run(dataclasses.replace(config, fdpo_learning_rate=1e-3))
