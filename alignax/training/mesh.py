"""Device mesh with named axes ("data", "fsdp", "tensor") and multi-host start-up.

The batch is sharded over ("data", "fsdp"); parameters over "fsdp" and "tensor" through the
models' logical partition rules (`alignax.models.partitioning.DEFAULT_RULES`).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: tuple[int, int, int] | None = None, *, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all hosts).

    Args:
      shape: (data, fsdp, tensor) sizes; one entry may be -1 to take the remaining devices.
        A product smaller than the device count uses the first devices (e.g. (1, 1, 1) for a
        single-device run). Default: all devices on "data".
      devices: optional device list.

    The axes are `AxisType.Auto`: shardings are given on the jit boundary (params, optimizer
    state, batch) and XLA propagates them through the model, so model code needs no sharding
    annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = (len(devices), 1, 1) if shape is None else tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must be (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)  # -1 -> the rest
    if math.prod(shape) > len(devices) or min(shape) < 1:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:math.prod(shape)])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch column: leading (batch) dimension over ("data", "fsdp")."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, metrics, the PRNG key)."""
    return NamedSharding(mesh, P())


def initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when launched as one process of a multi-host job.

    SLURM and TPU pods are detected by JAX itself. A manual launch sets
    `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` on every process; JAX
    reads only the address from the environment, so the other two are passed here. On a single
    host this is a no-op, so experiments call it unconditionally before touching any device.

    Raises:
      ValueError: if `JAX_NUM_PROCESSES` or `JAX_PROCESS_ID` is not an integer.
    """
    launchers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS")
    if not any(name in os.environ for name in launchers) or jax.distributed.is_initialized():
        return
    manual = {}
    for argument, variable in (("num_processes", "JAX_NUM_PROCESSES"),
                               ("process_id", "JAX_PROCESS_ID")):
        if variable in os.environ:
            try:
                manual[argument] = int(os.environ[variable])
            except ValueError:
                raise ValueError(f"{variable} must be an integer, got "
                                 f"{os.environ[variable]!r}") from None
    jax.distributed.initialize(**manual)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of the batch into global arrays sharded over the batch axes.

    Each process passes the rows it loaded ([B / num_processes, ...] per column); the result
    is one [B, ...] global array per column, laid out by `batch_sharding(mesh)`, with each
    process's rows at the positions of its devices on the batch axes (process order for
    `make_mesh`). On one host this is a plain sharded `device_put`.

    Args:
      local_batch: column name -> numpy array whose leading dim is the per-process batch.
      mesh: the training mesh.

    Raises:
      ValueError: on several processes, if the mesh's batch axes do not split the batch
        between the processes (e.g. (1, 1, n) with "tensor" across hosts): the processes
        would then hold replicas of the same rows, and disjoint local rows would silently
        make inconsistent replicas.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in local_batch.items()}
    for k, v in local_batch.items():
        if not _rows_split_over_processes(sharding, len(v) * jax.process_count()):
            raise ValueError(f"global_batch: column {k!r}: the batch axes {BATCH_AXES} of mesh "
                             f"{dict(mesh.shape)} do not split the batch between the "
                             f"{jax.process_count()} processes; put the processes on "
                             f"'data' or 'fsdp'")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


@functools.lru_cache(maxsize=64)
def _rows_split_over_processes(sharding: NamedSharding, rows: int) -> bool:
    """Whether every block of batch rows of `sharding` lives on the devices of one process."""
    owners: dict[tuple[int, int, int], set[int]] = {}
    for device, index in sharding.devices_indices_map((rows,)).items():
        owners.setdefault(index[0].indices(rows), set()).add(device.process_index)
    return all(len(processes) == 1 for processes in owners.values())
