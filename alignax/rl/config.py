"""PPO's settings: how responses are sampled (`RolloutConfig`) and how they train (`PPOConfig`).

Both are frozen dataclasses of plain values (JSON-able through `dataclasses.asdict`, the form
checkpoints record), validated on construction so that a bad value fails before compilation.
"""

from __future__ import annotations

import dataclasses

from alignax.models.remat import check_remat
from alignax.rl.advantages import GROUP_BASELINES
from alignax.rl.kl_control import KLControllerConfig
from alignax.rl.penalties import PenaltyConfig

ADVANTAGES = ("gae",) + GROUP_BASELINES
REWARD_NORMALIZATIONS = ("none", "batch", "running")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of responses with `alignax.models.generate` (KV cache).

    The policy PPO optimises is softmax(logits / temperature), the distribution the tokens are
    drawn from; the reference is tempered alike, so the two agree at the start. top-k / top-p
    truncate the sampling distribution without changing the scored log-probs (leave them off
    for on-policy ratios).

    Attributes:
      max_new_tokens: response length N at most.
      temperature: > 0.
      top_k, top_p: optional filters (None: off).
      eos_token_id: one id or a tuple; a row stops after emitting one (kept in the response).
      pad_token_id: written after a row stopped.
      samples_per_prompt: K responses per prompt (consecutive rows; K >= 2 for "rloo"/"grpo").
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int = 0
    samples_per_prompt: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"RolloutConfig.max_new_tokens must be >= 1, got "
                             f"{self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"RolloutConfig.temperature must be > 0 for PPO (greedy decoding "
                             f"has no log-probs to optimise), got {self.temperature}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"RolloutConfig.samples_per_prompt must be >= 1, got "
                             f"{self.samples_per_prompt}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """What one PPO iteration does after the rollout.

    Attributes:
      penalty: the divergence and its placement (PPO(reward) / PPO(loss)).
      kl: the penalty coefficient's controller (fixed or adaptive).
      rollout: sampling settings.
      advantage: "gae" (with the critic), or critic-free "rloo" / "grpo" group baselines.
      gamma, lam: GAE's discount and lambda.
      whiten_advantages: whiten advantages over the batch's response tokens. With
        placement="loss" this rescales the reward term against beta's divergence term (the
        effective beta becomes beta * std(advantages)); keep it off to compare betas exactly.
      reward_normalization: "none", "batch" (whiten scores over the rollout batch) or
        "running" (subtract the running mean and divide by the running std of all scores so
        far, kept in the state).
      reward_clip: clip (normalised) scores to [-c, c]; None: no clip.
      clip_epsilon: PPO's ratio clip.
      value_clip: the critic's clip range around the rollout values (None: unclipped).
      value_coef, entropy_coef: weights of the value loss and of the entropy bonus.
      epochs: passes over each rollout batch.
      minibatches: optimizer updates per pass (the batch must divide into them).
      grad_accum_steps: micro-batches per minibatch (same gradient, less memory).
      chunk_size, vocab_chunk_size: `chunked_token_logprobs` blocks.
      compute_dtype: "float32" or "bfloat16" activations; log-probs and losses are float32.
      remat: a policy of `alignax.models.remat.REMAT_POLICIES` (None, "dots", "full",
        "offload"): per-layer rematerialisation of the policy's and the critic's layers.
    """

    penalty: PenaltyConfig = PenaltyConfig()
    kl: KLControllerConfig = KLControllerConfig()
    rollout: RolloutConfig = RolloutConfig()
    advantage: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    reward_normalization: str = "none"
    reward_clip: float | None = None
    clip_epsilon: float = 0.2
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    epochs: int = 4
    minibatches: int = 4
    grad_accum_steps: int = 1
    chunk_size: int = 1024
    vocab_chunk_size: int | None = 8192
    compute_dtype: str = "float32"
    remat: str | None = None

    def __post_init__(self):
        for name, value, allowed in (
                ("advantage", self.advantage, ADVANTAGES),
                ("reward_normalization", self.reward_normalization, REWARD_NORMALIZATIONS),
                ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)):
            if value not in allowed:
                raise ValueError(f"PPOConfig.{name} must be one of {allowed}, got {value!r}")
        try:
            check_remat(self.remat)
        except ValueError as error:
            raise ValueError(f"PPOConfig.{error}") from None
        if self.advantage != "gae" and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"PPOConfig.advantage={self.advantage!r} needs groups: set "
                             f"rollout.samples_per_prompt >= 2")
        for name in ("epochs", "minibatches", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.clip_epsilon > 0:
            raise ValueError(f"PPOConfig.clip_epsilon must be > 0, got {self.clip_epsilon}")
        if self.reward_clip is not None and not self.reward_clip > 0:
            raise ValueError(f"PPOConfig.reward_clip must be > 0 or None, got {self.reward_clip}")

    def check_batch_size(self, num_responses: int) -> None:
        """Raises ValueError unless the rollout batch splits into minibatches x micro-batches."""
        parts = self.minibatches * self.grad_accum_steps
        if num_responses % parts:
            raise ValueError(f"{num_responses} responses per rollout (prompts x "
                             f"samples_per_prompt) do not split into minibatches="
                             f"{self.minibatches} x grad_accum_steps={self.grad_accum_steps}")
