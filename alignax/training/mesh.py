"""Device mesh with named axes ("data", "fsdp", "tensor") and multi-host start-up.

The batch is sharded over ("data", "fsdp"); parameters over "fsdp" and "tensor" through the
models' logical partition rules (`alignax.models.partitioning.DEFAULT_RULES`).
"""

from __future__ import annotations

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

    Multi-host launchers (SLURM, TPU pods, `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` +
    `JAX_PROCESS_ID`) are detected by JAX itself; on a single host this is a no-op, so
    experiments call it unconditionally before touching any device.
    """
    launchers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS")
    multi = any(name in os.environ for name in launchers)
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of the batch into global arrays sharded over the batch axes.

    Each process passes the rows it loaded ([B / num_processes, ...] per column); the result
    is one [B, ...] global array per column, laid out by `batch_sharding(mesh)`. On one host
    this is a plain sharded `device_put`.

    Args:
      local_batch: column name -> numpy array whose leading dim is the per-process batch.
      mesh: the training mesh.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in local_batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
