"""Objectives on typed scores, the train step, reference caching and the loop, on a tiny Llama
(one device).

Every step variant is built once per module (`step_for`) on fixed shapes [B=8, T=16]. Steps
run under `sgd_recording_gradients`, so two variants are compared on the gradient each step
computed (tolerance derived from float32 in tests/tiny_training.py), never on Adam-updated
parameters.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_training import GRADIENT_RTOL, relative_errors, sgd_recording_gradients

from alignax.data import PreferenceDataset, TokenizedExample, TruncationReport
from alignax.data import default_tokenizer
from alignax.models import create, tiny_config
from alignax.models.reward import create_reward_model
from alignax.objectives import (DPO, FDPO, IPO, MDPO, MIPO, SFT, BradleyTerry, CausalDPO,
                                CausalReward, Distill, ObjectiveInputs, PessimisticDistill,
                                PessimisticDPO, Scores, bradley_terry_loss, causal_dpo_loss,
                                causal_reward_loss, distill_loss, fdpo_loss, ipo_loss,
                                pessimistic_distill_loss, pessimistic_dpo_loss)
from alignax.objectives.multisample import mdpo_loss, mipo_loss
from alignax.training.checkpoint import Checkpointer
from alignax.training.loop import MetricsLogger, NonFiniteLossError, plot_metrics, train
from alignax.training.mesh import global_batch, make_mesh
from alignax.training.reference import (WithReferenceLogps, cached_reference_logps,
                                        compute_reference_logps, tokenizer_hash)
from alignax.training.state import (OptimizerConfig, create_train_state, make_schedule,
                                    split_model)
from alignax.training.step import StepConfig, make_train_step

VOCAB, BATCH, LENGTH, PROMPT = 64, 8, 16, 6
CONFIG = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1)
MESH = make_mesh((1, 1, 1), devices=jax.devices()[:1])
MODEL = split_model(create(CONFIG, rngs=nnx.Rngs(0)))
LEARNING_RATE = 1e-2
OPTIMIZER = (sgd_recording_gradients(LEARNING_RATE), optax.constant_schedule(LEARNING_RATE))


def examples(n: int = 24, seed: int = 0) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    return [TokenizedExample(index=i, prompt_ids=rng.integers(1, VOCAB, PROMPT).astype(np.int32),
                             responses={r: (rng.integers(1, VOCAB, rng.integers(4, LENGTH - PROMPT + 1))
                                            .astype(np.int32),) for r in ("chosen", "rejected")},
                             rewards={}, bin=None) for i in range(n)]


DATASET = PreferenceDataset(examples(), format="standard", report=TruncationReport(),
                            pad_token_id=0, buckets=(LENGTH,), prompt_buckets=(PROMPT,),
                            group_sizes=None)


def first_batch(**kwargs) -> dict[str, np.ndarray]:
    return next(DATASET.batches(batch_size=BATCH, seed=0, **kwargs))


def fresh_state():
    return create_train_state(MODEL[1], OPTIMIZER[0], key=jax.random.PRNGKey(0), mesh=MESH)


@functools.cache
def step_for(reference: str = "model", **step_config):
    graphdef, _, rest = MODEL
    _, shardings = fresh_state()
    return make_train_step(graphdef, DPO(beta=0.5), *OPTIMIZER, mesh=MESH,
                           state_shardings=shardings, model_state=rest,
                           config=StepConfig(chunk_size=32, vocab_chunk_size=32, **step_config),
                           reference=reference)


def one_step(batch, reference_params="same", **step_config):
    """(state, metrics) after one DPO step from the initial parameters; state.opt_state holds
    the step's gradient."""
    state, _ = fresh_state()
    reference = jax.tree.map(jnp.copy, MODEL[1]) if reference_params == "same" else reference_params
    reference_mode = "cached" if reference_params is None else "model"
    state, metrics = step_for(reference_mode, **step_config)(state, global_batch(batch, MESH),
                                                             reference)
    return jax.device_get(state), jax.device_get(metrics)


def assert_same_gradient(state, expected_state, rtol=GRADIENT_RTOL):
    errors = relative_errors(state.opt_state, expected_state.opt_state)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"gradient of {worst} off by {errors[worst]:.2e}"


@pytest.fixture(scope="module")
def baseline():
    return one_step(first_batch())


# ------------------------------------------------------------------ objectives on typed scores

def inputs(policy, reference=None, columns=None, counts=None, group_masks=None, step=0):
    """ObjectiveInputs from per-role log-probs (as the step builds them)."""
    scores = {}
    for role, p in policy.items():
        p = jnp.asarray(p, jnp.float32)
        r = None if reference is None else jnp.asarray(reference[role], jnp.float32)
        scores[role] = Scores(policy=p, reference=r, h=None if r is None else p - r,
                              num_tokens=jnp.asarray((counts or {}).get(role, np.ones(p.shape)),
                                                     jnp.float32),
                              group_mask=(group_masks or {}).get(role))
    return ObjectiveInputs(scores, dict(columns or {}), jnp.int32(step))


@pytest.mark.parametrize("divergence,alpha", [("reverse_kl", None), ("forward_kl", None),
                                              ("jsd", None), ("alpha", 0.3)])
def test_fdpo_objective_is_fdpo_loss_of_log_ratios(divergence, alpha):
    rng = np.random.default_rng(1)
    policy = {r: rng.normal(-20, 3, 5) for r in ("chosen", "rejected")}
    reference = {r: rng.normal(-20, 3, 5) for r in ("chosen", "rejected")}
    objective = FDPO(beta=0.2, divergence=divergence, alpha=alpha)
    loss, metrics = jax.jit(objective)(inputs(policy, reference))
    h_w = jnp.float32(policy["chosen"]) - jnp.float32(reference["chosen"])
    h_l = jnp.float32(policy["rejected"]) - jnp.float32(reference["rejected"])
    np.testing.assert_allclose(loss, fdpo_loss(h_w, h_l, beta=0.2, divergence=divergence,
                                               alpha=alpha), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], np.mean(0.2 * (h_w - h_l)), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracies"], np.mean(h_w > h_l))


def test_ipo_sft_and_nll_objectives():
    policy = {"chosen": [-6.0, -3.0], "rejected": [-5.0, -4.0]}
    reference = {"chosen": [-5.0, -5.0], "rejected": [-5.0, -5.0]}
    counts = {"chosen": np.array([3.0, 2.0]), "rejected": np.array([4.0, 1.0])}
    x = inputs(policy, reference, counts=counts)
    h_w, h_l = jnp.array([-1.0, 2.0]), jnp.array([0.0, 1.0])
    np.testing.assert_allclose(IPO(tau=0.25)(x)[0], ipo_loss(h_w, h_l, tau=0.25))
    # TRL's IPO: each log-ratio divided by its completion's token count
    np.testing.assert_allclose(IPO(tau=0.25, length_normalized=True)(x)[0],
                               ipo_loss(h_w / counts["chosen"], h_l / counts["rejected"],
                                        tau=0.25), rtol=1e-6)
    assert SFT.needs.roles == ("chosen",) and not SFT.needs.reference
    np.testing.assert_allclose(SFT()(inputs({"chosen": policy["chosen"]}, counts=counts))[0],
                               [2.0, 1.5])
    loss, metrics = DPO(beta=1.0, nll_weight=0.5)(x)
    plain = fdpo_loss(h_w, h_l, beta=1.0)
    np.testing.assert_allclose(loss, plain + 0.5 * np.array([2.0, 1.5]), rtol=1e-6)
    np.testing.assert_allclose(metrics["nll"], 1.75)
    assert "nll" not in DPO(beta=1.0)(x)[1]


def _h(rng, *shape):
    return rng.normal(0, 2, shape).astype(np.float32)


def test_group_causal_and_distillation_objectives_call_their_losses():
    rng = np.random.default_rng(2)
    hw, hl = _h(rng, 4, 3), _h(rng, 4, 2)
    masks = {"chosen": np.array([[1, 1, 0]] * 4, bool), "rejected": np.ones((4, 2), bool)}
    zeros = {"chosen": np.zeros((4, 3)), "rejected": np.zeros((4, 2))}
    x = inputs({"chosen": hw, "rejected": hl}, zeros, group_masks=masks)
    np.testing.assert_allclose(MDPO(beta=0.3)(x)[0], mdpo_loss(
        hw, hl, beta=0.3, chosen_mask=masks["chosen"], rejected_mask=masks["rejected"]),
        rtol=1e-6)
    loss, metrics = MIPO(tau=0.2)(x)
    np.testing.assert_allclose(loss, mipo_loss(hw, hl, tau=0.2, chosen_mask=masks["chosen"],
                                               rejected_mask=masks["rejected"]), rtol=1e-6)
    assert "mipo/mean_variance_correction" in metrics
    nll_x = inputs({"chosen": hw, "rejected": hl}, zeros, group_masks=masks,
                   counts={"chosen": np.full((4, 3), 2.0), "rejected": np.ones((4, 2))})
    loss, metrics = MDPO(beta=0.3, nll_weight=1.0)(nll_x)
    group_nll = np.sum(np.where(masks["chosen"], -hw / 2.0, 0.0), axis=1) / 2.0  # 2 members
    np.testing.assert_allclose(loss - MDPO(beta=0.3)(nll_x)[0], group_nll, rtol=1e-5)

    hw, hl = _h(rng, 8), _h(rng, 8)
    pair = ({"chosen": hw, "rejected": hl}, {"chosen": np.zeros(8), "rejected": np.zeros(8)})
    bins, per_response = np.array([0, 1] * 4), np.array([1, 1, 0, 0] * 2)
    causal = CausalDPO(beta=0.3, lam=2.0, num_bins=2, bandwidth=1.0)
    np.testing.assert_allclose(causal(inputs(*pair, columns={"bin": bins}))[0], causal_dpo_loss(
        hw, hl, bins, bins, beta=0.3, lam=2.0, num_bins=2, bandwidth=1.0), rtol=1e-6)
    # per-response bins are read when present, the per-record "bin" otherwise
    both = inputs(*pair, columns={"bin": bins, "chosen_bin": per_response})
    np.testing.assert_allclose(causal(both)[0], causal_dpo_loss(
        hw, hl, per_response, bins, beta=0.3, lam=2.0, num_bins=2, bandwidth=1.0), rtol=1e-6)
    only = inputs(*pair, columns={"chosen_bin": per_response, "rejected_bin": bins})
    np.testing.assert_allclose(causal(only)[0], causal_dpo_loss(
        hw, hl, per_response, bins, beta=0.3, lam=2.0, num_bins=2, bandwidth=1.0), rtol=1e-6)
    np.testing.assert_allclose(PessimisticDPO(beta=0.3, gamma=0.5)(inputs(*pair))[0],
                               pessimistic_dpo_loss(hw, hl, beta=0.3, gamma=0.5), rtol=1e-6)

    r1, r2 = _h(rng, 8, 3), _h(rng, 8, 3)  # the batch layout: [B, E]
    unlabeled = ({"response_1": hw, "response_2": hl},
                 {"response_1": np.zeros(8), "response_2": np.zeros(8)})
    assert Distill.needs.roles == ("response_1", "response_2")
    loss, _ = Distill(beta=0.3)(inputs(*unlabeled, columns={"target_rewards_1": r1[:, 0],
                                                            "target_rewards_2": r2[:, 0]}))
    np.testing.assert_allclose(loss, distill_loss(hw, hl, r1[:, 0], r2[:, 0], beta=0.3),
                               rtol=1e-6)
    loss, metrics = PessimisticDistill(beta=0.3, gamma=0.1)(
        inputs(*unlabeled, columns={"target_rewards_1": r1, "target_rewards_2": r2}))
    expected, aux = pessimistic_distill_loss(hw, hl, r1.T, r2.T, beta=0.3, gamma=0.1)  # [E, B]
    np.testing.assert_allclose(loss, np.full(8, expected), rtol=1e-6)  # batch scalar, spread
    assert metrics["pessimistic/argmin_member"] == aux["member"]

    rewards = ({"chosen": hw, "rejected": hl}, None)
    loss, _ = CausalReward(lam=0.5, num_bins=2, bandwidth=2.0, margin=0.1)(
        inputs(*rewards, columns={"bin": bins}))
    np.testing.assert_allclose(loss, causal_reward_loss(hw, hl, bins, bins, lam=0.5, num_bins=2,
                                                        bandwidth=2.0, margin=0.1,
                                                        conditional=True), rtol=1e-6)
    # a reward model with E heads ([B, E] scores): each head's loss, averaged
    heads_w, heads_l = _h(rng, 8, 3), _h(rng, 8, 3)
    loss, _ = BradleyTerry()(inputs({"chosen": heads_w, "rejected": heads_l}))
    np.testing.assert_allclose(loss, np.mean(bradley_terry_loss(heads_w, heads_l), axis=1),
                               rtol=1e-6)
    loss, _ = CausalReward(lam=0.5, num_bins=2, bandwidth=2.0)(
        inputs({"chosen": heads_w, "rejected": heads_l}, columns={"bin": bins}))
    per_head = [causal_reward_loss(heads_w[:, e], heads_l[:, e], bins, bins, lam=0.5,
                                   num_bins=2, bandwidth=2.0) for e in range(3)]
    np.testing.assert_allclose(loss, np.mean(per_head, axis=0), rtol=1e-5)


def test_schedules():
    warm = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear", warmup_steps=2,
                                         total_steps=6))
    np.testing.assert_allclose([warm(s) for s in range(7)], [0, 0.5, 1, 0.75, 0.5, 0.25, 0],
                               atol=1e-6)
    cosine = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="cosine", total_steps=4))
    np.testing.assert_allclose([cosine(0), cosine(2), cosine(4)], [1, 0.5, 0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule(OptimizerConfig(schedule="step"))


# ------------------------------------------------------------------ the step

def test_step_metrics_and_update(baseline):
    state, metrics = baseline
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm",
                 "update_norm", "lr", "num_tokens", "fdpo/f_prime_margin"):
        assert np.isfinite(metrics[name]), name
    np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-6)  # policy == reference
    assert metrics["grad_norm"] > 0 and metrics["update_applied"] == 1
    np.testing.assert_allclose(metrics["update_norm"], LEARNING_RATE * metrics["grad_norm"],
                               rtol=1e-6)  # plain SGD
    batch = first_batch()
    assert metrics["num_tokens"] == batch["chosen_attention_mask"].sum() + batch[
        "rejected_attention_mask"].sum()
    assert int(state.step) == 1 and max(relative_errors(state.params, MODEL[1]).values()) > 1e-6
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_grad_accumulation_matches_full_batch(baseline):
    state, metrics = one_step(first_batch(), grad_accum_steps=2)
    assert abs(metrics["loss"] - baseline[1]["loss"]) <= GRADIENT_RTOL * baseline[1]["loss"]
    assert_same_gradient(state, baseline[0])


def test_remat_gives_the_same_update(baseline):
    state, metrics = one_step(first_batch(), remat="dots")
    assert_same_gradient(state, baseline[0])


def test_bf16_compute_keeps_float32_masters(baseline):
    state, metrics = one_step(first_batch(), compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    np.testing.assert_allclose(metrics["loss"], baseline[1]["loss"], rtol=1e-2)
    np.testing.assert_allclose(metrics["logps/chosen"], baseline[1]["logps/chosen"], rtol=2e-2)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_an_overflowing_update_is_not_applied():
    """A learning rate of 1e39 gives a finite loss and gradient but infinite parameters: the
    step keeps the old state (issue: the loop then saved NaN parameters as "good")."""
    graphdef, params, rest = MODEL
    optimizer = optax.adam(1e39)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=MESH)
    step = make_train_step(graphdef, DPO(beta=0.5), optimizer, optax.constant_schedule(1e39),
                           mesh=MESH, state_shardings=shardings, model_state=rest,
                           config=StepConfig(chunk_size=32, vocab_chunk_size=32))
    before = jax.device_get(state)
    state, metrics = step(state, global_batch(first_batch(), MESH), jax.tree.map(jnp.copy, params))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert not np.isfinite(metrics["update_norm"]) and metrics["update_applied"] == 0
    after = jax.device_get(state)
    assert int(after.step) == 0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("heads", [None, 3])
def test_reward_model_training_step(heads):
    """A RewardModel trains on its scores; an E-head model's [E, B] scores reach the objective
    as [B, E] (the batch axis first) and every head gets its own causal penalty."""
    graphdef, params, rest = split_model(create_reward_model(CONFIG, rngs=nnx.Rngs(1),
                                                             num_heads=heads))
    optimizer, schedule = OPTIMIZER
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=MESH)
    objective = BradleyTerry() if heads is None else CausalReward(lam=0.5, num_bins=2,
                                                                  bandwidth=1.0)
    step = make_train_step(graphdef, objective, optimizer, schedule, mesh=MESH,
                           state_shardings=shardings, model_state=rest)
    batch = {**first_batch(), "bin": np.arange(BATCH, dtype=np.int32) % 2}
    model = nnx.merge(graphdef, params, rest)
    chosen = model(batch["chosen_input_ids"], batch["chosen_attention_mask"])  # [B] / [E, B]
    rejected = model(batch["rejected_input_ids"], batch["rejected_attention_mask"])
    state, metrics = step(state, global_batch(batch, MESH), None)
    if heads is None:
        want = np.mean(bradley_terry_loss(chosen, rejected))
    else:
        want = np.mean([causal_reward_loss(chosen[e], rejected[e], batch["bin"], batch["bin"],
                                           lam=0.5, num_bins=2, bandwidth=1.0)
                        for e in range(heads)])
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["scores/chosen"], np.mean(chosen), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 1 and max(relative_errors(state.params, params).values()) > 0


def test_cached_reference_logps_equal_the_frozen_reference(tmp_path, baseline, caplog):
    graphdef, params, rest = MODEL
    table = compute_reference_logps(graphdef, params, DATASET, ("chosen", "rejected"),
                                    batch_size=BATCH, model_state=rest, chunk_size=32,
                                    vocab_chunk_size=32)
    assert table["chosen"].shape == (len(DATASET),) and np.isfinite(table["chosen"]).all()
    batch = next(WithReferenceLogps(DATASET.batches(batch_size=BATCH, seed=0), table))
    state, metrics = one_step(batch, reference_params=None)
    np.testing.assert_allclose(metrics["loss"], baseline[1]["loss"], rtol=1e-6)
    assert_same_gradient(state, baseline[0])

    tokenizer = default_tokenizer()
    kwargs = dict(batch_size=BATCH, model_state=rest, chunk_size=32, vocab_chunk_size=32)
    roles = ("chosen", "rejected")
    with caplog.at_level(logging.INFO, logger="alignax.training.reference"):
        first = cached_reference_logps(tmp_path, graphdef, params, DATASET, tokenizer, roles, **kwargs)
        again = cached_reference_logps(tmp_path, graphdef, params, DATASET, tokenizer, roles, **kwargs)
    assert "cache hit" in caplog.text
    np.testing.assert_array_equal(first["chosen"], again["chosen"])
    np.testing.assert_allclose(first["chosen"], table["chosen"], rtol=1e-6)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # new weights, new data or a new tokenizer -> a new key: the old cache is never used
    cached_reference_logps(tmp_path, graphdef, jax.tree.map(lambda x: x * 1.01, params), DATASET,
                           tokenizer, roles, **kwargs)
    other_data = PreferenceDataset(examples(seed=1), format="standard", report=TruncationReport(),
                                   pad_token_id=0, buckets=(LENGTH,), prompt_buckets=(PROMPT,),
                                   group_sizes=None)
    cached_reference_logps(tmp_path, graphdef, params, other_data, tokenizer, roles, **kwargs)
    assert len(list(tmp_path.glob("*.npz"))) == 3
    tokenizer.add_tokens(["<new>"])
    assert tokenizer_hash(tokenizer) != tokenizer_hash(default_tokenizer())


def test_non_finite_loss_keeps_last_good_state_and_stops_the_loop(tmp_path):
    """Steps 1-2 train; a NaN reference makes step 3's loss NaN: the loop saves step 2 and raises."""
    good = jax.tree.map(jnp.copy, MODEL[1])
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), MODEL[1])

    state, _ = fresh_state()
    step = step_for("model")
    calls = []

    def flaky(state, batch, reference):
        calls.append(1)
        return step(state, batch, nan if len(calls) == 3 else reference)

    batches = DATASET.batches(batch_size=BATCH, seed=0)
    checkpointer = Checkpointer(tmp_path / "ckpt", config={"run": "nan"}, save_every=100)
    logger = MetricsLogger(tmp_path)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(flaky, state, batches, num_steps=5, mesh=MESH, reference_params=good,
              checkpointer=checkpointer, logger=logger, progress=False)
    logger.close()
    restored, data_state, at = checkpointer.restore_latest(fresh_state()[0])
    assert at == 2 and int(restored.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["tokens_per_sec"] > 0
    assert list((tmp_path / "tensorboard").glob("events.*"))
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    # the saved data position is the one before the failed batch: a resume replays batch 3
    batches = DATASET.batches(batch_size=BATCH, seed=0)
    expected = [next(batches) for _ in range(3)][-1]
    resumed = DATASET.batches(batch_size=BATCH, seed=0)
    resumed.set_state(data_state)
    np.testing.assert_array_equal(next(resumed)["record_index"], expected["record_index"])
