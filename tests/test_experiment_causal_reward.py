"""The causal-reward pipeline (thesis ch. 4): every phase of every study at SMOKE size, one
study with LoRA reward models, restarts that train nothing again, and the pipeline's own pieces
against hand values.

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
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from alignax.data import default_tokenizer, prepare_dataset
from alignax.models import create, tiny_config
from alignax.models.lora import LoRAConfig, default_targets, without_adapters
from alignax.objectives import BradleyTerry, CausalReward
from alignax.schedules import Linear
from alignax.trainer.cli import parse_config
from alignax.training.mesh import make_mesh
from alignax.training.state import has_adapters
from experiments.causal_reward import PAPER, SMOKE, Config, pipeline
from experiments.causal_reward.evaluation import left_pad, pairwise_accuracy
from experiments.causal_reward.phases import (Phases, RunSettings, batch_tokens,
                                              reward_model_from_policy)
from experiments.causal_reward.studies import STUDIES, length_group


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """SMOKE run of all four studies on the test session's 8 simulated devices (the default
    mesh: data-parallel over all of them)."""
    config = dataclasses.replace(SMOKE, run_dir=str(tmp_path_factory.mktemp("causal") / "run"))
    assert jax.device_count() == 8 and config.mesh == (-1, 1, 1)
    summary = pipeline.run(config)
    return config, summary


@pytest.fixture(scope="module")
def smoke_lora(tmp_path_factory, smoke):
    """The sycophancy study of SMOKE with LoRA reward models (rank 2), after `smoke`: at the
    same token budgets, every phase but the reward models reuses its compiled steps."""
    config = dataclasses.replace(SMOKE, run_dir=str(tmp_path_factory.mktemp("lora") / "run"),
                                 studies=("sycophancy",), lora_rank=2, lora_alpha=4.0)
    return config, pipeline.run(config)


def _phase_dirs(run_dir):
    return sorted(p.parent for p in run_dir.rglob("metrics.jsonl"))


def _trained_arrays(phase) -> dict[str, list]:
    """{name: [shape, dtype]} of the trained parameters in a phase's newest checkpoint (a
    supervised phase's "params.*", PPO's "train.params.*")."""
    manager = ocp.CheckpointManager(phase / "checkpoints")
    try:
        meta = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()
    return {k: v for k, v in meta["arrays"].items() if k.startswith(("params.", "train.params."))}


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
    for bad in (dict(lora_rank=-1), dict(lora_rank=1.5), dict(lora_alpha=8.0),
                dict(lora_alpha=-1.0, lora_rank=2), dict(token_budgets=(64, 32, 8)),
                dict(token_budgets=(8, 16)), dict(eval_batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
    assert Config(lora_rank=8).adapter_alpha == 16 and PAPER.adapter_alpha == 128
    assert "LoRA rank 64, alpha 128" in pipeline._settings(PAPER)
    assert "full fine-tuning." in pipeline._settings(SMOKE) and "LoRA" not in \
        pipeline._settings(SMOKE)
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


def test_one_log_prob_chunk_covers_a_batch():
    """The train step's chunk_size covers every scored position of a batch (more would loop
    over chunks of the data-sharded axis: the XLA:CPU collective deadlock `batch_tokens`
    avoids)."""
    records = [dict(prompt="What is 2 + 2?", chosen=" It is four.",
                    rejected=" It is five, I think.")] * 6
    dataset = prepare_dataset(records, default_tokenizer(), max_length=40, buckets=(40,))
    batch = next(dataset.batches(batch_size=4, seed=0))
    scored = sum(batch[f"{role}_input_ids"].size for role in ("chosen", "rejected"))
    assert scored == 4 * 2 * 40 == batch_tokens(dataset, 4)


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
    assert parse_config(Config, args) == PAPER


def test_smoke_token_budgets_are_the_largest_the_studies_need():
    """SMOKE's one set of budgets is the elementwise max of the budgets measured on each
    study's data (the measured path the embedded default runs)."""
    measured = dataclasses.replace(SMOKE, token_budgets=())
    budgets = [pipeline._budgets(measured, name, STUDIES[name].build(measured),
                                 default_tokenizer()) for name in SMOKE.studies]
    keys = ("max_prompt_length", "max_length", "max_new_tokens")
    assert all(b["prompt_width"] == b["max_prompt_length"] for b in budgets)
    assert SMOKE.token_budgets == tuple(max(b[k] for b in budgets) for k in keys)
    assert len({tuple(b[k] for k in keys) for b in budgets}) == len(budgets)  # all differ


def test_token_budgets_below_the_data_are_refused():
    config = dataclasses.replace(SMOKE, token_budgets=(20, 80, 40))
    data = STUDIES["sycophancy"].build(config)
    with pytest.raises(ValueError, match="sycophancy study needs at least"):
        pipeline._budgets(config, "sycophancy", data, default_tokenizer())
    fits = pipeline._budgets(dataclasses.replace(config, token_budgets=SMOKE.token_budgets),
                             "sycophancy", data, default_tokenizer())
    assert fits == dict(zip(("max_prompt_length", "max_length", "max_new_tokens"),
                            SMOKE.token_budgets), prompt_width=SMOKE.token_budgets[0])


def test_lora_reward_model_trains_only_its_adapters_and_resumes(tmp_path):
    """`Phases.supervised(lora=...)`: the adapters move, every base weight (backbone and score
    head) stays bit-equal, and a second run restores the adapters from the checkpoint instead
    of training."""
    tok = default_tokenizer()
    policy = create(tiny_config("llama", vocab_size=len(tok), hidden_size=32,
                                num_hidden_layers=1, intermediate_size=64),
                    rngs=nnx.Rngs(0), mesh=make_mesh((-1, 1, 1)))
    initial = reward_model_from_policy(policy, seed=1)
    records = [dict(prompt=f"What is {i} + {i}?", chosen=f" It is {2 * i}.",
                    rejected=f" It is {2 * i + 1}, I think.") for i in range(16)]
    dataset = prepare_dataset(records, tok, max_length=24, buckets=(24,))
    lora = LoRAConfig(rank=2, alpha=4.0, targets=default_targets(initial))
    settings = RunSettings(save_every=1, progress=False, plots=False)

    def train():
        return Phases(settings).supervised(
            tmp_path / "rm", model=initial, objective=BradleyTerry(), dataset=dataset, steps=2,
            batch_size=8, learning_rate=1e-2, seed=0, fingerprint={"lora": 2}, lora=lora)

    trained = train()
    assert has_adapters(trained) and not has_adapters(initial)
    base = dict(nnx.to_flat_state(nnx.state(initial, nnx.Param)))
    kept = dict(nnx.to_flat_state(nnx.state(without_adapters(trained), nnx.Param)))
    assert kept.keys() == base.keys()
    for path, value in base.items():
        np.testing.assert_array_equal(np.asarray(kept[path][...]), np.asarray(value[...]))
    adapters = dict(nnx.to_flat_state(nnx.state(trained, nnx.LoRAParam)))
    assert len(adapters) == 2 * len(lora.targets)  # A and B of each target (one layer)
    moved = [p for p, v in adapters.items() if p[-1] == "lora_b" and np.abs(v[...]).max() > 0]
    assert len(moved) == len(lora.targets)  # B starts at 0; every adapter got a gradient
    saved = set(_trained_arrays(tmp_path / "rm"))
    assert saved and all(".lora_a" in k or ".lora_b" in k for k in saved), saved
    log = (tmp_path / "rm" / "metrics.jsonl").read_text()
    again = train()
    assert (tmp_path / "rm" / "metrics.jsonl").read_text() == log  # restored, not retrained
    for path, value in nnx.to_flat_state(nnx.state(again, nnx.LoRAParam)):
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(adapters[path][...]))
    with pytest.raises(ValueError, match="reference"):
        Phases(settings).supervised(tmp_path / "dpo", model=policy, objective=BradleyTerry(),
                                    dataset=dataset, steps=1, batch_size=8, learning_rate=1e-2,
                                    seed=0, fingerprint={}, reference=policy, lora=lora)


def test_lora_smoke_trains_only_reward_model_adapters_and_restores_them(smoke, smoke_lora):
    config, summary = smoke_lora
    assert "reward models: LoRA rank 2, alpha 4 on every projection" in summary
    study = pipeline.pathlib.Path(config.run_dir) / "sycophancy"
    full = pipeline.pathlib.Path(smoke[0].run_dir) / "sycophancy"
    for key in pipeline.reward_model_keys(config):
        adapters = _trained_arrays(study / "rm" / key)
        assert adapters and all(".lora_a" in k or ".lora_b" in k for k in adapters), key
        trained = _trained_arrays(full / "rm" / key)
        assert trained and not any("lora" in k for k in trained)
    # SFT, PPO and DPO fine-tune every parameter, as in the thesis
    for phase in (study / "sft", study / "ppo" / "vanilla" / "seed0", study / "dpo" / "seed0"):
        trained = _trained_arrays(phase)
        assert trained and not any("lora" in k for k in trained), phase
    # restarted: the reward model's metrics recomputed from the restored adapters are equal
    logs = {p: (p / "metrics.jsonl").read_text() for p in _phase_dirs(study)}
    metrics = (study / "rm" / "vanilla" / "metrics.json").read_text()
    (study / "rm" / "vanilla" / "metrics.json").unlink()
    assert pipeline.run(config) == summary
    assert (study / "rm" / "vanilla" / "metrics.json").read_text() == metrics
    assert {p: (p / "metrics.jsonl").read_text() for p in _phase_dirs(study)} == logs
