"""Reference log-probs precomputed once and cached on disk, keyed so a stale cache is never used.

With a frozen reference the step recomputes log pi_ref every update (one extra forward pass).
When the reference and the data are fixed, `cached_reference_logps` computes them once per
record and stores them under a key that hashes the reference weights, the tokenized data
(every token id of every example, in order) and the tokenizer (vocabulary, merges, special
tokens, chat template). Any change to one of them changes the file name, so an old cache is
simply not found. `WithReferenceLogps` then adds f"{role}_reference_logps" [B] to each batch
of an iterator, for `make_train_step(..., reference="cached")`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from alignax.training.state import cast_floating
from alignax.training.step import packed_role_logprobs, role_logprobs

log = logging.getLogger(__name__)


def weights_hash(params: Any) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = {
        "tokenizer": backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def data_hash(examples: Sequence) -> str:
    """sha256 over each example's record index, prompt ids and response ids, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.index}|".encode())
        digest.update(np.asarray(ex.prompt_ids, np.int64).tobytes())
        for role in sorted(ex.responses):
            for response in ex.responses[role]:
                digest.update(f"|{role}|".encode())
                digest.update(np.asarray(response, np.int64).tobytes())
    return digest.hexdigest()


def compute_reference_logps(graphdef: nnx.GraphDef, params: Any, dataset, roles: tuple[str, ...], *,
                            batch_size: int, model_state: Any = None, compute_dtype="float32",
                            chunk_size: int = 1024, vocab_chunk_size: int | None = 8192,
                            share_prompt: bool = False) -> dict[str, np.ndarray]:
    """log pi_ref(response | prompt) of every example of `dataset` (an alignax PreferenceDataset).

    `share_prompt` scores each example's responses after one copy of its prompt
    (`alignax.training.step.packed_role_logprobs`): the same values up to float32 rounding.

    Returns:
      role -> [max record index + 1] float32 (NaN at indices of dropped records; grouped
      roles give [N, K]).
    """

    @jax.jit
    def forward(params, model_state, batch):  # the frozen model state is an argument
        compute = cast_floating(params, compute_dtype)
        model = (nnx.merge(graphdef, compute) if model_state is None
                 else nnx.merge(graphdef, compute, model_state))
        score = packed_role_logprobs if share_prompt else role_logprobs
        return score(model, batch, roles, chunk_size=chunk_size,
                     vocab_chunk_size=vocab_chunk_size)

    size = max(ex.index for ex in dataset) + 1
    table: dict[str, np.ndarray] = {}
    batches = dataset.batches(batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                              drop_remainder=False, share_prompt=share_prompt)
    for batch in batches:
        rows = len(batch["record_index"])
        if rows < batch_size:  # pad the last batch to the compiled size, drop the extra rows
            batch = {k: np.concatenate([v] + [v[-1:]] * (batch_size - rows)) if v.ndim and
                     v.shape[0] == rows else v for k, v in batch.items()}
        if share_prompt:  # the packed rows hold every role; their loss masks say which
            keep = {k: v for k, v in batch.items()
                    if k.startswith("packed_") or k.endswith("_loss_mask")}
        else:
            keep = {f"{r}_{c}": batch[f"{r}_{c}"] for r in roles
                    for c in ("input_ids", "attention_mask", "loss_mask")}
        out = jax.device_get(forward(params, model_state, keep))
        for role in roles:
            values = np.asarray(out[role])[:rows]
            if role not in table:
                table[role] = np.full((size, *values.shape[1:]), np.nan, np.float32)
            table[role][batch["record_index"][:rows]] = values
    return table


def cached_reference_logps(cache_dir: str | pathlib.Path, graphdef: nnx.GraphDef, params: Any,
                           dataset, tokenizer, roles: tuple[str, ...], *, batch_size: int,
                           **kwargs) -> dict[str, np.ndarray]:
    """`compute_reference_logps`, loaded from / saved to `cache_dir/<key>.npz`.

    The key is sha256(weights_hash, data_hash, tokenizer_hash, roles, compute settings); its
    components are written next to the arrays in `<key>.json`.
    """
    parts = {"weights": weights_hash(params), "data": data_hash(dataset.examples),
             "tokenizer": tokenizer_hash(tokenizer), "roles": list(roles),
             "settings": {k: str(v) for k, v in sorted(kwargs.items())}}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = pathlib.Path(cache_dir)
    path = cache_dir / f"{key}.npz"
    if path.exists():
        log.info("reference log-probs: cache hit %s", path)
        with np.load(path) as data:
            return {role: data[role] for role in roles}
    log.info("reference log-probs: computing (cache miss, key %s)", key)
    table = compute_reference_logps(graphdef, params, dataset, roles, batch_size=batch_size,
                                    **kwargs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{key}.tmp.npz"
    np.savez(tmp, **table)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache under the key
    (cache_dir / f"{key}.json").write_text(json.dumps(parts, indent=1))
    return table


class WithReferenceLogps(Iterator[dict]):
    """Wraps a batch iterator, adding f"{role}_reference_logps" looked up by "record_index"."""

    def __init__(self, batches, table: dict[str, np.ndarray]):
        self.batches = batches
        self.table = table

    def __next__(self) -> dict:
        batch = next(self.batches)
        index = batch["record_index"]
        for role, values in self.table.items():
            looked_up = values[index]
            if np.isnan(looked_up).any():
                raise ValueError(f"no cached reference log-prob for role {role!r} of records "
                                 f"{index[np.isnan(looked_up).reshape(len(index), -1).any(-1)]}")
            batch[f"{role}_reference_logps"] = looked_up
        return batch

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)
