"""Small private helpers shared by the objectives: dtype promotion, eager input checks and the
overflow-safe masked mean.

Every check runs at trace time on static shapes, so a bad call fails before compilation with a
message that names the offending argument and its shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_float32(x) -> jnp.ndarray:
    """Returns `x` as a float32 array (bf16/f16/int inputs are upcast; float64 is rounded)."""
    return jnp.asarray(x).astype(jnp.float32)


def check_rank(name: str, x, rank: int) -> None:
    """Raises ValueError unless `x` has exactly `rank` dimensions."""
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def check_same_shape(**arrays) -> None:
    """Raises ValueError unless every keyword array has the same shape, naming all of them."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {described}")


def check_positive(name: str, value) -> None:
    """Raises ValueError unless the static hyper-parameter `value` is > 0.

    Traced values (e.g. a beta swept under `jax.vmap`) are not checked.
    """
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def masked_mean(x, mask, axis):
    """Mean of x over `axis` where mask (0, with zero gradient, where mask is empty).

    Finite for finite x even where the mean is float32's largest number: every term is halved
    and divided by the count before summing (no overflow on the way) and the result is kept
    within the range of the terms; the derivative is that of the plain mean, 1/count per term.
    Entries outside the mask may hold anything (inf, NaN).
    """
    mask = jnp.asarray(mask, bool)
    count = jnp.maximum(jnp.sum(mask, axis=axis, keepdims=True), 1).astype(jnp.float32)
    half = jnp.sum(jnp.where(mask, 0.5 * x / count, 0.0), axis=axis)
    low = jnp.min(jnp.where(mask, x, jnp.inf), axis=axis, initial=jnp.inf)
    high = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, initial=-jnp.inf)
    value = jnp.where(jnp.any(mask, axis=axis), jnp.clip(2.0 * half, low, high), 0.0)
    return jax.lax.stop_gradient(value) + 2.0 * (half - jax.lax.stop_gradient(half))
