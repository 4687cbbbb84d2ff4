"""Toy studies of multi-sample preference optimization (thesis ch. 3), vmapped over seeds.

* `estimator_error_curve`: the mIPO mini-batch estimator of Proposition 1 against its plain
  (biased) version, on simulated groups (Figure 3.2, f(x) = x^2).
* `sum_win_probability_*`: P(sum of k draws of X > sum of k draws of Y), exactly, for
  Remark 1 (Gaussian, same-scale Gamma, and finite discrete distributions).
* `RngConfig` / `run_rng_task`: the random-number task of §3.6.1 with a tabular categorical
  policy per prompt (Table 3.1 layout via `win_rate`).
* `LabelNoiseConfig` / `run_label_noise_task`: §3.6.4 / Figure 3.11, chosen groups from a
  model that is better on average but not sample by sample, with default (noisy) or oracle
  (clean) labels.

Everything is a pure function of a key and a frozen config, so seeds are `jax.vmap`-ed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special, stats

from alignax.objectives.multisample import mdpo_loss, mipo_loss

# --------------------------------------------------------------------------------------------
# Proposition 1 / Figure 3.2: the unbiased mini-batch estimator
# --------------------------------------------------------------------------------------------

def standard_normal(u: jax.Array) -> jax.Array:
    """N(0, 1) draws from uniforms u in [0, 1) by the inverse CDF (clipped away from 0 and 1).

    The toys draw all their randomness with one `jax.random.uniform` call per program and
    transform it: each distinct PRNG call site costs seconds of XLA compile time on CPU.
    """
    return jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))


def categorical_from_uniform(u: jax.Array, logits: jax.Array) -> jax.Array:
    """Inverse-CDF categorical draws: u [...] in [0, 1), logits broadcastable to [..., N]."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # [..., N]
    return jnp.sum(cdf[..., :-1] <= u[..., None], axis=-1).astype(jnp.int32)


FIGURE_3_2 = {"p": (1.0, 1.0), "q": (0.0, 1.0), "c": 0.5}
"""Figure 3.2 setting (the thesis does not give one): p = N(1, 1), q = N(0, 1), f(x) = x^2,
so E_p f = 2, E_q f = 1, Var_p f = 6, Var_q f = 2, and l = (2 - 1 - 0.5)^2 = 0.25."""


def figure_3_2_target() -> float:
    """Exact l = (E_p x^2 - E_q x^2 - c)^2 in the Figure 3.2 setting."""
    (mp, sp), (mq, sq), c = FIGURE_3_2["p"], FIGURE_3_2["q"], FIGURE_3_2["c"]
    return (mp ** 2 + sp ** 2 - mq ** 2 - sq ** 2 - c) ** 2


def estimator_error_curve(key: jax.Array, ks, *, num_trials: int) -> dict:
    """Figure 3.2: both mIPO estimators (Prop. 1) against the group size k = n = m.

    Each trial draws max(ks) samples from p and from q; the estimate at k uses the first k of
    them (common random numbers across k) through `mipo_loss` with h = x^2, tau = 1/(2c) and a
    member mask, so every k runs in one compiled, vmapped program.

    Returns a dict of float64 NumPy arrays over `ks`: "k", "bias_unbiased", "bias_biased",
    "rmse_unbiased", "rmse_biased", "mae_unbiased", "mae_biased", "se_unbiased" (standard
    error of the unbiased estimator's mean), plus "target" (float), the exact l.
    """
    (mp, sp), (mq, sq), c = FIGURE_3_2["p"], FIGURE_3_2["q"], FIGURE_3_2["c"]
    kmax = max(ks)
    if min(ks) < 2:
        raise ValueError(f"the unbiased estimator needs k >= 2, got ks={tuple(ks)}")
    z = standard_normal(jax.random.uniform(key, (2, num_trials, kmax)))  # [2, T, kmax]
    fp, fq = jnp.square(mp + sp * z[0]), jnp.square(mq + sq * z[1])  # f(x) = x^2

    @jax.jit
    def curve(ks):
        def at(k):
            mask = jnp.broadcast_to(jnp.arange(kmax) < k, fp.shape)
            kw = dict(tau=0.5 / c, chosen_mask=mask, rejected_mask=mask)
            return mipo_loss(fp, fq, unbiased=True, **kw), mipo_loss(fp, fq, unbiased=False, **kw)
        return jax.vmap(at)(ks)  # 2 x [len(ks), T]

    unb, bia = (np.asarray(v, np.float64) for v in curve(jnp.asarray(ks)))
    target = figure_3_2_target()
    out = {"k": np.asarray(ks), "target": target}
    for name, v in (("unbiased", unb), ("biased", bia)):
        out[f"bias_{name}"] = v.mean(-1) - target
        out[f"rmse_{name}"] = np.sqrt(np.mean((v - target) ** 2, -1))
        out[f"mae_{name}"] = np.mean(np.abs(v - target), -1)
    out["se_unbiased"] = unb.std(-1, ddof=1) / math.sqrt(num_trials)
    return out


# --------------------------------------------------------------------------------------------
# Remark 1: P(sum_k X > sum_k Y)
# --------------------------------------------------------------------------------------------

def sum_win_probability_normal(k, *, mean_x: float, std_x: float, mean_y: float,
                               std_y: float) -> np.ndarray:
    """P(sum of k X > sum of k Y) = Phi(sqrt(k) (mu_x - mu_y) / sqrt(s_x^2 + s_y^2)), float64."""
    k = np.asarray(k, np.float64)
    return stats.norm.cdf(np.sqrt(k) * (mean_x - mean_y) / math.hypot(std_x, std_y))


def sum_win_probability_gamma(k, *, shape_x: float, shape_y: float) -> np.ndarray:
    """P(sum of k X > sum of k Y), X ~ Gamma(shape_x), Y ~ Gamma(shape_y), one scale; float64.

    Sums are Gamma(k shape_x) and Gamma(k shape_y); S_X/(S_X+S_Y) ~ Beta(k a_x, k a_y), so the
    probability is P(Beta > 1/2) = 1 - I_{1/2}(k a_x, k a_y).
    """
    k = np.asarray(k, np.float64)
    return 1.0 - special.betainc(k * shape_x, k * shape_y, 0.5)


def sum_win_probability_discrete(k: int, *, values_x, probs_x, values_y, probs_y) -> tuple:
    """(P(sum_k X > sum_k Y), P(sum_k X == sum_k Y)) for integer-valued finite X, Y; float64.

    Exact: the law of sum_k X - sum_k Y is a k-fold convolution on the integers.
    """
    def law(values, probs, sign):
        values = sign * np.asarray(values, np.int64)
        lo = values.min()
        pmf = np.zeros(values.max() - lo + 1)
        np.add.at(pmf, values - lo, np.asarray(probs, np.float64))
        return pmf, lo
    px, lx = law(values_x, probs_x, 1)
    py, ly = law(values_y, probs_y, -1)
    step = np.convolve(px, py)  # law of X - Y, offset lx + ly
    total, offset = np.array([1.0]), 0
    for _ in range(k):
        total = np.convolve(total, step)
        offset += lx + ly
    support = offset + np.arange(total.size)
    return float(total[support > 0].sum()), float(total[support == 0].sum())


# --------------------------------------------------------------------------------------------
# Shared: tabular categorical policies trained by a group objective
# --------------------------------------------------------------------------------------------

def entropy(logits: jax.Array) -> jax.Array:
    """Shannon entropy (nats) of softmax(logits) over the last axis."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


METHODS = {"dpo": ("mdpo", 1), "ipo": ("mipo_biased", 1), "mdpo": ("mdpo", None),
           "mipo": ("mipo", None), "mipo_biased": ("mipo_biased", None)}
"""Method name -> (group objective, forced group size). DPO and IPO are the k = 1 cases of
mDPO and of the plain mIPO (exactly: tests/test_multisample.py), which lets one compiled
program train every method and every k with a traced method index and a member mask."""
_OBJECTIVES = ("mdpo", "mipo", "mipo_biased")


def method_code(method: str, k: int) -> tuple:
    """(objective index, effective k) of a method name and group size, for the trainers."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
    objective, forced_k = METHODS[method]
    if forced_k is not None and k != forced_k:
        raise ValueError(f"{method} is single-sample: k must be 1, got {k}")
    return _OBJECTIVES.index(objective), k


def _group_objective(index, h_w, h_l, member_mask, *, beta, tau):
    """Per-example loss [G] of objective `index` (traced) on [G, K] groups, valid members in
    `member_mask` [K] (the first k). The unbiased mIPO corrects only groups of >= 2 members.

    All three objectives are evaluated and one is selected: on CPU this compiles several
    times faster than a `lax.switch` inside the training scan, and costs little at toy size.
    """
    mask = jnp.broadcast_to(member_mask, h_w.shape)
    mdpo = mdpo_loss(h_w, h_l, beta=beta, chosen_mask=mask, rejected_mask=mask)
    mipo = mipo_loss(h_w, h_l, tau=tau, unbiased=True, chosen_mask=mask, rejected_mask=mask)
    plain = mipo_loss(h_w, h_l, tau=tau, unbiased=False, chosen_mask=mask, rejected_mask=mask)
    return jnp.where(index == 0, mdpo, jnp.where(index == 1, mipo, plain))


def _train_tabular(ref_logits, chosen, rejected, objective, k, *, beta, tau, nll_weight, steps,
                   learning_rate):
    """Full-batch Adam on tabular logits [P, N] from pi_ref, one objective per prompt.

    chosen, rejected: [P, G, K] int responses of which the first k (traced) are used;
    objective: traced index into _OBJECTIVES. Returns the final logits [P, N].
    """
    log_ref = jax.nn.log_softmax(ref_logits, axis=-1)  # [P, N]
    p, g, kmax = chosen.shape
    member_mask = jnp.arange(kmax) < k  # [K]
    opt = optax.adam(learning_rate)

    def loss_fn(logits):
        log_pi = jax.nn.log_softmax(logits, axis=-1)
        h = log_pi - log_ref  # [P, N]
        h_w = jnp.take_along_axis(h, chosen.reshape(p, g * kmax), -1).reshape(p * g, kmax)
        h_l = jnp.take_along_axis(h, rejected.reshape(p, g * kmax), -1).reshape(p * g, kmax)
        loss = jnp.mean(_group_objective(objective, h_w, h_l, member_mask, beta=beta, tau=tau))
        log_pi_w = jnp.take_along_axis(log_pi, chosen.reshape(p, g * kmax), -1)  # [P, G*K]
        nll = -jnp.mean(log_pi_w, where=jnp.tile(member_mask, g)[None, :])
        return (loss + nll_weight * nll) * p  # prompts are independent: sum over them

    def step(carry, _):
        logits, state = carry
        grads = jax.grad(loss_fn)(logits)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(logits, updates), state), None

    (logits, _), _ = jax.lax.scan(step, (ref_logits, opt.init(ref_logits)), None, length=steps)
    return logits


# --------------------------------------------------------------------------------------------
# §3.6.1: the random-number task
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RngConfig:
    """Random-number task (§3.6.1), tabular: one categorical over N numbers per prompt.

    The reference of each prompt favours one number (as Llama-3 favours 7, Figure 3.3):
    log pi_ref = noise_scale * z + favourite_logit * onehot(favourite), z ~ N(0, 1).
    Chosen groups are k uniform draws; rejected groups are k draws from pi_ref (non-uniform).
    Every method adds nll_weight times the chosen responses' negative log-likelihood, as the
    thesis does (§3.6.1, footnote 3, after Pang et al. 2024, weight 1); 0 is the ablation.
    Groups of size k are the first k members of groups drawn at size max_k, so the data of
    different k (and the single samples of DPO/IPO) are nested, and comparisons are paired.
    """

    num_numbers: int = 10
    num_prompts: int = 16
    groups_per_prompt: int = 32
    max_k: int = 5
    favourite_logit: float = 2.0
    noise_scale: float = 0.3
    beta: float = 0.1
    tau: float = 0.5
    nll_weight: float = 1.0
    steps: int = 200
    learning_rate: float = 0.05


def rng_reference_and_data(key: jax.Array, config: RngConfig):
    """(ref_logits [P, N], chosen [P, G, max_k], rejected [P, G, max_k]) of one seed.

    Reference: noise_scale * z + favourite_logit * onehot(favourite); chosen members are
    uniform over the N numbers; rejected members are drawn from pi_ref.
    """
    p, n, g, k = config.num_prompts, config.num_numbers, config.groups_per_prompt, config.max_k
    u = jax.random.uniform(key, (p * n + p + 2 * p * g * k,))  # every draw of this seed
    z = standard_normal(u[:p * n]).reshape(p, n)
    fav = jnp.minimum(jnp.floor(u[p * n:p * n + p] * n), n - 1).astype(jnp.int32)
    ref = config.noise_scale * z + config.favourite_logit * jax.nn.one_hot(fav, n)
    u_w, u_l = jnp.split(u[p * n + p:], 2)
    chosen = jnp.minimum(jnp.floor(u_w * n), n - 1).astype(jnp.int32).reshape(p, g, k)
    rejected = categorical_from_uniform(u_l.reshape(p, g, k), ref[:, None, None, :])
    return ref, chosen, rejected


def _rng_final_logits(key, config, objective, k):
    ref, chosen, rejected = rng_reference_and_data(key, config)
    return ref, _train_tabular(ref, chosen, rejected, objective, k, beta=config.beta,
                               tau=config.tau, nll_weight=config.nll_weight, steps=config.steps,
                               learning_rate=config.learning_rate)


def run_rng_task(keys: jax.Array, config: RngConfig, runs) -> dict:
    """Trains every (method, k) in `runs` on every seed in one compiled, vmapped program.

    Args:
      keys: [S] seeds; a seed fixes the prompts' references and data for every run (paired).
      runs: sequence of (method, k), method in METHODS ("dpo"/"ipo" need k = 1).

    Returns:
      {"reference": entropies [S, P] of pi_ref (the table's "SFT"), (method, k): final
      entropies [S, P], ("kl_uniform", method, k): KL(pi || uniform) [S, P]} as NumPy.
    """
    codes = [method_code(m, k) for m, k in runs]
    for _, k in codes:
        if not 1 <= k <= config.max_k:
            raise ValueError(f"k must be in [1, {config.max_k}], got {k}")
    objective = jnp.asarray([c[0] for c in codes])  # [R]
    ks = jnp.asarray([c[1] for c in codes])  # [R]

    @jax.jit
    def run(keys):
        per_run = jax.vmap(lambda o, k: jax.vmap(
            lambda key: _rng_final_logits(key, config, o, k))(keys), in_axes=(0, 0))
        ref, logits = per_run(objective, ks)  # [R, S, P, N]
        return entropy(ref[0]), entropy(logits)

    ref_entropy, entropies = run(keys)
    log_n = math.log(config.num_numbers)
    out = {"reference": np.asarray(ref_entropy)}
    for i, run_id in enumerate(runs):
        out[tuple(run_id)] = np.asarray(entropies[i])
        out[("kl_uniform",) + tuple(run_id)] = log_n - np.asarray(entropies[i])
    out[("kl_uniform", "reference")] = log_n - out["reference"]
    return out


def win_rate(a, b) -> dict:
    """Paired win rate of `a` over `b` (larger wins, ties count 1/2) with a 95% Wilson interval.

    Args:
      a, b: same-shape arrays of scores for paired, independent comparisons.

    Returns:
      {"win_rate", "low", "high", "n"} (floats / int).
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    n = a.size
    wins = np.sum(a > b) + 0.5 * np.sum(a == b)
    phat, z = wins / n, 1.959963984540054
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"win_rate": float(phat), "low": float(centre - half), "high": float(centre + half),
            "n": int(n)}


def mean_interval(x) -> tuple:
    """(mean, half-width of the 95% normal interval) of independent draws x."""
    x = np.asarray(x, np.float64).ravel()
    return float(x.mean()), float(1.959963984540054 * x.std(ddof=1) / math.sqrt(x.size))


# --------------------------------------------------------------------------------------------
# §3.6.4 / Figure 3.11: label noise
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LabelNoiseConfig:
    """Two generators over N responses with true rewards r ~ N(0, 1) (fixed per seed).

    "Strong" model (the 70B) pi_A ∝ exp(r / temp_strong), "weak" (the 8B) pi_B ∝ exp(r /
    temp_weak) with temp_strong < temp_weak: A is better on average, not sample by sample.
    Default labels say every A group beats every B group (noisy); clean labels compare the
    groups' summed true rewards (the GPT-4o oracle of §3.6.4) and swap the pair when B's is
    higher (ties keep the default). The policy starts from pi_ref = pi_B and is trained by
    mDPO (k = 1: DPO) on G groups, the first k of max_k members each (nested across k).
    """

    num_responses: int = 20
    temp_strong: float = 1.0
    temp_weak: float = 2.0
    num_groups: int = 256
    max_k: int = 5
    beta: float = 0.1
    steps: int = 200
    learning_rate: float = 0.05


def _label_noise_run(key, config, k, clean):
    n, shape = config.num_responses, (1, config.num_groups, config.max_k)
    u = jax.random.uniform(key, (n + 2 * config.num_groups * config.max_k,))  # all draws
    r = standard_normal(u[:n])
    la, lb = r / config.temp_strong, r / config.temp_weak
    u_a, u_b = jnp.split(u[n:], 2)
    ya = categorical_from_uniform(u_a.reshape(shape), la)  # strong model's groups [1, G, K]
    yb = categorical_from_uniform(u_b.reshape(shape), lb)  # weak model's groups
    member = jnp.arange(config.max_k) < k
    correct = (jnp.sum(jnp.where(member, r[ya], 0.0), -1)
               >= jnp.sum(jnp.where(member, r[yb], 0.0), -1))  # [1, G] oracle agrees
    swap = clean & ~correct
    chosen = jnp.where(swap[..., None], yb, ya)
    rejected = jnp.where(swap[..., None], ya, yb)
    logits = _train_tabular(lb[None], chosen, rejected, _OBJECTIVES.index("mdpo"), k,
                            beta=config.beta, tau=1.0, nll_weight=0.0, steps=config.steps,
                            learning_rate=config.learning_rate)[0]
    return jax.nn.softmax(logits), r, jnp.mean(correct)


def run_label_noise_task(keys: jax.Array, config: LabelNoiseConfig, ks) -> dict:
    """mDPO with each k in `ks` on clean and on noisy labels, every seed, one program.

    Returns NumPy arrays: "probs" [len(ks), 2, S, N] final policies (axis 1: 0 = noisy/default
    labels, 1 = clean/oracle labels), "r" [S, N] true rewards, "label_accuracy" [len(ks), S]
    (fraction of default labels the oracle agrees with), "reward" [len(ks), 2, S] = E_pi r.
    """
    if not all(1 <= k <= config.max_k for k in ks):
        raise ValueError(f"every k must be in [1, {config.max_k}], got {tuple(ks)}")

    @jax.jit
    def run(keys):
        def one(k, clean):
            return jax.vmap(lambda key: _label_noise_run(key, config, k, clean))(keys)
        by_clean = jax.vmap(one, in_axes=(None, 0))
        return jax.vmap(by_clean, in_axes=(0, None))(jnp.asarray(ks), jnp.asarray([False, True]))

    probs, r, acc = run(keys)
    r = np.asarray(r[0, 0])
    probs = np.asarray(probs)
    return {"probs": probs, "r": r, "label_accuracy": np.asarray(acc[:, 0]),
            "reward": np.einsum("kcsn,sn->kcs", probs, r)}


def pairwise_win_rate(probs_a, probs_b, r) -> tuple:
    """(win, lose) probabilities that y ~ probs_a has a higher (lower) true reward than
    y' ~ probs_b, for [..., N] policies and rewards r [..., N]: the exact analogue of a judge's
    win/lose rates in Figure 3.11."""
    probs_a, probs_b, r = (np.asarray(x, np.float64) for x in (probs_a, probs_b, r))
    diff = r[..., :, None] - r[..., None, :]  # [..., N, N]
    joint = probs_a[..., :, None] * probs_b[..., None, :]
    return np.sum(joint * (diff > 0), axis=(-2, -1)), np.sum(joint * (diff < 0), axis=(-2, -1))
