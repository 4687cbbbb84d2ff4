"""The training phases of a causal-reward study, each resumable from its own directory.

    runner = Phases(RunSettings(...))
    runner.supervised(run, model=..., objective=SFT() | BradleyTerry() | CausalReward(...)
                      | DPO(...) | CausalDPO(...), dataset=..., ...)       -> the trained model
    runner.ppo(run, policy=sft, reward_model=rm, reward=ModelReward(rm), ...)  -> the policy

A phase writes under its directory: checkpoints/ (orbax; the fingerprint they were written
under is recorded, and a resume under another one is refused by name), metrics.jsonl,
tensorboard/ and metrics.png. Started again, a phase restores its newest checkpoint and trains
only the missing steps; a finished phase only restores its final parameters. A LoRA phase
(`supervised(lora=...)`) trains and checkpoints only the adapters: its base weights are the
initial model's, rebuilt by the caller on a restart.

`Phases` keeps what compiled: a train step per (model, objective, optimizer settings, batch
positions, reference mode), which serves every phase of that signature (the seeds of DPO, and,
through one `train_steps` dict, the studies whose shapes agree), each call bound to its own
model's frozen state; and one `PPOTrainer` per (policy architecture, reward model
architecture, PPO settings), whose rollout, scoring and update serve every PPO run of the
`Phases` (one study: the trainer holds the SFT policy): each run starts from a fresh state whose
critic is set to its reward model's backbone and head, whose KL coefficient is set to the
run's, and the trainer's reward is set to the run's reward.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.data import PreferenceDataset
from alignax.models import RewardModel
from alignax.models.lora import LoRAConfig, add_lora
from alignax.objectives.registry import Objective
from alignax.rl import (ActorCritic, Critic, KLControllerConfig, PenaltyConfig, PPOConfig,
                        PPOTrainer, RolloutConfig, make_ppo_optimizer, prompt_batches, resume,
                        train_ppo)
from alignax.training.checkpoint import Checkpointer
from alignax.training.loop import MetricsLogger, plot_metrics, train
from alignax.training.state import (OptimizerConfig, create_train_state, make_optimizer,
                                    split_model, state_shardings)
from alignax.training.step import StepConfig, make_train_step

log = logging.getLogger("experiments.causal_reward")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How phases save and report (not what they compute, so not in their fingerprints).

    Attributes:
      save_every: checkpoint period in steps (the final step is always saved).
      keep_checkpoints: checkpoints kept per phase.
      progress: progress bars.
      plots: a metrics.png per phase.
      compute_dtype: activations ("float32" or "bfloat16"); parameters stay float32.
    """

    save_every: int = 100
    keep_checkpoints: int = 1
    progress: bool = True
    plots: bool = True
    compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """PPO of a policy against a reward (the thesis' Tables 4.5-4.6, scaled to the model).

    Attributes:
      iterations: rollout batches.
      batch_size: prompts per rollout batch (one response each; GAE with a critic).
      max_new_tokens: response length cap.
      learning_rate, critic_learning_rate: actor and critic AdamW (thesis 5e-7 / 9e-6 on 8B).
      epochs, minibatches: PPO passes and updates per rollout batch.
    """

    iterations: int
    batch_size: int
    max_new_tokens: int
    learning_rate: float
    critic_learning_rate: float
    epochs: int = 2
    minibatches: int = 2


def _mesh_of(params) -> jax.sharding.Mesh:
    return jax.tree.leaves(params)[0].sharding.mesh


def _copy(model: nnx.Module) -> nnx.Module:
    """`model` with fresh buffers (train states are donated)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def reward_model_from_policy(policy: nnx.Module, *, seed: int) -> RewardModel:
    """A one-head reward model whose backbone starts as a copy of the policy's (the thesis
    trains its reward models from the SFT model), its score head [D, 1] drawn fresh as
    `RewardModel` draws it (normal, initializer_range).

    Raises:
      ValueError: naming a backbone parameter the policy does not have.
    """
    abstract = nnx.eval_shape(lambda: RewardModel(policy.config, rngs=nnx.Rngs(seed),
                                                  dtype=policy.dtype,
                                                  param_dtype=policy.param_dtype))
    graphdef, shapes = nnx.split(abstract)
    source = dict(nnx.to_flat_state(nnx.state(policy)))
    std = float(getattr(policy.config, "initializer_range", 0.02))
    replicated = jax.sharding.NamedSharding(_mesh_of(nnx.state(policy, nnx.Param)),
                                            jax.sharding.PartitionSpec())
    leaves = []
    for path, variable in nnx.to_flat_state(shapes):
        if path[0] == "backbone":
            if path[1:] not in source:
                raise ValueError(f"the policy has no parameter {'.'.join(map(str, path[1:]))} "
                                 "for the reward model's backbone")
            value = jnp.copy(source[path[1:]][...])
        else:  # the score head [D, 1]
            value = jax.device_put(std * jax.random.normal(
                jax.random.PRNGKey(seed), variable.shape, variable.dtype), replicated)
        leaves.append((path, variable.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def batch_tokens(dataset: PreferenceDataset, batch_size: int) -> int:
    """The most positions a batch of `batch_size` records of `dataset` scores at once: every
    response of every record at the longest bucket (the train step's `chunk_size`).

    Why one chunk: before the train step scored each batch shard's rows on their own
    (`alignax.training.step.sharded_sequence_logprobs`), with fewer positions per chunk than
    a batch holds the log-probabilities looped over chunks of the flattened, data-sharded
    [B*T] axis, and every iteration all-gathered across the mesh inside an XLA while loop. XLA:CPU (jaxlib 0.10) runs that
    while loop concurrently with independent collectives outside it (here a collective-permute
    of the DPO step), each device in its own order, and every participant blocks a thread of
    the shared pool in the in-process rendezvous: on a 2-core host with 8 simulated devices
    the pool runs out, the rendezvous never completes and XLA aborts after its 40 s
    termination timeout ("Termination timeout for `all gather ...`"). The length study's DPO
    batch (16 rows x 80 positions > the default 1024) hit this; one chunk per batch has no
    loop, and at these sizes its [positions, vocabulary chunk] logits block (per shard) is
    small, so the study keeps it.
    """
    responses = max(dataset.group_sizes.values()) if dataset.group_sizes else 2
    return batch_size * responses * max(dataset.buckets)


class Phases:
    """Runs a study's phases, sharing what compiled (module docstring)."""

    def __init__(self, settings: RunSettings, *, train_steps: dict | None = None):
        """`train_steps`: compiled train steps to share with other `Phases` (their
        `.train_steps`), e.g. one dict for all studies of a run; None: a new one."""
        self.settings = settings
        self.train_steps: dict[tuple, tuple] = {} if train_steps is None else train_steps
        self._ppo: dict[tuple, PPOTrainer] = {}

    def _train_step(self, graphdef, params, rest, objective: Objective, steps: int,
                    learning_rate: float, chunk_size: int, reference: str):
        """(optimizer, the train step bound to `rest`); the compiled step is shared by every
        call of the same signature."""
        key = (graphdef, objective, steps, learning_rate, chunk_size, reference)
        if key not in self.train_steps:
            optimizer, schedule = make_optimizer(OptimizerConfig(
                learning_rate=learning_rate, schedule="cosine",
                warmup_steps=max(1, steps // 10), total_steps=steps))
            mesh = _mesh_of(params)
            step = make_train_step(graphdef, objective, optimizer, schedule, mesh=mesh,
                                   state_shardings=state_shardings(params, optimizer, mesh),
                                   model_state=rest, reference=reference,
                                   config=StepConfig(compute_dtype=self.settings.compute_dtype,
                                                     chunk_size=chunk_size))
            self.train_steps[key] = (optimizer, step)
        optimizer, step = self.train_steps[key]
        return optimizer, step.with_model_state(rest)

    def supervised(self, run: pathlib.Path, *, model: nnx.Module, objective: Objective,
                   dataset: PreferenceDataset, steps: int, batch_size: int,
                   learning_rate: float, seed: int, fingerprint: dict,
                   reference: nnx.Module | None = None,
                   lora: LoRAConfig | None = None) -> nnx.Module:
        """Trains `model` with `objective` on `dataset`; returns the trained model (a new
        module; `model` keeps its arrays).

        Args:
          run: the phase directory.
          model: the initial CausalLM (SFT, DPO) or RewardModel (reward-model objectives).
          objective: a registered objective config.
          dataset: prepared pairs (with per-response bins for the causal objectives).
          steps, batch_size, learning_rate: AdamW, cosine decay after a 10% warm-up.
          seed: the batch order, the state key and the adapters' A.
          fingerprint: what the result depends on (recorded with the checkpoints).
          reference: the frozen reference policy of a DPO-family objective (None under LoRA:
            the reference is `model`, i.e. the adapters switched off).
          lora: LoRA adapters attached to a clone of `model` (its arrays shared, frozen):
            only they train (and are checkpointed); the returned model carries them on
            `model`'s base weights.

        Raises:
          ValueError: a reference together with LoRA.
        """
        if lora is not None:
            if reference is not None:
                raise ValueError("reference=: a LoRA phase's reference is its base model (the "
                                 "adapters switched off); pass no reference")
            # onto a clone that shares the (frozen, never donated) base arrays
            model = add_lora(nnx.clone(model), lora, rngs=nnx.Rngs(seed),
                             mesh=_mesh_of(nnx.state(model, nnx.Param)))
        graphdef, params, rest = split_model(model)
        mesh = _mesh_of(params)
        optimizer, step = self._train_step(graphdef, params, rest, objective, steps,
                                           learning_rate, batch_tokens(dataset, batch_size),
                                           "model" if lora is None else "base")
        state, _ = create_train_state(jax.tree.map(jnp.copy, params), optimizer,
                                      key=jax.random.PRNGKey(seed), mesh=mesh)
        batches = dataset.batches(batch_size=batch_size, seed=seed)
        reference_params = None if reference is None else split_model(reference)[1]
        checkpointer = Checkpointer(run / "checkpoints", config=fingerprint,
                                    save_every=self.settings.save_every,
                                    keep=self.settings.keep_checkpoints)
        logger = MetricsLogger(run)
        began = time.perf_counter()
        try:
            restored = checkpointer.restore_latest(state, batches=batches)
            if restored is not None:
                state, _, at = restored
                log.info("%s: resumed at step %d of %d", run, at, steps)
            state = train(step, state, batches, num_steps=steps, mesh=mesh,
                          reference_params=reference_params, checkpointer=checkpointer,
                          logger=logger, progress=self.settings.progress,
                          description=str(run.name))
        finally:
            logger.close()
            checkpointer.close()
        log.info("%s: %.1f s", run, time.perf_counter() - began)
        if self.settings.plots:
            plot_metrics(run / "metrics.jsonl", run / "metrics.png", title=str(run))
        return nnx.merge(graphdef, state.params, rest)

    def _ppo_trainer(self, policy: nnx.Module, reward_model: RewardModel, tokenizer,
                     settings: PPOSettings) -> PPOTrainer:
        graphdef = nnx.graphdef(policy)
        key = (graphdef, nnx.graphdef(reward_model), settings)
        if key not in self._ppo:
            config = PPOConfig(
                penalty=PenaltyConfig("reverse_kl"),
                kl=KLControllerConfig(init_coef=1.0),  # fixed; each run sets its own value
                rollout=RolloutConfig(max_new_tokens=settings.max_new_tokens,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id),
                epochs=settings.epochs, minibatches=settings.minibatches,
                compute_dtype=self.settings.compute_dtype)
            optimizer = make_ppo_optimizer(
                OptimizerConfig(learning_rate=settings.learning_rate),
                OptimizerConfig(learning_rate=settings.critic_learning_rate))
            model = ActorCritic(_copy(policy), Critic.from_reward_model(reward_model))
            self._ppo[key] = PPOTrainer(model, None, config=config, mesh=_mesh_of(
                nnx.state(policy, nnx.Param)), optimizer=optimizer)
        return self._ppo[key]

    def ppo(self, run: pathlib.Path, *, policy: nnx.Module, reward_model: RewardModel,
            reward: Callable, prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokenizer,
            settings: PPOSettings, kl_coef: float, seed: int, fingerprint: dict
            ) -> nnx.Module:
        """PPO of `policy` (also the frozen reference) against `reward`, with reverse-KL
        coefficient `kl_coef` (fixed; the thesis' initial value is 0.01) and the critic starting
        as `reward_model` (as OpenRLHF, the thesis' PPO, initialises it); returns the policy.

        Args:
          run: the phase directory.
          policy: the SFT policy (copied, never donated). Every PPO run of one `Phases` must
            start from the same policy (the trainer holds it as the reference).
          reward_model: the critic's initialisation.
          reward: `reward(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`.
          prompt_ids, prompt_mask: [P, L] left-padded training prompts.
          settings: the PPO hyper-parameters.
          kl_coef: beta of the per-token reverse-KL penalty.
          seed: rollouts, minibatch order, prompt order.
          fingerprint: as in `supervised`.
        """
        trainer = self._ppo_trainer(policy, reward_model, tokenizer, settings)
        trainer.reward = reward
        state = trainer.init_state(jax.random.PRNGKey(seed))
        critic = dict(jax.tree_util.tree_flatten_with_path(
            split_model(Critic.from_reward_model(reward_model))[1])[0])  # path -> array
        params = jax.tree_util.tree_map_with_path(
            lambda path, leaf: critic[path[1:]] if path[0] == jax.tree_util.DictKey("critic")
            else leaf, state.train.params)
        state = dataclasses.replace(
            state, train=dataclasses.replace(state.train, params=jax.device_put(
                params, trainer.state_shardings.train.params)),
            kl_coef=jax.device_put(jnp.float32(kl_coef), trainer.state_shardings.kl_coef))
        prompts = prompt_batches(prompt_ids, prompt_mask, batch_size=settings.batch_size,
                                 seed=seed)
        checkpointer = Checkpointer(run / "checkpoints", config=fingerprint,
                                    save_every=self.settings.save_every,
                                    keep=self.settings.keep_checkpoints)
        logger = MetricsLogger(run)
        began = time.perf_counter()
        try:
            state = resume(checkpointer, state, prompts)
            logger.resume(int(state.iteration))
            state = train_ppo(trainer, state, prompts, num_iterations=settings.iterations,
                              checkpointer=checkpointer, logger=logger,
                              plot_path=run / "metrics.png" if self.settings.plots else None,
                              progress=self.settings.progress)
        finally:
            logger.close()
            checkpointer.close()
        log.info("%s: %.1f s", run, time.perf_counter() - began)
        graphdef, _, rest = split_model(policy)
        return nnx.merge(graphdef, state.train.params["policy"], rest)


def fingerprint_of(**parts: Any) -> dict:
    """A JSON-able fingerprint of dataclasses, numbers, strings, sequences and dicts
    (anything else by its repr)."""
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {"type": type(value).__name__,
                    **{f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return repr(value)
    return {k: plain(v) for k, v in parts.items()}
