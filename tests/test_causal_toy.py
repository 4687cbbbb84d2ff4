"""The spurious-correlation toy: its data construction and the CRM effect on a linear model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.toy.causal import (ToyConfig, quantile_edges, sample_pairs, spurious_bins,
                                train_reward_model)

CFG = ToyConfig(spurious="flag", num_train=1024, steps=80, batch_size=128)
_sample = jax.jit(sample_pairs, static_argnums=1, static_argnames="num_pairs")


def test_flag_pairs_follow_the_80_20_construction():
    train = _sample(jax.random.key(0), CFG, num_pairs=20_000, correlation=0.8)
    test = _sample(jax.random.key(1), CFG, num_pairs=20_000, correlation=0.5)
    train, test = jax.device_get((train, test))
    assert np.all(train["chosen_z"] + train["rejected_z"] == 1)  # one flag a pair
    assert abs(np.mean(train["chosen_z"]) - 0.8) < 0.01
    assert abs(np.mean(test["chosen_z"]) - 0.5) < 0.01
    # labels come from quality only: chosen quality is higher, and independent of the flag
    assert np.mean(np.asarray(train["chosen_q"]) > np.asarray(train["rejected_q"])) > 0.75
    corr = np.corrcoef(np.asarray(train["chosen_q"]), np.asarray(train["chosen_z"]))[0, 1]
    assert abs(corr) < 0.03
    assert train["chosen_x"].shape == (20_000, CFG.dim)


def test_length_bins_with_a_traced_bin_count():
    cfg = ToyConfig(spurious="length", num_bins=30)
    z = jax.random.normal(jax.random.key(2), (3000,))
    for m in (10, 30):
        bins = spurious_bins(z, jax.jit(lambda z, m: quantile_edges(z, m, cfg))(z, m), cfg)
        counts = np.bincount(np.asarray(bins), minlength=30)
        assert np.all(counts[:m] >= 3000 // m - 1) and np.all(counts[m:] == 0)
    with pytest.raises(ValueError, match="2 bins"):
        ToyConfig(spurious="flag", num_bins=3)


def test_conditional_crm_removes_the_spurious_weight():
    train = _sample(jax.random.key(3), CFG, num_pairs=CFG.num_train, correlation=0.8)
    edges = jnp.zeros((1,))
    fit = jax.jit(jax.vmap(lambda lam: train_reward_model(jax.random.key(4), train, edges, CFG,
                                                          lam=lam, conditional=1.0)["w"]))
    w = np.asarray(fit(jnp.array([0.0, 1.0])))  # [2, D]: features [q, z, nuisance...]
    vanilla, crm = w[0], w[1]
    assert vanilla[1] > 0.3 * vanilla[0] > 0  # vanilla BT leans on the flag
    assert abs(crm[1]) < 0.25 * abs(vanilla[1])  # CRM drops most of it
    assert crm[0] > 0  # and keeps the quality feature
