"""Turning summaries into a Markdown table, JSON records and a reward-vs-divergence plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from alignax.eval.intervals import Estimate

Cell = Estimate | float | int | str | None


def _format(cell: Cell, digits: int) -> str:
    if cell is None:
        return ""
    if isinstance(cell, Estimate):
        return cell.format(digits)
    if isinstance(cell, float):
        return f"{cell:.{digits}f}"
    return str(cell)


def markdown_table(rows: Mapping[str, Mapping[str, Cell]], *,
                   columns: Sequence[str] | None = None, row_header: str = "policy",
                   digits: int = 3) -> str:
    """A Markdown table: one row per entry of `rows`, one column per metric.

    Args:
      rows: row label -> {column -> Estimate ("mean [low, high]"), number or text}; a missing
        cell is left empty.
      columns: the columns in order (default: every column in first-seen order).
      row_header: the first column's title.
      digits: decimals of numbers.

    Examples:
      >>> print(markdown_table({"dpo": {"reward": Estimate(0.5, 0.4, 0.6, 10)}}))
      | policy | reward |
      |---|---|
      | dpo | 0.500 [0.400, 0.600] |
    """
    if columns is None:
        columns = list(dict.fromkeys(c for cells in rows.values() for c in cells))
    lines = ["| " + " | ".join([row_header, *columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for label, cells in rows.items():
        lines.append("| " + " | ".join([label] + [_format(cells.get(c), digits)
                                                 for c in columns]) + " |")
    return "\n".join(lines)


def summary_record(summary: Mapping[str, Estimate], **fields) -> dict:
    """A flat JSON-able record: the given fields, then NAME, NAME/low, NAME/high per metric
    (and "n" once), e.g. one JSONL line per (policy, seed, beta)."""
    record = dict(fields)
    for name, estimate in summary.items():
        record[name] = estimate.mean
        record[f"{name}/low"] = estimate.low
        record[f"{name}/high"] = estimate.high
        record.setdefault("n", estimate.n)
    return record


def frontier_plot(curves: Mapping[str, Sequence[Mapping[str, Estimate]]], *, x: str, y: str,
                  path: str | os.PathLike | None = None, ax=None, point_labels=None,
                  title: str | None = None):
    """Plots y against x with both intervals as error bars, one line per curve (thesis
    Figure 2.2: reward against KL, one curve per divergence traced by beta).

    Args:
      curves: curve label -> a sequence of summaries (`summarize` outputs), one per point.
      x, y: the metric names on each axis (e.g. "divergence/reverse_kl", "score/oracle").
      path: where to save a PNG (None: do not save).
      ax: a matplotlib Axes to draw on (None: a new figure).
      point_labels: optional curve label -> sequence of texts written next to the points
        (e.g. the betas).
      title: the Axes title.

    Returns:
      The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4.2))
    else:
        fig = ax.figure
    for label, points in curves.items():
        missing = [i for i, s in enumerate(points) if x not in s or y not in s]
        if missing:
            raise ValueError(f"curve {label!r}: points {missing} lack {x!r} or {y!r}")
        xs = [s[x] for s in points]
        ys = [s[y] for s in points]
        ax.errorbar([e.mean for e in xs], [e.mean for e in ys],
                    xerr=[[e.mean - e.low for e in xs], [e.high - e.mean for e in xs]],
                    yerr=[[e.mean - e.low for e in ys], [e.high - e.mean for e in ys]],
                    marker="o", capsize=2, label=label)
        for text, ex, ey in zip((point_labels or {}).get(label, ()), xs, ys):
            if math.isfinite(ex.mean) and math.isfinite(ey.mean):
                ax.annotate(str(text), (ex.mean, ey.mean), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
