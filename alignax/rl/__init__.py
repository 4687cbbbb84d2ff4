"""On-policy RLHF: PPO with f-divergence penalties, PPO(reward) and PPO(loss) (thesis §2.6.1).

    penalties.py   divergence conventions; PPO(reward)'s penalty, PPO(loss)'s §2.8.2 term
    advantages.py  GAE on ragged rollouts, RLOO / GRPO group baselines, masked whitening
    losses.py      clipped surrogate, clipped value loss
    kl_control.py  fixed or adaptive (Ziegler et al.) penalty coefficient
    bandit.py      tabular PPO on the finite-response toy (exact optimum to compare with)
    models.py      ActorCritic: policy + Critic (own backbone) / ValueHead / none
    rewards.py     reward model, reward ensemble (mean / min / ...), programmatic rewards
    config.py      RolloutConfig, PPOConfig
    rollout.py     jitted generation and scoring (chunked per-token log-probs, values)
    step.py        PPOState, the jitted, sharded, donated PPO update
    trainer.py     PPOTrainer: the phases of one iteration for a model and config
    loop.py        train_ppo: checkpoints that resume exactly, metrics, progress bar, plot
"""

from alignax.rl.advantages import gae
from alignax.rl.advantages import group_advantages
from alignax.rl.advantages import masked_whiten
from alignax.rl.bandit import BanditPPOConfig
from alignax.rl.bandit import placement_study
from alignax.rl.bandit import train_bandit_ppo
from alignax.rl.config import PPOConfig
from alignax.rl.config import RolloutConfig
from alignax.rl.kl_control import KLControllerConfig
from alignax.rl.loop import prompt_batches
from alignax.rl.loop import resume
from alignax.rl.loop import train_ppo
from alignax.rl.losses import clipped_surrogate
from alignax.rl.losses import clipped_value_loss
from alignax.rl.models import ActorCritic
from alignax.rl.models import Critic
from alignax.rl.models import ValueHead
from alignax.rl.penalties import PenaltyConfig
from alignax.rl.penalties import divergence_estimate
from alignax.rl.penalties import loss_penalty
from alignax.rl.penalties import reward_penalty
from alignax.rl.rewards import FunctionReward
from alignax.rl.rewards import ModelReward
from alignax.rl.step import PPOState
from alignax.rl.trainer import PPOTrainer
from alignax.rl.trainer import make_ppo_optimizer

__all__ = [
    "ActorCritic",
    "BanditPPOConfig",
    "Critic",
    "FunctionReward",
    "KLControllerConfig",
    "ModelReward",
    "PPOConfig",
    "PPOState",
    "PPOTrainer",
    "PenaltyConfig",
    "RolloutConfig",
    "ValueHead",
    "clipped_surrogate",
    "clipped_value_loss",
    "divergence_estimate",
    "gae",
    "group_advantages",
    "loss_penalty",
    "make_ppo_optimizer",
    "masked_whiten",
    "placement_study",
    "prompt_batches",
    "resume",
    "reward_penalty",
    "train_bandit_ppo",
    "train_ppo",
]
