"""Preference-optimization objectives: pure functions of log-ratios, unreduced float32 outputs,
and their registered configs (`alignax.objectives.registry`) that the train step runs.

One name per line, grouped by the topic module that holds it.
"""

# The objective contract: registry, typed inputs, requirements
from alignax.objectives.registry import OBJECTIVES
from alignax.objectives.registry import Needs
from alignax.objectives.registry import Objective
from alignax.objectives.registry import ObjectiveInputs
from alignax.objectives.registry import Scores
from alignax.objectives.registry import get_objective
from alignax.objectives.registry import objective_from_config
from alignax.objectives.registry import objective_to_config
from alignax.objectives.registry import register

# f-DPO family (thesis ch. 2)
from alignax.objectives.fdpo import fdpo_loss
from alignax.objectives.fdpo import ipo_loss
from alignax.objectives.fdpo import nll_loss
from alignax.objectives.fdpo import DPO
from alignax.objectives.fdpo import FDPO
from alignax.objectives.fdpo import IPO
from alignax.objectives.fdpo import SFT

# Multi-sample preference optimization (thesis ch. 3)
from alignax.objectives.multisample import group_margin
from alignax.objectives.multisample import group_nll_loss
from alignax.objectives.multisample import mdpo_loss
from alignax.objectives.multisample import mipo_loss
from alignax.objectives.multisample import mipo_loss_with_metrics
from alignax.objectives.multisample import MDPO
from alignax.objectives.multisample import MIPO
from alignax.objectives.diffusion import denoising_error
from alignax.objectives.diffusion import diffusion_mdpo_loss

# Causal reward models (thesis ch. 4)
from alignax.objectives.reward import bradley_terry_loss
from alignax.objectives.reward import reward_accuracy
from alignax.objectives.reward import reward_centering_loss
from alignax.objectives.reward import reward_margin
from alignax.objectives.reward import BradleyTerry
from alignax.objectives.causal import binned_mmd2
from alignax.objectives.causal import causal_dpo_loss
from alignax.objectives.causal import causal_reward_loss
from alignax.objectives.causal import crm_regularizer
from alignax.objectives.causal import gaussian_kernel
from alignax.objectives.causal import median_heuristic_bandwidth
from alignax.objectives.causal import mmd2
from alignax.objectives.causal import CausalDPO
from alignax.objectives.causal import CausalReward

# Reward-model distillation (004)
from alignax.objectives.distill import distill_loss
from alignax.objectives.distill import pessimistic_distill_loss
from alignax.objectives.distill import pessimistic_dpo_loss
from alignax.objectives.distill import Distill
from alignax.objectives.distill import PessimisticDistill
from alignax.objectives.distill import PessimisticDPO

__all__ = [
    "OBJECTIVES",
    "Needs",
    "Objective",
    "ObjectiveInputs",
    "Scores",
    "get_objective",
    "objective_from_config",
    "objective_to_config",
    "register",
    "SFT",
    "FDPO",
    "DPO",
    "IPO",
    "MDPO",
    "MIPO",
    "BradleyTerry",
    "CausalDPO",
    "CausalReward",
    "Distill",
    "PessimisticDistill",
    "PessimisticDPO",
    "fdpo_loss",
    "ipo_loss",
    "nll_loss",
    "group_margin",
    "group_nll_loss",
    "mdpo_loss",
    "mipo_loss",
    "mipo_loss_with_metrics",
    "denoising_error",
    "diffusion_mdpo_loss",
    "bradley_terry_loss",
    "reward_accuracy",
    "reward_centering_loss",
    "reward_margin",
    "binned_mmd2",
    "causal_dpo_loss",
    "causal_reward_loss",
    "crm_regularizer",
    "gaussian_kernel",
    "median_heuristic_bandwidth",
    "mmd2",
    "distill_loss",
    "pessimistic_distill_loss",
    "pessimistic_dpo_loss",
]
