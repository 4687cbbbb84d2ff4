"""Tiny random Hugging Face PyTorch checkpoints shared by test_models*.py and test_generate*.py.

No tests here: `hf_checkpoint(case, root)` builds one HF model per case (all weights, including
norms and biases, redrawn so that every parameter matters), saves it with `save_pretrained`
(safetensors) under `root/case` once, and returns (torch model, directory). The session fixture
`checkpoints` (import it into a test module) adds our model loaded from that directory.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import transformers

import alignax.models as am

VOCAB = 97

_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)
CASES = {
    # GQA (4 query heads on 2 KV heads), untied head.
    "llama_gqa": lambda: transformers.LlamaConfig(**_LLAMA, num_key_value_heads=2),
    # Llama 3.1 rope scaling, tied embeddings, attention and MLP biases, MQA.
    "llama3_tied_bias": lambda: transformers.LlamaConfig(
        **_LLAMA, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16)),
    # Mistral with a sliding window shorter than the sequence.
    "mistral_window": lambda: transformers.MistralConfig(**_LLAMA, num_key_value_heads=2,
                                                         sliding_window=4),
    # Qwen2: q/k/v biases (no o bias), tied embeddings, GQA.
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA, num_key_value_heads=2,
                                              tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64, scale_attn_by_inverse_layer_idx=True),
    # Pythia: partial rotary (rotary_pct 0.25 of head_dim 16), parallel residual, untied.
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25),
    # Sequential residual, half rotary, tanh GELU, tied.
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, rotary_pct=0.5,
        use_parallel_residual=False, hidden_act="gelu_new", tie_word_embeddings=True),
    # The GQA Llama again, saved as several safetensors shards with an index.
    "llama_sharded": lambda: transformers.LlamaConfig(**_LLAMA, num_key_value_heads=2),
}
SHARDED = {"llama_sharded": "40KB"}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2), biases and
    embeddings ~ N(0, 0.1^2) / N(0, 1), so logits are O(1) and every weight is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if ("norm" in name or "ln" in name) and name.endswith("weight")
                         else 0.0) + 0.1 * noise)
            elif "emb" in name or "wte" in name or "wpe" in name:
                p.copy_(noise)
            else:
                fan_in = p.shape[0] if "Conv1D" in type(_owner(model, name)).__name__ \
                    else p.shape[1]
                p.copy_(noise / np.sqrt(fan_in))


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def hf_checkpoint(case: str, root: pathlib.Path) -> tuple[torch.nn.Module, pathlib.Path]:
    """(HF torch model in eval mode, float32, eager attention; its save_pretrained directory)."""
    config = CASES[case]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed=sorted(CASES).index(case))
    model.eval()
    directory = root / case
    if not directory.exists():
        kwargs = {"max_shard_size": SHARDED[case]} if case in SHARDED else {}
        model.save_pretrained(directory, **kwargs)
    return model, directory


def padded_batch(seed: int, *, length: int = 11, pad: int = 3):
    """Random ids [4, T] int32 and mask [4, T]. Row 0 is full; rows 1 and 2 hold the same
    T - pad tokens, left- and right-padded; row 3 is a left-padded 2-token row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (4, length)).astype(np.int32)
    mask = np.ones((4, length), np.int32)
    ids[2, :length - pad] = ids[1, pad:]
    mask[1, :pad] = 0
    mask[2, length - pad:] = 0
    mask[3, :length - 2] = 0
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def hf_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions(mask), dtype=torch.long))
    return out.logits.float().numpy()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """case -> (HF torch model, save_pretrained directory, our float32 model loaded from it),
    each built once per session, so jitted functions of the model compile once per case."""
    root = tmp_path_factory.mktemp("hf_tiny")
    cache = {}

    def get(case):
        if case not in cache:
            hf, directory = hf_checkpoint(case, root)
            cache[case] = hf, directory, am.from_pretrained(directory)
        return cache[case]

    return get
