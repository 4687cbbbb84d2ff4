"""alignax.models.lora: adapter layout and sharding, the base model as reference, gradients,
dropout, merged and PEFT export / import against HF + peft in PyTorch, reward models."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import alignax.models as am
from alignax.logprobs import chunked_sequence_logprobs, next_token_targets
from alignax.models.lora import LoRAConfig, add_lora, load_adapter, merge, save_adapter
from alignax.training.mesh import make_mesh
from test_models_support import VOCAB, checkpoints, hf_logits, padded_batch  # noqa: F401

ALL = {"llama": ("q", "k", "v", "o", "gate", "up", "down"),
       "gpt2": ("q", "k", "v", "o", "up", "down"), "gpt_neox": ("q", "k", "v", "o", "up", "down")}
CASE_FAMILY = {"llama_gqa": "llama", "gpt2": "gpt2"}


@nnx.jit(static_argnames="adapters")
def logits_fn(model, ids, mask, adapters=True):
    return model(ids, mask, adapters=adapters)


def role_logps(model, ids, mask, adapters=True):
    """[B] summed next-token log-probs of the real tokens, as the trainer scores a role."""
    hidden = model.hidden_states(ids, mask, adapters=adapters)
    targets, target_mask = next_token_targets(ids, mask.astype(bool))
    return chunked_sequence_logprobs(hidden, model.unembedding(), targets, target_mask,
                                     chunk_size=8, vocab_chunk_size=None)


sequence_logps = nnx.jit(role_logps, static_argnames="adapters")


def randomize_adapters(model, seed: int, scale: float = 0.3):
    """Redraws every A and B ~ N(0, scale^2 / fan): non-zero B, so the adapters matter."""
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[-2])
              for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def test_adapters_are_stacked_float32_lora_params_with_peft_init():
    config = am.tiny_config("llama", vocab_size=VOCAB)
    model = am.create(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    ids, mask = padded_batch(seed=2)
    bf16_base = np.asarray(logits_fn(model, ids, mask))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL["llama"]), rngs=nnx.Rngs(1))
    # bf16 base weights with float32 adapters: the reference is still the bf16 base exactly
    adapted = randomize_adapters(model, seed=3)
    np.testing.assert_array_equal(logits_fn(adapted, ids, mask, adapters=False), bf16_base)
    assert np.abs(np.asarray(logits_fn(adapted, ids, mask)) - bf16_base).max() > 1e-2
    _, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(adapters)}
    assert len(flat) == 2 * 7 and all(v.dtype == jnp.float32 for v in flat.values())
    assert all(v.dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(base)
               if v.ndim > 1)  # the base kernels keep their dtype
    q_a = flat["layers.self_attn.q_proj.lora.lora_a"]
    q_b = flat["layers.self_attn.q_proj.lora.lora_b"]
    assert q_a.shape == (2, 64, 4) and q_b.shape == (2, 4, 64)  # [L, in, r], [L, r, out]
    assert q_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    assert q_b.get_metadata()["out_sharding"] == ("layers", None, "heads")
    down_a = flat["layers.mlp.down_proj.lora.lora_a"]
    assert down_a.shape == (2, 172, 4)
    assert down_a.get_metadata()["out_sharding"] == ("layers", "mlp", None)
    # PEFT's init: B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)), drawn independently per layer
    assert not np.asarray(q_b[...]).any()
    a = np.asarray(down_a[...])
    bound = 1 / np.sqrt(172)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform: std = bound / sqrt(3)
    assert not np.allclose(a[0], a[1])


def test_adapters_follow_their_kernels_partition_rules():
    mesh = make_mesh((2, 2, 2))
    model = am.create(am.tiny_config("llama", vocab_size=96), rngs=nnx.Rngs(0), mesh=mesh)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "down")), rngs=nnx.Rngs(1),
             mesh=mesh)
    q, down = model.layers.self_attn.q_proj.lora, model.layers.mlp.down_proj.lora
    assert q.lora_a[...].sharding.spec == P(None, "fsdp", None)  # embed -> fsdp, rank replicated
    assert q.lora_b[...].sharding.spec == P(None, None, "tensor")  # heads -> tensor
    assert down.lora_a[...].sharding.spec == P(None, "tensor", None)  # mlp -> tensor
    assert down.lora_b[...].sharding.spec == P(None, None, "fsdp")


def test_fresh_adapters_change_nothing_and_the_reference_is_the_base_model(checkpoints):
    _, directory, base = checkpoints("llama_gqa")
    ids, mask = padded_batch(seed=3)
    expected = np.asarray(sequence_logps(base, ids, mask))
    model = am.from_pretrained(directory)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL["llama"]), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(sequence_logps(model, ids, mask), expected)  # B = 0
    model = randomize_adapters(model, seed=0)
    policy = np.asarray(sequence_logps(model, ids, mask))
    assert np.abs(policy - expected).min() > 1e-2  # the adapters are active
    # adapters=False: the same parameters and forward code give the base model, bit for bit
    np.testing.assert_array_equal(sequence_logps(model, ids, mask, adapters=False), expected)


def test_gradients_reach_only_the_adapters_and_a_is_still_at_init():
    model = am.create(am.tiny_config("gpt2", vocab_size=VOCAB), rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL["gpt2"]), rngs=nnx.Rngs(1))
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    ids, mask = padded_batch(seed=4)

    def loss(adapters):
        return -jnp.sum(role_logps(nnx.merge(graphdef, adapters, base), ids, mask))

    grads = jax.jit(jax.grad(loss))(adapters)
    flat = {p[-1]: [] for p, _ in nnx.to_flat_state(grads)}
    for path, g in nnx.to_flat_state(grads):
        flat[path[-1]].append(np.asarray(g[...]))
    assert set(flat) == {"lora_a", "lora_b"}  # nothing of the frozen base
    # with B = 0, dL/dA = x^T (dL/dy) B^T vanishes exactly; dL/dB = (xA)^T dL/dy does not
    assert not any(g.any() for g in flat["lora_a"])
    assert all(np.abs(g).max() > 1e-6 for g in flat["lora_b"])


def test_dropout_draws_from_the_key_and_is_off_without_one():
    model = am.create(am.tiny_config("gpt_neox", vocab_size=VOCAB), rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "up"), dropout=0.5),
             rngs=nnx.Rngs(1))
    model = randomize_adapters(model, seed=1)
    ids, mask = padded_batch(seed=5)
    forward = nnx.jit(lambda m, k: m(ids, mask, dropout_key=k))
    plain = np.asarray(logits_fn(model, ids, mask))
    first, again, other = (np.asarray(forward(model, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - plain).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    # the reference never sees the adapters, with or without a dropout key
    reference = nnx.jit(lambda m, k: m(ids, mask, adapters=False, dropout_key=k))
    np.testing.assert_array_equal(reference(model, jax.random.key(0)),
                                  logits_fn(model, ids, mask, adapters=False))


@pytest.fixture(scope="module")
def adapted(checkpoints):
    """case -> (HF torch model, its directory, our model with random adapters on every
    target, our logits on `padded_batch(seed=6)`)."""
    cache = {}

    def get(case):
        if case not in cache:
            hf, directory, _ = checkpoints(case)
            model = am.from_pretrained(directory)
            add_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL[CASE_FAMILY[case]]),
                     rngs=nnx.Rngs(2))
            model = randomize_adapters(model, seed=len(case))
            ids, mask = padded_batch(seed=6)
            cache[case] = hf, directory, model, np.asarray(logits_fn(model, ids, mask))
        return cache[case]

    return get


# GPT-NeoX's export differs from GPT-2's only in `fuse_qkv`, which save_pretrained's HF
# round trip checks (test_models.py); its import is checked below.
@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_peft_loads_our_adapter_onto_the_hf_model(case, adapted, tmp_path):
    hf, _, model, ours = adapted(case)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    with_adapter = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    ids, mask = padded_batch(seed=6)
    real = mask.astype(bool)
    reference = hf_logits(with_adapter, ids, mask)
    assert np.abs(reference - hf_logits(hf, ids, mask))[real].max() > 0.1  # adapters matter
    assert np.abs(reference - ours)[real].max() <= 1e-4


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_merged_weights_load_in_transformers(case, adapted, tmp_path):
    _, _, model, ours = adapted(case)
    with pytest.raises(ValueError, match="has LoRA adapters.*merge"):
        am.save_pretrained(model, tmp_path / "unmerged")
    merged = merge(model)
    assert not nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam))
    assert nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))  # merge returns a copy
    am.save_pretrained(merged, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager").eval()
    ids, mask = padded_batch(seed=6)
    real = mask.astype(bool)
    assert np.abs(hf_logits(hf, ids, mask) - ours)[real].max() <= 1e-4


@pytest.mark.parametrize("case,peft_config", [
    ("llama_gqa", dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                       rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3.0})),
    ("gpt_neox", dict(target_modules=["query_key_value", "dense_4h_to_h"])),
])
def test_a_peft_adapter_imports_onto_our_model(case, peft_config, checkpoints, tmp_path):
    hf, directory, _ = checkpoints(case)
    torch.manual_seed(0)
    with_adapter = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, **peft_config)).eval()
    with torch.no_grad():  # non-zero B (PEFT's default init would make it zero)
        for name, p in with_adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    with_adapter.save_pretrained(tmp_path)
    model = load_adapter(am.from_pretrained(directory), tmp_path)
    if case == "llama_gqa":
        assert model.layers.self_attn.o_proj.lora.lora_a.shape == (2, 64, 2)  # rank_pattern
        assert model.layers.self_attn.o_proj.lora.scale == 1.5  # alpha_pattern / r
        assert model.layers.self_attn.k_proj.lora is None
    else:  # the fused query_key_value adapter becomes q, k and v adapters sharing A
        lora = model.layers.attention
        np.testing.assert_array_equal(lora.q_proj.lora.lora_a[...], lora.v_proj.lora.lora_a[...])
    ids, mask = padded_batch(seed=7)
    real = mask.astype(bool)
    reference = hf_logits(with_adapter, ids, mask)
    assert np.abs(reference - hf_logits(hf, ids, mask))[real].max() > 0.1
    ours = np.asarray(logits_fn(model, ids, mask))
    assert np.abs(reference - ours)[real].max() <= 1e-4
    # and back: our export of the imported adapter gives PEFT the same model
    save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "again").eval()
    assert np.abs(hf_logits(again, ids, mask) - reference)[real].max() <= 1e-4


def test_unsupported_peft_adapters_and_bad_requests_are_refused(adapted, tmp_path):
    hf, directory, model, _ = adapted("llama_gqa")
    save_adapter(model, tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    for key, value, message in [("use_dora", True, "DoRA"), ("use_rslora", True, "use_rslora"),
                                ("modules_to_save", ["lm_head"], "modules_to_save"),
                                ("layers_to_transform", [0], "layers_to_transform")]:
        (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            load_adapter(am.from_pretrained(directory), tmp_path / "ok")
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    extra = "base_model.model.lm_head.lora_A.weight"
    save_file({**tensors, extra: np.ones((4, 64), np.float32)},
              tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"cannot place: \\['{extra}'\\]"):
        load_adapter(am.from_pretrained(directory), tmp_path / "ok")
    one_layer = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    save_file(one_layer, tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"on layers \[0\] only"):
        load_adapter(am.from_pretrained(directory), tmp_path / "ok")
    gpt2 = am.create(am.tiny_config("gpt2", vocab_size=VOCAB), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gpt2 model has no 'gate' projection"):
        add_lora(gpt2, LoRAConfig(rank=2, alpha=2, targets=("gate",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'score' is a reward model's head"):
        add_lora(gpt2, LoRAConfig(rank=2, alpha=2, targets=("score",)), rngs=nnx.Rngs(0))
    add_lora(gpt2, LoRAConfig(rank=2, alpha=2, targets=("q",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already have a LoRA adapter"):
        add_lora(gpt2, LoRAConfig(rank=2, alpha=2, targets=("k", "q")), rngs=nnx.Rngs(0))
    for bad in [dict(rank=0, alpha=1), dict(rank=2, alpha=-1), dict(rank=2, alpha=2, dropout=1.0),
                dict(rank=2, alpha=2, targets=("qkv",))]:
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


def test_reward_ensemble_with_the_seeds_lora_settings(tmp_path):
    config = am.tiny_config("llama", vocab_size=VOCAB, pad_token_id=0)
    ensemble = am.RewardEnsemble.create(config, num_members=3, rngs=nnx.Rngs(5), num_heads=2)
    ids, mask = padded_batch(seed=8)
    score = nnx.jit(lambda m, adapters: m(ids, mask, adapters=adapters), static_argnums=1)
    base = np.asarray(score(ensemble, True))  # [M, E, B]
    add_lora(ensemble, LoRAConfig(rank=64, alpha=128, targets=("q", "v", "score")),
             rngs=nnx.Rngs(6))
    head = ensemble.members.score.lora
    assert head.lora_a.shape == (3, 64, 64) and head.lora_b.shape == (3, 64, 2)  # [M, D, r]
    q = ensemble.members.backbone.layers.self_attn.q_proj.lora.lora_a
    assert q.shape == (3, 2, 64, 64)  # [M, L, D, r]: the member axis in front
    assert q.get_metadata()["out_sharding"] == (None, "layers", "embed", None)
    assert head.scale == 2.0
    ensemble = randomize_adapters(ensemble, seed=2, scale=0.2)
    adapted = np.asarray(score(ensemble, True))
    assert np.abs(adapted - base).min() > 1e-4
    np.testing.assert_array_equal(score(ensemble, False), base)  # the reference
    member = merge(ensemble.member(1))  # a RewardModel, adapters folded in
    am.save_reward_model(member, tmp_path)
    loaded = am.load_reward_model(tmp_path)
    np.testing.assert_allclose(score(loaded, True), adapted[1], rtol=0, atol=1e-5)
