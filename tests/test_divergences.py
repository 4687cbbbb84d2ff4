"""Table 2.1: f, f', (f')^-1 and f-divergence values against float64 NumPy references."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from hypothesis import given

from alignax.divergences import (ADMISSIBLE, INADMISSIBLE, f_divergence, f_divergence_estimator,
                                 f_prime, get_divergence)

CASES = [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.3), ("alpha", 0.7)]
ALL_CASES = CASES + [("total_variation", None), ("chi_squared", None)]


def np_f(name, alpha, u):
    """Table 2.1 in float64, written directly in u (the defining formulas)."""
    if name == "reverse_kl":
        return u * np.log(u)
    if name == "forward_kl":
        return -np.log(u)
    if name == "jsd":
        return u * np.log(u) - (u + 1) * np.log((u + 1) / 2)
    if name == "alpha":
        return (u ** (1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))
    if name == "total_variation":
        return 0.5 * np.abs(u - 1)
    return (u - 1) ** 2


def np_f_prime(name, alpha, u):
    return {
        "reverse_kl": lambda: np.log(u) + 1,
        "forward_kl": lambda: -1 / u,
        "jsd": lambda: np.log(2 * u / (1 + u)),
        "alpha": lambda: (1 - u ** (-alpha)) / alpha,
    }[name]()


LOG_U = np.linspace(-30.0, 30.0, 121).astype(np.float32)


@pytest.mark.parametrize("name,alpha", ALL_CASES)
def test_f_matches_table(name, alpha):
    div = get_divergence(name, alpha=alpha, admissible_only=False)
    h = np.linspace(-8.0, 8.0, 81).astype(np.float32)
    got = np.asarray(jax.jit(div.f)(h), np.float64)
    want = np_f(name, alpha, np.exp(h.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert float(div.f(jnp.zeros(()))) == pytest.approx(0.0, abs=1e-7)  # f(1) = 0


@pytest.mark.parametrize("name,alpha", CASES)
def test_f_prime_matches_table_and_is_derivative_of_f(name, alpha):
    got = np.asarray(jax.jit(lambda h: f_prime(name, h, alpha=alpha))(LOG_U), np.float64)
    want = np_f_prime(name, alpha, np.exp(LOG_U.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # d f(e^h) / dh = f'(u) u: the table's two columns agree.
    div = get_divergence(name, alpha=alpha)
    h = np.linspace(-3.0, 3.0, 13).astype(np.float32)
    df_dh = jax.vmap(jax.grad(div.f))(h)
    np.testing.assert_allclose(df_dh, div.f_prime(h) * np.exp(h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,alpha", CASES)
def test_f_prime_inverse_inverts(name, alpha):
    div = get_divergence(name, alpha=alpha)
    h = np.linspace(-12.0, 12.0, 49).astype(np.float32)
    np.testing.assert_allclose(div.f_prime_inverse(div.f_prime(h)), h, rtol=1e-4, atol=2e-4)
    assert np.all(np.asarray(div.f_prime(h)) < div.f_prime_sup)


@pytest.mark.parametrize("name,alpha", CASES)
@given(h1=st.floats(-80, 80, width=32), h2=st.floats(-80, 80, width=32))
def test_f_prime_difference_float64_reference(name, alpha, h1, h2):
    """A 50-digit mpmath reference: float64 itself cancels catastrophically in f'(u1) - f'(u2)."""
    got = float(_difference(name, alpha)(np.float32(h1), np.float32(h2)))
    with mpmath.workdps(50):
        def fp(h):
            u = mpmath.exp(mpmath.mpf(float(h)))
            return {"reverse_kl": lambda: mpmath.log(u) + 1, "forward_kl": lambda: -1 / u,
                    "jsd": lambda: mpmath.log(2 * u / (1 + u)),
                    "alpha": lambda: (1 - u ** (-mpmath.mpf(alpha))) / mpmath.mpf(alpha)}[name]()
        want = float(fp(h1) - fp(h2))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-37), (name, alpha, h1, h2)


_DIFFERENCES = {}


def _difference(name, alpha):
    """One jitted f'(u1) - f'(u2) per divergence, shared by all hypothesis examples."""
    if (name, alpha) not in _DIFFERENCES:
        _DIFFERENCES[name, alpha] = jax.jit(get_divergence(name, alpha=alpha).f_prime_difference)
    return _DIFFERENCES[name, alpha]


@pytest.mark.parametrize("name,alpha", CASES)
@given(h=st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_no_nan_anywhere_in_float32(name, alpha, h):
    diff = _difference(name, alpha)
    for other in (h, 0.0, -h, 1e3, -1e3):
        value = diff(np.float32(h), np.float32(other))
        assert not np.isnan(value), (h, other)
        g = jax.grad(diff, argnums=(0, 1))(np.float32(h), np.float32(other))
        assert not np.any(np.isnan(np.asarray(g))), (h, other, g)


def test_forward_kl_tie_below_overflow_is_zero_not_nan():
    div = get_divergence("forward_kl")
    h = jnp.full((3,), -200.0)
    assert np.all(np.asarray(div.f_prime_difference(h, h)) == 0.0)
    assert np.all(np.isneginf(np.asarray(div.f_prime(h))))  # true value < -float32 max


def test_alpha_limits_recover_kl_derivatives_up_to_constants():
    """alpha -> 0: (1 - u^-a)/a -> log u (reverse KL minus 1); alpha -> 1: 1 - 1/u (forward KL + 1)."""
    h = np.linspace(-5.0, 5.0, 21).astype(np.float32)
    def rel_err(a, limit):
        return np.max(np.abs(a - limit) / np.maximum(1.0, np.abs(limit)))

    errs0 = [rel_err(f_prime("alpha", h, alpha=a), f_prime("reverse_kl", h) - 1) for a in (1e-2, 1e-3)]
    errs1 = [rel_err(f_prime("alpha", h, alpha=a), f_prime("forward_kl", h) + 1)
             for a in (1 - 1e-2, 1 - 1e-3)]
    assert errs0[1] < errs0[0] / 5 and errs0[1] < 0.05
    assert errs1[1] < errs1[0] / 5 and errs1[1] < 0.05


@pytest.mark.parametrize("name,alpha", ALL_CASES)
def test_f_divergence_is_nonnegative_and_zero_on_equal(name, alpha):
    key_p, key_q = jax.random.split(jax.random.key(0))
    log_p = jax.nn.log_softmax(jax.random.normal(key_p, (16, 7)))
    log_q = jax.nn.log_softmax(jax.random.normal(key_q, (16, 7)))
    d = f_divergence(name, log_p, log_q, alpha=alpha)
    chex.assert_shape(d, (16,))
    assert np.all(np.asarray(d) > 0)
    np.testing.assert_allclose(f_divergence(name, log_p, log_p, alpha=alpha), 0.0, atol=1e-6)
    p, q = np.exp(np.float64(log_p)), np.exp(np.float64(log_q))
    np.testing.assert_allclose(d, np.sum(q * np_f(name, alpha, p / q), -1), rtol=1e-4)


def test_kl_directions():
    """Reverse KL = D_f(pi, ref) with f = u log u is KL(pi || ref); forward KL is KL(ref || pi)."""
    log_p = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    log_q = jnp.log(jnp.array([0.2, 0.3, 0.5]))
    p, q = np.exp(np.float64(log_p)), np.exp(np.float64(log_q))
    assert float(f_divergence("reverse_kl", log_p, log_q)) == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-5)
    assert float(f_divergence("forward_kl", log_p, log_q)) == pytest.approx(np.sum(q * np.log(q / p)), rel=1e-5)


@pytest.mark.parametrize("name", INADMISSIBLE)
def test_inadmissible_divergences_explain_theorem_1(name):
    with pytest.raises(ValueError, match="Theorem 1"):
        f_prime(name, jnp.zeros(3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="kl"), "unknown divergence 'kl'"),
    (dict(name="alpha"), "needs alpha"),
    (dict(name="alpha", alpha=1.0), r"alpha must be in \(0, 1\).*1.0"),
    (dict(name="alpha", alpha=0.0), r"alpha must be in \(0, 1\).*0.0"),
    (dict(name="alpha", alpha=-0.5), "-0.5"),
    (dict(name="jsd", alpha=0.5), "takes no alpha"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_divergence(**kwargs)


def test_admissible_set_is_the_papers():
    assert set(ADMISSIBLE) == {"reverse_kl", "forward_kl", "jsd", "alpha"}
    assert all(get_divergence(n, alpha=0.5 if n == "alpha" else None).admissible for n in ADMISSIBLE)


def test_alpha_may_be_traced_under_vmap():
    alphas = jnp.array([0.1, 0.5, 0.9])
    out = jax.vmap(lambda a: f_prime("alpha", jnp.float32(2.0), alpha=a))(alphas)
    np.testing.assert_allclose(out, (1 - np.exp(-2.0 * np.asarray(alphas))) / np.asarray(alphas), rtol=1e-6)


# ----------------------------------------------------------------- §2.8.2 sample estimator

ESTIMATOR_H = np.concatenate([-np.logspace(-8, 4, 60), [0.0], np.logspace(-8, 4, 60),
                              [-1.0, 1.0, -0.99999, 0.99999, 80.0, 88.0, 88.7, 89.0]]).astype(np.float32)


def mp_estimator(name, alpha, h):
    """f(r) - f'(1)(r - 1) and its derivative e^h (f'(e^h) - f'(1)) in 60-digit arithmetic."""
    with mpmath.workdps(60):
        h = mpmath.mpf(float(h))
        u = mpmath.exp(h)
        a = None if alpha is None else mpmath.mpf(alpha)
        f = {"reverse_kl": lambda u: u * mpmath.log(u), "forward_kl": lambda u: -mpmath.log(u),
             "jsd": lambda u: u * mpmath.log(u) - (u + 1) * mpmath.log((u + 1) / 2),
             "alpha": lambda u: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))}[name]
        fp = {"reverse_kl": lambda u: mpmath.log(u) + 1, "forward_kl": lambda u: -1 / u,
              "jsd": lambda u: mpmath.log(2 * u / (1 + u)),
              "alpha": lambda u: (1 - u ** (-a)) / a}[name]
        value = f(u) - fp(mpmath.mpf(1)) * (u - 1)
        slope = u * (fp(u) - fp(mpmath.mpf(1)))
        return float(value), float(slope)


def _to_float32_or_inf(x):
    return x if abs(x) < float(np.finfo(np.float32).max) else np.copysign(np.inf, x)


@pytest.mark.parametrize("name,alpha", CASES)
def test_estimator_matches_60_digit_reference_with_its_gradient(name, alpha):
    div = get_divergence(name, alpha=alpha)
    values = np.asarray(jax.jit(div.estimator)(ESTIMATOR_H), np.float64)
    slopes = np.asarray(jax.jit(jax.vmap(jax.grad(div.estimator)))(ESTIMATOR_H), np.float64)
    want = np.array([mp_estimator(name, alpha, h) for h in ESTIMATOR_H])
    want_value = np.array([_to_float32_or_inf(v) for v in want[:, 0]])
    want_slope = np.array([_to_float32_or_inf(v) for v in want[:, 1]])
    assert not np.isnan(values).any() and not np.isnan(slopes).any()
    assert (values >= 0).all()
    finite = np.isfinite(want_value)
    np.testing.assert_array_equal(values[~finite], want_value[~finite])  # overflow -> inf only
    # A few float32 ulps (eps = 2^-23) times the condition number of exp at the log-space
    # argument (~|h|: e^(h + c) with h + c rounded to float32).
    rtol = 8 * np.finfo(np.float32).eps * (1 + np.abs(ESTIMATOR_H.astype(np.float64)))
    tiny = np.finfo(np.float32).tiny  # true values below it may flush to zero
    assert (np.abs(values[finite] - want_value[finite])
            <= rtol[finite] * np.abs(want_value[finite]) + tiny).all()
    ok = np.isfinite(want_slope)
    assert (np.abs(slopes[ok] - want_slope[ok]) <= rtol[ok] * np.abs(want_slope[ok]) + tiny).all()
    np.testing.assert_array_equal(slopes[~ok], want_slope[~ok])
    assert float(div.estimator(jnp.zeros(()))) == 0.0  # p = q: exactly zero, on any backend


@pytest.mark.parametrize("name,alpha", CASES)
def test_estimator_expectation_is_the_divergence_from_either_side(name, alpha):
    """On finite distributions E_q[term] = D_f(p, q) exactly (E_q[r - 1] = 0), and the
    conjugate's terms under p give the same value (D_f(p, q) = D_g(q, p))."""
    rng = np.random.default_rng(0)
    log_p = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(6, 9)) * 2, jnp.float32))
    log_q = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(6, 9)) * 2, jnp.float32))
    exact = f_divergence(name, log_p, log_q, alpha=alpha)
    from_q = jnp.sum(jnp.exp(log_q) * f_divergence_estimator(name, log_p - log_q, alpha=alpha,
                                                             sampled_from="q"), -1)
    from_p = jnp.sum(jnp.exp(log_p) * f_divergence_estimator(name, log_p - log_q, alpha=alpha,
                                                             sampled_from="p"), -1)
    np.testing.assert_allclose(from_q, exact, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_p, exact, rtol=1e-5, atol=1e-6)


def test_conjugates_pair_up_within_table_2_1():
    assert get_divergence("reverse_kl").conjugate().name == "forward_kl"
    assert get_divergence("forward_kl").conjugate().name == "reverse_kl"
    assert get_divergence("jsd").conjugate().name == "jsd"
    assert get_divergence("alpha", alpha=0.25).conjugate().alpha == 0.75
    with pytest.raises(ValueError, match="not in Table 2.1"):
        get_divergence("chi_squared", admissible_only=False).conjugate()
    with pytest.raises(ValueError, match="sampled_from"):
        f_divergence_estimator("jsd", jnp.zeros(3), sampled_from="pi")


F_H = np.concatenate([ESTIMATOR_H, [89.3, 89.5, -89.0, -100.0]]).astype(np.float32)
F_CASES = ALL_CASES + [("alpha", 1e-3), ("alpha", 0.999)]


def mp_f(name, alpha, h):
    """f(e^h) and its derivative in h, e^h f'(e^h), in 60-digit arithmetic (Table 2.1)."""
    with mpmath.workdps(60):
        u = mpmath.exp(mpmath.mpf(float(h)))
        a = None if alpha is None else mpmath.mpf(alpha)
        f, fp = {
            "reverse_kl": (u * mpmath.log(u), lambda: mpmath.log(u) + 1),
            "forward_kl": (-mpmath.log(u), lambda: -1 / u),
            "jsd": (u * mpmath.log(u) - (u + 1) * mpmath.log((u + 1) / 2),
                    lambda: mpmath.log(2 * u / (1 + u))),
            "alpha": (None if a is None else (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
                      lambda: (1 - u ** (-a)) / a),
            "total_variation": (abs(u - 1) / 2, lambda: mpmath.sign(u - 1) / 2),
            "chi_squared": ((u - 1) ** 2, lambda: 2 * (u - 1)),
        }[name]
        return float(f), float(u * fp())


@pytest.mark.parametrize("name,alpha", F_CASES)
def test_f_is_finite_wherever_the_true_value_is(name, alpha):
    """f and d f(e^h)/dh over the whole float32 range against 60 digits: no NaN (alpha gave
    inf - inf = NaN for h > 88.7), inf exactly where the true value exceeds float32 (JSD was inf
    on 88.7 < h < 89.1, total variation on 88.7 < h < 89.4, where the true values are finite)."""
    div = get_divergence(name, alpha=alpha, admissible_only=False)
    values = np.asarray(jax.jit(div.f)(F_H), np.float64)
    slopes = np.asarray(jax.jit(jax.vmap(jax.grad(div.f)))(F_H), np.float64)
    want = np.array([mp_f(name, alpha, h) for h in F_H])
    want_value = np.array([_to_float32_or_inf(v) for v in want[:, 0]])
    want_slope = np.array([_to_float32_or_inf(v) for v in want[:, 1]])
    assert not np.isnan(values).any() and not np.isnan(slopes).any()
    # Accuracy where the overflow-safe forms act (|h| >= 80; smaller |h| is covered by
    # test_f_matches_table): a few ulps times exp's condition number at its argument (~|h|).
    # Slopes below 1e-36 may flush to 0 (alpha's e^((1-a) h) at h = -89 is subnormal).
    rtol = 8 * np.finfo(np.float32).eps * (1 + np.abs(F_H.astype(np.float64)))
    for got, exact, atol in ((values, want_value, np.finfo(np.float32).tiny),
                             (slopes, want_slope, 1e-36)):
        np.testing.assert_array_equal(got[~np.isfinite(exact)], exact[~np.isfinite(exact)])
        check = np.isfinite(exact) & (np.abs(F_H) >= 80)
        err = np.abs(got[check] - exact[check])
        assert (err <= rtol[check] * np.abs(exact[check]) + atol).all(), F_H[check]
