"""The few building blocks every family shares: dense, embedding, RMSNorm, LayerNorm, and
`stacked`, which builds a family's layers once with per-layer parameters stacked [L, ...].

Each parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names
("vocab", "embed", "heads", "kv_heads", "mlp", "norm", and "layers" for the stacked layer
axis); `alignax.models.partitioning` maps them to mesh axes. `eager_sharding=False`: the names
are resolved by `create` / `from_pretrained` (jit with out_shardings), not when a variable is
built.

`dtype` is the compute dtype (activations, matmul inputs), `param_dtype` the storage dtype.
Norm statistics are always taken in float32, as in the HF reference implementations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
LAYERS = "layers"  # logical name of the stacked layer axis (replicated by DEFAULT_RULES)


def param(rngs: nnx.Rngs | None, init, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
    """An nnx.Param of `shape` created by `init(key, shape, dtype)`, annotated with `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), out_sharding=axes, eager_sharding=False)


def activation(name: str):
    """HF `hidden_act` / `activation_function` name -> function."""
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs, *,
            name: str | None = LAYERS) -> nnx.Module:
    """`num` modules built by `make(rngs)` as one module whose parameters are stacked [num, ...]
    (independent draws per copy); the new leading axis is named `name` in `out_sharding`."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: name})
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return build(rngs)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """Call-time switch of the LoRA adapters (`alignax.models.lora`) threaded through a forward.

    enabled: False computes the base model (the frozen reference) from the same parameters.
    key: PRNG key for adapter dropout; None (evaluation, the reference) applies none.
    """

    enabled: bool = True
    key: jax.Array | None = None

    def fold(self, i: int) -> Adapters:
        """The context of sub-module `i` (its own dropout key)."""
        if self.key is None:
            return self
        return dataclasses.replace(self, key=jax.random.fold_in(self.key, i))


ADAPTERS_ON = Adapters()


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA delta); kernel [in, out] with logical axes `axes`.

    `lora` is None until `alignax.models.lora.add_lora` attaches an adapter to this projection.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, precision: jax.lax.Precision | None = None):
        self.kernel = param(rngs, jax.nn.initializers.normal(init_std),
                            (in_features, out_features), param_dtype, axes)
        self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), param_dtype,
                           axes[-1:]) if use_bias else None)
        self.dtype = dtype
        self.precision = precision
        self.lora = nnx.data(None)  # an alignax.models.lora.LoRAAdapter once attached

    def __call__(self, x: jax.Array, adapters: Adapters = ADAPTERS_ON) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype.

        The leading dims are flattened around the matmul: XLA:CPU runs the backward pass's
        weight gradient of a 2-D dot markedly faster than that of the [B, T, in] dot
        (`benchmarks/trl_dpo.py`), and the reshapes are free.
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [..., in] -> [N, in]
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None and adapters.enabled:
            y = y + self.lora(x, key=adapters.key).astype(self.dtype)  # [N, out]
        return y.reshape(*lead, y.shape[-1])  # [N, out] -> [..., out]


class Embed(nnx.Module):
    """Token (or learned position) embedding table [num, features]."""

    def __init__(self, num: int, features: int, *, axes: Axes, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02):
        self.embedding = param(rngs, jax.nn.initializers.normal(init_std), (num, features),
                               param_dtype, axes)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> [..., features]."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: weight * (x / sqrt(mean(x^2) + eps)), statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.weight = param(None, jax.nn.initializers.ones, (features,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the activation dtype before scaling by the weight.
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32 (GPT-2, GPT-NeoX)."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.weight = param(None, jax.nn.initializers.ones, (features,), param_dtype, ("norm",))
        self.bias = param(None, jax.nn.initializers.zeros, (features,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)
