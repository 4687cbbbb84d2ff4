"""Multi-sample preference objectives: mDPO and mIPO on groups of log-ratios (thesis §3.5).

A preference is given between two *groups* of responses to one prompt, G_w (K members) and
G_l (L members). The group's implicit reward is the mean of its members' implicit rewards
(the geometric mean of the likelihoods, §3.5.1), so with h = log pi_theta(y|x) - log pi_ref(y|x):

    mDPO:  -log sigmoid(beta mean_k h_w,k - beta mean_l h_l,l)
    mIPO:  (mean_k h_w,k - mean_l h_l,l - 1/(2 tau))^2 - var_w / K - var_l / L   (Prop. 1)

Composition with chapter 2: under an f-divergence the implicit reward of a response is
beta f'(u), u = pi_theta/pi_ref, so a group's reward is the group mean of beta f'(u)
(`divergence=`); "reverse_kl" (f'(u) = log u + 1, the +1 cancels) is the thesis exactly.

Ragged groups: `chosen_mask` [B, K] / `rejected_mask` [B, L] mark the valid members. Padded
members affect neither the value nor the gradient, whatever they hold (inf/NaN-producing
garbage included): they are replaced before any arithmetic ("double where").

Degenerate groups:
  * a group with exactly one valid member has no sample variance; mIPO applies no variance
    correction to it (its term is the plain, biased one) and `mipo_loss_with_metrics` counts
    it in "num_uncorrected_groups";
  * an example whose chosen or rejected group has no valid member has loss 0 and zero
    gradient (it is padding), counted in "num_empty_examples".
A *static* group size K < 2 or L < 2 with `unbiased=True` raises ValueError: no member of
that side could ever be corrected, which is almost certainly a mistake (use unbiased=False).

The NLL/SFT regulariser (thesis §3.6.1, footnote 3) composes by addition:
`mdpo_loss(...) + weight * group_nll_loss(chosen_token_logps, chosen_token_mask, chosen_mask)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_positive, check_rank
from alignax.divergences import (_softplus_difference, frexp32, get_divergence, ldexp32,
                                 scaled_exp)
from alignax.objectives.fdpo import group_loss, nll_loss, power_group_margin


def _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask):
    """Checks ranks/shapes and returns the two boolean masks ([B, K], [B, L])."""
    check_rank("chosen_h", chosen_h, 2)
    check_rank("rejected_h", rejected_h, 2)
    if jnp.shape(chosen_h)[0] != jnp.shape(rejected_h)[0]:
        raise ValueError(f"batch size mismatch: chosen_h {jnp.shape(chosen_h)}, "
                         f"rejected_h {jnp.shape(rejected_h)}")
    masks = []
    for name, h, mask in (("chosen", chosen_h, chosen_mask),
                          ("rejected", rejected_h, rejected_mask)):
        if mask is None:
            masks.append(jnp.ones(jnp.shape(h), dtype=bool))
            continue
        if jnp.shape(mask) != jnp.shape(h):
            raise ValueError(f"{name}_mask {jnp.shape(mask)} must have the shape of "
                             f"{name}_h {jnp.shape(h)}")
        masks.append(jnp.asarray(mask) != 0)
    return masks[0], masks[1]


def _group_inputs(chosen_h, rejected_h, chosen_mask, rejected_mask):
    """Sanitised groups on validated boolean masks.

    Returns (empty [B], h_w [B, K], h_l [B, L], valid_w [B, K], valid_l [B, L]). `empty`
    marks examples with an empty group: all their members count as valid and hold h = 0 (the
    caller zeroes their result, and their gradient is then an exact 0). Padded members hold
    h = 0 (the first "where": padding never enters any arithmetic).
    """
    empty = ~(jnp.any(chosen_mask, axis=-1) & jnp.any(rejected_mask, axis=-1))  # [B]
    h_w = jnp.where(chosen_mask & ~empty[:, None], as_float32(chosen_h), 0.0)
    h_l = jnp.where(rejected_mask & ~empty[:, None], as_float32(rejected_h), 0.0)
    return empty, h_w, h_l, chosen_mask | empty[:, None], rejected_mask | empty[:, None]


def _weights(valid):
    """[B, N] bool -> float32 weights 1/count on the valid members, 0 elsewhere."""
    v = valid.astype(jnp.float32)
    return v / jnp.maximum(jnp.sum(v, axis=-1, keepdims=True), 1.0)


def _group_means(div, h_w, h_l, valid_w, valid_l):
    """(mean_k g_w,k, mean_l g_l,l) [B] with g = f'(u) - 1 (reverse KL) or f'(u) - log 2 (JSD),
    weights applied first so the sums cannot overflow."""
    g = (lambda h: h) if div.name == "reverse_kl" else jax.nn.log_sigmoid  # log(2u/(1+u)) - log 2
    return (jnp.sum(_weights(valid_w) * g(h_w), axis=-1),
            jnp.sum(_weights(valid_l) * g(h_l), axis=-1))


def group_margin(chosen_h: jax.Array, rejected_h: jax.Array, *, divergence: str = "reverse_kl",
                 alpha: float | jax.Array | None = None, chosen_mask: jax.Array | None = None,
                 rejected_mask: jax.Array | None = None) -> jax.Array:
    """Difference of group means of f'(u): mean_k f'(u_w,k) - mean_l f'(u_l,l), [B] float32.

    For reverse KL this is mean_k h_w - mean_l h_l (§3.5.1). Forward KL / alpha (f'(u) =
    (1 - u^-a)/a) use mean_k u_k^-a = e^(log-mean-exp of -a h_k), so the difference is formed
    without inf - inf and is inf only where the true value exceeds float32; its derivative,
    (1/K) e^(-a h_w,k) per chosen member, is finite wherever the true one is. Examples with an
    empty group give 0 and no gradient.

    Args:
      chosen_h: [B, K] log-ratios of the preferred group.
      rejected_h: [B, L] log-ratios of the dispreferred group.
      divergence, alpha: as in `fdpo_loss`.
      chosen_mask, rejected_mask: [B, K] / [B, L] valid members (default: all valid).
    """
    chosen_mask, rejected_mask = _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask)
    div = get_divergence(divergence, alpha=alpha)
    empty, h_w, h_l, valid_w, valid_l = _group_inputs(chosen_h, rejected_h, chosen_mask,
                                                      rejected_mask)
    if div.power is not None:
        power = jax.lax.stop_gradient(as_float32(div.power))
        margin = power_group_margin(h_w, h_l, _weights(valid_w), _weights(valid_l), power)
    else:
        mean_w, mean_l = _group_means(div, h_w, h_l, valid_w, valid_l)
        margin = mean_w - mean_l
    return jnp.where(empty, 0.0, margin)


def mdpo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, beta: float | jax.Array,
              chosen_mask: jax.Array | None = None, rejected_mask: jax.Array | None = None,
              divergence: str = "reverse_kl", alpha: float | jax.Array | None = None) -> jax.Array:
    """Multi-sample DPO: -log sigmoid(beta mean_k f'(u_w,k) - beta mean_l f'(u_l,l)) (§3.5.1).

    With reverse KL (default) this is the thesis' L_mDPO, -log sigmoid(beta mean h_w -
    beta mean h_l); with K = L = 1 it is DPO (`fdpo_loss`) exactly. The estimator is biased
    for the population mDPO objective (the sigmoid is non-linear, §3.5.2).

    Numerics as in `fdpo_loss`: no NaN for finite inputs, the loss inf only where its true
    value exceeds float32, gradients finite wherever the true ones are (the derivative
    -(beta/K) sigmoid(-z) f''(h_w,k) of a chosen member is written out), and alpha -> 0 tends
    to reverse KL to float32 accuracy (the group means of u^-a are formed through expm1 /
    log1p of -a (h - min h)). beta and alpha get no gradient.

    Args:
      chosen_h: [B, K] log-ratios of the preferred group (any float dtype; computed in f32).
      rejected_h: [B, L] log-ratios of the dispreferred group; L may differ from K.
      beta: > 0.
      chosen_mask, rejected_mask: [B, K] / [B, L] bool or 0/1, valid members (default all).
      divergence, alpha: f-divergence of the implicit reward (Table 2.1), as in `fdpo_loss`.

    Returns:
      [B] float32 per-example losses; 0 (and no gradient) where a group has no valid member.

    Raises:
      ValueError: ranks other than 2, batch or mask shape mismatches, beta <= 0, bad divergence.

    Examples:
      >>> import jax.numpy as jnp
      >>> mdpo_loss(jnp.zeros((1, 3)), jnp.zeros((1, 2)), beta=0.1)  # log 2
      Array([0.6931472], dtype=float32)
    """
    check_positive("beta", beta)
    chosen_mask, rejected_mask = _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask)
    div = get_divergence(divergence, alpha=alpha)
    empty, h_w, h_l, valid_w, valid_l = _group_inputs(chosen_h, rejected_h, chosen_mask,
                                                      rejected_mask)
    beta, power = jax.lax.stop_gradient(
        (as_float32(beta), as_float32(0.0 if div.power is None else div.power)))
    loss = group_loss(div.name, h_w, h_l, _weights(valid_w), _weights(valid_l), beta, power)
    return jnp.where(empty, 0.0, loss)  # -log sigmoid(beta margin)


def _median_member(h, valid):
    """h of the lower-median valid member of each row ([B, N] -> [B]; 0 for a row without)."""
    count = jnp.sum(valid, axis=-1)
    ordered = jnp.sort(jnp.where(valid, h, jnp.inf), axis=-1)
    t = jnp.take_along_axis(ordered, (jnp.maximum(count - 1, 0) // 2)[:, None], axis=-1)[:, 0]
    return jnp.where(jnp.isfinite(t), t, 0.0)


_LN2 = math.log(2.0)


# Extended numbers for mIPO: x = m 2^k e^(2 half) as (m, k, half): k int32, and on the linear
# path (reverse KL / JSD) half is 0 and every rescaling is an exact power of two.
def _pow2_scale(e):
    """2^e for int e <= 0 (exactly 0 below 2^-126: a term that far below the largest is lost
    only where everything larger cancels exactly)."""
    bits = (jnp.maximum(e, -126) + 127) << 23
    return jnp.where(e < -126, 0.0, jax.lax.bitcast_convert_type(bits, jnp.float32))


def _x_normal(m, k, half):
    """(m, k, half) with m renormalised to [1/2, 1) (exact)."""
    mantissa, exponent = frexp32(m)
    return mantissa, k + exponent, half


def _x_from(value):
    """A float32 array as an extended number."""
    return _x_normal(value, jnp.zeros(jnp.shape(value), jnp.int32), jnp.zeros_like(value))


def _x_sum(x, axis, log_space):
    """sum over `axis`: every term scaled relative to the largest one (by max reductions)."""
    m, k, half = x
    live = m != 0.0
    if log_space:
        score = jnp.where(live, half + k * (0.5 * _LN2), -jnp.inf)
        top = jnp.argmax(score, axis=axis, keepdims=True)  # an index: immune to re-rounding
        is_top = live & (jax.lax.broadcasted_iota(jnp.int32, score.shape, axis % score.ndim)
                         == top)
        k_top = jnp.max(jnp.where(is_top, k, -2**30), axis=axis, keepdims=True)
        half_top = jnp.max(jnp.where(is_top, half, -jnp.inf), axis=axis, keepdims=True)
        half_top = jnp.where(jnp.isfinite(half_top), half_top, 0.0)
        # <= 0 by the choice of the top; the clamp keeps it so where the compiler evaluates
        # half twice with different roundings (at |half| ~ 1e29 one ulp is e^(1e22))
        factor = jnp.exp(jnp.minimum(jnp.where(live, 2.0 * (half - half_top)
                                               + (k - k_top) * _LN2, 0.0), 0.0))
    else:
        k_top = jnp.max(jnp.where(live, k, -2**30), axis=axis, keepdims=True)
        half_top = jnp.zeros_like(jnp.sum(half, axis=axis, keepdims=True))
        factor = _pow2_scale(jnp.where(live, k - k_top, 0))
    total = jnp.sum(jnp.where(live, m * factor, 0.0), axis=axis)  # |total| <= count
    k_top = jnp.where(jnp.any(live, axis=axis, keepdims=True), k_top, 0)
    return total, jnp.squeeze(k_top, axis), jnp.squeeze(half_top, axis)


def _x_add(a, b, log_space):
    return _x_sum(tuple(jnp.stack([u, v], -1) for u, v in zip(a, b)), -1, log_space)


def _x_mul(a, b):
    return a[0] * b[0], a[1] + b[1], a[2] + b[2]


def _x_scale(a, coef):
    """a times a float32 coefficient (|coef| a moderate number)."""
    return a[0] * coef, a[1], a[2]


def _x_leave_one_out(x, log_space):
    """(sum_{j != i} x_j over the last axis [..., N], the full sum [...]).

    S - x_i loses nothing unless x_i dominates S, i.e. for the largest member; its sum is
    taken over the others directly (scaled by the second largest), so no leave-one-out sum
    ever cancels against the member left out.
    """
    m, k, half = x
    total = _x_sum(x, -1, log_space)
    score = k * (0.5 * _LN2) + half if log_space else k.astype(jnp.float32)
    score = jnp.where(m != 0.0, score + jnp.log(jnp.abs(m)), -jnp.inf)
    top = jnp.argmax(score, axis=-1)[..., None] == jnp.arange(m.shape[-1])  # [..., N]
    rest = _x_sum((jnp.where(top, 0.0, m), k, half), -1, log_space)
    broadcast = [tuple(jnp.broadcast_to(v[..., None], m.shape) for v in t)
                 for t in (total, rest)]
    others = _x_add(broadcast[0], (-m, k, half), log_space)
    return tuple(jnp.where(top, r, o) for r, o in zip(broadcast[1], others)), total


def _x_float(x, log_space, log_slope=None):
    """x (times e^log_slope) as float32, inf only beyond float32."""
    m, k, half = x
    exponent = 2.0 * half if log_space else 0.0
    if log_slope is not None:
        exponent = exponent + log_slope
    if not log_space and log_slope is None:
        return ldexp32(m, k)
    return jnp.sign(m) * scaled_exp(jnp.abs(m), jnp.log(jnp.abs(m)) + k * _LN2, exponent, k)


def _mipo_members(name, h, valid, power):
    """The members' implicit rewards shifted by the median member t, y = g(h) - g(t), as
    extended numbers [B, N], with log g'(h) [B, N]; padded members are 0.

    The loss depends on differences of g only. Shifting by a member makes y exact where members
    are close (and alpha -> 0 exact, where g = -u^-a / a is a huge constant plus a tiny
    difference). Reverse KL / JSD: y by halves (no overflow). Forward KL / alpha:
    y = -(e^(-a h) - e^(-a t))/a = (-bracket / a) e^(-a min(h, t)), the bracket from expm1 and
    the exponent kept apart.
    """
    t = _median_member(h, valid)[:, None]
    if name in ("forward_kl", "alpha"):  # g(h) = -e^(-a h)/a
        d = -power * (h - t)
        bracket = jnp.expm1(jnp.minimum(d, 0.0)) - jnp.expm1(-jnp.maximum(d, 0.0))
        m, k, _ = _x_normal(jnp.where(valid, -bracket / power, 0.0),
                            jnp.zeros(h.shape, jnp.int32), None)
        return (m, k, -0.5 * power * jnp.minimum(h, t)), -power * h  # g'(h) = e^(-a h)
    if name == "reverse_kl":  # g(h) = h
        y_half, log_slope = 0.5 * h - 0.5 * t, jnp.zeros_like(h)
    else:  # jsd: g(h) = log sigmoid(h), g'(h) = sigmoid(-h)
        y_half, log_slope = 0.5 * _softplus_difference(-t, -h), -jax.nn.softplus(h)
    m, k, _ = _x_normal(jnp.where(valid, y_half, 0.0), jnp.ones(h.shape, jnp.int32), None)
    return (m, k, jnp.zeros_like(h)), log_slope


def _mipo_parts(name, unbiased, h_w, h_l, valid_w, valid_l, c, power, grads):
    """(loss [B], d loss / d h [B, K + L], d loss / d c [B]); the gradients only with `grads`.

    With S_G the group sums of y, n_G the group sizes, D = S_w/K - S_l/L - c:
      biased:   D^2
      unbiased: W_w + W_l - 2 S_w S_l/(K L) - 2 c S_w/K + 2 c S_l/L + c^2        (Prop. 1)
    where W = U / (n (n - 1)), U = sum_{i != j} y_i y_j = sum_i y_i (sum_{j != i} y_j), the
    U-statistic of mean^2 (a group with one member: W = y^2, no correction). No square of a
    member appears, so nothing cancels between D^2 and the variances; every sum is taken over
    extended numbers, in O(K + L). The two groups are handled side by side on a [B, 2, N]
    layout (N = max(K, L), padding members 0).
    """
    log_space = name in ("forward_kl", "alpha")
    b, k_w, k_l = h_w.shape[0], h_w.shape[-1], h_l.shape[-1]
    width = max(k_w, k_l)

    def layout(x, y, fill):  # [B, K], [B, L] -> [B, 2, N]
        pad = lambda a: jnp.concatenate(  # noqa: E731
            [a, jnp.full((b, width - a.shape[-1]), fill, a.dtype)], -1)
        return jnp.stack([pad(x), pad(y)], 1)

    valid = layout(valid_w, valid_l, False)
    flat, log_slope = _mipo_members(name, layout(h_w, h_l, 0.0).reshape(b, 2 * width),
                                    valid.reshape(b, 2 * width), power)
    members = tuple(v.reshape(b, 2, width) for v in flat)
    n = jnp.sum(valid, -1).astype(jnp.float32)  # [B, 2]
    sign = jnp.array([1.0, -1.0])
    loo, sums = _x_leave_one_out(members, log_space)  # [B, 2, N], [B, 2]
    cx = _x_from(c)  # [B]
    d = _x_sum(tuple(jnp.concatenate([u, v[:, None]], -1) for u, v in zip(
        _x_scale(sums, sign / n), _x_scale(cx, -1.0))), -1, log_space)  # D = S_w/K - S_l/L - c
    corrected = n >= 2.0  # [B, 2]
    pairs = n * jnp.maximum(n - 1.0, 1.0)
    if unbiased:
        u = _x_sum(_x_mul(members, loo), -1, log_space)  # [B, 2]
        within = tuple(jnp.where(corrected, p, q) for p, q in zip(
            _x_scale(u, 1.0 / pairs), _x_scale(_x_mul(sums, sums), 1.0 / jnp.square(n))))
        s_w, s_l = (tuple(v[:, g] for v in sums) for g in (0, 1))
        cross = _x_scale(_x_mul(s_w, s_l), -2.0 / (n[:, 0] * n[:, 1]))
        linear = _x_scale(_x_mul(tuple(v[:, None] for v in cx), sums), -2.0 * sign / n)
        square = _x_mul(cx, cx)
        terms = tuple(jnp.concatenate([a, b_[:, None], l_, s_[:, None]], -1)
                      for a, b_, l_, s_ in zip(within, cross, linear, square))  # [B, 6]
        loss = _x_float(_x_sum(terms, -1, log_space), log_space)
    else:
        loss = _x_float(_x_mul(d, d), log_space)
    if not grads:
        return loss, None, None
    expand = lambda x: tuple(v[..., None] for v in x)  # noqa: E731, [B, 2] -> [B, 2, 1]
    if unbiased:  # member a of group G: 2 LOO_a/(n(n-1)) - 2 S_other/(K L) - 2 sign c/n
        own = tuple(jnp.where(corrected[..., None], p, q) for p, q in zip(
            _x_scale(loo, (2.0 / pairs)[..., None]),
            expand(_x_scale(sums, 2.0 / jnp.square(n)))))  # a group of one: 2 S / n^2
        other = tuple(jnp.flip(v, 1) for v in sums)
        cross = expand(_x_scale(other, -2.0 / (n[:, :1] * n[:, 1:])))
        target = expand(_x_scale(tuple(v[:, None] for v in cx), -2.0 * sign / n))
        stacked = tuple(jnp.stack([p, jnp.broadcast_to(q, p.shape), jnp.broadcast_to(r, p.shape)],
                                  -1) for p, q, r in zip(own, cross, target))
        dy = _x_sum(stacked, -1, log_space)  # [B, 2, N]
        d_c = _x_float(_x_sum(tuple(jnp.concatenate([u, v[:, None]], -1) for u, v in zip(
            _x_scale(sums, -2.0 * sign / n), _x_scale(cx, 2.0))), -1, log_space), log_space)
    else:  # d/dy_a = 2 D sign_G / n_G, d/dc = -2 D
        dy = tuple(jnp.broadcast_to(v[:, None, None], members[0].shape) for v in d)
        dy = _x_scale(dy, (2.0 * sign / n)[..., None])
        d_c = _x_float(_x_scale(d, -2.0), log_space)
    d_h = _x_float(tuple(v.reshape(b, 2 * width) for v in dy), log_space,
                   None if name == "reverse_kl" else log_slope).reshape(b, 2, width)
    return loss, jnp.concatenate([d_h[:, 0, :k_w], d_h[:, 1, :k_l]], -1), d_c


def _mipo_correction(name, h_w, h_l, valid_w, valid_l, c, power):
    """var_w / K + var_l / L (0 for a group of one), the unbiased estimator's correction, as
    S^2/n^2 - U/(n (n - 1)) per group of the shifted rewards (a metric: no gradient)."""
    log_space = name in ("forward_kl", "alpha")
    k_w = h_w.shape[-1]
    members, _ = _mipo_members(name, jnp.concatenate([h_w, h_l], -1),
                               jnp.concatenate([valid_w, valid_l], -1), power)
    total = 0.0
    for part, valid in ((slice(0, k_w), valid_w), (slice(k_w, None), valid_l)):
        x = tuple(v[:, part] for v in members)
        n = jnp.sum(valid, -1).astype(jnp.float32)
        loo, s = _x_leave_one_out(x, log_space)
        u = _x_sum(_x_mul(x, loo), -1, log_space)
        terms = (_x_scale(_x_mul(s, s), 1.0 / jnp.square(jnp.maximum(n, 1.0))),
                 _x_scale(u, -1.0 / (n * jnp.maximum(n - 1.0, 1.0))))
        var = _x_float(_x_sum(tuple(jnp.stack(v, -1) for v in zip(*terms)), -1, log_space),
                       log_space)
        total = total + jnp.where(n >= 2.0, var, 0.0)
    return total


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _mipo(name, unbiased, h_w, h_l, valid_w, valid_l, c, power):
    """mIPO per example [B] on sanitised groups (`_group_inputs`; valid_* boolean).

    The derivative is written out (`_mipo_parts`): d loss / d y_a as one sum of extended
    numbers (leave-one-out sums that never cancel, `_x_leave_one_out`), times
    g'(h_a), so it is finite wherever the true one is; the target c = 1/(2 tau) gets its
    derivative too, power none.
    """
    return _mipo_parts(name, unbiased, h_w, h_l, valid_w, valid_l, c, power, grads=False)[0]


@_mipo.defjvp
def _mipo_jvp(name, unbiased, primals, tangents):
    h_w, h_l = primals[:2]
    d_w, d_l, _, _, d_c, _ = tangents
    loss, d_h, dc = _mipo_parts(name, unbiased, *primals, grads=True)
    k = h_w.shape[-1]
    tangent = jnp.sum(d_h[:, :k] * d_w, -1) + jnp.sum(d_h[:, k:] * d_l, -1) + dc * d_c
    return loss, tangent


def mipo_loss_with_metrics(chosen_h: jax.Array, rejected_h: jax.Array, *, tau: float | jax.Array,
                           unbiased: bool = True, chosen_mask: jax.Array | None = None,
                           rejected_mask: jax.Array | None = None, divergence: str = "reverse_kl",
                           alpha: float | jax.Array | None = None):
    """`mipo_loss` plus metrics about its variance correction.

    Returns:
      (loss [B] float32, metrics) where metrics is a dict of scalars:
        "num_uncorrected_groups": int32, groups (chosen or rejected, in non-empty examples)
          with exactly one valid member, which get no variance correction;
        "num_empty_examples": int32, examples with an empty group (loss 0);
        "mean_variance_correction": float32, batch mean of var_w/K + var_l/L (0 if biased).
    """
    check_positive("tau", tau)
    chosen_mask, rejected_mask = _validate_groups(chosen_h, rejected_h, chosen_mask, rejected_mask)
    k, l = jnp.shape(chosen_h)[1], jnp.shape(rejected_h)[1]
    if unbiased and min(k, l) < 2:
        raise ValueError(
            f"unbiased=True needs at least 2 members per group to estimate a variance "
            f"(Proposition 1), got chosen_h {jnp.shape(chosen_h)} and rejected_h "
            f"{jnp.shape(rejected_h)}; use unbiased=False for single samples (IPO)")
    div = get_divergence(divergence, alpha=alpha)
    empty, h_w, h_l, valid_w, valid_l = _group_inputs(chosen_h, rejected_h, chosen_mask,
                                                      rejected_mask)
    c = jnp.broadcast_to(0.5 / as_float32(tau), jnp.shape(empty))  # target margin 1/(2 tau)
    power = jax.lax.stop_gradient(as_float32(0.0 if div.power is None else div.power))
    loss = jnp.where(empty, 0.0, _mipo(div.name, unbiased, h_w, h_l, valid_w, valid_l, c, power))
    correction = jnp.zeros_like(loss)
    if unbiased:  # var_w/K + var_l/L, a metric (no gradient)
        args = jax.lax.stop_gradient((h_w, h_l, c, power))
        correction = jnp.where(empty, 0.0, _mipo_correction(div.name, args[0], args[1], valid_w,
                                                             valid_l, args[2], args[3]))
    single = (jnp.sum(chosen_mask, -1) == 1).astype(jnp.int32) + (jnp.sum(rejected_mask, -1) == 1)
    metrics = {
        "num_uncorrected_groups": jnp.sum(jnp.where(empty, 0, single)).astype(jnp.int32),
        "num_empty_examples": jnp.sum(empty).astype(jnp.int32),
        "mean_variance_correction": jnp.mean(correction),
    }
    return loss, metrics


def mipo_loss(chosen_h: jax.Array, rejected_h: jax.Array, *, tau: float | jax.Array,
              unbiased: bool = True, chosen_mask: jax.Array | None = None,
              rejected_mask: jax.Array | None = None, divergence: str = "reverse_kl",
              alpha: float | jax.Array | None = None) -> jax.Array:
    """Multi-sample IPO with the unbiased mini-batch estimator of Proposition 1 (§3.5.2).

        (mean_k g_w,k - mean_l g_l,l - 1/(2 tau))^2 - var_w / K - var_l / L

    with g = h (reverse KL, the thesis) or g = f'(u) (other divergences), var the sample
    variance with the K-1 (L-1) denominator and K, L the numbers of valid members. Over random
    groups it is unbiased for (E g_w - E g_l - 1/(2 tau))^2 (Prop. 1), so its value can be
    negative. `unbiased=False` drops the correction (the thesis' plain L_mIPO, biased upwards by
    Var(g_w)/K + Var(g_l)/L); with K = L = 1 and unbiased=False it is IPO exactly.

    A group with one valid member gets no correction; an example with an empty group gives 0
    (see the module docstring and `mipo_loss_with_metrics`).

    Unbounded below on a fixed data set: a policy that can fit individual responses lowers the
    unbiased loss without limit by spreading the members of a group apart (their mean, and
    with it the first term, unchanged; the subtracted variance growing), so minimising it on
    a fixed data set diverges (tests/test_multisample_theory.py follows gradient descent on a
    10-arm policy down). The NLL term (`group_nll_loss`), early stopping or parameters shared
    across responses keep it in check; `unbiased=False` is >= 0.

    Numerics: the loss is formed as U-statistics of the implicit rewards shifted by the median
    member (no square of a member, so nothing cancels between the square and the variances;
    alpha -> 0 exact), value and gradient finite wherever the true ones are and inf only
    beyond float32, the gradient written out. tau gets a gradient, alpha does not.

    Args:
      chosen_h: [B, K] log-ratios of the preferred group (any float dtype; computed in f32).
      rejected_h: [B, L] log-ratios of the dispreferred group.
      tau: > 0; the target margin is 1/(2 tau).
      unbiased: subtract the Bessel-corrected variances over the group sizes (Prop. 1).
      chosen_mask, rejected_mask: [B, K] / [B, L] valid members (default all).
      divergence, alpha: f-divergence of the implicit reward (Table 2.1).

    Returns:
      [B] float32 per-example losses.

    Raises:
      ValueError: static K < 2 or L < 2 with unbiased=True; bad ranks/shapes; tau <= 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> mipo_loss(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]]), tau=0.5)  # (2-1)^2 - 2/2
      Array([0.], dtype=float32)
    """
    return mipo_loss_with_metrics(chosen_h, rejected_h, tau=tau, unbiased=unbiased,
                                  chosen_mask=chosen_mask, rejected_mask=rejected_mask,
                                  divergence=divergence, alpha=alpha)[0]


def group_nll_loss(token_logps: jax.Array, token_mask: jax.Array,
                   group_mask: jax.Array | None = None) -> jax.Array:
    """NLL/SFT term of a group (§3.6.1, footnote 3): mean over valid members of `nll_loss`.

    Args:
      token_logps: [B, K, T] per-token log-probabilities of the chosen group's responses.
      token_mask: [B, K, T] True on response tokens.
      group_mask: [B, K] valid members (default all).

    Returns:
      [B] float32; 0 with no gradient for a row without valid members.
    """
    check_rank("token_logps", token_logps, 3)
    if jnp.shape(token_mask) != jnp.shape(token_logps):
        raise ValueError(f"token_mask {jnp.shape(token_mask)} must have the shape of "
                         f"token_logps {jnp.shape(token_logps)}")
    b, k, t = jnp.shape(token_logps)
    if group_mask is None:
        group_mask = jnp.ones((b, k), dtype=bool)
    elif jnp.shape(group_mask) != (b, k):
        raise ValueError(f"group_mask {jnp.shape(group_mask)} must be [B, K] = {(b, k)}")
    group_mask = jnp.asarray(group_mask) != 0
    per_member = nll_loss(jnp.reshape(token_logps, (b * k, t)),  # [B*K, T]
                          jnp.reshape(token_mask, (b * k, t)))
    per_member = jnp.where(group_mask, jnp.reshape(per_member, (b, k)), 0.0)  # [B, K]
    count = jnp.sum(group_mask, axis=-1)
    return jnp.sum(per_member, axis=-1) / jnp.maximum(count, 1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------
# Objective configs (the contract is in alignax.objectives.registry): mDPO and mIPO on the
# step's grouped scores [B, K].

import dataclasses  # noqa: E402
from typing import ClassVar  # noqa: E402

from alignax.objectives.fdpo import check_divergence  # noqa: E402
from alignax.objectives.registry import (CAUSAL_LM, GROUPED_FORMATS, PAIR_ROLES,  # noqa: E402
                                         Needs, Objective, ObjectiveInputs, check_hyper,
                                         group_mean, pair_metrics, register)
from alignax.schedules import Hyper  # noqa: E402

_GROUPED = Needs(model=CAUSAL_LM, roles=PAIR_ROLES, formats=GROUPED_FORMATS, grouped=True)


@register("mdpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MDPO(Objective):
    """Multi-sample DPO (§3.5.1) on groups of chosen / rejected responses: `mdpo_loss`.

    Attributes:
      beta: > 0 (or a schedule).
      divergence, alpha: f-divergence of the implicit reward (Table 2.1), as in `FDPO`.
      nll_weight: >= 0 (or a schedule), weight of the SFT term averaged over the chosen group
        (`group_nll_loss`, thesis ch. 3 footnote 3).
    """

    beta: Hyper = 0.1
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = _GROUPED
    hyper_parameters: ClassVar[tuple[str, ...]] = ("beta", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "beta", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        check_divergence(self)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"], x.scores["rejected"]  # h, masks [B, K] / [B, L]
        loss = mdpo_loss(chosen.h, rejected.h, beta=hp["beta"], chosen_mask=chosen.group_mask,
                         rejected_mask=rejected.group_mask, divergence=self.divergence,
                         alpha=self.alpha)  # §3.5.1
        return loss, pair_metrics(group_mean(chosen.h, chosen.group_mask),
                                  group_mean(rejected.h, rejected.group_mask), hp["beta"])


@register("mipo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MIPO(Objective):
    """Multi-sample IPO with the unbiased mini-batch estimator of Proposition 1: `mipo_loss`.

    Attributes:
      tau: > 0 (or a schedule); the target margin is 1/(2 tau).
      unbiased: subtract var_w/K + var_l/L (Prop. 1); needs groups of >= 2 members.
      divergence, alpha: as in `MDPO`.
      nll_weight: >= 0 (or a schedule), as in `MDPO`.
    """

    tau: Hyper = 0.1
    unbiased: bool = True
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = _GROUPED
    hyper_parameters: ClassVar[tuple[str, ...]] = ("tau", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "tau", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        check_divergence(self)
        if not isinstance(self.unbiased, bool):
            raise TypeError(f"mipo: unbiased must be a bool, got {self.unbiased!r}")

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"], x.scores["rejected"]
        loss, extra = mipo_loss_with_metrics(
            chosen.h, rejected.h, tau=hp["tau"], unbiased=self.unbiased,
            chosen_mask=chosen.group_mask, rejected_mask=rejected.group_mask,
            divergence=self.divergence, alpha=self.alpha)  # Prop. 1
        return loss, {**pair_metrics(group_mean(chosen.h, chosen.group_mask),
                                     group_mean(rejected.h, rejected.group_mask)),
                      **{f"mipo/{k}": v for k, v in extra.items()}}
