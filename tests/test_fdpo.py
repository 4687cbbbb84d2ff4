"""f-DPO (eq. 2.2), IPO and NLL against float64 NumPy references, limits and stress numerics."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from alignax.objectives import fdpo_loss, ipo_loss, nll_loss

CASES = [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.3), ("alpha", 0.7)]


def np_f_prime(name, alpha, h):
    """f'(e^h) in float64 (Table 2.1)."""
    return {
        "reverse_kl": lambda: h + 1,
        "forward_kl": lambda: -np.exp(-h),
        "jsd": lambda: np.log(2.0) - np.logaddexp(0.0, -h),
        "alpha": lambda: -np.expm1(-alpha * h) / alpha,
    }[name]()


def np_f_prime_derivative(name, alpha, h):
    """d f'(e^h) / dh in float64."""
    return {
        "reverse_kl": lambda: np.ones_like(h),
        "forward_kl": lambda: np.exp(-h),
        "jsd": lambda: 1.0 / (1.0 + np.exp(h)),
        "alpha": lambda: np.exp(-alpha * h),
    }[name]()


def np_margin(name, alpha, h_w, h_l, beta):
    """z = beta (f'(u_w) - f'(u_l)) in float64."""
    return beta * (np_f_prime(name, alpha, h_w) - np_f_prime(name, alpha, h_l))


def np_fdpo(name, alpha, h_w, h_l, beta):
    """Loss and its gradients (d/dh_w, d/dh_l) of eq. 2.2 in float64."""
    z = np_margin(name, alpha, h_w, h_l, beta)
    loss = np.logaddexp(0.0, -z)
    with np.errstate(over="ignore"):  # sigmoid(-z) = e^-z / (1 + e^-z), in its stable branches
        sig = np.where(z >= 0, np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))), 1 / (1 + np.exp(z)))
    return loss, -beta * sig * np_f_prime_derivative(name, alpha, h_w), \
        beta * sig * np_f_prime_derivative(name, alpha, h_l)


_JITTED = {}


def loss_and_grads(name, alpha):
    """One jitted (loss, d/dh_w, d/dh_l) per divergence, reused by every example."""
    if (name, alpha) not in _JITTED:
        def f(h_w, h_l, beta):
            fn = lambda a, b: jnp.sum(fdpo_loss(a, b, beta=beta, divergence=name, alpha=alpha))
            return fdpo_loss(h_w, h_l, beta=beta, divergence=name, alpha=alpha), \
                *jax.grad(fn, argnums=(0, 1))(h_w, h_l)
        _JITTED[name, alpha] = jax.jit(f)
    return _JITTED[name, alpha]


# float32 cannot hold values below ~1e-38 to any relative precision (subnormals), hence atol.
RTOL, ATOL = 1e-5, 1e-33
# Where the loss saturates, loss and gradients are ~e^-z, so the few float32 roundings in z
# (relative ~ulp each) become a relative error |z| * ulp in them: the condition number of
# e^-z, a property of float32 that no formula avoids. The tolerance grows with it beyond 1e-5.
ULP32 = 2.0 ** -24


@pytest.mark.parametrize("name,alpha", CASES)
@given(h_w=st.lists(st.floats(-80, 80, width=32), min_size=8, max_size=8),
       h_l=st.lists(st.floats(-80, 80, width=32), min_size=8, max_size=8),
       beta=st.sampled_from([0.01, 0.1, 0.5, 1.0, 2.0]))
def test_matches_float64_reference(name, alpha, h_w, h_l, beta):
    h_w, h_l = np.float32(h_w), np.float32(h_l)
    loss, g_w, g_l = loss_and_grads(name, alpha)(h_w, h_l, np.float32(beta))
    # The reference sees exactly the float32 inputs the kernel sees (0.3 is not a float32).
    alpha64 = None if alpha is None else np.float64(np.float32(alpha))
    want = np_fdpo(name, alpha64, np.float64(h_w), np.float64(h_l), np.float64(np.float32(beta)))
    assert loss_and_grads(name, alpha)._cache_size() == 1  # compiled once for all examples
    z = np_margin(name, alpha64, np.float64(h_w), np.float64(h_l), np.float64(np.float32(beta)))
    rtol = np.maximum(RTOL, 8 * np.abs(z) * ULP32)
    for got, ref in zip((loss, g_w, g_l), want):
        assert got.dtype == jnp.float32
        assert np.all(np.isfinite(got))
        assert np.all(np.abs(np.float64(got) - ref) <= rtol * np.abs(ref) + ATOL), (got, ref, z)


@pytest.mark.parametrize("name,alpha", CASES)
@given(h=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=8,
                  max_size=8))
def test_no_nan_for_any_finite_input(name, alpha, h):
    h = np.float32(h)
    others = np.float32([0.0, -1e3, 1e3, -200.0, 80.0, -80.0, 89.0, -89.0])
    for h_w, h_l in ((h, others), (others, h), (h, h), (h, h[::-1])):
        loss, g_w, g_l = loss_and_grads(name, alpha)(h_w, h_l, np.float32(0.1))
        assert not np.any(np.isnan(loss)), (h_w, h_l, loss)
        assert not np.any(np.isnan(g_w)) and not np.any(np.isnan(g_l)), (h_w, h_l, g_w, g_l)
        assert np.all(np.asarray(loss) >= 0)
        finite = np.isfinite(loss)
        assert np.all(np.isfinite(g_w[finite])) or name in ("forward_kl", "alpha")


def test_inf_only_where_true_value_overflows():
    """Forward KL at h_w = -100: the true loss beta e^100 > float32 max, so inf is right."""
    loss = fdpo_loss(jnp.array([-100.0, -80.0]), jnp.array([0.0, 0.0]), beta=1.0,
                     divergence="forward_kl")
    assert np.isinf(loss[0]) and float(loss[1]) == pytest.approx(np.exp(80.0) - 1, rel=1e-5)
    # ...and where the loss saturates at 0, the gradient is an exact 0, not inf * 0.
    g = jax.grad(lambda h: fdpo_loss(h, jnp.array([-1e4]), beta=1.0,
                                     divergence="forward_kl").sum())(jnp.array([0.0]))
    assert float(g[0]) == 0.0


def test_reverse_kl_is_standard_dpo_exactly():
    """DPO as in Rafailov et al.: -log sigmoid(beta((pi_w - pi_l) - (ref_w - ref_l)))."""
    keys = jax.random.split(jax.random.key(1), 4)
    pi_w, pi_l, ref_w, ref_l = (jax.random.normal(k, (64,)) * 30 for k in keys)
    dpo = -jax.nn.log_sigmoid(0.1 * ((pi_w - ref_w) - (pi_l - ref_l)))
    ours = fdpo_loss(pi_w - ref_w, pi_l - ref_l, beta=0.1)
    np.testing.assert_array_equal(ours, dpo)


@pytest.mark.parametrize("limit,alphas", [("reverse_kl", (1e-2, 1e-3, 1e-4)),
                                          ("forward_kl", (1 - 1e-2, 1 - 1e-3, 1 - 1e-4))])
def test_alpha_limits(limit, alphas):
    """alpha -> 0 gives reverse KL and alpha -> 1 forward KL, with error O(alpha) / O(1-alpha)."""
    keys = jax.random.split(jax.random.key(2))
    h_w, h_l = (jax.random.normal(k, (256,)) * 2 for k in keys)
    target = fdpo_loss(h_w, h_l, beta=0.5, divergence=limit)
    errs = [float(jnp.max(jnp.abs(fdpo_loss(h_w, h_l, beta=0.5, divergence="alpha", alpha=a)
                                  - target))) for a in alphas]
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5  # linear convergence


@pytest.mark.parametrize("name,alpha", CASES)
def test_bf16_inputs_compute_in_float32(name, alpha):
    h_w = jnp.linspace(-5, 5, 16, dtype=jnp.bfloat16)
    h_l = h_w[::-1]
    out = fdpo_loss(h_w, h_l, beta=0.3, divergence=name, alpha=alpha)
    assert out.dtype == jnp.float32
    ref = fdpo_loss(h_w.astype(jnp.float32), h_l.astype(jnp.float32), beta=0.3,
                    divergence=name, alpha=alpha)
    np.testing.assert_array_equal(out, ref)
    g = jax.grad(lambda a: fdpo_loss(a, h_l, beta=0.3, divergence=name, alpha=alpha).sum())(h_w)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.float32(g)))


def test_vmap_over_beta_and_alpha():
    h_w, h_l = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0])
    betas, alphas = jnp.array([0.1, 1.0]), jnp.array([0.2, 0.8])
    out = jax.vmap(lambda b, a: fdpo_loss(h_w, h_l, beta=b, divergence="alpha", alpha=a))(betas, alphas)
    for i in range(2):
        want = np_fdpo("alpha", float(alphas[i]), np.float64(h_w), np.float64(h_l), float(betas[i]))[0]
        np.testing.assert_allclose(out[i], want, rtol=1e-5)


def test_second_order_derivatives_are_finite():
    """The custom JVP of the power divergences supports jax.hessian (Newton-type optimisers)."""
    hess = jax.hessian(lambda h: fdpo_loss(h[:1], h[1:], beta=0.5, divergence="forward_kl").sum())
    np.testing.assert_allclose(hess(jnp.array([0.3, -0.2])), hess(jnp.array([0.3, -0.2])).T)
    assert np.all(np.isfinite(hess(jnp.array([0.3, -0.2]))))


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="total_variation"), "Theorem 1"),
    (dict(divergence="chi_squared"), "Theorem 1"),
    (dict(divergence="alpha", alpha=1.5), "1.5"),
    (dict(divergence="hellinger"), "hellinger"),
    (dict(beta=0.0), "beta must be > 0"),
])
def test_bad_arguments(kwargs, match):
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        fdpo_loss(jnp.zeros(3), jnp.zeros(3), **kwargs)


def test_shape_mismatch_names_both():
    with pytest.raises(ValueError, match=r"chosen_h \(3,\).*rejected_h \(4,\)"):
        fdpo_loss(jnp.zeros(3), jnp.zeros(4), beta=0.1)


def test_ipo_matches_reference_and_grad():
    h_w = np.float32([0.0, 1.0, -80.0, 80.0])
    h_l = np.float32([0.0, -1.0, 80.0, -80.0])
    want = (np.float64(h_w) - np.float64(h_l) - 1 / (2 * 0.25)) ** 2
    np.testing.assert_allclose(jax.jit(lambda a, b: ipo_loss(a, b, tau=0.25))(h_w, h_l), want, rtol=1e-6)
    g = jax.grad(lambda a: ipo_loss(a, h_l, tau=0.25).sum())(h_w)
    np.testing.assert_allclose(g, 2 * (np.float64(h_w) - h_l - 2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="tau"):
        ipo_loss(h_w, h_l, tau=-1.0)


def test_nll_mean_over_response_tokens_and_empty_mask():
    logps = jnp.array([[-1.0, -2.0, -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    out = nll_loss(logps, mask)
    np.testing.assert_allclose(out, [1.5, 0.0])
    g = jax.grad(lambda x: nll_loss(x, mask).sum())(logps)
    np.testing.assert_allclose(g, [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    assert nll_loss(logps.astype(jnp.bfloat16), mask).dtype == jnp.float32


# ----------------------------------------------------------------- issue 16 reproductions
def test_forward_kl_loss_is_finite_wherever_its_true_value_is():
    """beta (e^89 - e^39.28) = 4.49e35 although e^89 alone exceeds float32 (was inf)."""
    loss = fdpo_loss(jnp.array([-89.0]), jnp.array([-39.28]), beta=1e-3, divergence="forward_kl")
    h_l = np.float64(np.float32(-39.28))
    want = 1e-3 * (np.exp(89.0) - np.exp(-h_l))  # beta (f'(u_l) - f'(u_w)), float64
    np.testing.assert_allclose(loss, [want], rtol=8 * 89 * 2.0**-24)  # exp's condition: |h| eps


def test_forward_kl_and_alpha_gradients_overflow_exactly_where_the_true_ones_do():
    """At a tie h_w = h_l = h (loss log 2) the true derivative is -/+ beta e^(-c h) / 2. It is
    finite (and returned to float32 accuracy) down to the h where it exceeds float32 max,
    h* = -(log(2 max) - log beta) / c, and +/-inf beyond; never NaN."""
    f32_max = float(np.finfo(np.float32).max)
    for divergence, alpha, c in (("forward_kl", None, 1.0), ("alpha", 0.5, 0.5)):
        for beta in (1.0, 1e-3):
            boundary = -(np.log(2 * f32_max) - np.log(beta)) / c
            for h in (boundary + 0.2, boundary - 0.2, -1e4):
                h32 = np.float32(h)
                grads = jax.grad(lambda a, b: fdpo_loss(a, b, beta=beta, divergence=divergence,
                                                        alpha=alpha).sum(), (0, 1))(
                    jnp.array([h32]), jnp.array([h32]))
                with np.errstate(over="ignore"):
                    true = beta * np.exp(-c * np.float64(h32)) / 2
                if true > f32_max:
                    assert float(grads[0][0]) == -np.inf and float(grads[1][0]) == np.inf
                else:  # e^(-c h) at a float32-rounded exponent: c |h| eps relative
                    rtol = 8 * (1 + c * abs(h)) * 2.0**-24
                    np.testing.assert_allclose([grads[0][0], grads[1][0]], [-true, true],
                                               rtol=rtol)


def test_reverse_kl_is_finite_where_h_w_minus_h_l_overflows():
    """beta (h_w - h_l) = 0.1 * 6e38 = 6e37 is a float32 number although 6e38 is not (was inf)."""
    loss = fdpo_loss(jnp.array([-3e38]), jnp.array([3e38]), beta=0.1)
    np.testing.assert_allclose(loss, [0.1 * 6e38], rtol=1e-6)
    g = jax.grad(lambda a: fdpo_loss(a, jnp.array([3e38]), beta=0.1).sum())(jnp.array([-3e38]))
    np.testing.assert_allclose(g, [-0.1], rtol=1e-6)
