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
