"""A tiny 2-D DDPM (MLP) for the debiasing study of thesis §3.6.2 / Table 3.2.

Six Gaussian clusters on a circle stand for the demographic cells race (3) x gender (2) of
the thesis' occupations; the base model is pre-trained on a deliberately imbalanced mixture.
Chosen groups are balanced sets (one sample per cell, like the thesis' 6 images per
occupation); rejected groups are base-model samples. `finetune` runs SFT (denoising loss on
chosen samples), Diffusion-DPO (k = 1: one chosen and one rejected member) or diffusion mDPO
(k = 6) from the base model, which is also the frozen reference. Everything is a pure function
of a key and a frozen config; seeds are `jax.vmap`-ed, and each program draws its randomness
from one `jax.random.uniform` call per step (each PRNG call site costs compile time on CPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignax.metrics.diversity import category_counts, simpson_index
from alignax.objectives.diffusion import denoising_error, diffusion_mdpo_loss
from alignax.toy.multisample import standard_normal

METHODS = ("sft", "dpo", "mdpo")
NUM_CELLS = 6  # cell c: race = c % 3, gender = c // 3


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Sizes and hyper-parameters of the toy (defaults: the notebook's full size)."""

    base_weights: tuple = (0.55, 0.2, 0.1, 0.07, 0.05, 0.03)
    radius: float = 2.0
    cluster_std: float = 0.2
    num_steps: int = 20  # diffusion steps T
    hidden: int = 64
    pretrain_steps: int = 3000
    pretrain_batch: int = 256
    finetune_steps: int = 600
    num_groups: int = 256  # preference groups in the data set
    group_batch: int = 32
    group_size: int = 6
    beta: float = 50.0  # beta T omega(lambda_t), with omega constant (Wallace et al.)
    sft_learning_rate: float = 1e-3
    pretrain_learning_rate: float = 2e-3
    dpo_learning_rate: float = 1e-3
    num_eval_samples: int = 2000


def centers(config: DiffusionConfig) -> jnp.ndarray:
    """[6, 2] cluster centres on a circle."""
    angle = 2 * jnp.pi * jnp.arange(NUM_CELLS) / NUM_CELLS
    return config.radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)


def _schedule(config):
    betas = jnp.linspace(1e-3, 0.35, config.num_steps)
    return betas, jnp.cumprod(1.0 - betas)  # [T], alpha_bar [T]


def init_mlp(key: jax.Array, config: DiffusionConfig) -> dict:
    """eps-prediction MLP params: [x (2), sinusoidal t (8)] -> hidden -> hidden -> 2."""
    sizes = (10, config.hidden, config.hidden, 2)
    u = jax.random.uniform(key, (sum(a * b for a, b in zip(sizes[:-1], sizes[1:])),))
    params, start = {}, 0
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (2 * u[start:start + a * b] - 1) * math.sqrt(3.0 / a)  # variance 1/a
        params[f"w{i}"], params[f"b{i}"] = w.reshape(a, b), jnp.zeros(b)
        start += a * b
    return params


def predict_noise(params: dict, x: jax.Array, t: jax.Array, config: DiffusionConfig):
    """eps_theta(x_t, t): x [..., 2], t [...] int -> [..., 2]."""
    freqs = jnp.exp(jnp.arange(4) * math.log(10.0) / 3)  # 1 .. 10
    phase = (t[..., None] / config.num_steps) * freqs  # [..., 4]
    h = jnp.concatenate([x, jnp.sin(phase), jnp.cos(phase)], -1)  # [..., 10]
    h = jax.nn.silu(h @ params["w0"] + params["b0"])
    h = jax.nn.silu(h @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def sample_cells(u: jax.Array, weights) -> jax.Array:
    """Cell indices from uniforms u [...] under mixture weights [6]."""
    cdf = jnp.cumsum(jnp.asarray(weights) / jnp.sum(jnp.asarray(weights)))
    return jnp.sum(cdf[:-1] <= u[..., None], -1).astype(jnp.int32)


def sample_mixture(u: jax.Array, cells: jax.Array, config: DiffusionConfig) -> jax.Array:
    """Points [..., 2] of the given cells, with noise from uniforms u [..., 2]."""
    return centers(config)[cells] + config.cluster_std * standard_normal(u)


def _noised(x0, u, config):
    """(t, eps, x_t) for clean x0 [..., 2] from uniforms u [..., 3]."""
    _, alpha_bar = _schedule(config)
    t = jnp.minimum(jnp.floor(u[..., 0] * config.num_steps), config.num_steps - 1).astype(jnp.int32)
    eps = standard_normal(u[..., 1:])
    ab = alpha_bar[t][..., None]
    return t, eps, jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps


def pretrain(key: jax.Array, config: DiffusionConfig) -> dict:
    """Base model: denoising loss on the imbalanced mixture (`base_weights`)."""
    k_init, k_train = jax.random.split(key)
    params = init_mlp(k_init, config)
    opt = optax.adam(config.pretrain_learning_rate)
    n = config.pretrain_batch

    def step(carry, i):
        params, state = carry
        u = jax.random.uniform(jax.random.fold_in(k_train, i), (n, 6))
        x0 = sample_mixture(u[:, 1:3], sample_cells(u[:, 0], config.base_weights), config)

        def loss_fn(p):
            t, eps, xt = _noised(x0, u[:, 3:], config)
            return jnp.mean(jnp.sum(jnp.square(predict_noise(p, xt, t, config) - eps), -1))
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                  jnp.arange(config.pretrain_steps))
    return params


def generate(params: dict, key: jax.Array, num: int, config: DiffusionConfig) -> jax.Array:
    """Ancestral DDPM sampling: [num, 2] points."""
    betas, alpha_bar = _schedule(config)
    u = jax.random.uniform(key, (config.num_steps + 1, num, 2))
    x = standard_normal(u[0])

    def step(x, i):
        t = config.num_steps - 1 - i
        eps = predict_noise(params, x, jnp.full((num,), t), config)
        mean = (x - betas[t] / jnp.sqrt(1 - alpha_bar[t]) * eps) / jnp.sqrt(1 - betas[t])
        noise = jnp.where(t > 0, jnp.sqrt(betas[t]), 0.0) * standard_normal(u[i + 1])
        return mean + noise, None

    x, _ = jax.lax.scan(step, x, jnp.arange(config.num_steps))
    return x


def assign_cells(x: jax.Array, config: DiffusionConfig) -> jax.Array:
    """Nearest-centre cell [...] of points [..., 2]."""
    d = jnp.sum(jnp.square(x[..., None, :] - centers(config)), -1)
    return jnp.argmin(d, -1)


def preference_data(key: jax.Array, base_params: dict, config: DiffusionConfig):
    """(chosen [G, 6, 2] balanced groups, rejected [G, 6, 2] base-model samples)."""
    k_chosen, k_rejected = jax.random.split(key)
    g, k = config.num_groups, config.group_size
    u = jax.random.uniform(k_chosen, (g, k, 3))
    order = jnp.argsort(u[..., 2], axis=-1)  # random member order: DPO's k = 1 uses member 0
    cells = jnp.take_along_axis(jnp.broadcast_to(jnp.arange(k) % NUM_CELLS, (g, k)), order, -1)
    chosen = sample_mixture(u[..., :2], cells, config)  # one of each cell, shuffled
    rejected = generate(base_params, k_rejected, g * k, config).reshape(g, k, 2)
    return chosen, rejected


def finetune(key: jax.Array, base_params: dict, chosen, rejected, method: jax.Array,
             config: DiffusionConfig) -> dict:
    """SFT (method 0), Diffusion-DPO k = 1 (1) or diffusion mDPO k = group_size (2).

    `method` may be traced (one program for all three). Each step draws group_batch groups;
    DPO uses their first members only. One timestep per example, shared by its chosen and
    rejected members (as in Wallace et al.), independent noise per member.
    """
    opt = optax.adam(jnp.where(method == 0, config.sft_learning_rate, config.dpo_learning_rate))
    g, k, bsz = config.num_groups, config.group_size, config.group_batch
    member_mask = jnp.where(method == 1, jnp.arange(k) < 1, jnp.ones(k, bool))  # [k]
    mask = jnp.broadcast_to(member_mask, (bsz, k))

    def step(carry, i):
        params, state = carry
        u = jax.random.uniform(jax.random.fold_in(key, i), (bsz, 3 + 4 * k))
        idx_w = jnp.minimum(jnp.floor(u[:, 0] * g), g - 1).astype(jnp.int32)
        idx_l = jnp.minimum(jnp.floor(u[:, 1] * g), g - 1).astype(jnp.int32)
        xw, xl = chosen[idx_w], rejected[idx_l]  # [bsz, k, 2]
        t = jnp.minimum(jnp.floor(u[:, 2] * config.num_steps), config.num_steps - 1)
        t = jnp.broadcast_to(t[:, None], (bsz, k)).astype(jnp.int32)
        _, alpha_bar = _schedule(config)
        ab = alpha_bar[t][..., None]
        eps_w = standard_normal(u[:, 3:3 + 2 * k].reshape(bsz, k, 2))
        eps_l = standard_normal(u[:, 3 + 2 * k:3 + 4 * k].reshape(bsz, k, 2))
        xt_w = jnp.sqrt(ab) * xw + jnp.sqrt(1 - ab) * eps_w
        xt_l = jnp.sqrt(ab) * xl + jnp.sqrt(1 - ab) * eps_l
        ref_w = denoising_error(eps_w, predict_noise(base_params, xt_w, t, config))  # [bsz, k]
        ref_l = denoising_error(eps_l, predict_noise(base_params, xt_l, t, config))

        def loss_fn(p):
            err_w = denoising_error(eps_w, predict_noise(p, xt_w, t, config))
            err_l = denoising_error(eps_l, predict_noise(p, xt_l, t, config))
            dpo = diffusion_mdpo_loss(err_w, ref_w, err_l, ref_l, beta=config.beta,
                                      chosen_mask=mask, rejected_mask=mask)
            return jnp.where(method == 0, jnp.mean(err_w), jnp.mean(dpo))
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (base_params, opt.init(base_params)),
                                  jnp.arange(config.finetune_steps))
    return params


def cell_diversity(x: jax.Array, config: DiffusionConfig) -> dict:
    """Simpson indices of generated points [N, 2]: "gender" (2 cells), "race" (3 cells), and
    over all 6 cells, plus "off_mode" (fraction farther than 4 std from every centre)."""
    cells = assign_cells(x, config)
    d = jnp.sqrt(jnp.min(jnp.sum(jnp.square(x[:, None, :] - centers(config)), -1), -1))
    return {"gender": simpson_index(category_counts(cells // 3, num_categories=2)),
            "race": simpson_index(category_counts(cells % 3, num_categories=3)),
            "cells": simpson_index(category_counts(cells, num_categories=NUM_CELLS)),
            "off_mode": jnp.mean(d > 4 * config.cluster_std)}


def run_study(keys: jax.Array, config: DiffusionConfig) -> dict:
    """Table 3.2 analogue for every seed: Original (base), SFT, DPO (k = 1), mDPO (k = 6).

    Returns {"original" | "sft" | "dpo" | "mdpo": {metric: [S] NumPy}} and "cell_freq"
    {name: [S, 6]} (generated cell frequencies).
    """
    def one_seed(key):
        k_base, k_data, k_tune, k_eval = jax.random.split(key, 4)
        base = pretrain(k_base, config)
        chosen, rejected = preference_data(k_data, base, config)
        tuned = jax.vmap(lambda m: finetune(k_tune, base, chosen, rejected, m, config))(
            jnp.arange(len(METHODS)))
        models = jax.tree.map(lambda b, t: jnp.concatenate([b[None], t]), base, tuned)
        xs = jax.vmap(lambda p: generate(p, k_eval, config.num_eval_samples, config))(models)
        freq = jax.vmap(lambda x: category_counts(assign_cells(x, config),
                                                  num_categories=NUM_CELLS))(xs)
        return jax.vmap(lambda x: cell_diversity(x, config))(xs), freq / config.num_eval_samples

    metrics, freq = jax.jit(jax.vmap(one_seed))(keys)
    names = ("original",) + METHODS
    out = {name: {m: np.asarray(v[:, i]) for m, v in metrics.items()}
           for i, name in enumerate(names)}
    out["cell_freq"] = {name: np.asarray(freq[:, i]) for i, name in enumerate(names)}
    return out
