"""Win rates of one policy over another with bootstrap intervals, and the studies' tables.

A comparison pairs, for each seed s and test prompt p, a score of policy A with the same
prompt's score of policy B ([S, P] arrays, or [S, P, K] for K paired samples under a judge).
Each (seed, prompt) pair is one unit: its win rate is the share of its comparisons A wins,
ties counted one half (win + tie / 2 from `alignax.metrics.win_rates`), and the interval is
the 95% bootstrap interval over the S * P units (`alignax.eval.bootstrap_estimate`). With a
few seeds the units of one seed share its trained model, so the interval reflects prompts and
sampling more than the seed-to-seed spread of training; `seed_spread` gives that spread.
"""

from __future__ import annotations

import numpy as np

from alignax.eval import Estimate, bootstrap_estimate
from alignax.metrics import compare_scores, win_rates

TIE_TOLERANCE = 1e-6
"""Scores within this of each other tie: the entropies of two identical answer multisets can
differ in the last float32 bit (summation order), while distinct multisets of K <= 1000
answers differ by far more."""


def outcomes(a, b, *, higher_is_better: bool = True) -> np.ndarray:
    """+1 / 0 / -1 per comparison of paired scores a, b ([S, P] or [S, P, K])."""
    return compare_scores(a, b, higher_is_better=higher_is_better, tolerance=TIE_TOLERANCE)


def unit_rates(a, b, *, higher_is_better: bool = True) -> dict[str, np.ndarray]:
    """Per (seed, prompt) unit: "win", "tie", "loss" and "win_rate" (= win + tie / 2),
    each [S * P] float64, from scores [S, P] or [S, P, K]."""
    o = outcomes(a, b, higher_is_better=higher_is_better)
    o = o.reshape(o.shape[0] * o.shape[1], -1)  # [S, P(, K)] -> [S P, K]
    rates = win_rates(o)
    return {"win": rates["win"], "tie": rates["tie"], "loss": rates["loss"],
            "win_rate": rates["win"] + 0.5 * rates["tie"]}


def win_rate(a, b, *, higher_is_better: bool = True, seed: int = 0) -> dict[str, Estimate]:
    """Estimates of A's win rate over B (ties one half) and of its win / tie / loss shares."""
    rates = unit_rates(a, b, higher_is_better=higher_is_better)
    return {name: bootstrap_estimate(values, seed=seed) for name, values in rates.items()}


def mean_estimate(values, *, seed: int = 0) -> Estimate:
    """The mean of [S, P] per-(seed, prompt) values with its bootstrap interval."""
    return bootstrap_estimate(np.asarray(values, np.float64).ravel(), seed=seed)


def seed_spread(a, b, *, higher_is_better: bool = True) -> tuple[float, float]:
    """(min, max) over seeds of the per-seed win rate of A over B."""
    rates = unit_rates(a, b, higher_is_better=higher_is_better)["win_rate"]
    per_seed = rates.reshape(np.shape(a)[0], -1).mean(-1)  # [S P] -> [S]
    return float(per_seed.min()), float(per_seed.max())
