"""Every registered objective through `make_train_step`: sharded and accumulated == one device.

Each objective's gradient (read from `sgd_recording_gradients`' state: the one the real step
computed) and loss on meshes (8, 1, 1), (1, 8, 1), (2, 2, 2), and on (2, 2, 2) with
`grad_accum_steps=2`, must equal a single-device step to `GRADIENT_RTOL` (2^7 float32 eps, see
tests/tiny_training.py). Objectives with a batch-level term (`Needs.batch_level`: the MMD of
the causal objectives, the ensemble min of pd-/e-DPO) are defined per micro-batch, so they are
compared with accumulation off; `test_accumulation_splits_the_batch_axis_not_the_ensemble`
checks what accumulation does to them instead.

Cost: compiling a train step dominates, so the objectives that read the same batch share one
compiled step: `OneAtATime` sums them with weight 1 for objective i at step i and 0 otherwise,
and each objective's gradient comes from a call with `state.step = i` (the same program, the
same batch, the same initial parameters). That is 3 programs per mesh (causal LM on pairs and
unlabeled pairs, causal LM on groups, reward model) instead of 30. The reference is a
differently initialised model, so the log-ratios h are spread out (at h = 0 the MMD terms and
several gradients vanish and would compare nothing).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_training import GRADIENT_RTOL, relative_errors, sgd_recording_gradients

from alignax.data import TokenizedExample
from alignax.data.batching import collate
from alignax.models import create, create_reward_model, state_shardings, tiny_config
from alignax.models.lora import LoRAConfig, add_lora
from alignax.objectives import (DPO, FDPO, IPO, MDPO, MIPO, OBJECTIVES, SFT, BradleyTerry,
                                CausalDPO, CausalReward, Distill, Needs, Objective,
                                PessimisticDistill, PessimisticDPO)
from alignax.objectives.registry import ObjectiveInputs
from alignax.training.mesh import global_batch, make_mesh
from alignax.training.state import create_train_state, split_model
from alignax.training.step import StepConfig, make_train_step

VOCAB, BATCH, PROMPT, RESPONSE = 32, 8, 4, 8
CONFIG = tiny_config("llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
STEP = StepConfig(chunk_size=16, vocab_chunk_size=16)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]
ACCUMULATED = (2, 2, 2)  # grad_accum_steps=2 on this mesh: 4 rows per micro-batch, 1 per shard


def _nll(objective: Objective) -> Objective:
    return dataclasses.replace(objective, nll_weight=0.3)


PAIR = [DPO(beta=0.5), FDPO(beta=0.5, divergence="forward_kl"), FDPO(beta=0.5, divergence="jsd"),
        FDPO(beta=0.5, divergence="alpha", alpha=0.3), IPO(tau=0.5),
        IPO(tau=0.5, length_normalized=True), PessimisticDPO(beta=0.5, gamma=0.2),
        CausalDPO(beta=0.5, lam=2.0, num_bins=2), CausalDPO(beta=0.5, lam=2.0, num_bins=2,
                                                            conditional=True), SFT()]
ENSEMBLES = {"lm": 5, "groups": 3}  # the batches' target rewards are [B, E]: E = 5 and E = 3


def first_reward(columns):
    """One target reward model: member 0 of the ensemble's [B, E] rewards -> [B]."""
    return {**columns, **{k: columns[k][:, 0] for k in ("target_rewards_1", "target_rewards_2")}}


KINDS = {  # kind -> [(objective, view of the side columns or None)]
    # a causal LM on batches with pairs (chosen/rejected) AND unlabeled pairs (response_1/2)
    "lm": [(o, None) for o in PAIR] + [(_nll(o), None) for o in PAIR if hasattr(o, "nll_weight")]
    + [(Distill(beta=0.5), first_reward),  # d-DPO
       (PessimisticDistill(beta=0.5, gamma=0.2), first_reward),  # pd-DPO, E = 1
       (PessimisticDistill(beta=0.5, gamma=0.2), None)],  # e-DPO, E = 5
    # a causal LM on batches with groups AND unlabeled pairs with E = 3 target rewards
    "groups": [(o, None) for o in (MDPO(beta=0.5), MIPO(tau=0.5), _nll(MDPO(beta=0.5)),
                                   _nll(MIPO(tau=0.5)), PessimisticDistill(beta=0.5, gamma=0.2))],
    "reward": [(o, None) for o in (BradleyTerry(margin=0.1), CausalReward(lam=2.0, num_bins=2),
                                   CausalReward(lam=2.0, num_bins=2, conditional=False))],
}


@dataclasses.dataclass(frozen=True)
class OneAtATime(Objective):
    """Test-only (not registered): member i's loss at step i, 0 for every other member.

    Each member sees the scores of its own roles and its view of the side columns."""

    members: tuple[tuple[Objective, object], ...]
    name = "one_at_a_time"

    @property
    def needs(self) -> Needs:
        needs = [m.needs for m, _ in self.members]
        roles = tuple(dict.fromkeys(r for n in needs for r in n.roles))  # union, in order
        grouped = {n.grouped for n in needs}
        return dataclasses.replace(
            needs[0], roles=roles, grouped=grouped.pop() if len(grouped) == 1 else None,
            reference=any(n.reference for n in needs),
            bins=any(n.bins for n in needs), target_rewards=any(n.target_rewards for n in needs),
            ensemble=any(n.ensemble for n in needs), batch_level=any(n.batch_level for n in needs))

    def __call__(self, x: ObjectiveInputs):
        total = 0.0
        for i, (member, view) in enumerate(self.members):
            inputs = x if view is None else dataclasses.replace(x, columns=view(x.columns))
            loss, _ = member(inputs)
            total = total + jnp.where(x.step == i, loss, 0.0)
        return total, {}


def test_every_registered_objective_is_covered():
    covered = {type(m).name for members in KINDS.values() for m, _ in members}
    assert covered == {n for n, cls in OBJECTIVES.items() if cls.__module__.startswith("alignax.")}
    divergences = {m.divergence for m, _ in KINDS["lm"] if isinstance(m, FDPO)}
    assert divergences == {"reverse_kl", "forward_kl", "jsd", "alpha"}


@functools.cache
def batch_for(kind: str) -> dict[str, np.ndarray]:
    """A collated batch of B = 8 random examples (real `collate`): prompts of 2-4 tokens,
    responses of 3-8; "lm": chosen/rejected pairs, unlabeled response_1/response_2 with [B, 5]
    target rewards, per-record bins and per-response bins; "groups": 2-3 chosen and 2-3
    rejected responses padded to K = 3, and unlabeled pairs with [B, 3] target rewards;
    "reward": pairs with per-record bins."""
    rng = np.random.default_rng(list(KINDS).index(kind))
    draw = lambda n: rng.integers(1, VOCAB, n).astype(np.int32)  # noqa: E731
    examples = []
    for i in range(BATCH):
        sizes = {"chosen": 2 + i % 2, "rejected": 3 - i % 2} if kind == "groups" else {
            "chosen": 1, "rejected": 1}
        if kind in ENSEMBLES:
            sizes.update(response_1=1, response_2=1)
        responses = {r: tuple(draw(rng.integers(3, RESPONSE + 1)) for _ in range(k))
                     for r, k in sizes.items()}
        rewards = {r: tuple(rng.normal(0, 1, ENSEMBLES[kind]))
                   for r in ("response_1", "response_2")} if kind in ENSEMBLES else {}
        examples.append(TokenizedExample(index=i, prompt_ids=draw(rng.integers(2, PROMPT + 1)),
                                         responses=responses, rewards=rewards, bin=i % 2))
    collate_kw = dict(buckets=(PROMPT + RESPONSE,), prompt_buckets=(PROMPT,), pad_token_id=0)
    if kind == "groups":  # grouped chosen/rejected [B, K, T] next to unlabeled pairs [B, T]
        split = [{r: ex.responses[r] for r in roles} for ex in examples
                 for roles in (("chosen", "rejected"), ("response_1", "response_2"))]
        grouped = [dataclasses.replace(ex, responses=split[2 * i], rewards={})
                   for i, ex in enumerate(examples)]
        unlabeled = [dataclasses.replace(ex, responses=split[2 * i + 1])
                     for i, ex in enumerate(examples)]
        return {**collate(unlabeled, **collate_kw),
                **collate(grouped, group_sizes={"chosen": 3, "rejected": 3}, **collate_kw)}
    batch = collate(examples, **collate_kw)
    if kind == "lm":  # per-response bins, which the causal objectives prefer to "bin"
        batch["chosen_bin"] = np.array([0, 1] * (BATCH // 2), np.int32)
        batch["rejected_bin"] = np.array([0, 0, 1, 1] * (BATCH // 4), np.int32)
    return batch


@functools.cache
def host_model(model_kind: str):
    """(graphdef, params, model state, reference params) on the host, built once."""
    build = create_reward_model if model_kind == "reward" else create
    graphdef, params, rest = split_model(build(CONFIG, rngs=nnx.Rngs(0)))
    return graphdef, params, rest, split_model(build(CONFIG, rngs=nnx.Rngs(1)))[1]


@functools.cache
def model(model_kind: str, shape: tuple[int, int, int]):
    """The host model laid out on a mesh of `shape` by the partition rules: (mesh, graphdef,
    model state, train state, shardings, reference params, optimizer)."""
    mesh = make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    graphdef, params, rest, reference = host_model(model_kind)
    params = jax.device_put(params, state_shardings(params, mesh))
    optimizer = sgd_recording_gradients(0.5)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    return (mesh, graphdef, rest, state, shardings, jax.device_put(reference, shardings.params),
            optimizer)


@functools.cache
def run(kind: str, shape: tuple[int, int, int], accum: int = 1, rows: tuple[int, ...] | None = None):
    """Per member of `kind`: (loss, gradient) of one step from the same initial state (on the
    batch's `rows` only, if given)."""
    mesh, graphdef, rest, state0, shardings, reference, optimizer = model(
        "reward" if kind == "reward" else "lm", shape)
    objective = OneAtATime(tuple(KINDS[kind]))
    step = make_train_step(graphdef, objective, optimizer, optax.constant_schedule(0.5),
                           mesh=mesh, state_shardings=shardings, model_state=rest,
                           config=dataclasses.replace(STEP, grad_accum_steps=accum))
    batch = batch_for(kind)
    if rows is not None:
        batch = {k: v[np.asarray(rows)] for k, v in batch.items()}
    batch = global_batch(batch, mesh)
    results = []
    for i, (member, _) in enumerate(KINDS[kind]):
        state = jax.tree.map(jnp.copy, state0)  # the step donates its state
        state = dataclasses.replace(state, step=jax.device_put(jnp.int32(i), shardings.step))
        state, metrics = step(state, batch, reference if objective.needs.reference else None)
        assert metrics["update_applied"] == 1, (kind, member)
        results.append((float(metrics["loss"]), jax.device_get(state.opt_state)))
    return results


CASES = [(kind, shape, 1) for kind in KINDS for shape in MESHES] + [
    (kind, ACCUMULATED, 2) for kind in KINDS]


@pytest.mark.parametrize("kind,shape,accum", CASES,
                         ids=[f"{k}-{'x'.join(map(str, s))}{'-accum2' if a > 1 else ''}"
                              for k, s, a in CASES])
def test_sharded_step_matches_one_device(kind, shape, accum):
    """Losses are O(1) sums that may cancel (BT ~ 0.7 plus a negative unbiased MMD), so they
    are compared to GRADIENT_RTOL of max(|loss|, 1); gradients per leaf, relatively."""
    expected = run(kind, (1, 1, 1))
    got = run(kind, shape, accum)
    compared = 0
    for (member, _), (loss, grads), (want_loss, want_grads) in zip(KINDS[kind], got, expected):
        if accum > 1 and member.needs.batch_level:
            continue  # defined per micro-batch: test_accumulation_splits_the_batch_axis_...
        assert abs(loss - want_loss) <= GRADIENT_RTOL * max(abs(want_loss), 1.0), (
            member, loss, want_loss)
        errors = relative_errors(grads, want_grads)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= GRADIENT_RTOL, f"{member}: {worst} off by {errors[worst]:.2e}"
        assert max(np.abs(x).max() for x in jax.tree.leaves(want_grads)) > 0  # not all zero
        compared += 1
    assert compared > 0


@pytest.mark.parametrize("kind", ["lm", "groups"])
def test_accumulation_splits_the_batch_axis_not_the_ensemble(kind):
    """With grad_accum_steps=2 micro-batch j holds rows j, 2 + j, ... of every column, the
    [B, E] target rewards included (their ensemble axis is never split), and the batch-level
    terms (MMD, ensemble min) are taken per micro-batch: the update is the mean of the two
    micro-batches' own steps."""
    accumulated = run(kind, ACCUMULATED, 2)
    halves = [run(kind, (1, 1, 1), 1, rows=tuple(range(j, BATCH, 2))) for j in range(2)]
    checked = []
    for i, (member, _) in enumerate(KINDS[kind]):
        if not member.needs.batch_level:
            continue  # compared with the full batch in test_sharded_step_matches_one_device
        (loss, grads), first, second = accumulated[i], halves[0][i], halves[1][i]
        want_loss = (first[0] + second[0]) / 2
        assert abs(loss - want_loss) <= GRADIENT_RTOL * max(abs(want_loss), 1.0), member
        mean = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + b) / 2, first[1], second[1])
        errors = relative_errors(grads, mean)
        assert max(errors.values()) <= GRADIENT_RTOL, (member, max(errors.values()))
        checked.append(type(member).name)
    # lm: Causal DPO (2 variants, each with and without NLL), pd-DPO (E = 1), e-DPO (E = 5);
    # groups: e-DPO (E = 3)
    assert checked == {"lm": ["causal_dpo"] * 4 + ["pessimistic_distill"] * 2,
                       "groups": ["pessimistic_distill"]}[kind], checked


@functools.cache
def lora_run(shape: tuple[int, int, int]):
    """(loss, gradient) of one DPO step of a LoRA model (adapters on q, v, down with B != 0,
    placed on the mesh by their kernels' partition rules; the reference is the base model,
    adapters off) on a mesh of `shape`."""
    mesh = make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    model = create(CONFIG, rngs=nnx.Rngs(0), mesh=mesh)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "down")), rngs=nnx.Rngs(1),
             mesh=mesh)
    graphdef, params, rest = split_model(model)
    params = jax.tree.map(  # B = 0 would zero the gradient of A: redraw B, same on every mesh
        lambda x: jax.device_put(np.random.default_rng(x.size).normal(
            0, 0.3 / np.sqrt(x.shape[-2]), x.shape).astype(np.float32), x.sharding), params)
    optimizer = sgd_recording_gradients(0.5)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    step = make_train_step(graphdef, DPO(beta=0.5), optimizer, optax.constant_schedule(0.5),
                           mesh=mesh, state_shardings=shardings, model_state=rest, config=STEP,
                           reference="base")
    state, metrics = step(state, global_batch(batch_for("lm"), mesh))
    assert metrics["update_applied"] == 1
    return float(metrics["loss"]), jax.device_get(state.opt_state)


def test_sharded_lora_step_matches_one_device():
    (loss, grads), (want_loss, want_grads) = lora_run((2, 2, 2)), lora_run((1, 1, 1))
    assert abs(loss - want_loss) <= GRADIENT_RTOL * max(abs(want_loss), 1.0)
    errors = relative_errors(grads, want_grads)
    assert max(errors.values()) <= GRADIENT_RTOL, errors
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(want_grads))  # A and B both move
