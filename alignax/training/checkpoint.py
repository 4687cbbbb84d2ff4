"""Checkpoints with orbax `CheckpointManager`: async save every N steps, keep the last K.

A checkpoint holds the whole train state (params, optimizer state, step, key) as one flat
dict of arrays, plus a JSON item with the run config, every process's data-iterator position,
each array's shape, dtype and bitwise fingerprint, and a SHA-256 digest of each of these parts.

Saving refuses a state with NaN/inf in a floating array (`NonFiniteStateError`), so a
checkpoint on disk is never a diverged state. Restoring walks the steps newest first: a
checkpoint whose metadata cannot be read or does not match its digests (e.g. an edited
data-iterator position), whose arrays cannot be read or do not match their fingerprints, or
whose arrays are not finite, is moved aside into `quarantine/` (never deleted) with a warning
naming it and why, and the next older one is tried. A checkpoint written under a different
config or for a state of another structure, or whose data position the run's iterator
refuses, is refused with an error that names the difference (and is left in place).

Saves never block on what is already on disk: a quarantined step is saved again when the run
reaches it, and steps at or after a save's step that this run neither wrote nor resumed from
(left by an earlier run that this one does not continue) are moved aside as superseded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from alignax.models import save_pretrained
from alignax.models.lora import merge, save_adapter
from alignax.training.state import has_adapters

log = logging.getLogger(__name__)

# The metadata parts covered by a digest each (so a mismatch names the part).
_DIGESTED = ("arrays", "config", "data_states", "fingerprints", "step")


class ConfigMismatchError(ValueError):
    """A checkpoint was written under a different run config (or data setup)."""


class NonFiniteStateError(ValueError):
    """A state holding NaN/inf in a floating array was refused (it is never checkpointed)."""


def flatten_state(tree: Any) -> dict[str, jax.Array]:
    """{"params.layers.0.attn.q.kernel": array, ...}: any pytree as a flat, named dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}


def unflatten_state(template: Any, flat: dict[str, jax.Array]) -> Any:
    """Inverse of `flatten_state` with `template`'s tree structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in paths]
    return jax.tree.unflatten(treedef, [flat[n] for n in names])


@jax.jit
def _checks(flat: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(uint32 checksum of each array's bits, whether each array is finite)."""

    def checksum(x):
        if x.dtype.itemsize != 4:
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            x = x.astype(jnp.float32) if floating else x.astype(jnp.int32)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # [N]
        weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
        return jnp.sum(words * weights, dtype=jnp.uint32) ^ jnp.sum(words, dtype=jnp.uint32)

    def finite(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.bool_(True)
        return jnp.all(jnp.isfinite(x))

    return ({k: checksum(v) for k, v in flat.items()}, {k: finite(v) for k, v in flat.items()})


def fingerprints(flat: dict[str, jax.Array]) -> dict[str, int]:
    """Per-array checksums as plain ints (JSON-able)."""
    return {k: int(v) for k, v in jax.device_get(_checks(flat)[0]).items()}


def non_finite(flat: dict[str, jax.Array]) -> list[str]:
    """Names of the floating arrays of `flat` that hold a NaN or an inf."""
    return [k for k, ok in jax.device_get(_checks(flat)[1]).items() if not ok]


def _layout(flat: dict[str, Any]) -> dict[str, list]:
    """{name: [shape, dtype name]} of a flat state (JSON-able)."""
    return {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()}


def _layout_difference(saved: dict[str, list], current: dict[str, list]) -> list[str]:
    """Arrays that are missing on one side or differ in shape or dtype."""
    diffs = []
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            diffs.append(f"{name}: {saved.get(name, 'missing')} (checkpoint) != "
                         f"{current.get(name, 'missing')} (run)")
    return diffs


def _canonical(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples -> lists, int keys -> str keys)."""
    return json.loads(json.dumps(value))


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _error(error: Exception, limit: int = 300) -> str:
    """`error` in one line of at most `limit` characters (tensorstore's messages run long)."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _named(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def config_difference(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts ("a.b: 1 != 2")."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if key not in saved or key not in current:
            diffs.append(f"{name}: {'missing' if key not in saved else saved[key]!r} (checkpoint) "
                         f"!= {'missing' if key not in current else current[key]!r} (run)")
        elif isinstance(saved[key], dict) and isinstance(current[key], dict):
            diffs.extend(config_difference(saved[key], current[key], prefix=f"{name}."))
        elif saved[key] != current[key]:
            diffs.append(f"{name}: {saved[key]!r} (checkpoint) != {current[key]!r} (run)")
    return diffs


def _gather_json(value: Any) -> list[Any]:
    """[value of process 0, value of process 1, ...]: a JSON-able value from every process."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))  # [P]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)  # [P, max size]
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(rows, sizes)]


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class Checkpointer:
    """Saves and restores train states of one run directory.

    Args:
      directory: where step directories go (created).
      config: the run config as a JSON-able dict; a checkpoint with a different one is refused.
      save_every: save when `step % save_every == 0` (and on `force=True`), >= 1.
      keep: how many most recent checkpoints to keep, >= 1.
      async_save: write in a background thread (`wait()` blocks until written).
      ignore_config_keys: top-level config keys allowed to differ on resume (e.g. the number
        of steps to run in total).
      quarantine: where refused checkpoints are moved (default `directory / "quarantine"`),
        as `<step>.<why>` directories (why: unreadable, corrupt, non_finite, superseded).
    """

    def __init__(self, directory: str | pathlib.Path, *, config: dict, save_every: int,
                 keep: int = 3, async_save: bool = True, ignore_config_keys: tuple[str, ...] = (),
                 quarantine: str | pathlib.Path | None = None):
        for name, value in (("save_every", save_every), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Checkpointer {name} must be an int >= 1, got {value!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.quarantine = (self.directory / "quarantine" if quarantine is None
                           else pathlib.Path(quarantine).absolute())
        self.config = _canonical(config)  # as it reads back (tuples -> lists)
        self.save_every = save_every
        self.ignore_config_keys = ignore_config_keys
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # Steps of this run's own history: saved by this object, or resumed from.
        self._own: set[int] = set()

    def _comparable(self, config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in self.ignore_config_keys}

    def all_steps(self) -> list[int]:
        """The steps on disk (not checked for readability), oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step on disk (not checked for readability), or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
        """Saves `state` (any pytree) at `step` if due (or forced); returns whether it saved.

        Returns False when the save is not due or this run already has `step` on disk (it
        saved it, or resumed from it). Every process calls it; each passes its own
        JSON-able `data_state` (its data-iterator position), all of which are stored.

        Raises:
          NonFiniteStateError: a floating array of `state` holds NaN or inf (nothing is written).
        """
        try:
            index = operator.index(step)  # ints, NumPy and JAX integer scalars
        except TypeError:
            index = -1
        if isinstance(step, bool) or index < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
        step = index
        if step in self._own or not (force or step % self.save_every == 0):
            return False
        flat = flatten_state(state)
        checksums, finite = jax.device_get(_checks(flat))
        bad = [k for k, ok in finite.items() if not ok]
        if bad:
            raise NonFiniteStateError(
                f"refusing to checkpoint step {step} in {self.directory}: non-finite values in "
                f"{len(bad)} of {len(flat)} arrays ({_named(bad)})")
        stale = [s for s in self.all_steps() if s >= step and s not in self._own]
        if stale:
            self.manager.wait_until_finished()
            for s in stale:
                self._move_aside(s, "superseded", f"is at or after step {step}, which this run "
                                 "is saving now, and belongs to an earlier run it does not "
                                 "continue")
        meta = {"config": self.config, "data_states": _canonical(_gather_json(data_state)),
                "step": step, "fingerprints": {k: int(v) for k, v in checksums.items()},
                "arrays": _layout(flat)}
        meta["digests"] = {part: _digest(meta[part]) for part in _DIGESTED}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=True)
        self._own.add(step)
        return True

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _move_aside(self, step: int, why: str, reason: str) -> None:
        """Renames step directory `step` to quarantine/<step>.<why>[.n] and logs a warning."""
        source = self.directory / str(step)
        target = self.quarantine / f"{step}.{why}"
        n = 1
        while target.exists():
            target = self.quarantine / f"{step}.{why}.{n}"
            n += 1
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"alignax checkpoint quarantine {step}")
        self.manager.reload()
        self._own.discard(step)
        log.warning("checkpoint step %d in %s %s; moved to %s", step, self.directory, reason,
                    target)

    def _read_meta(self, step: int) -> tuple[dict | None, str, str]:
        """(metadata, "", "") if step's metadata reads and matches its digests, else
        (None, "unreadable" or "corrupt", why)."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is refused
            return None, "unreadable", f"has unreadable metadata ({_error(error)})"
        if not isinstance(meta, dict) or not isinstance(meta.get("digests"), dict):
            return None, "corrupt", "has metadata without digests (edited, or not from alignax)"
        changed = [p for p in _DIGESTED if meta["digests"].get(p) != _digest(meta.get(p))]
        if changed:
            return None, "corrupt", (f"has metadata that does not match its digests "
                                     f"({', '.join(changed)} edited or corrupt)")
        if meta["step"] != step:
            return None, "corrupt", f"holds the metadata of step {meta['step']}"
        return meta, "", ""

    def restore_latest(self, template: Any, *, batches: Any = None
                       ) -> tuple[Any, Any, int] | None:
        """(state, data_state, step) of the newest good checkpoint, or None if there is none.

        Checkpoints that are unreadable, corrupt or not finite are moved aside (see the
        module docstring) and the next older one is tried. Every process calls it.

        Args:
          template: a state with the target structure, shapes, dtypes and shardings (e.g. a
            freshly initialised one); it is not modified.
          batches: optional data iterator (`get_state` / `set_state`, e.g.
            `alignax.data.BatchIterator`); the restored position is set on it and read back,
            so a position the iterator refuses (out of range, other settings) is an error
            here rather than at the first batch.

        Returns:
          data_state is this process's data-iterator position as it was passed to `save`.

        Raises:
          ConfigMismatchError: the newest good checkpoint has a different config, holds arrays
            of other names, shapes or dtypes than `template`, was written by a different number
            of processes, or `batches` refuses its data position.
        """
        flat_template = flatten_state(template)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in flat_template.items()}
        self.manager.wait_until_finished()
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            meta, kind, why = self._read_meta(step)
            if _any_process(meta is None):
                self._move_aside(step, kind or "unreadable",
                                 why or "is unreadable on another process")
                continue
            diffs = config_difference(self._comparable(meta["config"]),
                                      self._comparable(self.config))
            if diffs:
                raise ConfigMismatchError(
                    f"checkpoint step {step} in {self.directory} was written by a different "
                    f"config: {'; '.join(diffs)}")
            layout = _layout_difference(meta["arrays"], _canonical(_layout(flat_template)))
            if layout:
                raise ConfigMismatchError(
                    f"checkpoint step {step} in {self.directory} holds a state of another "
                    f"structure than the run's: {'; '.join(layout[:5])}"
                    + (f" and {len(layout) - 5} more" if len(layout) > 5 else ""))
            try:
                flat, why = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract))).state, ""
            except Exception as error:  # noqa: BLE001
                flat, why = None, f"has unreadable arrays ({_error(error)})"
            if _any_process(flat is None):
                self._move_aside(step, "unreadable", why or "is unreadable on another process")
                continue
            checksums, finite = jax.device_get(_checks(flat))
            corrupt = [k for k, v in checksums.items() if meta["fingerprints"].get(k) != int(v)]
            if corrupt:
                self._move_aside(step, "corrupt", f"has arrays that do not match their "
                                 f"fingerprints ({_named(corrupt)})")
                continue
            bad = [k for k, ok in finite.items() if not ok]
            if bad:
                self._move_aside(step, "non_finite", f"holds non-finite values in {len(bad)} "
                                 f"arrays ({_named(bad)})")
                continue
            data_states = meta["data_states"]
            if len(data_states) != jax.process_count():
                raise ConfigMismatchError(
                    f"checkpoint step {step} in {self.directory} was written by "
                    f"{len(data_states)} processes, this run has {jax.process_count()}")
            data_state = data_states[jax.process_index()]
            if batches is not None:
                self._set_data_state(batches, data_state, step)
            self._own.add(step)
            return unflatten_state(template, flat), data_state, step
        return None

    def _set_data_state(self, batches: Any, data_state: Any, step: int) -> None:
        try:
            batches.set_state(data_state)
            read_back = _canonical(batches.get_state())
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory}: the data iterator refuses its "
                f"saved position {data_state!r} ({_error(error)})") from error
        if read_back != data_state:
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory}: the data iterator restored "
                f"position {read_back!r}, not the saved {data_state!r}")


ADAPTER_DIR = "adapter"


def export_hf(graphdef, params, path: str | pathlib.Path, model_state: Any = None) -> None:
    """Writes the policy as HF safetensors + config.json (`alignax.models.save_pretrained`).

    A LoRA model is written with its adapters merged into the weights (W + (alpha/r) A B,
    `alignax.models.lora.merge`), and its adapters alone as a PEFT adapter in
    `path/adapter` (`save_adapter`; `peft.PeftModel.from_pretrained` loads it onto the base
    model). The adapter is a subdirectory because transformers treats a directory holding
    adapter_config.json as an adapter, not as a model.

    Raises:
      NonFiniteStateError: a parameter holds NaN or inf (nothing is written).
    """
    bad = non_finite(flatten_state(params))
    if bad:
        raise NonFiniteStateError(f"refusing to export to {path}: non-finite values in "
                                  f"{len(bad)} parameters ({_named(bad)})")
    params = jax.device_get(params)
    model = nnx.merge(graphdef, params) if model_state is None else nnx.merge(graphdef, params,
                                                                               model_state)
    if has_adapters(model):
        save_adapter(model, pathlib.Path(path) / ADAPTER_DIR)
        model = merge(model)
    save_pretrained(model, str(path))
