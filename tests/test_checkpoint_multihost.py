"""Checkpoints written by 2 real JAX processes: each process gets back its own data-iterator
position, and a corrupt checkpoint is refused by both together, moved aside once, and saved
again.

`test_two_processes_keep_their_own_data_positions` launches this file twice as a script
(process ids 0 and 1, 2 CPU devices each, a local coordinator, gloo collectives). The state is
one array sharded over all 4 devices (each process holds half) and one replicated array.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from alignax.training.checkpoint import Checkpointer
from alignax.training.mesh import initialize_distributed, make_mesh

PROCESSES, TIMEOUT_S = 2, 180
ROOT = pathlib.Path(__file__).resolve().parents[1]


def state(mesh, value: float) -> dict:
    w = np.arange(32, dtype=np.float32).reshape(8, 4) * value
    sharded = NamedSharding(mesh, P(("data", "fsdp", "tensor")))
    return {"w": jax.make_array_from_callback(w.shape, sharded, lambda index: w[index]),
            "b": jax.device_put(np.full(3, value, np.float32), NamedSharding(mesh, P()))}


def worker(out_dir: pathlib.Path) -> None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    initialize_distributed()
    pid = jax.process_index()
    mesh = make_mesh((1, 2, 2))
    directory = out_dir / "checkpoints"
    checkpointer = Checkpointer(directory, config={"run": 1}, save_every=2)
    for step in (2, 4):
        checkpointer.save(step, state(mesh, step), data_state={"shard": pid, "position": step})
    checkpointer.wait()
    checkpointer.close()
    multihost_utils.sync_global_devices("saved")
    if pid == 0:  # truncate the array files of step 4
        for path in (directory / "4" / "state").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    multihost_utils.sync_global_devices("corrupted")

    restarted = Checkpointer(directory, config={"run": 1}, save_every=2)
    restored, data_state, step = restarted.restore_latest(state(mesh, 0))
    result = {"step": step, "data_state": data_state,
              "w": multihost_utils.process_allgather(restored["w"], tiled=True).tolist(),
              "quarantine": sorted(p.name for p in (directory / "quarantine").glob("*"))}
    restarted.save(4, state(mesh, 5), data_state={"shard": pid, "position": 4})
    restarted.wait()
    restarted.close()
    again = Checkpointer(directory, config={"run": 1}, save_every=2)
    restored, data_state, step = again.restore_latest(state(mesh, 0))
    again.close()
    result["again"] = {"step": step, "data_state": data_state,
                       "b": np.asarray(restored["b"].addressable_data(0)).tolist()}
    (out_dir / f"process_{pid}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_their_own_data_positions(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               JAX_NUM_PROCESSES=str(PROCESSES), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)],
                              env={**env, "JAX_PROCESS_ID": str(pid)}, cwd=ROOT,
                              stdout=open(tmp_path / f"process_{pid}.log", "w"),
                              stderr=subprocess.STDOUT) for pid in range(PROCESSES)]
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not any(
            p.poll() not in (None, 0) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if [p.returncode for p in procs] != [0] * PROCESSES:
        logs = "\n".join((tmp_path / f"process_{i}.log").read_text()[-3000:]
                         for i in range(PROCESSES))
        pytest.fail(f"multi-process run failed or timed out after {TIMEOUT_S}s:\n{logs}")
    for pid in range(PROCESSES):
        result = json.loads((tmp_path / f"process_{pid}.json").read_text())
        # step 4 refused by both processes together, moved aside once
        assert result["step"] == 2 and result["quarantine"] == ["4.unreadable"], result
        assert result["data_state"] == {"shard": pid, "position": 2}  # its own position
        np.testing.assert_array_equal(result["w"], np.arange(32).reshape(8, 4) * 2.0)
        assert result["again"] == {"step": 4, "data_state": {"shard": pid, "position": 4},
                                   "b": [5.0] * 3}


if __name__ == "__main__":
    worker(pathlib.Path(sys.argv[1]))
