"""`make_train_step`: one jitted, sharded, state-donating update for any registered objective.

Data flow: batch -> policy (and frozen reference) final hidden states ->
`chunked_sequence_logprobs` per role (never [B, T, V] logits) -> typed scores per role
(`alignax.objectives.Scores`: log-probs, log-ratios h, token counts, group masks) ->
objective -> mean -> grad (accumulated over micro-batches) -> optax update. The update is
applied only when the loss, the gradient, the new parameters and the new optimizer state are
all finite; otherwise the state comes back unchanged, so the caller can save it as the last
good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from alignax.logprobs import chunked_sequence_logprobs, next_token_targets
from alignax.models.remat import check_remat
from alignax.objectives.registry import REWARD_MODEL, Objective, ObjectiveInputs, Scores
from alignax.training.compatibility import check_batch, check_compatible
from alignax.training.mesh import BATCH_AXES, batch_sharding, replicated
from alignax.training.state import TrainState, cast_floating, has_adapters

# The step's key stream for LoRA dropout (the objective draws from the step key itself).
_DROPOUT_STREAM = 0x10A
REFERENCES = ("model", "cached", "base")

@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How a step computes (not what it optimises).

    grad_accum_steps: micro-batches per update; the batch size must be a multiple of it.
    remat: None, "dots", "full" or "offload": per-layer rematerialisation of the model
      forward (`alignax.models.remat`).
    compute_dtype: "float32" or "bfloat16" activations/matmuls; the master parameters,
      optimizer state, log-probs and losses stay float32.
    chunk_size / vocab_chunk_size: `chunked_sequence_logprobs` blocks.
    share_prompt: score every role from the batch's packed rows (one copy of the prompt, then
      all responses; `alignax.data.batching`, `collate(share_prompt=True)`), so the prompt
      runs through the policy and the reference once instead of once per response. Same
      log-probs as the unpacked rows up to float32 rounding; log-prob objectives only.
    """

    grad_accum_steps: int = 1
    remat: str | None = None
    compute_dtype: str = "float32"
    chunk_size: int = 1024
    vocab_chunk_size: int | None = 8192
    share_prompt: bool = False


def score_windows(length: int) -> tuple[int, ...]:
    """The widths W an unpacked row's scored span may be cut to: T/4, T/2 and T, ascending.

    >>> score_windows(128)
    (32, 64, 128)
    """
    return tuple(sorted({max(1, length // 4), max(1, length // 2), length}))


def sharded_sequence_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                               mask: jax.Array, *, chunk_size: int,
                               vocab_chunk_size: int | None, mesh: Mesh | None) -> jax.Array:
    """`chunked_sequence_logprobs` run per batch shard of `mesh`.

    The chunk loops slice the rows' positions dynamically; on a batch-sharded array such a
    slice makes the partitioner gather the rows, so every device would score every chunk of
    the global batch. Under `jax.shard_map` over `BATCH_AXES` each device scores only its own
    rows (`chunk_size` positions of them at a time) and the unembedding's gradient is summed
    over the shards once, on exit. Without a mesh, with one batch shard, or with N not
    divisible by the shards, it is `chunked_sequence_logprobs` itself.

    Args:
      hidden: [N, T, D]; unembedding: [D, V]; targets: [N, T] int; mask: [N, T] bool.
      chunk_size, vocab_chunk_size: as `chunked_sequence_logprobs` (per shard).
      mesh: the training mesh, or None.

    Returns:
      [N] float32 summed log-probs.
    """
    score = functools.partial(chunked_sequence_logprobs, chunk_size=chunk_size,
                              vocab_chunk_size=vocab_chunk_size)
    shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)
    if shards == 1 or hidden.shape[0] % shards:
        return score(hidden, unembedding, targets, mask)
    rows = P(BATCH_AXES)
    return jax.shard_map(score, mesh=mesh, in_specs=(rows, P(), rows, rows), out_specs=rows,
                         axis_names=frozenset(BATCH_AXES), check_vma=False)(
        hidden, unembedding, targets, mask)


def windowed_sequence_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                               mask: jax.Array, *, chunk_size: int,
                               vocab_chunk_size: int | None, mesh: Mesh | None = None
                               ) -> jax.Array:
    """`chunked_sequence_logprobs` of right-padded rows, unembedding only their scored spans.

    Each row's scored positions (its response: mask True) form one span from its first to
    its last True. The smallest width W of `score_windows(T)` that holds every row's span is
    chosen in the program (`lax.switch`, shapes stay static); each row's W positions from
    its own start (per-row gather, clipped to end at T) are scored, so the prompt positions
    and the padding before them never reach the unembedding. Exact: the same per-position
    log-probs, summed over the same scored positions (float32 summation order aside).

    Args:
      hidden: [N, T, D] final hidden states.
      unembedding: [D, V].
      targets: [N, T] int next-token targets.
      mask: [N, T] bool, True on the positions to score.
      chunk_size, vocab_chunk_size: as `chunked_sequence_logprobs`.
      mesh: the training mesh: each batch shard scores its own rows
        (`sharded_sequence_logprobs`); None: one program over all rows.

    Returns:
      [N] float32 summed log-probs (0 for an empty mask).
    """
    length = mask.shape[-1]
    scored = mask.any(axis=-1)  # [N]
    first = jnp.argmax(mask, axis=-1)  # [N] first scored position (0 if none)
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # [N]
    span = jnp.max(jnp.where(scored, last - first + 1, 0))  # [] widest scored span
    windows = score_windows(length)

    def score(width):
        def branch(hidden, unembedding, targets, mask):
            start = jnp.minimum(first, length - width)  # [N]: the window ends by T
            index = start[:, None] + jnp.arange(width)  # [N, W]
            return sharded_sequence_logprobs(
                jnp.take_along_axis(hidden, index[..., None], axis=1),  # [N, W, D]
                unembedding, jnp.take_along_axis(targets, index, axis=1),
                jnp.take_along_axis(mask, index, axis=1),
                chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, mesh=mesh)
        return branch

    which = jnp.sum(span > jnp.asarray(windows[:-1]))  # [] smallest window >= span
    return jax.lax.switch(which, [score(w) for w in windows], hidden, unembedding, targets,
                          mask)


def role_logprobs(model: nnx.Module, batch: dict[str, jax.Array], roles: tuple[str, ...], *,
                  chunk_size: int, vocab_chunk_size: int | None,
                  remat: str | None = None, adapters: bool = True,
                  dropout_key: jax.Array | None = None,
                  mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Per-sequence log pi(response | prompt) of each role, in one concatenated forward pass.

    Only each row's response positions reach the unembedding
    (`windowed_sequence_logprobs`): with T = prompt + response buckets, that is about half
    of the rows' positions.

    Args:
      model: a CausalLM (`hidden_states`, `unembedding`).
      batch: holds f"{role}_input_ids", f"{role}_attention_mask", f"{role}_loss_mask", each
        [B, T_role] or grouped [B, K, T_role].
      roles: column prefixes to score.
      remat, adapters, dropout_key: as `CausalLM.hidden_states` (adapters=False: the base
        model of a LoRA model; dropout_key: LoRA dropout on).
      mesh: the training mesh (the log-probs are scored per batch shard) or None.

    Returns:
      role -> [B] (or [B, K]) float32 summed response-token log-probs.
    """
    lead_shapes, rows = [], []
    length = max(batch[f"{r}_input_ids"].shape[-1] for r in roles)
    for role in roles:
        ids = batch[f"{role}_input_ids"]
        lead_shapes.append(ids.shape[:-1])
        cols = []
        for name in ("input_ids", "attention_mask", "loss_mask"):
            x = batch[f"{role}_{name}"].reshape(-1, ids.shape[-1])  # [B(*K), T_role]
            cols.append(jnp.pad(x, ((0, 0), (0, length - ids.shape[-1]))))  # right-pad to T
        rows.append(cols)
    ids, attention_mask, loss_mask = (jnp.concatenate(c, axis=0) for c in zip(*rows))  # [N, T]
    hidden = model.hidden_states(ids, attention_mask=attention_mask, remat=remat,
                                 adapters=adapters, dropout_key=dropout_key)  # [N, T, D]
    targets, mask = next_token_targets(ids, loss_mask.astype(bool) & attention_mask.astype(bool))
    logps = windowed_sequence_logprobs(hidden, model.unembedding(), targets, mask,
                                       chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                                       mesh=mesh)
    out, start = {}, 0
    for role, lead in zip(roles, lead_shapes):
        size = math.prod(lead)
        out[role] = logps[start:start + size].reshape(lead)  # [N_role] -> [B] or [B, K]
        start += size
    return out


def packed_role_logprobs(model: nnx.Module, batch: dict[str, jax.Array], roles: tuple[str, ...],
                         *, chunk_size: int, vocab_chunk_size: int | None,
                         remat: str | None = None, adapters: bool = True,
                         dropout_key: jax.Array | None = None,
                         mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """`role_logprobs` from the batch's shared-prompt rows ("packed_*" columns).

    One forward pass over [B, L] packed rows (segment mask: each response reads the prompt
    and itself), then only the hidden states that predict response tokens are gathered,
    [B, M, R, D], and scored: prompt tokens never reach the unembedding.

    Args:
      model: a CausalLM.
      batch: the packed columns of `alignax.data.batching` plus each role's
        f"{role}_loss_mask" ([B, T] or [B, K, T]), whose presence and shape say which roles,
        with how many members, the packed rows hold (in sorted role order).
      roles: the roles to return.
      remat, adapters, dropout_key, mesh: as `role_logprobs`.

    Returns:
      role -> [B] (or [B, K]) float32 summed response-token log-probs.
    """
    missing = [k for k in ("packed_input_ids", "packed_score_index") if k not in batch]
    if missing:
        raise ValueError(f"share_prompt needs the packed columns {missing}: collate the batch "
                         "with share_prompt=True (PreferenceDataset.batches(share_prompt=True))")
    packed = sorted(k[:-len("_loss_mask")] for k in batch if k.endswith("_loss_mask"))
    sizes = {r: batch[f"{r}_loss_mask"].shape[1] if batch[f"{r}_loss_mask"].ndim == 3 else 1
             for r in packed}
    index = batch["packed_score_index"]  # [B, M, R]
    b, m, width = index.shape
    if sum(sizes.values()) != m or not set(roles) <= set(packed):
        raise ValueError(f"packed rows hold {m} responses, but the batch's roles {sizes} "
                         f"have {sum(sizes.values())}; roles asked for: {roles}")
    hidden = model.hidden_states(batch["packed_input_ids"],
                                 attention_mask=batch["packed_attention_mask"],
                                 positions=batch["packed_positions"],
                                 segment_ids=batch["packed_segment_ids"],
                                 remat=remat, adapters=adapters,
                                 dropout_key=dropout_key)  # [B, L, D]
    scored = jnp.take_along_axis(hidden, index.reshape(b, m * width, 1), axis=1)  # [B, M*R, D]
    logps = sharded_sequence_logprobs(
        scored.reshape(b * m, width, hidden.shape[-1]), model.unembedding(),
        batch["packed_score_targets"].reshape(b * m, width),
        batch["packed_score_mask"].reshape(b * m, width),
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
        mesh=mesh).reshape(b, m)  # [B, M]
    out, start = {}, 0
    for role in packed:
        if role in roles:
            member = logps[:, start:start + sizes[role]]  # [B, K]
            out[role] = member if batch[f"{role}_loss_mask"].ndim == 3 else member[:, 0]
        start += sizes[role]
    return {role: out[role] for role in roles}


def role_rewards(model: nnx.Module, batch: dict[str, jax.Array], roles: tuple[str, ...], *,
                 remat: str | None = None,
                 dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """A reward model's scores of each role's sequences, in one concatenated forward pass
    (`dropout_key`: LoRA dropout on).

    Returns:
      role -> [B] float32 ([B, E] for an E-head model, [B, M] / [B, M, E] for an ensemble of
      M: the batch axis first, as in every batch column).
    """
    length = max(batch[f"{r}_input_ids"].shape[-1] for r in roles)
    ids, masks, leads = [], [], []
    for role in roles:
        x, m = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
        leads.append(x.shape[:-1])
        pad = ((0, 0), (0, length - x.shape[-1]))
        ids.append(jnp.pad(x.reshape(-1, x.shape[-1]), pad))  # [B(*K), T]
        masks.append(jnp.pad(m.reshape(-1, m.shape[-1]), pad))
    scores = model(jnp.concatenate(ids), attention_mask=jnp.concatenate(masks),
                   remat=remat, dropout_key=dropout_key)  # [*heads, N]
    heads = scores.ndim - 1
    out, start = {}, 0
    for role, lead in zip(roles, leads):
        size = math.prod(lead)
        role_scores = scores[..., start:start + size].reshape(*scores.shape[:-1], *lead)
        out[role] = jnp.moveaxis(role_scores, tuple(range(heads)),
                                 tuple(range(-heads, 0)))  # [*heads, B] -> [B, *heads]
        start += size
    return out


def response_token_counts(batch: dict[str, jax.Array], role: str) -> jax.Array:
    """[B] (or [B, K]) float32 number of scored response tokens of `role`: the loss-mask
    positions after the first (position 0 is never a next-token target)."""
    mask = batch[f"{role}_loss_mask"].astype(bool) & batch[f"{role}_attention_mask"].astype(bool)
    return jnp.sum(mask[..., 1:], axis=-1).astype(jnp.float32)


def _all_finite(tree: Any) -> jax.Array:
    """[] bool: every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def side_columns(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch columns handed to an objective as they are: bins ("bin", "<role>_bin") and
    target rewards ("target_rewards_<i>", [B] or [B, E])."""
    return {k: v for k, v in batch.items()
            if k == "bin" or k.endswith("_bin") or k.startswith("target_rewards_")}


class TrainStep:
    """The train step: `step(state, batch, reference_params=None) -> (state, metrics)`.

    Each call checks the batch against the objective (`alignax.training.compatibility.
    check_batch`: the columns it reads, ranks, leading sizes, dtypes; the batch size against
    the mesh and the micro-batches; cached per shape signature, so a repeated shape costs a
    dict lookup), keeps the columns the step reads, and runs the jitted update.

    Attributes:
      objective: the registered objective config.
      config: the StepConfig.
      mesh: the training mesh.
      model_state: the frozen model state, passed to `jitted` on every call as an argument
        (never a constant baked into the program): `split_model`'s non-parameter state, or
        the frozen base weights of an adapter (LoRA) run.
      jitted: the `jax.jit` function `(state, batch, reference_params, model_state)`; the
        state is donated. `step.lower(...)` lowers it for XLA's memory / cost analysis.
    """

    def __init__(self, jitted, *, objective: Objective, config: StepConfig, mesh: Mesh,
                 reference: str, model_state: Any):
        self.jitted = jitted
        self.objective = objective
        self.config = config
        self.mesh = mesh
        self.reference = reference
        self.model_state = model_state
        self._checked: dict[tuple, tuple[str, ...]] = {}

    def with_model_state(self, model_state: Any) -> TrainStep:
        """This compiled step for another model of the same graph: `model_state` is its frozen
        state (the batch-check cache is shared: it depends on the objective, config and mesh)."""
        step = copy.copy(self)
        step.model_state = model_state
        return step

    @property
    def needs_reference_params(self) -> bool:
        """Whether a call must pass frozen reference parameters."""
        return self.reference == "model" and self.objective.needs.reference

    def check_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The columns of `batch` the step reads, after checking them (module docstring).

        Raises:
          ValueError: naming the offending column (or the batch size) and the fix.
        """
        signature = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        keep = self._checked.get(signature)
        if keep is None:
            keep = check_batch(self.objective, {k: (v.shape, v.dtype) for k, v in batch.items()},
                               share_prompt=self.config.share_prompt,
                               cached_reference=self.reference == "cached")
            size = batch[keep[0]].shape[0]
            shards = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
            accum = self.config.grad_accum_steps
            if size % shards:
                raise ValueError(f"batch size {size} is not a multiple of the {shards} batch "
                                 f"shards of the mesh {dict(self.mesh.shape)} ({BATCH_AXES})")
            if size % accum:
                raise ValueError(f"batch size {size} is not a multiple of grad_accum_steps "
                                 f"{accum}")
            self._checked[signature] = keep
        return {k: batch[k] for k in keep}

    def _arguments(self, batch, reference_params):
        if self.needs_reference_params and reference_params is None:
            raise ValueError(f"{self.objective.name} needs the reference's log-probs: pass the "
                             "frozen reference parameters as reference_params, or build the "
                             "step with reference='cached' and batches carrying "
                             "f'{role}_reference_logps'")
        if not self.needs_reference_params and reference_params is not None:
            reason = ("reads the cached reference log-probs from the batch"
                      if self.objective.needs.reference else "uses no reference")
            raise ValueError(f"{self.objective.name} {reason}: pass reference_params=None")
        return self.check_batch(batch), reference_params, self.model_state

    def __call__(self, state: TrainState, batch: dict[str, Any], reference_params: Any = None):
        return self.jitted(state, *self._arguments(batch, reference_params))

    def lower(self, state: TrainState, batch: dict[str, Any], reference_params: Any = None):
        """`jitted.lower(...)` on the checked arguments (concrete or `jax.ShapeDtypeStruct`)."""
        return self.jitted.lower(state, *self._arguments(batch, reference_params))


def make_train_step(graphdef: nnx.GraphDef, objective: Objective,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mesh: Mesh, state_shardings: TrainState, model_state: Any = None,
                    config: StepConfig = StepConfig(), reference: str = "model",
                    max_traces: int | None = None) -> TrainStep:
    """The train step of `objective` for the model `graphdef` (see `TrainStep`).

    Args:
      graphdef: the model's graph definition (`alignax.training.state.split_model`): a
        CausalLM for log-prob objectives, a RewardModel / RewardEnsemble for reward-model
        objectives (`Needs.model`; a mismatch is refused here, before any compilation).
      objective: a registered objective config (`alignax.objectives`, e.g. `DPO(beta=0.1)`).
      optimizer, schedule: from `alignax.training.state.make_optimizer`.
      mesh: the ("data", "fsdp", "tensor") mesh.
      state_shardings: from `create_train_state`; the state argument is donated.
      model_state: the frozen model state (`split_model`'s third part; a LoRA run's frozen
        base weights), a jit argument of every call.
      config: micro-batching, remat, compute dtype, chunk sizes, shared-prompt scoring.
      reference: "model" (frozen reference parameters passed as `reference_params`, same
        layout as the policy parameters, recomputed every step), "cached" (the batch
        carries f"{role}_reference_logps" [B] (grouped [B, K]), see
        `alignax.training.reference`) or "base" (a LoRA run: the reference is the same
        model with its adapters switched off, `adapters=False`, so no second copy of the
        weights exists; the only mode for an adapted model besides "cached").
        Objectives without a reference (`Needs.reference` False: SFT, the reward models)
        take reference_params=None in every mode.
      max_traces: if set, raise when the step is traced more often (`chex.assert_max_traces`).

    Returns:
      A `TrainStep`. Its metrics are replicated float32 scalars: loss, the objective's metrics,
      logps/<role> (scores/<role> for a reward model), grad_norm (before clipping),
      update_norm, lr, num_tokens (the batch's tokens: each role's prompt + response, as
      unpacked, so tokens/s compares across `share_prompt`), and update_applied (0 when a
      non-finite loss, gradient, new parameter or optimizer state skipped the update). With
      gradient accumulation, loss and metrics are means over the micro-batches; objectives
      with a batch-level term (`Needs.batch_level`) compute it per micro-batch.

    Raises:
      TypeError: `objective` is not a registered objective config.
      ValueError: the objective does not fit the model, a bad reference mode, remat policy or
        share_prompt with a reward-model objective, reference="base" without LoRA adapters
        or reference="model" with them.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    adapted = has_adapters(state_shardings.params)
    if reference == "base" and not adapted:
        raise ValueError("reference='base' switches the LoRA adapters off, but the trained "
                         "parameters hold none: add_lora(model, ...) before split_model, or "
                         "use reference='model'")
    if reference == "model" and adapted and objective.needs.reference:
        raise ValueError("the model trains LoRA adapters: use reference='base' (the same "
                         "model with its adapters off; no second copy of the weights) or "
                         "'cached'")
    check_remat(config.remat)
    if config.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
    check_compatible(objective, model=graphdef)
    needs = objective.needs
    if config.share_prompt and needs.model == REWARD_MODEL:
        raise ValueError("share_prompt packs responses for log-prob objectives; a reward "
                         f"model objective ({objective.name!r}) scores whole sequences")
    compute_dtype = jnp.dtype(config.compute_dtype)
    accum = config.grad_accum_steps
    roles = needs.roles
    score_roles = packed_role_logprobs if config.share_prompt else role_logprobs

    def merged(params, model_state):
        compute_params = cast_floating(params, compute_dtype)
        if model_state is None:
            return nnx.merge(graphdef, compute_params)
        return nnx.merge(graphdef, compute_params, model_state)

    def policy_logps(params, model_state, batch, *, adapters=True, dropout_key=None):
        if needs.model == REWARD_MODEL:  # a reward model under training: its scores per role
            return role_rewards(merged(params, model_state), batch, roles, remat=config.remat,
                                dropout_key=dropout_key)
        return score_roles(merged(params, model_state), batch, roles,
                           chunk_size=config.chunk_size, vocab_chunk_size=config.vocab_chunk_size,
                           remat=config.remat, adapters=adapters, dropout_key=dropout_key,
                           mesh=mesh)

    def reference_logps(params, reference_params, model_state, batch):
        if not needs.reference:
            return None
        if reference == "cached":
            return {r: batch[f"{r}_reference_logps"].astype(jnp.float32) for r in roles}
        if reference == "base":  # the policy's own weights with the adapters off
            return jax.lax.stop_gradient(policy_logps(params, model_state, batch,
                                                      adapters=False))
        return jax.lax.stop_gradient(policy_logps(reference_params, model_state, batch))

    def loss_fn(params, reference_params, model_state, batch, step, key):
        policy = policy_logps(params, model_state, batch,
                              dropout_key=jax.random.fold_in(key, _DROPOUT_STREAM))
        ref = reference_logps(params, reference_params, model_state, batch)
        scores = {}
        for role in roles:  # the log-ratios h = log pi_theta - log pi_ref, once
            group_mask = batch.get(f"{role}_group_mask")
            scores[role] = Scores(
                policy=policy[role], reference=None if ref is None else ref[role],
                h=None if ref is None else policy[role] - ref[role],
                num_tokens=response_token_counts(batch, role),
                group_mask=None if group_mask is None else group_mask.astype(bool))
        columns = side_columns(batch)
        per_example, metrics = objective(ObjectiveInputs(scores, columns, step, key))
        size = next(iter(policy.values())).shape[0]
        if per_example.shape != (size,):
            raise ValueError(f"{objective.name} returned losses of shape {per_example.shape}; "
                             f"an objective returns one float32 loss per example, [B] = "
                             f"({size},)")
        prefix = "scores" if needs.model == REWARD_MODEL else "logps"
        metrics = {**metrics, **{f"{prefix}/{r}": jnp.mean(v) for r, v in policy.items()}}
        return jnp.mean(per_example), metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, reference_params, model_state, batch, step, key):
        if accum == 1:
            return grad_fn(params, reference_params, model_state, batch, step, key)
        size = jax.tree.leaves(batch)[0].shape[0]
        # [B, ...] -> [B/A, A, ...] -> [A, B/A, ...]: micro-batch j takes rows j, A + j, ...,
        # so every micro-batch stays spread over all data-parallel devices. Every column leads
        # with B (ensemble rewards are [B, E]), so only the batch axis is ever split.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(size // accum, accum, *x.shape[1:]),
                                                    0, 1), batch)

        def body(grad_sum, xs):
            index, micro_batch = xs
            (loss, metrics), grads = grad_fn(params, reference_params, model_state, micro_batch,
                                             step, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
        return (jnp.mean(losses), jax.tree.map(jnp.mean, metrics)), grads

    def step_fn(state: TrainState, batch, reference_params, model_state):
        key = jax.random.fold_in(state.key, state.step)
        (loss, metrics), grads = gradients(state.params, reference_params, model_state, batch,
                                           state.step, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key)
        ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
              & _all_finite(opt_state))  # a finite gradient can still overflow the update
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)  # keep last good state
        num_tokens = sum(jnp.sum(batch[f"{r}_attention_mask"].astype(jnp.float32)) for r in roles)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
                   "update_norm": optax.tree.norm(updates),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "num_tokens": num_tokens, "update_applied": ok.astype(jnp.float32)}
        return new, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    if max_traces is not None:
        step_fn = chex.assert_max_traces(step_fn, n=max_traces)
    frozen_reference = reference == "model" and needs.reference
    reference_shardings = state_shardings.params if frozen_reference else None
    jitted = jax.jit(step_fn,
                     in_shardings=(state_shardings, batch_sharding(mesh), reference_shardings,
                                   None),  # model_state: as its arrays are laid out
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
    return TrainStep(jitted, objective=objective, config=config, mesh=mesh,
                     reference=reference, model_state=model_state)
