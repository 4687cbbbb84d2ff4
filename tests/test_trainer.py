"""The trainer end to end on local files and a tiny HF checkpoint written by `save_pretrained`:
`alignax train` (the console script in a subprocess, and `main(argv)`), a resumed run equal to
an uninterrupted one, the export that transformers loads with its tokenizer, `alignax eval`,
`alignax label` then d-DPO / e-DPO on the labelled files, `alignax plan` on a (2, 2, 2) mesh
and on 16 simulated devices, early stopping, and every objective family through `train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import trainer_data as td
from alignax.data import default_tokenizer, prepare_dataset
from alignax.models import create, from_pretrained, load_reward_model
from alignax.objectives import (FDPO, IPO, MDPO, MIPO, SFT, BradleyTerry, CausalDPO,
                                CausalReward, Distill, PessimisticDistill, PessimisticDPO)
from alignax.schedules import pessimism_schedule
from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig, cli, train
from alignax.training.loop import read_metrics
from alignax.training.state import split_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ckpt/ (tiny Llama + tokenizer), hh.jsonl (64 records), two reward models and a 3-head
    one, unlabeled.jsonl, and the CONFIG files."""
    root = tmp_path_factory.mktemp("trainer")
    td.write_checkpoint(root / "ckpt")
    td.write_jsonl(root / "hh.jsonl", td.hh_records(64))
    for i in (1, 2):
        td.write_reward_model(root / f"rm_{i}", seed=i)
    td.write_reward_model(root / "rm_heads", seed=3, num_heads=3)
    unlabeled = [{k: v for k, v in r.items() if not k.startswith("target")}
                 for r in td.unlabeled_records(16)]
    td.write_jsonl(root / "unlabeled.jsonl", unlabeled)
    (root / "dpo.py").write_text(textwrap.dedent(f"""
        from alignax.objectives import DPO
        from alignax.trainer import (DataConfig, EvalConfig, ModelConfig, RunConfig,
                                     TrainConfig)

        config = RunConfig(
            run_dir="runs/dpo",
            model=ModelConfig({str(root / 'ckpt')!r}),
            data=DataConfig({str(root / 'hh.jsonl')!r}, max_length=64, eval_fraction=0.125),
            objective=DPO(beta=0.1),
            train=TrainConfig(steps=4, batch_size=8, learning_rate=1e-3, mesh=(1, 1, 1),
                              eval_every=2, save_every=2, progress=False),
            eval=EvalConfig(num_prompts=4, num_samples=2, max_new_tokens=8, batch_size=8,
                            reward_model={str(root / 'rm_1')!r}),
        )
    """))
    (root / "label.py").write_text(textwrap.dedent(f"""
        from alignax.trainer import LabelConfig

        config = LabelConfig(data={str(root / 'unlabeled.jsonl')!r},
                             output={str(root / 'labelled.jsonl')!r},
                             reward_models=({str(root / 'rm_1')!r},), max_length=64,
                             batch_size=8)
    """))
    return root


def _params(directory) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(split_model(from_pretrained(directory))[1])]


def test_train_resume_export_and_eval(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = ROOT
    # A: the console script, uninterrupted, with the compilation cache next to its run dir
    uninterrupted = subprocess.run(
        [sys.executable, "-m", "alignax.trainer.cli", "train", str(files / "dpo.py"),
         "--run_dir", str(tmp_path / "a" / "run")], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    summary = json.loads(uninterrupted.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and not summary["stopped_early"]
    assert list((tmp_path / "a" / ".jax_cache").iterdir())  # a rerun reads its programs here
    # B: main(argv), stopped after 2 steps and resumed to 4
    run_b = str(tmp_path / "b")
    first = cli.main(["train", str(files / "dpo.py"), "--run_dir", run_b, "--train.steps", "2"])
    assert int(first.state.step) == 2
    resumed = cli.main(["train", str(files / "dpo.py"), "--run_dir", run_b])
    assert int(resumed.state.step) == 4
    a_records = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    b_lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in b_lines] == [1, 2, 3, 4]  # each step once
    assert [r["loss"] for r in a_records] == [json.loads(line)["loss"] for line in b_lines]
    a_evals = read_metrics(tmp_path / "a" / "run" / "eval" / "metrics.jsonl")
    assert [r["step"] for r in a_evals] == [2, 4]
    assert a_evals == read_metrics(tmp_path / "b" / "eval" / "metrics.jsonl")
    assert {"loss", "accuracy", "margin", "ece", "ece_top_label"} <= set(a_evals[-1])
    assert 0.0 <= a_evals[-1]["ece"] <= 1.0 and a_evals[-1]["examples"] == 8
    assert list((tmp_path / "b" / "tensorboard").glob("events.*"))
    # the resumed run ends with the uninterrupted run's parameters, bit for bit
    for x, y in zip(_params(tmp_path / "a" / "run" / "export"), _params(resumed.export_dir)):
        np.testing.assert_array_equal(x, y)

    # the export, with its tokenizer, loads in transformers and gives our model's logits
    export = resumed.export_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    text = td.hh_records(1)[0]["chosen"]
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(resumed.model(ids))
    # the logit-parity bound of the models (README: at most 1.9e-5 on every family)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)

    # alignax eval: the newest checkpoint, preference and generation metrics, JSON + Markdown
    evaluation = cli.main(["eval", str(files / "dpo.py"), "--run_dir", run_b])
    report = json.loads((tmp_path / "b" / "report" / "report.json").read_text())
    assert report["step"] == 4 == evaluation["step"]
    # the same held-out metrics as the evaluation at the end of training
    assert report["preference"] == pytest.approx(
        {k: v for k, v in a_evals[-1].items() if k != "step"}, rel=1e-6)
    generation = report["generation"]
    for name in ("entropy/token", "distinct_1", "self_bleu", "log_ratio", "score/reward_model",
                 "length"):
        assert np.isfinite(generation[name]) and generation[f"{name}/low"] <= generation[name]
    assert "| policy |" in (tmp_path / "b" / "report" / "report.md").read_text()


def test_console_script_reports_a_bad_config_in_one_line(files, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alignax.trainer.cli", "train", str(files / "dpo.py"),
         "--train.mesh", "4", "4", "1"], env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "alignax: error: TrainConfig.mesh=(4, 4, 1) needs 16 devices, this process sees 8"]
    assert not (tmp_path / "runs").exists()  # nothing was built


def test_early_stopping_stops_and_stays_stopped(files, tmp_path):
    flags = ["train", str(files / "dpo.py"), "--run_dir", str(tmp_path / "run"),
             "--train.steps", "8", "--train.eval_every", "1",
             "--train.early_stopping_metric", "loss", "--train.early_stopping_mode", "max",
             "--train.early_stopping_patience", "1"]
    # the held-out loss falls from the first evaluation on, so "max" never improves again
    result = cli.main(flags)
    assert result.stopped_early and int(result.state.step) == 2
    assert [r["step"] for r in result.eval_history] == [1, 2]
    assert result.eval_history[1]["loss"] < result.eval_history[0]["loss"]
    again = cli.main(flags)
    assert again.stopped_early and int(again.state.step) == 2
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def _score(model, batch, role):
    return np.asarray(model(batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]))


def test_label_then_distill(files, tmp_path):
    # one reward model: a float per response, its scores of the tokenized pair
    path = cli.main(["label", str(files / "label.py")])
    labelled = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(labelled) == 16 and isinstance(labelled[0]["target_rewards_1"], float)
    tokenizer = default_tokenizer()
    dataset = prepare_dataset(labelled, tokenizer, max_length=64)
    batch = dataset.collate(dataset.examples)
    rm = load_reward_model(files / "rm_1")
    for role, column in (("response_1", "target_rewards_1"), ("response_2", "target_rewards_2")):
        np.testing.assert_allclose(batch[column], _score(rm, batch, role), rtol=1e-5, atol=1e-6)
    # two checkpoints stacked into an ensemble, and one 3-head model: lists of E rewards
    ensemble = cli.main(["label", str(files / "label.py"), "--output", str(tmp_path / "e.jsonl"),
                         "--reward_models", str(files / "rm_1"), str(files / "rm_2")])
    rows = [json.loads(line) for line in ensemble.read_text().splitlines()]
    assert [len(r["target_rewards_1"]) for r in rows] == [2] * 16
    np.testing.assert_allclose([r["target_rewards_1"][0] for r in rows],
                               [r["target_rewards_1"] for r in labelled], rtol=1e-5, atol=1e-6)
    heads = cli.main(["label", str(files / "label.py"), "--output", str(tmp_path / "h.jsonl"),
                      "--reward_models", str(files / "rm_heads")])
    assert len(json.loads(heads.read_text().splitlines()[0])["target_rewards_2"]) == 3
    # d-DPO on the single labels, e-DPO on the ensemble's
    for objective, data in ((["objective:distill"], path),
                            (["objective:pessimistic_distill", "--objective.gamma", "0.01"],
                             ensemble)):
        result = cli.main(["train", str(files / "dpo.py"), "--run_dir",
                           str(tmp_path / objective[0]), *objective, "--data.path", str(data),
                           "--data.eval_fraction", "0", "--train.eval_every", "0",
                           "--train.steps", "2", "--train.batch_size", "4"])
        assert int(result.state.step) == 2 and np.isfinite(result.metrics["loss"])


def test_plan_on_a_mesh_and_on_simulated_devices(files):
    result = cli.main(["plan", str(files / "dpo.py"), "--train.mesh", "2", "2", "2"])
    memory = result["per_device_bytes"]
    # the same model created on the same mesh: its shards on one device
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = create(td.model_config(), rngs=nnx.Rngs(0), mesh=mesh)
    params = split_model(model)[1]
    device = jax.devices()[0]
    expected = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards
                   if s.device == device)
    assert memory["params"] == expected < 4 * result["parameters"]
    assert memory["reference"] == memory["params"]
    assert 2 * memory["params"] <= memory["optimizer_state"] <= 2 * memory["params"] + 64
    assert memory["arguments"] >= memory["params"] + memory["optimizer_state"]
    assert memory["temporary"] > 0 and memory["peak_estimate"] > memory["arguments"]
    assert result["share_prompt"] and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # a mesh larger than this process's 8 devices: planned in a subprocess on 16 simulated ones
    larger = cli.main(["plan", str(files / "dpo.py"), "--train.mesh", "4", "2", "2",
                       "--train.batch_size", "16", "--devices", "16"])
    assert larger["devices"] == 16 and larger["mesh"] == {"data": 4, "fsdp": 2, "tensor": 2}
    assert larger["per_device_bytes"]["params"] == memory["params"]  # same fsdp x tensor


FAMILIES = {
    "sft": (SFT(), "hh", {}),
    "fdpo_jsd": (FDPO(beta=0.1, divergence="jsd"), "hh", {}),
    "ipo_unpacked": (IPO(tau=0.5), "pairs", {"share_prompt": False}),
    "mdpo": (MDPO(beta=0.1), "grouped", {}),
    "mipo": (MIPO(tau=0.5), "grouped", {}),
    "bradley_terry_ensemble": (BradleyTerry(), "pairs", {"ensemble": 2}),
    "causal_reward_heads": (CausalReward(lam=1.0, num_bins=4), "pairs",
                            {"num_heads": 2, "length_bins": 4}),
    "causal_dpo": (CausalDPO(lam=1.0, num_bins=2), "pairs", {"bin_column": "bin"}),
    "distill": (Distill(beta=0.1), "unlabeled", {}),
    "e_dpo": (PessimisticDistill(gamma=pessimism_schedule(10)), "unlabeled_3", {}),
    "pessimistic_dpo": (PessimisticDPO(gamma=0.01), "hh", {}),
}
RECORDS = {"hh": lambda: td.hh_records(8), "pairs": lambda: td.pair_records(8),
           "grouped": lambda: td.grouped_records(8), "unlabeled": lambda: td.unlabeled_records(8),
           "unlabeled_3": lambda: td.unlabeled_records(8, members=3)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_objective_family_trains(name, tmp_path):
    objective, records, options = FAMILIES[name]
    model = {k: options[k] for k in ("ensemble", "num_heads") if k in options}
    data = {k: options[k] for k in ("length_bins", "bin_column") if k in options}
    config = RunConfig(
        run_dir=str(tmp_path / name), model=ModelConfig(**model),
        data=DataConfig(max_length=32, **data), objective=objective,
        train=TrainConfig(steps=2, batch_size=4, learning_rate=1e-3, mesh=(1, 1, 1),
                          progress=False, tensorboard=False,
                          share_prompt=options.get("share_prompt")))
    tiny = create(td.model_config(), rngs=nnx.Rngs(0)) if not model and \
        objective.needs.model == "causal_lm" else None
    result = train(config, model=tiny, data=RECORDS[records]())
    assert int(result.state.step) == 2 and np.isfinite(result.metrics["loss"])
    assert result.metrics["update_applied"] == 1.0
    assert any(result.export_dir.rglob("tokenizer.json"))
    assert any(result.export_dir.rglob("model.safetensors"))


def _readme_block_after(marker: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("```python\n", text.index(marker)) + len("```python\n")
    return text[start:text.index("```", start)]


def test_readme_quickstart_runs_and_its_line_count_holds(files, tmp_path, monkeypatch):
    quickstart = _readme_block_after("## Quickstart")
    trl = _readme_block_after("The same run with TRL's `DPOTrainer`")
    text = open(os.path.join(ROOT, "README.md")).read()
    counts = f"That is {len(quickstart.splitlines())} lines against {len(trl.splitlines())}."
    assert counts in " ".join(text.split()) and len(quickstart.splitlines()) <= 15
    # the config as written, on a local HH file and the tiny checkpoint instead of the hub id
    monkeypatch.chdir(tmp_path)
    td.write_jsonl(tmp_path / "hh.jsonl", td.hh_records(16))
    (tmp_path / "dpo_hh.py").write_text(quickstart)
    result = cli.main(["train", "dpo_hh.py", "--model.path", str(files / "ckpt"),
                       "--train.steps", "2", "--train.progress", "False",
                       "--data.max_length", "64"])
    assert int(result.state.step) == 2 and (tmp_path / "runs" / "dpo_hh" / "export").is_dir()
