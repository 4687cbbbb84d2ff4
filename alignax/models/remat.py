"""Per-layer rematerialisation: what the backward pass keeps of each scanned layer.

The layers run under one `jax.lax.scan` (`CausalLM.hidden_states`); the layer body is wrapped
in `jax.checkpoint` with the policy named here, so the backward pass recomputes one layer at a
time from what was saved for it:

    None       save everything the backward pass needs (no recomputation)
    "dots"     save the outputs of matmuls without batch dimensions (the projections); the
               attention scores/probabilities and elementwise results are recomputed
    "full"     save only each layer's input; the whole layer is recomputed
    "offload"  as "dots", but the saved matmul outputs go to pinned host memory

"offload" needs an accelerator with a separate host memory space (GPU, TPU). On the cpu
backend device memory *is* host memory: XLA:CPU compiles the offload annotations away and the
step needs exactly the memory of "dots", so it is refused there with a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

REMAT_POLICIES: dict[str | None, Callable | None] = {
    None: None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
OFFLOAD_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def check_remat(remat: str | None, *, backend: str | None = None) -> None:
    """Raises ValueError for an unknown policy name, or "offload" on a backend without host
    offloading (`backend` defaults to `jax.default_backend()`)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    backend = jax.default_backend() if backend is None else backend
    if remat == "offload" and backend not in OFFLOAD_BACKENDS:
        raise ValueError(
            f"remat='offload' moves saved activations to host memory, which the {backend!r} "
            f"backend does not have apart from device memory (XLA:CPU compiles the offload "
            f"away); use remat='dots' there. Supported backends: {OFFLOAD_BACKENDS}")


def checkpoint_layer(layer: Callable, remat: str | None) -> Callable:
    """`layer` (a scan body) under `jax.checkpoint` with the named policy; None: unchanged."""
    check_remat(remat)
    if remat is None:
        return layer
    return jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
