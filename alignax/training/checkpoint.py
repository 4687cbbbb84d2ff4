"""Checkpoints with orbax `CheckpointManager`: async save every N steps, keep the last K.

A checkpoint holds the whole train state (params, optimizer state, step, key) as one flat
dict of arrays, plus a JSON item with the run config, the data-iterator position and a
bitwise fingerprint of every array. Restoring walks the steps newest first: a partial save
(interrupted before orbax finalised it) is invisible to orbax, and a checkpoint that fails to
read or whose arrays do not match their fingerprints is skipped with a message. A checkpoint
written under a different config is refused with an error that names the differing fields.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from alignax.models import save_pretrained

log = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
    """A checkpoint was written under a different run config."""


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
def _fingerprints(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A uint32 checksum of each array's bits (sum of its 32-bit words, position-weighted)."""

    def one(x):
        if x.dtype.itemsize != 4:
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            x = x.astype(jnp.float32) if floating else x.astype(jnp.int32)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # [N]
        weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
        return jnp.sum(words * weights, dtype=jnp.uint32) ^ jnp.sum(words, dtype=jnp.uint32)

    return {k: one(v) for k, v in flat.items()}


def fingerprints(flat: dict[str, jax.Array]) -> dict[str, int]:
    """Per-array checksums as plain ints (JSON-able)."""
    return {k: int(v) for k, v in jax.device_get(_fingerprints(flat)).items()}


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


class Checkpointer:
    """Saves and restores train states of one run directory.

    Args:
      directory: where step directories go (created).
      config: the run config as a JSON-able dict; a checkpoint with a different one is refused.
      save_every: save when `step % save_every == 0` (and on `force=True`).
      keep: how many most recent checkpoints to keep.
      async_save: write in a background thread (`wait()` blocks until written).
      ignore_config_keys: top-level config keys allowed to differ on resume (e.g. the number
        of steps to run in total).
    """

    def __init__(self, directory: str | pathlib.Path, *, config: dict, save_every: int,
                 keep: int = 3, async_save: bool = True, ignore_config_keys: tuple[str, ...] = ()):
        self.directory = pathlib.Path(directory).absolute()
        self.config = json.loads(json.dumps(config))  # as it reads back (tuples -> lists)
        self.ignore_config_keys = ignore_config_keys
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _comparable(self, config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in self.ignore_config_keys}

    def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
        """Saves `state` (any pytree) at `step` if due (or forced); returns whether it saved."""
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return False
        flat = flatten_state(state)
        meta = {"config": self.config, "data_state": data_state, "step": int(step),
                "fingerprints": fingerprints(flat)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def latest_step(self) -> int | None:
        """The newest step on disk (not checked for readability), or None."""
        return self.manager.latest_step()

    def restore_latest(self, template: Any) -> tuple[Any, Any, int] | None:
        """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

        Args:
          template: a state with the target structure, shapes, dtypes and shardings (e.g. a
            freshly initialised one); it is not modified.

        Raises:
          ConfigMismatchError: the newest readable checkpoint has a different config.
        """
        flat_template = flatten_state(template)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in flat_template.items()}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log.warning("skipping checkpoint step %d in %s: metadata unreadable (%s)", step,
                            self.directory, error)
                continue
            diffs = config_difference(self._comparable(meta.get("config", {})),
                                      self._comparable(self.config))
            if diffs:
                raise ConfigMismatchError(
                    f"checkpoint step {step} in {self.directory} was written by a different "
                    f"config: {'; '.join(diffs)}")
            try:
                flat = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract))).state
                bad = [k for k, v in fingerprints(flat).items() if meta["fingerprints"].get(k) != v]
            except Exception as error:  # noqa: BLE001
                log.warning("skipping checkpoint step %d in %s: arrays unreadable (%s)", step,
                            self.directory, error)
                continue
            if bad:
                log.warning("skipping checkpoint step %d in %s: corrupt arrays %s", step,
                            self.directory, bad[:5])
                continue
            return unflatten_state(template, flat), meta["data_state"], step
        return None


def export_hf(graphdef, params, path: str | pathlib.Path, model_state: Any = None) -> None:
    """Writes the policy as HF safetensors + config.json (`alignax.models.save_pretrained`)."""
    params = jax.device_get(params)
    model = nnx.merge(graphdef, params) if model_state is None else nnx.merge(graphdef, params,
                                                                               model_state)
    save_pretrained(model, str(path))
