"""f-DPO under each divergence on a CPU-sized analogue of the thesis' IMDB study (§2.6.2, Fig. 2.2).

    python -m experiments.fdpo_sentiment                       # embedded default, a few minutes on CPU
    python -m experiments.fdpo_sentiment --divergences reverse_kl jsd --train_steps 200

The thesis fine-tunes GPT-2-large on IMDB prompts with a sentiment classifier as the oracle and
compares, for each f-divergence, the oracle reward reached against the KL from the reference
and the generation entropy: reverse KL reaches the highest reward at the highest KL and the
lowest diversity; forward KL and JSD stay closer to the reference and keep more entropy. Here:

1. reference: the tiny embedded Llama (`alignax.models.tiny_config` + the embedded tokenizer),
   briefly SFT-ed on the bundled corpus (movie reviews, Q&A, dialogues), or any HF model;
2. prompts: openings of the corpus' review lines ("The acting is", "Honestly, the show felt");
   `samples_per_prompt` responses sampled from the reference;
3. oracle reward: the share of response tokens that are positive words (`POSITIVE_WORDS`);
4. pairs: best vs worst sample of each prompt by the oracle (ties dropped, counted);
5. f-DPO (thesis eq. 2.2) from the reference under each divergence, with periodic evaluation:
   oracle reward, KL(pi || pi_ref) and per-token entropy of fresh samples.

Outputs under `run_dir`: sft/ and <divergence>/ runs (metrics.jsonl, tensorboard/, metrics.png,
checkpoints/, evals.jsonl), summary.md / summary.json (the table) and reward_vs_kl.png.
A killed run resumes from its checkpoints when started again with the same config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import sys
from typing import Sequence

import jax
import matplotlib
import numpy as np
from flax import nnx

from alignax.data import BatchIterator, default_tokenizer, load_records
from alignax.data.tokenizer import CORPUS_PATH
from alignax.models import create, from_pretrained, generate, tiny_config
from alignax.models.lora import LoRAConfig, add_lora, merge
from alignax.training.checkpoint import Checkpointer, export_hf
from alignax.training.loop import MetricsLogger, plot_metrics, read_metrics, train
from alignax.training.mesh import initialize_distributed, make_mesh
from alignax.objectives import FDPO, SFT
from alignax.training.state import (OptimizerConfig, cast_floating, create_train_state,
                                    make_optimizer, split_model)
from alignax.training.step import StepConfig, make_train_step, role_logprobs
from alignax.trainer.cli import parse_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("experiments.fdpo_sentiment")

POSITIVE_WORDS = ("good", "great", "excellent", "wonderful", "brilliant", "beautiful", "best",
                  "charming", "moving", "touching", "gripping", "fresh", "liked", "loved",
                  "love", "enjoyed", "fun", "happy", "nice", "amazing", "recommend", "yes")
"""The oracle's "positive" subset (whole-word tokens of the embedded tokenizer, any case)."""

PROMPT_PATTERN = re.compile(r"^((?:Honestly, )?(?:The|This|I) [^,.!?]*? (?:is|was|felt|are))\b")


@dataclasses.dataclass(frozen=True)
class Config:
    """f-DPO under each divergence: oracle reward vs KL from the reference, and entropy."""

    run_dir: str = "runs/fdpo_sentiment"
    seed: int = 0
    divergences: tuple[str, ...] = ("reverse_kl", "jsd", "alpha_0.5", "forward_kl")
    beta: float = 0.2
    model: str = "tiny"  # "tiny" (embedded) or an HF hub id / local directory
    tokenizer: str = "default"  # "default" (embedded) or an HF hub id / local directory
    prompts: str = "corpus"  # "corpus" (embedded reviews), a .txt file (one per line) or a dataset
    prompt_column: str = "text"  # dataset column to cut prompts from (hub id or local file)
    prompt_words: int = 8  # words of each dataset text kept as the prompt
    mesh: tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    compute_dtype: str = "float32"
    sft_steps: int = 150  # SFT of the embedded reference on the corpus (0 for a hub model)
    sft_batch_size: int = 16
    sft_length: int = 48
    sft_learning_rate: float = 3e-3
    num_prompts: int = 96
    samples_per_prompt: int = 4
    response_length: int = 12
    temperature: float = 1.0
    train_steps: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-4
    eval_every: int = 20
    eval_prompts: int = 32
    eval_samples: int = 4
    save_every: int = 20
    keep_checkpoints: int = 2
    export: bool = False  # write each final policy as HF safetensors under <run>/hf
    lora_rank: int | None = None  # f-DPO trains LoRA adapters of this rank (reference: the base)
    lora_alpha: float | None = None  # LoRA alpha (scale alpha / rank); None: 2 * lora_rank
    progress: bool = True


def divergence_config(name: str) -> tuple[str, float | None]:
    """"alpha_0.5" -> ("alpha", 0.5); any other name -> (name, None)."""
    if name.startswith("alpha_"):
        return "alpha", float(name.split("_", 1)[1])
    return name, None


# ---------------------------------------------------------------- tokens, prompts and oracle

def positive_token_ids(tokenizer) -> np.ndarray:
    """Ids of vocabulary entries that decode to a word of POSITIVE_WORDS (stripped, any case)."""
    ids = [i for i in range(len(tokenizer))
           if tokenizer.decode([i]).strip().lower() in POSITIVE_WORDS]
    if not ids:
        raise ValueError("the tokenizer has no whole-word token for any of POSITIVE_WORDS")
    return np.asarray(ids, np.int32)


def oracle_reward(tokens: np.ndarray, mask: np.ndarray, positive_ids: np.ndarray) -> np.ndarray:
    """[B, N] response tokens -> [B] share of (masked) tokens that are positive words."""
    hits = np.isin(tokens, positive_ids) & mask
    return hits.sum(-1) / np.maximum(mask.sum(-1), 1)


def load_prompts(config: Config, rng: np.random.Generator) -> list[str]:
    """`num_prompts + eval_prompts` distinct prompts (train first, then held-out eval)."""
    if config.prompts == "corpus":
        lines = pathlib.Path(CORPUS_PATH).read_text().splitlines()
        found = sorted({m.group(1) for m in map(PROMPT_PATTERN.match, lines) if m})
    elif config.prompts.endswith(".txt"):
        found = sorted({line.strip() for line in pathlib.Path(config.prompts).read_text()
                        .splitlines() if line.strip()})
    else:  # a hub dataset (e.g. stanfordnlp/imdb) or a local JSONL/Parquet/CSV file
        records = load_records(config.prompts)
        found = sorted({" ".join(str(r[config.prompt_column]).split()[:config.prompt_words])
                        for r in records})
    need = config.num_prompts + config.eval_prompts
    if len(found) < need:
        raise ValueError(f"{config.prompts}: {len(found)} distinct prompts, need {need} "
                         f"(num_prompts + eval_prompts)")
    return [found[i] for i in rng.permutation(len(found))[:need]]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [B, P] prompt ids (bos + text) and mask."""
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False)
            for p in prompts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def sequences(prompt_ids, prompt_mask, tokens, token_mask, role: str) -> dict[str, np.ndarray]:
    """Prompt + response rows for role `role`: ids, attention mask and loss (response) mask."""
    return {f"{role}_input_ids": np.concatenate([prompt_ids, tokens], 1).astype(np.int32),
            f"{role}_attention_mask": np.concatenate([prompt_mask, token_mask], 1).astype(np.int32),
            f"{role}_loss_mask": np.concatenate([np.zeros_like(prompt_mask, bool),
                                                 token_mask.astype(bool)], 1)}


class ArrayBatches(BatchIterator):
    """A seeded, resumable iterator of batches over the rows of a dict of equal-length arrays.

    With several processes each one reads its own strided shard of the rows and yields its
    `batch_size / process_count` rows of every global batch (`global_batch` assembles them).
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int):
        self.arrays = arrays
        rows = len(next(iter(arrays.values())))
        super().__init__(list(range(rows)), self._collate, seed=seed,
                         batch_size=batch_size // jax.process_count(),
                         shard_index=jax.process_index(), shard_count=jax.process_count())

    def _collate(self, indices):
        return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}


# ---------------------------------------------------------------- model phases

def sft_reference(config: Config, tokenizer, mesh, params, graphdef, rest) -> object:
    """A few SFT steps of the embedded reference on the corpus (resumable, checkpointed)."""
    ids = np.asarray(tokenizer(pathlib.Path(CORPUS_PATH).read_text(), verbose=False)["input_ids"],
                     np.int32)
    rows = ids[: len(ids) // config.sft_length * config.sft_length].reshape(-1, config.sft_length)
    ones = np.ones_like(rows)
    arrays = {"chosen_input_ids": rows, "chosen_attention_mask": ones,
              "chosen_loss_mask": ones.astype(bool)}
    optimizer, schedule = make_optimizer(OptimizerConfig(
        learning_rate=config.sft_learning_rate, schedule="cosine",
        warmup_steps=min(10, config.sft_steps), total_steps=config.sft_steps))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(config.seed),
                                          mesh=mesh)
    step = make_train_step(graphdef, SFT(), optimizer,
                           schedule, mesh=mesh, state_shardings=shardings, model_state=rest,
                           config=StepConfig(compute_dtype=config.compute_dtype))
    run = pathlib.Path(config.run_dir) / "sft"
    return run_phase(config, run, step, state, ArrayBatches(arrays, batch_size=config.sft_batch_size,
                                                            seed=config.seed),
                     num_steps=config.sft_steps, reference=None, description="sft",
                     phase="sft").params


SFT_FIELDS = ("seed", "model", "tokenizer", "mesh", "compute_dtype", "sft_steps",
              "sft_batch_size", "sft_length", "sft_learning_rate")
NOT_CHECKED = ("run_dir", "divergences", "export", "progress", "save_every", "keep_checkpoints")


def phase_config(config: Config, phase: str) -> dict:
    """The config fields a phase's checkpoints depend on (a resume with others is refused)."""
    fields = dataclasses.asdict(config)
    if phase == "sft":
        return {k: fields[k] for k in SFT_FIELDS}
    return {k: v for k, v in fields.items() if k not in NOT_CHECKED}


def run_phase(config: Config, run: pathlib.Path, step, state, batches, *, num_steps: int,
              reference, description: str, phase: str):
    """Resumes `state`/`batches` from run/checkpoints if there is one, then trains to num_steps."""
    checkpointer = Checkpointer(run / "checkpoints", config=phase_config(config, phase),
                                save_every=config.save_every, keep=config.keep_checkpoints)
    ahead = (checkpointer.latest_step() or 0) > int(state.step)
    restored = checkpointer.restore_latest(state) if ahead else None
    if restored is not None:
        state, data_state, at = restored
        batches.set_state(data_state)
        log.info("%s: resumed from step %d", description, at)
    logger = MetricsLogger(run)
    try:
        state = train(step, state, batches, num_steps=num_steps, mesh=params_mesh(state.params),
                      reference_params=reference, checkpointer=checkpointer, logger=logger,
                      progress=config.progress, description=description)
    finally:
        logger.close()
        checkpointer.close()
    plot_metrics(run / "metrics.jsonl", run / "metrics.png", title=description)
    return state


def params_mesh(params):
    """The mesh the parameters live on."""
    return jax.tree.leaves(params)[0].sharding.mesh


def sample(graphdef, params, rest, prompt_ids, prompt_mask, *, key, config: Config, tokenizer):
    """Responses [B, N] and mask sampled from the model with parameters `params`."""
    model = nnx.merge(graphdef, cast_floating(params, config.compute_dtype), rest)
    tokens, mask = generate(model, prompt_ids, prompt_mask, key=key,
                            max_new_tokens=config.response_length, temperature=config.temperature,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return np.asarray(tokens), np.asarray(mask)


def make_pairs(config: Config, graphdef, params, rest, tokenizer, prompt_ids, prompt_mask,
               positive_ids) -> tuple[dict[str, np.ndarray], dict]:
    """Oracle-labelled pairs: best vs worst of `samples_per_prompt` reference samples."""
    k = config.samples_per_prompt
    tokens, mask = sample(graphdef, params, rest, np.repeat(prompt_ids, k, 0),
                          np.repeat(prompt_mask, k, 0), key=jax.random.PRNGKey(config.seed + 1),
                          config=config, tokenizer=tokenizer)
    rewards = oracle_reward(tokens, mask, positive_ids).reshape(-1, k)  # [P*k] -> [P, k]
    best, worst = rewards.argmax(1), rewards.argmin(1)
    keep = np.flatnonzero(rewards[np.arange(len(rewards)), best] >
                          rewards[np.arange(len(rewards)), worst])
    tokens, mask = tokens.reshape(-1, k, tokens.shape[-1]), mask.reshape(-1, k, mask.shape[-1])
    pairs = {**sequences(prompt_ids[keep], prompt_mask[keep], tokens[keep, best[keep]],
                         mask[keep, best[keep]], "chosen"),
             **sequences(prompt_ids[keep], prompt_mask[keep], tokens[keep, worst[keep]],
                         mask[keep, worst[keep]], "rejected")}
    stats = {"prompts": len(rewards), "pairs": len(keep), "ties_dropped": len(rewards) - len(keep),
             "reference_reward": float(rewards.mean())}
    if len(keep) < config.batch_size:
        raise ValueError(f"only {len(keep)} oracle-labelled pairs (ties dropped) for batch_size "
                         f"{config.batch_size}: raise num_prompts or samples_per_prompt")
    return pairs, stats


def make_evaluator(config: Config, graphdef, rest, reference_params, tokenizer, prompt_ids,
                   prompt_mask, positive_ids):
    """evaluate(params, step) -> {oracle_reward, kl, entropy_per_token} on fresh samples."""
    k = config.eval_samples
    prompt_ids, prompt_mask = np.repeat(prompt_ids, k, 0), np.repeat(prompt_mask, k, 0)

    @jax.jit
    def logps(params, batch):
        model = nnx.merge(graphdef, cast_floating(params, config.compute_dtype), rest)
        return role_logprobs(model, batch, ("sample",), chunk_size=1024, vocab_chunk_size=None)

    def evaluate(params, step: int) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step)
        tokens, mask = sample(graphdef, params, rest, prompt_ids, prompt_mask, key=key,
                              config=config, tokenizer=tokenizer)
        batch = sequences(prompt_ids, prompt_mask, tokens, mask, "sample")
        policy, reference = logps(params, batch)["sample"], logps(reference_params, batch)["sample"]
        count = np.maximum(mask.sum(-1), 1)
        return {"step": step, "oracle_reward": float(oracle_reward(tokens, mask, positive_ids).mean()),
                "kl": float(np.mean(policy - reference)),  # E_pi[log pi - log pi_ref], sequence KL
                "entropy_per_token": float(np.mean(-np.asarray(policy) / count)),
                "response_tokens": float(count.mean())}

    return evaluate


def lora_config(config: Config) -> LoRAConfig | None:
    """The f-DPO phase's adapters on every projection (None: full fine-tuning), validated."""
    if config.lora_rank is None:
        if config.lora_alpha is not None:
            raise ValueError("--lora_alpha needs --lora_rank")
        return None
    alpha = 2.0 * config.lora_rank if config.lora_alpha is None else config.lora_alpha
    return LoRAConfig(rank=config.lora_rank, alpha=alpha,
                      targets=("q", "k", "v", "o", "gate", "up", "down"))


def fdpo_objective(config: Config, name: str) -> FDPO:
    """The f-DPO objective of divergence `name` (thesis eq. 2.2), validated when built."""
    divergence, alpha = divergence_config(name)
    return FDPO(beta=config.beta, divergence=divergence, alpha=alpha)


def train_divergence(config: Config, name: str, objective: FDPO, graphdef, rest,
                     reference_params, pairs, evaluate) -> list[dict]:
    """f-DPO from the reference with `objective` (divergence `name`); returns the evaluation
    records."""
    mesh = params_mesh(reference_params)
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=config.learning_rate,
                                                         total_steps=config.train_steps))
    lora = lora_config(config)
    policy_graphdef, params, policy_rest, reference = graphdef, reference_params, rest, "model"
    if lora is not None:  # adapters on the reference; the reference = adapters off
        model = add_lora(nnx.merge(graphdef, reference_params, rest), lora,
                         rngs=nnx.Rngs(config.seed + 4), mesh=mesh)
        policy_graphdef, params, policy_rest = split_model(model)
        reference = "base"

    def full_weights(params):  # the evaluator's layout: adapters merged into the weights
        if lora is None:
            return params
        return split_model(merge(nnx.merge(policy_graphdef, params, policy_rest)))[1]

    state, shardings = create_train_state(params, optimizer,
                                          key=jax.random.PRNGKey(config.seed + 3), mesh=mesh)
    step = make_train_step(policy_graphdef, objective, optimizer, schedule, mesh=mesh,
                           state_shardings=shardings, model_state=policy_rest,
                           config=StepConfig(compute_dtype=config.compute_dtype),
                           reference=reference)
    frozen = reference_params if lora is None else None  # the step's reference_params
    run = pathlib.Path(config.run_dir) / name
    run.mkdir(parents=True, exist_ok=True)
    evals_path = run / "evals.jsonl"
    done = {r["step"]: r for r in read_metrics(evals_path)} if evals_path.exists() else {}
    batches = ArrayBatches(pairs, batch_size=config.batch_size, seed=config.seed)
    ends = sorted({*range(config.eval_every, config.train_steps, config.eval_every),
                   config.train_steps})
    if 0 not in done:
        done[0] = evaluate(reference_params, 0)
        with evals_path.open("a") as f:
            f.write(json.dumps(done[0]) + "\n")
    for end in ends:
        if end in done:
            continue
        state = run_phase(config, run, step, state, batches, num_steps=end,
                          reference=frozen, description=f"f-DPO {name}",
                          phase="fdpo")
        done[end] = evaluate(full_weights(state.params), end)
        with evals_path.open("a") as f:
            f.write(json.dumps(done[end]) + "\n")
    if config.export:  # restores the final checkpoint when every segment was already done
        state = run_phase(config, run, step, state, batches, num_steps=config.train_steps,
                          reference=frozen, description=f"f-DPO {name}",
                          phase="fdpo")
        export_hf(policy_graphdef, state.params, run / "hf", model_state=policy_rest)
    final = read_metrics(run / "metrics.jsonl")[-1]
    records = [done[s] for s in sorted(done)]
    records[-1] = {**records[-1], "train_loss": final["loss"],
                   "train_accuracy": final["rewards/accuracies"]}
    return records


# ---------------------------------------------------------------- report

def write_report(config: Config, results: dict[str, list[dict]], pair_stats: dict) -> str:
    """summary.md (markdown table), summary.json and reward_vs_kl.png; returns the table."""
    run_dir = pathlib.Path(config.run_dir)
    lines = ["| divergence | oracle reward | KL(pi ‖ pi_ref) | entropy / token | train loss | "
             "train acc |", "|---|---|---|---|---|---|"]
    reference = next(iter(results.values()))[0]
    lines.append(f"| reference | {reference['oracle_reward']:.3f} | 0.000 | "
                 f"{reference['entropy_per_token']:.3f} | | |")
    for name, records in results.items():
        r = records[-1]
        lines.append(f"| {name} | {r['oracle_reward']:.3f} | {r['kl']:.3f} | "
                     f"{r['entropy_per_token']:.3f} | {r['train_loss']:.4f} | "
                     f"{r['train_accuracy']:.2f} |")
    table = "\n".join(lines)
    (run_dir / "summary.md").write_text(
        f"# f-DPO sentiment analogue (beta={config.beta}, {config.train_steps} steps)\n\n"
        f"{pair_stats['pairs']} oracle-labelled pairs from {pair_stats['prompts']} prompts "
        f"({pair_stats['ties_dropped']} ties dropped). Evaluation: {config.eval_prompts} held-out "
        f"prompts x {config.eval_samples} samples.\n\n{table}\n")
    (run_dir / "summary.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "pairs": pair_stats, "results": results}, indent=1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, records in results.items():
        kl = [r["kl"] for r in records]
        left.plot(kl, [r["oracle_reward"] for r in records], marker="o", label=name)
        right.plot([r["step"] for r in records], [r["entropy_per_token"] for r in records],
                   marker="o", label=name)
    left.set(xlabel="KL(pi || pi_ref) (nats / sequence)", ylabel="oracle reward",
             title="reward vs KL (cf. thesis Fig. 2.2)")
    right.set(xlabel="step", ylabel="entropy (nats / token)", title="generation entropy")
    left.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "reward_vs_kl.png", dpi=100)
    plt.close(fig)
    return table


def main(argv: Sequence[str] | None = None) -> str:
    config = parse_config(Config, argv, prog="python -m experiments.fdpo_sentiment")
    # every objective is built (and its hyper-parameters checked) before any work starts
    objectives = {name: fdpo_objective(config, name) for name in config.divergences}
    lora_config(config)  # the LoRA flags too: refused before any work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    initialize_distributed()
    mesh = make_mesh(config.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for field in ("batch_size", "sft_batch_size"):
        if getattr(config, field) % shards:
            raise ValueError(f"{field}={getattr(config, field)} is not divisible by the "
                             f"data x fsdp mesh size {shards} (mesh {dict(mesh.shape)})")
    tokenizer = default_tokenizer() if config.tokenizer == "default" else _hub_tokenizer(config)
    rng = np.random.default_rng(config.seed)
    if config.model == "tiny":
        model = create(tiny_config("llama", vocab_size=len(tokenizer),
                                   bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id),
                       rngs=nnx.Rngs(config.seed), mesh=mesh)
    else:
        model = from_pretrained(config.model, mesh=mesh)
    graphdef, params, rest = split_model(model)
    if config.sft_steps:
        params = sft_reference(config, tokenizer, mesh, params, graphdef, rest)
    positive_ids = positive_token_ids(tokenizer)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, load_prompts(config, rng))
    train_ids, train_mask = prompt_ids[:config.num_prompts], prompt_mask[:config.num_prompts]
    eval_ids, eval_mask = prompt_ids[config.num_prompts:], prompt_mask[config.num_prompts:]
    pairs, pair_stats = make_pairs(config, graphdef, params, rest, tokenizer, train_ids,
                                   train_mask, positive_ids)
    log.info("pairs: %s", pair_stats)
    evaluate = make_evaluator(config, graphdef, rest, params, tokenizer, eval_ids, eval_mask,
                              positive_ids)
    results = {name: train_divergence(config, name, objective, graphdef, rest, params, pairs,
                                      evaluate) for name, objective in objectives.items()}
    table = write_report(config, results, pair_stats)
    print(table)
    return table


def _hub_tokenizer(config: Config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


if __name__ == "__main__":
    main(sys.argv[1:])
