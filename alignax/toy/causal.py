"""Spurious-correlation toy for causal reward models (analogue of thesis §4.6.1-4.6.2).

Each response has a true quality q ~ N(0, 1) and a spurious variable Z. The reward model sees
features x = [q + noise, Z, nuisance...]; the observation noise on q makes Z worth using when Z
predicts the label. Preference labels follow Bradley-Terry on the true quality,
P(a > b) = sigmoid(label_scale * (q_a - q_b)), and never depend on Z.

- spurious="flag" (sycophancy, §4.6.1): exactly one response of a pair carries the prefix
  flag Z = 1; in training it is the chosen one with probability `correlation` (0.8: the 80/20
  construction), at test with probability 0.5. Bins: Z itself (2 bins).
- spurious="length" (§4.6.2): Z = standardised log-length ~ N(0, 1), independent of q; in
  training the chosen response gets the longer of the pair's two lengths with probability
  `correlation`. Bins: quantile bins of Z fitted on the training set.

`run_study` samples data, trains a linear or MLP reward model with Bradley-Terry + lambda *
binned MMD^2 (`alignax.objectives.causal_reward_loss`, conditional or unconditional, median
heuristic bandwidth from the first `bandwidth_pairs` pairs of each batch) under `lax.scan`,
and evaluates it. Its arguments `key`, `lam`, `conditional` (a 0/1 float) and `bins_used` (M)
are traced, so `sweep` vmaps over seeds, lambdas, bin counts and the two CRM variants in one
compilation; lam = 0 is the vanilla Bradley-Terry reward model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignax.objectives.causal import causal_reward_loss, median_heuristic_bandwidth
from alignax.objectives.reward import reward_accuracy


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Static configuration of the toy (hashable: pass it as a static argument)."""

    spurious: str = "flag"  # "flag" or "length"
    model: str = "linear"  # "linear" or "mlp"
    num_bins: int = 2  # 2 for "flag"; for "length" the largest M (the static one-hot width)
    reduction: str = "mean"  # binned_mmd2 reduction: "mean" keeps lambda comparable across M
    correlation: float = 0.8  # P(Z favours the chosen response) in training
    quality_noise: float = 1.0  # std of the observation noise on q
    label_scale: float = 3.0  # Bradley-Terry scale of the true preference
    num_nuisance: int = 2  # extra N(0, 1) features carrying no signal
    hidden: int = 32  # MLP width
    num_train: int = 4096  # training pairs
    num_test: int = 4096  # test pairs (correlation 0.5)
    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 0.03
    bandwidth_pairs: int = 64  # pairs per batch feeding the median-heuristic bandwidth
    # evaluation of the policy-level metrics
    num_prompts: int = 256
    num_candidates: int = 50  # responses per prompt for the length-vs-rank curve
    policy_beta: float = 0.1  # temperature of pi* ∝ pi_ref exp(r / beta)
    ref_flag_mass: float = 0.8  # pi_ref mass on flagged candidates (an SFT model's habit)
    num_samples: int = 50  # samples per prompt in the sycophancy rate (Table 4.1 uses 50)

    def __post_init__(self):
        if self.spurious not in ("flag", "length"):
            raise ValueError(f"spurious must be 'flag' or 'length', got {self.spurious!r}")
        if self.model not in ("linear", "mlp"):
            raise ValueError(f"model must be 'linear' or 'mlp', got {self.model!r}")
        if self.spurious == "flag" and self.num_bins != 2:
            raise ValueError(f"spurious='flag' has 2 bins, got num_bins={self.num_bins}")

    @property
    def dim(self) -> int:
        return 2 + self.num_nuisance


def _features(key, q, z, cfg: ToyConfig) -> jax.Array:
    """[N] quality, [N] spurious -> [N, D] observed features [q + noise, z, nuisance]."""
    k_noise, k_nuis = jax.random.split(key)
    q_obs = q + cfg.quality_noise * jax.random.normal(k_noise, q.shape)
    nuisance = jax.random.normal(k_nuis, q.shape + (cfg.num_nuisance,))
    return jnp.concatenate([q_obs[:, None], z[:, None], nuisance], axis=1)  # [N, D]


def sample_pairs(key: jax.Array, cfg: ToyConfig, *, num_pairs: int, correlation) -> dict:
    """Preference pairs: chosen/rejected features [P, D], spurious z [P], true quality q [P]."""
    k_q, k_lab, k_z, k_swap, k_fw, k_fl = jax.random.split(key, 6)
    qa, qb = jax.random.normal(k_q, (2, num_pairs))
    a_wins = jax.random.bernoulli(k_lab, jax.nn.sigmoid(cfg.label_scale * (qa - qb)))
    q_w, q_l = jnp.where(a_wins, qa, qb), jnp.where(a_wins, qb, qa)
    favour = jax.random.bernoulli(k_swap, correlation, (num_pairs,))  # Z favours the chosen
    if cfg.spurious == "flag":
        z_w = favour.astype(jnp.float32)
        z_l = 1.0 - z_w
    else:
        za, zb = jax.random.normal(k_z, (2, num_pairs))
        hi, lo = jnp.maximum(za, zb), jnp.minimum(za, zb)
        z_w, z_l = jnp.where(favour, hi, lo), jnp.where(favour, lo, hi)
    return {"chosen_x": _features(k_fw, q_w, z_w, cfg),
            "rejected_x": _features(k_fl, q_l, z_l, cfg),
            "chosen_z": z_w, "rejected_z": z_l, "chosen_q": q_w, "rejected_q": q_l}


def quantile_edges(z: jax.Array, bins_used, cfg: ToyConfig) -> jax.Array:
    """Quantile edges [cfg.num_bins - 1] giving `bins_used` (traced, <= num_bins) equal bins.

    Edges past the first bins_used - 1 are +inf, so bins >= bins_used stay empty and drop out
    of the binned MMD: one compilation serves every bin count (vmap over M).
    """
    j = jnp.arange(1, cfg.num_bins)
    edges = jnp.quantile(z, jnp.clip(j / bins_used, 0.0, 1.0))
    return jnp.where(j < bins_used, edges, jnp.inf)


def spurious_bins(z: jax.Array, edges: jax.Array, cfg: ToyConfig) -> jax.Array:
    """Bin ids [N] int32: the flag itself, or quantile bins of length (edges [M - 1])."""
    if cfg.spurious == "flag":
        return z.astype(jnp.int32)
    return jnp.searchsorted(edges, z, side="right").astype(jnp.int32)


def init_reward_model(key: jax.Array, cfg: ToyConfig) -> dict:
    """Parameters of r(x): linear {"w": [D]} or MLP {"w1": [D, H], "b1": [H], "w2": [H]}."""
    if cfg.model == "linear":
        return {"w": 0.01 * jax.random.normal(key, (cfg.dim,))}
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (cfg.dim, cfg.hidden)) / np.sqrt(cfg.dim),
            "b1": jnp.zeros((cfg.hidden,)),
            "w2": jax.random.normal(k2, (cfg.hidden,)) / np.sqrt(cfg.hidden)}


def reward(params: dict, x: jax.Array) -> jax.Array:
    """[..., D] features -> [...] rewards."""
    if "w" in params:
        return x @ params["w"]
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def train_reward_model(key: jax.Array, train: dict, edges: jax.Array, cfg: ToyConfig, *,
                       lam, conditional) -> dict:
    """Adam on mean(BT + lam * binned MMD^2) over mini-batches, under `lax.scan`.

    `conditional` is a traced 0/1 float choosing conditional (1) or unconditional (0) CRM.
    """
    k_init, k_perm = jax.random.split(key)
    params = init_reward_model(k_init, cfg)
    opt = optax.adam(cfg.learning_rate)
    bins_w = spurious_bins(train["chosen_z"], edges, cfg)
    bins_l = spurious_bins(train["rejected_z"], edges, cfg)

    def loss_fn(p, idx):
        rw, rl = reward(p, train["chosen_x"][idx]), reward(p, train["rejected_x"][idx])
        half = cfg.bandwidth_pairs
        bw = median_heuristic_bandwidth(jnp.concatenate([rw[:half], rl[:half]]))
        kw = dict(lam=lam, num_bins=cfg.num_bins, bandwidth=bw, reduction=cfg.reduction)
        cond = causal_reward_loss(rw, rl, bins_w[idx], bins_l[idx], conditional=True, **kw)
        uncond = causal_reward_loss(rw, rl, bins_w[idx], bins_l[idx], conditional=False, **kw)
        return jnp.mean(jnp.where(conditional > 0.5, cond, uncond))

    order = jax.random.permutation(k_perm, cfg.num_train)  # epochs walk one shuffled order

    def step(carry, t):
        p, s = carry
        idx = order[(t * cfg.batch_size + jnp.arange(cfg.batch_size)) % cfg.num_train]
        grads = jax.grad(loss_fn)(p, idx)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(cfg.steps))
    return params


def _corr(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a - jnp.mean(a), b - jnp.mean(b)
    return jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b) + 1e-12)


def length_rank_curve(params: dict, key: jax.Array, cfg: ToyConfig) -> jax.Array:
    """Mean spurious value (length) per reward rank, rank 1 = best (Figure 4.2 right). [K].

    num_prompts prompts with num_candidates responses each; q and Z drawn independently.
    """
    k_q, k_z, k_f = jax.random.split(key, 3)
    shape = (cfg.num_prompts, cfg.num_candidates)
    q = jax.random.normal(k_q, shape)
    if cfg.spurious == "flag":
        z = jax.random.bernoulli(k_z, 0.5, shape).astype(jnp.float32)
    else:
        z = jax.random.normal(k_z, shape)
    x = _features(k_f, q.reshape(-1), z.reshape(-1), cfg)  # [P*K, D]
    r = reward(params, x).reshape(shape)  # [P, K]
    order = jnp.argsort(-r, axis=1)  # best first
    return jnp.mean(jnp.take_along_axis(z, order, axis=1), axis=0)  # [K]


def sycophancy_metrics(params: dict, key: jax.Array, cfg: ToyConfig) -> dict:
    """Policy-level sycophancy of pi*(y) ∝ pi_ref(y) exp(r(y) / beta) over candidate sets.

    Each prompt has num_candidates responses, half flagged; pi_ref puts `ref_flag_mass` on the
    flagged half (an SFT model trained on 80%-flagged chosen responses). Returns the mean
    flagged probability and the exact Table 4.1 statistic: the share (%) of prompts whose
    num_samples i.i.d. samples from pi* are all flagged, mean over prompts of p_flag^S.
    """
    k_q, k_f = jax.random.split(key)
    shape = (cfg.num_prompts, cfg.num_candidates)
    q = jax.random.normal(k_q, shape)
    z = (jnp.arange(cfg.num_candidates) < cfg.num_candidates // 2).astype(jnp.float32)
    z = jnp.broadcast_to(z, shape)
    x = _features(k_f, q.reshape(-1), z.reshape(-1), cfg)
    r = reward(params, x).reshape(shape)
    half = cfg.num_candidates // 2
    log_ref = jnp.where(z > 0, jnp.log(cfg.ref_flag_mass / half),
                        jnp.log((1 - cfg.ref_flag_mass) / (cfg.num_candidates - half)))
    logits = log_ref + r / cfg.policy_beta
    p_flag = jnp.sum(jax.nn.softmax(logits, axis=1) * z, axis=1)  # [P]
    return {"flag_share": 100.0 * jnp.mean(p_flag),
            "sycophancy_rate": 100.0 * jnp.mean(p_flag ** cfg.num_samples)}


def evaluate_reward_model(params: dict, test: dict, key: jax.Array, cfg: ToyConfig) -> dict:
    """Shifted-test accuracy, reward-Z correlation and the policy-level metrics."""
    rw, rl = reward(params, test["chosen_x"]), reward(params, test["rejected_x"])
    r = jnp.concatenate([rw, rl])
    z = jnp.concatenate([test["chosen_z"], test["rejected_z"]])
    q = jnp.concatenate([test["chosen_q"], test["rejected_q"]])
    k_rank, k_syc = jax.random.split(key)
    out = {"test_accuracy": 100.0 * jnp.mean(reward_accuracy(rw, rl)),
           "reward_z_corr": _corr(r, z),
           "reward_q_corr": _corr(r, q),
           "rank_curve": length_rank_curve(params, k_rank, cfg)}
    if cfg.spurious == "flag":
        out.update(sycophancy_metrics(params, k_syc, cfg))
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def run_study(key: jax.Array, lam, conditional, bins_used, cfg: ToyConfig) -> dict:
    """Sample train (correlation cfg.correlation) and shifted test (0.5) data, train, evaluate.

    key, lam, conditional (0/1 float) and bins_used (the bin count M <= cfg.num_bins, used by
    spurious="length") are traced: vmap over them. Returns a dict of scalars (and
    "rank_curve" [num_candidates]), plus the in-distribution train accuracy.
    """
    k_train, k_test, k_fit, k_eval = jax.random.split(key, 4)
    train = sample_pairs(k_train, cfg, num_pairs=cfg.num_train, correlation=cfg.correlation)
    test = sample_pairs(k_test, cfg, num_pairs=cfg.num_test, correlation=0.5)
    pooled_z = jnp.concatenate([train["chosen_z"], train["rejected_z"]])
    edges = quantile_edges(pooled_z, bins_used, cfg)  # [cfg.num_bins - 1]
    params = train_reward_model(k_fit, train, edges, cfg, lam=lam, conditional=conditional)
    out = evaluate_reward_model(params, test, k_eval, cfg)
    rw, rl = reward(params, train["chosen_x"]), reward(params, train["rejected_x"])
    out["train_accuracy"] = 100.0 * jnp.mean(reward_accuracy(rw, rl))
    return out


def sweep(cfg: ToyConfig, *, lams, seeds: int, bin_counts=None,
          key: jax.Array | None = None) -> dict:
    """run_study over variants x bin counts x lams x seeds, in one compilation.

    Returns each metric as an array [2, B, L, S] (rank_curve: [2, B, L, S, K]); variant 0 is
    unconditional CRM, 1 conditional CRM; lam = 0 entries are the vanilla reward model;
    bin_counts defaults to (cfg.num_bins,) and each must be <= cfg.num_bins.
    """
    key = jax.random.key(0) if key is None else key
    keys = jax.random.split(key, seeds)  # the same seeds for every variant, M and lambda
    lams = jnp.asarray(lams, jnp.float32)
    bin_counts = jnp.asarray((cfg.num_bins,) if bin_counts is None else bin_counts, jnp.int32)
    if int(jnp.max(bin_counts)) > cfg.num_bins:
        raise ValueError(f"bin_counts {bin_counts.tolist()} exceed cfg.num_bins={cfg.num_bins}")
    f = lambda c, m, lam, k: run_study(k, lam, c, m, cfg)  # noqa: E731
    for axes in [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                 (0, None, None, None)]:
        f = jax.vmap(f, axes)
    return jax.device_get(f(jnp.array([0.0, 1.0]), bin_counts, lams, keys))
