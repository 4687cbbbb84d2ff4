"""alignax.models against Hugging Face PyTorch: logit parity, padding, dtype, sharding, I/O."""

from __future__ import annotations

import json

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import alignax.models as am
from alignax.models.partitioning import logical_to_mesh_spec
from alignax.training.mesh import make_mesh
from test_models_support import CASES, VOCAB, checkpoints, hf_logits, padded_batch  # noqa: F401

FAMILY_OF_CASE = {"llama_gqa": "llama", "llama3_tied_bias": "llama", "mistral_window": "llama",
                  "qwen2": "llama", "llama_sharded": "llama", "gpt2": "gpt2",
                  "gpt_neox": "gpt_neox", "gpt_neox_sequential": "gpt_neox"}


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask), model.hidden_states(ids, mask), model.unembedding()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity_with_hf_and_padding_invariance(case, checkpoints):
    hf, _, model = checkpoints(case)
    assert model.arch.family == FAMILY_OF_CASE[case]
    ids, mask = padded_batch(seed=len(case))
    logits, hidden, unembedding = forward(model, ids, mask)
    real = mask.astype(bool)
    reference = hf_logits(hf, ids, mask)
    assert logits.shape == (4, 11, VOCAB) and logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - reference)[real].max() <= 1e-4
    np.testing.assert_allclose(hidden @ unembedding, logits, atol=1e-5, rtol=1e-6)
    # rows 1 and 2: the same 8 tokens left- and right-padded -> the same per-token logits
    np.testing.assert_allclose(logits[1, 3:], logits[2, :8], atol=1e-5, rtol=1e-6)
    # pad ids are inert, even out of the vocabulary
    junk = np.where(real, ids, VOCAB + 1000).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(forward(model, junk, mask)[0])[real],
                                  np.asarray(logits)[real])


def test_sharded_checkpoint_has_several_files(checkpoints):
    directory = checkpoints("llama_sharded")[1]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (directory / "model.safetensors").exists()


def test_bfloat16_compute_and_params_track_float32(checkpoints):
    _, directory, f32_model = checkpoints("llama_gqa")
    ids, mask = padded_batch(seed=len("llama_gqa"))  # the parity test's batch: no recompile
    real = mask.astype(bool)
    f32 = np.asarray(forward(f32_model, ids, mask)[0])
    model = am.from_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    bf16, hidden, _ = forward(model, ids, mask)
    assert bf16.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); through 2 layers the logits
    # of this O(1)-scale model move by a few percent of their range, never more.
    err = np.abs(np.asarray(bf16) - f32)[real]
    assert err.max() <= 0.05 * np.abs(f32[real]).max()
    assert err.mean() <= 0.01 * np.abs(f32[real]).max()


def test_float32_params_with_bfloat16_compute():
    config = am.tiny_config("gpt2", vocab_size=VOCAB)
    model = nnx.eval_shape(lambda: am.create(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    assert model.h.attn.q_proj.kernel.dtype == jnp.float32
    ids = jnp.zeros((2, 5), jnp.int32)
    hidden = nnx.eval_shape(lambda m: m.hidden_states(ids), model)
    logits = nnx.eval_shape(lambda m: m(ids), model)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
def test_tiny_config_families(family):
    config = am.tiny_config(family, vocab_size=VOCAB)
    model = nnx.eval_shape(lambda: am.create(config, rngs=nnx.Rngs(0)))
    assert model.config is config
    arch = model.arch
    assert (arch.hidden_size, arch.num_layers, arch.num_heads) == (64, 2, 4)
    assert arch.num_kv_heads == (4 if family in ("gpt2", "gpt_neox") else 2)
    if family == "gpt_neox":
        assert arch.rope.rotary_dim == 4 and arch.parallel_residual
    logits = nnx.eval_shape(lambda m: m(jnp.zeros((2, 6), jnp.int32)), model)
    assert logits.shape == (2, 6, VOCAB)
    # equal configs give equal graphdefs, so e.g. policy and reference share compilations
    twin = nnx.eval_shape(lambda: am.create(am.tiny_config(family, vocab_size=VOCAB),
                                            rngs=nnx.Rngs(1)))
    assert nnx.graphdef(twin) == nnx.graphdef(model)


def test_logical_axes_annotate_every_parameter():
    model = nnx.eval_shape(lambda: am.create(am.tiny_config("qwen2", vocab_size=VOCAB),
                                             rngs=nnx.Rngs(0)))
    axes = {".".join(map(str, path)): v.get_metadata()["out_sharding"]
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert axes["embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["lm_head.kernel"] == ("embed", "vocab")
    # per-layer parameters are stacked [L, ...] behind a "layers" axis
    assert axes["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert axes["layers.self_attn.q_proj.bias"] == ("layers", "heads")
    assert axes["layers.self_attn.k_proj.kernel"] == ("layers", "embed", "kv_heads")
    assert axes["layers.self_attn.o_proj.kernel"] == ("layers", "heads", "embed")
    assert axes["layers.mlp.up_proj.kernel"] == ("layers", "embed", "mlp")
    assert axes["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert axes["layers.input_layernorm.weight"] == ("layers", "norm")
    assert axes["norm.weight"] == ("norm",)
    assert model.layers.self_attn.q_proj.kernel.shape == (2, 64, 64)


def test_logical_to_mesh_spec_rules():
    mesh = make_mesh((2, 2, 2))
    assert logical_to_mesh_spec(("embed", "heads"), mesh) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("norm",), mesh) == P(None)
    # a dim the mesh axis does not divide, and a mesh axis used twice, replicate
    assert logical_to_mesh_spec(("vocab", "embed"), mesh, shape=(97, 64)) == P(None, "fsdp")
    assert logical_to_mesh_spec(("heads", "mlp"), mesh) == P("tensor", None)
    # rules may name axes the mesh lacks
    assert logical_to_mesh_spec(("embed",), mesh, rules=(("embed", "expert"),)) == P(None)


def test_create_on_mesh_shards_parameters_and_matches_unsharded():
    mesh = make_mesh((2, 2, 2))
    config = am.tiny_config("llama", vocab_size=96)
    sharded = am.create(config, rngs=nnx.Rngs(1), mesh=mesh)
    plain = am.create(config, rngs=nnx.Rngs(1))
    q = sharded.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")  # the layer axis is replicated
    assert q.addressable_shards[0].data.shape == (2, 32, 32)  # [2, 64, 64] over fsdp, tensor
    assert sharded.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.norm.weight[...].sharding.spec == P(None)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(plain, nnx.Param))):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_from_pretrained_on_mesh(checkpoints):
    hf, directory, _ = checkpoints("gpt_neox")
    model = am.from_pretrained(directory, mesh=make_mesh((1, 2, 4)))
    kernel = model.layers.mlp.dense_h_to_4h.kernel[...]  # [2, 64, 96]: (layers, embed, mlp)
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 32, 24)
    ids, mask = padded_batch(seed=7)
    logits = np.asarray(forward(model, ids, mask)[0])
    real = mask.astype(bool)
    assert np.abs(logits - hf_logits(hf, ids, mask))[real].max() <= 1e-4


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2", "gpt2", "gpt_neox"])
def test_save_pretrained_round_trips_through_hf(case, checkpoints, tmp_path):
    _, _, model = checkpoints(case)
    am.save_pretrained(model, tmp_path)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    ids, mask = padded_batch(seed=len(case))  # the parity test's batch: no recompile
    real = mask.astype(bool)
    ours = np.asarray(forward(model, ids, mask)[0])
    assert np.abs(hf_logits(reloaded_hf, ids, mask) - ours)[real].max() <= 1e-4
    again = am.from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_save_pretrained_bf16_and_sharded(checkpoints, tmp_path):
    model = am.from_pretrained(checkpoints("llama_gqa")[1], param_dtype=jnp.bfloat16)
    am.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    again = am.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(again.lm_head.kernel[...], model.lm_head.kernel[...])


def test_unsupported_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        am.create(transformers.BertConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        am.create(am.tiny_config("llama", vocab_size=VOCAB, rope_parameters=dict(
            rope_type="yarn", rope_theta=1e4, factor=2.0)), rngs=nnx.Rngs(0))


def test_pickle_checkpoints_are_refused(tmp_path):
    am.tiny_config("llama", vocab_size=VOCAB).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints"):
        am.from_pretrained(tmp_path)


def test_missing_and_misshapen_tensors_are_named(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = checkpoints("llama_gqa")[1]
    tensors = load_file(directory / "model.safetensors")
    transformers.AutoConfig.from_pretrained(directory).save_pretrained(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        am.from_pretrained(tmp_path)
    save_file({**tensors, "model.norm.weight": np.ones(3, np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm.weight: checkpoint shape \(3,\)"):
        am.from_pretrained(tmp_path)
    save_file({**tensors, "score.weight": np.ones((1, 64), np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not use: \\['score.weight'\\]"):
        am.from_pretrained(tmp_path)


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="could not fetch 'EleutherAI/pythia-14m'.*offline"):
        am.from_pretrained("EleutherAI/pythia-14m")


def _copy_checkpoint(directory, tmp_path, tensors):
    """tmp_path/ckpt: `directory`'s config with `tensors` as model.safetensors."""
    from safetensors.numpy import save_file

    out = tmp_path / "ckpt"
    transformers.AutoConfig.from_pretrained(directory).save_pretrained(out)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_int_and_bool_weights_are_refused(checkpoints, tmp_path, dtype):
    from safetensors.numpy import load_file

    directory = checkpoints("llama_gqa")[1]
    tensors = load_file(directory / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = np.ones(tensors[key].shape, dtype)  # the right shape, a non-weight dtype
    with pytest.raises(ValueError, match=f"tensor '{key}' has dtype {np.dtype(dtype)}, which "
                                         "cannot hold a weight"):
        am.from_pretrained(_copy_checkpoint(directory, tmp_path, tensors))


def test_non_finite_weights_are_named(checkpoints, tmp_path):
    from safetensors.numpy import load_file

    directory = checkpoints("llama_gqa")[1]
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"][3] = np.nan
    tensors["model.layers.0.self_attn.k_proj.weight"][[0, 5], 1] = [np.inf, -np.inf]
    path = _copy_checkpoint(directory, tmp_path, tensors)
    with pytest.raises(ValueError, match=r"NaN/inf values: model.layers.0.self_attn.k_proj.weight "
                                         r"\(2 of 2048 values\), model.norm.weight \(1 of 64"):
        am.from_pretrained(path)
    model = am.from_pretrained(path, check_finite=False)  # the explicit opt-out
    assert np.isnan(np.asarray(model.norm.weight[...])[3])


@pytest.mark.parametrize("shard", ["/etc/model-00001.safetensors", "../outside.safetensors",
                                   "sub/../../outside.safetensors"])
def test_index_naming_files_outside_the_directory_is_refused(checkpoints, tmp_path, shard):
    import shutil

    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama_sharded")[1], directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"maps 'model.norm.weight' to '{shard}', outside the "
                                         "checkpoint directory"):
        am.from_pretrained(directory)


def test_missing_path_like_names_are_local_directories_not_hub_ids(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "llama_tiny").mkdir(parents=True)
    # a mistyped directory inside an existing folder: never sent to the hub
    with pytest.raises(FileNotFoundError, match=r"directory 'ckpt/llama_tinny' does not exist; "
                                                r"did you mean \['ckpt/llama_tiny'\]"):
        am.from_pretrained("ckpt/llama_tinny")
    for name in ("./x", "~/surely_not_a_checkpoint_dir", "a/b/c", "bad..name"):
        with pytest.raises(FileNotFoundError, match=f"local checkpoint directory '{name}' does "
                                                    "not exist"):
            am.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory"):
        (tmp_path / "config.json").write_text("{}")
        am.from_pretrained(tmp_path / "config.json")
