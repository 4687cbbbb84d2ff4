"""Result tables: our numbers (mean and a t interval over seeds) next to the thesis' numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

MODELS = ("vanilla", "conditional", "unconditional")
"""The reward models of every study: vanilla Bradley-Terry, conditional and unconditional CRM."""

MODEL_NAMES = {"sft": "SFT", "vanilla": "Vanilla RM", "conditional": "Conditional CRM",
               "unconditional": "Unconditional CRM", "dpo": "DPO", "causal_dpo": "Causal DPO"}
"""Row names of the policies a study compares: the SFT policy, PPO against each reward model,
and (the §4.8 extension) DPO and Causal DPO trained directly on the pairs."""


def row_key(model: str, lam: float | None = None) -> str:
    """The results key of a policy: "vanilla", or "conditional@1" for a lambda sweep point.

    >>> row_key("conditional", 1.0), row_key("sft")
    ('conditional@1', 'sft')
    """
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {list(MODEL_NAMES)}")
    return model if lam is None else f"{model}@{lam:g}"


def split_row_key(key: str) -> tuple[str, float | None]:
    """("conditional", 1.0) from "conditional@1"; ("vanilla", None) from "vanilla"."""
    model, _, lam = key.partition("@")
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown models [{key!r}]; expected some of {list(MODEL_NAMES)}, "
                         f"optionally with '@lambda'")
    return model, (float(lam) if lam else None)


def row_label(key: str) -> str:
    """"Conditional CRM (λ = 1)" for "conditional@1"; "Vanilla RM" for "vanilla"."""
    model, lam = split_row_key(key)
    return MODEL_NAMES[model] + ("" if lam is None else f" (λ = {lam:g})")


def ordered_keys(keys) -> list[str]:
    """Result keys in table order: SFT, vanilla, conditional, unconditional (each by lambda),
    DPO, Causal DPO. ValueError naming an unknown key."""
    order = list(MODEL_NAMES)
    parsed = {key: split_row_key(key) for key in keys}
    return sorted(parsed, key=lambda k: (order.index(parsed[k][0]), parsed[k][1] or 0.0))


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


def paired_claim(claim: str, treatment: Sequence[float], baseline: Sequence[float], *,
                 lower_is_better: bool, digits: int = 2) -> str:
    """One line stating whether `claim` holds in our runs: the per-seed differences
    treatment - baseline (paired by seed) with their mean and 95% t-interval; "reproduced" when
    the interval lies on the claimed side of 0, "opposite" when it lies on the other side,
    "inconclusive" otherwise (also with one seed).

    >>> paired_claim("CRM lowers x", [1.0, 1.5, 1.2], [3.0, 3.2, 2.9], lower_is_better=True)
    '- CRM lowers x: difference -1.80 ± 0.43 (n=3): reproduced'
    """
    t, b = np.asarray(treatment, np.float64), np.asarray(baseline, np.float64)
    if t.shape != b.shape or t.ndim != 1:
        raise ValueError(f"treatment {t.shape} and baseline {b.shape} must be paired [S] seeds")
    mean, half = mean_interval(t - b)
    sign = -1.0 if lower_is_better else 1.0
    if math.isnan(half) or abs(mean) <= half:
        verdict = "inconclusive"
    else:
        verdict = "reproduced" if sign * mean > 0 else "opposite"
    return f"- {claim}: difference {format_interval(t - b, digits=digits)}: {verdict}"
