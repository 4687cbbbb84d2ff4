"""Bradley-Terry loss, reward centering and reward metrics against float64 NumPy references."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from alignax.objectives import bradley_terry_loss, reward_accuracy, reward_centering_loss
from alignax.objectives import reward_margin

B = 6
_bt = jax.jit(lambda w, l, m: bradley_terry_loss(w, l, margin=m))


def _bt_ref(w, l, m):
    z = np.asarray(w, np.float64) - np.asarray(l, np.float64) - m
    return np.logaddexp(0.0, -z)  # -log sigmoid(z)


@given(hnp.arrays(np.float32, (2, B), elements=st.floats(-100, 100, width=32)),
       st.floats(-3, 3))
def test_bt_matches_float64_reference(x, margin):
    out = _bt(x[0], x[1], np.float32(margin))
    assert out.dtype == jnp.float32 and out.shape == (B,)
    np.testing.assert_allclose(out, _bt_ref(x[0], x[1], np.float32(margin)), rtol=1e-5,
                               atol=1e-6)


def test_bt_extremes_finite_and_grad_finite():
    w = jnp.array([80.0, -80.0, 1e4, -1e4, 0.0, 3.0])
    l = jnp.array([-80.0, 80.0, -1e4, 1e4, 0.0, 3.0])
    out = _bt(w, l, 0.0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.asarray(out)[[1, 3]], [160.0, 2e4], rtol=1e-6)
    g = jax.grad(lambda a: jnp.mean(bradley_terry_loss(a, l)))(w)
    assert np.all(np.isfinite(g))
    # d/dr_w of -log sigmoid(r_w - r_l) = -sigmoid(r_l - r_w)
    np.testing.assert_allclose(g, -jax.nn.sigmoid(l - w) / B, rtol=1e-5, atol=1e-7)


def test_bt_bf16_is_computed_in_float32():
    w = jnp.array([0.5, -1.25], jnp.bfloat16)
    l = jnp.array([0.0, 0.75], jnp.bfloat16)
    out = bradley_terry_loss(w, l)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _bt_ref([0.5, -1.25], [0.0, 0.75], 0.0), rtol=1e-6)


def test_margin_shifts_the_gap():
    w, l = jnp.array([2.0]), jnp.array([0.0])
    np.testing.assert_allclose(bradley_terry_loss(w, l, margin=2.0), [np.log(2.0)], rtol=1e-6)


def test_centering_accuracy_margin():
    w, l = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, 1.0, 0.5])
    np.testing.assert_allclose(reward_centering_loss(w, l, coefficient=0.1), [0.1, 0.1, 0.1])
    np.testing.assert_array_equal(reward_accuracy(w, l), [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(reward_margin(w, l), [1.0, -3.0, 0.0])
    with pytest.raises(ValueError, match="coefficient"):
        reward_centering_loss(w, l, coefficient=-1.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"chosen_rewards \(3,\).*rejected_rewards \(2,\)"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(2))
