"""`PPOTrainer`: an actor-critic, a reward source and a config -> the jitted phases of PPO.

    trainer = PPOTrainer(ActorCritic(policy, Critic.from_reward_model(rm)), ModelReward(rm),
                         config=PPOConfig(...), mesh=mesh, optimizer=make_ppo_optimizer(...))
    state = trainer.init_state(jax.random.PRNGKey(0))
    state, metrics = trainer.iteration(state, prompt_ids, prompt_mask)  # rollout, score, update

The reference policy is the initial policy: its arrays are the model's own (never donated),
and the trainable parameters start as a copy of them. A LoRA policy (`alignax.models.lora`)
trains its adapters (and the value head; a critic backbone trains its own adapters if it has
any) and its reference is the same policy with the adapters off: no copy of the weights.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from alignax.rl.config import PPOConfig
from alignax.rl.models import ActorCritic
from alignax.rl.rollout import make_generate, make_score
from alignax.rl.step import PPOState, make_ppo_update
from alignax.training.mesh import batch_sharding, replicated
from alignax.models.lora import adapted_projections
from alignax.training.state import (OptimizerConfig, TrainState, has_adapters, make_optimizer,
                                    split_model, state_shardings)

PHASES = ("generate", "score", "reward", "update")
"""The timed phases of an iteration (`PPOTrainer.iteration` reports time/<phase>)."""


def make_ppo_optimizer(policy: OptimizerConfig, critic: OptimizerConfig | None = None
                       ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping, schedule) for the policy and, with its own settings, the critic.

    Returns:
      (an optax transformation over {"policy", "critic"} params, the policy's schedule, which
       the update logs as `lr`).
    """
    policy_tx, schedule = make_optimizer(policy)
    critic_tx = make_optimizer(critic or policy)[0]

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key, params)

    return optax.multi_transform({"policy": policy_tx, "critic": critic_tx}, labels), schedule


class PPOTrainer:
    """Builds and runs PPO's phases for one model, reward source and config.

    Args:
      model: the `ActorCritic` (its policy is also the frozen reference).
      reward: `reward(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`
        (`alignax.rl.rewards.ModelReward`, `FunctionReward`).
      config: the PPO settings.
      mesh: the ("data", "fsdp", "tensor") mesh; create the model on it.
      optimizer: (transformation, schedule), e.g. `make_ppo_optimizer(...)`.
      max_traces: if set, the generation, scoring and update functions raise when traced more
        often (`chex.assert_max_traces`): shapes fixed, nothing recompiles between iterations.
    """

    def __init__(self, model: ActorCritic, reward: Callable, *, config: PPOConfig, mesh: Mesh,
                 optimizer: tuple[optax.GradientTransformation, optax.Schedule],
                 max_traces: int | None = None):
        if not isinstance(model, ActorCritic):
            raise TypeError(f"model must be an ActorCritic, got {type(model).__name__}")
        self.config, self.mesh, self.reward = config, mesh, reward
        self.graphdef, self._initial_params, self.rest = split_model(model)
        lora = has_adapters(model.policy)
        dropouts = sorted({d.lora.dropout for _, d in adapted_projections(model) if
                           d.lora.dropout})
        if dropouts:
            raise ValueError(f"PPO scores rollouts and updates with the same forward: LoRA "
                             f"dropout {dropouts} would make the ratio of a fresh rollout "
                             f"differ from 1; use dropout=0")
        # the frozen reference: the initial policy (never donated), or under LoRA the base
        # model, i.e. the policy with its adapters off (no parameters of its own)
        self.reference_params = None if lora else self._initial_params["policy"]
        policy_graphdef, _, policy_rest = split_model(model.policy)
        self.optimizer, self.schedule = optimizer
        scalar = replicated(mesh)
        self.state_shardings = PPOState(
            train=state_shardings(self._initial_params, self.optimizer, mesh),
            iteration=scalar, kl_coef=scalar, reward_moments=scalar)
        train = self.state_shardings.train
        self._generate = make_generate(policy_graphdef, policy_rest, config=config, mesh=mesh,
                                       param_shardings=train.params["policy"],
                                       max_traces=max_traces)
        self._score = make_score(self.graphdef, self.rest, policy_graphdef, policy_rest,
                                 config=config, mesh=mesh, param_shardings=train.params,
                                 reference_shardings=None if lora else train.params["policy"],
                                 max_traces=max_traces)
        self._update = make_ppo_update(self.graphdef, self.rest, self.optimizer, self.schedule,
                                       config=config, mesh=mesh,
                                       state_shardings=self.state_shardings,
                                       has_critic=model.critic is not None,
                                       max_traces=max_traces)

    def init_state(self, key: jax.Array) -> PPOState:
        """A fresh state on the mesh: parameters copied from the model, beta at its initial
        value, iteration 0. `key` ([2] uint32, `jax.random.PRNGKey`) drives every rollout and
        minibatch order (fold_in(key, iteration))."""
        optimizer, config = self.optimizer, self.config

        def init(params, key):
            train = TrainState(params=params, opt_state=optimizer.init(params),
                               step=jnp.zeros((), jnp.int32), key=key)
            return PPOState(train=train, iteration=jnp.zeros((), jnp.int32),
                            kl_coef=jnp.float32(config.kl.init_coef),
                            reward_moments=jnp.zeros((3,), jnp.float32))

        params = jax.device_put(jax.tree.map(jnp.copy, self._initial_params),
                                self.state_shardings.train.params)
        return jax.jit(init, out_shardings=self.state_shardings)(params,
                                                                 jnp.asarray(key, jnp.uint32))

    def rollout(self, state: PPOState, prompt_ids: jax.Array, prompt_mask: jax.Array,
                timings: dict[str, float] | None = None) -> dict[str, jax.Array]:
        """Samples responses to the prompts and scores them: the update's batch.

        Args:
          state: the current state (its policy samples).
          prompt_ids, prompt_mask: [B, P] left-padded prompts (e.g. from `global_batch`).
          timings: if given, receives the seconds spent in generate / score / reward.

        Returns:
          {prompt_input_ids, prompt_attention_mask: [B*K, P]; response_ids, response_mask,
           old_logps, ref_logps, old_values: [B*K, N]; scores: [B*K]}, sharded over the batch.

        Raises:
          ValueError: prompts that are not left-padded (their last column must be real), or a
            number of responses that does not split into minibatches (before any compilation).
        """
        self._check_prompts(prompt_ids, prompt_mask)
        self.config.check_batch_size(np.shape(prompt_ids)[0] * self.config.rollout.samples_per_prompt)
        timings = {} if timings is None else timings
        began = time.perf_counter()
        responses, response_mask = jax.block_until_ready(self._generate(
            state.train.params["policy"], prompt_ids, prompt_mask, state.train.key,
            state.iteration))
        timings["generate"] = time.perf_counter() - began
        k = self.config.rollout.samples_per_prompt
        batch = {"prompt_input_ids": jnp.repeat(prompt_ids, k, axis=0),
                 "prompt_attention_mask": jnp.repeat(prompt_mask, k, axis=0).astype(bool),
                 "response_ids": responses, "response_mask": response_mask}
        batch = jax.device_put(batch, batch_sharding(self.mesh))
        began = time.perf_counter()
        scored = jax.block_until_ready(self._score(state.train.params, self.reference_params,
                                                   batch))
        timings["score"] = time.perf_counter() - began
        began = time.perf_counter()
        scores = self.reward(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                             responses, response_mask)
        scores = jax.block_until_ready(jax.device_put(jnp.asarray(scores, jnp.float32),
                                                      batch_sharding(self.mesh)))
        timings["reward"] = time.perf_counter() - began
        return {**batch, **scored, "scores": scores}

    def update(self, state: PPOState, batch: dict[str, jax.Array]
               ) -> tuple[PPOState, dict[str, jax.Array]]:
        """PPO epochs over a rollout batch (`state` is donated)."""
        return self._update(state, batch)

    def iteration(self, state: PPOState, prompt_ids: jax.Array, prompt_mask: jax.Array
                  ) -> tuple[PPOState, dict[str, float]]:
        """rollout -> update; metrics as floats, with time/<phase> in seconds."""
        timings: dict[str, float] = {}
        batch = self.rollout(state, prompt_ids, prompt_mask, timings)
        began = time.perf_counter()
        state, metrics = self.update(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timings["update"] = time.perf_counter() - began
        return state, {**metrics, **{f"time/{k}": v for k, v in timings.items()}}

    @staticmethod
    def _check_prompts(prompt_ids, prompt_mask) -> None:
        if np.ndim(prompt_ids) != 2 or np.shape(prompt_mask) != np.shape(prompt_ids):
            raise ValueError(f"prompt_ids and prompt_mask must both be [B, P], got "
                             f"{np.shape(prompt_ids)} and {np.shape(prompt_mask)}")
        if getattr(prompt_mask, "is_fully_addressable", True):
            last = np.asarray(jax.device_get(prompt_mask))[:, -1].astype(bool)
            if not last.all():
                raise ValueError(f"prompts must be left-padded (PPO reads each response's "
                                 f"first log-prob at the last prompt column): rows "
                                 f"{np.flatnonzero(~last).tolist()[:8]} end in padding")
