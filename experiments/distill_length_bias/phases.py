"""The study's phases: SFT, the D_rho groups, the reward ensemble, the policy runs.

    sft_phase      pi_SFT with `alignax.trainer.train` (SFT on generator responses), resumable
    build_groups   per (seed, rho): D_rho, its subsets D_{rho,b}, the prepared datasets
    reward_phase   all groups' r_rho and r_{rho,b} as ONE RewardEnsemble (`rewards`), then the
                   target rewards of every group's pairs and the probe-set diagnostics
    policy_phase   every (method, hyper-parameter, group) run from pi_SFT, evaluated by the
                   oracle at `eval_points`; one record per run in results.jsonl

Resuming: the SFT run and the reward ensemble restore their checkpoints; the target rewards
are saved once computed (rewards/scores.npz); a policy run whose record is in results.jsonl is
skipped (a policy run is short and restarts from pi_SFT when it was killed before its record).

The policy runs use the training library's step (`alignax.training.make_train_step`) directly:
one step per (method, hyper-parameter) is built once and shared by every rho and seed, with the
reference log-probs computed once per dataset by one jitted forward (`dataset_logps`) and read
from the batch (`reference="cached"`). An `alignax.trainer.train` call per run rebuilds and
re-lowers the step, re-jits the state initialisation, hashes the records and writes a
checkpoint: several seconds per run, more than the run's own 64 updates.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.data import prepare_dataset
from alignax.models import create, tiny_config
from alignax.objectives import SFT
from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig
from alignax.trainer import train as trainer_train
from alignax.training import (MetricsLogger, OptimizerConfig, TrainState, WithReferenceLogps,
                              create_train_state, make_mesh, make_optimizer, make_train_step,
                              train)
from alignax.training.step import role_logprobs
from experiments.distill_length_bias import rewards as reward_models
from experiments.distill_length_bias.data import (Pairs, ensemble_subsets, make_pool,
                                                  pool_statistics, sample_d_rho)
from experiments.distill_length_bias.policies import (DISTILLED, Evaluator, best_members,
                                                      hyper_name, make_objective)
from experiments.distill_length_bias.world import World, generate_responses

log = logging.getLogger("experiments.distill_length_bias")

PAIR_ROLES = ("chosen", "rejected")
UNLABELED_ROLES = ("response_1", "response_2")


def config_hash(fields: dict) -> str:
    """A short stable hash of a JSON-able dict (which config a record was made under)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- SFT


def sft_phase(config, world: World, tokenizer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """pi_SFT: the embedded Llama at the config's sizes, fine-tuned on `sft_examples` generator
    responses to the train prompts (004 §4.1: SFT on human-written summaries), with
    `alignax.trainer.train` in run_dir/sft (resumed from its checkpoint when one exists).
    Returns (graphdef, params, model_state)."""
    rng = np.random.default_rng([config.world_seed, 7])
    prompts = rng.choice(np.asarray(world.train), config.sft_examples)
    responses = generate_responses(rng, config.sft_examples, max_sentences=config.max_sentences,
                                   useful_probability=config.useful_probability)
    # SFT reads the chosen response only; the standard format needs a "rejected" column
    records = [{"prompt": world.prompts[p], "chosen": r, "rejected": r}
               for p, r in zip(prompts, responses)]
    run_config = RunConfig(
        run_dir=str(pathlib.Path(config.run_dir) / "sft"),
        model=ModelConfig("tiny", seed=config.world_seed),
        data=DataConfig(max_length=config.max_length, max_prompt_length=config.max_prompt_tokens),
        objective=SFT(),
        train=TrainConfig(steps=config.sft_steps, batch_size=config.sft_batch_size,
                          learning_rate=config.sft_learning_rate, lr_schedule="cosine",
                          warmup_steps=min(10, config.sft_steps), share_prompt=False,
                          mesh=config.mesh, seed=config.world_seed,
                          save_every=config.sft_steps, keep_checkpoints=1, export=False,
                          progress=config.progress, compilation_cache=False))
    model = create(tiny_config("llama", vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id,
                               hidden_size=config.hidden_size,
                               intermediate_size=config.intermediate_size,
                               num_hidden_layers=config.num_layers,
                               num_attention_heads=config.num_heads,
                               num_key_value_heads=config.num_kv_heads),
                   rngs=nnx.Rngs(config.world_seed), mesh=make_mesh(config.mesh))
    result = trainer_train(run_config, model=model, data=records, tokenizer=tokenizer)
    return result.graphdef, result.params, result.model_state


# ---------------------------------------------------------------- groups


@dataclasses.dataclass
class Group:
    """One (seed, rho): D_rho, the subsets of its ensemble members, its datasets.

    Attributes:
      seed, rho: the group's seed and length bias.
      pairs: D_rho (longer response wins in pairs [0, k)).
      k: the number of longer-wins pairs.
      subsets: member index sets into D_rho: [all of D_rho, D_{rho,b} for b in biases].
      preference: the standard-format dataset of D_rho (labels by the oracle).
    """

    seed: int
    rho: float
    pairs: Pairs
    k: int
    subsets: list[np.ndarray]
    preference: object

    @property
    def name(self) -> str:
        return f"rho{self.rho:g}_seed{self.seed}"


def prepare(config, records: list[dict], tokenizer):
    """`prepare_dataset` with the study's lengths and one bucket (one compiled shape)."""
    return prepare_dataset(records, tokenizer, max_length=config.max_length,
                           max_prompt_length=config.max_prompt_tokens,
                           buckets=(config.max_length,))


def build_groups(config, world: World, tokenizer) -> tuple[list[Group], dict]:
    """The groups of every (seed, rho), and the pools' statistics per seed.

    One pool of oracle-labelled pairs per seed (size pool_factor x num_pairs); every D_rho of
    that seed is drawn from it, and its subsets from it (seeded by (seed, rho))."""
    groups, stats = [], {}
    for seed in config.seeds:
        rng = np.random.default_rng([seed, 1])
        pool = make_pool(world, tokenizer, rng, size=config.pool_factor * config.num_pairs,
                         max_sentences=config.max_sentences,
                         useful_probability=config.useful_probability)
        stats[seed] = pool_statistics(pool)
        for rho in config.rhos:
            rng = np.random.default_rng([seed, 2, int(round(rho * 1000))])
            pairs, k = sample_d_rho(pool, rho, config.num_pairs, rng)
            subsets = [np.arange(config.num_pairs)] + ensemble_subsets(
                config.num_pairs, k, config.ensemble_biases, rng)
            groups.append(Group(seed, rho, pairs, k, subsets,
                                prepare(config, pairs.preference_records(world), tokenizer)))
    return groups, stats


def probe_pairs(config, world: World, tokenizer) -> Pairs:
    """Unbiased generator pairs on the validation prompts with a longer response: the probe
    set of the reward models' accuracy and length sensitivity."""
    rng = np.random.default_rng([config.world_seed, 3])
    held_out = dataclasses.replace(world, train=world.val)
    pool = make_pool(held_out, tokenizer, rng, size=config.probe_pairs,
                     max_sentences=config.max_sentences,
                     useful_probability=config.useful_probability)
    return pool.take(np.flatnonzero(pool.has_longer))


# ---------------------------------------------------------------- reward models


def _unlabeled_tokens(config, world: World, pairs: Pairs, tokenizer) -> reward_models.PairTokens:
    """Tokens of pairs in the generator's order (response_1 = a, response_2 = b)."""
    zeros = np.zeros(len(pairs))
    dataset = prepare(config, pairs.unlabeled_records(world, zeros, zeros), tokenizer)
    return reward_models.pair_tokens(dataset, *UNLABELED_ROLES)


def reward_phase(config, world: World, groups: list[Group], sft, tokenizer
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Trains the ensemble (all groups' members, `rewards.train_ensemble`) and scores.

    Returns:
      (scores, diagnostics): scores[group.name] = (rewards_a [N, 1 + B], rewards_b [N, 1 + B]),
      the members' rewards of the group's pairs in the generator's order (column 0: r_rho);
      diagnostics[group.name] = per member {"probe_accuracy", "probe_length_corr",
      "train_accuracy"} and the oracle's probe values.
    """
    directory = pathlib.Path(config.run_dir) / "rewards"
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k in REWARD_FIELDS}
    saved = directory / "scores.npz"
    if saved.exists() and (directory / "scores.json").exists():
        meta = json.loads((directory / "scores.json").read_text())
        if meta["config"] == config_hash(fields):
            with np.load(saved) as data:
                return ({g.name: (data[f"{g.name}/a"], data[f"{g.name}/b"]) for g in groups},
                        meta["diagnostics"])
    graphdef, params, rest = sft
    members_per_group = 1 + len(config.ensemble_biases)
    tokens = [reward_models.pair_tokens(g.preference, *PAIR_ROLES) for g in groups]
    stacked = reward_models.PairTokens(*(np.concatenate([getattr(t, f.name) for t in tokens])
                                         for f in dataclasses.fields(reward_models.PairTokens)))
    offsets = np.cumsum([0] + [len(t) for t in tokens])
    subsets = [offsets[i] + s for i, g in enumerate(groups) for s in g.subsets]
    model = nnx.merge(graphdef, params, rest)
    ensemble = reward_models.init_from_policy(model.config, params, num_members=len(subsets),
                                              key=jax.random.PRNGKey(config.world_seed + 11))
    ensemble = reward_models.train_ensemble(
        ensemble, stacked, subsets, steps=config.reward_steps,
        batch_size=config.reward_batch_size, learning_rate=config.reward_learning_rate,
        seed=config.world_seed, run_dir=directory, config=fields,
        save_every=config.reward_save_every)

    # every member scores its group's pairs (generator order) and the probe pairs
    probe = probe_pairs(config, world, tokenizer)
    probe_tokens = _unlabeled_tokens(config, world, probe, tokenizer)
    group_tokens = [_unlabeled_tokens(config, world, g.pairs, tokenizer) for g in groups]
    member_group = np.repeat(np.arange(len(groups)), members_per_group)  # [M]
    width = max(len(t) for t in group_tokens)
    group_scores = reward_models.score_member_rows(
        ensemble, *_member_rows(group_tokens, member_group, width),
        batch_size=config.score_batch_size)  # [M, 2 width]
    probe_scores = reward_models.score_member_rows(
        ensemble, *_member_rows([probe_tokens] * len(groups), member_group, len(probe)),
        batch_size=config.score_batch_size)  # [M, 2 P]
    scores, diagnostics = {}, {}
    for i, g in enumerate(groups):
        cols = slice(i * members_per_group, (i + 1) * members_per_group)
        n = len(g.pairs)
        a, b = group_scores[cols, :n].T, group_scores[cols, width:width + n].T  # [N, 1 + B]
        scores[g.name] = (a, b)
        diagnostics[g.name] = _diagnostics(g, a, b, probe, probe_scores[cols])
    np.savez(saved, **{f"{name}/{side}": value for name, (a, b) in scores.items()
                       for side, value in (("a", a), ("b", b))})
    (directory / "scores.json").write_text(json.dumps(
        {"config": config_hash(fields), "diagnostics": diagnostics}, indent=1))
    return scores, diagnostics


def _member_rows(per_group: list[reward_models.PairTokens], member_group: np.ndarray,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """[M, 2 width, T] ids and masks: member m reads its group's a rows then b rows, each
    block padded to `width` rows (padded rows hold one attended token; their scores are
    dropped)."""
    out = []
    for t in per_group:
        pad = ((0, width - len(t)), (0, 0))
        ids = np.concatenate([np.pad(t.first_ids, pad), np.pad(t.second_ids, pad)])
        mask = np.concatenate([np.pad(t.first_mask, pad), np.pad(t.second_mask, pad)])
        mask[:, 0] = np.maximum(mask[:, 0], 1)
        out.append((ids, mask))
    return (np.stack([out[g][0] for g in member_group]),
            np.stack([out[g][1] for g in member_group]))


def _diagnostics(group: Group, a: np.ndarray, b: np.ndarray, probe: Pairs,
                 probe_scores: np.ndarray) -> dict:
    """A group's members on their training subsets and on the unbiased probe pairs: accuracy
    against the oracle, and the correlation of the reward gap with the token-length gap
    (a, b: [N, 1 + B] scores of D_rho's pairs; probe_scores: [1 + B, 2 P])."""
    count = len(probe)
    gap = probe_scores[:, :count] - probe_scores[:, count:]  # [1 + B, P]
    length_gap = (probe.tokens_a - probe.tokens_b).astype(np.float64)
    oracle_gap = probe.reward_a - probe.reward_b
    return {
        "probe_accuracy": ((gap > 0) == (oracle_gap > 0)[None]).mean(1).tolist(),
        "probe_length_corr": [float(np.corrcoef(row, length_gap)[0, 1]) for row in gap],
        "train_accuracy": [float(((a[s, j] > b[s, j]) == group.pairs.a_wins[s]).mean())
                           for j, s in enumerate(group.subsets)],
        "subset_sizes": [len(s) for s in group.subsets],
        "subset_longer_wins": [float((s < group.k).mean()) for s in group.subsets],
        "oracle_probe_length_corr": float(np.corrcoef(oracle_gap, length_gap)[0, 1])}


REWARD_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "seeds", "rhos", "ensemble_biases", "world_seed", "length_weight",
                 "relevance_scale", "max_sentences", "useful_probability", "max_prompt_tokens",
                 "val_prompts", "test_prompts", "num_pairs", "pool_factor", "max_length",
                 "sft_examples", "sft_steps", "sft_batch_size", "sft_learning_rate",
                 "reward_steps", "reward_batch_size", "reward_learning_rate", "probe_pairs", "mesh")
"""The config fields the reward models depend on (their checkpoints refuse other values)."""


# ---------------------------------------------------------------- policies


def method_dataset(config, world: World, group: Group, method: str, scores, tokenizer):
    """The dataset `method` trains on: D_rho's preference pairs, or its unlabeled pairs with
    r_rho's (d-DPO, pd-DPO: [N]) or the b-members' (e-DPO: [N, B]) target rewards."""
    if method not in DISTILLED:
        return group.preference
    a, b = scores[group.name]
    targets = (a[:, 0], b[:, 0]) if method != "e-dpo" else (a[:, 1:], b[:, 1:])
    return prepare(config, group.pairs.unlabeled_records(world, *targets), tokenizer)


@functools.partial(jax.jit, static_argnames=("graphdef", "roles"))
def _role_logps(graphdef, params, rest, batch, roles):
    """Per-sequence log-probs of each role's responses ([B] each), one jitted forward."""
    model = nnx.merge(graphdef, params, rest)
    return role_logprobs(model, batch, roles, chunk_size=1024, vocab_chunk_size=None)


def dataset_logps(graphdef, params, rest, dataset, roles: tuple[str, ...], *,
                  batch_size: int) -> dict[str, np.ndarray]:
    """log pi(response | prompt) of every example of `dataset` (record order), role -> [N].

    One module-level jitted forward at a fixed [batch_size, T] shape (the last batch is
    filled with copies of its last row, whose values are dropped), so that the reference of
    every dataset and the Figure C.1 analysis of every policy share one compilation."""
    out = {role: np.full(len(dataset), np.nan, np.float32) for role in roles}
    batches = dataset.batches(batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                              drop_remainder=False)
    for batch in batches:
        rows = len(batch["record_index"])
        keep = {f"{r}_{c}": batch[f"{r}_{c}"] for r in roles
                for c in ("input_ids", "attention_mask", "loss_mask")}
        if rows < batch_size:
            keep = {k: np.concatenate([v] + [v[-1:]] * (batch_size - rows))
                    for k, v in keep.items()}
        values = jax.device_get(_role_logps(graphdef, params, rest, keep, roles))
        for role in roles:
            out[role][batch["record_index"]] = np.asarray(values[role])[:rows]
    return out


class PolicyRunner:
    """Runs policies from pi_SFT: one compiled step per (method, value), shared by every group.

    Args:
      config: the study Config.
      sft: (graphdef, params, model_state) of pi_SFT (start and reference of every policy).
      mesh: the training mesh.
    """

    def __init__(self, config, sft, mesh):
        self.config, self.mesh = config, mesh
        self.graphdef, self.params, self.rest = sft
        self.optimizer, self.schedule = make_optimizer(OptimizerConfig(
            learning_rate=config.policy_learning_rate, total_steps=config.policy_steps))
        # one initial state, copied for every run (the step donates the state it is given)
        self.initial, self.shardings = create_train_state(self.params, self.optimizer,
                                                          key=jax.random.PRNGKey(0), mesh=mesh)
        self.steps = {}

    def step(self, method: str, value: float):
        """The compiled step of `method` at `value` (built at its first use)."""
        key = (method, value)
        if key not in self.steps:
            objective = make_objective(method, value, policy_steps=self.config.policy_steps)
            self.steps[key] = make_train_step(
                self.graphdef, objective, self.optimizer, self.schedule, mesh=self.mesh,
                state_shardings=self.shardings, model_state=self.rest, reference="cached")
        return self.steps[key]

    def logps(self, params, dataset, roles) -> dict[str, np.ndarray]:
        return dataset_logps(self.graphdef, params, self.rest, dataset, roles,
                             batch_size=self.config.score_batch_size)

    def run(self, method: str, value: float, seed: int, dataset, *, evaluate, run_dir,
            members: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
        """Trains `method` at `value` on `dataset` from pi_SFT; at each eval point calls
        evaluate(model, point_index) -> dict; with `members` (the e-DPO members' target
        rewards [N, B] of the pairs), adds the Figure C.1 counts of the best-matching member
        over the pairs ("member_counts" [B]). Returns the eval records."""
        config = self.config
        roles = UNLABELED_ROLES if method in DISTILLED else PAIR_ROLES
        reference = self.logps(self.params, dataset, roles)
        state = jax.device_put(TrainState(  # fresh buffers: the step donates its input state
            params=jax.tree.map(jnp.copy, self.initial.params),
            opt_state=jax.tree.map(jnp.copy, self.initial.opt_state),
            step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(seed)), self.shardings)
        batches = WithReferenceLogps(
            dataset.batches(batch_size=config.policy_batch_size, seed=seed), reference)
        logger = MetricsLogger(run_dir, tensorboard=False)
        records = []
        try:
            for index, point in enumerate(eval_points(config)):
                state = train(self.step(method, value), state, batches, num_steps=point,
                              mesh=self.mesh, logger=logger, progress=False,
                              description=f"{method} {hyper_name(method)}={value:g}")
                record = {"step": point,
                          **evaluate(nnx.merge(self.graphdef, state.params, self.rest), index)}
                if members is not None:
                    policy = self.logps(state.params, dataset, roles)
                    h_1, h_2 = (policy[r] - reference[r] for r in roles)
                    best = best_members(h_1, h_2, *members, beta=value)
                    record["member_counts"] = np.bincount(
                        best, minlength=members[0].shape[1]).tolist()
                records.append(record)
        finally:
            logger.close()
        return records


def eval_points(config) -> list[int]:
    """The steps at which every policy is evaluated (validation selection among them)."""
    count = config.eval_points
    return sorted({max(1, round(config.policy_steps * (i + 1) / count)) for i in range(count)})


def sweep(config, method: str) -> tuple[float, ...]:
    """The swept values of `method`'s hyper-parameter (betas, or taus for IPO)."""
    return config.taus if hyper_name(method) == "tau" else config.betas
