"""f-DPO against PPO(reward) and PPO(loss) under each f-divergence: the reward / divergence /
diversity trade-off and calibration of thesis ch. 2 (§2.6.1-2.6.4, Figures 2.2, 2.3, 2.5,
Tables 2.2-2.4), on a task the embedded tiny model can learn.

    python -m experiments.fdpo_frontier                      # embedded default (CPU, minutes)
    python -m experiments.fdpo_frontier full                 # FULL: every divergence
    python -m experiments.fdpo_frontier --seeds 0 1 2 3 4 --betas 0.1 0.3 0.9 --run_dir runs/x

The task (`experiments.frontier.task`): prompts open a film review ("Honestly, the pacing
was"), responses complete it with one or two evaluative clauses from a small grammar whose
adjectives carry sentiment scores, and the oracle reward is the mean sentiment of a grammatical
response, mapped to [0, 1]. The study, per seed (the SFT'd reference is shared):

1. reference: the embedded tiny Llama SFT'd on grammar demonstrations (its samples are
   grammatical and mostly negative, reward ~0.4);
2. preference data: K reference samples per training prompt, every non-tied pair labelled by a
   draw from the oracle's Bradley-Terry probability (noisy, like human labels);
3. f-DPO (eq. 2.2) under reverse KL, JSD, alpha-divergences and forward KL, for each beta,
   evaluated along training (the f-DPO curve of Figure 2.2 and the ECE curves of Figure 2.5);
4. PPO against the oracle (the thesis' PPO uses the ground-truth reward) with the same
   divergence as penalty, for each coefficient: PPO(reward) with the thesis' per-sample penalty
   f(u)/u, PPO(loss) with beta D_f minimised by SGD (§2.8.2 estimator), and the ablation
   PPO(reward) with f'(u) - f'(1), whose fixed point is the regularised optimum
   (`alignax.rl.penalties`);
5. evaluation on held-out prompts (`experiments.frontier.evaluation`): oracle reward,
   D_f(pi, pi_ref) for every divergence, predictive entropy, self-BLEU, distinct-n at
   temperatures 0.6 / 1.0 / 1.4, preference accuracy and the stochastic ECE of §2.8.8 on
   held-out oracle-labelled pairs; 95% bootstrap intervals over (seed, prompt) units.

What the committed run of the default shows (`experiments/results/fdpo_frontier/results.md`,
where every verdict is computed from that run's numbers): the task is learnable (f-DPO and PPO
raise the held-out oracle reward clearly above the reference's while samples stay
grammatical), and f-DPO traces a reward-vs-divergence curve along training for each beta.
Not reproduced: f-DPO being more divergence-efficient than PPO (here PPO, trained on the
oracle itself with on-policy samples, reaches more reward at equal divergence than f-DPO on
noisy offline pairs); the entropy ordering reverse KL < JSD < forward KL; the ECE growing with
training (it falls here from the reference's). Not tested: PPO(loss) being more stable than
PPO(reward) for JS / forward KL, since no run collapsed in 20 iterations; but the thesis'
PPO(reward) penalty f(u)/u does not restrain JS or forward KL (the divergence does not fall
as the coefficient rises), while PPO(loss) and the f'(u) - f'(1) ablation do. f-DPO under JSD
at beta 0.9 moves far from the reference and about a quarter of its samples leave the grammar
(JSD's f' is bounded above, so the loss can only fall by pushing rejected responses down).

The embedded default (`Config()`) runs reverse KL, JSD and forward KL, f-DPO at betas 0.1 and
0.9, the three PPO variants at coefficients 0.03 and 0.3, three seeds; its cost is mostly
compilation (one f-DPO step per (divergence, beta), one PPO trainer per (divergence, variant),
each shared by the seeds and coefficients). `FULL` adds alpha in {0.3, 0.5, 0.7}, a third beta,
the thesis' four PPO coefficients, five seeds and the NLL ablation; `PAPER` the thesis'
evaluation settings. Name one first on the command line (`python -m experiments.fdpo_frontier
full --seeds 0 1`).

Outputs under `run_dir`: reference/ (SFT), seed_<s>/ (pairs, per-run evals.jsonl, metrics.jsonl,
checkpoints), and the results: results.md (tables beside the thesis' numbers and the claims
checked against this run's numbers), summary.json, metrics.jsonl (one line per run and
evaluation, means with intervals), frontier.png (Figure 2.2), entropy.png (Figure 2.3),
ece.png (Figure 2.5). A killed run started again with the same config restores the reference,
skips finished runs and resumes unfinished ones from their last evaluation. Which of the
thesis' claims this small run reproduces is written, from the numbers, in results.md
(the committed one is `experiments/results/fdpo_frontier/results.md`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

import alignax.eval as ev
from alignax.eval.prompt_metrics import Divergence
from alignax.data import default_tokenizer
from alignax.divergences import get_divergence
from alignax.models import create, tiny_config
from alignax.objectives import FDPO
from alignax.rl import RolloutConfig
from alignax.training.mesh import make_mesh
from alignax.trainer.cli import parse_config
from experiments.frontier import report, task
from experiments.frontier.evaluation import EvalSet, diversity, evaluate
from experiments.frontier.training import (FDPORun, PPORun, PPOVariant, check_run_config,
                                           pairs_dataset, preference_pairs,
                                           reference_logps_for, sft_reference)

log = logging.getLogger("experiments.fdpo_frontier")

PPO_VARIANTS = {"reward": ("reward", "f_over_u"), "loss": ("loss", "f_over_u"),
                "reward_f_prime": ("reward", "f_prime")}
"""--ppo_variants names -> (placement, reward penalty form)."""


def divergence_spec(name: str) -> Divergence:
    """"alpha_0.5" -> ("alpha", 0.5); any other admissible name -> itself (validated)."""
    if name.startswith("alpha_"):
        try:
            alpha = float(name.split("_", 1)[1])
        except ValueError:
            raise ValueError(f"divergence {name!r}: expected alpha_<number>, e.g. alpha_0.5") \
                from None
        get_divergence("alpha", alpha=alpha)
        return "alpha", alpha
    get_divergence(name)
    return name


@dataclasses.dataclass(frozen=True)
class Config:
    """f-DPO vs PPO under each f-divergence: reward / divergence / diversity / calibration."""

    run_dir: str = "runs/fdpo_frontier"
    seeds: tuple[int, ...] = (0, 1, 2)
    mesh: tuple[int, ...] = (1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    progress: bool = True
    # the reference: the embedded tiny Llama SFT'd on the task's demonstrations
    hidden_size: int = 64
    sft_examples: int = 20000
    sft_steps: int = 500
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    max_length: int = 24  # prompt + response tokens of every training row
    # the task and its preference data
    eval_prompts: int = 36  # held out of the 180 prompts (per seed); the rest train
    pair_samples: int = 8  # reference samples per training prompt; all non-tied pairs used
    label_temperature: float = 0.1  # Bradley-Terry temperature of the oracle's labels
    max_new_tokens: int = 16
    # f-DPO
    divergences: tuple[str, ...] = ("reverse_kl", "jsd", "forward_kl")
    betas: tuple[float, ...] = (0.1, 0.9)
    fdpo_steps: int = 100
    fdpo_batch_size: int = 32
    fdpo_learning_rate: float = 3e-4
    fdpo_eval_every: int = 50
    adam_eps: float = 1e-4  # Adam's epsilon for f-DPO and PPO (see BUILD.md)
    nll_weight: float = 0.0  # ablation: f-DPO + this NLL term at table_beta (0: not run)
    # PPO
    ppo_variants: tuple[str, ...] = ("reward", "loss", "reward_f_prime")
    ppo_coefs: tuple[float, ...] = (0.03, 0.3)
    ppo_iterations: int = 20
    ppo_prompts_per_iteration: int = 32
    ppo_samples_per_prompt: int = 2
    ppo_learning_rate: float = 5e-4
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    ppo_whiten_advantages: bool = False  # off: beta means the same in both placements
    ppo_level: str = "sequence"  # the penalty on whole responses: f-DPO's divergence
    ppo_eval_every: int = 20
    # evaluation
    eval_samples: int = 8  # samples per held-out prompt (and as many reference samples)
    temperatures: tuple[float, ...] = (0.6, 1.0, 1.4)
    top_p: float | None = None  # nucleus filter of the diversity samples (thesis: 0.95)
    table_beta: float = 0.1  # the beta of the Table 2.2-2.4 rows (the thesis' IMDB beta)
    bootstrap_resamples: int = 2000

    def __post_init__(self):
        for name in ("seeds", "divergences", "betas", "temperatures"):
            if not getattr(self, name):
                raise ValueError(f"--{name} must name at least one value")
        for name in self.divergences:
            divergence_spec(name)  # raises on an unknown name or a bad alpha
        unknown = sorted(set(self.ppo_variants) - set(PPO_VARIANTS))
        if unknown:
            raise ValueError(f"--ppo_variants: unknown {unknown}; use names of "
                             f"{sorted(PPO_VARIANTS)}")
        if self.ppo_variants and not self.ppo_coefs:
            raise ValueError("--ppo_coefs must name at least one value when --ppo_variants do")
        if self.table_beta not in self.betas:
            raise ValueError(f"--table_beta {self.table_beta} is not one of --betas {self.betas}")
        if 1.0 not in self.temperatures:
            raise ValueError("--temperatures must include 1.0 (the samples of every metric)")
        if any(not b > 0 for b in self.betas + self.ppo_coefs):
            raise ValueError("--betas and --ppo_coefs must be > 0")
        if not self.nll_weight >= 0:
            raise ValueError(f"--nll_weight must be >= 0, got {self.nll_weight}")
        for name in ("sft_steps", "fdpo_steps", "ppo_iterations", "fdpo_eval_every",
                     "ppo_eval_every", "eval_samples", "pair_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples % 2:
            raise ValueError(f"--eval_samples must be even (held-out pairs), got "
                             f"{self.eval_samples}")
        if self.pair_samples < 2:
            raise ValueError(f"--pair_samples must be >= 2, got {self.pair_samples}")


SMOKE = Config(run_dir="runs/fdpo_frontier_smoke", seeds=(0, 1), progress=False,
               sft_examples=2048, sft_steps=60, sft_batch_size=32, eval_prompts=4,
               pair_samples=2, divergences=("jsd",), betas=(0.1,),
               fdpo_steps=4, fdpo_batch_size=8, fdpo_eval_every=2,
               ppo_variants=("reward", "loss"), ppo_coefs=(0.1, 1.0), ppo_iterations=2,
               ppo_prompts_per_iteration=4, ppo_eval_every=1, eval_samples=2,
               temperatures=(1.0, 1.4), table_beta=0.1, max_new_tokens=8,
               bootstrap_resamples=200)
"""The pipeline end to end at test size (a minute on 2 cores)."""

FULL = dataclasses.replace(
    Config(), run_dir="runs/fdpo_frontier_full", seeds=(0, 1, 2, 3, 4),
    divergences=("reverse_kl", "jsd", "alpha_0.3", "alpha_0.5", "alpha_0.7", "forward_kl"),
    betas=(0.1, 0.3, 0.9), ppo_coefs=(0.01, 0.03, 0.1, 0.3), fdpo_steps=200,
    fdpo_eval_every=25, nll_weight=0.2, ppo_iterations=60, ppo_eval_every=15)
"""Every divergence of Table 2.2 and the thesis' four PPO coefficients, on the embedded task
(not run for the committed results)."""

PAPER = dataclasses.replace(
    FULL, run_dir="runs/fdpo_frontier_paper", mesh=(1, -1, 1), top_p=0.95, eval_samples=26,
    ppo_coefs=(0.01, 0.03, 0.1, 0.3), betas=(0.1, 0.3, 0.9))
"""The thesis' grid and evaluation settings (nucleus 0.95, 25 samples per prompt rounded up to
pairs, FSDP mesh). The models and data of §2.6.2 (GPT-2-large on IMDB with the SiEBERT
classifier as the reward) are not wired into this module: BUILD.md says what that needs."""


def _split(spec) -> tuple[str, float | None]:
    return (spec, None) if isinstance(spec, str) else spec


# ---------------------------------------------------------------- run-config checks

REFERENCE_FIELDS = ("hidden_size", "sft_examples", "sft_steps", "sft_batch_size",
                    "sft_learning_rate", "max_length")
SEED_FIELDS = REFERENCE_FIELDS + ("eval_prompts", "pair_samples", "label_temperature",
                                  "max_new_tokens", "eval_samples", "temperatures", "top_p")
FDPO_FIELDS = SEED_FIELDS + ("fdpo_steps", "fdpo_batch_size", "fdpo_learning_rate",
                             "fdpo_eval_every", "adam_eps")
NLL_FIELDS = FDPO_FIELDS + ("nll_weight",)
PPO_FIELDS = SEED_FIELDS + ("ppo_iterations", "ppo_prompts_per_iteration",
                            "ppo_samples_per_prompt", "ppo_learning_rate", "ppo_epochs",
                            "ppo_minibatches", "ppo_whiten_advantages", "ppo_level",
                            "ppo_eval_every", "adam_eps")


def fields(config: Config, names: Sequence[str], **extra) -> dict:
    """The config fields a phase depends on (its checkpoints refuse a resume under others)."""
    values = dataclasses.asdict(config)
    return {**{k: values[k] for k in names}, **extra}


# ---------------------------------------------------------------- the study

def build_reference(config: Config, tokenizer, mesh):
    """(graphdef, reference params, model state, model config) after SFT (restored if done)."""
    model_config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    model = create(model_config, rngs=nnx.Rngs(0), mesh=mesh)
    run = pathlib.Path(config.run_dir) / "reference"
    check_run_config(run / "study", fields(config, REFERENCE_FIELDS))
    examples = task.sft_examples(task.prompts(), config.sft_examples, seed=0)
    graphdef, params, rest = sft_reference(
        model, tokenizer, examples, run=run, mesh=config.mesh, steps=config.sft_steps,
        batch_size=config.sft_batch_size, learning_rate=config.sft_learning_rate,
        max_length=config.max_length, seed=0, progress=config.progress)
    return graphdef, params, rest, model_config


def sampling_config(config: Config, tokenizer, *, num_samples: int) -> ev.SamplingConfig:
    prompt_length = max(len(tokenizer.encode(p)) for p in task.prompts())
    return ev.SamplingConfig(num_samples=num_samples, max_new_tokens=config.max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, batch_size=128,
                             prompt_length=prompt_length)


class SeedEvaluator:
    """The evaluation of one seed: its held-out prompts, reference samples and keys.

    `__call__(params, index, final)` evaluates a policy at evaluation `index` (the same
    sampling key for every run at the same index: paired comparisons); the final evaluation
    adds the diversity metrics at each temperature (names "T<t>/<metric>").
    """

    def __init__(self, config: Config, tokenizer, graphdef, rest, reference_params, prompts,
                 *, seed: int):
        self.config, self.tokenizer = config, tokenizer
        self.graphdef, self.rest = graphdef, rest
        self.reference = nnx.merge(graphdef, reference_params, rest)
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
        self.divergences = [divergence_spec(d) for d in config.divergences]
        if "reverse_kl" not in config.divergences:
            self.divergences.append("reverse_kl")  # KL is always reported
        self.eval_set = EvalSet.build(
            self.reference, tokenizer, prompts,
            sampling=sampling_config(config, tokenizer, num_samples=config.eval_samples),
            oracle=task.rewards, key=jax.random.fold_in(self.key, 10_000),
            preference_probability=lambda a, b: task.preference_probability(
                a, b, temperature=config.label_temperature))

    def __call__(self, params, index: int, final: bool) -> dict[str, np.ndarray]:
        policy = nnx.merge(self.graphdef, params, self.rest)
        key = jax.random.fold_in(self.key, index)
        metrics = evaluate(policy, self.reference, self.eval_set, self.tokenizer,
                           oracle=task.rewards, key=key, divergences=self.divergences,
                           well_formed=task.well_formed)
        if final:
            for t in self.config.temperatures:
                values = diversity(policy, self.eval_set, self.tokenizer, temperature=t,
                                   top_p=self.config.top_p, key=jax.random.fold_in(key, 7))
                metrics.update({f"T{t:g}/{k}": v for k, v in values.items()})
        return metrics


def run_seed(config: Config, seed: int, tokenizer, mesh, graphdef, reference_params, rest,
             model_config, fdpo: FDPORun, ppo: PPORun | None) -> list[dict]:
    """Every run of one seed; returns [{method, divergence, coef, seed, evals}]."""
    root = pathlib.Path(config.run_dir) / f"seed_{seed}"
    check_run_config(root, fields(config, SEED_FIELDS, seed=seed))
    train_prompts, eval_prompts = task.split_prompts(config.eval_prompts, seed=seed)
    evaluator = SeedEvaluator(config, tokenizer, graphdef, rest, reference_params, eval_prompts,
                              seed=seed)
    reference_path = root / "reference_eval.json"
    if reference_path.exists():
        reference_eval = {k: np.asarray(v) for k, v in
                          json.loads(reference_path.read_text()).items()}
    else:
        reference_eval = evaluator(reference_params, 0, True)
        reference_path.write_text(json.dumps({k: v.tolist() for k, v in reference_eval.items()}))
    runs = [{"method": "reference", "divergence": None, "coef": None, "seed": seed,
             "evals": {0: reference_eval}}]

    pairs_path = root / "pairs.jsonl"
    if pairs_path.exists():
        records = [json.loads(line) for line in pairs_path.read_text().splitlines()]
        stats = json.loads((root / "pairs_stats.json").read_text())
    else:
        reference = nnx.merge(graphdef, reference_params, rest)
        records, stats = preference_pairs(
            reference, tokenizer, train_prompts,
            sampling=sampling_config(config, tokenizer, num_samples=config.pair_samples),
            oracle=task.rewards, key=jax.random.fold_in(jax.random.PRNGKey(seed), 2),
            label_probability=lambda a, b: task.preference_probability(
                a, b, temperature=config.label_temperature), seed=seed)
        pairs_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        (root / "pairs_stats.json").write_text(json.dumps(stats, indent=1))
    log.info("seed %d pairs: %s", seed, stats)
    runs[0]["pairs"] = stats
    if len(records) < config.fdpo_batch_size:
        raise ValueError(f"seed {seed}: {len(records)} preference pairs with different rewards "
                         f"({stats['ties_left_out']} tied pairs left out), fewer than "
                         f"fdpo_batch_size={config.fdpo_batch_size}: raise pair_samples or "
                         f"sft_steps (a reference that has not learned the grammar scores 0)")
    dataset = pairs_dataset(records, tokenizer, max_length=config.max_length)
    if len(dataset) < config.fdpo_batch_size:
        raise ValueError(f"seed {seed}: {len(dataset)} preference pairs, fewer than "
                         f"fdpo_batch_size={config.fdpo_batch_size}; raise pair_samples")
    reference_logps = reference_logps_for(graphdef, reference_params, rest, dataset, tokenizer,
                                          cache_dir=root / "reference_logps",
                                          batch_size=config.fdpo_batch_size)

    def with_final(total_evals):
        return lambda params, index: evaluator(params, index, index == total_evals)

    fdpo_evals = len(range(config.fdpo_eval_every, config.fdpo_steps, config.fdpo_eval_every)) + 1
    for name in config.divergences:
        divergence, alpha = _split(divergence_spec(name))
        for beta in config.betas:
            run = root / "fdpo" / f"{name}_beta{beta:g}"
            objective = FDPO(beta=beta, divergence=divergence, alpha=alpha)
            records_by_step = fdpo.run(
                objective, reference_params, dataset, reference_logps, run=run, seed=seed,
                eval_every=config.fdpo_eval_every, evaluate=with_final(fdpo_evals),
                config=fields(config, FDPO_FIELDS, seed=seed, divergence=name, beta=beta))
            runs.append(_run_record("f-DPO", name, beta, seed, records_by_step, reference_eval))
        if config.nll_weight > 0:  # the ablation: with an SFT term on the chosen responses
            beta = config.table_beta
            run = root / "fdpo_nll" / f"{name}_beta{beta:g}"
            objective = FDPO(beta=beta, divergence=divergence, alpha=alpha,
                             nll_weight=config.nll_weight)
            records_by_step = fdpo.run(
                objective, reference_params, dataset, reference_logps, run=run, seed=seed,
                eval_every=config.fdpo_eval_every, evaluate=with_final(fdpo_evals),
                config=fields(config, NLL_FIELDS, seed=seed, divergence=name, beta=beta))
            runs.append(_run_record("f-DPO+NLL", name, beta, seed, records_by_step,
                                    reference_eval))

    if ppo is not None:
        prompt_ids, prompt_mask = ev.encode_prompts(
            tokenizer, train_prompts, prompt_length=sampling_config(config, tokenizer,
                                                                    num_samples=1).prompt_length)
        ppo_evals = (len(range(config.ppo_eval_every, config.ppo_iterations,
                               config.ppo_eval_every)) + 1)
        for name in config.divergences:
            divergence, alpha = _split(divergence_spec(name))
            for variant_name in config.ppo_variants:
                placement, form = PPO_VARIANTS[variant_name]
                if form == "f_prime" and divergence == "reverse_kl":
                    continue  # f'(u) - f'(1) = log u = f(u)/u: the same run as PPO(reward)
                variant = PPOVariant(divergence, alpha, placement, form)
                for coef in config.ppo_coefs:
                    run = root / variant.slug / f"{name}_coef{coef:g}"
                    records_by_step = ppo.run(
                        variant, coef, prompt_ids, prompt_mask, run=run, seed=seed,
                        eval_every=config.ppo_eval_every, evaluate=with_final(ppo_evals),
                        config=fields(config, PPO_FIELDS, seed=seed, divergence=name,
                                      variant=variant_name, coef=coef))
                    runs.append(_run_record(variant.label, name, coef, seed, records_by_step,
                                            reference_eval))
    return runs


def _run_record(method, divergence, coef, seed, records_by_step, reference_eval) -> dict:
    evals = {0: reference_eval}
    stopped = None
    for step, record in sorted(records_by_step.items()):
        if step < 0:
            stopped = record.get("stopped")
            continue
        evals[step] = {k: np.asarray(v, np.float64) for k, v in record["metrics"].items()}
    return {"method": method, "divergence": divergence, "coef": coef, "seed": seed,
            "evals": evals, "stopped": stopped}


def run(config: Config) -> str:
    """Runs (or resumes) the study into `config.run_dir`; returns the results' Markdown."""
    if jax.config.jax_compilation_cache_dir is None:  # reruns and seeds reuse compilations
        cache = pathlib.Path(config.run_dir).absolute().parent / ".jax_cache"
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = make_mesh(config.mesh)
    tokenizer = default_tokenizer()
    graphdef, reference_params, rest, model_config = build_reference(config, tokenizer, mesh)
    fdpo = FDPORun(graphdef, rest, mesh, steps=config.fdpo_steps,
                   batch_size=config.fdpo_batch_size, learning_rate=config.fdpo_learning_rate,
                   adam_eps=config.adam_eps, progress=config.progress)
    ppo = None
    if config.ppo_variants:
        ppo = PPORun(graphdef, reference_params, rest, tokenizer, task.rewards, mesh=mesh,
                     hidden_size=model_config.hidden_size,
                     rollout=RolloutConfig(max_new_tokens=config.max_new_tokens,
                                           eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id,
                                           samples_per_prompt=config.ppo_samples_per_prompt),
                     iterations=config.ppo_iterations,
                     prompts_per_iteration=config.ppo_prompts_per_iteration,
                     learning_rate=config.ppo_learning_rate, adam_eps=config.adam_eps,
                     epochs=config.ppo_epochs, minibatches=config.ppo_minibatches,
                     whiten_advantages=config.ppo_whiten_advantages, level=config.ppo_level,
                     progress=config.progress)
    runs = []
    for seed in config.seeds:
        runs.extend(run_seed(config, seed, tokenizer, mesh, graphdef, reference_params, rest,
                             model_config, fdpo, ppo))
    return report.write(config, runs, pathlib.Path(config.run_dir))


PRESETS = {"smoke": SMOKE, "full": FULL, "paper": PAPER}
"""A first positional argument naming one of these starts from it instead of `Config()`."""


def parse(argv: Sequence[str] | None = None) -> Config:
    """The command line's Config: `[smoke|full|paper] [--field value ...]`."""
    argv = list(argv or [])
    default = PRESETS[argv.pop(0)] if argv and argv[0] in PRESETS else None
    return parse_config(Config, argv, default=default, prog="python -m experiments.fdpo_frontier")


def main(argv: Sequence[str] | None = None) -> str:
    config = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    table = run(config)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
