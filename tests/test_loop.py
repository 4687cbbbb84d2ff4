"""The training loop through real restarts of a tiny DPO run: corrupt newest checkpoints never
stop a run from saving, a resumed run's metrics hold each step once, `num_steps` is checked, a
finished run started again is a no-op, and every stop says truly what is on disk.

One run (`run`) = a fresh state, iterator, Checkpointer and MetricsLogger on a run directory:
restore the newest good checkpoint, then train; the compiled step is shared by the module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import tiny_step

from alignax.data import BatchIterator
from alignax.models import tiny_config
from alignax.training.checkpoint import Checkpointer, flatten_state
from alignax.training.loop import MetricsLogger, NonFiniteLossError, train
from alignax.training.mesh import make_mesh

STEPS, ROWS, BATCH, LENGTH = 12, 24, 4, 12
MESH = make_mesh((1, 1, 1), devices=jax.devices()[:1])
CONFIG = tiny_config("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1)
_rng = np.random.default_rng(0)
PAIRS = {f"{r}_{c}": v for r in ("chosen", "rejected") for c, v in (
    ("input_ids", _rng.integers(1, 64, (ROWS, LENGTH)).astype(np.int32)),
    ("attention_mask", np.ones((ROWS, LENGTH), np.int32)),
    ("loss_mask", np.arange(LENGTH)[None].repeat(ROWS, 0) >= 4))}
TIMING = ("step_time", "tokens_per_sec")


def pairs(**kwargs) -> BatchIterator:
    return BatchIterator(list(range(ROWS)), lambda i: {k: v[np.asarray(i)] for k, v in PAIRS.items()},
                         batch_size=BATCH, seed=0, **kwargs)


@pytest.fixture(scope="module")
def setup():
    step, state, _, reference = tiny_step(MESH, CONFIG)
    return step, state, reference


def run(setup, run_dir: pathlib.Path, num_steps: int, *, step=None, save_every: int = 2,
        batches: BatchIterator | None = None):
    """One start of the run in `run_dir`; returns (final state, step resumed from or None)."""
    default_step, initial, reference = setup
    state = jax.tree.map(jnp.copy, initial)  # the step donates its state
    batches = batches or pairs()
    checkpointer = Checkpointer(run_dir / "checkpoints", config={"run": "dpo"},
                                save_every=save_every, keep=2)
    restored = checkpointer.restore_latest(state, batches=batches)
    if restored is not None:
        state = restored[0]
    logger = MetricsLogger(run_dir, tensorboard=False)
    try:
        state = train(step or default_step, state, batches, num_steps=num_steps, mesh=MESH,
                      reference_params=reference, checkpointer=checkpointer, logger=logger,
                      progress=False)
    finally:
        logger.close()
        checkpointer.close()
    return state, None if restored is None else restored[2]


def on_disk(run_dir: pathlib.Path) -> tuple[list[int], list[str]]:
    """(checkpoint steps, quarantined directory names) of a run."""
    directory = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
    return steps, sorted(p.name for p in (directory / "quarantine").glob("*"))


def metrics(run_dir: pathlib.Path) -> list[dict]:
    """metrics.jsonl's records as written (duplicates kept), without the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a, b):
    flat_a, flat_b = flatten_state(jax.device_get(a)), flatten_state(jax.device_get(b))
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        np.testing.assert_array_equal(flat_a[name], flat_b[name], err_msg=name)  # bitwise


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """A run to step 12 in one go: checkpoints 10 and 12 on disk (keep=2)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    state, resumed = run(setup, run_dir, STEPS)
    assert resumed is None and on_disk(run_dir) == ([10, 12], [])
    return run_dir, jax.device_get(state)


def copy_run(uninterrupted, tmp_path) -> pathlib.Path:
    shutil.copytree(uninterrupted[0], tmp_path / "run")
    return tmp_path / "run"


def array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files, step_dir
    return files


def test_with_steps_10_and_12_corrupt_a_restarted_run_saves_from_step_2_on(setup, uninterrupted,
                                                                           tmp_path, caplog):
    run_dir = copy_run(uninterrupted, tmp_path)
    for path in array_files(run_dir / "checkpoints" / "10"):  # truncated array files
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    (run_dir / "checkpoints" / "12" / "meta" / "metadata").unlink()  # deleted metadata
    with caplog.at_level(logging.WARNING, logger="alignax.training.checkpoint"):
        _, resumed = run(setup, run_dir, 4)  # starts over: trains steps 1-4
    assert resumed is None
    assert on_disk(run_dir) == ([2, 4], ["10.unreadable", "12.unreadable"])
    assert "checkpoint step 12" in caplog.text and "checkpoint step 10" in caplog.text
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]  # the old run's records dropped
    state, resumed = run(setup, run_dir, STEPS)  # started again: resumes from 4, reaches 12
    assert resumed == 4 and on_disk(run_dir)[0] == [10, 12]
    assert_same_state(state, uninterrupted[1])
    assert metrics(run_dir) == metrics(uninterrupted[0])  # each step once, same values


def test_with_step_12_corrupt_the_run_redoes_11_and_12_once_and_saves_12(setup, uninterrupted,
                                                                          tmp_path, caplog):
    run_dir = copy_run(uninterrupted, tmp_path)
    for path in array_files(run_dir / "checkpoints" / "12"):  # overwritten array files
        path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    state, resumed = run(setup, run_dir, STEPS)
    assert resumed == 10 and on_disk(run_dir) == ([10, 12], ["12.unreadable"])
    assert_same_state(state, uninterrupted[1])
    assert metrics(run_dir) == metrics(uninterrupted[0])  # 11 and 12 logged once
    # started again: step 12 is good now, so nothing is redone
    with caplog.at_level(logging.INFO, logger="alignax.training.loop"):
        state, resumed = run(setup, run_dir, STEPS)
    assert resumed == 12 and on_disk(run_dir) == ([10, 12], ["12.unreadable"])
    assert "already at step 12 of num_steps=12, nothing to train" in caplog.text
    assert_same_state(state, uninterrupted[1])
    assert metrics(run_dir) == metrics(uninterrupted[0])


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True])
def test_bad_num_steps_is_refused_before_anything_runs(setup, num_steps, tmp_path):
    def step(*args):
        raise AssertionError("the step ran")

    batches = pairs()
    with pytest.raises(ValueError, match=f"num_steps must be an int > 0, got {num_steps!r}"):
        train(step, setup[1], batches, num_steps=num_steps, mesh=MESH)
    assert batches.get_state()["grain"] == {"next_index": 0}


def poisoned_at(bad_step: int):
    """A step whose update at `bad_step` makes every parameter NaN while its loss (taken at the
    old parameters) is finite: what an optimizer with a NaN learning rate did."""
    def wrap(step):
        def poisoned(state, batch, reference):
            new, metrics = step(state, batch, reference)
            if int(new.step) == bad_step:
                new = dataclasses.replace(new, params=jax.tree.map(lambda x: x * jnp.nan,
                                                                   new.params))
            return new, metrics
        return poisoned
    return wrap


@pytest.mark.parametrize("bad_step,message,newest", [
    # the state after step 3 is not due (save_every=2); step 4's loss is NaN, the loop stops
    (3, r"non-finite loss nan, .* at step 4; the state at step 3 was not checkpointed "
        r"\(refusing to checkpoint step 3 .* non-finite values in \d+ of \d+ arrays .*\); the "
        r"newest checkpoint on disk is step 2", 2),
    # the state after step 2 is due: the save refuses it and the loop stops at once
    (2, r"the update of step 2 left a non-finite state, which was not checkpointed \(refusing "
        r"to checkpoint step 2 .*\); the newest checkpoint on disk is none", None),
])
def test_a_stop_for_nan_never_saves_nor_claims_a_non_finite_state(setup, tmp_path, bad_step,
                                                                  message, newest):
    with pytest.raises(NonFiniteLossError, match=message):
        run(setup, tmp_path, 8, step=poisoned_at(bad_step)(setup[0]))
    restored = Checkpointer(tmp_path / "checkpoints", config={"run": "dpo"},
                            save_every=2).restore_latest(setup[1])
    assert (restored and restored[2]) == newest and on_disk(tmp_path)[1] == []
    if restored is not None:
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored[0].params))


def test_a_stop_without_a_checkpointer_says_nothing_was_saved(setup):
    step, initial, reference = setup
    with pytest.raises(NonFiniteLossError, match=r"at step 4; the last state \(step 3\) was not "
                                                 r"saved: no checkpointer was given"):
        train(poisoned_at(3)(step), jax.tree.map(jnp.copy, initial), pairs(), num_steps=8,
              mesh=MESH, reference_params=reference, progress=False)


def test_an_iterator_that_runs_out_checkpoints_the_last_state_first(setup, tmp_path):
    one_epoch = pairs(num_epochs=1)  # 24 rows / 4 = 6 batches
    with pytest.raises(ValueError, match=r"ran out after step 6 of num_steps=10; the last good "
                                         r"state \(step 6\) was checkpointed"):
        run(setup, tmp_path, 10, save_every=4, batches=one_epoch)
    assert on_disk(tmp_path)[0] == [4, 6]


def read_events(path: pathlib.Path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_resume_drops_the_records_after_the_resumed_step(tmp_path, caplog):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 7):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 7, "lo')  # a record cut short by kill -9
    logger = MetricsLogger(tmp_path)
    with caplog.at_level(logging.INFO, logger="alignax.training.loop"):
        logger.resume(4)
    for step in (5, 6):
        logger.log(step, {"loss": 10.0 * step})
    logger.close()
    assert "dropping unreadable lines [7]" in caplog.text
    assert "dropping 2 records after step 4" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [
        {"step": 5, "loss": 50.0}, {"step": 6, "loss": 60.0}]
    # TensorBoard: the resumed writer's file tells readers to purge the old steps >= 5
    first, second = sorted((tmp_path / "tensorboard").glob("events.*"),
                           key=lambda p: p.stat().st_mtime_ns)
    assert not any(e.HasField("session_log") for e in read_events(first))
    events = read_events(second)
    starts = [e for e in events if e.HasField("session_log")]
    assert len(starts) == 1 and starts[0].step == 5 and starts[0].session_log.status == 1  # START
    assert [(e.step, e.summary.value[0].simple_value) for e in events if e.HasField("summary")] \
        == [(5, 50.0), (6, 60.0)]
