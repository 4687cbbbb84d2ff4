"""Paired comparisons of two policies: outcomes (+1 win, 0 tie, -1 loss) and win rates.

A comparison pairs one thing of policy A with one of policy B for the same prompt: sample k of
A with sample k of B under a judge (thesis §3.6.4, §4.6.2), or a per-prompt statistic of A's
samples with B's (Table 3.1: the winner of a prompt is the policy with the larger entropy).
Ties are kept as their own outcome, never split or dropped. Host-side NumPy with eager checks.
"""

from __future__ import annotations

import numpy as np


def compare_scores(a, b, *, higher_is_better: bool = True, tolerance: float = 0.0) -> np.ndarray:
    """Outcomes of A against B from paired scores: +1 where A is better, -1 worse, 0 a tie.

    Args:
      a, b: same-shape scores, e.g. [P] per-prompt entropies or [P, K] oracle rewards of
        paired samples.
      higher_is_better: whether a larger score wins.
      tolerance: |a - b| <= tolerance is a tie (0: only exact equality).

    Returns:
      int8 array of a's shape.

    Examples:
      >>> compare_scores([1.0, 2.0, 3.0], [2.0, 2.0, 1.0])
      array([-1,  0,  1], dtype=int8)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: a {a.shape}, b {b.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    bad = np.argwhere(np.isnan(a) | np.isnan(b))
    if bad.size:
        raise ValueError(f"NaN scores at indices {bad[:8].tolist()}: a comparison with NaN has "
                         f"no outcome; filter those entries explicitly")
    diff = a - b if higher_is_better else b - a
    return np.where(np.abs(a - b) <= tolerance, 0, np.sign(diff)).astype(np.int8)


def win_rates(outcomes) -> dict[str, np.ndarray]:
    """Per-prompt win / tie / loss fractions and the win score of thesis §4.6.2.

    Args:
      outcomes: [P] (one comparison per prompt) or [P, K] (K paired comparisons per prompt) of
        +1 (A wins), 0 (tie), -1 (A loses).

    Returns:
      {"win", "tie", "loss", "win_score"}, each [P] float64; win + tie + loss = 1 and
      win_score = 50 + 100 (win - loss). With the same K for every prompt, the mean over
      prompts of each is its value over all P K comparisons (so `alignax.eval.summarize` gives
      the overall rates with bootstrap intervals over prompts), and the mean win_score equals
      `alignax.metrics.win_score(outcomes.ravel())`.

    Examples:
      >>> rates = win_rates([[1, 1, 0, -1]])
      >>> [float(rates[k][0]) for k in ("win", "tie", "loss", "win_score")]
      [0.5, 0.25, 0.25, 75.0]
    """
    o = np.asarray(outcomes)
    if o.ndim == 1:
        o = o[:, None]
    if o.ndim != 2 or o.shape[1] == 0:
        raise ValueError(f"outcomes must be [P] or [P, K] with K >= 1, got shape {np.shape(outcomes)}")
    bad = np.argwhere(~np.isin(o, (-1, 0, 1)))
    if bad.size:
        raise ValueError(f"outcomes must be +1, 0 or -1; bad entries at {bad[:8].tolist()}")
    win, tie, loss = (np.mean(o == v, axis=1, dtype=np.float64) for v in (1, 0, -1))
    return {"win": win, "tie": tie, "loss": loss, "win_score": 50.0 + 100.0 * (win - loss)}
