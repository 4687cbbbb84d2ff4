"""The reward models r_rho and r_{rho,b}: ONE `RewardEnsemble`, each member on its own data.

Every (seed, rho) group has 1 + len(ENSEMBLE_BIASES) members: r_rho on all of D_rho (d-DPO,
pd-DPO) and r_{rho,b} on D_{rho,b} (e-DPO). All groups' members are stacked into one
`alignax.models.RewardEnsemble` ([M, ...] parameters) and trained by one jitted step in which
member m reads a mini-batch of ITS OWN pairs: the batch is [M, b, T] and the forward is vmapped
over the member axis of both the parameters and the batch, with the Bradley-Terry loss of
`alignax.objectives.bradley_terry_loss` (004 eq. 2) per member and the optimizer (AdamW with
per-member gradient clipping) vmapped too, so member m's update depends on its data only.

Why not `alignax.training.make_train_step(..., BradleyTerry())` on the ensemble: that step
accepts a RewardEnsemble, but every member then scores the SAME batch rows and the loss
averages over members (`alignax.objectives.reward.per_example`), so all members would train on
the same pairs. 004's ensemble needs member m to see only D_{rho,b_m}; the step would need a
per-member example weight column (e.g. "member_weights" [B, M], passed to the objective like
the bins and target rewards, and read by `BradleyTerry`), and would then still score every row
with every member. The vmapped step here scores each member's rows only.

The members' transformers start from the SFT policy's (its output projection dropped; 004
initialises every reward model and policy from the same pretrained LM, and the SFT policy is
the only pretrained LM of this world); their linear heads are drawn independently.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignax.models import RewardEnsemble
from alignax.objectives import bradley_terry_loss
from alignax.training import Checkpointer, MetricsLogger, OptimizerConfig, make_optimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairTokens:
    """Tokenized pairs, right-padded to one length T (prompt + response, as the reward model
    reads them): first/second ids and attention masks [N, T]. In a preference set "first" is
    the chosen response; for scoring it is response_1."""

    first_ids: np.ndarray
    first_mask: np.ndarray
    second_ids: np.ndarray
    second_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.first_ids)


def pair_tokens(dataset, first: str, second: str) -> PairTokens:
    """PairTokens of every example of a PreferenceDataset, in record order (roles `first`,
    `second`, e.g. "chosen"/"rejected" or "response_1"/"response_2")."""
    batch = dataset.collate(sorted(dataset.examples, key=lambda ex: ex.index))
    return PairTokens(batch[f"{first}_input_ids"], batch[f"{first}_attention_mask"],
                      batch[f"{second}_input_ids"], batch[f"{second}_attention_mask"])


def init_from_policy(config, policy_params: nnx.State, *, num_members: int,
                     key: jax.Array) -> RewardEnsemble:
    """`num_members` reward models whose transformer is the policy's and whose heads are drawn
    independently (`RewardEnsemble.create`'s initialisation)."""
    ensemble = RewardEnsemble.create(config, num_members=num_members, rngs=nnx.Rngs(params=key))
    graphdef, state = nnx.split(ensemble.members)
    source = {path: np.asarray(jax.device_get(v[...]))
              for path, v in nnx.to_flat_state(policy_params)}
    leaves = []
    for path, variable in nnx.to_flat_state(state):
        if path[0] == "backbone":
            value = source[path[1:]]  # the policy's parameter of the same name, [...]
            variable = variable.replace(jnp.broadcast_to(value, (num_members, *value.shape)))
        leaves.append((path, variable))
    return RewardEnsemble(nnx.merge(graphdef, nnx.from_flat_state(leaves)),
                          num_members=num_members)


def _member_forward(graphdef, params, rest, ids, mask):
    """Per-member inputs: params [M, ...], ids / mask [M, B, T] -> scores [M, B]."""

    def one(member_params, member_rest, ids, mask):
        return nnx.merge(graphdef, member_params, member_rest)(ids, mask)  # [B]

    return jax.vmap(one)(params, rest, ids, mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def member_scores(graphdef, params, rest, ids, mask):
    """Jitted `_member_forward`: each member scores its own rows, [M, B, T] -> [M, B]."""
    return _member_forward(graphdef, params, rest, ids, mask)


def score_member_rows(ensemble: RewardEnsemble, ids: np.ndarray, mask: np.ndarray, *,
                      batch_size: int) -> np.ndarray:
    """Scores [M, N, T] rows (member m reads rows [m]) in fixed [M, batch_size, T] blocks;
    the last block is filled with copies of row 0 whose scores are dropped. Returns [M, N]."""
    graphdef, params, rest = nnx.split(ensemble.members, nnx.Param, ...)
    total = ids.shape[1]
    out = []
    for start in range(0, total, batch_size):
        index = np.arange(start, start + batch_size)
        index = np.where(index < total, index, 0)
        scores = member_scores(graphdef, params, rest, ids[:, index], mask[:, index])
        out.append(np.asarray(scores)[:, :min(batch_size, total - start)])
    return np.concatenate(out, axis=1)


def member_batches(subsets: list[np.ndarray], *, batch_size: int, seed: int, step: int
                   ) -> np.ndarray:
    """[M, batch_size] row indices of step `step`: member m walks through seeded permutations
    of its subset, one per epoch (a deterministic function of (seed, m, step), so a resumed
    run reads the same rows)."""
    rows = []
    for m, subset in enumerate(subsets):
        position = step * batch_size + np.arange(batch_size)
        epoch, offset = np.divmod(position, len(subset))
        perms = {e: np.random.default_rng([seed, m, e]).permutation(subset)
                 for e in np.unique(epoch)}
        rows.append(np.array([perms[e][o] for e, o in zip(epoch, offset)]))
    return np.stack(rows)


def ensemble_loss(graphdef, rest, params, batch):
    """The SUM over members of each member's mean Bradley-Terry loss (004 eq. 2) on its own
    rows, so that member m's gradient is the gradient of its own loss.

    Args:
      params: the members' stacked parameters [M, ...]; rest: the non-parameter state.
      batch: "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", each [M, b, T].

    Returns:
      (sum, (losses [M], accuracies [M])).
    """
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=1)  # [M, 2b, T]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=1)
    scores = _member_forward(graphdef, params, rest, ids, mask)  # [M, 2b]
    half = batch["chosen_ids"].shape[1]
    chosen, rejected = scores[:, :half], scores[:, half:]  # [M, b] each
    per_member = jnp.mean(bradley_terry_loss(chosen, rejected), axis=1)  # 004 eq. 2, [M]
    accuracy = jnp.mean((chosen > rejected).astype(jnp.float32), axis=1)
    return jnp.sum(per_member), (per_member, accuracy)


def make_ensemble_step(graphdef, rest, optimizer: optax.GradientTransformation):
    """(params, opt_state, batch) -> (params, opt_state, metrics), jitted, donating the state:
    the gradient of `ensemble_loss` and the optimizer update vmapped over members (AdamW with
    per-member clipping). metrics: "loss" [M] and "accuracy" [M] on the batch."""

    def step(params, opt_state, batch):
        grads, (loss, accuracy) = jax.grad(functools.partial(ensemble_loss, graphdef, rest),
                                           has_aux=True)(params, batch)
        updates, opt_state = jax.vmap(optimizer.update)(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss,
                                                                  "accuracy": accuracy}

    return jax.jit(step, donate_argnums=(0, 1))


def train_ensemble(ensemble: RewardEnsemble, tokens: PairTokens, subsets: list[np.ndarray], *,
                   steps: int, batch_size: int, learning_rate: float, seed: int,
                   run_dir: pathlib.Path, config: dict, save_every: int) -> RewardEnsemble:
    """Trains member m on the pairs `tokens[subsets[m]]` for `steps` vmapped steps of
    `batch_size` pairs per member; checkpointed in run_dir/checkpoints (a resumed run restores
    the newest one and continues; `config["reward_steps"]` may change), metrics in run_dir/metrics.jsonl (mean and min / max over
    members of the loss and accuracy).

    Raises:
      ValueError: as many subsets as members is required.
    """
    if len(subsets) != ensemble.num_members:
        raise ValueError(f"{len(subsets)} subsets for {ensemble.num_members} members")
    graphdef, params, rest = nnx.split(ensemble.members, nnx.Param, ...)
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=learning_rate,
                                                  total_steps=steps))
    state = {"params": params, "opt_state": jax.vmap(optimizer.init)(params),
             "step": jnp.zeros((), jnp.int32)}
    checkpointer = Checkpointer(run_dir / "checkpoints", config=config, save_every=save_every,
                                keep=1, ignore_config_keys=("reward_steps",))
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state = restored[0]
        log.info("reward ensemble: resumed from step %d", int(state["step"]))
    step_fn = make_ensemble_step(graphdef, rest, optimizer)
    logger = MetricsLogger(run_dir, tensorboard=False)
    logger.resume(int(state["step"]))
    params, opt_state = state["params"], state["opt_state"]
    try:
        for step in range(int(state["step"]), steps):
            rows = member_batches(subsets, batch_size=batch_size, seed=seed, step=step)  # [M, b]
            batch = {"chosen_ids": tokens.first_ids[rows], "chosen_mask": tokens.first_mask[rows],
                     "rejected_ids": tokens.second_ids[rows],
                     "rejected_mask": tokens.second_mask[rows]}
            params, opt_state, metrics = step_fn(params, opt_state, batch)
            loss, accuracy = (np.asarray(metrics[k]) for k in ("loss", "accuracy"))
            if not np.isfinite(loss).all():
                raise FloatingPointError(f"reward ensemble: non-finite loss at step {step + 1} "
                                         f"in members {np.flatnonzero(~np.isfinite(loss))}")
            logger.log(step + 1, {"loss": loss.mean(), "loss/max": loss.max(),
                                  "accuracy": accuracy.mean(), "accuracy/min": accuracy.min()})
            checkpointer.save(step + 1, {"params": params, "opt_state": opt_state,
                                         "step": jnp.asarray(step + 1, jnp.int32)},
                              force=step + 1 == steps)
    finally:
        logger.close()
        checkpointer.wait()
        checkpointer.close()
    return RewardEnsemble(nnx.merge(graphdef, params, rest), num_members=ensemble.num_members)
