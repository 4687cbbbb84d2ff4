"""Preference-optimization objectives: pure functions of log-ratios, unreduced float32 outputs.

One name per line, grouped by the topic module that holds it.
"""

# f-DPO family (thesis ch. 2)
from alignax.objectives.fdpo import fdpo_loss
from alignax.objectives.fdpo import ipo_loss
from alignax.objectives.fdpo import nll_loss

__all__ = [
    "fdpo_loss",
    "ipo_loss",
    "nll_loss",
]
