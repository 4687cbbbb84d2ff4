"""The penalty coefficient beta: fixed, or adaptive towards a target divergence (Ziegler et al.,
2019, §2.2): after each rollout batch of n responses with measured divergence d,

    e = clip(d / target - 1, -0.2, 0.2),    beta <- beta (1 + e n / horizon).

The coefficient lives in the PPO state (a traced scalar), so it is checkpointed with it and a
change of value never recompiles. "Divergence" is the penalty's own f-divergence estimate, so
the controller holds the divergence PPO penalises at the target (KL for reverse KL).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KLControllerConfig:
    """beta's initial value, and the adaptive controller's target and horizon.

    Attributes:
      init_coef: beta at the start (> 0; the thesis' ch. 4 PPO runs start at 0.01).
      target: the divergence per response to hold; None keeps beta fixed.
      horizon: responses over which a full 20% correction is applied (Ziegler et al.: 10000).
    """

    init_coef: float = 0.05
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self):
        if not self.init_coef > 0:
            raise ValueError(f"KLControllerConfig.init_coef must be > 0, got {self.init_coef}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"KLControllerConfig.target must be > 0 or None, got {self.target}")
        if self.horizon < 1:
            raise ValueError(f"KLControllerConfig.horizon must be >= 1, got {self.horizon}")


def update_coef(config: KLControllerConfig, coef: jax.Array, divergence: jax.Array,
                num_responses: int) -> jax.Array:
    """The next beta: unchanged when fixed, else the proportional update above.

    Args:
      config: the controller.
      coef: [] current beta.
      divergence: [] measured divergence per response of the last rollout batch.
      num_responses: n, the responses in that batch.

    Examples:
      >>> float(update_coef(KLControllerConfig(target=1.0, horizon=100), 0.1, 3.0, 50))
      0.11
    """
    coef = jnp.asarray(coef, jnp.float32)
    if config.target is None:
        return coef
    error = jnp.clip(divergence / config.target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * num_responses / config.horizon)
