"""f-divergences of Table 2.1 (thesis, ch. 2), evaluated in log space.

An f-divergence is D_f(p, q) = E_q[f(p/q)]. The f-DPO loss (eq. 2.2) needs f'(u) at the
density ratio u = pi_theta / pi_ref, which a language model gives as a log-ratio
h = log pi_theta(y|x) - log pi_ref(y|x) of order +/-100 for long sequences. Everything here
therefore takes `log_u` (= h) instead of u and never forms exp(h) where that could overflow
while the true value is finite.

| name              | f(u)                                          | f'(u)            | sup f' |
|-------------------|-----------------------------------------------|------------------|--------|
| "reverse_kl"      | u log u                                       | log u + 1        | inf    |
| "forward_kl"      | -log u                                        | -1/u             | 0      |
| "jsd"             | u log u - (u+1) log((u+1)/2)                  | log(2u/(1+u))    | log 2  |
| "alpha"           | (u^(1-a) - (1-a)u - a) / (a(a-1)), 0 < a < 1  | (1 - u^(-a))/a   | 1/a    |
| "total_variation" | |u - 1| / 2                                   | sign(u - 1)/2    | 1/2    |
| "chi_squared"     | (u - 1)^2                                     | 2(u - 1)         | inf    |

Theorem 1 of the thesis needs f' invertible with 0 not in dom(f'), so that the KKT multipliers
of the constraints pi(y) >= 0 vanish and the normaliser cancels in the Bradley-Terry model.
Total variation (f' not invertible) and chi-squared (f'(0) = -2 is finite, so pi* can put zero
mass on a response) fail it: their f-DPO losses are not consistent and are refused here.

The alpha-divergence follows the thesis' convention: alpha -> 0 gives reverse KL and alpha -> 1
gives forward KL (both up to an additive constant in f', which cancels in eq. 2.2). HF TRL's
`f_alpha_divergence_coef` equals 1 - alpha in TRL >= 0.29; TRL <= 0.28 used alpha itself.

Sample estimates of D_f (thesis §2.8.2, after Schulman 2020): with x ~ q and r = p(x)/q(x),
f(r) - f'(1)(r - 1) is unbiased for D_f(p, q) (E_q[r - 1] = 0) and has lower variance than
f(r) near p = q (`Divergence.estimator`, `f_divergence_estimator`). From samples of p instead,
D_f(p, q) = D_g(q, p) with g(t) = t f(1/t), the conjugate (`Divergence.conjugate`): reverse KL
and forward KL swap, JSD is its own conjugate, alpha becomes 1 - alpha.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from alignax._checks import as_float32

ADMISSIBLE = ("reverse_kl", "forward_kl", "jsd", "alpha")
"""Divergences for which f-DPO is consistent (Theorem 1)."""

INADMISSIBLE = ("total_variation", "chi_squared")

_LOG2 = math.log(2.0)
_LOG_FLOAT32_MAX = math.log(float(jnp.finfo(jnp.float32).max))
_EXP_SAFE = 80.0  # e^h is finite for h below this, with room for a factor up to ~1e3
_F_PRIME_SUP = {"reverse_kl": math.inf, "forward_kl": 0.0, "jsd": _LOG2,
                "total_variation": 0.5, "chi_squared": math.inf}
_CONJUGATE = {"reverse_kl": "forward_kl", "forward_kl": "reverse_kl", "jsd": "jsd",
              "total_variation": "total_variation"}
_SERIES_RADIUS = 1.0  # |log r| below which the estimator is summed as a Taylor series
_SERIES_ORDER = 14  # highest power of log r kept: truncation error < 1e-9 relative at radius


@jax.custom_jvp
def exp_difference(h1: jax.Array, h2: jax.Array, c: jax.Array | float) -> jax.Array:
    """e^(-c h1) - e^(-c h2) for c > 0, exact near h1 = h2 and NaN-free for finite inputs.

    Written as e^m (e^(a-m) - e^(b-m)) with a = -c h1, b = -c h2, m = max(a, b), and the
    bracket through expm1 of non-positive arguments only. The exponent difference is formed as
    -c (h1 - h2), never as (-c h1) - (-c h2): h1 - h2 is exactly 0 at a tie, whereas the latter
    is not once the compiler fuses it into an FMA (it does on CPU), which at h = -28 would
    shift a tied f-DPO loss by 2e-5. The derivatives (-c e^(-c h1), c e^(-c h2)) are given
    explicitly, so they are inf where the true ones overflow, never the inf * 0 = NaN that
    differentiating the factored form would give.

    Shapes: h1, h2 broadcast together; c is a scalar.
    """
    m = -c * jnp.minimum(h1, h2)  # max(a, b) for c > 0
    d = -c * (h1 - h2)  # a - b
    bracket = jnp.expm1(jnp.minimum(d, 0.0)) - jnp.expm1(-jnp.maximum(d, 0.0))
    # e^m overflows only when the true difference does, except at an exact tie: keep that 0.
    tie_overflow = (m > _LOG_FLOAT32_MAX) & (bracket == 0.0)
    return jnp.where(tie_overflow, 0.0, jnp.exp(jnp.where(tie_overflow, 0.0, m)) * bracket)


@exp_difference.defjvp
def _exp_difference_jvp(primals, tangents):
    h1, h2, c = primals
    dh1, dh2, dc = tangents
    e1, e2 = jnp.exp(-c * h1), jnp.exp(-c * h2)
    tangent = -c * e1 * dh1 + c * e2 * dh2 + (h2 * e2 - h1 * e1) * dc
    return exp_difference(h1, h2, c), tangent


def frexp32(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(m, e) with x = m 2^e, |m| in [1/2, 1) (0 and e = 0 for x = 0 or subnormal x), exactly,
    for finite float32 x: the exponent field read off the bits (a handful of XLA ops, where
    jnp.frexp compiles to dozens)."""
    bits = jax.lax.bitcast_convert_type(as_float32(x), jnp.int32)
    field = (bits >> 23) & 0xFF
    normal = field > 0
    mantissa = jax.lax.bitcast_convert_type((bits & jnp.int32(-0x7F800001)) | 0x3F000000,
                                            jnp.float32)  # sign kept, exponent of 1/2
    return jnp.where(normal, mantissa, 0.0), jnp.where(normal, field - 126, 0)


def _pow2(e: jax.Array) -> jax.Array:
    """2^e as float32 for int e in [-126, 127], built from the bits."""
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def ldexp32(x: jax.Array, e: jax.Array) -> jax.Array:
    """x 2^e for float32 x and int32 e, overflowing to inf and underflowing to 0 like a
    product (three in-range powers of two; cheaper to compile than jnp.ldexp)."""
    e = jnp.clip(e, -3 * 126, 3 * 127)
    parts = []
    for _ in range(3):
        part = jnp.clip(e, -126, 127)
        parts.append(part)
        e = e - part
    return ((x * _pow2(parts[0])) * _pow2(parts[1])) * _pow2(parts[2])


_LN2_HI = 0.693115234375  # ln 2 to 12 bits: n * _LN2_HI is exact in float32 for |n| < 2^12
_LN2_LO = math.log(2.0) - _LN2_HI


def scaled_exp(coef, log_coef: jax.Array, x: jax.Array, exponent=0) -> jax.Array:
    """coef * 2^exponent * e^x for coef >= 0, finite wherever the true value is.

    `coef` is an array or a tuple of arrays (their product, never formed: each factor's
    mantissa and binary exponent are taken apart by frexp, so the product cannot over- or
    underflow on the way), `log_coef` its natural log, `exponent` an int array. e^x is
    range-reduced, x = n ln 2 + r with |r| <= ln 2 / 2 (Cody-Waite: r is exact), and the power
    of two applied by ldexp, so the result is within a few ulps wherever every factor is a
    normal float32 number, even where e^x alone over- or underflows. Where a factor is not
    (it underflowed to 0 or overflowed while log_coef is exact), the exponent x + log_coef is
    reduced instead, with its rounding (eps |x + log coef|, that of e^y at a float32-rounded
    y). log_coef = -inf (coef = 0) gives exactly 0. Elementwise, broadcasting. Differentiable
    in the factors and x (the bit-level frexp has no derivative of its own).
    """
    factors = coef if isinstance(coef, tuple) else (coef,)
    return _scaled_exp(factors, log_coef, x, jnp.asarray(exponent, jnp.int32))


@jax.custom_jvp
def _scaled_exp(factors, log_coef, x, exponent):
    tiny, top = jnp.finfo(jnp.float32).tiny, jnp.finfo(jnp.float32).max
    zero = log_coef == -jnp.inf
    normal = functools.reduce(jnp.logical_and, [(f >= tiny) & (f <= top) for f in factors],
                              jnp.asarray(True))
    y = jnp.where(normal | zero, x, x + log_coef)  # the exponent still to apply
    n = jnp.clip(jnp.round(y / math.log(2.0)), -600.0, 600.0)  # beyond: 0 or inf anyway
    r = (y - n * _LN2_HI) - n * _LN2_LO
    mantissa, power = jnp.ones_like(y), exponent + n.astype(jnp.int32)
    for f in factors:
        m, e = frexp32(jnp.where(normal, f, 1.0))
        mantissa, power = mantissa * m, power + e
    return jnp.where(zero, 0.0, ldexp32(mantissa * jnp.exp(r), power))


@_scaled_exp.defjvp
def _scaled_exp_jvp(primals, tangents):
    factors, log_coef, x, exponent = primals
    d_factors, _, d_x, _ = tangents
    value = _scaled_exp(factors, log_coef, x, exponent)
    tangent = value * d_x
    for i, d_f in enumerate(d_factors):  # d(prod f) = sum_i (prod_{j != i} f_j) d f_i
        others = factors[:i] + factors[i + 1:]
        log_others = sum((jnp.log(f) for f in others), jnp.zeros_like(x))
        tangent = tangent + _scaled_exp(others, log_others, x, exponent) * d_f
    return value, tangent


def _softplus_difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """softplus(a) - softplus(b), without cancellation near a = b.

    For |a - b| < 1 it is log1p(expm1(a - b) sigmoid(b)), since (1 + e^a)/(1 + e^b) =
    1 + (e^(a-b) - 1) sigmoid(b): every factor is then accurate to a few ulps relative. Farther
    apart the plain difference loses nothing. Both branches are finite with finite gradients.
    """
    d = a - b
    near = jnp.log1p(jnp.expm1(jnp.clip(d, -1.0, 1.0)) * jax.nn.sigmoid(b))
    return jnp.where(jnp.abs(d) < 1.0, near, jax.nn.softplus(a) - jax.nn.softplus(b))


@jax.custom_jvp
def _jsd_f(h: jax.Array) -> jax.Array:
    """JSD's f(e^h) = u log u - (u+1) log((u+1)/2), elementwise.

    u (log 2 + log sigmoid h) - (softplus h - log 2) for h <= 1; above, the first term as
    exp(h + log A), A = log(2u/(1+u)) = -log1p(expm1(-h)/2), finite up to h = 89.1 where e^h
    alone overflows at 88.7. The derivative e^h A is written out: differentiating the exp of a
    sum of logs would overflow an intermediate cotangent (value / A) first.
    """
    high = h > 1.0
    hp, hn = jnp.where(high, h, 1.0), jnp.where(high, 1.0, h)  # each branch in its range
    low = jnp.exp(hn) * (_LOG2 + jax.nn.log_sigmoid(hn)) - (jax.nn.softplus(hn) - _LOG2)
    up = jnp.exp(hp + jnp.log(-jnp.log1p(jnp.expm1(-hp) / 2))) - (jax.nn.softplus(hp) - _LOG2)
    return jnp.where(high, up, low)


@_jsd_f.defjvp
def _jsd_f_jvp(primals, tangents):
    (h,), (dh,) = primals, tangents
    high = h > 1.0
    hp, hn = jnp.where(high, h, 1.0), jnp.where(high, 1.0, h)
    slope = jnp.where(high, jnp.exp(hp + jnp.log(-jnp.log1p(jnp.expm1(-hp) / 2))),
                      jnp.exp(hn) * (_LOG2 + jax.nn.log_sigmoid(hn)))  # e^h f'(e^h)
    return _jsd_f(h), slope * dh


@dataclasses.dataclass(frozen=True)
class Divergence:
    """An f-divergence: f, f', (f')^-1 and stable differences of f', all on log-ratios.

    Shapes: every method is elementwise; `log_u` is any shape and the result has that shape.
    """

    name: str
    alpha: float | jax.Array | None = None

    @property
    def admissible(self) -> bool:
        """Whether Theorem 1 applies (0 not in dom f', f' invertible)."""
        return self.name in ADMISSIBLE

    @property
    def f_prime_sup(self) -> float | jax.Array:
        """sup of the range of f' over u > 0: (f')^-1(v) exists for v < f_prime_sup."""
        if self.name == "alpha":
            return 1.0 / self.alpha
        return _F_PRIME_SUP[self.name]

    @property
    def power(self) -> float | jax.Array | None:
        """c with f'(u) = -u^(-c)/c + const (forward KL: 1, alpha: alpha), else None.

        For these f'(u) grows like e^(-c h) as h -> -inf, so losses built on it need care
        where e^(-c h) overflows (see `alignax.objectives.fdpo_loss`).
        """
        return {"forward_kl": 1.0, "alpha": self.alpha}.get(self.name)

    def f(self, log_u: jax.Array) -> jax.Array:
        """f(u) at u = exp(log_u) (Table 2.1), so that D_f(p, q) = sum_y q(y) f(p(y)/q(y)).

        Finite wherever the true value is a finite float32 and never NaN for finite log_u,
        value and gradient in log_u: where u overflows (log_u > 88.7) f need not (JSD up to
        log_u = 89.1, total variation up to 89.4), so those terms are formed as one exp of a
        sum of logs; reverse KL's h e^h likewise below h = -1, where e^h underflows first.
        Alpha has f'(1) = 0, so its f is its `estimator` (the same value, formed without the
        inf - inf of u^(1-a) - (1-a) u); like the estimator, it gets no gradient in alpha.
        """
        h = as_float32(log_u)
        if self.name == "reverse_kl":  # below h = -1 as -exp(h + log(-h)): e^h may underflow
            low = h < -1.0  # (h = -89) while h e^h is still a normal float32
            hn = jnp.where(low, h, -1.0)
            return jnp.where(low, -jnp.exp(hn + jnp.log(-hn)), h * jnp.exp(jnp.where(low, 0.0, h)))
        if self.name == "forward_kl":
            return -h
        if self.name == "jsd":
            return _jsd_f(h)
        if self.name == "alpha":
            return self.estimator(h)
        if self.name == "total_variation":
            high = h > 1.0
            return jnp.where(high, jnp.exp(jnp.where(high, h, 1.0) - _LOG2) - 0.5,
                             0.5 * jnp.abs(jnp.expm1(jnp.where(high, 1.0, h))))
        return jnp.square(jnp.expm1(h))  # chi_squared

    def f_prime(self, log_u: jax.Array) -> jax.Array:
        """f'(u) at u = exp(log_u); -inf only where the true value is below -float32 max."""
        h = as_float32(log_u)
        if self.name == "reverse_kl":
            return h + 1.0
        if self.name == "forward_kl":
            return -jnp.exp(-h)
        if self.name == "jsd":
            return _LOG2 + jax.nn.log_sigmoid(h)  # log(2u/(1+u))
        if self.name == "alpha":
            return -jnp.expm1(-self.alpha * h) / self.alpha  # (1 - u^-a)/a
        if self.name == "total_variation":
            return 0.5 * jnp.sign(h)
        return 2.0 * jnp.expm1(h)  # chi_squared

    def f_prime_difference(self, log_u1: jax.Array, log_u2: jax.Array) -> jax.Array:
        """f'(u1) - f'(u2), exact near u1 = u2 and NaN-free for all finite inputs.

        This is what eq. 2.2 needs; computing f'(u1) and f'(u2) separately would give
        -inf - (-inf) = NaN for forward KL at two log-ratios below -88.
        """
        h1, h2 = as_float32(log_u1), as_float32(log_u2)
        if self.name == "reverse_kl":
            return h1 - h2  # the +1 cancels: standard DPO exactly
        if self.name == "forward_kl":
            return exp_difference(h2, h1, 1.0)  # -1/u1 + 1/u2
        if self.name == "jsd":
            return _softplus_difference(-h2, -h1)  # log sigmoid(h1) - log sigmoid(h2)
        if self.name == "alpha":
            return exp_difference(h2, h1, self.alpha) / self.alpha  # (u2^-a - u1^-a)/a
        return self.f_prime(h1) - self.f_prime(h2)

    def conjugate(self) -> Divergence:
        """The divergence g(t) = t f(1/t), with D_g(q, p) = D_f(p, q) (Table 2.1 is closed under
        it: reverse KL <-> forward KL, JSD <-> JSD, alpha <-> 1 - alpha, total variation <->
        itself). Chi-squared's conjugate (Neyman's chi-squared) is not in the table.

        >>> get_divergence("alpha", alpha=0.3).conjugate().alpha
        0.7
        """
        if self.name == "alpha":
            return Divergence("alpha", 1.0 - self.alpha)
        if self.name not in _CONJUGATE:
            raise ValueError(f"the conjugate of {self.name!r} is not in Table 2.1")
        return Divergence(_CONJUGATE[self.name], None)

    def estimator(self, log_r: jax.Array) -> jax.Array:
        """f(r) - f'(1)(r - 1) at r = exp(log_r): one sample's unbiased, low-variance estimate
        of D_f(p, q) from x ~ q, log_r = log p(x) - log q(x) (thesis §2.8.2).

        Every term is >= 0 (f convex, f(1) = 0) and exactly 0 at log_r = 0. It is formed
        without cancellation (a Taylor series in log r for |log r| < 1, expm1 / log1p forms
        elsewhere), so it is accurate to float32 relative precision; it is inf only where the
        true value exceeds float32. The derivative, e^h (f'(e^h) - f'(1)) at h = log_r, is
        written out, so it is finite wherever the value is and never NaN. Total variation and
        chi-squared take f'(1) = 0 (their f(r) itself). alpha gets no gradient.

        Shapes: elementwise.
        """
        a = jax.lax.stop_gradient(as_float32(0.0 if self.alpha is None else self.alpha))
        return _estimator(self.name, as_float32(log_r), a)

    def f_prime_inverse(self, v: jax.Array) -> jax.Array:
        """log of (f')^-1(v), for v < f_prime_sup (admissible divergences only).

        Used by the exact optimum pi* = pi_ref (f')^-1((r - lambda)/beta) (thesis §2.5).
        """
        _require_admissible(self.name)
        v = as_float32(v)
        if self.name == "reverse_kl":
            return v - 1.0
        if self.name == "forward_kl":
            return -jnp.log(-v)
        if self.name == "jsd":
            s = v - _LOG2  # log sigmoid(h) = s  =>  h = s - log(1 - e^s)
            return s - jnp.log(-jnp.expm1(s))
        return -jnp.log1p(-self.alpha * v) / self.alpha  # alpha


def _series(x: jax.Array, coefficient, order: int = _SERIES_ORDER) -> jax.Array:
    """sum_{n=2}^{order} coefficient(n) x^n, by Horner's rule from the highest power."""
    total = jnp.zeros_like(x)
    for n in range(order, 1, -1):
        total = (total + coefficient(n)) * x
    return total * x


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _estimator(name: str, h: jax.Array, a: jax.Array) -> jax.Array:
    """`Divergence.estimator` of divergence `name` (alpha a) at log-ratios h."""
    small = jnp.abs(h) < _SERIES_RADIUS
    hs = jnp.where(small, h, 0.0)  # each branch only ever sees arguments it is accurate for
    hn = jnp.minimum(h, -_SERIES_RADIUS)  # h < -1 where used
    hp = jnp.maximum(h, _SERIES_RADIUS)  # h > 1 where used
    if name == "reverse_kl":
        # r log r - (r - 1) = sum_{n>=2} (n - 1) h^n / n!
        series = _series(hs, lambda n: (n - 1) / math.factorial(n))
        large = jnp.where(h > 0, jnp.exp(hp) * (hp - 1.0) + 1.0, hn * jnp.exp(hn) - jnp.expm1(hn))
    elif name == "forward_kl":
        # -log r + (r - 1) = expm1(h) - h = sum_{n>=2} h^n / n!
        series = _series(hs, lambda n: 1.0 / math.factorial(n))
        large = jnp.expm1(h) - h
    elif name == "jsd":
        # With w = tanh(h/2) = (r - 1)/(r + 1): f(r) = S(w) / (1 - w), where
        # S(w) = (1 + w) log1p(w) + (1 - w) log1p(-w) = sum_{k>=1} w^2k / (k (2k - 1)).
        w = jnp.tanh(hs / 2)
        series = _series(w, lambda n: 0.0 if n % 2 else 1.0 / ((n // 2) * (n - 1)),
                         order=2 * _SERIES_ORDER) / (1.0 - w)
        # f(r) = e^h A - B with A = log(2r / (1 + r)) in (0, log 2] for h > 0 and
        # B = log((1 + r) / 2): e^h A as one exp, finite wherever f is.
        a_pos = -jnp.log1p(jnp.expm1(-hp) / 2)
        b_pos = jax.nn.softplus(hp) - _LOG2
        large = jnp.where(h > 0, jnp.exp(hp + jnp.log(a_pos)) - b_pos, Divergence("jsd").f(hn))
    elif name == "alpha":
        # f(r) = [(1 - a) expm1(h) - expm1((1 - a) h)] / (a (1 - a))
        #      = sum_{n>=2} [1 - (1 - a)^(n-1)] / a  h^n / n!
        series = _series(hs, lambda n: -jnp.expm1((n - 1) * jnp.log1p(-a))
                         / a / float(math.factorial(n)))
        low = ((1.0 - a) * jnp.expm1(hn) - jnp.expm1((1.0 - a) * hn)) / (a * (1.0 - a))
        # h > 0: e^h [(1 - a) + a e^-h - e^-ah] / (a (1 - a)) as one exp of a sum of logs, so
        # the value is finite wherever the true one is (no inf - inf).
        bracket = (1.0 - a) + a * jnp.exp(-hp) - jnp.exp(-a * hp)
        large = jnp.where(h > 0, jnp.exp(hp + jnp.log(bracket) - jnp.log(a * (1.0 - a))), low)
    else:  # total_variation, chi_squared: f'(1) = 0
        return Divergence(name).f(h)
    return jnp.where(small, series, large)


@_estimator.defjvp
def _estimator_jvp(name, primals, tangents):
    h, a = primals
    dh, _ = tangents
    hn, hp = jnp.minimum(h, 0.0), jnp.maximum(h, 0.0)
    huge = h > _EXP_SAFE  # e^h overflows: take the product as one exp of a sum of logs
    hh = jnp.maximum(h, _EXP_SAFE)
    # d/dh [f(e^h) - f'(1)(e^h - 1)] = e^h (f'(e^h) - f'(1)), each factor bounded where the
    # other overflows.
    if name == "reverse_kl":
        slope = h * jnp.exp(h)
    elif name == "forward_kl":
        slope = jnp.expm1(h)
    elif name == "jsd":  # e^h log(2u / (1 + u)) = -e^h log1p(expm1(-h) / 2)
        mid = jnp.clip(h, -_EXP_SAFE, _EXP_SAFE)
        log_term = jnp.where(h < -_EXP_SAFE, _LOG2 + jax.nn.log_sigmoid(hn),
                             -jnp.log1p(jnp.expm1(-mid) / 2))
        slope = jnp.where(huge, jnp.exp(hh + jnp.log(-jnp.log1p(jnp.expm1(-hh) / 2))),
                          jnp.exp(jnp.minimum(h, _EXP_SAFE)) * log_term)
    elif name == "alpha":  # e^h (1 - e^-ah) / a
        mid = jnp.minimum(hp, _EXP_SAFE)
        slope = jnp.where(h < 0, jnp.exp((1.0 - a) * hn) * jnp.expm1(a * hn) / a,
                          jnp.where(huge, jnp.exp(hh + jnp.log(-jnp.expm1(-a * hh)) - jnp.log(a)),
                                    -jnp.exp(mid) * jnp.expm1(-a * mid) / a))
    else:
        return _estimator(name, h, a), jax.jvp(Divergence(name).f, (h,), (dh,))[1]
    return _estimator(name, h, a), slope * dh


def _require_admissible(name: str) -> None:
    if name == "total_variation":
        raise ValueError(
            "total_variation is not admissible for f-DPO: its f'(u) = sign(u - 1)/2 is not "
            "invertible and 0 is in dom(f'), so Theorem 1 (thesis ch. 2) does not hold and the "
            "normalising constant does not cancel in the Bradley-Terry model"
        )
    if name == "chi_squared":
        raise ValueError(
            "chi_squared is not admissible for f-DPO: f'(u) = 2(u - 1) is finite at u = 0, so 0 "
            "is in dom(f'), the KKT multipliers of pi(y) >= 0 need not vanish (Theorem 1, thesis "
            "ch. 2) and the normalising constant does not cancel in the Bradley-Terry model"
        )


def get_divergence(name: str, *, alpha: float | jax.Array | None = None,
                   admissible_only: bool = True) -> Divergence:
    """Validates `name` / `alpha` and returns the Divergence.

    Raises:
      ValueError: unknown name; alpha missing, given for another divergence, not in (0, 1) or
        below float32's smallest normal number;
        total_variation / chi_squared when `admissible_only` (Theorem 1).
    """
    if name not in ADMISSIBLE + INADMISSIBLE:
        raise ValueError(f"unknown divergence {name!r}; expected one of {ADMISSIBLE + INADMISSIBLE}")
    if admissible_only:
        _require_admissible(name)
    if name == "alpha":
        if alpha is None:
            raise ValueError("divergence='alpha' needs alpha in (0, 1)")
        if isinstance(alpha, (int, float)) and not 0.0 < alpha < 1.0:
            raise ValueError(
                f"alpha must be in (0, 1) (alpha -> 0 is reverse_kl, alpha -> 1 is forward_kl), "
                f"got {alpha!r}"
            )
        if isinstance(alpha, (int, float)) and alpha < jnp.finfo(jnp.float32).tiny:
            raise ValueError(f"alpha={alpha!r} is below float32's smallest normal number "
                             f"({jnp.finfo(jnp.float32).tiny:.3g}), which compiled code flushes "
                             f"to 0; use divergence='reverse_kl' (the alpha -> 0 limit)")
    elif alpha is not None:
        raise ValueError(f"alpha={alpha!r} was given but divergence={name!r} takes no alpha")
    return Divergence(name, alpha)


def f_prime(name: str, logratio: jax.Array, *, alpha: float | None = None) -> jax.Array:
    """f'(u) at u = exp(logratio) for an admissible divergence (Table 2.1), float32.

    Args:
      name: "reverse_kl", "forward_kl", "jsd" or "alpha".
      logratio: any shape, log pi_theta - log pi_ref.
      alpha: in (0, 1), only with name="alpha".

    Returns:
      Same shape as `logratio`, float32.

    Raises:
      ValueError: for "total_variation" / "chi_squared" (Theorem 1), unknown names, bad alpha.

    Examples:
      >>> import jax.numpy as jnp
      >>> f_prime("reverse_kl", jnp.array([0.0, 1.0]))
      Array([1., 2.], dtype=float32)
      >>> f_prime("forward_kl", jnp.array([0.0]))
      Array([-1.], dtype=float32)
    """
    return get_divergence(name, alpha=alpha).f_prime(logratio)


def f_divergence(name: str, log_p: jax.Array, log_q: jax.Array, *,
                 alpha: float | None = None, axis: int = -1) -> jax.Array:
    """D_f(p, q) = sum_y q(y) f(p(y)/q(y)) for categorical p, q given as log-probabilities.

    Any of the six divergences of Table 2.1 (this is a value, not a loss, so the inadmissible
    ones are allowed). Shapes: log_p, log_q [..., N] -> [...].
    """
    div = get_divergence(name, alpha=alpha, admissible_only=False)
    log_p, log_q = as_float32(log_p), as_float32(log_q)
    return jnp.sum(jnp.exp(log_q) * div.f(log_p - log_q), axis=axis)


def f_divergence_estimator(name: str, log_ratio: jax.Array, *, alpha: float | None = None,
                           sampled_from: str = "q") -> jax.Array:
    """Per-sample terms of the §2.8.2 estimator of D_f(p, q) = E_q[f(p/q)]; their mean is it.

    Args:
      name: any divergence of Table 2.1 except chi-squared with `sampled_from="p"`.
      log_ratio: any shape, log p(x) - log q(x) of the samples x (per-sequence log-ratios).
      alpha: in (0, 1), only with name="alpha".
      sampled_from: "q" if x ~ q: terms f(r) - f'(1)(r - 1), r = p/q; "p" if x ~ p: terms
        g(t) - g'(1)(t - 1), t = q/p, with g the conjugate (D_f(p, q) = D_g(q, p)).

    Returns:
      Same shape as `log_ratio`, float32, every term >= 0.

    For a policy pi and reference pi_ref with samples y ~ pi and h = log pi(y) - log pi_ref(y):
    `f_divergence_estimator("reverse_kl", h, sampled_from="p")` estimates KL(pi || pi_ref)
    = D_f(pi, pi_ref) (terms h + e^-h - 1, Schulman's k3), the divergence that f-DPO's
    reverse KL regularises.

    Examples:
      >>> import jax.numpy as jnp
      >>> f_divergence_estimator("reverse_kl", jnp.array([0.0, 1.0]), sampled_from="p")
      Array([0.       , 0.3678794], dtype=float32)
    """
    if sampled_from not in ("p", "q"):
        raise ValueError(f"sampled_from must be 'p' or 'q', got {sampled_from!r}")
    div = get_divergence(name, alpha=alpha, admissible_only=False)
    if sampled_from == "q":
        return div.estimator(log_ratio)
    return div.conjugate().estimator(-as_float32(log_ratio))
