"""Multi-sample Diffusion-DPO (thesis §3.6.2): K = L = 1 is Diffusion-DPO (Wallace et al.)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.objectives import denoising_error, diffusion_mdpo_loss, mdpo_loss

B = 5


def wallace_diffusion_dpo64(ew_model, ew_ref, el_model, el_ref, beta, weight):
    """Diffusion-DPO (Wallace et al., 2023, eq. 14) in float64, one sample per side."""
    z = -beta * weight * ((ew_model - ew_ref) - (el_model - el_ref))
    return np.logaddexp(0.0, -z)


_LOSS = jax.jit(lambda a, b, c, d, w, mw, ml: diffusion_mdpo_loss(
    a, b, c, d, beta=2.0, weight=w, chosen_mask=mw, rejected_mask=ml))


def _errors(seed, k, l):
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.0, s).astype(np.float32) for s in ((B, k), (B, k), (B, l), (B, l))]


def test_single_sample_is_diffusion_dpo():
    a, b, c, d = _errors(0, 1, 1)
    w = np.random.default_rng(1).uniform(0.1, 3.0, B).astype(np.float32)
    got = _LOSS(a, b, c, d, w, np.ones((B, 1), bool), np.ones((B, 1), bool))
    want = wallace_diffusion_dpo64(*(x[:, 0].astype(np.float64) for x in (a, b, c, d)), 2.0, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_groups_match_float64_reference_and_mdpo():
    a, b, c, d = _errors(2, 6, 4)
    rng = np.random.default_rng(3)
    mw, ml = rng.random((B, 6)) < 0.7, rng.random((B, 4)) < 0.7
    mw[:, 0] = ml[:, 0] = True
    w = np.float32(1.7)
    got = _LOSS(a, b, c, d, jnp.full((B,), w), mw, ml)
    for i in range(B):
        rw = (a[i] - b[i]).astype(np.float64)[mw[i]].mean()
        rl = (c[i] - d[i]).astype(np.float64)[ml[i]].mean()
        np.testing.assert_allclose(got[i], np.logaddexp(0.0, 2.0 * w * (rw - rl)), rtol=1e-5)
    as_mdpo = mdpo_loss(-w * (a - b), -w * (c - d), beta=2.0, chosen_mask=mw, rejected_mask=ml)
    np.testing.assert_allclose(got, as_mdpo, rtol=1e-6)


def test_padding_and_gradients():
    a, b, c, d = _errors(4, 6, 6)
    mask = np.ones((B, 6), bool)
    mask[:, 3:] = False
    dirty = [np.where(mask, x, np.inf).astype(np.float32) for x in (a, b, c, d)]
    w = jnp.ones((B,))
    np.testing.assert_array_equal(_LOSS(*dirty, w, mask, mask), _LOSS(a, b, c, d, w, mask, mask))
    grads = jax.grad(lambda *x: jnp.sum(_LOSS(*x, w, mask, mask)), argnums=(0, 2))(*dirty)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)
    # lowering the model's error on chosen samples lowers the loss (a cost, hence -beta)
    g_chosen = jax.grad(lambda x: jnp.sum(_LOSS(x, b, c, d, w, mask, mask)))(a)
    assert np.all(np.asarray(g_chosen)[mask] > 0)


def test_sft_term_composes():
    a, b, c, d = _errors(5, 6, 6)
    ones = np.ones((B, 6), bool)
    w = jnp.ones((B,))
    total = jax.grad(lambda x: jnp.mean(_LOSS(x, b, c, d, w, ones, ones) + 0.5 * jnp.mean(x, -1)))(a)
    alone = jax.grad(lambda x: jnp.mean(_LOSS(x, b, c, d, w, ones, ones)))(a)
    np.testing.assert_allclose(total - alone, 0.5 / (B * 6), rtol=1e-5)


def test_denoising_error_and_bad_shapes():
    rng = np.random.default_rng(0)
    eps, pred = rng.normal(size=(2, B, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(denoising_error(eps, pred),
                               ((eps.astype(np.float64) - pred) ** 2).sum((2, 3)), rtol=1e-5)
    with pytest.raises(ValueError):
        denoising_error(eps, pred[:, :2])
    with pytest.raises(ValueError):
        diffusion_mdpo_loss(eps[..., 0, 0], eps[..., 0, 0], eps[..., 0, 0], eps[:, :2, 0, 0], beta=1.0)
    with pytest.raises(ValueError):
        diffusion_mdpo_loss(*([eps[..., 0, 0]] * 4), beta=1.0, weight=jnp.ones(B + 1))
