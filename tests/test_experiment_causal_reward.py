"""The causal-reward pipeline (thesis ch. 4): every phase of every study at SMOKE size, a
restart that trains nothing again, and the pipeline's own pieces against hand values.

The data builders and the studies' metrics are tested in `test_causal_reward_data.py`. No paper
claim is asserted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax.data import default_tokenizer
from alignax.models import create, tiny_config
from alignax.objectives import BradleyTerry, CausalReward
from alignax.schedules import Linear
from alignax.trainer.cli import parse_config
from experiments.causal_reward import PAPER, SMOKE, Config, pipeline
from experiments.causal_reward.evaluation import left_pad, pairwise_accuracy
from experiments.causal_reward.phases import reward_model_from_policy
from experiments.causal_reward.studies import STUDIES, length_group


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """SMOKE run of all four studies on one device (as the committed run): on the 8 simulated
    devices of the test session the length study's DPO step aborts inside XLA (open)."""
    config = dataclasses.replace(SMOKE, run_dir=str(tmp_path_factory.mktemp("causal") / "run"),
                                 mesh=(1, 1, 1))
    summary = pipeline.run(config)
    return config, summary


def _phase_dirs(run_dir):
    return sorted(p.parent for p in run_dir.rglob("metrics.jsonl"))


def test_smoke_runs_every_phase_of_every_study(smoke):
    config, summary = smoke
    run_dir = pipeline.pathlib.Path(config.run_dir)
    for heading in ("Sycophancy (Table 4.1)", "Length (Figure 4.2)", "Concept (Table 4.2)",
                    "Discrimination (Table 4.3"):
        assert f"### {heading}" in summary
    assert (run_dir / "summary.md").read_text(encoding="utf-8") == summary
    figures = {"sycophancy": "table_4_1.png", "length": "figure_4_2.png",
               "concept": "table_4_2.png", "discrimination": "figure_4_3.png"}
    for name in config.studies:
        study = run_dir / name
        assert (study / figures[name]).stat().st_size > 1000
        result = json.loads((study / "results.json").read_text())
        assert set(result["reward_models"]) == {"vanilla", "conditional@1", "unconditional@1"}
        for metrics in result["reward_models"].values():
            assert 0 <= metrics["accuracy"] <= 1
        for spec in pipeline.policy_specs(config, name):
            policy = spec.name(config)
            for seed in config.seeds:
                run = (study / "ppo" / policy if spec.method == "ppo" else
                       study / spec.method) / f"seed{seed}"
                assert (run / "outputs.json").exists(), run
                assert (run / "checkpoints").is_dir(), run
        assert (study / "sft" / "checkpoints").is_dir()
        assert (study / "data" / "train.jsonl").exists()
    # every training phase logged finite losses
    for phase in _phase_dirs(run_dir):
        rows = [json.loads(line) for line in (phase / "metrics.jsonl").read_text().splitlines()]
        assert rows, phase
        values = [v for row in rows for k, v in row.items() if "loss" in k]
        assert values and all(math.isfinite(v) for v in values), phase


def test_restart_restores_instead_of_training(smoke):
    config, summary = smoke
    run_dir = pipeline.pathlib.Path(config.run_dir)
    logs = {p: (p / "metrics.jsonl").read_text() for p in _phase_dirs(run_dir)}
    # a PPO run killed after its last checkpoint but before its outputs were written
    killed = run_dir / "sycophancy" / "ppo" / "vanilla" / f"seed{config.seeds[0]}"
    outputs = (killed / "outputs.json").read_text()
    (killed / "outputs.json").unlink()
    assert pipeline.run(config) == summary
    assert (killed / "outputs.json").read_text() == outputs  # same seed, same samples
    assert {p: (p / "metrics.jsonl").read_text() for p in _phase_dirs(run_dir)} == logs


def test_reward_objectives_follow_the_key():
    config = Config(rm_steps=100, lambda_warmup=0.5, lambdas=(1.0, 10.0))
    assert pipeline.reward_objective(config, "vanilla", 2) == BradleyTerry()
    crm = pipeline.reward_objective(config, "conditional@10", 60)
    assert crm == CausalReward(lam=Linear(0.0, 10.0, 50), num_bins=60, bandwidth=(1.0,),
                               conditional=True, unbiased=False, reduction="mean")
    flat = pipeline.reward_objective(dataclasses.replace(config, lambda_warmup=0.0),
                                     "unconditional@0.5", 2)
    assert flat.lam == 0.5 and not flat.conditional
    assert pipeline.reward_model_keys(config) == [
        "vanilla", "conditional@1", "conditional@10", "unconditional@1", "unconditional@10"]


def test_length_study_runs_figure_4_2s_grid():
    config = Config(lambdas=(1.0,), kl_coef=0.01, length_kl_coefs=(0.01, 0.1),
                    length_penalties=(0.0, 0.02))
    names = [s.name(config) for s in pipeline.policy_specs(config, "length")]
    assert names == ["vanilla", "vanilla+lp0.02", "conditional@1", "unconditional@1",
                     "vanilla+kl0.1", "vanilla+lp0.02+kl0.1", "conditional@1+kl0.1",
                     "unconditional@1+kl0.1", "dpo", "causal_dpo"]
    assert [length_group(n) for n in names[:4]] == [
        "vanilla + length penalty", "vanilla + length penalty", "conditional CRM",
        "unconditional CRM"]
    assert length_group("dpo") is None
    others = [s.name(config) for s in pipeline.policy_specs(config, "concept")]
    assert others == ["vanilla", "conditional@1", "unconditional@1", "dpo", "causal_dpo"]


def test_length_penalized_reward_subtracts_per_token():
    def reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return jnp.array([1.0, 2.0])

    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    penalized = pipeline.LengthPenalizedReward(reward, coefficient=0.25)
    np.testing.assert_allclose(penalized(None, None, None, mask), [1.0 - 0.75, 2.0 - 0.25])


def test_config_validation_and_flags():
    config = parse_config(Config, ["--studies", "length", "concept", "--lambdas", "0.5", "3",
                                   "--seeds", "4", "5", "6"])
    assert config.studies == ("length", "concept") and config.lambdas == (0.5, 3.0)
    assert config.seeds == (4, 5, 6) and len(Config().seeds) >= 3
    for bad in (dict(studies=("nope",)), dict(lambdas=(0.0,)), dict(seeds=(1, 1)),
                dict(crm_kinds=("both",)), dict(lambda_warmup=1.0),
                dict(length_penalties=(-1.0,))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
    with pytest.raises(ValueError, match="lora_rank"):
        pipeline.run(dataclasses.replace(SMOKE, lora_rank=8))
    assert set(STUDIES) == {"sycophancy", "length", "concept", "discrimination"}


def test_reward_model_starts_from_the_policy_backbone():
    tok = default_tokenizer()
    policy = create(tiny_config("llama", vocab_size=len(tok), hidden_size=32,
                                num_hidden_layers=1, intermediate_size=64),
                    rngs=nnx.Rngs(0), mesh=jax.make_mesh((8,), ("data",)))
    rm = reward_model_from_policy(policy, seed=3)
    source = dict(nnx.to_flat_state(nnx.state(policy, nnx.Param)))
    copied = dict(nnx.to_flat_state(nnx.state(rm.backbone, nnx.Param)))
    assert copied.keys() <= source.keys() and copied
    for path, value in copied.items():
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(source[path][...]))
    head = np.asarray(rm.score.kernel[...])
    assert head.shape == (32, 1) and 0 < head.std() < 0.1


def test_pair_helpers_by_hand():
    ids, mask = left_pad([np.array([5, 6]), np.array([7])], width=3, pad_token_id=0)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[False, True, True], [False, False, True]]
    with pytest.raises(ValueError, match=r"\[0\]"):
        left_pad([np.arange(4)], width=3, pad_token_id=0)
    assert pairwise_accuracy(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])) == 0.5


def test_cached_recomputes_under_another_fingerprint(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    path = tmp_path / "a" / "value.json"
    assert pipeline.cached(path, {"k": 1}, compute) == {"x": 1}
    assert pipeline.cached(path, {"k": 1}, compute) == {"x": 1}
    assert pipeline.cached(path, {"k": 2}, compute) == {"x": 2}
    assert len(calls) == 2


def test_build_md_command_is_the_paper_config():
    text = (pipeline.pathlib.Path(__file__).parents[1] / "BUILD.md").read_text(encoding="utf-8")
    start = text.index("python -m experiments.causal_reward --run_dir runs/causal_reward_paper")
    command = text[start:text.index("```", start)].replace("\\\n", " ")
    args = shlex.split(command)[3:]
    assert parse_config(Config, args) == dataclasses.replace(PAPER, lora_rank=0, lora_alpha=0.0)
