"""Small private helpers shared by the objectives: dtype promotion and eager input checks.

Every check runs at trace time on static shapes, so a bad call fails before compilation with a
message that names the offending argument and its shape.
"""

from __future__ import annotations

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
