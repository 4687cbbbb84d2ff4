"""Hugging Face config -> `ModelConfig`, the one architecture description our modules read.

The HF config object stays the user-facing config (`model.config`, saved back as config.json);
`ModelConfig` is a frozen, hashable digest of it with the field names of this package, so the
family modules never touch HF's per-family attribute spellings (`n_embd` vs `hidden_size`,
`rotary_pct` vs `rope_parameters["partial_rotary_factor"]`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers

FAMILIES = ("llama", "gpt2", "gpt_neox")
# HF model_type -> our module family. Mistral and Qwen2 are Llama-shaped (Qwen2: qkv bias).
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2",
               "gpt_neox": "gpt_neox"}
# HF hidden_act / activation_function names we implement.
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: frequencies theta^(-2i/rotary_dim) on the first `rotary_dim` dims.

    `rope_type` "linear" divides every frequency by `factor`; "llama3" rescales the low
    frequencies only (Llama 3.1's `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`).
    """

    theta: float
    rotary_dim: int
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only causal LM, family-independent field names."""

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig | None = None
    parallel_residual: bool = False
    sliding_window: int | None = None
    attn_scale: float = 1.0
    scale_attn_by_inverse_layer_idx: bool = False

    @classmethod
    def from_hf(cls, hf_config: transformers.PretrainedConfig) -> ModelConfig:
        """Reads an HF LlamaConfig / MistralConfig / Qwen2Config / GPT2Config / GPTNeoXConfig."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} "
                             f"(supported: {sorted(MODEL_TYPES)})")
        family = MODEL_TYPES[model_type]
        reader = {"llama": _llama, "gpt2": _gpt2, "gpt_neox": _gpt_neox}[family]
        cfg = cls(family=family, model_type=model_type, **reader(hf_config))
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {cfg.activation!r} for {model_type} "
                             f"(supported: {ACTIVATIONS})")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_attention_heads={cfg.num_heads} is not a multiple of "
                             f"num_key_value_heads={cfg.num_kv_heads}")
        return cfg


def _rope(hf: Any, head_dim: int) -> RopeConfig:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = dict(getattr(hf, "rope_scaling", None) or {})
    params = {**legacy, **params}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: {ROPE_TYPES})")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", getattr(hf, "rotary_emb_base",
                                                                        10000.0)))
    partial = params.get("partial_rotary_factor",
                         getattr(hf, "partial_rotary_factor", getattr(hf, "rotary_pct", 1.0)))
    extra = {}
    if rope_type in ("linear", "llama3"):
        extra["factor"] = float(params["factor"])
    if rope_type == "llama3":
        extra.update(low_freq_factor=float(params["low_freq_factor"]),
                     high_freq_factor=float(params["high_freq_factor"]),
                     original_max_position_embeddings=int(
                         params["original_max_position_embeddings"]))
    return RopeConfig(theta=float(theta), rotary_dim=int(head_dim * partial),
                      rope_type=rope_type, **extra)


def _llama(hf: Any) -> dict[str, Any]:
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    qwen2 = hf.model_type == "qwen2"
    attention_bias = bool(getattr(hf, "attention_bias", False))
    window = getattr(hf, "sliding_window", None)
    if qwen2 and not getattr(hf, "use_sliding_window", False):
        window = None
    if qwen2 and window is not None:
        raise ValueError("Qwen2 use_sliding_window=True (per-layer windows) is not supported")
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=hf.intermediate_size, activation=hf.hidden_act,
        norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qwen2 or attention_bias, out_bias=attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)), rope=_rope(hf, head_dim),
        sliding_window=window, attn_scale=head_dim ** -0.5)


def _gpt2(hf: Any) -> dict[str, Any]:
    if getattr(hf, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not a causal LM we support")
    head_dim = hf.n_embd // hf.n_head
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.n_embd, num_layers=hf.n_layer,
        num_heads=hf.n_head, num_kv_heads=hf.n_head, head_dim=head_dim,
        intermediate_size=hf.n_inner or 4 * hf.n_embd, activation=hf.activation_function,
        norm_eps=hf.layer_norm_epsilon, max_position_embeddings=hf.n_positions,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=True, out_bias=True, mlp_bias=True,
        attn_scale=head_dim ** -0.5 if hf.scale_attn_weights else 1.0,
        scale_attn_by_inverse_layer_idx=bool(hf.scale_attn_by_inverse_layer_idx))


def _gpt_neox(hf: Any) -> dict[str, Any]:
    head_dim = hf.hidden_size // hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", True))
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_attention_heads, head_dim=head_dim,
        intermediate_size=hf.intermediate_size, activation=hf.hidden_act,
        norm_eps=hf.layer_norm_eps, max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias, out_bias=bias, mlp_bias=True, rope=_rope(hf, head_dim),
        parallel_residual=bool(hf.use_parallel_residual), attn_scale=head_dim ** -0.5)


def tiny_config(family: str = "llama", *, vocab_size: int, **overrides: Any
                ) -> transformers.PretrainedConfig:
    """The embedded default architecture: an HF config small enough for CPU tests and demos.

    hidden 64, 2 layers, 4 heads (2 KV heads where the family has GQA), MLP 172, 512 positions.

    Args:
      family: "llama", "mistral", "qwen2", "gpt2" or "gpt_neox".
      vocab_size: the tokenizer's vocabulary size (e.g. `len(alignax.data.default_tokenizer())`).
      **overrides: HF config attributes to change (e.g. `bos_token_id=`, `tie_word_embeddings=`).

    >>> tiny_config("llama", vocab_size=300).num_key_value_heads
    2
    """
    common = dict(vocab_size=vocab_size)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
        kwargs = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-6, tie_word_embeddings=False)
        if family == "mistral":
            kwargs["sliding_window"] = None
    elif family == "gpt2":
        cls = transformers.GPT2Config
        kwargs = dict(n_embd=64, n_inner=172, n_layer=2, n_head=4, n_positions=512)
    elif family == "gpt_neox":
        cls = transformers.GPTNeoXConfig
        kwargs = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25)
    else:
        raise ValueError(f"unknown family {family!r}: expected one of "
                         "'llama', 'mistral', 'qwen2', 'gpt2', 'gpt_neox'")
    return cls(**{**common, **kwargs, **overrides})
