"""The results of `experiments.fdpo_frontier`: tables beside the thesis' numbers, the thesis'
claims checked against this run's numbers, figures, and JSON records.

A run record is {"method", "divergence", "coef", "seed", "evals": {step: {metric: [P]}},
"stopped"}; runs that differ only in the seed are pooled, and every mean comes with a 95%
bootstrap interval over the (seed, prompt) units (`alignax.eval.bootstrap_estimate`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import matplotlib
import numpy as np

from alignax.eval import Estimate, bootstrap_estimate, frontier_plot, markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FDPO = "f-DPO"
FDPO_NLL = "f-DPO+NLL"
PPO_METHODS = ("PPO(reward)", "PPO(loss)", "PPO(reward, f')")

TABLE_2_2 = {  # thesis Table 2.2 (Anthropic HH, Pythia 2.8B, temperature 1.0)
    "reverse_kl": (67.19, 12.25, 0.880, 0.021, 0.151),
    "jsd": (66.80, 12.31, 0.878, 0.021, 0.159),
    "alpha_0.3": (59.77, 12.85, 0.849, 0.026, 0.199),
    "alpha_0.5": (61.72, 12.90, 0.841, 0.028, 0.206),
    "alpha_0.7": (57.42, 12.98, 0.839, 0.027, 0.202),
    "forward_kl": (54.30, 13.01, 0.834, 0.029, 0.210),
}
"""divergence -> (accuracy %, entropy, self-BLEU, distinct-1, distinct-2)."""

TABLES_2_3_2_4 = {  # thesis Tables 2.3 (temperature 0.6) and 2.4 (1.4): self-BLEU, d-1, d-2
    0.6: {"reverse_kl": (0.8667, 0.0092, 0.0615), "jsd": (0.8679, 0.0099, 0.0662),
          "alpha_0.3": (0.8611, 0.0136, 0.0899), "alpha_0.5": (0.8579, 0.0148, 0.0950),
          "alpha_0.7": (0.8563, 0.0139, 0.0905), "forward_kl": (0.8515, 0.0142, 0.0926)},
    1.4: {"reverse_kl": (0.7975, 0.0973, 0.6574), "jsd": (0.7995, 0.1025, 0.6439),
          "alpha_0.3": (0.7759, 0.1107, 0.6952), "alpha_0.5": (0.7603, 0.1101, 0.6692),
          "alpha_0.7": (0.7537, 0.1151, 0.6659), "forward_kl": (0.7566, 0.1233, 0.7082)},
}

COLLAPSE_WELL_FORMED = 0.5
COLLAPSE_ENTROPY = 0.25
"""A run counts as collapsed when its final samples are less than half grammatical, or their
per-token entropy is below a quarter of the reference's (or the run stopped on a non-finite
update)."""


@dataclasses.dataclass
class Group:
    """The runs of one (method, divergence, coefficient) over seeds."""

    method: str
    divergence: str | None
    coef: float | None
    runs: list[dict]

    @property
    def steps(self) -> list[int]:
        return sorted(set.intersection(*(set(r["evals"]) for r in self.runs)))

    @property
    def final_step(self) -> int:
        return max(max(r["evals"]) for r in self.runs)

    def pooled(self, step: int, metric: str) -> np.ndarray | None:
        """The metric's per-prompt values at `step`, concatenated over the seeds that have it."""
        parts = [r["evals"][step][metric] for r in self.runs
                 if step in r["evals"] and metric in r["evals"][step]]
        return np.concatenate(parts) if parts else None


def group_runs(runs: Sequence[dict]) -> dict[tuple, Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = (r["method"], r["divergence"], r["coef"])
        groups.setdefault(key, Group(*key, []))
        groups[key].runs.append(r)
    return groups


class Summaries:
    """Memoised bootstrap estimates of pooled metrics."""

    def __init__(self, resamples: int):
        self.resamples = resamples
        self._cache: dict[tuple, Estimate | None] = {}

    def __call__(self, group: Group, step: int, metric: str) -> Estimate | None:
        key = (group.method, group.divergence, group.coef, step, metric)
        if key not in self._cache:
            values = group.pooled(step, metric)
            finite = None if values is None else values[~np.isnan(values)]
            self._cache[key] = None if finite is None or finite.size < 2 else bootstrap_estimate(
                values, seed=0, num_resamples=self.resamples, nan_policy="omit")
        return self._cache[key]


# ---------------------------------------------------------------- claims

def dominated(point, others) -> bool:
    """Whether some other (divergence, reward) point has <= divergence and >= reward, one of
    them strictly."""
    d, r = point
    return any(od <= d and orw >= r and (od < d or orw > r) for od, orw in others)


def frontier_points(groups, summaries, divergence: str, metric: str) -> dict[str, list]:
    """method -> [(divergence mean, reward mean)] of the plotted points of one panel: f-DPO at
    every evaluated step > 0 of every beta, PPO at the final step of every coefficient."""
    points = collections.defaultdict(list)
    for g in groups.values():
        if g.divergence != divergence:
            continue
        steps = [s for s in g.steps if s > 0] if g.method == FDPO else [g.final_step]
        for s in steps:
            x, y = summaries(g, s, metric), summaries(g, s, "score/oracle")
            if x is not None and y is not None:
                points[g.method].append((x.mean, y.mean))
    return points


def collapsed(run: dict, reference: dict) -> bool:
    if run.get("stopped"):
        return True
    final = run["evals"][max(run["evals"])]
    ref_entropy = float(np.mean(reference["entropy/token"]))
    return (float(np.mean(final["well_formed"])) < COLLAPSE_WELL_FORMED
            or float(np.mean(final["entropy/token"])) < COLLAPSE_ENTROPY * ref_entropy)


def claims(config, groups, summaries, reference_runs) -> tuple[list[str], dict]:
    """The thesis' claims, each with this run's numbers and whether it holds here."""
    lines, verdicts = [], {}
    reference = {r["seed"]: r["evals"][0] for r in reference_runs}
    ref_group = next(g for g in groups.values() if g.method == "reference")
    ref_reward = summaries(ref_group, 0, "score/oracle")

    # 0. the task is learnable
    best = max((summaries(g, g.final_step, "score/oracle").mean, g.divergence, g.coef)
               for g in groups.values() if g.method == FDPO)
    lines.append(f"- The policy learns the reward: the reference scores {ref_reward.format()}; "
                 f"the best f-DPO run ({best[1]}, beta {best[2]:g}) ends at {best[0]:.3f}.")

    # 1. divergence efficiency (Figure 2.2)
    ppo_present = any(g.method in PPO_METHODS for g in groups.values())
    if ppo_present:
        lines.append("- **f-DPO is more divergence-efficient than PPO** (§2.6.2, Figure 2.2): per "
                     "panel, the f-DPO points that some PPO point dominates (no more divergence "
                     "and no less reward, on the means) against the PPO points that some f-DPO "
                     "point dominates:")
        for name in config.divergences:
            points = frontier_points(groups, summaries, name, f"mis/{name}")
            fdpo_points = points.get(FDPO, [])
            ppo_points = [p for m in ("PPO(reward)", "PPO(loss)") for p in points.get(m, [])]
            if not fdpo_points or not ppo_points:
                continue
            beaten = sum(dominated(p, ppo_points) for p in fdpo_points)
            beats = sum(dominated(p, fdpo_points) for p in ppo_points)
            holds = beats / len(ppo_points) > beaten / len(fdpo_points)
            verdicts[f"efficiency/{name}"] = holds
            lines.append(f"  - {name}: {beaten} of {len(fdpo_points)} f-DPO points dominated by "
                         f"PPO, {beats} of {len(ppo_points)} PPO points dominated by f-DPO: "
                         f"{'reproduced' if holds else 'not reproduced'}.")

    # 2. stability of PPO(loss) vs PPO(reward) (§2.6.2, §2.8.1)
    if ppo_present:
        lines.append("- **PPO(loss) is more stable than PPO(reward) for JS, forward KL and alpha** "
                     f"(§2.6.2, §2.8.1): runs that collapsed (final samples < "
                     f"{COLLAPSE_WELL_FORMED:.0%} grammatical or per-token entropy < "
                     f"{COLLAPSE_ENTROPY:.0%} of the reference's), over coefficients and seeds:")
        for name in config.divergences:
            counts = {}
            for method in PPO_METHODS:
                runs = [r for g in groups.values() if g.method == method and g.divergence == name
                        for r in g.runs]
                if runs:
                    counts[method] = (sum(collapsed(r, reference[r["seed"]]) for r in runs),
                                      len(runs))
            if "PPO(reward)" not in counts or "PPO(loss)" not in counts:
                continue
            text = ", ".join(f"{m} {c} of {n}" for m, (c, n) in counts.items())
            if name == "reverse_kl":
                lines.append(f"  - {name} (the thesis expects both stable): {text}.")
                continue
            reward_c, loss_c = counts["PPO(reward)"][0], counts["PPO(loss)"][0]
            if reward_c == loss_c == 0:
                verdict = "not tested here (neither collapsed)"
            else:
                verdict = "reproduced" if loss_c < reward_c else "not reproduced"
                verdicts[f"stability/{name}"] = loss_c < reward_c
            lines.append(f"  - {name}: {text}: {verdict}.")

    # 2b. whether the coefficient restrains each PPO variant (the f(u)/u penalty's fixed point is
    # not the regularised optimum except for reverse KL: `alignax.rl.penalties`)
    if ppo_present and len(config.ppo_coefs) >= 2:
        low, high = min(config.ppo_coefs), max(config.ppo_coefs)
        lines.append(f"- Does the coefficient restrain PPO? D_f(pi, pi_ref) at the final step with "
                     f"coefficient {low:g} -> {high:g} (not a thesis claim; the thesis' "
                     "PPO(reward) penalty f(u)/u has the regularised optimum as its fixed point "
                     "only for reverse KL, the f'(u) - f'(1) ablation for every divergence):")
        for name in config.divergences:
            cells = []
            for method in PPO_METHODS:
                ends = [groups.get((method, name, c)) for c in (low, high)]
                if None in ends:
                    continue
                d = [summaries(g, g.final_step, f"mis/{name}") for g in ends]
                if None not in d:
                    cells.append(f"{method} {d[0].mean:.3f} -> {d[1].mean:.3f}")
            if cells:
                lines.append(f"  - {name}: " + "; ".join(cells) + ".")

    # 3. entropy ordering (§2.6.2, Table 2.2)
    beta = config.table_beta
    entropy = {}
    for name in ("reverse_kl", "jsd", "forward_kl"):
        g = groups.get((FDPO, name, beta))
        if g is not None:
            entropy[name] = summaries(g, g.final_step, "entropy/sequence")
    if len(entropy) == 3:
        order = entropy["reverse_kl"].mean < entropy["jsd"].mean < entropy["forward_kl"].mean
        separated = (entropy["reverse_kl"].high < entropy["jsd"].low
                     and entropy["jsd"].high < entropy["forward_kl"].low)
        verdicts["entropy_order"] = order
        lines.append(
            f"- **Reverse KL has the lowest predictive entropy, forward KL the highest, JSD "
            f"between** (§2.6.2, Table 2.2), f-DPO at beta {beta:g}, temperature 1: "
            + ", ".join(f"{k} {v.format(2)}" for k, v in entropy.items())
            + (": reproduced" if order else ": not reproduced")
            + ("" if not order else (" (intervals separated)." if separated else
                                     " on the means (intervals overlap).")))

    # 4. the NLL ablation
    nll = [g for g in groups.values() if g.method == FDPO_NLL]
    if nll:
        lines.append(f"- Ablation, not a thesis claim: f-DPO with an NLL term on the chosen "
                     f"responses (weight {config.nll_weight:g}, the protocol of the thesis' "
                     f"ch. 3) at beta {config.table_beta:g}, final step, against plain f-DPO "
                     "(reward / D_f / share of grammatical samples):")
        for g in nll:
            plain = groups.get((FDPO, g.divergence, g.coef))
            cells = []
            for label, h in (("f-DPO", plain), ("+NLL", g)):
                if h is None:
                    continue
                s = h.final_step
                values = [summaries(h, s, m) for m in ("score/oracle", f"mis/{g.divergence}",
                                                        "well_formed")]
                cells.append(f"{label} " + " / ".join("-" if v is None else f"{v.mean:.3f}"
                                                      for v in values))
            lines.append(f"  - {g.divergence}: " + "; ".join(cells) + ".")

    # 5. calibration (§2.6.4, Figure 2.5)
    lines.append("- **A larger beta restrains the growth of the ECE, which grows with training** "
                 "(§2.6.4, Figure 2.5): f-DPO's ECE change from the reference to the final step, "
                 "by beta:")
    for name in config.divergences:
        changes = []
        for b in config.betas:
            g = groups.get((FDPO, name, b))
            if g is None:
                continue
            final, start = g.pooled(g.final_step, "ece"), g.pooled(0, "ece")
            if final is not None and len(final) == len(start):
                changes.append((b, float(np.mean(final - start))))
        if len(changes) >= 2:
            grows = changes[0][1] > 0
            restrained = changes[-1][1] < changes[0][1]
            verdicts[f"ece/{name}"] = grows and restrained
            lines.append(f"  - {name}: " + ", ".join(f"beta {b:g}: {c:+.3f}" for b, c in changes)
                         + f": {'reproduced' if grows and restrained else 'not reproduced'}.")
    return lines, verdicts


# ---------------------------------------------------------------- tables

def _label(g: Group) -> str:
    if g.method == "reference":
        return "reference"
    kind = "beta" if g.method in (FDPO, FDPO_NLL) else "coef"
    return f"{g.method} {g.divergence} ({kind} {g.coef:g})"


def frontier_table(config, groups, summaries) -> str:
    rows = {}
    for g in groups.values():
        step = g.final_step
        cells = {"oracle reward": summaries(g, step, "score/oracle"),
                 "D_f(pi, pi_ref)": (summaries(g, step, f"mis/{g.divergence}")
                                     if g.divergence else 0.0),
                 "KL(pi || pi_ref)": summaries(g, step, "mis/reverse_kl"),
                 "entropy": summaries(g, step, "entropy/sequence"),
                 "well-formed": summaries(g, step, "well_formed"),
                 "stopped": sum(bool(r.get("stopped")) for r in g.runs) or ""}
        rows[_label(g)] = cells
    return markdown_table(rows, row_header="policy (final step)")


def table_2_2(config, groups, summaries) -> str:
    rows = {}
    for name in config.divergences:
        g = groups.get((FDPO, name, config.table_beta))
        if g is None:
            continue
        s = g.final_step
        paper = TABLE_2_2.get(name, (None,) * 5)
        acc = summaries(g, s, "accuracy")
        rows[name] = {
            "accuracy %": None if acc is None else Estimate(*(100 * v for v in (
                acc.mean, acc.low, acc.high)), acc.n),
            "(thesis acc.)": paper[0], "entropy": summaries(g, s, "T1/entropy/sequence"),
            "(thesis H)": paper[1], "self-BLEU": summaries(g, s, "T1/self_bleu"),
            "(thesis sB)": paper[2], "distinct-1": summaries(g, s, "T1/distinct_1"),
            "(thesis d-1)": paper[3], "distinct-2": summaries(g, s, "T1/distinct_2"),
            "(thesis d-2)": paper[4], "oracle reward": summaries(g, s, "score/oracle")}
    return markdown_table(rows, row_header=f"f-DPO, beta {config.table_beta:g}")


def temperature_table(config, groups, summaries, t: float) -> str:
    rows = {}
    paper_table = TABLES_2_3_2_4.get(t, {})
    for name in config.divergences:
        g = groups.get((FDPO, name, config.table_beta))
        if g is None:
            continue
        s = g.final_step
        paper = paper_table.get(name, (None,) * 3)
        rows[name] = {"entropy": summaries(g, s, f"T{t:g}/entropy/sequence"),
                      "self-BLEU": summaries(g, s, f"T{t:g}/self_bleu"),
                      "(thesis sB)": paper[0],
                      "distinct-1": summaries(g, s, f"T{t:g}/distinct_1"),
                      "(thesis d-1)": paper[1],
                      "distinct-2": summaries(g, s, f"T{t:g}/distinct_2"),
                      "(thesis d-2)": paper[2]}
    return markdown_table(rows, row_header=f"f-DPO, beta {config.table_beta:g}, T {t:g}")


def calibration_table(config, groups, summaries) -> str:
    rows = {}
    ref = next(g for g in groups.values() if g.method == "reference")
    rows["reference"] = {"ECE": summaries(ref, 0, "ece"),
                         "accuracy": summaries(ref, 0, "accuracy")}
    for name in config.divergences:
        for b in config.betas:
            g = groups.get((FDPO, name, b))
            if g is not None:
                rows[f"{name}, beta {b:g}"] = {"ECE": summaries(g, g.final_step, "ece"),
                                               "accuracy": summaries(g, g.final_step, "accuracy")}
    return markdown_table(rows, row_header="f-DPO (final step)")


# ---------------------------------------------------------------- figures

def frontier_figure(config, groups, summaries, path: pathlib.Path) -> None:
    """Figure 2.2: one panel per divergence, reward against that divergence: f-DPO along
    training for each beta, each PPO variant across its coefficients (final step)."""
    n = len(config.divergences)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, name in zip(axes[0], config.divergences):
        metric = f"mis/{name}"
        curves, labels = {}, {}
        for g in groups.values():
            if g.divergence != name:
                continue
            if g.method in (FDPO, FDPO_NLL):
                points = [(s, summaries(g, s, metric), summaries(g, s, "score/oracle"))
                          for s in g.steps]
                key = f"{g.method} beta {g.coef:g}"
                curves[key] = [{"x": x, "y": y} for _, x, y in points if x and y]
                labels[key] = [str(s) for s, x, y in points if x and y]
        for method in PPO_METHODS:
            members = sorted((g for g in groups.values()
                              if g.method == method and g.divergence == name),
                             key=lambda g: g.coef)
            pts = [(g.coef, summaries(g, g.final_step, metric),
                    summaries(g, g.final_step, "score/oracle")) for g in members]
            pts = [p for p in pts if p[1] and p[2]]
            if pts:
                curves[method] = [{"x": x, "y": y} for _, x, y in pts]
                labels[method] = [f"{c:g}" for c, _, _ in pts]
        if curves:
            frontier_plot(curves, x="x", y="y", ax=ax, point_labels=labels, title=name)
        ax.set(xlabel=f"D_f(pi, pi_ref), f = {name}", ylabel="oracle reward")
    fig.suptitle("Reward vs divergence (cf. thesis Figure 2.2); f-DPO points labelled by step, "
                 "PPO points by coefficient", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def entropy_figure(config, groups, summaries, path: pathlib.Path) -> None:
    """Figure 2.3: f-DPO's reward against predictive entropy along training (table beta)."""
    curves, labels = {}, {}
    for name in config.divergences:
        g = groups.get((FDPO, name, config.table_beta))
        if g is None:
            continue
        pts = [(s, summaries(g, s, "entropy/sequence"), summaries(g, s, "score/oracle"))
               for s in g.steps]
        pts = [p for p in pts if p[1] and p[2]]
        curves[name] = [{"x": x, "y": y} for _, x, y in pts]
        labels[name] = [str(s) for s, _, _ in pts]
    fig = frontier_plot(curves, x="x", y="y", point_labels=labels,
                        title=f"f-DPO reward vs entropy, beta {config.table_beta:g} "
                              "(cf. Figure 2.3)")
    fig.axes[0].set(xlabel="predictive entropy (nats / response)", ylabel="oracle reward")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ece_figure(config, groups, summaries, path: pathlib.Path) -> None:
    """Figure 2.5: f-DPO's ECE against training steps, one panel per divergence, one line per
    beta (95% intervals shaded)."""
    n = len(config.divergences)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], config.divergences):
        for b in config.betas:
            g = groups.get((FDPO, name, b))
            if g is None:
                continue
            est = [(s, summaries(g, s, "ece")) for s in g.steps]
            est = [(s, e) for s, e in est if e is not None]
            xs = [s for s, _ in est]
            ax.plot(xs, [e.mean for _, e in est], marker="o", label=f"beta {b:g}")
            ax.fill_between(xs, [e.low for _, e in est], [e.high for _, e in est], alpha=0.2)
        ax.set(title=name, xlabel="f-DPO step")
    axes[0][0].set_ylabel("stochastic ECE (§2.8.8)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Calibration error along training (cf. thesis Figure 2.5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- everything

def summary_metrics(groups, summaries) -> list[dict]:
    """One flat record per (group, step): means and intervals of the scalar metrics."""
    out = []
    for g in groups.values():
        names = sorted(set.union(*(set(e) for r in g.runs for e in r["evals"].values())))
        for step in g.steps:
            record = {"method": g.method, "divergence": g.divergence, "coef": g.coef,
                      "step": step, "seeds": len(g.runs)}
            for name in names:
                e = summaries(g, step, name)
                if e is not None:
                    record.update({name: e.mean, f"{name}/low": e.low, f"{name}/high": e.high})
            out.append(record)
    return out


def write(config, runs: list[dict], out: pathlib.Path) -> str:
    """Writes results.md, summary.json, metrics.jsonl and the figures; returns results.md."""
    groups = group_runs(runs)
    summaries = Summaries(config.bootstrap_resamples)
    reference_runs = [r for r in runs if r["method"] == "reference"]
    claim_lines, verdicts = claims(config, groups, summaries, reference_runs)
    pairs = [r["pairs"] for r in reference_runs]
    sections = [
        "# f-DPO vs PPO under each f-divergence: reward, divergence, diversity, calibration",
        f"Embedded task (`experiments.frontier.task`), seeds {list(config.seeds)}; "
        f"{sum(p['pairs'] for p in pairs)} oracle-labelled pairs over the seeds "
        f"({sum(p['labels_against_the_oracle'] for p in pairs)} labels against the oracle, "
        f"label temperature {config.label_temperature:g}); evaluation on "
        f"{config.eval_prompts} held-out prompts per seed x {config.eval_samples} samples. Means "
        "with 95% bootstrap intervals over (seed, prompt) units. D_f is estimated from "
        "policy and reference samples (the mixture estimator of "
        "`experiments.frontier.evaluation`); entropy is the predictive entropy of a response in "
        "nats.",
        "## Claims of the thesis, checked on this run", *claim_lines,
        "## Reward and divergence at the end of training (Figure 2.2 in numbers)",
        frontier_table(config, groups, summaries),
        f"## Alignment and diversity at temperature 1 (Table 2.2 layout; thesis: Pythia 2.8B on "
        f"Anthropic HH, so only orderings compare)", table_2_2(config, groups, summaries)]
    for t in config.temperatures:
        if t != 1.0:
            name = {0.6: "Table 2.3", 1.4: "Table 2.4"}.get(t, "no thesis table")
            sections += [f"## Diversity at temperature {t:g} ({name})",
                         temperature_table(config, groups, summaries, t)]
    sections += ["## Calibration: stochastic ECE and accuracy on held-out pairs (§2.6.4)",
                 calibration_table(config, groups, summaries)]
    text = "\n\n".join(sections) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    records = summary_metrics(groups, summaries)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "pairs": pairs, "verdicts": verdicts,
         "stopped": [{k: r[k] for k in ("method", "divergence", "coef", "seed", "stopped")}
                     for r in runs if r.get("stopped")]}, indent=1))
    frontier_figure(config, groups, summaries, out / "frontier.png")
    entropy_figure(config, groups, summaries, out / "entropy.png")
    ece_figure(config, groups, summaries, out / "ece.png")
    return text

