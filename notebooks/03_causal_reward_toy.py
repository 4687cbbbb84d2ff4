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
    ("Table 4.2: conditional CRM has the smaller bias (abs corr(r, Z), length)",
     f"cond {abs(cl['reward_z_corr']):.2f} vs uncond {abs(ul['reward_z_corr']):.2f}",
     abs(cl["reward_z_corr"]) < abs(ul["reward_z_corr"])),
    ("Table 4.2: unconditional CRM keeps more utility (shifted acc., length)",
     f"uncond {ul['test_accuracy']:.1f}% vs cond {cl['test_accuracy']:.1f}%",
     ul["test_accuracy"] > cl["test_accuracy"]),
    ("Fig. 4.2 right: larger λ puts shorter responses at the top rank",
     "top-rank length by λ: " + ", ".join(f"{lam:g}: {t:+.2f}" for lam, t in zip(LAMS, top)),
     bool(top[-1] < top[0])),
]
claims_md = "\n".join(["| claim | measured (" + m0 + ") | holds |", "|---|---|---|"]
                      + [f"| {c} | {v} | {'yes' if ok else 'no'} |" for c, v, ok in claims])
(FIGURES / "03_claims.md").write_text(claims_md + "\n")
print(claims_md)
print(f"total {time.time() - start:.1f} s (SMALL={SMALL})")

# %% [markdown]
# ## What the full-size run showed
#
# Full size (this file without `ALIGNAX_NOTEBOOK_SMALL`: 3 seeds, 200 Adam steps of 256
# pairs, 4096 train / 4096 shifted-test pairs; 616 s CPU). The tables above are regenerated by
# every run, so a CI (small) run prints its own numbers; these paragraphs describe the
# full-size one.
#
# - Vanilla BT leans on the spurious variable: corr(r, Z) = +0.56 (flag) / +0.64 (length) on
#   the shifted test set, whose accuracy drops to 63% / 67% from 83% / 80% in distribution
#   (linear).
#   Its policy is sycophantic in 92.7% (linear) / 94.0% (MLP) of prompts. That this is close
#   to Table 4.1's 92.67% is a coincidence of the chosen pi_ref and temperature.
# - Both CRMs at λ = 1 recover 72-73% shifted accuracy (linear and MLP, flag and length,
#   every M). They cut the sycophancy rate to 37.5% (unconditional) / 43.6% (conditional)
#   for the linear model. Table 4.1 has conditional CRM lowest (19.8% vs 62.6%). Here
#   conditional is lower only at small λ (linear: λ = 0.3; MLP: λ <= 3, e.g. 53.1% vs 82.5% at
#   λ = 1). At larger λ unconditional is lower (linear λ = 3: 13.3% vs 32.8%).
# - The reason is visible in corr(r, Z): unconditional CRM asks r to be independent of Z in
#   the pooled responses. In training, Z = 1 responses are mostly chosen ones, so they are of
#   higher quality, and a Z-independent pooled reward must *penalise* Z. At λ >= 3 it
#   over-corrects: corr(r, Z) = -0.15 to -0.18 (flag) and -0.10 (length), and the top-ranked
#   responses become shorter than average (-0.25). This over-correction is what lowers its
#   sycophancy rate below conditional CRM's at large λ.
#   Conditional CRM regularises within chosen and within rejected responses, where Z is
#   independent of quality by construction. At λ >= 3 it drives corr(r, Z) to +0.01 to +0.04
#   without overshooting.
# - The bin count barely matters with `reduction="mean"` (M = 10, 20, 30 rows agree within
#   noise) except at λ = 10, where the mini-batch MMD dominates the Bradley-Terry signal. There
#   conditional CRM becomes seed-dependent (e.g. M = 20: 51.9 ± 16.0% accuracy, corr(r, q)
#   +0.05). The regulariser is blind to the sign of r and, with a median-heuristic bandwidth,
#   to its scale, so the quality direction is then not pinned.
# - Figure 4.2 (right) is reproduced: the mean length of the top-ranked response falls
#   monotonically with λ (conditional, M = 10: +1.46, +0.62, +0.23, +0.07, +0.02 for
#   λ = 0, 0.3, 1, 3, 10).
# - Tables 4.2-4.3 (conditional best on bias, unconditional best on utility) are only partly
#   mirrored. Conditional has the smaller |corr(r, Z)| at its best λ, but the two are tied on
#   shifted accuracy (73.0% vs 72.9%).
