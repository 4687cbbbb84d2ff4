"""Analytic toy lab: finite-response policies, exact optima, population losses (vmappable)."""

# f-DPO finite-response toy (thesis ch. 2)
from alignax.toy.bandit import BanditInstance
from alignax.toy.bandit import beta_for_reward
from alignax.toy.bandit import bradley_terry_probs
from alignax.toy.bandit import divergence_from_reference
from alignax.toy.bandit import expected_reward
from alignax.toy.bandit import optimal_policy
from alignax.toy.bandit import policy_entropy
from alignax.toy.bandit import population_fdpo_loss
from alignax.toy.bandit import random_instance
from alignax.toy.bandit import train_fdpo_policy

# Reward-model distillation toys (paper 004)
from alignax.toy.distill import StudyConfig
from alignax.toy.distill import evaluate_method
from alignax.toy.distill import hull_pessimistic_optimum
from alignax.toy.distill import pessimistic_value
from alignax.toy.distill import population_distill_loss
from alignax.toy.distill import prepare_study
from alignax.toy.distill import rlhf_optimum
