"""The study's config, its run end to end, and the written results (see the package docstring)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import resource
import sys
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from alignax.data import default_tokenizer
from alignax.trainer.runs import enable_compilation_cache
from alignax.training import ConfigMismatchError, make_mesh
from experiments.distill_length_bias import phases, report
from experiments.distill_length_bias.data import ENSEMBLE_BIASES, PAPER_RHOS
from experiments.distill_length_bias.policies import METHODS, Evaluator, hyper_name
from experiments.distill_length_bias.world import make_world

log = logging.getLogger("experiments.distill_length_bias")


@dataclasses.dataclass(frozen=True)
class Config:
    """Reward-model distillation under length bias (004 §4): DPO, IPO, d-, p-, pd-, e-DPO on
    D_rho, scored by the oracle against pi_SFT (Figure 2, Figure C.1, Figure D.1)."""

    run_dir: str = "runs/distill_length_bias"
    seeds: tuple[int, ...] = (0, 1, 2)
    rhos: tuple[float, ...] = (0.2, 0.5, 0.8)  # the paper: PAPER_RHOS (0.2, 0.3, ..., 0.8)
    methods: tuple[str, ...] = METHODS
    betas: tuple[float, ...] = (0.3, 1.0)  # the paper: .01, .1, 1, 3, 10, 30, 100
    taus: tuple[float, ...] = (0.1, 1.0)  # the paper: 0.01, 0.1, 1, 3, 5, 10, 25
    ensemble_biases: tuple[float, ...] = ENSEMBLE_BIASES
    # the world (world.py): prompts, tips, oracle, generator
    world_seed: int = 0
    length_weight: float = 0.4
    relevance_scale: float = 0.5
    max_sentences: int = 3
    useful_probability: float = 0.5
    max_prompt_tokens: int = 16
    val_prompts: int = 6
    test_prompts: int = 12
    max_length: int = 38  # prompt + response tokens (3 tips + EOS fit)
    # D_rho (data.py)
    num_pairs: int = 256
    pool_factor: int = 8
    probe_pairs: int = 512
    # models (the embedded Llama, `alignax.models.tiny_config` with these sizes) and training
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    mesh: tuple[int, int, int] = (-1, 1, 1)
    sft_examples: int = 2048
    sft_steps: int = 200
    sft_batch_size: int = 32
    sft_learning_rate: float = 3e-3
    reward_steps: int = 60
    reward_batch_size: int = 8  # pairs per member per step
    reward_learning_rate: float = 1e-3
    reward_save_every: int = 20
    score_batch_size: int = 64
    policy_steps: int = 64
    policy_batch_size: int = 16
    policy_learning_rate: float = 1e-3
    # evaluation
    eval_points: int = 2  # evenly spaced over policy_steps; validation picks the step too
    eval_samples: int = 8
    sft_eval_samples: int = 32
    max_new_tokens: int = 24
    eval_batch_size: int = 48
    bootstrap_resamples: int = 2000
    progress: bool = False
    compilation_cache: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"Config.methods: unknown {unknown}; use some of {METHODS}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Config.seeds must be distinct and non-empty, got {self.seeds}")
        if not self.rhos or not all(0.0 <= r <= 1.0 for r in self.rhos):
            raise ValueError(f"Config.rhos must be in [0, 1], got {self.rhos}")
        if "e-dpo" in self.methods and not self.ensemble_biases:
            raise ValueError("Config.ensemble_biases is empty, but e-dpo needs an ensemble")
        for name in ("betas", "taus"):
            values = getattr(self, name)
            if not values or not all(v > 0 for v in values):
                raise ValueError(f"Config.{name} must be positive and non-empty, got {values}")
        for name in ("num_pairs", "pool_factor", "sft_steps", "reward_steps", "policy_steps",
                     "eval_points", "eval_samples", "sft_eval_samples", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.eval_points > self.policy_steps:
            raise ValueError(f"Config.eval_points={self.eval_points} > policy_steps="
                             f"{self.policy_steps}")


SMOKE = dataclasses.replace(
    Config(), run_dir="runs/distill_length_bias_smoke", seeds=(0, 1), rhos=(0.2, 0.8),
    methods=("dpo", "d-dpo", "e-dpo"),
    hidden_size=32, intermediate_size=64, num_layers=1,
    betas=(1.0,), taus=(0.5,), val_prompts=2, test_prompts=2, num_pairs=48, pool_factor=6,
    probe_pairs=64, sft_examples=128, sft_steps=4, sft_batch_size=8, reward_steps=3,
    reward_batch_size=8, reward_save_every=2, policy_steps=2, policy_batch_size=8,
    eval_points=2, eval_samples=2, sft_eval_samples=2, max_new_tokens=8, eval_batch_size=8,
    score_batch_size=32, bootstrap_resamples=200)
"""Smoke size: the whole pipeline (every method, two rhos, two seeds) in well under a minute."""

PAPER = dataclasses.replace(
    Config(), run_dir="runs/distill_length_bias_paper", seeds=(0, 1, 2), rhos=PAPER_RHOS,
    betas=(0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0),
    taus=(0.01, 0.1, 1.0, 3.0, 5.0, 10.0, 25.0), num_pairs=30_000, policy_steps=10_000,
    policy_batch_size=16, policy_learning_rate=1e-6, reward_steps=3_000, reward_batch_size=64,
    reward_learning_rate=4e-6, eval_points=10)
"""004 §4.1's settings: rho in {0.2, ..., 0.8}, the beta and tau sweeps, 30K pairs per D_rho,
policies 10^4 steps at batch 16 and learning rate 1e-6, reward models 3k steps at batch 64
and 4e-6. The data, SFT corpus and models stay the embedded ones (the TL;DR data and the
PaLM-2 models are not loadable here; BUILD.md says what a TL;DR run needs)."""


SFT_EVAL_INDEX = 10_000
"""The eval-point index of pi_SFT's evaluation keys (the policies' are 0, 1, ...)."""


def _policy_fields(config: Config) -> dict:
    """The config fields a policy run's record depends on (a record made under other values
    is refused on resume)."""
    skip = {"run_dir", "seeds", "rhos", "methods", "betas", "taus", "progress",
            "compilation_cache", "bootstrap_resamples"}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def _read_records(path: pathlib.Path, expected: str) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    other = [r for r in records if r.get("config") != expected]
    if other:
        raise ConfigMismatchError(
            f"{path} holds {len(other)} records made under another config (the world, data, "
            f"model or training settings changed); use another run_dir")
    return records


def _append(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(config: Config) -> str:
    """Runs the study into `config.run_dir` and returns its Markdown results table."""
    run_dir = pathlib.Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.compilation_cache:
        enable_compilation_cache(run_dir.absolute())
    tokenizer = default_tokenizer()
    world = make_world(tokenizer, seed=config.world_seed, max_prompt_tokens=config.max_prompt_tokens,
                       num_val=config.val_prompts, num_test=config.test_prompts,
                       relevance_scale=config.relevance_scale, length_weight=config.length_weight)
    mesh = make_mesh(config.mesh)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    timings, marks = {}, [(time.perf_counter(), _cpu_seconds())]

    def lap(name):  # wall and CPU (user + system, all threads) seconds of each phase, and
        # the machine's 1/5/15-minute load averages at its end (the machine may be shared)
        now = (time.perf_counter(), _cpu_seconds())
        timings[name] = {"wall_s": round(now[0] - marks[-1][0], 1),
                         "cpu_s": round(now[1] - marks[-1][1], 1),
                         "load_average": [round(x, 2) for x in os.getloadavg()]}
        marks.append(now)
        log.info("%s done (%s)", name, timings[name])

    sft = phases.sft_phase(config, world, tokenizer)
    lap("sft")
    groups, pool_stats = phases.build_groups(config, world, tokenizer)
    scores, reward_diagnostics = phases.reward_phase(config, world, groups, sft, tokenizer)
    lap("reward_models")

    expected = phases.config_hash(_policy_fields(config))
    results_path = run_dir / "results.jsonl"
    records = _read_records(results_path, expected)
    evaluators = {split: Evaluator(world, tokenizer, getattr(world, split),
                                   num_samples=config.eval_samples,
                                   max_new_tokens=config.max_new_tokens,
                                   prompt_length=config.max_prompt_tokens,
                                   batch_size=config.eval_batch_size)
                  for split in ("val", "test")}
    baseline_evaluators = {split: Evaluator(world, tokenizer, getattr(world, split),
                                            num_samples=config.sft_eval_samples,
                                            max_new_tokens=config.max_new_tokens,
                                            prompt_length=config.max_prompt_tokens,
                                            batch_size=config.eval_batch_size)
                           for split in ("val", "test")}

    def eval_key(seed: int, index: int, split: str):
        # the same draws for every method at a (seed, eval point): common random numbers
        key = jax.random.fold_in(jax.random.PRNGKey(config.world_seed + 101), seed)
        return jax.random.fold_in(jax.random.fold_in(key, index), ("val", "test").index(split))

    graphdef, params, rest = sft
    sft_model = nnx.merge(graphdef, params, rest)
    baselines = {r["seed"]: r for r in records if r["method"] == "sft"}
    for seed in config.seeds:
        if seed not in baselines:
            record = {"method": "sft", "seed": seed, "config": expected,
                      **{split: baseline_evaluators[split](
                          sft_model, eval_key(seed, SFT_EVAL_INDEX, split)).as_dict()
                         for split in ("val", "test")}}
            _append(results_path, record)
            baselines[seed] = record
    done = {(r["method"], r["value"], r["rho"], r["seed"]) for r in records if r["method"] != "sft"}
    runner = phases.PolicyRunner(config, sft, mesh)
    for method in config.methods:
        for value in phases.sweep(config, method):
            for group in groups:
                if (method, value, group.rho, group.seed) in done:
                    continue
                dataset = phases.method_dataset(config, world, group, method, scores, tokenizer)
                members = None
                if method == "e-dpo":
                    a, b = scores[group.name]
                    members = (a[:, 1:], b[:, 1:])

                def evaluate(model, index, seed=group.seed):
                    return {split: evaluators[split](model, eval_key(seed, index, split)).as_dict()
                            for split in ("val", "test")}

                evals = runner.run(method, value, group.seed, dataset, evaluate=evaluate,
                                   members=members,
                                   run_dir=run_dir / "policies" / method /
                                   f"{hyper_name(method)}{value:g}" / group.name)
                record = {"method": method, "value": value, "rho": group.rho,
                          "seed": group.seed, "config": expected, "evals": evals}
                _append(results_path, record)
                records.append(record)
    lap("policies")
    table = write_report(config, records, baselines, reward_diagnostics, pool_stats, groups)
    lap("report")
    _append(run_dir / "timings.jsonl", {"started": started, "cpu_count": os.cpu_count(),
                                        "phases": timings})
    return table


def write_report(config: Config, records, baselines, reward_diagnostics, pool_stats,
                 groups) -> str:
    """summary.md (every table), summary.json, figure2.png, figure_c1.png, figure_d1.png;
    returns the Figure 2 table."""
    run_dir = pathlib.Path(config.run_dir)
    seeds, rhos, resamples = list(config.seeds), sorted(config.rhos), config.bootstrap_resamples
    policies = [r for r in records if r["method"] != "sft"]
    selections = {m: {rho: report.select(policies, baselines, m, rho, seeds) for rho in rhos}
                  for m in config.methods}
    estimates = {m: {rho: report.estimate(s["test_units"], resamples=resamples)
                     for rho, s in by_rho.items()} for m, by_rho in selections.items()}

    def label(method, selected):
        return f"{hyper_name(method)}={selected['value']:g}, step {selected['step']}"

    main = {f"{rho:g}": {**{m: f"{estimates[m][rho].format()} ({label(m, selections[m][rho])})"
                            for m in config.methods},
                         "best here": max(config.methods, key=lambda m: estimates[m][rho].mean),
                         "004 §4.2": report.paper_statement(rho)} for rho in rhos}
    main_table = report.table(main, [*config.methods, "best here", "004 §4.2"], "rho")
    sections = [f"# Reward-model distillation under length bias (cf. 004 §4, Figure 2)\n",
                _setup_text(config, pool_stats, groups),
                "## Figure 2: test oracle advantage over pi_SFT, mean [95% bootstrap CI] "
                "(selected on validation)\n", main_table, ""]
    if "dpo" in config.methods:
        others = [m for m in config.methods if m != "dpo"]
        paired = {f"{rho:g}": {f"{m} - dpo": report.paired_against(selections, m, "dpo", rho)
                               for m in others} for rho in rhos}
        sections += ["## Paired differences against DPO on the same (seed, prompt) units, "
                     "mean [95% paired bootstrap CI]\n",
                     report.table(paired, [f"{m} - dpo" for m in others], "rho"), ""]
    lengths = {f"{rho:g}": {m: f"{report.mean_of(selections[m][rho], 'test', 'sentences'):.2f}"
                            f" / {report.mean_of(selections[m][rho], 'test', 'useful'):.2f}"
                            for m in config.methods} for rho in rhos}
    sft_sentences = np.mean([np.mean(baselines[s]["test"]["sentences"]) for s in seeds])
    sft_useful = np.mean([np.mean(baselines[s]["test"]["useful"]) for s in seeds])
    sections += [f"## Selected policies' test samples: sentences per response / share of useful "
                 f"tips (pi_SFT: {sft_sentences:.2f} / {sft_useful:.2f})\n",
                 report.table(lengths, config.methods, "rho"), ""]
    sections += [_reward_table(config, reward_diagnostics, groups), ""]
    shares = {}
    if "e-dpo" in config.methods:
        shares = {rho: report.member_shares(selections["e-dpo"][rho]) for rho in rhos}
        c1 = {f"{rho:g}": {**{f"b={b:g}": float(shares[rho][j])
                              for j, b in enumerate(config.ensemble_biases)},
                           "mean b": float(np.dot(shares[rho], config.ensemble_biases))}
              for rho in rhos}
        sections += ["## Figure C.1: share of D_rho's pairs best matched by each e-DPO member "
                     "(selected e-DPO policy, seeds pooled)\n",
                     report.table(c1, [*(f"b={b:g}" for b in config.ensemble_biases), "mean b"],
                                  "rho"), ""]
        report.figure_c1(shares, config.ensemble_biases, run_dir / "figure_c1.png")
    curves = {m: {rho: report.validation_curve(policies, baselines, m, rho, seeds)
                  for rho in rhos} for m in config.methods}
    d1 = {f"{m} rho={rho:g}": {f"{hyper_name(m)}={v:g}": adv for v, adv in curve.items()}
          for m in config.methods for rho, curve in curves[m].items()}
    d1_columns = list(dict.fromkeys(c for cells in d1.values() for c in cells))
    sections += ["## Figure D.1: validation advantage of each swept value (its best step)\n",
                 report.table(d1, d1_columns, "method"), ""]
    claims = report.judge_claims(estimates, selections, shares, config.ensemble_biases)
    claim_rows = {text: {"paper": "holds", "this run": claims[key][0], "numbers": claims[key][1]}
                  for key, text in report.CLAIMS}
    sections += ["## The paper's claims against this run\n",
                 report.table(claim_rows, ["paper", "this run", "numbers"], "claim"), ""]
    (run_dir / "summary.md").write_text("\n".join(sections))
    report.figure2(estimates, run_dir / "figure2.png")
    report.figure_d1(curves, run_dir / "figure_d1.png")
    summary = {
        "config": dataclasses.asdict(config), "pools": pool_stats,
        "selected": {m: {f"{rho:g}": {"value": s["value"], "step": s["step"],
                                      "validation_advantage": s["val"],
                                      "test_advantage": estimates[m][rho].as_dict()}
                         for rho, s in by_rho.items()} for m, by_rho in selections.items()},
        "member_shares": {f"{rho:g}": v.tolist() for rho, v in shares.items()},
        "validation_curves": {m: {f"{rho:g}": {f"{v:g}": a for v, a in c.items()}
                                  for rho, c in by_rho.items()} for m, by_rho in curves.items()},
        "reward_models": reward_diagnostics,
        "claims": {key: {"claim": text, "verdict": claims[key][0], "numbers": claims[key][1]}
                   for key, text in report.CLAIMS}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return main_table


def _setup_text(config: Config, pool_stats, groups) -> str:
    longer = np.mean([s["longer_preferred"] for s in pool_stats.values()])
    realised = ", ".join(sorted({f"{g.k / len(g.pairs):.3f}" for g in groups}))
    return (f"{len(config.seeds)} seeds x rho in {list(config.rhos)}; D_rho: {config.num_pairs} "
            f"oracle-labelled pairs (the longer response wins in a fraction rho, realised "
            f"{realised}); before selection the longer response wins {longer:.0%} of the pool "
            f"pairs that have one (004: 61%). Policies: {config.policy_steps} steps, batch "
            f"{config.policy_batch_size}, lr {config.policy_learning_rate:g}; beta in "
            f"{list(config.betas)}, tau in {list(config.taus)}; gamma annealed 1e-4 -> 1e-2. "
            f"Evaluation: {config.eval_samples} samples per prompt ({config.sft_eval_samples} for "
            f"pi_SFT), {config.val_prompts} validation and {config.test_prompts} test prompts; "
            f"intervals over the {len(config.seeds) * config.test_prompts} (seed, test prompt) "
            f"units.\n")


def _reward_table(config: Config, diagnostics, groups) -> str:
    """Probe accuracy and length sensitivity of r_rho and each r_{rho,b}, means over seeds."""
    names = ["r_rho", *(f"b={b:g}" for b in config.ensemble_biases)]
    rows = {}
    for rho in sorted(config.rhos):
        by_seed = [diagnostics[g.name] for g in groups if g.rho == rho]
        acc = np.mean([d["probe_accuracy"] for d in by_seed], axis=0)
        corr = np.mean([d["probe_length_corr"] for d in by_seed], axis=0)
        rows[f"{rho:g}"] = {n: f"{a:.2f} / {c:+.2f}" for n, a, c in zip(names, acc, corr)}
    oracle = np.mean([d["oracle_probe_length_corr"] for d in diagnostics.values()])
    return (f"## Reward models on unbiased probe pairs: accuracy against the oracle / "
            f"correlation of the reward gap with the token-length gap (oracle: "
            f"{oracle:+.2f})\n\n" + report.table(rows, names, "rho"))


def main(argv: Sequence[str] | None = None) -> str:
    from alignax.trainer.cli import parse_config

    config = parse_config(Config, argv, prog="python -m experiments.distill_length_bias")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)  # the phases' progress, also when a handler was set up before
    table = run(config)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
