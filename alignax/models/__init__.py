"""Flax NNX causal LMs (Llama/Mistral/Qwen2, GPT-2, GPT-NeoX) that load and save Hugging Face
safetensors checkpoints, with their layers under one scan (per-layer remat), logical-axis
sharding, KV-cache sampling, and LoRA adapters (`alignax.models.lora`)."""

from alignax.models.attention import KVCache
from alignax.models.causal_lm import CausalLM
from alignax.models.config import ModelConfig
from alignax.models.config import tiny_config
from alignax.models.generate import generate
from alignax.models.loading import from_pretrained
from alignax.models.partitioning import DEFAULT_RULES
from alignax.models.partitioning import logical_to_mesh_sharding
from alignax.models.partitioning import state_shardings
from alignax.models.registry import create
from alignax.models.reward import RewardEnsemble
from alignax.models.reward import RewardModel
from alignax.models.reward import create_reward_model
from alignax.models.reward import load_reward_model
from alignax.models.reward import save_reward_model
from alignax.models.saving import save_pretrained

__all__ = [
    "CausalLM",
    "DEFAULT_RULES",
    "KVCache",
    "ModelConfig",
    "RewardEnsemble",
    "RewardModel",
    "create",
    "create_reward_model",
    "from_pretrained",
    "generate",
    "load_reward_model",
    "logical_to_mesh_sharding",
    "save_pretrained",
    "save_reward_model",
    "state_shardings",
    "tiny_config",
]
