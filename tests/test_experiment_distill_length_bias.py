"""experiments.distill_length_bias: the world and oracle, D_rho and its subsets, the vmapped
reward ensemble, the methods' objectives and data, selection and claims against hand values,
and the pipeline end to end at SMOKE size with a resumed restart."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax.data import default_tokenizer
from alignax.eval import Estimate
from alignax.models import RewardEnsemble, create, tiny_config
from alignax.objectives import (DPO, IPO, Distill, PessimisticDistill, PessimisticDPO,
                                bradley_terry_loss)
from alignax.trainer.cli import parse_config
from alignax.training import ConfigMismatchError, check_compatible, split_model
from experiments import EXPERIMENTS
from experiments.distill_length_bias import SMOKE, Config, phases, report, rewards, run
from experiments.distill_length_bias.data import (Pairs, ensemble_subsets, make_pool,
                                                  pool_statistics, sample_d_rho)
from experiments.distill_length_bias.policies import (METHODS, best_members, make_objective,
                                                      score_texts)
from experiments.distill_length_bias.world import (BAD_TIPS, USEFUL_TIPS, World,
                                                   generate_responses, make_world, sentences)


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def world(tokenizer):
    return make_world(tokenizer, seed=0, max_prompt_tokens=16, num_val=6, num_test=12,
                      relevance_scale=0.5, length_weight=0.4)


def small_world(relevance) -> World:
    return World(prompts=("q0", "q1"), train=(0,), val=(1,), test=(1,),
                 relevance=np.asarray(relevance, np.float64), relevance_scale=0.5,
                 length_weight=0.4)


# ---------------------------------------------------------------- world and oracle


def test_oracle_reward_by_hand():
    relevance = np.zeros((2, len(USEFUL_TIPS) + len(BAD_TIPS)))
    relevance[1, 0] = 2.0  # tip 0 is very relevant to prompt 1
    relevance[1, len(USEFUL_TIPS)] = -1.0  # bad tip 0 is irrelevant to prompt 1
    w = small_world(relevance)
    good, bad = USEFUL_TIPS[0], BAD_TIPS[0]
    # prompt 0: values +1, -1 -> mean 0, plus 0.4 * 2 sentences
    assert w.reward(0, f" {good} {bad}") == pytest.approx(0.0 + 0.8)
    # prompt 1: (1 + 0.5 * 2) and (-1 + 0.5 * -1) -> mean 0.25, plus 0.8
    assert w.reward("q1", f" {good} {bad}") == pytest.approx((2.0 - 1.5) / 2 + 0.8)
    # a repeated tip and a cut-off fragment count -1 each, with no relevance
    assert w.reward(1, f" {good} {good} Take small") == pytest.approx((2.0 - 1 - 1) / 3 + 1.2)
    assert w.reward(0, "") == -1.0 and w.reward(0, "   ") == -1.0
    assert w.reward(0, " Not a tip at all.") == pytest.approx(-1.0 + 0.4)
    np.testing.assert_allclose(w.rewards([0, 1], [f" {good}", f" {good}"]), [1.4, 2.4])
    with pytest.raises(ValueError, match="not a prompt"):
        w.reward("q9", f" {good}")


def test_sentences_split_on_end_punctuation():
    assert sentences(" Sure. Take small steps every day! Why? tail") == [
        "Sure.", "Take small steps every day!", "Why?", "tail"]
    assert sentences("") == []


def test_world_prompts_split_and_fit(world, tokenizer):
    splits = [set(world.train), set(world.val), set(world.test)]
    assert (len(world.val), len(world.test)) == (6, 12)
    assert sum(map(len, splits)) == len(set().union(*splits)) == len(world.prompts)
    assert max(len(tokenizer(p)["input_ids"]) for p in world.prompts) <= 16
    assert world.relevance.shape == (len(world.prompts), len(USEFUL_TIPS) + len(BAD_TIPS))
    with pytest.raises(ValueError, match="max_prompt_tokens=5"):
        make_world(tokenizer, seed=0, max_prompt_tokens=5, num_val=2, num_test=2,
                   relevance_scale=0.5, length_weight=0.4)


def test_tips_have_the_same_mean_token_length(tokenizer):
    lengths = {name: [len(tokenizer.encode(" " + t, add_special_tokens=False)) for t in tips]
               for name, tips in (("useful", USEFUL_TIPS), ("bad", BAD_TIPS))}
    assert np.mean(lengths["useful"]) == pytest.approx(np.mean(lengths["bad"]))
    assert max(max(v) for v in lengths.values()) <= 7


def test_generator_responses():
    rng = np.random.default_rng(0)
    responses = generate_responses(rng, 300, max_sentences=3, useful_probability=0.5)
    counts = [len(sentences(r)) for r in responses]
    assert set(counts) == {1, 2, 3}
    for r in responses:
        parts = sentences(r)
        assert r.startswith(" ") and len(set(parts)) == len(parts)
        assert set(parts) <= set(USEFUL_TIPS + BAD_TIPS)
    useful = np.mean([p in USEFUL_TIPS for r in responses for p in sentences(r)])
    assert 0.4 < useful < 0.6


# ---------------------------------------------------------------- D_rho and its subsets


def hand_pairs(tokens_a, tokens_b, reward_a, reward_b) -> Pairs:
    n = len(tokens_a)
    return Pairs(np.zeros(n, int), tuple(f"a{i}" for i in range(n)),
                 tuple(f"b{i}" for i in range(n)), np.asarray(reward_a, float),
                 np.asarray(reward_b, float), np.asarray(tokens_a), np.asarray(tokens_b))


def test_longer_means_ten_percent_more_tokens():
    pairs = hand_pairs([10, 11, 20, 20, 5], [11, 10, 21, 22, 10], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0])
    # 11 vs 10 is exactly 10% more (longer); 21 vs 20 is not; 22 vs 20 is
    np.testing.assert_array_equal(pairs.has_longer, [True, True, False, True, True])
    np.testing.assert_array_equal(pairs.a_wins, [True, False, True, False, True])
    np.testing.assert_array_equal(pairs.longer_wins, [False, False, False, True, False])
    assert pool_statistics(pairs) == {"pairs": 5, "with_longer_response": 4,
                                      "longer_preferred": 0.25}
    chosen, rejected = pairs.chosen_rejected()
    assert chosen == ["a0", "b1", "a2", "b3", "a4"] and rejected[1] == "a1"


def test_d_rho_has_the_longer_response_win_in_a_fraction_rho(world, tokenizer):
    pool = make_pool(world, tokenizer, np.random.default_rng(0), size=400, max_sentences=3,
                     useful_probability=0.5)
    assert set(pool.prompt) <= set(world.train)
    np.testing.assert_allclose(pool.reward_a, world.rewards(pool.prompt, pool.response_a))
    for rho in (0.2, 0.5, 0.8):
        pairs, k = sample_d_rho(pool, rho, 100, np.random.default_rng(1))
        assert k == round(rho * 100) and len(pairs) == 100 and pairs.has_longer.all()
        assert pairs.longer_wins[:k].all() and not pairs.longer_wins[k:].any()
        assert len(set(zip(pairs.response_a, pairs.response_b, pairs.prompt))) == 100
    with pytest.raises(ValueError, match="raise pool_factor"):
        sample_d_rho(pool, 1.0, 390, np.random.default_rng(1))
    with pytest.raises(ValueError, match="rho must be in"):
        sample_d_rho(pool, 1.5, 10, np.random.default_rng(1))


def test_ensemble_subsets_by_hand():
    rng = np.random.default_rng(0)
    # n = 10 pairs, k = 2 longer-wins: b = 0.5 -> m = floor(min(2 / 0.5, 8 / 0.5)) = 4
    subsets = ensemble_subsets(10, 2, (0.2, 0.5, 0.8), rng)
    # b = 0.2: m = floor(min(10, 10)) = 10, 2 long; b = 0.8: m = floor(min(2.5, 40)) = 2, 2 long
    assert [len(s) for s in subsets] == [10, 4, 2]
    assert [int((s < 2).sum()) for s in subsets] == [2, 2, 2]
    for s in subsets:
        assert len(set(s)) == len(s) and s.min() >= 0 and s.max() < 10
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        ensemble_subsets(10, 2, (1.0,), rng)
    with pytest.raises(ValueError, match="raise num_pairs"):
        ensemble_subsets(10, 0, (0.5,), rng)


def test_records_for_the_three_kinds_of_method(world):
    pairs = hand_pairs([5, 10], [10, 5], [1.0, 0.0], [0.0, 1.0])
    records = pairs.preference_records(world)
    assert records[0]["chosen"] == "a0" and records[1]["chosen"] == "b1"
    unlabeled = pairs.unlabeled_records(world, np.array([0.5, 1.5]), np.array([2.0, 3.0]))
    assert unlabeled[1] == {"prompt": world.prompts[0], "response_1": "a1", "response_2": "b1",
                            "target_rewards_1": 1.5, "target_rewards_2": 3.0}
    ensemble = pairs.unlabeled_records(world, np.ones((2, 3)), np.zeros((2, 3)))
    assert ensemble[0]["target_rewards_1"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="target rewards"):
        pairs.unlabeled_records(world, np.ones(3), np.ones(3))


# ---------------------------------------------------------------- the reward ensemble


@pytest.fixture(scope="module")
def tiny_policy(tokenizer):
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=16,
                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1)
    return config, create(config, rngs=nnx.Rngs(0))


def test_ensemble_starts_from_the_policy(tiny_policy):
    config, policy = tiny_policy
    _, params, _ = split_model(policy)
    ensemble = rewards.init_from_policy(config, params, num_members=3, key=jax.random.PRNGKey(1))
    flat = dict(nnx.to_flat_state(nnx.state(ensemble.members, nnx.Param)))
    for path, variable in nnx.to_flat_state(params):
        if path[0] != "lm_head":
            stacked = np.asarray(flat[("backbone", *path)][...])
            for m in range(3):
                np.testing.assert_array_equal(stacked[m], np.asarray(variable[...]))
    (head,) = [v for path, v in flat.items() if path[0] == "score"]
    heads = np.asarray(head[...])  # [3, D, 1]
    assert heads.shape[0] == 3 and not np.allclose(heads[0], heads[1])


def test_member_batches_walk_each_subset(tiny_policy):
    subsets = [np.arange(5), np.array([7, 9])]
    steps = [rewards.member_batches(subsets, batch_size=2, seed=3, step=t) for t in range(5)]
    assert all(s.shape == (2, 2) for s in steps)
    first = np.concatenate([s[0] for s in steps])  # member 0: 10 rows = two epochs of 5
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and sorted(first[5:]) == [0, 1, 2, 3, 4]
    assert set(np.concatenate([s[1] for s in steps])) == {7, 9}
    np.testing.assert_array_equal(
        steps[3], rewards.member_batches(subsets, batch_size=2, seed=3, step=3))


def test_each_member_trains_on_its_own_rows_only(tiny_policy):
    """The ensemble's gradient for member m is the gradient of member m's own Bradley-Terry
    loss on its own rows (a float64 reference for the loss); the other members' rows do not
    enter it."""
    config, policy = tiny_policy
    _, params, _ = split_model(policy)
    ensemble = rewards.init_from_policy(config, params, num_members=2, key=jax.random.PRNGKey(2))
    graphdef, stacked, rest = nnx.split(ensemble.members, nnx.Param, ...)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, (2, 2, 3, 8)).astype(np.int32)  # [M, chosen/rejected, b, T]
    mask = np.ones_like(ids)
    mask[..., 6:] = 0
    batch = {"chosen_ids": ids[:, 0], "chosen_mask": mask[:, 0], "rejected_ids": ids[:, 1],
             "rejected_mask": mask[:, 1]}
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda p, b: rewards.ensemble_loss(graphdef, rest, p, b), has_aux=True))
    (total, (losses, _)), grads = value_and_grad(stacked, batch)
    scores = np.asarray(rewards.member_scores(graphdef, stacked, rest,
                                              np.concatenate([ids[:, 0], ids[:, 1]], 1),
                                              np.concatenate([mask[:, 0], mask[:, 1]], 1)),
                        np.float64)  # [M, 2b]
    reference = np.mean(np.logaddexp(0.0, -(scores[:, :3] - scores[:, 3:])), axis=1)
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert float(total) == pytest.approx(reference.sum(), rel=1e-5)
    for m in range(2):
        alone = jax.tree.map(lambda x: x[m:m + 1], stacked)
        own = {k: v[m:m + 1] for k, v in batch.items()}
        (_, (single_loss, _)), single = value_and_grad(alone, own)  # an ensemble of one
        np.testing.assert_allclose(single_loss, losses[m:m + 1], rtol=1e-6)
        for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(single)):
            scale = float(jnp.max(jnp.abs(s))) + 1e-12
            np.testing.assert_allclose(np.asarray(g[m]), np.asarray(s[0]), rtol=1e-5,
                                       atol=1e-6 * scale)


def test_score_member_rows_keeps_each_members_rows(tiny_policy):
    config, policy = tiny_policy
    _, params, _ = split_model(policy)
    ensemble = rewards.init_from_policy(config, params, num_members=2, key=jax.random.PRNGKey(3))
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 100, (2, 5, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    got = rewards.score_member_rows(ensemble, ids, mask, batch_size=4)  # 5 rows in 2 blocks
    for m in range(2):
        np.testing.assert_allclose(got[m], np.asarray(ensemble.member(m)(ids[m], mask[m])),
                                   rtol=1e-5, atol=1e-6)
    assert isinstance(ensemble, RewardEnsemble)


# ---------------------------------------------------------------- methods and evaluation


def test_each_method_has_its_objective_and_data(world, tokenizer):
    expected = {"dpo": DPO, "ipo": IPO, "d-dpo": Distill, "p-dpo": PessimisticDPO,
                "pd-dpo": PessimisticDistill, "e-dpo": PessimisticDistill}
    config = dataclasses.replace(SMOKE, num_pairs=8)
    pool = make_pool(world, tokenizer, np.random.default_rng(0), size=64, max_sentences=3,
                     useful_probability=0.5)
    pairs, k = sample_d_rho(pool, 0.5, 8, np.random.default_rng(0))
    group = phases.Group(0, 0.5, pairs, k, [np.arange(8)],
                         phases.prepare(config, pairs.preference_records(world), tokenizer))
    scores = {group.name: (np.ones((8, 6)), np.zeros((8, 6)))}
    for method in METHODS:
        objective = make_objective(method, 0.7, policy_steps=100)
        assert type(objective) is expected[method]
        assert getattr(objective, "tau" if method == "ipo" else "beta") == 0.7
        if method in ("p-dpo", "pd-dpo", "e-dpo"):  # 004 §4.1: gamma 1e-4 -> 1e-2 linearly
            # float32 interpolation: error <= a few eps times the end value 1e-2
            assert [float(objective.gamma(s)) for s in (0, 50, 100)] == pytest.approx(
                [1e-4, 0.00505, 1e-2], rel=0, abs=4 * 2**-23 * 1e-2)
        dataset = phases.method_dataset(config, world, group, method, scores, tokenizer)
        check_compatible(objective, data=dataset)
        batch = dataset.collate(dataset.examples[:2])
        if method == "e-dpo":
            assert batch["target_rewards_1"].shape == (2, 5)
        elif method in ("d-dpo", "pd-dpo"):
            assert batch["target_rewards_1"].shape == (2,)
        else:
            assert "chosen_input_ids" in batch
    assert phases.sweep(Config(), "ipo") == Config().taus
    assert phases.sweep(Config(), "e-dpo") == Config().betas
    with pytest.raises(ValueError, match="unknown method"):
        make_objective("kto", 0.1, policy_steps=10)


def test_best_member_is_the_one_the_policy_matches():
    h_1, h_2 = np.array([1.0, 0.0, 2.0]), np.array([0.0, 1.0, 0.0])
    # beta (h_1 - h_2) = [0.5, -0.5, 1.0]; member 1 matches pairs 0 and 2, member 0 pair 1
    r_1 = np.array([[3.0, 0.5], [0.0, 2.0], [0.0, 1.0]])
    r_2 = np.zeros((3, 2))
    r_1[1, 0] = -0.5
    np.testing.assert_array_equal(best_members(h_1, h_2, r_1, r_2, beta=0.5), [1, 0, 1])


def test_score_texts_by_hand():
    w = small_world(np.zeros((2, len(USEFUL_TIPS) + len(BAD_TIPS))))
    good, bad = USEFUL_TIPS[1], BAD_TIPS[2]
    stats = score_texts(w, (0, 1), [[f" {good}", f" {good} {bad}"], ["", f" {bad}"]],
                        np.array([[6, 12], [0, 6]]))
    np.testing.assert_allclose(stats.oracle, [(1.4 + 0.8) / 2, (-1.0 - 0.6) / 2])
    np.testing.assert_allclose(stats.sentences, [1.5, 0.5])
    np.testing.assert_allclose(stats.useful, [0.75, 0.0])
    np.testing.assert_allclose(stats.tokens, [9.0, 3.0])


# ---------------------------------------------------------------- selection and claims


def stats(oracle):
    return {"oracle": list(oracle)}


def test_selection_on_validation_and_test_units():
    baselines = {0: {"val": stats([0.0, 0.0]), "test": stats([1.0, 1.0])},
                 1: {"val": stats([0.5, 0.5]), "test": stats([0.0, 2.0])}}

    def record(value, seed, val, test, step=4):
        return {"method": "dpo", "value": value, "rho": 0.2, "seed": seed,
                "evals": [{"step": step, "val": stats(val), "test": stats(test)}]}

    records = [record(0.3, 0, [1.0, 1.0], [2.0, 2.0]), record(0.3, 1, [0.5, 0.5], [1.0, 1.0]),
               record(1.0, 0, [0.0, 0.0], [9.0, 9.0]), record(1.0, 1, [2.5, 0.5], [0.0, 0.0]),
               record(3.0, 0, [9.0, 9.0], [9.0, 9.0])]  # seed 1 missing: not a candidate
    chosen = report.select(records, baselines, "dpo", 0.2, [0, 1])
    # validation advantages: beta 0.3 -> mean(1, 1, 0, 0) = 0.5; beta 1 -> mean(0, 0, 2, 0)
    assert (chosen["value"], chosen["step"], chosen["val"]) == (0.3, 4, 0.5)
    np.testing.assert_allclose(chosen["test_units"], [1.0, 1.0, 1.0, -1.0])
    assert report.validation_curve(records, baselines, "dpo", 0.2, [0, 1]) == {0.3: 0.5,
                                                                               1.0: 0.5}
    with pytest.raises(ValueError, match="every seed"):
        report.select(records, baselines, "dpo", 0.5, [0, 1])


def test_member_shares_and_claims_by_hand():
    shares = {0.2: report.member_shares({"evals": {0: {"member_counts": [0, 0, 0, 1, 3]},
                                                   1: {"member_counts": [0, 0, 0, 0, 4]}}}),
              0.8: np.array([0.6, 0.4, 0.0, 0.0, 0.0])}
    np.testing.assert_allclose(shares[0.2], [0, 0, 0, 1 / 8, 7 / 8])
    e = lambda m: Estimate(m, m - 0.1, m + 0.1, 10)  # noqa: E731
    estimates = {"dpo": {0.2: e(0.1), 0.8: e(0.6)}, "ipo": {0.2: e(0.0), 0.8: e(0.5)},
                 "d-dpo": {0.2: e(0.2), 0.8: e(0.9)}, "p-dpo": {0.2: e(0.05), 0.8: e(0.4)},
                 "pd-dpo": {0.2: e(0.25), 0.8: e(0.8)}, "e-dpo": {0.2: e(0.3), 0.8: e(0.7)}}
    selections = {m: {0.2: {"value": 1.0}, 0.8: {"value": 0.3}} for m in estimates}
    claims = report.judge_claims(estimates, selections, shares, (0.2, 0.4, 0.5, 0.6, 0.8))
    assert {k: v[0] for k, v in claims.items()} == {
        "improves": "holds", "distill_beats_dpo_ipo": "holds", "edpo_best_short": "holds",
        "ddpo_best_long": "holds", "pdpo_not_better": "holds", "members_opposite": "holds",
        "beta_inverse": "holds"}
    estimates["e-dpo"][0.2] = e(0.15)  # now d-DPO's 0.2 beats it, pd-DPO's 0.25 too
    selections["dpo"][0.8] = {"value": 3.0}
    claims = report.judge_claims(estimates, selections, shares, (0.2, 0.4, 0.5, 0.6, 0.8))
    assert claims["edpo_best_short"][0] == "fails" and "pd-dpo" in claims["edpo_best_short"][1]
    assert claims["beta_inverse"][0] == "fails"
    assert claims["distill_beats_dpo_ipo"][0] == "holds"
    assert [report.paper_statement(r) for r in (0.2, 0.5, 0.6, 0.7)] == [
        report.paper_statement(0.2), report.paper_statement(0.2), "(no statement)",
        report.paper_statement(0.8)]
    assert "e-DPO" in report.paper_statement(0.5) and "d-DPO best" in report.paper_statement(0.7)
    only = report.judge_claims({"dpo": estimates["dpo"]}, {"dpo": selections["dpo"]}, {},
                               (0.2, 0.8))
    assert only["distill_beats_dpo_ipo"][0] == "n/a" and only["members_opposite"][0] == "n/a"


# ---------------------------------------------------------------- config and end to end


def test_config_is_registered_validated_and_parsed():
    assert "distill_length_bias" in EXPERIMENTS
    config = parse_config(Config, ["--rhos", "0.2", "0.4", "--methods", "dpo", "e-dpo",
                                   "--policy_steps", "10"])
    assert config.rhos == (0.2, 0.4) and config.methods == ("dpo", "e-dpo")
    assert config.policy_steps == 10 and config.betas == Config().betas
    with pytest.raises(ValueError, match="unknown"):
        Config(methods=("dpo", "kto"))
    with pytest.raises(ValueError, match="rhos"):
        Config(rhos=(1.2,))
    with pytest.raises(ValueError, match="eval_points"):
        Config(policy_steps=2, eval_points=3)


def test_smoke_pipeline_end_to_end_and_resume(tmp_path):
    config = dataclasses.replace(SMOKE, run_dir=str(tmp_path / "run"))
    table = run(config)
    out = tmp_path / "run"
    for rho in ("0.2", "0.8"):
        assert f"| {rho} |" in table
    assert "| best here | 004 §4.2 |" in table and report.paper_statement(0.8) in table
    for name in ("summary.md", "summary.json", "figure2.png", "figure_c1.png",
                 "figure_d1.png", "results.jsonl", "timings.jsonl"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    policies = [r for r in records if r["method"] != "sft"]
    assert len(policies) == 3 * 2 * 2 and len(records) == len(policies) + 2
    for r in policies:
        assert [e["step"] for e in r["evals"]] == [1, 2]
        assert all(len(e["test"]["oracle"]) == 2 and np.isfinite(e["val"]["oracle"]).all()
                   for e in r["evals"])
        if r["method"] == "e-dpo":
            assert all(sum(e["member_counts"]) == 48 for e in r["evals"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["selected"]) == {"dpo", "d-dpo", "e-dpo"}
    assert len(summary["member_shares"]["0.2"]) == 5
    diagnostics = summary["reward_models"]["rho0.2_seed0"]
    assert len(diagnostics["probe_accuracy"]) == 6 and diagnostics["subset_sizes"][0] == 48
    assert "The paper's claims" in (out / "summary.md").read_text()
    sft_lines = (out / "sft" / "metrics.jsonl").read_text()
    reward_lines = (out / "rewards" / "metrics.jsonl").read_text()
    assert len(reward_lines.splitlines()) == 3 and (out / "rewards" / "checkpoints").is_dir()

    # killed after two more policy runs: the restart redoes only the missing ones, the same way
    kept, lost = records[:-2], records[-2:]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert run(config) == table
    invocations = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert len(invocations) == 2 and set(invocations[1]["phases"]) == {
        "sft", "reward_models", "policies", "report"}
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert again[-2:] == lost
    assert (out / "sft" / "metrics.jsonl").read_text() == sft_lines
    assert (out / "rewards" / "metrics.jsonl").read_text() == reward_lines

    # a record made under another training config is refused, not mixed in
    with pytest.raises(ConfigMismatchError, match="another config"):
        run(dataclasses.replace(config, policy_learning_rate=0.5))


def test_docs_state_the_committed_run_and_the_paper_grid():
    """The package docstring's verdicts are the committed run's (experiments/results/...), and
    BUILD.md's count of PAPER policy runs is PAPER's."""
    import pathlib

    import experiments.distill_length_bias as study

    results = pathlib.Path(study.__file__).parents[1] / "results" / "distill_length_bias"
    summary = json.loads((results / "summary.json").read_text())
    claims = summary["claims"]
    doc = " ".join(study.__doc__.split())
    assert len(claims) == len(report.CLAIMS)
    for claim in claims.values():
        assert " ".join(f"- {claim['verdict']}: {claim['claim']}".split()) in doc
    # the prose after the list: the members' length correlation (mean over seeds, as in
    # summary.md) rises with b at every rho, r_rho's with rho, and p-DPO is the best method at
    # the two smaller rhos
    corr = {rho: np.mean([d["probe_length_corr"] for name, d in summary["reward_models"].items()
                          if name.startswith(f"rho{rho}_")], axis=0)
            for rho in ("0.2", "0.5", "0.8")}  # [1 + B] each
    for rho, values in corr.items():
        assert list(values[1:]) == sorted(values[1:]), (rho, values)
    assert corr["0.2"][0] < corr["0.5"][0] < corr["0.8"][0]
    means = {m: {rho: v["test_advantage"]["mean"] for rho, v in by_rho.items()}
             for m, by_rho in summary["selected"].items()}
    assert [max(means, key=lambda m: means[m][rho]) for rho in ("0.2", "0.5")] == ["p-dpo"] * 2
    assert "p-DPO (not e-DPO) is the best method at the smaller rhos" in doc
    runs = len(study.PAPER.rhos) * len(study.PAPER.seeds) * (
        5 * len(study.PAPER.betas) + len(study.PAPER.taus))
    build = (pathlib.Path(study.__file__).parents[2] / "BUILD.md").read_text()
    assert f"{runs} policy runs of 10^4 steps" in build
