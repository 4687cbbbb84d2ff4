"""Validation selection, bootstrap intervals, the paper's claims, tables and figures.

Records (one per policy run, results.jsonl): {"method", "value", "rho", "seed", "evals": [{"step",
"val": per-prompt stats, "test": per-prompt stats, "member_counts" (e-DPO)}]}; baselines (pi_SFT,
per seed): {"val": ..., "test": ...}. Per-prompt stats are `policies.SampleStats.as_dict()`.

- advantage: the policy's per-prompt mean oracle reward minus pi_SFT's on the same prompts;
- selection (004 §4.1 "We use the validation set for model selection during policy training
  and to choose the hyperparameters"): per (method, rho), the (value, step) whose validation
  advantage, averaged over seeds and validation prompts, is largest;
- Figure 2: the selected policy's test advantage, mean and 95% bootstrap interval over the
  (seed, test prompt) units (`alignax.eval.bootstrap_estimate`);
- paired differences against DPO on the same units (`alignax.eval.compare`);
- Figure C.1: the share of D_rho's pairs whose best-matching member is r_{rho,b}, for the
  selected e-DPO policy, pooled over seeds;
- Figure D.1: the validation advantage of each swept value (at its best step) per rho.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.ticker
import numpy as np

from alignax.eval import Estimate, bootstrap_estimate, compare, markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLAIMS = (
    ("improves", "sizable improvements over pi_SFT for all length biases (§4.2)"),
    ("distill_beats_dpo_ipo", "d-DPO, pd-DPO and e-DPO beat DPO and IPO for rho <= 0.5 (§4.2)"),
    ("edpo_best_short", "e-DPO is the best method for rho < 0.5 (§4.2)"),
    ("ddpo_best_long", "d-DPO is the best method for rho > 0.6 (§4.2)"),
    ("pdpo_not_better", "p-DPO does no better than the best distillation method, every rho "
                        "(§4.2)"),
    ("members_opposite", "e-DPO's best-matching member has the opposite bias: mean b > 0.5 "
                         "at the smallest rho < 0.5, < 0.5 at the largest rho > 0.5, and falls "
                         "as rho rises (App. C)"),
    ("beta_inverse", "the selected beta (DPO-based methods) falls as rho rises (App. D)"),
)
"""(key, the paper's claim): every one of them is stated as holding in 004."""


def paper_statement(rho: float) -> str:
    """What 004 §4.2 states about the methods at `rho` (Figure 2 is a plot; its numbers are
    not given in the text, so the paper's column of the Figure 2 table is this statement)."""
    if rho <= 0.5:
        return "e-DPO generally best; d-, pd-, e-DPO > DPO, IPO (p < .01)"
    if rho > 0.6:
        return "d-DPO best; d-DPO > DPO, IPO (p < .01)"
    return "(no statement)"


def advantage(stats: Mapping, baseline: Mapping) -> np.ndarray:
    """[P] per-prompt oracle advantage over pi_SFT: policy mean minus pi_SFT mean."""
    return np.asarray(stats["oracle"], np.float64) - np.asarray(baseline["oracle"], np.float64)


def candidates(records: Sequence[Mapping], method: str, rho: float
               ) -> dict[tuple[float, int], dict[int, Mapping]]:
    """(value, step) -> {seed: eval record} of `method` at `rho`."""
    out: dict = collections.defaultdict(dict)
    for record in records:
        if record["method"] == method and math.isclose(record["rho"], rho):
            for evaluation in record["evals"]:
                out[(record["value"], evaluation["step"])][record["seed"]] = evaluation
    return dict(out)


def select(records: Sequence[Mapping], baselines: Mapping[int, Mapping], method: str,
           rho: float, seeds: Sequence[int]) -> dict:
    """The validation selection of `method` at `rho` (module docstring).

    Returns:
      {"value", "step", "val": mean validation advantage, "test_units": [S P] test advantages
      of the (seed, prompt) units in seed order, "evals": {seed: eval record}}.

    Raises:
      ValueError: no (value, step) has a record for every seed.
    """
    best = None
    for (value, step), by_seed in sorted(candidates(records, method, rho).items()):
        if set(seeds) - set(by_seed):
            continue
        val = float(np.mean([advantage(by_seed[s]["val"], baselines[s]["val"]) for s in seeds]))
        if best is None or val > best["val"]:
            best = {"value": value, "step": step, "val": val, "evals": by_seed}
    if best is None:
        raise ValueError(f"no {method} run at rho={rho} has a record for every seed {list(seeds)}")
    best["test_units"] = np.concatenate([advantage(best["evals"][s]["test"], baselines[s]["test"])
                                         for s in seeds])
    return best


def validation_curve(records: Sequence[Mapping], baselines: Mapping[int, Mapping], method: str,
                     rho: float, seeds: Sequence[int]) -> dict[float, float]:
    """value -> the best (over eval steps) mean validation advantage (Figure D.1)."""
    curve: dict[float, float] = {}
    for (value, _), by_seed in candidates(records, method, rho).items():
        if set(seeds) - set(by_seed):
            continue
        val = float(np.mean([advantage(by_seed[s]["val"], baselines[s]["val"]) for s in seeds]))
        curve[value] = max(curve.get(value, -math.inf), val)
    return dict(sorted(curve.items()))


def member_shares(selected: Mapping) -> np.ndarray:
    """[B] the share of pairs whose best-matching member is each r_{rho,b}, pooled over the
    seeds of a selected e-DPO policy (Figure C.1)."""
    counts = np.sum([np.asarray(e["member_counts"], np.float64)
                     for e in selected["evals"].values()], axis=0)
    return counts / counts.sum()


def mean_of(selected: Mapping, split: str, name: str) -> float:
    """The mean over seeds and prompts of a per-prompt stat of a selected policy."""
    return float(np.mean([np.mean(e[split][name]) for e in selected["evals"].values()]))


def judge_claims(estimates: Mapping[str, Mapping[float, Estimate]], selections, shares,
                 biases: Sequence[float]) -> dict[str, tuple[str, str]]:
    """Each claim of `CLAIMS` judged on this run: key -> (verdict, the numbers behind it).

    verdict: "holds", "fails", or "n/a" (the run lacks the methods or rhos it needs).
    estimates: method -> rho -> Estimate of the test advantage; selections: method -> rho ->
    `select` output; shares: rho -> `member_shares` of e-DPO.
    """
    rhos = sorted(next(iter(estimates.values())).keys()) if estimates else []
    mean = {m: {r: e.mean for r, e in by_rho.items()} for m, by_rho in estimates.items()}
    has = lambda *ms: all(m in mean for m in ms)  # noqa: E731
    out: dict[str, tuple[str, str]] = {}

    def verdict(ok: bool) -> str:
        return "holds" if ok else "fails"

    lows = {r: max(estimates[m][r].low for m in estimates) for r in rhos}
    out["improves"] = (verdict(all(low > 0 for low in lows.values())), ", ".join(
        f"rho={r:g}: best CI low {lows[r]:+.3f}" for r in rhos)) if rhos else ("n/a", "")

    short = [r for r in rhos if r <= 0.5]
    distilled = [m for m in ("d-dpo", "pd-dpo", "e-dpo") if m in mean]
    if short and distilled and has("dpo", "ipo"):
        wins = [(m, r) for m in distilled for r in short
                if mean[m][r] > max(mean["dpo"][r], mean["ipo"][r])]
        out["distill_beats_dpo_ipo"] = (verdict(len(wins) == len(distilled) * len(short)),
                                        f"{len(wins)} of {len(distilled) * len(short)} "
                                        "(method, rho) cells")
    else:
        out["distill_beats_dpo_ipo"] = ("n/a", "needs dpo, ipo, a distillation method and a "
                                               "rho <= 0.5")

    def best_at(r):
        return max(mean, key=lambda m: mean[m][r])

    below = [r for r in rhos if r < 0.5]
    out["edpo_best_short"] = ((verdict(all(best_at(r) == "e-dpo" for r in below)),
                               ", ".join(f"rho={r:g}: {best_at(r)}" for r in below))
                              if below and has("e-dpo") and len(mean) > 1 else ("n/a", ""))
    above = [r for r in rhos if r > 0.6]
    out["ddpo_best_long"] = ((verdict(all(best_at(r) == "d-dpo" for r in above)),
                              ", ".join(f"rho={r:g}: {best_at(r)}" for r in above))
                             if above and has("d-dpo") and len(mean) > 1 else ("n/a", ""))
    if has("p-dpo") and distilled:
        gaps = {r: mean["p-dpo"][r] - max(mean[m][r] for m in distilled) for r in rhos}
        out["pdpo_not_better"] = (verdict(all(g <= 0 for g in gaps.values())), ", ".join(
            f"rho={r:g}: {g:+.3f}" for r, g in gaps.items()))
    else:
        out["pdpo_not_better"] = ("n/a", "")

    if shares and len(shares) >= 2:
        mean_b = {r: float(np.dot(shares[r], biases)) for r in sorted(shares)}
        low_r, high_r = min(mean_b), max(mean_b)
        slope = np.polyfit(list(mean_b), list(mean_b.values()), 1)[0]
        ok = (low_r < 0.5 and mean_b[low_r] > 0.5 and high_r > 0.5 and mean_b[high_r] < 0.5
              and slope < 0)
        out["members_opposite"] = (verdict(ok), ", ".join(
            f"rho={r:g}: mean b {b:.2f}" for r, b in mean_b.items()) + f"; slope {slope:+.2f}")
    else:
        out["members_opposite"] = ("n/a", "needs e-dpo at two rhos or more")

    dpo_based = [m for m in ("dpo", "d-dpo", "p-dpo", "pd-dpo", "e-dpo") if m in selections]
    if len(rhos) >= 2 and dpo_based:
        slopes = {m: np.polyfit(rhos, [np.log(selections[m][r]["value"]) for r in rhos], 1)[0]
                  for m in dpo_based}
        chosen = {m: "/".join(format(selections[m][r]["value"], "g") for r in rhos)
                  for m in dpo_based}
        out["beta_inverse"] = (verdict(all(s < 0 for s in slopes.values())),
                               ", ".join(f"{m}: {v}" for m, v in chosen.items()))
    else:
        out["beta_inverse"] = ("n/a", "")
    return out


def figure2(estimates: Mapping[str, Mapping[float, Estimate]], path) -> None:
    """Bars of the selected policies' test advantage per rho and method, with 95% CIs."""
    methods = list(estimates)
    rhos = sorted(next(iter(estimates.values())))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rhos), 3.6))
    for i, method in enumerate(methods):
        xs = np.arange(len(rhos)) + (i - (len(methods) - 1) / 2) * width
        es = [estimates[method][r] for r in rhos]
        ax.bar(xs, [e.mean for e in es], width, label=method,
               yerr=[[e.mean - e.low for e in es], [e.high - e.mean for e in es]], capsize=2)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(rhos)), [f"{r:g}" for r in rhos])
    ax.set(xlabel="rho (fraction of D_rho where the longer response wins)",
           ylabel="oracle advantage over pi_SFT", title="cf. 004 Figure 2")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_c1(shares: Mapping[float, np.ndarray], biases: Sequence[float], path) -> None:
    """Stacked bars: per rho, the share of pairs best matched by each member r_{rho,b}."""
    rhos = sorted(shares)
    fig, ax = plt.subplots(figsize=(1.6 + 1.0 * len(rhos), 3.4))
    bottom = np.zeros(len(rhos))
    for j, b in enumerate(biases):
        values = np.array([shares[r][j] for r in rhos])
        ax.bar([f"{r:g}" for r in rhos], values, bottom=bottom, label=f"b={b:g}")
        bottom += values
    ax.set(xlabel="rho", ylabel="share of D_rho's pairs", ylim=(0, 1),
           title="e-DPO: best-matching member (cf. 004 Fig. C.1)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_d1(curves: Mapping[str, Mapping[float, Mapping[float, float]]], path) -> None:
    """One panel per method: validation advantage against beta (IPO: 1 / tau), one line per
    rho (cf. 004 Figure D.1)."""
    methods = list(curves)
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 2.8), sharey=True,
                             squeeze=False)
    for ax, method in zip(axes[0], methods):
        for rho, curve in sorted(curves[method].items()):
            xs = [1.0 / v if method == "ipo" else v for v in curve]
            order = np.argsort(xs)
            ax.plot(np.asarray(xs)[order], np.asarray(list(curve.values()))[order], marker="o",
                    label=f"rho={rho:g}")
        ax.set_xscale("log")
        ticks = sorted({1.0 / v if method == "ipo" else v for c in curves[method].values()
                        for v in c})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(title=method, xlabel="1 / tau" if method == "ipo" else "beta")
    axes[0][0].set_ylabel("validation advantage")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_against(selections, method: str, other: str, rho: float) -> Estimate:
    """Mean and paired 95% bootstrap interval of method - other on the same (seed, prompt)
    units (both selected on validation)."""
    return compare({"advantage": selections[method][rho]["test_units"]},
                   {"advantage": selections[other][rho]["test_units"]})["advantage"]


def estimate(units: np.ndarray, *, resamples: int) -> Estimate:
    """Mean and 95% bootstrap interval over the (seed, prompt) units."""
    return bootstrap_estimate(units, seed=0, num_resamples=resamples)


def table(rows: Mapping[str, Mapping], columns: Sequence[str], header: str) -> str:
    return markdown_table(rows, columns=list(columns), row_header=header)
