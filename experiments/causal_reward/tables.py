"""Result tables: our numbers (mean and a t interval over seeds) next to the thesis' numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

MODELS = ("vanilla", "conditional", "unconditional")
"""The reward models of every study: vanilla Bradley-Terry, conditional and unconditional CRM."""

MODEL_NAMES = {"sft": "SFT", "vanilla": "Vanilla RM", "conditional": "Conditional CRM",
               "unconditional": "Unconditional CRM"}


def mean_interval(values, *, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval) of seed results [S].

    The half-width is NaN for a single value (no spread to estimate); NaN values (an undefined
    metric in some seed) are refused, not averaged away.

    >>> mean_interval([1.0, 2.0, 3.0])  # t_{0.975, 2} * 1 / sqrt(3)
    (2.0, 2.4841...)
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"values must be finite, got {v.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if v.size == 1:
        return float(v[0]), math.nan
    half = scipy.stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def format_interval(values, *, digits: int = 2) -> str:
    """"mean ± half-width (n=S)" of seed results, or "mean (n=1)"."""
    mean, half = mean_interval(values)
    n = len(values)
    if math.isnan(half):
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={n})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are str()-ed.

    >>> print(markdown_table(["a", "b"], [[1, "x"]]))
    | a | b |
    |---|---|
    | 1 | x |
    """
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells: {[len(r) for r in rows]}")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
