"""Training with LoRA: only the adapters are trained and have optimizer state, the reference of a
DPO-family objective is the same model with its adapters off, reward models and ensembles,
checkpoints (adapters + optimizer state only) and export (merged HF weights + PEFT adapter).

Steps run under `sgd_recording_gradients`, so each test checks the gradient the real step
computed against `jax.grad` of the objective written out by hand on the untouched base model
(tolerance derived from float32 in tests/tiny_training.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from tiny_training import GRADIENT_RTOL, relative_errors, sgd_recording_gradients

from alignax.data import PreferenceDataset, TokenizedExample, TruncationReport
from alignax.models import RewardEnsemble, create, create_reward_model, tiny_config
from alignax.models.lora import LoRAConfig, add_lora
from alignax.objectives import DPO, BradleyTerry, bradley_terry_loss
from alignax.training.checkpoint import ADAPTER_DIR, Checkpointer, export_hf
from alignax.training.mesh import global_batch, make_mesh
from alignax.training.state import (OptimizerConfig, create_train_state, has_adapters,
                                    make_optimizer, split_model)
from alignax.training.step import StepConfig, make_train_step, role_logprobs

VOCAB, BATCH, LENGTH, PROMPT, BETA = 64, 4, 16, 6, 0.5
CONFIG = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, pad_token_id=0)
MESH = make_mesh((1, 1, 1), devices=jax.devices()[:1])
LR = 1e-2
ROLES = ("chosen", "rejected")
STEP_CONFIG = StepConfig(chunk_size=32, vocab_chunk_size=32)


def randomize_adapters(model, seed: int, scale: float = 0.3):
    """Every A and B ~ N(0, scale^2 / fan_in): B != 0, so policy and reference differ."""
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[-2])
              for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(
        index=i, prompt_ids=rng.integers(1, VOCAB, PROMPT).astype(np.int32),
        responses={r: (rng.integers(1, VOCAB, rng.integers(4, LENGTH - PROMPT + 1))
                       .astype(np.int32),) for r in ROLES}, rewards={}, bin=None)
        for i in range(BATCH)]
    dataset = PreferenceDataset(examples, format="standard", report=TruncationReport(),
                                pad_token_id=0, buckets=(LENGTH,), prompt_buckets=(PROMPT,),
                                group_sizes=None)
    return next(dataset.batches(batch_size=BATCH, seed=0))


BATCH_ = batch()


def logps(model, *, adapters=True):
    return role_logprobs(model, BATCH_, ROLES, chunk_size=32, vocab_chunk_size=32,
                         adapters=adapters)


@pytest.fixture(scope="module")
def lora_policy():
    """(bf16 base model without adapters, the same base with random rank-4 adapters)."""
    base = create(CONFIG, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    adapted = nnx.clone(base)
    add_lora(adapted, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "o", "down")),
             rngs=nnx.Rngs(1))
    return base, randomize_adapters(adapted, seed=2)


def test_dpo_trains_only_the_adapters_against_the_base_model(lora_policy):
    base, adapted = lora_policy
    graphdef, params, rest = split_model(adapted)
    assert has_adapters(params) and not has_adapters(rest)
    flat = nnx.to_flat_state(params)
    assert flat and all(p[-1] in ("lora_a", "lora_b") and v.dtype == jnp.float32
                        for p, v in flat)
    assert all(v.dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(rest) if v.ndim > 1)
    optimizer = sgd_recording_gradients(LR)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0),
                                          mesh=MESH)
    step = make_train_step(graphdef, DPO(beta=BETA), optimizer, optax.constant_schedule(LR),
                           mesh=MESH, state_shardings=shardings, model_state=rest,
                           config=STEP_CONFIG, reference="base")
    assert not step.needs_reference_params
    # the reference: the adapted model with adapters off gives the untouched base, bit for bit
    reference = jax.jit(lambda: logps(base))()
    switched_off = jax.jit(lambda: logps(adapted, adapters=False))()
    for role in ROLES:
        np.testing.assert_array_equal(switched_off[role], reference[role])
    assert all(np.abs(jax.jit(lambda: logps(adapted))()[r] - reference[r]).min() > 1e-3
               for r in ROLES)  # the adapters are on in the policy

    def expected_loss(params):  # DPO (thesis eq. 2.2) against the base model's log-probs
        policy = logps(nnx.merge(graphdef, params, rest))
        margin = (policy["chosen"] - reference["chosen"]) - (policy["rejected"]
                                                              - reference["rejected"])
        return jnp.mean(-jax.nn.log_sigmoid(BETA * margin))

    loss, grads = jax.jit(jax.value_and_grad(expected_loss))(params)
    state, metrics = step(state, global_batch(BATCH_, MESH))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2 ** 4 * 1.2e-7)
    errors = relative_errors(state.opt_state, grads)  # the step's gradient, adapters only
    assert max(errors.values()) <= GRADIENT_RTOL, errors
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="reference='base'"):
        make_train_step(graphdef, DPO(beta=BETA), optimizer, optax.constant_schedule(LR),
                        mesh=MESH, state_shardings=shardings, model_state=rest)
    plain_graphdef, plain_params, plain_rest = split_model(base)
    _, plain_shardings = create_train_state(plain_params, optimizer, key=jax.random.PRNGKey(0),
                                            mesh=MESH)
    with pytest.raises(ValueError, match="parameters hold none"):
        make_train_step(plain_graphdef, DPO(beta=BETA), optimizer, optax.constant_schedule(LR),
                        mesh=MESH, state_shardings=plain_shardings, model_state=plain_rest,
                        reference="base")


def test_adamw_moments_are_float32_adapters_and_checkpoints_hold_only_them(lora_policy,
                                                                           tmp_path):
    _, adapted = lora_policy
    graphdef, params, rest = split_model(adapted)
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=LR, total_steps=10))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0),
                                          mesh=MESH)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(params))  # mu and nu of each adapter
    assert all(x.dtype == jnp.float32 for x in moments)
    step = make_train_step(graphdef, DPO(beta=BETA), optimizer, schedule, mesh=MESH,
                           state_shardings=shardings, model_state=rest, config=STEP_CONFIG,
                           reference="base")
    frozen = jax.tree.map(np.asarray, rest)
    state, metrics = step(state, global_batch(BATCH_, MESH))
    assert metrics["update_applied"] == 1 and max(relative_errors(state.params, params)
                                                  .values()) > 0
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen),
                                                    jax.tree.leaves(step.model_state)))
    checkpointer = Checkpointer(tmp_path / "ckpt", config={"run": 1}, save_every=1,
                                async_save=False)
    checkpointer.save(1, state, force=True)
    saved = sum(x.size for x in jax.tree.leaves(state))
    base_size = sum(x.size for x in jax.tree.leaves(rest))
    assert saved < base_size  # adapters, moments, step and key: no base weight
    template = jax.tree.map(jnp.zeros_like, state)
    restored, _, at = checkpointer.restore_latest(template)
    assert at == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_export_writes_merged_hf_weights_and_a_peft_adapter(tmp_path):
    model = create(CONFIG, rngs=nnx.Rngs(3))  # float32 base: parity with PyTorch
    base_dir = tmp_path / "base"
    graphdef, params, rest = split_model(model)
    export_hf(graphdef, params, base_dir, model_state=rest)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up",
                                                          "down")), rngs=nnx.Rngs(4))
    model = randomize_adapters(model, seed=5)
    graphdef, params, rest = split_model(model)
    export_hf(graphdef, params, tmp_path / "run", model_state=rest)
    ids, mask = BATCH_["chosen_input_ids"], BATCH_["chosen_attention_mask"]
    ours = np.asarray(jax.jit(lambda: model(ids, mask))())
    real = mask.astype(bool)
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run")
        got = merged(torch.as_tensor(ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask)).logits.numpy()
        np.testing.assert_allclose(got[real], ours[real], rtol=0, atol=2e-5)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "run" / ADAPTER_DIR)
        got = with_adapter(torch.as_tensor(ids, dtype=torch.long),
                           attention_mask=torch.as_tensor(mask)).logits.numpy()
        np.testing.assert_allclose(got[real], ours[real], rtol=0, atol=2e-5)


@pytest.mark.parametrize("members", [None, 3])
def test_reward_models_and_ensembles_train_with_the_seeds_lora(members):
    """Bradley-Terry on a reward model (or an ensemble of 3) with rank-64, alpha-128 adapters
    on q, v and the score head: the step's gradient is that of the loss on the model's own
    scores, and only the adapters have one."""
    if members is None:
        model = create_reward_model(CONFIG, rngs=nnx.Rngs(6))
    else:
        model = RewardEnsemble.create(CONFIG, num_members=members, rngs=nnx.Rngs(6))
    add_lora(model, LoRAConfig(rank=64, alpha=128, targets=("q", "v", "score")),
             rngs=nnx.Rngs(7))
    model = randomize_adapters(model, seed=8, scale=0.1)
    graphdef, params, rest = split_model(model)
    assert all(p[-1] in ("lora_a", "lora_b") for p, _ in nnx.to_flat_state(params))
    optimizer = sgd_recording_gradients(LR)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0),
                                          mesh=MESH)
    step = make_train_step(graphdef, BradleyTerry(), optimizer, optax.constant_schedule(LR),
                           mesh=MESH, state_shardings=shardings, model_state=rest)

    def expected_loss(params, rest):  # the frozen state an argument, as in the step
        model = nnx.merge(graphdef, params, rest)
        chosen, rejected = (model(BATCH_[f"{r}_input_ids"], BATCH_[f"{r}_attention_mask"])
                            for r in ROLES)  # [B] or [M, B]
        return jnp.mean(bradley_terry_loss(chosen, rejected))

    loss, grads = jax.jit(jax.value_and_grad(expected_loss))(params, rest)
    state, metrics = step(state, global_batch(BATCH_, MESH))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2 ** 4 * 1.2e-7)
    errors = relative_errors(state.opt_state, grads)
    assert max(errors.values()) <= GRADIENT_RTOL, errors


# ------------------------------------------------------------------ PPO with LoRA


def ppo_trainer(remat=None):
    """A PPO(reward) trainer on a LoRA policy (q, v, down) whose critic is a value head."""
    from test_rl_lm import CONFIG as LM, PPO as PPO_CONFIG, letter_a_reward

    from alignax.rl import ActorCritic, FunctionReward, PPOTrainer, ValueHead
    import dataclasses

    policy = create(LM, rngs=nnx.Rngs(0))
    add_lora(policy, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "down")), rngs=nnx.Rngs(1))
    policy = randomize_adapters(policy, seed=2, scale=0.1)
    config = dataclasses.replace(PPO_CONFIG, epochs=1, minibatches=1, remat=remat)
    model = ActorCritic(policy, ValueHead.zeros(LM.hidden_size))
    return PPOTrainer(model, FunctionReward(letter_a_reward), config=config, mesh=MESH,
                      optimizer=(sgd_recording_gradients(LR), optax.constant_schedule(LR)))


def test_ppo_trains_lora_adapters_and_the_value_head_against_the_base_model():
    from test_rl_lm import CONFIG as LM, PROMPT_IDS, PROMPT_MASK

    from alignax.rl.rollout import reference_logprobs

    trainer = ppo_trainer()
    assert trainer.reference_params is None  # no copy of the weights
    state = trainer.init_state(jax.random.PRNGKey(0))
    paths = [p for p, _ in nnx.to_flat_state(state.train.params)]
    assert {p[-1] for p in paths} == {"lora_a", "lora_b", "kernel"}
    assert [p for p in paths if p[-1] == "kernel"] == [("critic", "kernel")]  # the value head
    ids, mask = PROMPT_IDS[:8], PROMPT_MASK[:8]
    batch = trainer.rollout(state, ids, mask)
    base = create(LM, rngs=nnx.Rngs(0))  # the untouched base model
    blocks = dict(temperature=1.0, chunk_size=64, vocab_chunk_size=256)
    expected = jax.jit(lambda b: reference_logprobs(base, b, **blocks))(batch)
    real = np.asarray(batch["response_mask"])
    np.testing.assert_allclose(np.asarray(batch["ref_logps"])[real], np.asarray(expected)[real],
                               rtol=0, atol=8 * 1.2e-7 * np.abs(expected).max())
    assert np.abs(np.asarray(batch["old_logps"] - batch["ref_logps"])[real]).max() > 1e-3
    updated, metrics = trainer.update(state, batch)
    assert metrics["update_applied"] == 1.0 and np.isfinite(metrics["loss"])
    # per-layer remat: the same gradient as without (one minibatch; SGD records it)
    remat = ppo_trainer(remat="full")
    again, _ = remat.update(remat.init_state(jax.random.PRNGKey(0)), batch)
    errors = relative_errors(again.train.opt_state, updated.train.opt_state)
    assert max(errors.values()) <= GRADIENT_RTOL, errors
