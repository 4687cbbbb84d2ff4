"""Multi-process training: 2 real JAX processes x 2 CPU devices == the single-device run.

`test_two_processes_match_single_device` launches this file twice as a script (process ids 0
and 1, a local coordinator, gloo CPU collectives). Each process starts through
`alignax.training.mesh.initialize_distributed` (env vars JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), builds the mesh (data, fsdp, tensor) = (1, 2, 2) over the
4 global devices (FSDP and the batch split across the processes, tensor parallel inside each),
reads ONLY its own strided shard of the pairs (`PreferenceDataset.batches(shard_index=
process_index, shard_count=process_count)`), turns it into global arrays with `global_batch`
and trains 3 DPO steps of plain SGD. The per-step losses and gathered gradients must equal a
single-device run on the concatenated shards to GRADIENT_RTOL (2^7 float32 eps, see
tests/tiny_training.py; Adam-updated parameters would compare the CPUs' rounding, not the
code), and the gathered global batch
must be exactly the concatenation of the two shards (process 0's rows first). Both processes
then save the sharded state with `Checkpointer`; the restore must be bitwise identical.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.multihost_utils import process_allgather
from tiny_training import GRADIENT_RTOL, tiny_step

from alignax.data import PreferenceDataset, TokenizedExample, TruncationReport
from alignax.models import tiny_config
from alignax.training.checkpoint import Checkpointer
from alignax.training.mesh import global_batch, initialize_distributed, make_mesh

VOCAB, BATCH, LENGTH, PROMPT, STEPS, PROCESSES = 64, 8, 16, 6, 3, 2
MESH = (1, 2, 2)  # FSDP across the 2 processes, tensor parallel inside each
TIMEOUT_S = 240
ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".jax_cache"


def make_dataset():
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(
        index=i, prompt_ids=rng.integers(1, VOCAB, PROMPT).astype(np.int32),
        responses={r: (rng.integers(1, VOCAB, rng.integers(4, LENGTH - PROMPT + 1))
                       .astype(np.int32),) for r in ("chosen", "rejected")},
        rewards={}, bin=None) for i in range(24)]
    return PreferenceDataset(examples, format="standard", report=TruncationReport(),
                             pad_token_id=0, buckets=(LENGTH,), prompt_buckets=(PROMPT,),
                             group_sizes=None)


def shard_batches(dataset, shard_index: int, shard_count: int) -> list[dict[str, np.ndarray]]:
    """The first STEPS batches of one process: BATCH / shard_count rows of its strided shard."""
    batches = dataset.batches(batch_size=BATCH // shard_count, seed=0, shard_index=shard_index,
                              shard_count=shard_count)
    return [{k: np.asarray(v) for k, v in next(batches).items()} for _ in range(STEPS)]


def concatenated_batches(dataset) -> list[dict[str, np.ndarray]]:
    """The global batch of every step: the process shards stacked in process order."""
    shards = [shard_batches(dataset, p, PROCESSES) for p in range(PROCESSES)]
    return [{k: np.concatenate([s[step][k] for s in shards]) for k in shards[0][step]}
            for step in range(STEPS)]


def train(mesh, local_batches):
    """STEPS DPO steps of a tiny Llama on `mesh`.

    Returns (losses, gradients per step, final state, global batches).
    """
    config = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1)
    step, state, _, reference = tiny_step(mesh, config, max_traces=1)
    losses, gradients, batches = [], [], []
    for local in local_batches:
        batch = global_batch(local, mesh)
        state, metrics = step(state, batch, reference)
        losses.append(float(metrics["loss"]))
        # sgd_recording_gradients' state is this step's gradient (copied: the state is donated)
        gradients.append(jax.tree.map(jnp.copy, state.opt_state))
        batches.append(batch)
    return losses, gradients, state, batches


def flat_params(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in leaves}


def distinct_blocks(x, devices) -> int:
    """How many distinct blocks of the global array `x` the given devices hold."""
    indices = x.sharding.devices_indices_map(x.shape)
    return len({str(indices[d]) for d in devices})


def worker(out_dir: pathlib.Path) -> None:
    """One process of the 2-process job; writes out_dir/process_<id>.npz."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_compilation_cache_dir", str(CACHE))  # as tests/conftest.py
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    initialize_distributed()
    pid = jax.process_index()
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    assert pid == int(os.environ["JAX_PROCESS_ID"])
    local_batches = shard_batches(make_dataset(), pid, jax.process_count())
    losses, gradients, state, batches = train(make_mesh(MESH), local_batches)
    result = {"losses": np.array(losses)}
    # FSDP really splits parameters between the processes
    assert any(distinct_blocks(x, jax.local_devices()) < distinct_blocks(x, jax.devices())
               for x in jax.tree.leaves(state.params))
    # the batch rows on this process's devices are exactly the rows it loaded
    for k, v in batches[0].items():
        local = sorted((s for s in v.addressable_shards if s.replica_id == 0),
                       key=lambda s: s.index[0].start)
        np.testing.assert_array_equal(np.concatenate([s.data for s in local]),
                                      local_batches[0][k])
    for step, batch in enumerate(batches):
        for k, v in process_allgather(batch, tiled=True).items():
            result[f"batch/{step}/{k}"] = v
    for step, gradient in enumerate(gradients):
        for k, v in flat_params(process_allgather(gradient, tiled=True)).items():
            result[f"gradient/{step}/{k}"] = v
    for k, v in flat_params(process_allgather(state.params, tiled=True)).items():
        result[f"params/{k}"] = v
    # a mesh whose batch axes stay inside each process cannot take process-local rows
    try:
        global_batch(local_batches[0], make_mesh((1, 1, 4)))
    except ValueError as error:
        result["replicated_batch_error"] = np.array(str(error))
    # every process saves its shards of the state; the restore is bitwise
    checkpointer = Checkpointer(out_dir / "checkpoint", config={"mesh": list(MESH)},
                                save_every=1)
    checkpointer.save(STEPS, state, force=True)
    checkpointer.wait()
    restored, _, step = checkpointer.restore_latest(state)
    checkpointer.close()
    assert step == STEPS
    for k, v in flat_params(process_allgather(restored.params, tiled=True)).items():
        result[f"restored/{k}"] = v
    np.savez(out_dir / f"process_{pid}.npz", **result)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: pathlib.Path) -> None:
    """Runs PROCESSES workers; kills all of them on a failure or after TIMEOUT_S."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               JAX_NUM_PROCESSES=str(PROCESSES), JAX_PLATFORMS="cpu")
    procs, logs = [], []
    for pid in range(PROCESSES):
        log = open(out_dir / f"process_{pid}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, str(out_dir)],
                                      env={**env, "JAX_PROCESS_ID": str(pid)}, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * PROCESSES:
        tails = "\n".join(f"--- process {i} (exit {c}) ---\n"
                          + (out_dir / f"process_{i}.log").read_text()[-3000:]
                          for i, c in enumerate(codes))
        pytest.fail(f"multi-process run failed or timed out after {TIMEOUT_S}s:\n{tails}")


def test_process_shards_are_disjoint_and_make_the_global_batch():
    dataset = make_dataset()
    shards = [shard_batches(dataset, p, PROCESSES) for p in range(PROCESSES)]
    for step, batch in enumerate(concatenated_batches(dataset)):
        rows = [s[step]["record_index"] for s in shards]
        for p, r in enumerate(rows):
            assert len(r) == BATCH // PROCESSES and np.all(r % PROCESSES == p)  # strided shard
        assert not set(rows[0]) & set(rows[1])
        np.testing.assert_array_equal(batch["record_index"], np.concatenate(rows))
    # over one epoch (12 pairs per shard = 3 batches of 4) the shards cover every pair once
    seen = np.concatenate([b["record_index"] for s in shards for b in s])
    np.testing.assert_array_equal(np.sort(seen), np.arange(24))


def test_initialize_distributed_passes_process_count_and_id(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    initialize_distributed()
    assert calls == []  # single host: no-op
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    initialize_distributed()
    assert calls == [{"num_processes": 4, "process_id": 3}]  # JAX reads the address itself
    monkeypatch.setenv("JAX_PROCESS_ID", "three")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer, got 'three'"):
        initialize_distributed()


def test_two_processes_match_single_device(tmp_path):
    launch(tmp_path)
    results = [dict(np.load(tmp_path / f"process_{p}.npz")) for p in range(PROCESSES)]
    assert results[0].keys() == results[1].keys()
    for k in results[0]:  # both processes gathered the same global values
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)
    result = results[0]

    expected_batches = concatenated_batches(make_dataset())
    ref_losses, ref_gradients, ref_state, _ = train(
        make_mesh((1, 1, 1), devices=jax.devices()[:1]), expected_batches)
    ref_params = flat_params(jax.device_get(ref_state.params))
    for step, batch in enumerate(expected_batches):  # exact rows, in process order
        for k, v in batch.items():
            np.testing.assert_array_equal(result[f"batch/{step}/{k}"], v, err_msg=k)
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=GRADIENT_RTOL)
    # the run actually trains: step 1 scores the reference itself (loss log 2); later steps,
    # each on its own batch, score a policy the updates have moved away from it
    # (h = 0 up to the rounding of two summed log-probs of ~50 nats: a few ulp, ~4e-6 each)
    assert abs(ref_losses[0] - np.log(2.0)) < 1e-5, ref_losses
    assert all(abs(loss - np.log(2.0)) > 1e-3 for loss in ref_losses[1:]), ref_losses
    for step, gradient in enumerate(ref_gradients):
        for k, v in flat_params(jax.device_get(gradient)).items():
            assert np.linalg.norm(v) > 0, k  # every parameter gets a gradient to compare
            error = np.linalg.norm(result[f"gradient/{step}/{k}"] - v) / np.linalg.norm(v)
            assert error <= GRADIENT_RTOL, f"step {step + 1}: gradient of {k} off by {error:.2e}"
    for k in ref_params:  # the checkpoint written by both processes restores bitwise
        np.testing.assert_array_equal(result[f"restored/{k}"], result[f"params/{k}"], err_msg=k)
    error = str(result.get("replicated_batch_error"))  # mesh (1, 1, 4) refused
    assert "do not split the batch between the 2 processes" in error, error


if __name__ == "__main__":
    worker(pathlib.Path(sys.argv[1]))
