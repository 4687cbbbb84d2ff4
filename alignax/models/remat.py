"""Per-layer rematerialisation: what the backward pass keeps of each scanned layer.

The layers run under one `jax.lax.scan` (`CausalLM.hidden_states`); the layer body is wrapped
in `jax.checkpoint` with the policy named here, so the backward pass recomputes one layer at a
time from what was saved for it:

    None       save everything the backward pass needs except array views (reshape,
               squeeze, broadcast), which it re-forms for free: no arithmetic is recomputed
    "dots"     save the outputs of matmuls without batch dimensions (the projections); the
               attention scores/probabilities and elementwise results are recomputed
    "full"     save only each layer's input; the whole layer is recomputed
    "offload"  as "dots", but the saved matmul outputs go to pinned host memory

"offload" needs an accelerator with a separate host memory space (GPU, TPU). On the cpu
backend device memory *is* host memory: XLA:CPU compiles the offload annotations away and the
step needs exactly the memory of "dots", so it is refused there with a ValueError.

Why None is not "no jax.checkpoint at all": under a scan, every value the backward pass reads
becomes its own stacked [L, ...] residual buffer, so a value and its reshaped views would all
be stored (unrolled layers share one buffer). Not saving the views took the DPO step of
`benchmarks/scale_core.py` at 8 layers from 1449 to the unrolled layers' ~1305 MiB.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.extend.core import primitives

_VIEWS = (primitives.reshape_p, primitives.squeeze_p, primitives.broadcast_in_dim_p)


def save_all_but_views(primitive, *args, **params) -> bool:
    """The policy of remat=None: every output is saved except those of view primitives."""
    return primitive not in _VIEWS


REMAT_POLICIES: dict[str | None, Callable] = {
    None: save_all_but_views,
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
    """`layer` (a scan body) under `jax.checkpoint` with the named policy."""
    check_remat(remat)
    return jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
