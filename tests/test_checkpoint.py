"""Checkpoints: resume after kill -9 is bitwise identical; corrupt / partial / foreign
checkpoints are skipped or refused; HF export round-trips."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax.models import create, from_pretrained, tiny_config
from alignax.training.checkpoint import (Checkpointer, ConfigMismatchError, export_hf,
                                         flatten_state)
from alignax.training.state import split_model

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A complete training run (tiny Llama, DPO, checkpoints every 2 steps, resumable data iterator)
# run as a real subprocess: argv = run_dir, seconds to sleep after each step.
SCRIPT = textwrap.dedent('''
    import pathlib, sys, time
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from flax import nnx
    from alignax.data import BatchIterator
    from alignax.models import create, tiny_config
    from alignax.training.checkpoint import Checkpointer, flatten_state
    from alignax.training.loop import train
    from alignax.training.mesh import make_mesh
    from alignax.objectives import DPO
    from alignax.training.state import OptimizerConfig, create_train_state, make_optimizer, split_model
    from alignax.training.step import StepConfig, make_train_step

    run, delay, steps = pathlib.Path(sys.argv[1]), float(sys.argv[2]), 10
    rng = np.random.default_rng(0)
    rows = {f"{r}_{c}": v for r in ("chosen", "rejected") for c, v in (
        ("input_ids", rng.integers(1, 64, (24, 12)).astype(np.int32)),
        ("attention_mask", np.ones((24, 12), np.int32)),
        ("loss_mask", np.arange(12)[None].repeat(24, 0) >= 4))}
    batches = BatchIterator(list(range(24)), lambda i: {k: v[np.asarray(i)] for k, v in rows.items()},
                            batch_size=4, seed=0)
    mesh = make_mesh()
    config = tiny_config("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1)
    graphdef, params, rest = split_model(create(config, rngs=nnx.Rngs(0), mesh=mesh))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="cosine",
                                                         warmup_steps=2, total_steps=steps))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    reference = jax.tree.map(lambda x: x.copy(), state.params)
    step = make_train_step(graphdef, DPO(beta=0.5), optimizer,
                           schedule, mesh=mesh, state_shardings=shardings, model_state=rest,
                           config=StepConfig(chunk_size=16))
    checkpointer = Checkpointer(run / "checkpoints", config={"lr": 1e-3, "steps": steps},
                                save_every=2, keep=2)
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state, data_state, at = restored
        batches.set_state(data_state)
        print("resumed from", at, flush=True)
    state = train(step, state, batches, num_steps=steps, mesh=mesh, reference_params=reference,
                  checkpointer=checkpointer, progress=False,
                  on_step=lambda i, m: (print("step", i, flush=True), time.sleep(delay)))
    checkpointer.close()
    np.savez(run / "final.npz", **{k: np.asarray(v) for k, v in flatten_state(state).items()})
''')


def launch(run: pathlib.Path, delay: float) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    script = run / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(script), str(run), str(delay),
                             str(ROOT / ".jax_cache")], env=env, cwd=run,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    uninterrupted = launch(tmp_path / "a", 0.0)
    killed = launch(tmp_path / "b", 0.4)
    deadline = time.monotonic() + 300
    while max(finished_steps(tmp_path / "b" / "checkpoints"), default=0) < 4:
        assert killed.poll() is None, killed.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)  # kill -9, mid-run
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "final.npz").exists()
    resumed = launch(tmp_path / "b", 0.0)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "step 1\n" not in output, output
    output = uninterrupted.communicate(timeout=300)[0]
    assert uninterrupted.returncode == 0, output
    with np.load(tmp_path / "a" / "final.npz") as a, np.load(tmp_path / "b" / "final.npz") as b:
        assert sorted(a) == sorted(b) and int(a["step"]) == 10
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bitwise


def small_state(value: float):
    return {"params": {"w": jnp.full((4, 3), value), "b": jnp.arange(3.0) * value},
            "step": jnp.asarray(int(value), jnp.int32)}


def saved(directory: pathlib.Path, config: dict, steps=(2, 4)) -> Checkpointer:
    checkpointer = Checkpointer(directory, config=config, save_every=2, keep=3)
    for step in steps:
        checkpointer.save(step, small_state(step), data_state={"position": step})
    checkpointer.wait()
    return checkpointer


def test_restore_returns_newest_with_data_state(tmp_path):
    checkpointer = saved(tmp_path, {"lr": 0.1})
    state, data_state, step = checkpointer.restore_latest(small_state(0))
    assert step == 4 and data_state == {"position": 4}
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 4.0))
    assert not checkpointer.save(5, small_state(5))  # not due: save_every=2


def test_corrupt_and_partial_checkpoints_are_skipped(tmp_path, caplog):
    checkpointer = saved(tmp_path, {"lr": 0.1})
    # a partial step-6 directory (the state item never written)
    shutil.copytree(tmp_path / "4", tmp_path / "6")
    shutil.rmtree(tmp_path / "6" / "state")
    # corrupt every data file of step 4 (bit flips in place, same sizes)
    for path in (tmp_path / "4" / "state").rglob("*"):
        if path.is_file() and "/d/" in str(path):
            data = bytearray(path.read_bytes())
            for i in range(0, len(data), 7):
                data[i] ^= 0x5A
            path.write_bytes(bytes(data))
    checkpointer = Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2)
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        state, data_state, step = checkpointer.restore_latest(small_state(0))
    assert step == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(state["params"]["b"], np.arange(3.0) * 2)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping checkpoint step 6" in messages and "skipping checkpoint step 4" in messages


def test_checkpoint_from_other_config_is_refused_naming_the_difference(tmp_path):
    saved(tmp_path, {"lr": 0.1, "model": {"layers": 2}})
    other = Checkpointer(tmp_path, config={"lr": 0.1, "model": {"layers": 4}}, save_every=2)
    with pytest.raises(ConfigMismatchError, match=r"model\.layers: 2 \(checkpoint\) != 4 \(run\)"):
        other.restore_latest(small_state(0))
    allowed = Checkpointer(tmp_path, config={"lr": 0.1, "model": {"layers": 4}}, save_every=2,
                           ignore_config_keys=("model",))
    assert allowed.restore_latest(small_state(0))[2] == 4


def test_export_to_hf_safetensors_round_trips(tmp_path):
    config = tiny_config("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1)
    graphdef, params, rest = split_model(create(config, rngs=nnx.Rngs(3)))
    params = jax.tree.map(lambda x: x + 0.01, params)  # "trained"
    export_hf(graphdef, params, tmp_path / "hf", model_state=rest)
    assert (tmp_path / "hf" / "config.json").exists()
    assert list((tmp_path / "hf").glob("*.safetensors"))
    loaded = nnx.split(from_pretrained(tmp_path / "hf"), nnx.Param, ...)[1]
    for (name, a), b in zip(flatten_state(params).items(), flatten_state(loaded).values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
