"""Logical axis names -> mesh axes.

Parameters carry logical names in their `out_sharding` metadata ("vocab", "embed", "heads",
"kv_heads", "mlp", "norm", and "layers" for the stacked layer axis); a rule table maps each to
a mesh axis of the ("data", "fsdp", "tensor") mesh, or to None (replicated). A dimension whose
size the mesh axis does not divide, a mesh axis already used by an earlier dimension, or a mesh
axis missing from the mesh is replicated instead, so any rule table works on any mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the layer scan slices this axis: every device holds every layer
)


def logical_to_mesh_spec(logical_spec: Sequence[str | None], mesh: Mesh,
                         rules: Rules = DEFAULT_RULES,
                         shape: Sequence[int] | None = None) -> PartitionSpec:
    """Logical names (one per dim) -> PartitionSpec over `mesh`'s axes.

    Args:
      logical_spec: e.g. ("embed", "heads").
      mesh: the device mesh.
      rules: (logical name, mesh axis | tuple of mesh axes | None) pairs; first match wins.
      shape: the array shape; when given, dims not divisible by their mesh axes replicate.
    """
    table: dict[str, str | tuple[str, ...] | None] = {}
    for name, axis in rules:
        table.setdefault(name, axis)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_spec):
        axis = table.get(name) if name is not None else None
        axes = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if not axes or (shape is not None and shape[dim] % size):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_mesh_sharding(logical_spec: Sequence[str | None], mesh: Mesh,
                             rules: Rules = DEFAULT_RULES,
                             shape: Sequence[int] | None = None) -> NamedSharding:
    """Logical names (one per dim) -> NamedSharding on `mesh` (see `logical_to_mesh_spec`)."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_spec, mesh, rules, shape))


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """An nnx.State (or abstract one from `nnx.eval_shape`) -> the same tree of NamedShardings.

    Use it as `out_shardings` / `in_shardings` of a jit over the model state, or with
    `jax.device_put(state, state_shardings(state, mesh))`.
    """
    def sharding(variable):
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        return variable.replace(
            logical_to_mesh_sharding(axes, mesh, rules, variable.shape))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
