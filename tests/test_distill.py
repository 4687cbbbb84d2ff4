"""Unit tests of the distillation objectives (004 eq. 7, 11, 13) against float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from alignax.objectives import distill_loss, pessimistic_distill_loss, pessimistic_dpo_loss
from alignax.objectives.distill import forward_kl_estimate

B, E = 6, 3
_finite = st.floats(-30.0, 30.0, allow_nan=False, width=32)
_vec = hnp.arrays(np.float32, (B,), elements=_finite)
_mat = hnp.arrays(np.float32, (E, B), elements=_finite)

distill_jit = jax.jit(distill_loss, static_argnames=("divergence",))
pessimistic_jit = jax.jit(pessimistic_distill_loss, static_argnames=("divergence",))
pdpo_jit = jax.jit(pessimistic_dpo_loss, static_argnames=("divergence",))


def _ref_distill(h1, h2, r1, r2, beta):
    h1, h2, r1, r2 = (np.asarray(v, np.float64) for v in (h1, h2, r1, r2))
    return (r1 - r2 - beta * (h1 - h2)) ** 2  # 004 eq. 7


def _ref_pessimistic(h1, h2, r1, r2, beta, gamma, reference_h):
    per_member = _ref_distill(h1[None], h2[None], r1, r2, beta).mean(axis=1)  # [E]
    return per_member.min() + gamma * np.mean(-np.asarray(reference_h, np.float64)), per_member


def _softplus64(x):
    return np.logaddexp(0.0, x)


@given(_vec, _vec, _vec, _vec, st.sampled_from([0.01, 0.5, 3.0]))
def test_distill_matches_float64_reference(h1, h2, r1, r2, beta):
    got = distill_jit(h1, h2, r1, r2, beta=beta)
    assert got.dtype == jnp.float32 and got.shape == (B,)
    np.testing.assert_allclose(got, _ref_distill(h1, h2, r1, r2, beta), rtol=2e-5, atol=2e-4)


@given(_vec, _vec, _mat, _mat, _vec, st.sampled_from([0.1, 2.0]), st.sampled_from([0.0, 1e-2, 1.0]))
def test_pessimistic_distill_matches_float64_reference(h1, h2, r1, r2, ref_h, beta, gamma):
    loss, aux = pessimistic_jit(h1, h2, r1, r2, beta=beta, gamma=gamma, reference_h=ref_h)
    want, per_member = _ref_pessimistic(h1, h2, r1, r2, beta, gamma, ref_h)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-3)
    np.testing.assert_allclose(aux["member_losses"], per_member, rtol=2e-5, atol=2e-3)
    assert aux["member_losses"][aux["member"]] == jnp.min(aux["member_losses"])
    per_example = _ref_distill(h1[None], h2[None], r1, r2, beta)  # [E, B]
    chosen = per_example[np.asarray(aux["per_example_member"]), np.arange(B)]
    np.testing.assert_allclose(chosen, per_example.min(axis=0), rtol=1e-4, atol=1e-2)


def test_pessimistic_default_reference_uses_pair_completions():
    key = jax.random.split(jax.random.key(0), 4)
    h1, h2 = jax.random.normal(key[0], (B,)), jax.random.normal(key[1], (B,))
    r1, r2 = jax.random.normal(key[2], (E, B)), jax.random.normal(key[3], (E, B))
    loss, aux = pessimistic_jit(h1, h2, r1, r2, beta=0.5, gamma=0.3)
    want, _ = _ref_pessimistic(h1, h2, r1, r2, 0.5, 0.3, np.concatenate([h1, h2]))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["forward_kl"], -np.mean(np.concatenate([h1, h2])), rtol=1e-5)


def test_single_reward_model_is_pd_dpo():
    """target rewards [B] = a confidence set of one member (pd-DPO): min over E=1 is the mean."""
    h1, h2, r1, r2 = (jnp.linspace(-1.0, 1.0, B) * s for s in (1.0, -0.5, 2.0, 0.3))
    loss, aux = pessimistic_jit(h1, h2, r1, r2, beta=0.7, gamma=0.0)
    np.testing.assert_allclose(loss, jnp.mean(distill_jit(h1, h2, r1, r2, beta=0.7)), rtol=1e-6)
    assert aux["member"] == 0 and aux["member_losses"].shape == (1,)


@given(_vec, _vec, st.sampled_from([0.1, 1.0]), st.sampled_from([0.0, 0.05, 2.0]))
def test_pessimistic_dpo_matches_float64_reference(hw, hl, beta, gamma):
    got = pdpo_jit(hw, hl, beta=beta, gamma=gamma)
    hw64, hl64 = np.asarray(hw, np.float64), np.asarray(hl, np.float64)
    want = _softplus64(-beta * (hw64 - hl64)) + gamma * (-(hw64 + hl64) / 2)  # 004 eq. 13
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_pessimistic_dpo_reference_samples_and_divergence():
    hw, hl = jnp.array([0.5, -1.0]), jnp.array([0.0, 2.0])
    ref_h = jnp.array([[1.0, -3.0, 0.5], [0.0, 0.2, -0.2]])  # [B, K]
    got = pdpo_jit(hw, hl, beta=1.0, gamma=0.5, reference_h=ref_h, divergence="jsd")
    from alignax.objectives import fdpo_loss
    want = fdpo_loss(hw, hl, beta=1.0, divergence="jsd") + 0.5 * -jnp.mean(ref_h, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_f_distill_uses_f_prime_difference():
    from alignax.divergences import get_divergence
    h1, h2 = jnp.array([0.3, -2.0, 5.0]), jnp.array([-0.1, 1.0, 4.0])
    r1, r2 = jnp.array([1.0, 0.0, -1.0]), jnp.zeros(3)
    for name, alpha in (("forward_kl", None), ("jsd", None), ("alpha", 0.3)):
        div = get_divergence(name, alpha=alpha)
        want = (r1 - r2 - 0.5 * (div.f_prime(h1) - div.f_prime(h2))) ** 2
        got = distill_loss(h1, h2, r1, r2, beta=0.5, divergence=name, alpha=alpha)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_grad_matches_float64_finite_differences():
    h1, h2 = jnp.array([0.4, -1.2, 2.0]), jnp.array([0.1, 0.3, -0.5])
    r1, r2 = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.5]]), jnp.zeros((2, 3))

    def loss(h):
        return pessimistic_distill_loss(h, h2, r1, r2, beta=0.8, gamma=0.1)[0]

    def ref(h):
        return _ref_pessimistic(h, h2, r1, r2, 0.8, 0.1, np.concatenate([h, h2]))[0]

    grad = jax.jit(jax.grad(loss))(h1)
    eps, h64 = 1e-6, np.asarray(h1, np.float64)
    fd = [(ref(h64 + eps * np.eye(3)[i]) - ref(h64 - eps * np.eye(3)[i])) / (2 * eps)
          for i in range(3)]
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-4)
    g_dpo = jax.grad(lambda h: jnp.sum(pessimistic_dpo_loss(h, h2, beta=0.8, gamma=0.1)))(h1)
    want = -0.8 * jax.nn.sigmoid(-0.8 * (h1 - h2)) - 0.05
    np.testing.assert_allclose(g_dpo, want, rtol=1e-5)


def test_vmap_over_beta_and_batch_matches_loop():
    key = jax.random.split(jax.random.key(1), 4)
    h1, h2 = jax.random.normal(key[0], (4, B)), jax.random.normal(key[1], (4, B))
    r1, r2 = jax.random.normal(key[2], (4, E, B)), jax.random.normal(key[3], (4, E, B))
    betas = jnp.array([0.1, 0.5, 1.0, 2.0])
    fn = jax.vmap(lambda a, b, c, d, beta: pessimistic_distill_loss(a, b, c, d, beta=beta,
                                                                    gamma=0.1)[0])
    got = jax.jit(fn)(h1, h2, r1, r2, betas)
    want = [pessimistic_jit(h1[i], h2[i], r1[i], r2[i], beta=betas[i], gamma=0.1)[0]
            for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bf16_inputs_compute_in_float32():
    h1, h2 = jnp.array([0.5, -1.0], jnp.bfloat16), jnp.array([0.25, 2.0], jnp.bfloat16)
    r = jnp.array([[1.0, 0.0]], jnp.bfloat16)
    out = distill_jit(h1, h2, r[0], r[0] * 0, beta=0.5)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _ref_distill(h1.astype(np.float32), h2.astype(np.float32),
                                                 [1.0, 0.0], [0.0, 0.0], 0.5), rtol=1e-6)
    loss, _ = pessimistic_jit(h1, h2, r, r * 0, beta=0.5, gamma=0.1)
    assert loss.dtype == jnp.float32
    assert pdpo_jit(h1, h2, beta=0.5, gamma=0.1).dtype == jnp.float32


@jax.jit
def _extreme_outputs(h1, h2, r):
    out = {}
    for name in ("reverse_kl", "forward_kl", "jsd"):
        def total(h, name=name):
            return jnp.sum(distill_loss(h, h2, r, r * 0, beta=1.0, divergence=name))
        out[name] = (distill_loss(h1, h2, r, r * 0, beta=1.0, divergence=name),
                     jax.grad(total)(h1))
    out["pessimistic"] = pessimistic_distill_loss(h1, h2, r[None], r[None] * 0, beta=1.0,
                                                  gamma=0.1)[0]
    out["pdpo"] = (pessimistic_dpo_loss(h1, h2, beta=1.0, gamma=0.1),
                   jax.grad(lambda h: jnp.sum(pessimistic_dpo_loss(h, h2, beta=1.0,
                                                                   gamma=0.1)))(h1))
    return out


@pytest.mark.parametrize("scale", [80.0, 1e4, 1e30])
def test_extreme_log_ratios_finite_or_inf_never_nan(scale):
    h1 = jnp.array([scale, -scale, scale, 0.0])
    h2 = jnp.array([-scale, scale, scale, -scale])
    out = _extreme_outputs(h1, h2, jnp.array([1.0, -1.0, 0.0, 3.0]))
    for name in ("reverse_kl", "forward_kl", "jsd"):
        loss, grad = out[name]
        assert not jnp.any(jnp.isnan(loss)), name
        assert jnp.all(jnp.isfinite(grad) | ~jnp.isfinite(loss)), name
    assert not jnp.isnan(out["pessimistic"])
    assert not jnp.any(jnp.isnan(out["pdpo"][0])) and jnp.all(jnp.isfinite(out["pdpo"][1]))


def test_reverse_kl_at_80_matches_float64():
    h1, h2 = jnp.array([80.0, -80.0]), jnp.array([-80.0, 80.0])
    r = jnp.array([2.0, -1.0])
    np.testing.assert_allclose(distill_loss(h1, h2, r, r * 0, beta=0.1),
                               _ref_distill(h1, h2, r, r * 0, 0.1), rtol=1e-6)


def test_where_masks_padded_examples_without_nan():
    h1 = jnp.array([0.5, jnp.nan, -jnp.inf, 1.0])
    h2 = jnp.array([0.0, 1.0, jnp.inf, 0.0])
    r1, r2 = jnp.array([[1.0, jnp.nan, 0.0, 0.0]]), jnp.zeros((1, 4))
    where = jnp.array([True, False, False, True])
    out = distill_jit(h1, h2, r1[0], r2[0], beta=1.0, where=where)
    np.testing.assert_allclose(out, [0.25, 0.0, 0.0, 1.0])
    loss, aux = pessimistic_jit(h1, h2, r1, r2, beta=1.0, gamma=0.5, where=where)
    np.testing.assert_allclose(loss, (0.25 + 1.0) / 2 + 0.5 * -(0.5 + 1.0) / 4, rtol=1e-6)
    np.testing.assert_array_equal(aux["per_example_member"], [0, -1, -1, 0])
    grad = jax.jit(jax.grad(lambda h: pessimistic_distill_loss(h, h2, r1, r2, beta=1.0, gamma=0.5,
                                                               where=where)[0]))(h1)
    assert jnp.all(jnp.isfinite(grad)) and grad[1] == 0.0 and grad[2] == 0.0
    pd = pdpo_jit(h1, h2, beta=1.0, gamma=0.5, where=where)
    assert jnp.all(jnp.isfinite(pd)) and pd[1] == 0.0


def test_empty_mask_gives_zero_not_nan():
    z, none = jnp.zeros(3), jnp.zeros(3, bool)
    loss, aux = pessimistic_jit(z, z, jnp.ones((2, 3)), jnp.zeros((2, 3)), beta=1.0, gamma=1.0,
                                where=none)
    assert loss == 0.0 and jnp.all(aux["member_losses"] == 0.0)
    assert jax.jit(forward_kl_estimate)(z, where=none) == 0.0
    grad = jax.jit(jax.grad(lambda h: pessimistic_distill_loss(
        h, z, jnp.ones((2, 3)), jnp.zeros((2, 3)), beta=1.0, gamma=1.0, where=none)[0]))(z)
    np.testing.assert_array_equal(grad, 0.0)


def test_gradient_flows_through_argmin_member_only():
    h1, h2 = jnp.zeros(2), jnp.zeros(2)
    r1 = jnp.array([[1.0, 1.0], [3.0, 3.0]])  # member 0 fits better at h = 0
    grad = jax.jit(jax.grad(lambda h: pessimistic_distill_loss(h, h2, r1, jnp.zeros((2, 2)),
                                                               beta=1.0, gamma=0.0)[0]))(h1)
    np.testing.assert_allclose(grad, [-1.0, -1.0])  # d/dh mean (1 - h)^2 = -(1 - h) at h = 0


def test_bad_inputs_raise_value_error():
    v = jnp.zeros(3)
    with pytest.raises(ValueError, match="shape mismatch"):
        distill_loss(v, jnp.zeros(4), v, v, beta=1.0)
    with pytest.raises(ValueError, match="rank 1"):
        distill_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                     beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(v, v, v, v, beta=0.0)
    with pytest.raises(ValueError, match="chi_squared"):
        distill_loss(v, v, v, v, beta=1.0, divergence="chi_squared")
    with pytest.raises(ValueError, match=r"\[E, B\]"):
        pessimistic_distill_loss(v, v, jnp.zeros((2, 4)), jnp.zeros((2, 4)), beta=1.0, gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        pessimistic_distill_loss(v, v, jnp.zeros((2, 3)), jnp.zeros((2, 3)), beta=1.0, gamma=-1.0)
    with pytest.raises(ValueError, match="where"):
        pessimistic_distill_loss(v, v, jnp.zeros((2, 3)), jnp.zeros((2, 3)), beta=1.0, gamma=0.1,
                                 where=jnp.ones(4, bool))
    with pytest.raises(ValueError, match="reference_h"):
        pessimistic_dpo_loss(v, v, beta=1.0, gamma=0.1, reference_h=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="gamma"):
        pessimistic_dpo_loss(v, v, beta=1.0, gamma=-0.1)


# ---------------------------------------------------------------- issue 16 reproductions
@pytest.mark.parametrize("divergence,alpha", [("forward_kl", None), ("alpha", 0.5),
                                              ("reverse_kl", None), ("jsd", None)])
def test_zero_loss_has_zero_gradient_at_any_h(divergence, alpha):
    """h_1 = h_2 = -100 with zero rewards: loss 0, gradient 0 (forward KL / alpha gave NaN,
    2 * 0 * e^100 in autodiff), in d-DPO and in the pessimistic distillation."""
    h = jnp.array([-100.0, -3e38])
    z = jnp.zeros(2)
    kw = dict(beta=1.0, divergence=divergence, alpha=alpha)
    g = jax.grad(lambda a: jnp.sum(distill_loss(a, h, z, z, **kw)))(h)
    np.testing.assert_array_equal(g, [0.0, 0.0])
    g = jax.grad(lambda a: pessimistic_distill_loss(a, h, z[None], z[None], gamma=0.0, **kw)[0])(h)
    np.testing.assert_array_equal(g, [0.0, 0.0])


def test_extreme_finite_inputs_give_inf_not_nan():
    """distill_loss([1e38], [-3e38], [3e38], [-3e38], beta=1): r_1 - r_2 and h_1 - h_2 both
    overflow; the residual 2e38 does not, its square does: inf (was NaN, inf - inf). The
    gradient 2 residual (-beta) = -4e38 overflows too; d/dr_1 = 4e38 likewise."""
    args = [jnp.array([v]) for v in (1e38, -3e38, 3e38, -3e38)]
    value, grads = jax.value_and_grad(lambda *a: jnp.sum(distill_loss(*a, beta=1.0)),
                                      (0, 1, 2, 3))(*args)
    assert float(value) == np.inf
    np.testing.assert_array_equal(np.concatenate(grads), [-np.inf, np.inf, np.inf, -np.inf])
    # beta = 0.1: residual 6e38 - 4e37 ... the gradient 2 * 5.6e38 * 0.1 = 1.12e38 is finite
    g = jax.grad(lambda a: jnp.sum(distill_loss(a, args[1], args[2], args[3], beta=0.1)))(args[0])
    np.testing.assert_allclose(g, [-2 * 0.1 * (6e38 - 0.1 * 4e38)], rtol=1e-6)


def test_pessimistic_dpo_penalty_of_two_float32_maxima_under_jit():
    """-(h_w + h_l)/2 at h_w = h_l = 3e38 is -3e38; formed as 0.5 h_w + 0.5 h_l, XLA rewrote it
    as 0.5 (h_w + h_l) = -inf under jit, so gamma = 0 gave NaN (0 * inf) and gamma = 0.1 gave
    -inf instead of log 2 - 3e37 (found by test_pessimistic_dpo_matches_mpmath)."""
    h = jnp.array([0.0, 0.0, 3e38])
    for gamma, want in ((0.0, np.log(2.0)), (0.1, np.log(2.0) - 0.1 * 3e38)):
        for where in (None, jnp.array([True, False, True])):
            run = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(pessimistic_dpo_loss(
                a, b, beta=1e-3, gamma=gamma, where=where)[2:]), (0, 1)))
            value, grads = run(h, h)
            np.testing.assert_allclose(value, want, rtol=1e-6)
            # the tie's DPO gradient is -/+ beta/2; the penalty adds -gamma/2 to each
            np.testing.assert_allclose(np.stack(grads)[:, 2], [-5e-4 - gamma / 2,
                                                               5e-4 - gamma / 2], rtol=1e-6)


def test_pessimistic_terms_beyond_float32_of_opposite_sign_give_their_true_sign():
    """distill (beyond float32) + gamma * forward KL (below -float32 max): inf - inf was NaN;
    the sum is formed at a smaller scale instead. Likewise p-DPO. Gradients are never NaN."""
    h, big = jnp.array([3e38]), jnp.array([[3e38]])
    loss, aux = pessimistic_distill_loss(h, h, big, -big, beta=1.0, gamma=10.0)
    assert float(aux["distill"]) == np.inf and aux["forward_kl"] == np.float32(-3e38)
    assert float(loss) == np.inf  # 3.6e77 - 3e39
    # p-DPO: dpo = 4e38 (beyond), gamma * penalty = -1e39 -> the sum -6e38 is beyond, negative
    h_w, h_l = jnp.array([-1e38]), jnp.array([3e38])
    assert float(pessimistic_dpo_loss(h_w, h_l, beta=1.0, gamma=10.0)[0]) == -np.inf
    assert float(pessimistic_dpo_loss(h_w, h_l, beta=10.0, gamma=10.0)[0]) == np.inf
    g = jax.grad(lambda a: pessimistic_dpo_loss(a, h_l, beta=1.0, gamma=10.0).sum())(h_w)
    np.testing.assert_allclose(g, [-1.0 - 5.0], rtol=1e-6)


def test_argmin_member_among_members_beyond_float32():
    """Two members whose batch losses both exceed float32 (1.2e77 and 3e76): the arg-min is
    decided on their logarithms, and the gradient is the smaller member's alone (through a
    plain min, the other member's infinite derivative times a 0 cotangent gave NaN)."""
    z = jnp.zeros(3)
    r_1 = jnp.array([[0.0, 0.0, -3e38], [0.0, 0.0, 3e38]])
    r_2 = jnp.array([[0.0, 0.0, 3e38], [0.0, 0.0, 0.0]])
    (loss, aux), g = jax.value_and_grad(
        lambda a: pessimistic_distill_loss(a, z, r_1, r_2, beta=1.0, gamma=0.0), has_aux=True)(z)
    assert int(aux["member"]) == 1 and float(loss) == np.inf
    np.testing.assert_allclose(g, [0.0, 0.0, -2 * 3e38 / 3], rtol=1e-6)  # 2 w residual (-beta)


def test_forward_kl_estimate_at_the_largest_float32_is_finite():
    """mean(-h) of h = float32 max is -float32 max; summing the terms / 6 rounded past it to
    -inf, and gamma = 0 times -inf was NaN."""
    h = jnp.full((3,), np.finfo(np.float32).max)
    assert float(forward_kl_estimate(jnp.stack([h, h]))) == -np.finfo(np.float32).max
    loss, _ = pessimistic_distill_loss(h, h, jnp.zeros((1, 3)), jnp.zeros((1, 3)), beta=1e-3,
                                       gamma=0.0, divergence="alpha", alpha=0.3)
    assert float(loss) == 0.0
