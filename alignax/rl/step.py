"""The PPO update: one jitted, sharded, state-donating step over a whole rollout batch.

    scores -> (normalise, clip) -> per-token rewards: score on the last response token,
              PPO(reward)'s penalty -beta phi(h) (per token or per response)
           -> advantages: GAE with the rollout values, or RLOO / GRPO group baselines
           -> epochs x minibatches (shuffled rows; gradient accumulated over micro-batches):
              clipped surrogate + value_coef clipped value loss - entropy_coef entropy
              [+ beta PPO(loss) divergence term]  -> optax update (skipped if non-finite)
           -> the controller's next beta from the batch's divergence estimate

Token-level terms are summed over the minibatch's response tokens and divided by their count,
sequence-level terms by the number of responses, before the micro-batches are split off: the
accumulated gradient is the minibatch's gradient, whatever `grad_accum_steps` is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from alignax.rl.advantages import explained_variance, gae, group_advantages, masked_whiten
from alignax.rl.config import PPOConfig
from alignax.rl.kl_control import update_coef
from alignax.rl.losses import clipped_surrogate, clipped_value_loss
from alignax.rl.penalties import divergence_estimate, loss_penalty, reward_penalty
from alignax.rl.rollout import UPDATE_KEY, score_responses
from alignax.training.mesh import batch_sharding, replicated
from alignax.training.state import TrainState, cast_floating

ROLLOUT_COLUMNS = ("prompt_input_ids", "prompt_attention_mask", "response_ids", "response_mask",
                   "old_logps", "ref_logps", "old_values", "scores")
"""The batch `update` takes (all [B, ...]; scores [B])."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PPOState:
    """Everything a PPO iteration changes; donated to the update step and checkpointed whole.

    Attributes:
      train: params ({"policy", "critic"}), optimizer state, update count, root key.
      iteration: [] int32 rollout batches done.
      kl_coef: [] float32 the penalty coefficient beta.
      reward_moments: [3] float32 (count, mean, sum of squared deviations) of every raw score
        seen, for reward_normalization="running".
    """

    train: TrainState
    iteration: jax.Array
    kl_coef: jax.Array
    reward_moments: jax.Array


def _last_token(mask: jax.Array) -> jax.Array:
    """[B, N] bool: True on each row's last True entry (a row's final response token)."""
    return mask & ~jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, N] -> [B] sum over the masked entries."""
    return jnp.sum(jnp.where(mask, x, 0.0), axis=-1)


def normalize_scores(config: PPOConfig, scores: jax.Array, moments: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """(processed scores [B], updated moments [3]) per `reward_normalization` / `reward_clip`.

    "running" merges the batch into the moments first (Chan et al.'s parallel update) and then
    standardises with them.
    """
    count, mean, m2 = moments[0], moments[1], moments[2]
    n = jnp.float32(scores.shape[0])
    batch_mean = jnp.mean(scores)
    delta = batch_mean - mean
    total = count + n
    mean = mean + delta * n / total
    m2 = m2 + jnp.sum(jnp.square(scores - batch_mean)) + jnp.square(delta) * count * n / total
    moments = jnp.stack([total, mean, m2])
    if config.reward_normalization == "batch":
        scores = (scores - batch_mean) * jax.lax.rsqrt(jnp.var(scores) + 1e-8)
    elif config.reward_normalization == "running":
        scores = (scores - mean) * jax.lax.rsqrt(m2 / total + 1e-8)
    if config.reward_clip is not None:
        scores = jnp.clip(scores, -config.reward_clip, config.reward_clip)
    return scores, moments


def prepare_batch(config: PPOConfig, batch: dict[str, jax.Array], kl_coef: jax.Array,
                  moments: jax.Array) -> tuple[dict[str, jax.Array], jax.Array, dict]:
    """Rewards, advantages and returns of a rollout batch (no gradient flows through these).

    Returns:
      (the batch with "advantages" and "returns" [B, N] added, updated reward moments,
       rollout metrics).
    """
    penalty = config.penalty
    mask = batch["response_mask"].astype(bool)
    last = _last_token(mask)  # [B, N]
    scores, moments = normalize_scores(config, batch["scores"].astype(jnp.float32), moments)
    h = jnp.where(mask, batch["old_logps"] - batch["ref_logps"], 0.0)  # [B, N] log u per token
    h_seq = jnp.sum(h, axis=-1)  # [B] log u per response
    if penalty.level == "token":
        divergence = _masked_sum(divergence_estimate(penalty, h), mask)  # [B]
    else:
        divergence = divergence_estimate(penalty, h_seq)
    rewards = jnp.where(last, scores[:, None], 0.0)  # [B, N] the score on the last token
    if penalty.placement == "reward":  # PPO(reward): r - beta phi (§2.6.1)
        if penalty.level == "token":
            phi = jnp.where(mask, reward_penalty(penalty, h), 0.0)
        else:
            phi = jnp.where(last, reward_penalty(penalty, h_seq)[:, None], 0.0)
        rewards = rewards - kl_coef * phi
    values = batch["old_values"]
    if config.advantage == "gae":
        advantages, returns = gae(rewards, values, mask, gamma=config.gamma, lam=config.lam)
    else:
        totals = group_advantages(_masked_sum(rewards, mask),
                                  group_size=config.rollout.samples_per_prompt,
                                  baseline=config.advantage)  # [B]
        advantages = jnp.where(mask, totals[:, None], 0.0)
        returns = jnp.zeros_like(advantages)
    metrics = {"reward": jnp.mean(batch["scores"]), "reward/processed": jnp.mean(scores),
               "return": jnp.mean(_masked_sum(rewards, mask)), "kl": jnp.mean(h_seq),
               "divergence": jnp.mean(divergence), "kl_coef": kl_coef,
               "response_length": jnp.mean(jnp.sum(mask, axis=-1).astype(jnp.float32)),
               "advantages/mean": jnp.sum(advantages) / jnp.maximum(jnp.sum(mask), 1)}
    if config.advantage == "gae":
        metrics["explained_variance"] = explained_variance(values, returns, mask)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    prepared = {**batch, "advantages": advantages, "returns": returns, "divergence": divergence}
    return prepared, moments, metrics


def make_ppo_update(graphdef: nnx.GraphDef, model_state: Any,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    config: PPOConfig, mesh: Mesh, state_shardings: PPOState,
                    has_critic: bool, max_traces: int | None = None) -> Callable:
    """Returns `update(state, batch) -> (state, metrics)`, a `jax.jit` closure.

    Args:
      graphdef, model_state: the `ActorCritic`'s graph definition and non-parameter state
        (`alignax.training.state.split_model`).
      optimizer, schedule: from `alignax.rl.trainer.make_ppo_optimizer` (or any optax
        transformation over {"policy", "critic"} params).
      config: the PPO settings.
      mesh: the ("data", "fsdp", "tensor") mesh.
      state_shardings: a PPOState of shardings; the state argument is donated.
      has_critic: whether the model has a critic (GAE needs one).
      max_traces: if set, raise when the update is traced more often.

    The returned update takes the rollout batch (`ROLLOUT_COLUMNS`, sharded over ("data",
    "fsdp")) and returns replicated float32 metrics: the rollout's reward, return, kl (the
    mean response log-ratio, KL(pi_old || pi_ref)), divergence (the penalty's §2.8.2 estimate),
    kl_coef, response_length, explained_variance, and averages over the minibatch updates of
    loss, policy_loss, value_loss, entropy, clip_fraction, approx_kl, divergence_loss,
    grad_norm, update_applied and lr.
    """
    if config.advantage == "gae" and not has_critic:
        raise ValueError("advantage='gae' needs a critic: give ActorCritic a Critic or a "
                         "ValueHead, or use advantage='rloo' / 'grpo'")
    penalty, dtype = config.penalty, jnp.dtype(config.compute_dtype)
    blocks = dict(temperature=config.rollout.temperature, chunk_size=config.chunk_size,
                  vocab_chunk_size=config.vocab_chunk_size)
    accum, num_steps = config.grad_accum_steps, config.epochs * config.minibatches

    def forward(params, rows):
        compute = cast_floating(params, dtype)
        return score_responses(nnx.merge(graphdef, compute, model_state), rows,
                               remat=config.remat, **blocks)  # per-layer remat

    def loss_fn(params, rows, kl_coef, num_tokens, num_responses):
        """The minibatch loss restricted to `rows`; sums / the minibatch's denominators."""
        logps, entropies, values = forward(params, rows)
        mask = rows["response_mask"].astype(bool)

        def token_mean(x):  # contribution to the minibatch's mean over response tokens
            return jnp.sum(jnp.where(mask, x, 0.0)) / num_tokens

        surrogate, aux = clipped_surrogate(logps, rows["old_logps"], rows["advantages"],
                                           clip_epsilon=config.clip_epsilon)
        metrics = {"policy_loss": token_mean(surrogate), "entropy": token_mean(entropies),
                   "clip_fraction": token_mean(aux["clipped"].astype(jnp.float32)),
                   "approx_kl": token_mean(aux["approx_kl"])}
        loss = metrics["policy_loss"] - config.entropy_coef * metrics["entropy"]
        if has_critic and config.advantage == "gae":
            metrics["value_loss"] = token_mean(clipped_value_loss(
                values, rows["old_values"], rows["returns"], clip_range=config.value_clip))
            loss = loss + config.value_coef * metrics["value_loss"]
        if penalty.placement == "loss":  # PPO(loss): + beta D_f, §2.8.2 estimator (§2.6.1)
            if penalty.level == "token":
                terms = _masked_sum(loss_penalty(penalty, logps, rows["old_logps"],
                                                 rows["ref_logps"]), mask)  # [M]
            else:
                terms = loss_penalty(penalty, _masked_sum(logps, mask), _masked_sum(
                    rows["old_logps"], mask), _masked_sum(rows["ref_logps"], mask))
            metrics["divergence_loss"] = jnp.sum(terms) / num_responses
            loss = loss + kl_coef * metrics["divergence_loss"]
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_gradients(params, rows, kl_coef):
        size = rows["response_mask"].shape[0]
        num_tokens = jnp.maximum(jnp.sum(rows["response_mask"].astype(jnp.float32)), 1.0)
        num_responses = jnp.float32(size)
        if accum == 1:
            return grad_fn(params, rows, kl_coef, num_tokens, num_responses)
        # [M, ...] -> [M/A, A, ...] -> [A, M/A, ...]: micro-batch j takes rows j, A + j, ...
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(size // accum, accum,
                                                               *x.shape[1:]), 0, 1), rows)

        def body(grad_sum, micro_rows):
            (loss, metrics), grads = grad_fn(params, micro_rows, kl_coef, num_tokens,
                                             num_responses)
            return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

        grads, (losses, metrics) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                                                micro)
        return (jnp.sum(losses), jax.tree.map(jnp.sum, metrics)), grads

    def update_fn(state: PPOState, batch: dict[str, jax.Array]):
        size = batch["response_mask"].shape[0]
        config.check_batch_size(size)
        prepared, moments, rollout_metrics = prepare_batch(config, batch, state.kl_coef,
                                                           state.reward_moments)
        key = jax.random.fold_in(jax.random.fold_in(state.train.key, state.iteration),
                                 UPDATE_KEY)
        orders = jax.vmap(lambda k: jax.random.permutation(k, size))(
            jax.random.split(key, config.epochs))  # [epochs, B]
        orders = orders.reshape(num_steps, size // config.minibatches)  # [E * MB, B / MB]

        def minibatch_step(train: TrainState, order):
            rows = jax.tree.map(lambda x: x[order], prepared)
            (loss, metrics), grads = minibatch_gradients(train.params, rows, state.kl_coef)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, train.opt_state, train.params)
            new = TrainState(params=optax.apply_updates(train.params, updates),
                             opt_state=opt_state, step=train.step + 1, key=train.key)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, train)  # skip if not
            metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
                       "update_applied": ok.astype(jnp.float32),
                       "lr": jnp.asarray(schedule(train.step), jnp.float32)}
            return new, metrics

        train, step_metrics = jax.lax.scan(minibatch_step, state.train, orders)
        kl_coef = update_coef(config.kl, state.kl_coef, jnp.mean(prepared["divergence"]), size)
        new = PPOState(train=train, iteration=state.iteration + 1, kl_coef=kl_coef,
                       reward_moments=moments)
        metrics = {**rollout_metrics, **jax.tree.map(jnp.mean, step_metrics)}
        return new, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    if max_traces is not None:
        update_fn = chex.assert_max_traces(update_fn, n=max_traces)
    return jax.jit(update_fn, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
