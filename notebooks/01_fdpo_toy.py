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
# # f-DPO on an exact finite-response toy (thesis ch. 2)
#
# Each context has N responses with a true reward r and a reference policy pi_ref. For every
# admissible divergence of Table 2.1 and every beta, `alignax.toy.optimal_policy` gives the
# exact maximiser of E_pi[r] - beta D_f(pi, pi_ref) (§2.5); Theorem 1 says f-DPO's population
# loss (eq. 2.2) has that maximiser as its minimiser, which we also check here by gradient
# descent. The study is vmapped over seeds (random instances) x betas, and over alpha for the
# alpha-divergences, and it compiles once per divergence name.
#
# It draws the analogues of Figures 2.2-2.3 (reward vs divergence and reward vs entropy
# frontiers), the optimal policies of one instance, and compares the entropy of each
# divergence's optimum at matched beta and at matched expected reward. §2.6.2 reports an
# ordering measured on trained language models (reverse KL lowest predictive entropy, forward
# KL highest, JSD in between, alpha between JSD and forward KL). It is not a theorem; the last
# section measures how often the exact toy optima follow it.
#
# Set `ALIGNAX_NOTEBOOK_SMALL=1` for the CI size.

# %%
from __future__ import annotations

import os
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignax.toy import bandit  # noqa: E402

SMALL = os.environ.get("ALIGNAX_NOTEBOOK_SMALL") == "1"
NUM_RESPONSES = 8 if SMALL else 16
NUM_SEEDS = 32 if SMALL else 512
BETAS = np.geomspace(0.01, 100.0, 17 if SMALL else 41)  # holds 0.1, 1 and 10
MATCHED_BETAS = (0.1, 1.0, 10.0)
REWARD_LEVELS = (0.25, 0.5, 0.75)  # target = E_ref[r] + level (max r - E_ref[r])
TRAIN_STEPS = 1500 if SMALL else 3000
DIVERGENCES = [("reverse_kl", None), ("jsd", None), ("alpha", 0.3), ("alpha", 0.5),
               ("alpha", 0.7), ("forward_kl", None)]
LABELS = {("reverse_kl", None): "reverse KL", ("jsd", None): "JSD",
          ("alpha", 0.3): "alpha=0.3", ("alpha", 0.5): "alpha=0.5", ("alpha", 0.7): "alpha=0.7",
          ("forward_kl", None): "forward KL"}

ROOT = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
             if (p / "pyproject.toml").exists()), pathlib.Path.cwd())  # the repository
# Full-size figures and tables are committed under notebooks/figures/; the small CI run sends
# its own to ALIGNAX_FIGURES_DIR instead, so it never overwrites them.
FIGURES = pathlib.Path(os.environ.get("ALIGNAX_FIGURES_DIR", ROOT / "notebooks" / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
START = time.perf_counter()

keys = jax.random.split(jax.random.key(0), NUM_SEEDS)
instances = jax.vmap(lambda k: bandit.random_instance(k, num_responses=NUM_RESPONSES))(keys)
print(f"{NUM_SEEDS} instances x {len(BETAS)} betas x {len(DIVERGENCES)} divergences, "
      f"N = {NUM_RESPONSES}")


def by_divergence(make_fn, *args):
    """{(name, alpha): numpy pytree} of jit(vmap over alpha)(make_fn(name))(alpha, *args).

    The divergence name is static, alpha is traced: one compilation per name.
    """
    out = {}
    for name in dict.fromkeys(name for name, _ in DIVERGENCES):
        alphas = [a for n, a in DIVERGENCES if n == name]
        values = jnp.array([0.5 if a is None else a for a in alphas], jnp.float32)
        batched = jax.jit(jax.vmap(make_fn(name), in_axes=(0,) + (None,) * len(args)))(values,
                                                                                       *args)
        for i, a in enumerate(alphas):
            out[(name, a)] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), batched)
    return {key: out[key] for key in DIVERGENCES}

# %% [markdown]
# ## The study: exact optima over seeds x betas
#
# For each divergence: log pi* [seeds, betas, N], its expected reward, its reverse KL to the
# reference (the common yardstick of Figure 2.2), its own D_f(pi*, pi_ref), and its entropy.

# %%
def study(name: str):
    """(alpha, rewards [S,N], refs [S,N], betas [K]) -> statistics [S, K] of the optimum."""

    def one(alpha, reward, ref, beta):
        alpha = alpha if name == "alpha" else None
        log_pi = bandit.optimal_policy(reward, ref, beta=beta, divergence=name, alpha=alpha)
        return {
            "log_pi": log_pi,
            "reward": bandit.expected_reward(log_pi, reward),
            "reverse_kl": bandit.divergence_from_reference(log_pi, ref),
            "own_divergence": bandit.divergence_from_reference(log_pi, ref, divergence=name,
                                                               alpha=alpha),
            "entropy": bandit.policy_entropy(log_pi),
        }

    return jax.vmap(jax.vmap(one, in_axes=(None, None, None, 0)), in_axes=(None, 0, 0, None))


results = by_divergence(study, instances.reward, instances.ref_logprobs, jnp.asarray(BETAS))
ref_reward = np.asarray(jax.vmap(bandit.expected_reward)(instances.ref_logprobs,
                                                         instances.reward))
ref_entropy = np.asarray(jax.vmap(bandit.policy_entropy)(instances.ref_logprobs))
print(f"study done at {time.perf_counter() - START:.1f} s")

# %% [markdown]
# ## Theorem 1 in practice: f-DPO by gradient descent lands on the exact optimum
#
# Gradient descent (Adam under `lax.scan`) on the population f-DPO loss, with Bradley-Terry
# labels from r and pairs drawn from pi_ref x pi_ref, for the first 4 instances and 3 betas.

# %%
TRAIN_BETAS = jnp.array([0.3, 1.0, 3.0])


def train_vs_optimum(name: str):
    """(alpha, rewards [S,N], refs [S,N], betas [K]) -> TV(trained, exact optimum) [S, K]."""

    def one(alpha, reward, ref, beta):
        alpha = alpha if name == "alpha" else None
        log_pi, _ = bandit.train_fdpo_policy(reward, ref, beta=beta, divergence=name, alpha=alpha,
                                        num_steps=TRAIN_STEPS, learning_rate=0.05)
        optimum = bandit.optimal_policy(reward, ref, beta=beta, divergence=name, alpha=alpha)
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_pi) - jnp.exp(optimum)))

    return jax.vmap(jax.vmap(one, in_axes=(None, None, None, 0)), in_axes=(None, 0, 0, None))


trained_tv = {key: float(np.max(tv)) for key, tv in by_divergence(
    train_vs_optimum, instances.reward[:4], instances.ref_logprobs[:4], TRAIN_BETAS).items()}
for key, tv in trained_tv.items():
    print(f"{LABELS[key]:>11}: max TV(GD on f-DPO loss, exact optimum) = {tv:.1e}")
print(f"training done at {time.perf_counter() - START:.1f} s")

# %% [markdown]
# ## Frontiers (analogues of Figures 2.2 and 2.3)
#
# Mean over instances of the expected reward gain E_pi*[r] - E_ref[r] against the reverse KL
# from the reference, against each divergence's own D_f, and against the entropy change, one
# curve per divergence, traced by beta.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for key in DIVERGENCES:
    res = results[key]
    gain = (res["reward"] - ref_reward[:, None]).mean(0)
    axes[0].plot(res["reverse_kl"].mean(0), gain, marker=".", label=LABELS[key])
    axes[1].plot(res["own_divergence"].mean(0), gain, marker=".", label=LABELS[key])
    axes[2].plot((res["entropy"] - ref_entropy[:, None]).mean(0), gain, marker=".",
                 label=LABELS[key])
axes[0].set(xlabel="KL(pi* || pi_ref)", ylabel="E[r] gain over pi_ref", xscale="log",
            title="reward vs reverse KL")
axes[1].set(xlabel="own D_f(pi*, pi_ref)", xscale="log", title="reward vs own divergence")
axes[2].set(xlabel="entropy(pi*) - entropy(pi_ref) [nats]", title="reward vs entropy")
axes[0].legend()
fig.tight_layout()
fig.savefig(FIGURES / "01_frontiers.png", dpi=110)

# %% [markdown]
# ## The optimal policies of one instance
#
# Responses sorted by reward; beta = 1.

# %%
beta_index = int(np.argmin(np.abs(BETAS - 1.0)))
order = np.argsort(np.asarray(instances.reward[0]))
width = 0.8 / (len(DIVERGENCES) + 1)
fig, ax = plt.subplots(figsize=(10, 3.8))
positions = np.arange(NUM_RESPONSES)
ax.bar(positions, np.exp(np.asarray(instances.ref_logprobs[0]))[order], width, label="pi_ref",
       color="gray")
for k, key in enumerate(DIVERGENCES, start=1):
    probs = np.exp(results[key]["log_pi"][0, beta_index])[order]
    ax.bar(positions + k * width, probs, width, label=LABELS[key])
ax.set_xticks(positions + 0.4, [f"{r:.2f}" for r in np.asarray(instances.reward[0])[order]])
ax.set(xlabel="reward r(y)", ylabel="probability", title=f"pi* at beta = {BETAS[beta_index]:.2g}")
ax.legend(ncol=4, fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "01_optimal_policies.png", dpi=110)

# %% [markdown]
# ## Entropy at matched beta and at matched expected reward
#
# Matched reward: for each instance and level q, bisection on beta per divergence
# (`bandit.beta_for_reward`) finds the optimum with E[r] = E_ref[r] + q (max r - E_ref[r]).
# We report the mean entropy of each divergence's optimum and how often the §2.6.2 ordering
# holds: "RKL lowest" (reverse KL has the lowest entropy of the six), "FKL highest", and the
# full chain RKL <= JSD <= alpha=0.3 <= 0.5 <= 0.7 <= FKL.

# %%
def matched_reward_entropy(name: str):
    """(alpha, rewards [S,N], refs [S,N], levels [L]) -> (entropy, E[r] - target) [S, L]."""

    def one(alpha, reward, ref, level):
        alpha = alpha if name == "alpha" else None
        target = (1.0 - level) * bandit.expected_reward(ref, reward) + level * jnp.max(reward)
        beta = bandit.beta_for_reward(target, reward, ref, divergence=name, alpha=alpha)
        log_pi = bandit.optimal_policy(reward, ref, beta=beta, divergence=name, alpha=alpha)
        return bandit.policy_entropy(log_pi), bandit.expected_reward(log_pi, reward) - target

    return jax.vmap(jax.vmap(one, in_axes=(None, None, None, 0)), in_axes=(None, 0, 0, None))


matched = by_divergence(matched_reward_entropy, instances.reward, instances.ref_logprobs,
                        jnp.array(REWARD_LEVELS))
print("max |E[r] - target| after bisection:",
      max(float(np.max(np.abs(miss))) for _, miss in matched.values()))
print(f"matching done at {time.perf_counter() - START:.1f} s")


def ordering_fractions(entropies):
    """entropies [divergences, seeds] in DIVERGENCES order -> fractions of seeds."""
    rkl_lowest = np.mean(np.argmin(entropies, axis=0) == 0)
    fkl_highest = np.mean(np.argmax(entropies, axis=0) == len(DIVERGENCES) - 1)
    chain = np.mean(np.all(np.diff(entropies, axis=0) >= 0.0, axis=0))
    return rkl_lowest, fkl_highest, chain


columns = [f"beta={b:g}" for b in MATCHED_BETAS] + [f"reward q={q:g}" for q in REWARD_LEVELS]
stacks = []
for b in MATCHED_BETAS:
    i = int(np.argmin(np.abs(BETAS - b)))
    stacks.append(np.stack([results[key]["entropy"][:, i] for key in DIVERGENCES]))
for j in range(len(REWARD_LEVELS)):
    stacks.append(np.stack([matched[key][0][:, j] for key in DIVERGENCES]))

lines = [f"Exact optima, N = {NUM_RESPONSES} responses, {NUM_SEEDS} random instances "
         f"(r ~ N(0, 1), pi_ref = softmax(N(0, 1))); mean entropy in nats "
         f"(pi_ref: {ref_entropy.mean():.3f}).", "",
         "| divergence | " + " | ".join(columns) + " |",
         "|---" * (len(columns) + 1) + "|"]
for k, key in enumerate(DIVERGENCES):
    lines.append(f"| {LABELS[key]} | " + " | ".join(f"{s[k].mean():.3f}" for s in stacks) + " |")
fractions = [ordering_fractions(s) for s in stacks]
for name, index in (("fraction: RKL lowest", 0), ("fraction: FKL highest", 1),
                    ("fraction: full chain", 2)):
    lines.append(f"| {name} | " + " | ".join(f"{f[index]:.2f}" for f in fractions) + " |")
table = "\n".join(lines)


def pct(x):
    return f"{x:.0%}"


def findings_for(indices, what):
    """Sentences on the columns `indices` of the table (matched beta or matched reward)."""
    cols = [columns[i] for i in indices]
    lowest = [LABELS[DIVERGENCES[int(np.argmin(stacks[i].mean(1)))]] for i in indices]
    return [
        f"- At matched {what}, the lowest mean entropy belongs to "
        + ", ".join(f"{name} ({col})" for name, col in zip(lowest, cols)) + ".",
        f"- At matched {what}, reverse KL has the lowest entropy of the six in "
        + ", ".join(f"{pct(fractions[i][0])} ({columns[i]})" for i in indices)
        + " of instances, and forward KL the highest in "
        + ", ".join(f"{pct(fractions[i][1])} ({columns[i]})" for i in indices) + "."]


beta_cols = list(range(len(MATCHED_BETAS)))
reward_cols = list(range(len(MATCHED_BETAS), len(columns)))
majority = sum(f[0] > 0.5 for f in fractions)
chain_max = max(f[2] for f in fractions)
findings = findings_for(beta_cols, "beta") + findings_for(reward_cols, "expected reward") + [
    "- The full chain RKL <= JSD <= alpha 0.3 <= 0.5 <= 0.7 <= FKL holds in "
    + (f"at most {chain_max:.1%} of instances in any column." if chain_max > 0 else
       "no instance of any column."),
    f"- Reverse KL is the lowest-entropy optimum in a majority of instances in {majority} of the "
    f"{len(columns)} columns, so on this random bandit family the §2.6.2 ordering "
    + ("is" if majority == len(columns) and chain_max > 0.5 else "is not")
    + " a property of the exact optima at fixed beta or at fixed reward."]
ordering_findings = "\n".join(findings)
(FIGURES / "01_entropy_ordering.md").write_text(
    f"{table}\n\nMeasured (generated from the table):\n\n{ordering_findings}\n")
print(table)
print(ordering_findings)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
x = np.arange(len(DIVERGENCES))
for s, label in zip(stacks, columns):
    ax = axes[0] if label.startswith("beta") else axes[1]
    ax.plot(x, s.mean(1), marker="o", label=label)
for ax, title in zip(axes, ("matched beta", "matched expected reward")):
    ax.set_xticks(x, [LABELS[key] for key in DIVERGENCES], rotation=30)
    ax.set(ylabel="mean entropy of pi* [nats]", title=title)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "01_entropy_matched.png", dpi=110)
print(f"total {time.perf_counter() - START:.1f} s")

# %% [markdown]
# ## What the exact toy shows
#
# The findings printed under the table above are generated from its numbers at whichever size
# ran (the committed `notebooks/figures/01_entropy_ordering.md` holds the full-size ones), so
# the text cannot drift from the figures. Two facts help read them:
#
# - The Table 2.1 JSD is twice the usual Jensen-Shannon divergence and has f''(1) = 1/2 (the
#   others have f''(1) = 1), so at equal beta it is locally a weaker regulariser than the
#   other five.
# - At beta = 10 every optimum stays close to pi_ref, so the six entropies nearly coincide and
#   which divergence is lowest is decided by small differences.
#
# The thesis measured the ordering on trained LMs, where optimisation, finite data and
# sequence-level structure also play a part; this toy says nothing about those, and the tests
# assert no ordering.

# %%
# The second fact above, checked: at beta = 10 the six mean entropies agree within 1%.
spread = np.ptp(stacks[MATCHED_BETAS.index(10.0)].mean(1)) / ref_entropy.mean()
assert spread < 0.01, spread
print(f"beta = 10: the six mean entropies span {spread:.2%} of pi_ref's")
