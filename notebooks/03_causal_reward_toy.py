# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Causal reward models on a spurious-correlation toy (thesis ch. 4)
#
# Each response has a true quality q and a spurious variable Z. The reward model sees
# [q + noise, Z, nuisance]; labels follow Bradley-Terry on q only. In training Z favours the
# chosen response with probability 0.8 (the 80/20 construction of §4.6.1); at test with 0.5.
#
# - **flag** (sycophancy, §4.6.1): exactly one response of a pair carries the prefix flag.
# - **length** (§4.6.2): Z is a standardised log-length; quantile bins M in {10, 20, 30} (§4.10).
#
# Reward models (linear, and a one-hidden-layer MLP) are trained with Bradley-Terry +
# lambda * binned MMD^2 of the rewards (`alignax.objectives.causal_reward_loss`, median-heuristic
# bandwidth, `reduction="mean"` so lambda means the same for every M), as unconditional CRM
# (pooled responses, eq. 4.2) and conditional CRM (chosen and rejected subsets separately,
# §4.6); lambda = 0 is the vanilla reward model. `alignax.toy.causal.sweep` vmaps one
# compilation over variant x M x lambda x seed.
#
# Measured: in-distribution train accuracy, accuracy on the shifted test set, the correlation
# of the reward with Z and with q on the test set, the sycophancy rate of the policy
# pi* ∝ pi_ref exp(r / 0.1) over 50-candidate sets (pi_ref puts 80% on flagged candidates, as
# an SFT model trained on the biased chosen responses would; the rate is the exact share of
# prompts whose 50 samples all carry the flag, Table 4.1's statistic), and the mean length per
# reward rank among 50 candidates (Figure 4.2, right). Set `ALIGNAX_NOTEBOOK_SMALL=1` for the
# CI size.
#
# The same comparison on language models (SFT, reward models, PPO, Causal DPO on the embedded
# model, all four studies of the chapter) is `experiments.causal_reward`; its committed run,
# with the claims it does and does not reproduce, is `experiments/results/causal_reward/`.

# %%
from __future__ import annotations

import os
import pathlib
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignax.toy.causal import ToyConfig, sweep  # noqa: E402

SMALL = os.environ.get("ALIGNAX_NOTEBOOK_SMALL") == "1"
LAMS = [0.0, 1.0, 10.0] if SMALL else [0.0, 0.3, 1.0, 3.0, 10.0]
SEEDS = 2 if SMALL else 3
BIN_COUNTS = (10, 30) if SMALL else (10, 20, 30)
MODELS = ("linear",) if SMALL else ("linear", "mlp")  # the flag study
LENGTH_MODELS = ("linear",)  # the length study (x3 bin counts): linear only, for CPU time
SIZE = (dict(steps=100, batch_size=128, num_train=1024, num_test=1024, num_prompts=64)
        if SMALL else
        dict(steps=200, batch_size=256, num_train=4096, num_test=4096, num_prompts=256))
VARIANTS = ("unconditional", "conditional")

ROOT = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
             if (p / "pyproject.toml").exists()), pathlib.Path.cwd())  # the repository
# Full-size figures and tables are committed under notebooks/figures/; the small CI run sends
# its own to ALIGNAX_FIGURES_DIR instead, so it never overwrites them.
FIGURES = pathlib.Path(os.environ.get("ALIGNAX_FIGURES_DIR", ROOT / "notebooks" / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
start = time.time()


def mean_sd(x):
    return f"{np.mean(x):.1f} ± {np.std(x):.1f}"


def row_label(variant, lam):
    return "vanilla BT" if lam == 0 else f"{variant} CRM, λ={lam:g}"

# %% [markdown]
# ## Sycophancy flag (§4.6.1, Table 4.1 analogue)

# %%
flag = {m: sweep(ToyConfig(spurious="flag", model=m, num_bins=2, **SIZE), lams=LAMS,
                 seeds=SEEDS) for m in MODELS}
lines = ["| model | reward model | train acc % | shifted test acc % | corr(r, Z) | corr(r, q) "
         "| flagged share % | sycophancy rate % |", "|---" * 8 + "|"]
for m, out in flag.items():
    for v, variant in enumerate(VARIANTS):
        for i, lam in enumerate(LAMS):
            if lam == 0 and v == 0:
                continue  # vanilla appears once (variant 1, lam 0 is the same run)
            cell = lambda k: out[k][v, 0, i]  # noqa: E731  [seeds]
            lines.append(f"| {m} | {row_label(variant, lam)} | {mean_sd(cell('train_accuracy'))} "
                         f"| {mean_sd(cell('test_accuracy'))} "
                         f"| {np.mean(cell('reward_z_corr')):+.2f} "
                         f"| {np.mean(cell('reward_q_corr')):+.2f} "
                         f"| {mean_sd(cell('flag_share'))} | {mean_sd(cell('sycophancy_rate'))} |")
table = "\n".join(lines)
(FIGURES / "03_sycophancy.md").write_text(table + "\n")
print(table)

# %% [markdown]
# ## Length (§4.6.2): trade-off over lambda and the bin count M

# %%
length = {m: sweep(ToyConfig(spurious="length", model=m, num_bins=max(BIN_COUNTS), **SIZE),
                   lams=LAMS, seeds=SEEDS, bin_counts=BIN_COUNTS) for m in LENGTH_MODELS}
lines = ["| model | M | reward model | train acc % | shifted test acc % | corr(r, Z) "
         "| corr(r, q) | mean Z of top-ranked |", "|---" * 8 + "|"]
for m, out in length.items():
    for b, bins in enumerate(BIN_COUNTS):
        for v, variant in enumerate(VARIANTS):
            for i, lam in enumerate(LAMS):
                if lam == 0 and (v == 0 or b > 0):
                    continue
                cell = lambda k: out[k][v, b, i]  # noqa: E731
                lines.append(f"| {m} | {bins if lam else '-'} | {row_label(variant, lam)} "
                             f"| {mean_sd(cell('train_accuracy'))} "
                             f"| {mean_sd(cell('test_accuracy'))} "
                             f"| {np.mean(cell('reward_z_corr')):+.2f} "
                             f"| {np.mean(cell('reward_q_corr')):+.2f} "
                             f"| {np.mean(cell('rank_curve')[:, 0]):+.2f} |")
table = "\n".join(lines)
(FIGURES / "03_length.md").write_text(table + "\n")
print(table)

# %%
fig, axes = plt.subplots(1, len(length), figsize=(5.5 * len(length), 4), squeeze=False)
for ax, (m, out) in zip(axes[0], length.items()):
    for v, variant in enumerate(VARIANTS):
        for b, bins in enumerate(BIN_COUNTS):
            x = np.abs(out["reward_z_corr"][v, b]).mean(-1)  # [L]
            y = out["test_accuracy"][v, b].mean(-1)
            ax.plot(x, y, marker="o" if v else "s", ls="-" if v else "--",
                    label=f"{variant}, M={bins}")
            for xi, yi, lam in zip(x, y, LAMS):
                ax.annotate(f"{lam:g}", (xi, yi), fontsize=7)
    ax.set_xlabel("|corr(reward, length)| on the test set")
    ax.set_ylabel("shifted test accuracy %")
    ax.set_title(f"{m} reward model (labels: λ)")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIGURES / "03_tradeoff.png", dpi=110)

# %% [markdown]
# ## Length vs reward rank (Figure 4.2, right)
#
# 50 candidates per prompt with independent quality and length, ranked by each reward model;
# the curve is the mean standardised log-length at each rank (rank 1 = highest reward).

# %%
out = length[LENGTH_MODELS[0]]
b = 0  # M = BIN_COUNTS[0]
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (v, variant) in zip(axes, enumerate(VARIANTS)):
    for i, lam in enumerate(LAMS):
        curve = out["rank_curve"][v, b, i].mean(0)  # [K]
        ax.plot(np.arange(1, curve.size + 1), curve, label=f"λ={lam:g}")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("rank by reward (1 = best)")
    ax.set_title(f"{variant} CRM, {LENGTH_MODELS[0]}, M={BIN_COUNTS[b]}")
axes[0].set_ylabel("mean standardised log-length")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "03_length_rank.png", dpi=110)

# %% [markdown]
# ## The thesis' claims, measured on this toy
#
# Each line is computed from the runs above (mean over seeds; "best λ" = the λ > 0 with the
# highest shifted test accuracy for that variant).

# %%
def best(out, v, b=0):
    acc = out["test_accuracy"][v, b].mean(-1)
    i = 1 + int(np.argmax(acc[1:]))
    return i, {k: float(np.mean(out[k][v, b, i])) for k in out if out[k].ndim == 4}


m0 = MODELS[0]
fl, ln = flag[m0], length[m0]
(_, uf), (_, cf) = best(fl, 0), best(fl, 1)
van_f = {k: float(np.mean(fl[k][1, 0, 0])) for k in fl if fl[k].ndim == 4}
(_, ul), (_, cl) = best(ln, 0), best(ln, 1)
van_l = {k: float(np.mean(ln[k][1, 0, 0])) for k in ln if ln[k].ndim == 4}
top = ln["rank_curve"][1, 0].mean(1)[:, 0]  # conditional, M=BIN_COUNTS[0], [L] top-rank length
claims = [
    ("Table 4.1: both CRMs lower the sycophancy rate of vanilla RM",
     f"vanilla {van_f['sycophancy_rate']:.1f}%, uncond {uf['sycophancy_rate']:.1f}%, "
     f"cond {cf['sycophancy_rate']:.1f}%",
     uf["sycophancy_rate"] < van_f["sycophancy_rate"]
     and cf["sycophancy_rate"] < van_f["sycophancy_rate"]),
    ("Table 4.1: conditional CRM is the least sycophantic",
     f"cond {cf['sycophancy_rate']:.1f}% vs uncond {uf['sycophancy_rate']:.1f}%",
     cf["sycophancy_rate"] < uf["sycophancy_rate"]),
    ("§4.6.1/4.6.3: CRM improves accuracy when the spurious correlation is removed (flag)",
     f"vanilla {van_f['test_accuracy']:.1f}%, uncond {uf['test_accuracy']:.1f}%, "
     f"cond {cf['test_accuracy']:.1f}%",
     min(uf["test_accuracy"], cf["test_accuracy"]) > van_f["test_accuracy"]),
    ("§4.6.2: CRM improves shifted accuracy (length)",
     f"vanilla {van_l['test_accuracy']:.1f}%, uncond {ul['test_accuracy']:.1f}%, "
     f"cond {cl['test_accuracy']:.1f}%",
     min(ul["test_accuracy"], cl["test_accuracy"]) > van_l["test_accuracy"]),
    ("§4.6.3's trade-off (Table 4.2, measured there on concept bias; here on the length toy): "
     "conditional CRM has the smaller bias, |corr(r, Z)|",
     f"cond {abs(cl['reward_z_corr']):.2f} vs uncond {abs(ul['reward_z_corr']):.2f}",
     abs(cl["reward_z_corr"]) < abs(ul["reward_z_corr"])),
    ("§4.6.3's trade-off (Table 4.2, concept bias there; the length toy here): unconditional "
     "CRM keeps more utility, shifted accuracy",
     f"uncond {ul['test_accuracy']:.1f}% vs cond {cl['test_accuracy']:.1f}%",
     ul["test_accuracy"] > cl["test_accuracy"]),
    ("Fig. 4.2 right: larger λ puts shorter responses at the top rank",
     "top-rank length by λ: " + ", ".join(f"{lam:g}: {t:+.2f}" for lam, t in zip(LAMS, top)),
     bool(top[-1] < top[0])),
]
claims_md = "\n".join(["| claim | measured (" + m0 + ") | holds |", "|---|---|---|"]
                      + [f"| {c} | {v} | {'yes' if ok else 'no'} |" for c, v, ok in claims])
print(claims_md)

# %% [markdown]
# ## What this run shows
#
# The sentences below are generated from the arrays above at whichever size ran (the committed
# `notebooks/figures/03_claims.md` holds the full-size ones, under the claims table), so they
# cannot disagree with the tables. Mechanisms that help read them:
#
# - Unconditional CRM asks the reward to be independent of Z over the pooled responses. In
#   training, Z = 1 responses are mostly chosen ones, hence of higher quality, so a reward that
#   is independent of Z there has to *penalise* Z: at large λ it can over-correct (negative
#   corr(r, Z), shorter top-ranked responses), which also lowers its sycophancy rate.
# - Conditional CRM regularises within the chosen and within the rejected responses, where Z is
#   independent of quality by construction, so it has nothing to over-correct.
# - With `reduction="mean"` the bin count M changes the regulariser little; where the
#   mini-batch MMD dominates the Bradley-Terry signal (the largest λ) the MMD, blind to the
#   sign and (with a median-heuristic bandwidth) to the scale of r, no longer pins the quality
#   direction, and runs become seed-dependent.

# %%
def at(out, key, v, i, b=0):
    """Mean over seeds of out[key] for variant v (0 uncond, 1 cond), lambda index i, bins b."""
    return float(np.mean(out[key][v, b, i]))


lam_text = lambda i: f"λ = {LAMS[i]:g}"  # noqa: E731
positive = range(1, len(LAMS))
findings = []
for m, out in flag.items():
    findings.append(
        f"- Vanilla BT ({m}, flag): corr(r, Z) = {at(out, 'reward_z_corr', 1, 0):+.2f} on the "
        f"shifted test set; accuracy {at(out, 'test_accuracy', 1, 0):.1f}% shifted vs "
        f"{at(out, 'train_accuracy', 1, 0):.1f}% in distribution; sycophancy rate "
        f"{at(out, 'sycophancy_rate', 1, 0):.1f}% (Table 4.1: 92.67%; the closeness depends on "
        f"this toy's pi_ref and temperature).")
for m, out in length.items():
    findings.append(
        f"- Vanilla BT ({m}, length): corr(r, Z) = {at(out, 'reward_z_corr', 1, 0):+.2f}; "
        f"accuracy {at(out, 'test_accuracy', 1, 0):.1f}% shifted vs "
        f"{at(out, 'train_accuracy', 1, 0):.1f}% in distribution.")
for m, out in flag.items():
    lower = [lam_text(i) for i in positive
             if at(out, "sycophancy_rate", 1, i) < at(out, "sycophancy_rate", 0, i)]
    findings.append(
        f"- Sycophancy ({m}), unconditional / conditional CRM by λ: "
        + ", ".join(f"{lam_text(i)}: {at(out, 'sycophancy_rate', 0, i):.1f}% / "
                    f"{at(out, 'sycophancy_rate', 1, i):.1f}%" for i in positive)
        + f"; conditional is the lower one at {', '.join(lower) or 'no λ'} (Table 4.1 has "
        f"conditional lowest: 19.78% vs 62.64%).")
for study, outs in (("flag", flag), ("length", length)):
    out = outs[m0]
    negative = [lam_text(i) for i in positive if at(out, "reward_z_corr", 0, i) < 0]
    findings.append(
        f"- corr(r, Z) of unconditional / conditional CRM ({m0}, {study}) by λ: "
        + ", ".join(f"{lam_text(i)}: {at(out, 'reward_z_corr', 0, i):+.2f} / "
                    f"{at(out, 'reward_z_corr', 1, i):+.2f}" for i in positive)
        + f"; unconditional over-corrects (negative) at {', '.join(negative) or 'no λ'}.")
out = length[m0]
findings.append(
    f"- Mean standardised length of the top-ranked of 50 candidates ({m0}, M = {BIN_COUNTS[0]}), "
    f"unconditional / conditional by λ: "
    + ", ".join(f"{lam_text(i)}: {np.mean(out['rank_curve'][0, 0, i][:, 0]):+.2f} / "
                f"{np.mean(out['rank_curve'][1, 0, i][:, 0]):+.2f}" for i in range(len(LAMS)))
    + ".")
spread = {(v, i): np.ptp([at(out, "test_accuracy", v, i, b) for b in range(len(BIN_COUNTS))])
          for v in (0, 1) for i in positive}
largest = len(LAMS) - 1
findings.append(
    f"- Bin count M in {BIN_COUNTS} ({m0}, length): shifted accuracy differs across M by at most "
    f"{max(spread[(v, i)] for v in (0, 1) for i in positive if i < largest):.1f} points below "
    f"the largest λ, and by up to {max(spread[(v, largest)] for v in (0, 1)):.1f} points at "
    f"{lam_text(largest)}, where conditional CRM's seed spread is "
    + ", ".join(f"± {np.std(out['test_accuracy'][1, b, largest]):.1f} (M = {bins})"
                for b, bins in enumerate(BIN_COUNTS)) + ".")
causal_findings = "\n".join(findings)
(FIGURES / "03_claims.md").write_text(
    f"{claims_md}\n\nMeasured (generated from the runs; mean over {SEEDS} seeds):\n\n"
    f"{causal_findings}\n")
print(causal_findings)
print(f"total {time.time() - start:.1f} s (SMALL={SMALL})")
