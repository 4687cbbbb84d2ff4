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
import numpy as np

from alignax._checks import as_float32, check_positive, check_rank
from alignax.divergences import _softplus_difference, get_divergence, scaled_exp
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


def _mipo_slots(name, h, valid, c, power):
    """The mIPO quantities as v = m 2^k e^(2 half), without cancellation or overflow.

    Slots [B, N + 1]: the members' implicit rewards shifted by the median member t,
    y = g(h) - g(t) (the loss depends on differences of g only), then the target c = 1/(2 tau).
    Shifting by a member makes y exact where members are close (and alpha -> 0 exact, where
    g = -u^-a / a is a huge constant plus a tiny difference). Reverse KL / JSD: y formed by
    halves (no overflow), half = 0. Forward KL / alpha: y = -(e^(-a h) - e^(-a t))/a =
    (-bracket / a) e^(-a min(h, t)) with the bracket from expm1, its exponent kept apart.
    Every m is normalised to [1/2, 1) by frexp (exact), so products of slots never over- or
    underflow in between.

    Returns (m, k int32, half, log_slope): log_slope = log g'(h) per member (0 for the
    target); padded members have m = 0.
    """
    t = _median_member(h, valid)[:, None]
    zero = jnp.zeros_like(t)
    if name in ("forward_kl", "alpha"):  # g(h) = -e^(-a h)/a
        d = -power * (h - t)
        bracket = jnp.expm1(jnp.minimum(d, 0.0)) - jnp.expm1(-jnp.maximum(d, 0.0))
        raw = jnp.concatenate([-bracket / power, c[:, None]], axis=-1)
        half = jnp.concatenate([-0.5 * power * jnp.minimum(h, t), zero], axis=-1)
        log_slope, shift = -power * h, 0  # g'(h) = e^(-a h)
    else:
        if name == "reverse_kl":  # g(h) = h
            y_half, log_slope = 0.5 * h - 0.5 * t, jnp.zeros_like(h)
        else:  # jsd: g(h) = log sigmoid(h), g'(h) = sigmoid(-h)
            y_half, log_slope = 0.5 * _softplus_difference(-t, -h), -jax.nn.softplus(h)
        raw = jnp.concatenate([y_half, 0.5 * c[:, None]], axis=-1)  # v / 2
        half, shift = jnp.zeros_like(raw), 1
    valid = jnp.concatenate([valid, jnp.ones_like(t, bool)], axis=-1)
    m, k = jnp.frexp(jnp.where(valid, raw, 0.0))
    log_slope = jnp.concatenate([log_slope, zero], axis=-1)
    return m, k + shift, half, log_slope


def _mipo_coefficients(valid_w, valid_l, unbiased):
    """(lam [B, N + 1], Q [B, N + 1, N + 1]): D = sum_a lam_a v_a is mean_w g - mean_l g - c,
    and the loss is D^2 (biased) or sum_ab Q_ab v_a v_b (unbiased).

    Unbiased (Prop. 1): D^2 - var_w/K - var_l/L = U_w + U_l - 2 mean_w mean_l - 2c (mean_w -
    mean_l) + c^2 with U = sum_{i != j} g_i g_j / (n (n - 1)) the U-statistic of mean^2 of a
    group (n >= 2 valid members; a group with one gets no correction, U = g^2). It holds no
    square of a member, so nothing cancels between D^2 and the variances.
    """
    k, l = valid_w.shape[-1], valid_l.shape[-1]
    n_w, n_l = (jnp.sum(v, axis=-1, keepdims=True).astype(jnp.float32) for v in (valid_w, valid_l))
    lam = jnp.concatenate([valid_w / jnp.maximum(n_w, 1.0), valid_l / -jnp.maximum(n_l, 1.0),
                           -jnp.ones_like(n_w)], axis=-1)  # [B, N + 1]
    q = lam[:, :, None] * lam[:, None, :]
    if not unbiased:
        return lam, q
    group = np.array([0] * k + [1] * l + [2])
    same = jnp.asarray((group[:, None] == group[None, :]) & (group[:, None] < 2)
                       & ~np.eye(k + l + 1, dtype=bool))  # distinct members of one group
    valid = jnp.concatenate([valid_w, valid_l, jnp.ones_like(n_w, bool)], axis=-1)
    n = jnp.concatenate([jnp.broadcast_to(n_w, valid_w.shape), jnp.broadcast_to(n_l, valid_l.shape),
                         jnp.ones_like(n_w)], axis=-1)  # [B, N + 1], group size per slot
    pairs = same & valid[:, :, None] & valid[:, None, :]
    u = jnp.where(pairs, (1.0 / (n * jnp.maximum(n - 1.0, 1.0)))[:, :, None], 0.0)
    corrected = jnp.asarray(group[:, None] == group[None, :]) & (n >= 2.0)[:, :, None]
    return lam, jnp.where(corrected & (jnp.asarray(group) < 2)[None, :, None], u, q)


_LN2 = math.log(2.0)


def _signed_sum(terms, k, half, log_space):
    """sum over the last axis of terms 2^k e^(2 half), as (s, k_top, half_top) with value
    s 2^k_top e^(2 half_top): every term is scaled relative to the largest live one, exactly
    (ldexp) when `log_space` is False (then half is 0)."""
    live = terms != 0.0
    score = k * (0.5 * _LN2) + half if log_space else k.astype(jnp.float32)
    top = jnp.argmax(jnp.where(live, score, -jnp.inf), axis=-1)[..., None]
    k_top = jnp.take_along_axis(k, top, axis=-1)
    half_top = jnp.take_along_axis(half, top, axis=-1)
    if log_space:
        scaled = terms * jnp.exp(jnp.where(live, 2.0 * (half - half_top) + (k - k_top) * _LN2,
                                           0.0))
    else:
        scaled = jnp.ldexp(terms, jnp.where(live, k - k_top, 0))
    s = jnp.sum(jnp.where(live, scaled, 0.0), axis=-1)
    return s, k_top[..., 0], half_top[..., 0]


def _assemble(s, k, x=None):
    """s 2^k e^x as float32 (exact ldexp when x is None), inf only beyond float32."""
    if x is None:
        return jnp.ldexp(s, k)
    return jnp.sign(s) * scaled_exp(jnp.abs(s), jnp.log(jnp.abs(s)) + k * _LN2, x, k)


def _quadratic(q, m, k, half, log_space):
    """sum_ab q_ab v_a v_b [B] for v = m 2^k e^(2 half)."""
    flat = (q.shape[0], q.shape[1] * q.shape[2])  # [B, (N + 1)^2]
    s, k_top, half_top = _signed_sum((q * m[:, :, None] * m[:, None, :]).reshape(flat),
                                     (k[:, :, None] + k[:, None, :]).reshape(flat),
                                     (half[:, :, None] + half[:, None, :]).reshape(flat),
                                     log_space)
    return _assemble(s, k_top, 2.0 * half_top if log_space else None)


def _mipo_value(name, unbiased, h_w, h_l, valid_w, valid_l, c, power):
    valid_w, valid_l = valid_w > 0, valid_l > 0
    m, k, half, _ = _mipo_slots(name, jnp.concatenate([h_w, h_l], -1),
                                jnp.concatenate([valid_w, valid_l], -1), c, power)
    lam, q = _mipo_coefficients(valid_w, valid_l, unbiased)
    log_space = name in ("forward_kl", "alpha")
    if unbiased:
        return _quadratic(q, m, k, half, log_space)
    s, k_top, half_top = _signed_sum(lam * m, k, half, log_space)  # D, formed directly
    if not log_space:
        return jnp.square(jnp.ldexp(s, k_top))
    return scaled_exp((jnp.abs(s), jnp.abs(s)), 2.0 * (jnp.log(jnp.abs(s)) + k_top * _LN2),
                      4.0 * half_top, 2 * k_top)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _mipo(name, unbiased, h_w, h_l, valid_w, valid_l, c, power):
    """mIPO per example [B] on sanitised groups (`_group_inputs`; valid_* as float 0/1).

    The derivative is written out: dL/dg_a = 2 sum_b Q_ab v_b (= 2 lam_a D when biased), times
    g'(h_a), as one signed sum of scaled terms, so it is finite wherever the true one is; the
    target c = 1/(2 tau) gets its derivative too, power none.
    """
    return _mipo_value(name, unbiased, h_w, h_l, valid_w, valid_l, c, power)


@_mipo.defjvp
def _mipo_jvp(name, unbiased, primals, tangents):
    h_w, h_l, valid_w, valid_l, c, power = primals
    d_w, d_l, _, _, d_c, _ = tangents
    m, k, half, log_slope = _mipo_slots(
        name, jnp.concatenate([h_w, h_l], -1), jnp.concatenate([valid_w > 0, valid_l > 0], -1),
        c, power)
    _, q = _mipo_coefficients(valid_w > 0, valid_l > 0, unbiased)
    # d loss / d h_a = g'(h_a) 2 sum_b Q_ab v_b: terms 2 Q_ab m_b 2^(k_b) e^(2 half_b) g'(h_a)
    terms, ks = 2.0 * q * m[:, None, :], jnp.broadcast_to(k[:, None, :], q.shape)
    if name in ("forward_kl", "alpha"):
        s, k_top, half_top = _signed_sum(terms, ks, half[:, None, :] + 0.5 * log_slope[..., None],
                                         True)
        grads = _assemble(s, k_top, 2.0 * half_top)
    else:
        s, k_top, _ = _signed_sum(terms, ks, jnp.zeros(q.shape), False)
        grads = _assemble(s, k_top, None if name == "reverse_kl" else log_slope)
    kw, kl = h_w.shape[-1], h_l.shape[-1]
    tangent = (jnp.sum(grads[:, :kw] * d_w, -1) + jnp.sum(grads[:, kw:kw + kl] * d_l, -1)
               + grads[:, -1] * d_c)
    return _mipo_value(name, unbiased, *primals), tangent


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
    valid_w, valid_l = valid_w.astype(jnp.float32), valid_l.astype(jnp.float32)
    loss = jnp.where(empty, 0.0, _mipo(div.name, unbiased, h_w, h_l, valid_w, valid_l, c, power))
    correction = jnp.zeros_like(loss)
    if unbiased:  # var_w/K + var_l/L = D^2 - loss, as its own quadratic form (no cancellation)
        args = jax.lax.stop_gradient((jnp.concatenate([h_w, h_l], -1),
                                      jnp.concatenate([valid_w, valid_l], -1) > 0, c, power))
        m, k, half, _ = _mipo_slots(div.name, *args)
        lam, q = _mipo_coefficients(valid_w > 0, valid_l > 0, True)
        correction = _quadratic(lam[:, :, None] * lam[:, None, :] - q, m, k, half,
                                div.power is not None)
        correction = jnp.where(empty, 0.0, correction)
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
