"""The trainer's configs, command line and guard rails: everything that is refused or decided
before anything compiles (no test here runs a train step)."""

from __future__ import annotations

import json
import textwrap

import pytest
from flax import nnx

import trainer_data as td
from alignax.data import default_tokenizer
from alignax.objectives import (DPO, IPO, MIPO, OBJECTIVES, BradleyTerry, CausalReward,
                                PessimisticDistill)
from alignax.schedules import Linear
from alignax.trainer import (DataConfig, LabelConfig, ModelConfig, RunConfig, TrainConfig,
                             config_from_dict, config_to_dict, load_config_file, train)
from alignax.trainer import cli
from alignax.trainer.config import RESUMABLE
from alignax.trainer.runs import check_run_dir, prepare_inputs, write_run_config
from alignax.models import create
from alignax.training import ConfigMismatchError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_config")
    td.write_checkpoint(root / "ckpt")
    td.write_jsonl(root / "hh.jsonl", td.hh_records(16))
    (root / "cfg.py").write_text(textwrap.dedent(f"""
        from alignax.objectives import DPO
        from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig

        config = RunConfig(run_dir={str(root / 'run')!r}, model=ModelConfig({str(root / 'ckpt')!r}),
                           data=DataConfig({str(root / 'hh.jsonl')!r}, max_length=64),
                           objective=DPO(beta=0.1), train=TrainConfig(steps=10, mesh=(1, 1, 1)))
        other = RunConfig(run_dir="elsewhere")
        not_a_config = 3
    """))
    return root


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(steps=0), "TrainConfig.steps must be an int >= 1, got 0"),
    (lambda: TrainConfig(mesh=(2, 2)), "TrainConfig.mesh must be 3 ints"),
    (lambda: TrainConfig(mesh=(-1, -1, 1)), "TrainConfig.mesh must be 3 ints"),
    (lambda: TrainConfig(batch_size=6, grad_accum_steps=4), "not a multiple of grad_accum_steps"),
    (lambda: TrainConfig(learning_rate=-1.0), "TrainConfig: OptimizerConfig.learning_rate"),
    (lambda: TrainConfig(warmup_steps=20, steps=10), "the warmup cannot be longer"),
    (lambda: TrainConfig(early_stopping_metric="loss"), "needs evaluations: set eval_every"),
    (lambda: TrainConfig(lr_schedule="step"), "TrainConfig.lr_schedule: unknown value 'step'"),
    (lambda: DataConfig(format="tsv"), "DataConfig.format: unknown value 'tsv'"),
    (lambda: DataConfig(eval_fraction=1.0), "DataConfig.eval_fraction must be in [0, 1)"),
    (lambda: DataConfig(eval_split="test", eval_fraction=0.1), "either as eval_path"),
    (lambda: DataConfig(max_length=64, max_prompt_length=64), "room for the response"),
    (lambda: RunConfig(run_dir="r", train=TrainConfig(eval_every=5)), "needs a held-out split"),
    (lambda: RunConfig(run_dir="r", model=ModelConfig(num_heads=2)), "are for reward models"),
    (lambda: RunConfig(run_dir="r", objective=BradleyTerry(),
                       train=TrainConfig(share_prompt=True)), "trains a reward model"),
    (lambda: TrainConfig(wandb="my-project"), "needs Weights & Biases, which is not installed"),
])
def test_configs_refuse_bad_values_when_built(build, message):
    with pytest.raises(ValueError, match=None) as error:
        build()
    assert message in str(error.value)


def test_missing_local_paths_are_refused_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="ModelConfig.path: no such local model directory: "
                                         "'ckpt/llama_tinny'"):
        ModelConfig("ckpt/llama_tinny")
    with pytest.raises(ValueError, match="DataConfig.path: no such local file or directory: "
                                         "'data/trian.jsonl'"):
        DataConfig("data/trian.jsonl")
    with pytest.raises(ValueError, match="LabelConfig.reward_models: no such local reward"):
        LabelConfig(data="x.jsonl" if False else "EleutherAI/hh", output="o.jsonl",
                    reward_models=("./rm",))
    assert ModelConfig("EleutherAI/pythia-160m").path == "EleutherAI/pythia-160m"  # a hub id


def test_config_json_round_trip_keeps_schedules():
    config = RunConfig(run_dir="r", objective=DPO(beta=Linear(0.5, 0.1, transition_steps=10)),
                       data=DataConfig(max_length=128, length_bins=4),
                       train=TrainConfig(mesh=(2, 2, 2), steps=7))
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["objective"]["beta"] == {"schedule": "Linear", "init_value": 0.5,
                                         "end_value": 0.1, "transition_steps": 10,
                                         "transition_begin": 0}
    assert config_from_dict(data) == config


def test_resume_refuses_another_config_naming_the_fields(tmp_path):
    config = RunConfig(run_dir=str(tmp_path / "run"), objective=DPO(beta=0.1),
                       train=TrainConfig(steps=10))
    write_run_config(*check_run_dir(config, {"data": "a"}))
    # the number of steps (and the other RESUMABLE fields) may change
    longer = RunConfig(run_dir=config.run_dir, objective=DPO(beta=0.1),
                       train=TrainConfig(steps=20, save_every=5, progress=False))
    write_run_config(*check_run_dir(longer, {"data": "a"}))
    assert "train.steps" in RESUMABLE
    other = RunConfig(run_dir=config.run_dir, objective=DPO(beta=0.2),
                      train=TrainConfig(steps=20, batch_size=16))
    with pytest.raises(ConfigMismatchError) as error:
        check_run_dir(other, {"data": "b"})
    message = str(error.value)
    assert "objective.beta: 0.1 (run directory) != 0.2 (this run)" in message
    assert "train.batch_size: 8 (run directory) != 16 (this run)" in message
    assert "sources.data: 'a' (run directory) != 'b' (this run)" in message
    assert "train.steps" not in message


# ------------------------------------------------------------------ CONFIG files and flags

def test_config_file_convention(files):
    config = load_config_file(files / "cfg.py")
    assert isinstance(config, RunConfig) and config.objective == DPO(beta=0.1)
    assert load_config_file(f"{files / 'cfg.py'}:other").run_dir == "elsewhere"
    with pytest.raises(ValueError, match="defines no variable 'nope'; it defines RunConfig "
                                         r"values \['config', 'other'\]"):
        load_config_file(f"{files / 'cfg.py'}:nope")
    with pytest.raises(ValueError, match="is a int, not a RunConfig"):
        load_config_file(f"{files / 'cfg.py'}:not_a_config")
    with pytest.raises(ValueError, match="no such config file"):
        load_config_file(files / "missing.py")


def test_any_field_is_a_flag_and_objectives_are_choices(files):
    cfg = str(files / "cfg.py")
    _, config, _, _ = cli.parse(["train", cfg, "--train.steps", "7", "--train.batch_size", "16",
                                 "--train.progress", "False", "--data.eval_fraction", "0.25",
                                 "--objective.beta", "Linear(0.5, 0.1, transition_steps=20)"])
    assert config.train.steps == 7 and config.train.batch_size == 16
    assert config.train.progress is False and config.data.eval_fraction == 0.25
    assert config.objective == DPO(beta=Linear(0.5, 0.1, transition_steps=20))
    assert config.model == load_config_file(cfg).model  # untouched fields keep the file's
    _, config, _, _ = cli.parse(["train", cfg, "objective:ipo", "--objective.tau", "0.5",
                                 "--objective.length_normalized", "True"])
    assert config.objective == IPO(tau=0.5, length_normalized=True)
    _, config, _, _ = cli.parse(["train", cfg, "objective:causal_reward", "--objective.lam",
                                 "1.0", "--objective.num_bins", "4"])
    assert config.objective == CausalReward(lam=1.0, num_bins=4)
    # every registered objective is a choice under its name
    required = {"causal_reward": ["--objective.lam", "1", "--objective.num_bins", "2"],
                "causal_dpo": ["--objective.lam", "1", "--objective.num_bins", "2"],
                "pessimistic_distill": ["--objective.gamma", "0.01"],
                "pessimistic_dpo": ["--objective.gamma", "0.01"]}
    for name, cls in OBJECTIVES.items():
        _, config, _, _ = cli.parse(["train", cfg, f"objective:{name}", *required.get(name, [])])
        assert type(config.objective) is cls
    _, config, _, _ = cli.parse(["train", "--run_dir", "r", "objective:pessimistic_distill",
                                 "--objective.gamma", "Linear(0.0001, 0.01, transition_steps=100)"])
    assert config.objective == PessimisticDistill(gamma=Linear(1e-4, 1e-2, transition_steps=100))


def test_the_command_line_refuses_bad_configs_before_anything_loads(files, capsys, monkeypatch):
    """`cli.parse` is all that runs before `cli.run` loads a model or data. A field that fails
    validation is reported by tyro (exit status 2, the message on stderr); the mesh against
    the devices is checked after parsing (ValueError, one line from the console script)."""
    cfg = str(files / "cfg.py")
    monkeypatch.chdir(files)  # holds ckpt/, so "ckpt/llama_tinny" is a local path

    def refused(*flags: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            cli.parse(["train", cfg, *flags])
        assert exit_.value.code == 2
        return " ".join(capsys.readouterr().err.split())

    assert "TrainConfig.steps must be an int >= 1, got 0" in refused("--train.steps", "0")
    assert "TrainConfig.mesh must be 3 ints" in refused("--train.mesh", "-1", "-1", "1")
    assert "no such local model directory: 'ckpt/llama_tinny'" in refused(
        "--model.path", "ckpt/llama_tinny")
    assert "dpo: beta must be > 0, got 0.0" in refused("--objective.beta", "0")
    assert "--objective.not_a_field" in refused("--objective.not_a_field", "1")
    with pytest.raises(ValueError, match=r"needs 16 devices, this process sees 8"):
        cli.parse(["train", cfg, "--train.mesh", "4", "4", "1"])
    with pytest.raises(ValueError, match="does not split over the mesh's data x fsdp = 8"):
        cli.parse(["train", cfg, "--train.mesh", "-1", "1", "1", "--train.batch_size", "4"])
    with pytest.raises(SystemExit):
        cli.parse(["deploy", cfg])


# ------------------------------------------------------------------ guard rails, in order

def _config(files, objective=DPO(beta=0.1), **model):
    return RunConfig(run_dir=str(files / "guard"), model=ModelConfig(**model),
                     objective=objective, data=DataConfig(max_length=64),
                     train=TrainConfig(steps=2, batch_size=4, mesh=(1, 1, 1)))


def test_tokenizer_vocabulary_beyond_the_model_is_refused_first(tmp_path, files):
    small = td.write_checkpoint(tmp_path / "small", vocab_size=1000)
    # the tokenizer check comes before the objective vs model check (a reward objective on a
    # causal LM checkpoint would be refused next)
    config = _config(files, path=str(small), tokenizer="default")
    with pytest.raises(ValueError, match=r"the tokenizer emits token ids up to 1023 \(1024 "
                                         r"tokens, specials included\) but the model's vocabulary "
                                         r"has 1000 entries"):
        prepare_inputs(config, data=td.hh_records(8))


def test_missing_pad_token_and_chat_template(files):
    tokenizer = default_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        prepare_inputs(_config(files), tokenizer=tokenizer, data=td.hh_records(8))
    tokenizer.pad_token = "<|pad|>"  # ModelConfig(pad_token=...) does the same from a config
    tokenizer.chat_template = None
    conversation = [{"prompt": [{"role": "user", "content": "Hi"}],
                     "chosen": [{"role": "assistant", "content": "Hello!"}],
                     "rejected": [{"role": "assistant", "content": "Go away."}]}] * 8
    with pytest.raises(ValueError, match="conversational records need a chat template, but the "
                                         "tokenizer"):
        prepare_inputs(_config(files), tokenizer=tokenizer, data=conversation)


def test_objective_against_the_model_kind(files):
    policy = create(td.model_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bradley_terry trains a reward model on its scalar "
                                         "scores, but the model is a causal LM"):
        train(_config(files, objective=BradleyTerry()), model=policy, data=td.hh_records(8))
    assert not (files / "guard" / "config.json").exists()  # a refused start leaves no run
    rm = td.write_reward_model(files / "rm_guard", seed=0)
    with pytest.raises(ValueError, match="dpo trains a causal LM policy on its response "
                                         "log-probs, but the model is a reward model"):
        prepare_inputs(_config(files, path=str(rm)), data=td.hh_records(8))


def test_objective_against_the_data(files):
    with pytest.raises(ValueError, match="mipo needs grouped data: records with lists of "
                                         "chosen/rejected responses \\(format 'grouped'\\); this "
                                         "dataset is 'hh'"):
        prepare_inputs(_config(files, objective=MIPO(tau=0.1)), data=td.hh_records(8))
    with pytest.raises(ValueError, match="dpo needs preference pairs: .* this dataset is "
                                         "'unlabeled'"):
        prepare_inputs(_config(files), data=td.unlabeled_records(8))
    with pytest.raises(ValueError, match="distill takes one target reward per response"):
        prepare_inputs(_config(files, objective=OBJECTIVES["distill"]()),
                       data=td.unlabeled_records(8, members=3))


def test_bins_against_num_bins(files):
    config = RunConfig(run_dir=str(files / "bins"), objective=CausalReward(lam=1.0, num_bins=2),
                       data=DataConfig(max_length=64, length_bins=4),
                       train=TrainConfig(steps=2, batch_size=4, mesh=(1, 1, 1)))
    with pytest.raises(ValueError, match="causal_reward: the data has bin 3, but num_bins = 2"):
        prepare_inputs(config, data=td.pair_records(16))
    config = RunConfig(run_dir=str(files / "bins"), objective=CausalReward(lam=1.0, num_bins=2),
                       data=DataConfig(max_length=64),
                       train=TrainConfig(steps=2, batch_size=4, mesh=(1, 1, 1)))
    with pytest.raises(ValueError, match="causal_reward needs the bin of a spurious attribute"):
        prepare_inputs(config, data=td.hh_records(8))
