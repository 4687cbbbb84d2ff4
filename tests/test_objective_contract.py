"""The objective contract: one registry of validated configs, what each objective needs from the
model and the data (refused before compilation, with the fix named), the batch check on entry
to the step, schedules evaluated inside the step, and the frozen model state as a jit argument.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_training import sgd_recording_gradients

from alignax.data import TokenizedExample, prepare_dataset
from alignax.data.batching import collate
from alignax.models import create, create_reward_model, tiny_config
from alignax.objectives import (DPO, FDPO, IPO, MDPO, MIPO, OBJECTIVES, SFT, BradleyTerry,
                                CausalDPO, CausalReward, Distill, Objective, PessimisticDistill,
                                PessimisticDPO, get_objective, objective_from_config,
                                objective_to_config, pessimistic_dpo_loss, register)
from alignax.schedules import Constant, Cosine, Linear, pessimism_schedule
from alignax.training.compatibility import check_batch, check_compatible
from alignax.training.mesh import global_batch, make_mesh
from alignax.training.state import create_train_state, split_model
from alignax.training.step import StepConfig, make_train_step, role_logprobs

VOCAB = 64
CONFIG = tiny_config("llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
MESH = make_mesh((1, 1, 1), devices=jax.devices()[:1])
STEP = StepConfig(chunk_size=16, vocab_chunk_size=16)

# one instance of every registered objective, with its required hyper-parameters
EXAMPLES = {"sft": SFT(), "fdpo": FDPO(divergence="jsd"), "dpo": DPO(beta=0.2), "ipo": IPO(),
            "mdpo": MDPO(), "mipo": MIPO(unbiased=False),
            "causal_dpo": CausalDPO(lam=1.0, num_bins=3, bandwidth=(0.5, 2.0)),
            "bradley_terry": BradleyTerry(margin=-0.5),
            "causal_reward": CausalReward(lam=0.5, num_bins=2, reduction="mean"),
            "distill": Distill(divergence="alpha", alpha=0.5),
            "pessimistic_distill": PessimisticDistill(gamma=pessimism_schedule(100)),
            "pessimistic_dpo": PessimisticDPO(gamma=0.1, nll_weight=Cosine(0.0, 1.0, 10))}


# ------------------------------------------------------------------ registry and validation

def test_the_registry_holds_every_objective_once():
    assert set(EXAMPLES) == {n for n, c in OBJECTIVES.items() if c.__module__.startswith("alignax.")}
    for name, objective in EXAMPLES.items():
        assert type(objective).name == name and isinstance(objective, Objective)
        config = objective_to_config(objective)
        assert config["name"] == name
        assert objective_from_config(config) == objective  # serialisable, schedules included
    with pytest.raises(ValueError, match="already registered"):
        register("dpo")(DPO)
    with pytest.raises(ValueError, match=r"unknown objective 'nope'; known: \['bradley_terry'"):
        get_objective("nope")
    with pytest.raises(ValueError, match="ipo has no hyper-parameter 'beta'; its hyper-parameters "
                                         r"are \['tau', 'length_normalized', 'nll_weight'\]"):
        get_objective("ipo", beta=0.1)
    with pytest.raises(ValueError, match="needs a 'name'"):
        objective_from_config({"beta": 0.1})
    # an optax callable is fine for a library user, but has no serialisable form
    with pytest.raises(TypeError, match="cannot serialise the schedule"):
        objective_to_config(DPO(beta=optax.linear_schedule(0.1, 0.2, 10)))
    assert DPO(beta=0.2).divergence == "reverse_kl"
    with pytest.raises(TypeError):
        DPO(beta=0.2, divergence="jsd")  # "dpo" is reverse KL, fixed
    with pytest.raises(TypeError):
        FDPO(0.1)  # hyper-parameters are keyword-only


@pytest.mark.parametrize("build,message", [
    (lambda: DPO(beta=0.0), "dpo: beta must be > 0, got 0.0"),
    (lambda: FDPO(beta=-1.0), "fdpo: beta must be > 0"),
    (lambda: FDPO(beta=math.nan), "beta must be > 0, got nan"),
    (lambda: IPO(tau=-1.0), "ipo: tau must be > 0, got -1.0"),
    (lambda: MIPO(tau=0.0), "mipo: tau must be > 0"),
    (lambda: CausalDPO(lam=-1.0, num_bins=2), "causal_dpo: lam must be >= 0, got -1.0"),
    (lambda: CausalDPO(lam=1.0, num_bins=1), "num_bins must be an int >= 2"),
    (lambda: CausalReward(lam=1.0, num_bins=2, bandwidth=0.0), "bandwidth must be 'median'"),
    (lambda: CausalReward(lam=1.0, num_bins=2, bandwidth="mean"), "bandwidth must be 'median'"),
    (lambda: CausalReward(lam=1.0, num_bins=2, reduction="max"), "reduction must be one of"),
    (lambda: PessimisticDPO(gamma=-0.1), "pessimistic_dpo: gamma must be >= 0"),
    (lambda: PessimisticDistill(gamma=Linear(-1.0, 1.0, transition_steps=5)),
     r"gamma must be >= 0, got -1.0 \(schedule Linear"),
    (lambda: DPO(beta=lambda step: -0.1 + 0.0 * step), "at step 0"),
    (lambda: DPO(nll_weight=-1.0), "nll_weight must be >= 0"),
    (lambda: BradleyTerry(margin=math.inf), "margin must be finite"),
    (lambda: FDPO(divergence="jsdd"), "fdpo: unknown divergence 'jsdd'"),
    (lambda: FDPO(divergence="total_variation"), "Theorem 1"),
    (lambda: MDPO(divergence="alpha"), "needs alpha in"),
    (lambda: Distill(divergence="alpha", alpha=1.5), "alpha must be in"),
    (lambda: Distill(alpha=0.5), "takes no alpha"),
])
def test_hyper_parameters_are_validated_when_the_config_is_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_wrong_types_are_refused():
    with pytest.raises(TypeError, match="beta must be a number or a schedule"):
        DPO(beta="0.1")
    with pytest.raises(TypeError, match="length_normalized must be a bool"):
        IPO(length_normalized=1)
    with pytest.raises(TypeError, match="conditional must be a bool"):
        CausalDPO(lam=1.0, num_bins=2, conditional="yes")
    with pytest.raises(TypeError):
        PessimisticDPO()  # gamma has no default: without it p-DPO would silently be DPO
    with pytest.raises(TypeError):
        CausalDPO(lam=1.0)  # num_bins depends on the data


# ------------------------------------------------------------------ objective vs model

@pytest.fixture(scope="module")
def lm():
    return split_model(create(CONFIG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def reward_model():
    return split_model(create_reward_model(CONFIG, rngs=nnx.Rngs(0)))


def _make_step(model, objective, **kwargs):
    graphdef, params, rest = model
    optimizer = sgd_recording_gradients(0.0)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=MESH)
    step = make_train_step(graphdef, objective, optimizer, optax.constant_schedule(0.0),
                           mesh=MESH, state_shardings=shardings, model_state=rest,
                           **{"config": STEP, **kwargs})
    return step, state


def test_objective_and_model_kind_must_match(lm, reward_model):
    """bradley_terry on a CausalLM used to slice the vocabulary axis as if it were the batch."""
    with pytest.raises(ValueError, match="bradley_terry trains a reward model on its scalar "
                                         "scores, but the model is a causal LM"):
        _make_step(lm, BradleyTerry())
    with pytest.raises(ValueError, match="causal_reward trains a reward model"):
        check_compatible(CausalReward(lam=1.0, num_bins=2), model=lm[0])
    with pytest.raises(ValueError, match="dpo trains a causal LM policy on its response "
                                         "log-probs, but the model is a reward model"):
        _make_step(reward_model, DPO())
    check_compatible(DPO(), model=type(nnx.merge(*lm)))  # classes and instances work too
    check_compatible(BradleyTerry(), model=nnx.merge(*reward_model))
    with pytest.raises(TypeError, match="cannot train"):
        check_compatible(DPO(), model=nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="registered objective config"):
        check_compatible({"name": "dpo"}, model=lm[0])


# ------------------------------------------------------------------ objective vs data

PAIRS = [{"prompt": f"Question {i}?", "chosen": " Yes indeed.", "rejected": " No."}
         for i in range(4)]
GROUPS = [{"prompt": f"Question {i}?", "chosen": [" Yes.", " Sure."], "rejected": [" No."]}
          for i in range(4)]
UNLABELED = [{"prompt": f"Question {i}?", "response_1": " Yes.", "response_2": " No."}
             for i in range(4)]


def _rewards(records, values):
    return [{**r, "target_rewards_1": v, "target_rewards_2": v} for r, v in zip(records, values)]


@pytest.fixture(scope="module")
def datasets():
    return {
        "pairs": prepare_dataset(PAIRS, max_length=32),
        "binned": prepare_dataset([{**r, "length_bin": i % 3} for i, r in enumerate(PAIRS)],
                                  max_length=32, bin_column="length_bin"),
        "groups": prepare_dataset(GROUPS, max_length=32),
        "unlabeled": prepare_dataset(UNLABELED, max_length=32),
        "labeled": prepare_dataset(_rewards(UNLABELED, [0.5, 1.0, -1.0, 0.0]), max_length=32),
        "ensemble": prepare_dataset(_rewards(UNLABELED, [[0.5, 1.0, 0.2]] * 4), max_length=32),
    }


@pytest.mark.parametrize("objective,data,message", [
    (MIPO(), "pairs", re.escape("mipo needs grouped data: records with lists of chosen/rejected "
                                "responses (format 'grouped'); this dataset is 'standard'")),
    (MDPO(), "unlabeled", "mdpo needs grouped data"),
    (DPO(), "groups", "dpo needs preference pairs: one chosen and one rejected response per "
                      "record .*; this dataset is 'grouped'.* use mdpo or mipo for groups"),
    (IPO(), "unlabeled", r"ipo needs preference pairs.*this dataset is 'unlabeled', with "
                         r"response roles \['response_1', 'response_2'\]"),
    (Distill(), "pairs", "distill needs unlabeled pairs"),
    (Distill(), "unlabeled", "distill needs the target rewards 'target_rewards_1' / "
                             "'target_rewards_2'.* label the pairs first"),
    (Distill(), "ensemble", r"^distill takes one target reward per response \(\[B\]\); "
                            r"'target_rewards_1' holds an ensemble of E = 3.* use "
                            r"pessimistic_distill"),
    (CausalDPO(lam=1.0, num_bins=3), "pairs", "causal_dpo needs the bin of a spurious attribute "
                                              "per record .*this dataset is 'standard', with "
                                              "neither: .* bin_column= or bin_fn="),
    (CausalDPO(lam=1.0, num_bins=2), "binned", r"the data has bin 2, but num_bins = 2"),
    (SFT(), "unlabeled", "sft needs chosen responses"),
])
def test_objective_and_data_must_match(datasets, objective, data, message):
    with pytest.raises(ValueError, match=message):
        check_compatible(objective, data=datasets[data])


@pytest.mark.parametrize("objective,data", [
    (DPO(), "pairs"), (SFT(), "pairs"), (SFT(), "groups"), (MIPO(), "groups"),
    (CausalDPO(lam=1.0, num_bins=3), "binned"), (BradleyTerry(), "pairs"),
    (Distill(), "labeled"), (PessimisticDistill(gamma=0.1), "labeled"),
    (PessimisticDistill(gamma=0.1), "ensemble")])
def test_matching_objective_and_data_pass(datasets, objective, data):
    check_compatible(objective, data=datasets[data])
    check_compatible(objective, data=datasets[data].collate(datasets[data].examples))


# ------------------------------------------------------------------ the batch, on entry

def _pairs_batch(size=8, ensemble=None):
    rng = np.random.default_rng(0)
    roles = ("response_1", "response_2") if ensemble else ("chosen", "rejected")
    examples = [TokenizedExample(
        index=i, prompt_ids=rng.integers(1, VOCAB, 3).astype(np.int32),
        responses={r: (rng.integers(1, VOCAB, 4).astype(np.int32),) for r in roles},
        rewards={r: tuple(rng.normal(size=ensemble)) for r in roles} if ensemble else {},
        bin=i % 2) for i in range(size)]
    return collate(examples, buckets=(8,), prompt_buckets=(4,), pad_token_id=0)


def _columns(batch):
    return {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_check_batch_names_the_offending_column():
    batch = _pairs_batch()
    assert set(check_batch(DPO(), _columns(batch))) == {
        f"{r}_{c}" for r in ("chosen", "rejected")
        for c in ("input_ids", "attention_mask", "loss_mask")}
    bad = {**batch, "chosen_input_ids": batch["chosen_input_ids"].astype(np.float32)}
    with pytest.raises(ValueError, match="column 'chosen_input_ids' must have an integer dtype, "
                                         "got float32"):
        check_batch(DPO(), _columns(bad))
    bad = {**batch, "rejected_loss_mask": batch["rejected_loss_mask"][:7]}
    with pytest.raises(ValueError, match="column 'rejected_loss_mask' has leading size 7, but "
                                         "the batch size B is 8"):
        check_batch(DPO(), _columns(bad))
    bad = {**batch, "chosen_attention_mask": batch["chosen_attention_mask"][:, :5]}
    with pytest.raises(ValueError, match=r"'chosen_attention_mask' \(attention mask\) has shape "
                                         r"\(8, 5\), expected \(8, 8\)"):
        check_batch(DPO(), _columns(bad))
    with pytest.raises(ValueError, match="'chosen_reference_logps'.* is missing"):
        check_batch(DPO(), _columns(batch), cached_reference=True)
    check_batch(SFT(), _columns(batch), cached_reference=True)  # SFT reads no reference
    # the old [E, B] layout of ensemble rewards is refused by name
    ensemble = _pairs_batch(ensemble=3)
    assert ensemble["target_rewards_1"].shape == (8, 3)  # [B, E]: the batch axis first
    check_batch(PessimisticDistill(gamma=0.1), _columns(ensemble))
    old = {**ensemble, **{k: ensemble[k].T for k in ("target_rewards_1", "target_rewards_2")}}
    with pytest.raises(ValueError, match="column 'target_rewards_1' has leading size 3, but the "
                                         "batch size B is 8"):
        check_batch(PessimisticDistill(gamma=0.1), _columns(old))


def test_the_step_checks_batch_and_reference_before_compiling(lm, reward_model):
    step, state = _make_step(lm, DPO(), config=dataclasses.replace(STEP, grad_accum_steps=3))
    batch = _pairs_batch()
    with pytest.raises(ValueError, match="batch size 8 is not a multiple of grad_accum_steps 3"):
        step(state, batch, state.params)
    step, state = _make_step(lm, DPO())
    with pytest.raises(ValueError, match="dpo needs the reference's log-probs: pass the frozen "
                                         "reference parameters"):
        step(state, batch)
    with pytest.raises(ValueError, match="dpo: the column 'chosen_loss_mask'"):
        step(state, {k: v for k, v in batch.items() if k != "chosen_loss_mask"}, state.params)
    sft, sft_state = _make_step(lm, SFT())
    with pytest.raises(ValueError, match="sft uses no reference: pass reference_params=None"):
        sft(sft_state, batch, sft_state.params)
    mesh = make_mesh((8, 1, 1))
    graphdef, params, rest = split_model(create(CONFIG, rngs=nnx.Rngs(0), mesh=mesh))
    optimizer = sgd_recording_gradients(0.0)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    step = make_train_step(graphdef, SFT(), optimizer, optax.constant_schedule(0.0), mesh=mesh,
                           state_shardings=shardings, model_state=rest, config=STEP)
    with pytest.raises(ValueError, match=r"batch size 4 is not a multiple of the 8 batch shards"):
        step(state, _pairs_batch(size=4))


# ------------------------------------------------------------------ schedules in the step

def test_gamma_anneals_inside_the_step(lm):
    """p-DPO with the §4.1 linear gamma schedule (and beta an optax callable): the step's loss
    at step t is the pure loss at gamma(t), beta(t); parameters held fixed (lr 0)."""
    graphdef, params, rest = lm
    gamma = pessimism_schedule(4, init_value=0.0, end_value=0.5)
    beta = optax.linear_schedule(0.5, 0.1, 4)
    step, state = _make_step(lm, PessimisticDPO(gamma=gamma, beta=beta))
    reference = split_model(create(CONFIG, rngs=nnx.Rngs(1)))[1]  # h != 0: the KL term counts
    batch = _pairs_batch()
    model = nnx.merge(graphdef, params, rest)
    policy = role_logprobs(model, batch, ("chosen", "rejected"), chunk_size=16,
                           vocab_chunk_size=16)
    ref = role_logprobs(nnx.merge(graphdef, reference, rest), batch, ("chosen", "rejected"),
                        chunk_size=16, vocab_chunk_size=16)
    h_w, h_l = policy["chosen"] - ref["chosen"], policy["rejected"] - ref["rejected"]
    losses = []
    for t in range(6):
        state, metrics = step(state, global_batch(batch, MESH), reference)
        want = jnp.mean(pessimistic_dpo_loss(h_w, h_l, beta=beta(t), gamma=gamma(t)))
        np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
        np.testing.assert_allclose(metrics["hyper/gamma"], gamma(t), rtol=1e-6)
        np.testing.assert_allclose(metrics["hyper/beta"], beta(t), rtol=1e-6)
        losses.append(float(metrics["loss"]))
    assert len(set(losses[:5])) == 5 and losses[4] == losses[5]  # anneals, then holds
    assert "hyper/nll_weight" not in metrics  # constants are not reported


def test_schedule_dataclasses_are_checked_over_their_range():
    assert Linear(1.0, 0.0, transition_steps=3).bounds() == (0.0, 1.0)
    FDPO(beta=Linear(1.0, 0.1, transition_steps=10))
    with pytest.raises(ValueError, match=r"beta must be > 0, got 0.0 \(schedule Cosine"):
        FDPO(beta=Cosine(1.0, 0.0, decay_steps=10))  # decays to 0
    DPO(beta=Constant(0.3), nll_weight=Constant(0.0))


# ------------------------------------------------------------------ frozen model state

def test_frozen_model_state_is_a_jit_argument():
    """Parameters split off into the model state (here the embedding: a LoRA run's frozen base
    weights go the same way) are an argument of the compiled step, not constants baked into
    it: new values change the result without a retrace, and they get no gradient."""
    model = create(CONFIG, rngs=nnx.Rngs(0))
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed_tokens")))
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    assert jax.tree.leaves(frozen) and "embed_tokens" not in str(jax.tree_util.tree_structure(
        params))
    optimizer = sgd_recording_gradients(0.0)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=MESH)
    step = make_train_step(graphdef, SFT(), optimizer, optax.constant_schedule(0.0), mesh=MESH,
                           state_shardings=shardings, model_state=frozen, config=STEP,
                           max_traces=1)
    batch = _pairs_batch()
    state, first = step(state, batch)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(params)  # no embedding grad
    other = jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), frozen)  # other token embeddings
    state, second = step.jitted(state, step.check_batch(batch), None, other)  # no retrace
    assert abs(float(second["loss"]) - float(first["loss"])) > 1e-2
    step.model_state = other
    _, third = step(state, batch)
    assert float(third["loss"]) == float(second["loss"])
