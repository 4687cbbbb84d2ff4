"""Reward-model distillation under a spurious length bias: 004 §4, Figure 2, C.1, D.1.

    python -m experiments.distill_length_bias                  # embedded default
    python -m experiments.distill_length_bias --rhos 0.2 0.3 0.4 0.5 0.6 0.7 0.8

TODO(docstring): written after the full-size run.
"""

from experiments.distill_length_bias.study import PAPER, SMOKE, Config, main, run

__all__ = ["Config", "PAPER", "SMOKE", "main", "run"]
