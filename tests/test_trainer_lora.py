"""The trainer with LoRA: `alignax train --model.lora_rank ...` on a tiny HF checkpoint trains
the adapters only (the reference is the base model), resumes from a checkpoint of adapters and
optimizer state, exports merged HF weights that transformers loads and a PEFT adapter that
`peft` loads onto the base checkpoint; `alignax eval` scores it; reward models train with
LoRA; a model passed in to LoRA runs stays the base model (the adapters go on a copy), so
it starts several runs; the lora fields' guard rails."""

from __future__ import annotations

import json
import textwrap

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import trainer_data as td
from alignax.models import create
from alignax.models.lora import without_adapters
from alignax.objectives import DPO, MDPO, BradleyTerry
from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig, cli, train
from alignax.training.checkpoint import ADAPTER_DIR
from alignax.training.state import has_adapters

LORA = ["--model.lora_rank", "4", "--model.lora_alpha", "8", "--model.lora_targets", "q", "v",
        "down"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_lora")
    td.write_checkpoint(root / "ckpt")
    td.write_jsonl(root / "hh.jsonl", td.hh_records(24))
    (root / "dpo.py").write_text(textwrap.dedent(f"""
        from alignax.objectives import DPO
        from alignax.trainer import (DataConfig, EvalConfig, ModelConfig, RunConfig,
                                     TrainConfig)

        config = RunConfig(
            run_dir="runs/dpo",
            model=ModelConfig({str(root / 'ckpt')!r}),
            data=DataConfig({str(root / 'hh.jsonl')!r}, max_length=48, eval_fraction=0.25),
            objective=DPO(beta=0.1),
            train=TrainConfig(steps=3, batch_size=4, learning_rate=1e-2, mesh=(1, 1, 1),
                              eval_every=2, save_every=2, progress=False, tensorboard=False),
            eval=EvalConfig(num_prompts=2, num_samples=2, max_new_tokens=4, batch_size=4),
        )
    """))
    return root


def test_lora_dpo_run_resumes_and_exports_merged_weights_and_a_peft_adapter(files, tmp_path):
    run = str(tmp_path / "run")
    first = cli.main(["train", str(files / "dpo.py"), "--run_dir", run, "--train.steps", "2",
                      *LORA])
    assert int(first.state.step) == 2 and has_adapters(first.params)
    assert {path[-1] for path, _ in nnx.to_flat_state(first.params)} == {"lora_a", "lora_b"}
    resumed = cli.main(["train", str(files / "dpo.py"), "--run_dir", run, *LORA])
    assert int(resumed.state.step) == 3
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # resumed from the step-2 checkpoint of adapters + optimizer
    evals = [json.loads(line) for line in
             (tmp_path / "run" / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 3] and all(np.isfinite(e["loss"]) for e in evals)
    export = resumed.export_dir
    ids = transformers.AutoTokenizer.from_pretrained(export)(
        td.hh_records(1)[0]["chosen"], return_tensors="np")["input_ids"]
    ours = np.asarray(resumed.model(ids))
    base = np.asarray(resumed.model(ids, adapters=False))
    assert np.abs(ours - base).max() > 1e-4  # the adapters trained
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        np.testing.assert_allclose(merged(torch.as_tensor(ids)).logits.numpy(), ours,
                                   atol=2e-5, rtol=0)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(files / "ckpt").eval()
        np.testing.assert_allclose(hf_base(torch.as_tensor(ids)).logits.numpy(), base,
                                   atol=2e-5, rtol=0)  # the reference: the base checkpoint
        adapted = peft.PeftModel.from_pretrained(hf_base, export / ADAPTER_DIR)
        np.testing.assert_allclose(adapted(torch.as_tensor(ids)).logits.numpy(), ours,
                                   atol=2e-5, rtol=0)
    report = cli.main(["eval", str(files / "dpo.py"), "--run_dir", run, *LORA])
    assert report["step"] == 3 and report["preference"]["loss"] == pytest.approx(
        evals[-1]["loss"], rel=1e-6)
    generation = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert np.isfinite(generation["generation"]["log_ratio"])  # log-ratio to the base model


def test_reward_ensemble_trains_with_lora_and_exports_merged_members(tmp_path):
    config = RunConfig(
        run_dir=str(tmp_path / "rm"), model=ModelConfig(ensemble=2, lora_rank=8),
        data=DataConfig(max_length=32), objective=BradleyTerry(),
        train=TrainConfig(steps=2, batch_size=4, learning_rate=1e-2, mesh=(1, 1, 1),
                          progress=False, tensorboard=False))
    result = train(config, data=td.pair_records(8))
    paths = [path for path, _ in nnx.to_flat_state(result.params)]
    assert {p[-2] for p in paths} == {"lora"} and ("members", "score", "lora", "lora_b") in paths
    assert result.metrics["update_applied"] == 1.0
    assert (result.export_dir / "member_1" / "model.safetensors").exists()


def test_a_passed_in_model_stays_the_base_model_and_starts_a_second_lora_run(tmp_path):
    start = create(td.model_config(), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(start))  # copies of every array and its path
    runs = [("dpo", DPO(beta=0.1), td.pair_records(8)),
            ("mdpo", MDPO(beta=0.1), td.grouped_records(8))]
    for name, objective, records in runs:
        config = RunConfig(
            run_dir=str(tmp_path / name), model=ModelConfig(lora_rank=2, lora_alpha=4.0),
            data=DataConfig(max_length=32), objective=objective,
            train=TrainConfig(steps=2, batch_size=4, learning_rate=1e-2, mesh=(1, 1, 1),
                              progress=False, tensorboard=False, export=False))
        result = train(config, model=start, data=records)  # the second run: the same start
        assert int(result.state.step) == 2 and np.isfinite(result.metrics["loss"])
        # the passed-in model: no adapters, every array as before (structure and values)
        assert not has_adapters(start)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(start), before)
        # the run trained its adapters only: its base weights are the start's
        assert has_adapters(result.model)
        jax.tree.map(np.testing.assert_array_equal,
                     nnx.state(without_adapters(result.model)), before)
        lora_b = [v for path, v in nnx.to_flat_state(result.params) if path[-1] == "lora_b"]
        assert max(float(np.abs(b[...]).max()) for b in lora_b) > 0  # B starts at 0


def test_lora_guard_rails():
    for bad, match in [(dict(lora_alpha=8.0), "lora_alpha is set but lora_rank is None"),
                       (dict(lora_targets=("q",)), "lora_targets is set"),
                       (dict(lora_rank=0), "lora_rank must be an int >= 1"),
                       (dict(lora_rank=4, lora_alpha=-1.0), "alpha must be positive"),
                       (dict(lora_rank=4, lora_dropout=1.0), "dropout must be in"),
                       (dict(lora_rank=4, lora_targets=("qkv",)), "targets must be distinct"),
                       (dict(lora_rank=4, reference="ckpt"), "reference is its base model")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**bad)
    assert ModelConfig(lora_rank=64).lora_config(targets=("q",)).alpha == 128.0  # the seeds'
    with pytest.raises(ValueError, match="'score' is a reward model's head"):
        RunConfig(run_dir="unused", model=ModelConfig(lora_rank=4, lora_targets=("q", "score")),
                  objective=DPO(beta=0.1))


def test_plan_counts_adapters_and_no_reference_copy(files):
    full = cli.main(["plan", str(files / "dpo.py")])["per_device_bytes"]
    lora = cli.main(["plan", str(files / "dpo.py"), *LORA])["per_device_bytes"]
    assert lora["reference"] == 0 < full["reference"] == full["params"]
    assert lora["params"] < full["params"] / 4  # the adapters only
    assert 2 * lora["params"] <= lora["optimizer_state"] <= 2 * lora["params"] + 64
