"""The policy and its value model: `ActorCritic` = a causal LM + a critic (or none).

    values [B, T]: V(s_t) read at every position's final hidden state, s_t = the tokens up to t

Three critics, one interface (`ActorCritic.forward`):
- `Critic` (the default): a separate causal-LM backbone with a linear value head, built with
  `Critic.from_reward_model` (the reward model's backbone and score head, as OpenRLHF and trlx
  initialise it) or `Critic.from_policy` (a copy of the policy, head 0). Why the default: the
  value loss then cannot move the policy's features (the policy's ratios and penalties stay
  those of the policy alone), the two get their own learning rates (the thesis' ch. 4 runs use
  actor 5e-7, critic 9e-6, Table 4.6), and a reward-model initialisation starts the critic
  with features that already score responses. It costs one more backbone of memory and compute.
- `ValueHead`: a [D, 1] head on the policy's own final hidden states (one backbone, the value
  loss back-propagates into it).
- None: critic-free (GRPO / RLOO group baselines, `alignax.rl.advantages.group_advantages`).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx

from alignax.models.causal_lm import CausalLM
from alignax.models.config import ModelConfig
from alignax.models.registry import FAMILY_CLASSES
from alignax.models.reward import RewardModel
from alignax.training.state import TrainedParam


def _value_param(kernel: jax.Array) -> TrainedParam:
    """A [D, 1] value-head kernel with logical axes ("embed", None), as the reward heads; a
    `TrainedParam`, so it trains also when the policy / critic train LoRA adapters."""
    return TrainedParam(kernel, out_sharding=("embed", None), eager_sharding=False)


def _copy_arrays(module: nnx.Module) -> nnx.Module:
    """A copy of `module` with fresh buffers: the PPO state is donated to the update step, so it
    must not share arrays with a model used elsewhere (the reward model, the reference)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


class ValueHead(nnx.Module):
    """hidden [B, T, D] -> values [B, T] float32, a linear head (kernel [D, 1])."""

    def __init__(self, kernel: jax.Array):
        if kernel.ndim != 2 or kernel.shape[1] != 1:
            raise ValueError(f"a value head kernel must be [D, 1], got shape {kernel.shape}")
        self.kernel = _value_param(kernel)

    @classmethod
    def zeros(cls, hidden_size: int, *, param_dtype=jnp.float32) -> ValueHead:
        """A head that predicts 0 everywhere at the start."""
        return cls(jnp.zeros((hidden_size, 1), param_dtype))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.dot(hidden.astype(jnp.float32), self.kernel[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)[..., 0]


class Critic(nnx.Module):
    """A value model with its own backbone: `critic(input_ids, attention_mask) -> [B, T]`."""

    def __init__(self, backbone: CausalLM, head: ValueHead):
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> Critic:
        """The reward model's backbone and (single) score head, copied.

        Raises:
          ValueError: for a multi-head reward model (which head would be the value?).
        """
        if reward_model.num_heads is not None:
            raise ValueError(f"a critic starts from a one-head reward model, this one has "
                             f"{reward_model.num_heads} heads")
        copy = _copy_arrays(reward_model)
        if copy.score.bias is not None or copy.score.lora is not None:
            raise ValueError("a critic starts from a reward model whose score head is a plain "
                             "[D, 1] kernel (no bias; merge() its LoRA adapters first)")
        return cls(copy.backbone, ValueHead(copy.score.kernel[...]))

    @classmethod
    def from_policy(cls, policy: CausalLM) -> Critic:
        """A copy of the policy's backbone with a zero value head.

        The copy is built with tied embeddings, so an untied policy's [D, V] output projection
        (which a critic never uses) is not copied: every other array is the policy's, copied.
        """
        config = copy.deepcopy(policy.config)
        config.tie_word_embeddings = True
        family = FAMILY_CLASSES[ModelConfig.from_hf(config).family]
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: family(
            config, rngs=nnx.Rngs(0), dtype=policy.dtype, param_dtype=policy.param_dtype)))
        source = dict(nnx.to_flat_state(nnx.state(policy)))
        leaves = [(path, variable.replace(jnp.copy(source[path][...])))
                  for path, variable in nnx.to_flat_state(abstract)]
        return cls(nnx.merge(graphdef, nnx.from_flat_state(leaves)),
                   ValueHead.zeros(policy.arch.hidden_size, param_dtype=policy.param_dtype))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, remat: str | None = None) -> jax.Array:
        return self.head(self.backbone.hidden_states(input_ids, attention_mask, positions,
                                                     remat=remat))


class ActorCritic(nnx.Module):
    """A policy (`CausalLM`) and its critic (`Critic`, `ValueHead` or None).

    The optimizer tells the two apart by the top-level names "policy" and "critic"
    (`alignax.rl.trainer.make_ppo_optimizer`). The policy's arrays are the module's own: keep no
    other reference to them once training starts (the state is donated).
    """

    def __init__(self, policy: CausalLM, critic: Critic | ValueHead | None = None):
        if critic is not None and not isinstance(critic, (Critic, ValueHead)):
            raise TypeError(f"critic must be a Critic, a ValueHead or None, got "
                            f"{type(critic).__name__}")
        self.policy = policy
        self.critic = critic

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                remat: str | None = None) -> tuple[jax.Array, jax.Array | None]:
        """[B, T] tokens -> (policy hidden states [B, T, D], values [B, T] or None); `remat`:
        per-layer rematerialisation (`alignax.models.remat`) of both backbones."""
        hidden = self.policy.hidden_states(input_ids, attention_mask, remat=remat)
        if isinstance(self.critic, ValueHead):
            return hidden, self.critic(hidden)
        if isinstance(self.critic, Critic):
            return hidden, self.critic(input_ids, attention_mask, remat=remat)
        return hidden, None
