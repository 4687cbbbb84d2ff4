"""The length-bias study machinery of alignax.toy.distill (004 §4.1) at tiny sizes."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.objectives import distill_loss
from alignax.toy import distill as toy

CONFIG = toy.StudyConfig(num_prompts=24, train_prompts=8, val_prompts=8, num_responses=6,
                         num_features=4, num_pairs=64, reward_steps=100, policy_steps=40,
                         batch_size=8)
RHOS = jnp.array([0.2, 0.5, 0.8])


@jax.jit
def _prepare(key):
    return jax.vmap(partial(toy.prepare_study, config=CONFIG), in_axes=(None, 0))(key, RHOS)


@pytest.fixture(scope="module")
def prepared():
    return _prepare(jax.random.key(0))


def test_preferences_realise_rho_with_oracle_labels(prepared):
    world, prefs, _ = prepared
    n = CONFIG.num_pairs
    np.testing.assert_array_equal(prefs.num_longer_chosen, np.round(np.asarray(RHOS) * n))
    for i in range(len(RHOS)):
        w = jax.tree.map(lambda x: x[i], world)
        p = jax.tree.map(lambda x: x[i], prefs)
        assert p.longer_chosen.mean() == pytest.approx(float(RHOS[i]), abs=1 / n)
        np.testing.assert_array_equal(p.longer_chosen[:p.num_longer_chosen], True)
        assert np.all(w.oracle[p.prompt, p.chosen] > w.oracle[p.prompt, p.rejected])
        long_len = np.maximum(w.lengths[p.prompt, p.chosen], w.lengths[p.prompt, p.rejected])
        short_len = np.minimum(w.lengths[p.prompt, p.chosen], w.lengths[p.prompt, p.rejected])
        assert np.all(long_len >= 1.1 * short_len)
        assert np.all(p.prompt < CONFIG.train_prompts)


@pytest.mark.parametrize("num_long", [20, 50, 64])
def test_ensemble_masks_have_fraction_b_and_maximal_size(num_long):
    n = 100
    masks = np.asarray(jax.jit(toy.ensemble_masks, static_argnums=1)(num_long, n))
    assert masks.shape == (1 + len(toy.ENSEMBLE_BIASES), n) and np.all(masks[0] == 1)
    longer = np.arange(n) < num_long
    for b, mask in zip(toy.ENSEMBLE_BIASES, masks[1:]):
        m = int(np.floor(min(num_long / b, (n - num_long) / (1 - b))))
        assert mask.sum() == m
        if m:
            assert abs(mask[longer].sum() / m - b) <= 0.5 / m + 1e-9


def test_reward_ensemble_is_one_vmapped_step_over_independent_members(prepared):
    """Member e of the stacked training equals training masks[e] alone, and the learned
    length weight rises with the members' fraction b of longer-preferred pairs."""
    world, prefs, params = prepared
    w, p = (jax.tree.map(lambda x: x[1], t) for t in (world, prefs))
    masks = toy.ensemble_masks(p.num_longer_chosen, CONFIG.num_pairs)
    single = jax.jit(partial(toy.train_reward_models, num_steps=CONFIG.reward_steps))(
        w, p, masks[3:4])
    np.testing.assert_allclose(single[0], params[1, 3], rtol=1e-5, atol=1e-6)
    length_weight = np.asarray(params[:, 1:, -1])  # [R, B]
    assert np.all(np.diff(length_weight, axis=1) > 0)


@pytest.mark.parametrize("method", ["dpo", "e-dpo"])
def test_evaluate_method_vmapped_over_hypers(prepared, method):
    world, prefs, params = (jax.tree.map(lambda x: x[0], t) for t in prepared)
    hypers = toy.Hyper(beta=jnp.array([0.1, 1.0]), tau=jnp.ones(2), gamma_scale=jnp.ones(2))
    out = jax.jit(partial(toy.evaluate_method, method, config=CONFIG))(
        jax.random.key(1), world, prefs, params, hypers)
    assert out["val"].shape == (2,) and np.all(np.isfinite(out["test"]))
    assert out["val"][0] != out["val"][1]  # beta is traced through training, not ignored
    assert out["members"].shape == (2, CONFIG.num_pairs)
    assert np.all((out["members"] >= 0) & (out["members"] < len(toy.ENSEMBLE_BIASES)))


def test_best_member_per_example_is_the_distillation_argmin(prepared):
    world, prefs, params = (jax.tree.map(lambda x: x[2], t) for t in prepared)
    theta = jnp.linspace(-1.0, 1.0, CONFIG.num_features)
    got = jax.jit(partial(toy.best_member_per_example, beta=0.5))(theta, world, prefs, params)
    logp = toy.policy_logprobs(theta, world, prefs.prompt)
    h = logp - world.ref_logprobs[prefs.prompt]
    rows = np.arange(CONFIG.num_pairs)
    losses = [distill_loss(h[rows, prefs.chosen], h[rows, prefs.rejected],
                           world.features[prefs.prompt, prefs.chosen] @ params[e],
                           world.features[prefs.prompt, prefs.rejected] @ params[e], beta=0.5)
              for e in range(1, params.shape[0])]
    np.testing.assert_array_equal(got, np.argmin(np.stack(losses), axis=0))


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown method"):
        toy.train_policy("kto", jax.random.key(0), None, None, None, None, num_steps=1,
                         batch_size=1)


def test_bootstrap_interval_brackets_the_mean():
    values = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    mean, lo, hi = jax.jit(toy.bootstrap_interval)(values, jax.random.key(0))
    np.testing.assert_allclose(mean, [2.5, 5.0])
    assert lo[0] < 2.5 < hi[0] and lo[0] >= 1.0 and hi[0] <= 4.0
    np.testing.assert_allclose([lo[1], hi[1]], [5.0, 5.0])
