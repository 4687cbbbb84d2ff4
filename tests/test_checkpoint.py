"""Checkpoints: resume after kill -9 is bitwise identical; corrupt, partial, edited, non-finite
and superseded checkpoints are moved aside (never deleted) and never block a later save;
foreign ones are refused; HF export round-trips."""

from __future__ import annotations

import json
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

from alignax.data import BatchIterator
from alignax.models import create, from_pretrained, tiny_config
from alignax.training import checkpoint as checkpoint_module
from alignax.training.checkpoint import (Checkpointer, ConfigMismatchError, NonFiniteStateError,
                                         export_hf, flatten_state)
from alignax.training.state import split_model

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A complete training run (tiny Llama, DPO, checkpoints every 2 steps, resumable data iterator)
# run as a real subprocess: argv = run_dir, seconds to sleep after each step, JIT cache dir.
SCRIPT = textwrap.dedent('''
    import pathlib, sys, time
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from tiny_training import tiny_step
    from alignax.data import BatchIterator
    from alignax.models import tiny_config
    from alignax.training.checkpoint import Checkpointer, flatten_state
    from alignax.training.loop import train
    from alignax.training.mesh import make_mesh

    run, delay, steps = pathlib.Path(sys.argv[1]), float(sys.argv[2]), 10
    rng = np.random.default_rng(0)
    rows = {f"{r}_{c}": v for r in ("chosen", "rejected") for c, v in (
        ("input_ids", rng.integers(1, 64, (24, 12)).astype(np.int32)),
        ("attention_mask", np.ones((24, 12), np.int32)),
        ("loss_mask", np.arange(12)[None].repeat(24, 0) >= 4))}
    batches = BatchIterator(list(range(24)), lambda i: {k: v[np.asarray(i)] for k, v in rows.items()},
                            batch_size=4, seed=0)
    config = tiny_config("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1)
    step, state, _, reference = tiny_step(make_mesh(), config)
    checkpointer = Checkpointer(run / "checkpoints", config={"lr": 1e-4, "steps": steps},
                                save_every=2, keep=2)
    restored = checkpointer.restore_latest(state, batches=batches)
    if restored is not None:
        state, _, at = restored
        print("resumed from", at, flush=True)
    state = train(step, state, batches, num_steps=steps, mesh=make_mesh(),
                  reference_params=reference, checkpointer=checkpointer, progress=False,
                  on_step=lambda i, m: (print("step", i, flush=True), time.sleep(delay)))
    checkpointer.close()
    np.savez(run / "final.npz", **{k: np.asarray(v) for k, v in flatten_state(state).items()})
''')


def launch(run: pathlib.Path, delay: float) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    script = run / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "XLA_FLAGS": "",
           "JAX_PLATFORMS": "cpu"}
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
    return {"params": {"w": jnp.full((4, 3), float(value)), "b": jnp.arange(3.0) * value},
            "step": jnp.asarray(int(value), jnp.int32)}


def saved(directory: pathlib.Path, config: dict, steps=(2, 4)) -> Checkpointer:
    checkpointer = Checkpointer(directory, config=config, save_every=2, keep=3)
    for step in steps:
        checkpointer.save(step, small_state(step), data_state={"position": step})
    checkpointer.wait()
    return checkpointer


def quarantined(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (directory / "quarantine").glob("*"))


def warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records
                    if r.name == "alignax.training.checkpoint" and r.levelno == logging.WARNING)


def test_restore_returns_newest_with_data_state(tmp_path):
    checkpointer = saved(tmp_path, {"lr": 0.1})
    state, data_state, step = checkpointer.restore_latest(small_state(0))
    assert step == 4 and data_state == {"position": 4}
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 4.0))
    assert not checkpointer.save(5, small_state(5))  # not due: save_every=2
    assert not checkpointer.save(4, small_state(4))  # already on disk: this run resumed from it


def array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files, step_dir
    return files


def truncate_arrays(step_dir):
    for path in array_files(step_dir):
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def overwrite_arrays(step_dir):  # random bytes, same sizes
    rng = np.random.default_rng(0)
    for path in array_files(step_dir):
        path.write_bytes(rng.bytes(path.stat().st_size))


def flip_bits(step_dir):  # every 7th byte, in place
    for path in array_files(step_dir):
        data = bytearray(path.read_bytes())
        for i in range(0, len(data), 7):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))


def delete_metadata(step_dir):
    (step_dir / "meta" / "metadata").unlink()


def delete_array_index(step_dir):
    for path in (step_dir / "state").rglob("manifest.ocdbt"):
        path.unlink()


def empty_directory(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def edit_metadata(change):
    def edit(step_dir):
        path = step_dir / "meta" / "metadata"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
    return edit


CORRUPTIONS = {
    "truncated arrays": (truncate_arrays, "unreadable", "unreadable arrays"),
    "overwritten arrays": (overwrite_arrays, "unreadable", "unreadable arrays"),
    "flipped bits": (flip_bits, "unreadable", "unreadable arrays"),
    "deleted metadata": (delete_metadata, "unreadable", "unreadable metadata"),
    "deleted array index": (delete_array_index, "unreadable", "unreadable arrays"),
    "empty step directory": (empty_directory, "unreadable", "unreadable metadata"),
    "edited data position": (
        edit_metadata(lambda m: m["data_states"][0].update(position=999)), "corrupt",
        "does not match its digests (data_states edited"),
    "edited array fingerprint": (
        edit_metadata(lambda m: m["fingerprints"].update({"params.w": 1})), "corrupt",
        "(fingerprints edited"),
    "edited step": (edit_metadata(lambda m: m.update(step=2)), "corrupt", "(step edited"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_bad_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path, caplog, corruption):
    corrupt, kind, reason = CORRUPTIONS[corruption]
    saved(tmp_path, {"lr": 0.1})
    corrupt(tmp_path / "4")
    restarted = Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2)
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        state, data_state, step = restarted.restore_latest(small_state(0))
    assert step == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(state["params"]["b"], np.arange(3.0) * 2)
    message = warnings(caplog)
    assert f"checkpoint step 4 in {tmp_path} " in message and reason in message, message
    assert f"moved to {tmp_path / 'quarantine' / f'4.{kind}'}" in message, message
    assert quarantined(tmp_path) == [f"4.{kind}"] and restarted.all_steps() == [2]
    # the run reaches step 4 again: it is saved (a skipped checkpoint never blocks a save)
    assert restarted.save(4, small_state(5), data_state={"position": 4})
    restarted.wait()
    state, data_state, step = Checkpointer(tmp_path, config={"lr": 0.1},
                                           save_every=2).restore_latest(small_state(0))
    assert step == 4 and data_state == {"position": 4}
    np.testing.assert_array_equal(state["params"]["b"], np.arange(3.0) * 5)


def test_corrupt_newest_steps_do_not_block_the_saves_of_a_run_that_starts_over(tmp_path, caplog):
    """Steps 2 and 4 both corrupt: the restarted run begins at step 0 and saves step 2."""
    saved(tmp_path, {"lr": 0.1})
    flip_bits(tmp_path / "2")
    delete_metadata(tmp_path / "4")
    restarted = Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2)
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        assert restarted.restore_latest(small_state(0)) is None
    assert quarantined(tmp_path) == ["2.unreadable", "4.unreadable"]
    assert restarted.save(2, small_state(7))
    restarted.wait()
    assert restarted.all_steps() == [2]
    assert Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2).restore_latest(
        small_state(0))[2] == 2


def test_partial_step_directory_is_moved_aside(tmp_path, caplog):
    """A step directory copied from another step (here without its state item) is refused."""
    saved(tmp_path, {"lr": 0.1})
    shutil.copytree(tmp_path / "4", tmp_path / "6")
    shutil.rmtree(tmp_path / "6" / "state")
    restarted = Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2)
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        assert restarted.restore_latest(small_state(0))[2] == 4
    assert "checkpoint step 6" in warnings(caplog) and quarantined(tmp_path) == ["6.corrupt"]


def test_non_finite_state_is_never_saved_and_never_restored(tmp_path, caplog, monkeypatch):
    checkpointer = saved(tmp_path, {"lr": 0.1}, steps=(2,))
    bad = small_state(4)
    bad["params"]["w"] = bad["params"]["w"].at[1, 2].set(jnp.nan)
    bad["params"]["b"] = bad["params"]["b"].at[0].set(-jnp.inf)
    with pytest.raises(NonFiniteStateError, match=r"step 4 .* 2 of 3 arrays \(params\.b, params\.w\)"):
        checkpointer.save(4, bad)
    checkpointer.wait()
    assert checkpointer.all_steps() == [2]
    # a checkpoint holding NaN written without this check (as an older alignax did) is refused
    checks = checkpoint_module._checks
    monkeypatch.setattr(checkpoint_module, "_checks",
                        lambda flat: (checks(flat)[0], {k: True for k in flat}))
    assert checkpointer.save(4, bad)
    checkpointer.wait()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        state, _, step = Checkpointer(tmp_path, config={"lr": 0.1},
                                      save_every=2).restore_latest(small_state(0))
    assert step == 2 and np.isfinite(state["params"]["w"]).all()
    assert "holds non-finite values in 2 arrays (params.b, params.w)" in warnings(caplog)
    assert quarantined(tmp_path) == ["4.non_finite"]


def test_a_run_that_starts_over_moves_aside_the_newer_steps_of_the_earlier_run(tmp_path, caplog):
    """Without a resume, steps at or after the first save belong to another history."""
    saved(tmp_path, {"lr": 0.1}, steps=(2, 4, 6))
    fresh = Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2)
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        assert fresh.save(4, small_state(40))
    fresh.wait()
    assert "checkpoint step 6" in warnings(caplog) and "belongs to an earlier run" in warnings(caplog)
    assert quarantined(tmp_path) == ["4.superseded", "6.superseded"]
    assert fresh.all_steps() == [2, 4]
    state, _, step = Checkpointer(tmp_path, config={"lr": 0.1},
                                  save_every=2).restore_latest(small_state(0))
    assert step == 4 and float(state["params"]["b"][1]) == 40.0


def test_restore_sets_the_data_position_and_refuses_one_the_iterator_cannot_take(tmp_path):
    def iterator(**kwargs):
        settings = dict(batch_size=3, seed=0) | kwargs
        return BatchIterator(list(range(10)), np.asarray, **settings)

    original = iterator()
    for _ in range(5):
        next(original)
    checkpointer = Checkpointer(tmp_path, config={}, save_every=1)
    checkpointer.save(5, small_state(5), data_state=original.get_state())
    checkpointer.wait()
    resumed = iterator()
    assert checkpointer.restore_latest(small_state(0), batches=resumed)[2] == 5
    np.testing.assert_array_equal(next(resumed), next(original))
    # the position (5 batches) is past the end of a one-epoch iterator (3 batches)
    with pytest.raises(ConfigMismatchError, match="step 5 .* refuses its saved position"):
        Checkpointer(tmp_path, config={}, save_every=1).restore_latest(
            small_state(0), batches=iterator(num_epochs=1))
    with pytest.raises(ConfigMismatchError, match="batch_size"):
        Checkpointer(tmp_path, config={}, save_every=1).restore_latest(
            small_state(0), batches=iterator(batch_size=2))
    assert checkpointer.all_steps() == [5] and not (tmp_path / "quarantine").exists()


def test_a_state_of_another_structure_is_refused_and_the_checkpoints_left_in_place(tmp_path):
    saved(tmp_path, {"lr": 0.1})
    wider = small_state(0) | {"params": {"w": jnp.zeros((4, 5)), "b": jnp.zeros(3)}}
    with pytest.raises(ConfigMismatchError, match=r"step 4 .* another structure .* params\.w: "
                                                  r"\[\[4, 3\], 'float32'\] \(checkpoint\) != "
                                                  r"\[\[4, 5\], 'float32'\] \(run\)"):
        Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2).restore_latest(wider)
    extra = small_state(0) | {"extra": jnp.zeros(2, jnp.int32)}
    with pytest.raises(ConfigMismatchError, match=r"extra: missing \(checkpoint\)"):
        Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2).restore_latest(extra)
    assert Checkpointer(tmp_path, config={"lr": 0.1}, save_every=2).all_steps() == [2, 4]
    assert not (tmp_path / "quarantine").exists()


def test_bad_checkpointer_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="save_every must be an int >= 1, got 0"):
        Checkpointer(tmp_path, config={}, save_every=0)
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        Checkpointer(tmp_path, config={}, save_every=1, keep=0)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        Checkpointer(tmp_path, config={}, save_every=1).save(-1, small_state(1))


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
    diverged = jax.tree.map(lambda x: x.at[0].set(jnp.inf) if x.ndim == 2 else x, params)
    with pytest.raises(NonFiniteStateError, match=r"refusing to export .* non-finite values"):
        export_hf(graphdef, diverged, tmp_path / "nan", model_state=rest)
    assert not (tmp_path / "nan").exists()
