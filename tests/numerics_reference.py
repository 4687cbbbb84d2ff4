"""mpmath references of the objectives, their gradients and their float32 condition.

Each reference takes the float32 inputs exactly (hyper-parameters as the float32 numbers the
kernels see) and returns, next to the value and the gradient, its *sensitivity*: the first-order
change of the output under relative perturbations of every input and hyper-parameter by one
unit, sum_i |d out / d x_i| |x_i| + |out|. A float32 implementation whose every step is exact up
to a few roundings of its inputs (backward stable) is within C eps times that of the truth,
eps = 2^-24 the unit roundoff, C a small count of roundings; that is the tolerance of
`assert_close` (see tests/test_objective_properties.py for C). Working precision: 60 digits
plus twice the decimal exponent of the largest term, so that D^2 - variance in mIPO (terms up
to e^(2 |h|) that cancel) is exact as well.

Formulas are the README's / thesis', written directly (not the library's algebra):
  f'(u) of Table 2.1 at u = e^h; f-DPO / mDPO: -log sigmoid(beta (mean f'_w - mean f'_l));
  mIPO: (mean g_w - mean g_l - 1/(2 tau))^2 - var_w/K - var_l/L (Bessel, groups of >= 2);
  distillation: (r_1 - r_2 - beta (f'(u_1) - f'(u_2)))^2.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
EPS32 = 2.0 ** -24  # unit roundoff of float32
TINY = 1e-36  # below this, float32 results may be flushed / subnormal: absolute slack
ROUNDINGS = 8  # the tolerance's count of roundings per input (see assert_close)


def _mp(x) -> mpmath.mpf:
    """x as an mpf; float32 subnormals read as 0, as XLA flushes them on CPU, GPU and TPU."""
    x = float(x)
    return mpmath.mpf(0.0 if abs(x) < F32_TINY else x)


MAX_DIGITS = 20_000  # references needing more (|h| >~ 2e4 under forward KL) are not attempted


def _precision(name, a, hs, extra=()) -> int:
    """60 digits plus twice the decimal exponent of the largest f'(u) or other input, so that
    terms up to that size cancel exactly."""
    worst = max([0.0] + [abs(float(h)) for h in hs])
    if name in ("forward_kl", "alpha"):  # |f'(u)| <= e^(a |h|) / a
        power = 1.0 if name == "forward_kl" else float(a)
        top = worst * power / math.log(10) - math.log10(power)
    else:
        top = math.log10(worst + 2.0)
    top = max([top] + [math.log10(abs(float(v)) + 2.0) for v in extra])
    digits = 60 + 2 * int(top + 1)
    if digits > MAX_DIGITS:
        raise ValueError(f"reference would need {digits} digits")
    return digits


def _f_prime_terms(name, a, h):
    """(f'(e^h), d/dh f'(e^h), d^2/dh^2 f'(e^h)) at an mpf h (Table 2.1)."""
    if name == "reverse_kl":
        return h + 1, mpmath.mpf(1), mpmath.mpf(0)
    if name == "forward_kl":
        e = mpmath.exp(-h)
        return -e, e, -e
    if name == "jsd":
        s = 1 / (1 + mpmath.exp(h))  # sigmoid(-h)
        return mpmath.log(2) - mpmath.log1p(mpmath.exp(-h)), s, -s * (1 - s)
    e = mpmath.exp(-a * h)  # alpha
    return (1 - e) / a, e, -a * e


def _sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def group_dpo(name, alpha, beta, hw, hl):
    """f-DPO (K = L = 1) / mDPO on one example: (loss, grad_w [K], grad_l [L], sens_loss,
    sens_w [K], sens_l [L]) as Python floats."""
    with mpmath.workdps(_precision(name, alpha, list(hw) + list(hl), [beta])):
        a = None if alpha is None else _mp(alpha)
        b = _mp(beta)
        hs = [_mp(h) for h in hw] + [_mp(h) for h in hl]
        k, n = len(hw), len(hw) + len(hl)
        lam = [_lam(i, k, n) for i in range(n)]
        terms = [_f_prime_terms(name, a, h) for h in hs]
        z = b * mpmath.fsum(l * t[0] for l, t in zip(lam, terms))
        loss = mpmath.log1p(mpmath.exp(-z))
        sig = _sigmoid(-z)  # d loss / dz = -sigmoid(-z)
        grad = [-sig * b * l * t[1] for l, t in zip(lam, terms)]
        # Hessian: sigmoid(-z) sigmoid(z) beta^2 lam_a lam_b d1_a d1_b - delta_ab sig beta lam d2
        outer = sig * (1 - sig) * b * b
        sens_loss = abs(loss) + sum(abs(g * h) for g, h in zip(grad, hs)) + abs(sig * z)
        # sigmoid(-z) is far from linear where z is uncertain by more than ~1 (huge group
        # means agreeing to float32 precision): the gradient then varies by the whole spread of
        # sigmoid over z +/- ROUNDINGS eps sens_z, which first order would miss.
        spread = ROUNDINGS * EPS32 * (sum(abs(b * l * t[1] * h) for l, t, h in zip(lam, terms, hs))
                                      + abs(z))
        sig_range = _sigmoid(-(z - spread)) - _sigmoid(-(z + spread))
        sens = []
        for i in range(n):
            row = sum(abs(outer * lam[i] * lam[j] * terms[i][1] * terms[j][1] * hs[j])
                      for j in range(n))
            row += abs(sig * b * lam[i] * terms[i][2] * hs[i])
            row += abs(grad[i]) * (1 + abs(z) * (1 - sig))  # d grad / d beta * beta
            row += abs(b * lam[i] * terms[i][1]) * sig_range / (ROUNDINGS * EPS32)
            sens.append(abs(grad[i]) + row)
        if a is not None:  # alpha: a central difference at this precision
            sens_loss += _alpha_sensitivity(lambda aa: group_dpo_value(name, aa, b, hs, lam), a)
        return (float(loss), [float(g) for g in grad[:k]], [float(g) for g in grad[k:]],
                float(sens_loss), [float(v) for v in sens[:k]], [float(v) for v in sens[k:]])


def group_dpo_value(name, a, b, hs, lam):
    z = b * mpmath.fsum(l * _f_prime_terms(name, a, h)[0] for l, h in zip(lam, hs))
    return mpmath.log1p(mpmath.exp(-z))


def _alpha_sensitivity(fn, a):
    """|d fn / d alpha| alpha, by a central difference far below float32 resolution."""
    step = a * mpmath.mpf(10) ** (-(mpmath.mp.dps // 3))
    return abs((fn(a + step) - fn(a - step)) / (2 * step) * a)


def mipo(name, alpha, tau, unbiased, hw, hl):
    """mIPO on one example: (loss, grad_w, grad_l, sens_loss, sens_w, sens_l) as floats."""
    with mpmath.workdps(_precision(name, alpha, list(hw) + list(hl), [1 / float(tau)])):
        a = None if alpha is None else _mp(alpha)
        c = mpmath.mpf(1) / (2 * _mp(tau))
        hs = [_mp(h) for h in hw] + [_mp(h) for h in hl]
        k, n = len(hw), len(hw) + len(hl)
        terms = [_f_prime_terms(name, a, h) for h in hs]
        value, grad_g, hess_g = _mipo_parts([t[0] for t in terms], k, c, unbiased)
        grad = [gg * t[1] for gg, t in zip(grad_g, terms)]
        d = mpmath.fsum([t[0] for t in terms[:k]]) / k - mpmath.fsum(
            [t[0] for t in terms[k:]]) / (n - k) - c
        sens_loss = abs(value) + sum(abs(g * h) for g, h in zip(grad, hs)) + abs(2 * d * c)
        sens = []
        for i in range(n):
            row = sum(abs(hess_g[i][j] * terms[i][1] * terms[j][1] * hs[j]) for j in range(n))
            row += abs(grad_g[i] * terms[i][2] * hs[i])
            row += abs(2 * _lam(i, k, n) * c * terms[i][1])  # d grad / dc * c
            sens.append(abs(grad[i]) + row)
        if a is not None:
            sens_loss += _alpha_sensitivity(
                lambda aa: _mipo_parts([_f_prime_terms(name, aa, h)[0] for h in hs], k, c,
                                       unbiased)[0], a)
        return float(value), [float(g) for g in grad[:k]], [float(g) for g in grad[k:]], \
            float(sens_loss), [float(s) for s in sens[:k]], [float(s) for s in sens[k:]]


def _lam(i, k, n):
    return mpmath.mpf(1) / k if i < k else -mpmath.mpf(1) / (n - k)


def _mipo_parts(g, k, c, unbiased):
    """(value, dL/dg [n], d2L/dg2 [n][n]) of (mean g_w - mean g_l - c)^2 - corrections."""
    n = len(g)
    groups = [(0, k), (k, n)]
    d = mpmath.fsum(g[:k]) / k - mpmath.fsum(g[k:]) / (n - k) - c
    value = d * d
    grad = [2 * d * _lam(i, k, n) for i in range(n)]
    hess = [[2 * _lam(i, k, n) * _lam(j, k, n) for j in range(n)] for i in range(n)]
    if unbiased:
        for lo, hi in groups:
            m = hi - lo
            if m < 2:
                continue
            mean = mpmath.fsum(g[lo:hi]) / m
            var = mpmath.fsum((x - mean) ** 2 for x in g[lo:hi]) / (m - 1)
            value -= var / m  # Prop. 1
            for i in range(lo, hi):
                grad[i] -= 2 * (g[i] - mean) / (m * (m - 1))
                for j in range(lo, hi):
                    hess[i][j] -= 2 * ((1 if i == j else 0) - mpmath.mpf(1) / m) / (m * (m - 1))
    return value, grad, hess


def distill(name, alpha, beta, h1, h2, r1, r2, weight=1.0):
    """weight (r_1 - r_2 - beta (f'(u_1) - f'(u_2)))^2 on one pair: (loss, grads (h1, h2, r1,
    r2), sens_loss, sens (h1, h2, r1, r2)) as floats."""
    with mpmath.workdps(_precision(name, alpha, [h1, h2], [beta, r1, r2])):
        a = None if alpha is None else _mp(alpha)
        b, w = _mp(beta), _mp(weight)
        x = [_mp(h1), _mp(h2), _mp(r1), _mp(r2)]
        t1, t2 = _f_prime_terms(name, a, x[0]), _f_prime_terms(name, a, x[1])
        rho = x[2] - x[3] - b * (t1[0] - t2[0])
        loss = w * rho * rho
        # d rho / d x: (-beta d1_1, beta d1_2, 1, -1)
        drho = [-b * t1[1], b * t2[1], mpmath.mpf(1), mpmath.mpf(-1)]
        grad = [2 * w * rho * dr for dr in drho]
        d2rho = [[-b * t1[2], 0, 0, 0], [0, b * t2[2], 0, 0], [0] * 4, [0] * 4]
        hess = [[2 * w * (drho[i] * drho[j] + rho * d2rho[i][j]) for j in range(4)]
                for i in range(4)]
        sens_loss = abs(loss) + sum(abs(g * v) for g, v in zip(grad, x)) \
            + abs(2 * w * rho * b * (t1[0] - t2[0]))
        sens = [abs(grad[i]) + sum(abs(hess[i][j] * x[j]) for j in range(4))
                + abs(2 * w * b * (t1[0] - t2[0]) * drho[i]) + abs(grad[i]) * (i < 2)
                for i in range(4)]
        if a is not None:
            sens_loss += _alpha_sensitivity(
                lambda aa: w * (x[2] - x[3] - b * (_f_prime_terms(name, aa, x[0])[0]
                                                   - _f_prime_terms(name, aa, x[1])[0])) ** 2, a)
        return float(loss), [float(g) for g in grad], float(sens_loss), [float(s) for s in sens]


def assert_close(got, want, sensitivity, rounding, what=""):
    """|got - want| <= rounding * eps * sensitivity + TINY elementwise, and never NaN. got may
    be +/-inf only where the perturbed true value may exceed float32 (and must be where it
    surely does)."""
    got = np.asarray(got, np.float64).ravel()
    want = np.asarray(want, np.float64).ravel()
    slack = rounding * EPS32 * np.asarray(sensitivity, np.float64).ravel() + TINY
    assert not np.isnan(got).any(), (what, got, want)
    for g, w, s in zip(got, want, slack):
        if np.isinf(s):  # input roundings move the true value arbitrarily far: undetermined
            continue
        if np.isinf(w):  # beyond even float64 (and determined): surely beyond float32
            assert g == w, (what, g, w, s)
        elif np.isinf(g):
            assert np.sign(g) * w + s >= F32_MAX, (what, g, w, s)
        else:
            assert abs(g - w) <= s, (what, g, w, s, abs(g - w) / max(s - TINY, 1e-300))
