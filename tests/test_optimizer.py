"""OptimizerConfig refuses bad hyper-parameters when it is built; AdamW's weight decay skips
biases and normalisation weights and decays kernels and embeddings, exactly as Hugging Face
Trainer (and so TRL) does.

The decay checks take one AdamW update with zero gradients: Adam's step is then exactly 0, so
a decayed parameter becomes p (1 - lr wd) (up to one rounding) and any other stays bitwise p.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignax.models import create, from_pretrained, tiny_config
from alignax.training.checkpoint import flatten_state
from alignax.training.mesh import make_mesh
from alignax.training.state import (OptimizerConfig, create_train_state, make_optimizer,
                                    make_schedule, split_model, weight_decay_mask)

LR, DECAY = 0.1, 0.5
F32_EPS = float(np.finfo(np.float32).eps)

BAD = [
    (dict(learning_rate=math.nan), ValueError, "learning_rate must be finite"),
    (dict(learning_rate=math.inf), ValueError, "learning_rate must be finite"),
    (dict(learning_rate=1e39), ValueError, "learning_rate must be finite .in float32"),
    (dict(learning_rate=-1e-4), ValueError, "learning_rate .* >= 0, got -0.0001"),
    (dict(learning_rate="1e-4"), TypeError, "learning_rate must be a real number"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay .* >= 0, got -0.1"),
    (dict(weight_decay=math.nan), ValueError, "weight_decay must be finite"),
    (dict(warmup_steps=11, total_steps=10), ValueError,
     r"warmup_steps must be in \[0, total_steps=10\], got 11"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be in"),
    (dict(total_steps=0), ValueError, "total_steps must be > 0, got 0"),
    (dict(total_steps=10.0), TypeError, "total_steps must be an int"),
    (dict(b1=1.0), ValueError, r"b1 must be in \[0, 1\), got 1.0"),
    (dict(b1=math.nan), ValueError, r"b1 must be in \[0, 1\)"),
    (dict(b2=-0.1), ValueError, r"b2 must be in \[0, 1\), got -0.1"),
    (dict(eps=0.0), ValueError, "eps must be finite and > 0, got 0.0"),
    (dict(eps=-1e-8), ValueError, "eps must be finite and > 0"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be finite and > 0, or None"),
    (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm must be finite"),
    (dict(schedule="step"), ValueError, "unknown schedule 'step'; use one of"),
    (dict(weight_decay_exclude=("bias", "layernorm")), ValueError,
     r"unknown groups \['layernorm'\]"),
    (dict(weight_decay_exclude="bias"), TypeError, "weight_decay_exclude must be a tuple"),
    (dict(weight_decay_exclude=None), TypeError, "weight_decay_exclude must be a tuple"),
]


@pytest.mark.parametrize("fields,error,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_optimizer_config_is_refused_when_built(fields, error, message):
    field = next(iter(fields))  # the message names the (first) offending field
    with pytest.raises(error, match=f"OptimizerConfig\\.{field}") as raised:
        OptimizerConfig(**fields)
    assert re.search(message, str(raised.value)), raised.value


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_edge_configs_are_accepted_and_give_finite_schedules(schedule):
    config = OptimizerConfig(learning_rate=1.0, schedule=schedule, warmup_steps=4, total_steps=4,
                             max_grad_norm=None, weight_decay_exclude=[])
    values = [float(make_schedule(config)(s)) for s in range(7)]
    assert all(math.isfinite(v) for v in values)
    np.testing.assert_allclose(values[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    assert config.weight_decay_exclude == ()  # a list is stored as a tuple (hashable)
    assert OptimizerConfig(learning_rate=0.0).learning_rate == 0.0


def zero_grad_update(params, config: OptimizerConfig, mesh=None):
    """params after one jitted AdamW update with all-zero gradients."""
    optimizer, _ = make_optimizer(config)
    if mesh is None:
        opt_state = optimizer.init(params)
        update = jax.jit(lambda p, s: optax.apply_updates(
            p, optimizer.update(jax.tree.map(jnp.zeros_like, p), s, p)[0]))
        return update(params, opt_state)
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    update = jax.jit(lambda s: optax.apply_updates(
        s.params, optimizer.update(jax.tree.map(jnp.zeros_like, s.params), s.opt_state,
                                   s.params)[0]), out_shardings=shardings.params)
    return update(state)


def decayed_names(before, after) -> set[str]:
    """Names whose parameters shrank by (1 - lr wd); every other one must be unchanged."""
    decayed = set()
    for (name, old), new in zip(flatten_state(before).items(), flatten_state(after).values()):
        old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
        if np.array_equal(old, new):
            continue
        # one float32 rounding of p - lr wd p
        np.testing.assert_allclose(new, old * (1 - LR * DECAY), rtol=2 * F32_EPS, err_msg=name)
        decayed.add(name)
    return decayed


@pytest.fixture(scope="module")
def gpt2_params():
    """A tiny GPT-2 (biases, LayerNorm scales and biases, kernels, token and position
    embeddings) with every parameter moved away from its init (biases start at 0)."""
    config = tiny_config("gpt2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1)
    graphdef, params, rest = split_model(create(config, rngs=nnx.Rngs(0)))
    return jax.tree.map(lambda x: x + 0.5, params)


def test_biases_and_norm_weights_are_not_decayed_kernels_and_embeddings_are(gpt2_params):
    mesh = make_mesh((1, 2, 2), devices=jax.devices()[:4])  # sharded state, jitted update
    after = zero_grad_update(gpt2_params, OptimizerConfig(learning_rate=LR, weight_decay=DECAY),
                             mesh=mesh)
    decayed = decayed_names(gpt2_params, after)
    names = set(flatten_state(gpt2_params))
    assert {n for n in names if ".bias." in n or ".ln_" in n or n.startswith("ln_f.")} \
        == names - decayed
    assert "h.ln_1.weight.value" not in decayed and "h.mlp.c_fc.bias.value" not in decayed
    assert {"h.attn.q_proj.kernel.value", "h.mlp.c_proj.kernel.value",
            "wte.embedding.value", "wpe.embedding.value"} <= decayed


def test_gradients_carry_the_groups_of_their_parameters():
    """optax.masked takes the mask of the *updates*: gradients of a real forward pass must keep
    the parameters' names and logical axes, or norm weights would be decayed in the step."""
    config = tiny_config("gpt2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1)
    graphdef, params, rest = split_model(create(config, rngs=nnx.Rngs(0)))

    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        ids = jnp.ones((1, 4), jnp.int32)
        return jnp.sum(model.hidden_states(ids, attention_mask=ids))

    grads = jax.jit(jax.grad(loss))(params)
    exclude = OptimizerConfig().weight_decay_exclude
    masks = [weight_decay_mask(tree, exclude) for tree in (params, grads)]
    assert masks[0] == masks[1]
    assert 0 < jax.tree.leaves(masks[0]).count(False) < len(jax.tree.leaves(masks[0]))


def test_decay_groups_are_configurable(gpt2_params):
    names = set(flatten_state(gpt2_params))
    everything = zero_grad_update(gpt2_params, OptimizerConfig(
        learning_rate=LR, weight_decay=DECAY, weight_decay_exclude=()))
    assert decayed_names(gpt2_params, everything) == names
    no_embeddings = zero_grad_update(gpt2_params, OptimizerConfig(
        learning_rate=LR, weight_decay=DECAY,
        weight_decay_exclude=("bias", "norm", "embedding")))
    assert decayed_names(gpt2_params, no_embeddings) == {n for n in names if ".kernel." in n}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_decay_matches_hugging_face_trainer(family, tmp_path):
    """HF Trainer's own parameter groups and torch AdamW on an HF model, against ours on the
    same weights loaded with `from_pretrained`: the same parameters decay, by the same factor."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = tiny_config(family, vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # biases start at 0, where decay is invisible
    model.save_pretrained(tmp_path / "before")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n in decay], "weight_decay": DECAY},
              {"params": [p for n, p in named.items() if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    model.save_pretrained(tmp_path / "after")

    ours = split_model(from_pretrained(tmp_path / "before"))[1]
    updated = zero_grad_update(ours, OptimizerConfig(learning_rate=LR, weight_decay=DECAY,
                                                     max_grad_norm=None))
    expected = split_model(from_pretrained(tmp_path / "after"))[1]
    decayed = decayed_names(ours, expected)
    assert decayed and decayed != set(flatten_state(ours))  # norm weights are not decayed
    assert decayed_names(ours, updated) == decayed
    for (name, a), b in zip(flatten_state(updated).items(), flatten_state(expected).values()):
        # torch multiplies by (1 - lr wd), optax subtracts lr wd p: one rounding each
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2 * F32_EPS, err_msg=name)
