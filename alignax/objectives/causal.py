"""Causal reward models (thesis ch. 4): Gaussian-kernel MMD, binned MMD, CRM and Causal DPO.

A counterfactually invariant reward model must satisfy f(T) independent of Z (thesis eq. 4.2)
for a spurious variable Z (length, a sycophantic prefix, a concept, a demographic group). The
thesis enforces this with the squared maximum mean discrepancy (eq. 4.3) between the
distributions of f(T) in bins of Z, added to the Bradley-Terry loss with a weight lambda
(§4.5.1), or to the DPO loss for Causal DPO (eq. 4.4).

f(T) is either the scalar reward (features [N], as the objective of §4.5.1 writes it) or a
latent representation (features [N, D], as the text around it describes); both are accepted.

Binned MMD, the factor 2 and the reductions
-------------------------------------------
The thesis writes the regulariser as a double sum over m, m' in [M] (§4.5.1, eq. 4.4). Read
literally it runs over ordered pairs, so every unordered pair {m, m'} is counted twice (the
m = m' terms are MMD(P, P) = 0 in population). `binned_mmd2` returns, per `reduction`:

  "sum"        sum over unordered pairs m < m' of MMD^2(P_m, P_m')       (the default)
  "double_sum" twice that: the thesis' ordered double sum, literally
  "mean"       the "sum" value divided by the number of contributing pairs

With "sum", lambda effectively grows like M^2 / 2 when the bin count changes (M = 10, 20, 30 in
§4.10): use "mean" to keep one lambda meaningful across bin counts. Only bins that hold enough
samples contribute (>= 2 for the unbiased U-statistic, >= 1 for the biased V-statistic);
emptier bins drop out with no NaN and no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignax._checks import as_float32, check_positive, check_same_shape
from alignax.objectives.fdpo import fdpo_loss
from alignax.objectives.reward import bradley_terry_loss

_REDUCTIONS = ("sum", "mean", "double_sum")
_DIRECT_DIFF_MAX_DIM = 8  # up to this width, pairwise distances come from explicit differences
_KERNEL_REACH = 15.0  # a coordinate gap beyond 15 bandwidths gives e^-112.5: 0 in float32


def _as_features(name: str, x) -> jax.Array:
    """Returns `x` as float32 [N, D]; a rank-1 [N] input becomes [N, 1]."""
    x = as_float32(x)
    if x.ndim == 1:
        return x[:, None]  # [N] -> [N, 1]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N] or [N, D], got {x.shape}")
    return x


def _bandwidths(bandwidth) -> tuple:
    """Validates `bandwidth` (a scalar or a tuple/list of scalars) and returns a tuple."""
    widths = tuple(bandwidth) if isinstance(bandwidth, (tuple, list)) else (bandwidth,)
    if not widths:
        raise ValueError("bandwidth must be a positive scalar or a non-empty tuple of them")
    for w in widths:
        if jnp.ndim(w) != 0:
            raise ValueError(f"each bandwidth must be a scalar, got shape {jnp.shape(w)}")
        if isinstance(w, (np.ndarray, np.generic)) or (isinstance(w, jax.Array)
                                                        and not isinstance(w, jax.core.Tracer)):
            w = float(w)
        check_positive("bandwidth", w)
    return widths


def _half_squared_distances(x: jax.Array, y: jax.Array, width, *, same: bool, limit: float,
                            valid: jax.Array | None = None):
    """(q, far): q = |x_n - y_m|^2 / (2 width^2) [N, M] in bandwidth units, and the [N, M] mask
    `far` (no gradient) of pairs left out, where q reads 0 and has zero derivative.

    A pair is far when some |x_d - y_d| / width exceeds `limit` (or overflows float32), so q
    never holds inf and its derivative never meets 0 * inf. Up to 8 features, differences are
    taken directly ([N, M, D], exact: the diagonal of x against itself is exactly 0). Wider
    (latent) features use |a|^2 + |b|^2 - 2 a.b, which needs no [N, M, D] temporary but loses
    about eps |a|^2 to cancellation: the rows are first centred on the mean of the `valid`
    rows and divided by the bandwidth and a power of two (exact), so the error is
    eps |a - mean|^2 / width^2 in q, the Gram product is taken at full float32 precision, the
    diagonal of x against itself (`same`) is set to exactly 0, and a row farther than 2^60
    bandwidths from the mean is left out entirely (far from every other row).
    """
    width = jnp.maximum(as_float32(width), jnp.finfo(jnp.float32).tiny)  # never 0 / 0
    if x.shape[1] <= _DIRECT_DIFF_MAX_DIM:
        r = (x[:, None, :] - y[None, :, :]) / width  # [N, M, D]
        far = jax.lax.stop_gradient(jnp.any(~(jnp.abs(r) <= limit), axis=-1))
        r = jnp.where(far[..., None], 0.0, r)  # the double where: no inf reaches the square
        return 0.5 * jnp.sum(jnp.square(r), axis=-1), far
    both = jnp.concatenate([x, y]) if not same else x
    weight = (jnp.ones(both.shape[:1], bool) if valid is None
              else jnp.concatenate([valid, valid]) if not same else valid)
    weight = weight.astype(jnp.float32) / jnp.maximum(jnp.sum(weight), 1.0)
    center = jax.lax.stop_gradient(jnp.sum(weight[:, None] * both, axis=0))  # [D]
    scaled = []
    for rows in (x, y):
        z = (rows - center) / width
        isolated = jax.lax.stop_gradient(~(jnp.max(jnp.abs(z), axis=-1) <= 2.0 ** 60))  # [N]
        scaled.append((jnp.where(isolated[:, None], 0.0, z), isolated))
    (zx, iso_x), (zy, iso_y) = scaled
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(zx)), jnp.max(jnp.abs(zy))))
    _, k = jnp.frexp(top)  # |z| / 2^k <= 1, exactly
    zx, zy = jnp.ldexp(zx, -k), jnp.ldexp(zy, -k)
    gram = jnp.matmul(zx, zy.T, precision=jax.lax.Precision.HIGHEST)
    sq = (jnp.sum(jnp.square(zx), -1)[:, None] + jnp.sum(jnp.square(zy), -1)[None, :]
          - 2.0 * gram)
    if same:
        sq = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, sq)
    q = jnp.ldexp(0.5 * jnp.maximum(sq, 0.0), 2 * k)  # 2^(2k) <= 2^122: finite factor
    far = jax.lax.stop_gradient(~(q <= 0.5 * limit * limit) | iso_x[:, None] | iso_y[None, :])
    if same:
        far = far & ~jnp.eye(x.shape[0], dtype=bool)  # a point is at distance 0 from itself
    return jnp.where(far, 0.0, q), far


def _kernel(x: jax.Array, y: jax.Array, widths: tuple, *, same: bool,
            valid: jax.Array | None = None) -> jax.Array:
    """sum_s exp(-|x_n - y_m|^2 / (2 s^2)) [N, M]; exactly 0 where e^-q is below float32's
    range (q > 112), exactly 1 per bandwidth on the diagonal of x against itself (`same`)."""
    total = 0.0
    for s in widths:
        q, far = _half_squared_distances(x, y, s, same=same, limit=_KERNEL_REACH, valid=valid)
        total = total + jnp.where(far, 0.0, jnp.exp(-q))
    return total


def gaussian_kernel(x: jax.Array, y: jax.Array, *, bandwidth) -> jax.Array:
    """Gaussian kernel matrix sum_s exp(-|a - b|^2 / (2 s^2)) over the bandwidths s.

    Finite with finite gradients for every finite input and bandwidth > 0 (below float32's
    smallest normal number a bandwidth acts as that number). Features wider than 8 are
    compared through the Gram matrix after centring (see `_half_squared_distances` for its
    accuracy); `gaussian_kernel(x, x, ...)` (the same array) has an exact unit diagonal.

    Args:
      x: [N] or [N, D] features.
      y: [M] or [M, D] features (same D).
      bandwidth: > 0 scalar, or a tuple of them (the kernels are summed: a multi-scale kernel).

    Returns:
      [N, M] float32.
    """
    widths = _bandwidths(bandwidth)
    same = x is y
    x, y = _as_features("x", x), _as_features("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: x {x.shape}, y {y.shape}")
    return _kernel(x, x if same else y, widths, same=same)


def median_heuristic_bandwidth(features: jax.Array, *, where: jax.Array | None = None,
                               min_bandwidth: float = 1e-6) -> jax.Array:
    """Median heuristic (Gretton et al., 2012): the median pairwise distance |a_i - a_j|, i < j.

    The result is wrapped in `stop_gradient`: a bandwidth that follows the features would let
    the model shrink the regulariser by rescaling instead of by becoming invariant.

    Args:
      features: [N] or [N, D].
      where: optional [N] bool, only these samples (and pairs of them) count.
      min_bandwidth: floor, so identical features give a usable (positive) bandwidth.

    Returns:
      scalar float32 > 0; 1 (or min_bandwidth if larger) with fewer than two valid samples.
    """
    x = _as_features("features", features)
    n = x.shape[0]
    valid = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
    _check_rows(n, where=valid)
    if n < 2:  # no pair at all (B = 0 included): the documented fallback
        return jnp.float32(max(1.0, min_bandwidth))
    x = jax.lax.stop_gradient(jnp.where(valid[:, None], x, 0.0))  # padding may hold inf / NaN
    q, far = _half_squared_distances(x, x, 1.0, same=True, limit=jnp.inf, valid=valid)
    dist = jnp.where(far, jnp.inf, jnp.sqrt(2.0 * q))  # [N, N]
    pair = jnp.triu(jnp.ones((n, n), bool), k=1) & valid[:, None] & valid[None, :]
    med = jnp.nanmedian(jnp.where(pair, dist, jnp.nan))
    med = jnp.where(jnp.isnan(med), 1.0, med)  # fewer than two valid samples
    return jax.lax.stop_gradient(jnp.maximum(med, min_bandwidth))


def mmd2(x: jax.Array, y: jax.Array, *, bandwidth, unbiased: bool = True) -> jax.Array:
    """Squared MMD between the samples x ~ P and y ~ Q with a Gaussian kernel (thesis eq. 4.3).

    Biased (V-statistic): mean k(x, x') + mean k(y, y') - 2 mean k(x, y), all pairs included;
    it is >= 0. Unbiased (U-statistic, Gretton et al., 2012, eq. 3): the within-sample means
    leave out the diagonal i = j; its expectation is exactly the population MMD^2, so it can be
    negative when P = Q.

    Args:
      x: [N] or [N, D] samples from P.
      y: [M] or [M, D] samples from Q.
      bandwidth: > 0, or a tuple of bandwidths whose kernels are summed.
      unbiased: U-statistic (needs N, M >= 2) if True, else V-statistic (N, M >= 1).

    Returns:
      scalar float32.

    Raises:
      ValueError: non-positive bandwidth, different feature widths, too few samples.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(mmd2(jnp.zeros(3), jnp.zeros(2), bandwidth=1.0, unbiased=False))
      0.0
    """
    x, y = _as_features("x", x), _as_features("y", y)
    need = 2 if unbiased else 1
    if x.shape[0] < need or y.shape[0] < need:
        raise ValueError(f"mmd2(unbiased={unbiased}) needs >= {need} samples per side, got "
                         f"x {x.shape}, y {y.shape}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: x {x.shape}, y {y.shape}")
    widths = _bandwidths(bandwidth)
    kxx = _kernel(x, x, widths, same=True)  # [N, N], diagonal exactly 1 per bandwidth
    kyy = _kernel(y, y, widths, same=True)  # [M, M]
    kxy = _kernel(x, y, widths, same=False)  # [N, M]
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        within_x = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
        within_y = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    else:
        within_x, within_y = jnp.mean(kxx), jnp.mean(kyy)
    return within_x + within_y - 2.0 * jnp.mean(kxy)


def _check_rows(n: int, **arrays) -> None:
    """Raises ValueError unless every keyword array has shape [n] (n = feature rows)."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    if any(shape != (n,) for shape in shapes.values()):
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: features have {n} rows, {described}")


def _check_bins(bins, valid, num_bins: int) -> None:
    """Eager check of concrete bin ids: none >= num_bins where `valid` (negative ids are
    unmatched samples, left out); skipped under tracing (see `binned_mmd2`)."""
    if isinstance(bins, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
        return
    b = np.asarray(bins)
    v = np.ones(b.shape, bool) if valid is None else np.asarray(valid, bool)
    bad = np.flatnonzero(v & (b >= num_bins))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"bins out of range: bins[{i}] = {int(b[i])} >= num_bins = {num_bins} "
                         f"({bad.size} such entries; negative ids mark unmatched samples and "
                         f"are left out, padding can also be masked with `where`)")


def binned_mmd2(features: jax.Array, bins: jax.Array, *, num_bins: int, bandwidth,
                unbiased: bool = True, where: jax.Array | None = None,
                reduction: str = "sum") -> jax.Array:
    """Binned MMD^2 regulariser of thesis §4.5.1: MMD^2 between the bins of a spurious variable.

    sum_{m < m'} MMD^2(P_m, P_m') over the bins m that hold enough samples (>= 2 unbiased,
    >= 1 biased), where P_m is the distribution of `features` in bin m. One [N, N] kernel
    matrix K and a one-hot bin matrix A [N, M] give every block sum at once, S = A^T K A
    [M, M]; there is no loop over pairs. See the module docstring for `reduction` and the
    factor 2 of the thesis' double sum.

    Bin ids: a negative id marks a sample with no bin (`alignax.data.bins` gives -1 to
    unmatched samples): it is left out, exactly like where=False. An id >= num_bins is an
    error: a ValueError when the ids are concrete (eager calls), and under `jax.jit`, where
    nothing can be raised, the result is NaN (so a finite-loss check stops the run), never a
    silently dropped sample.

    Rows left out (where=False or a negative id) may hold anything, inf and NaN included:
    value and gradient equal those of the sliced inputs.

    Args:
      features: [N] (e.g. rewards or log-ratios) or [N, D] (latent representations f(T)).
      bins: [N] int bin ids in [0, num_bins); negative = no bin (left out).
      num_bins: static number of bins M.
      bandwidth: > 0 scalar or tuple of scalars (summed kernels); may be a traced value such as
        `median_heuristic_bandwidth(features)`.
      unbiased: U-statistic within-bin terms if True, else V-statistic.
      where: optional [N] bool; False rows (padding) are left out. Equals slicing them off.
      reduction: "sum" (unordered pairs), "double_sum" (thesis, ordered pairs) or "mean".

    Returns:
      scalar float32 (0 when fewer than two bins contribute).

    Raises:
      ValueError: mismatched lengths, concrete bins >= num_bins, non-positive bandwidth, bad
        num_bins or reduction. TypeError: non-integer bins.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([0.0, 0.1, 0.0, 0.1])
      >>> float(binned_mmd2(x, jnp.array([0, 0, 1, 1]), num_bins=2, bandwidth=1.0))
      0.0
    """
    x = _as_features("features", features)  # [N, D]
    if not jnp.issubdtype(jnp.result_type(bins), jnp.integer):
        raise TypeError(f"bins must be an integer array, got dtype {jnp.result_type(bins)}")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive static int, got {num_bins!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_rows(x.shape[0], bins=bins, **({} if where is None else {"where": where}))
    widths = _bandwidths(bandwidth)
    _check_bins(bins, where, int(num_bins))
    n_bins = int(num_bins)

    bins = jnp.asarray(bins)
    kept = bins >= 0  # [N]
    if where is not None:
        kept = kept & jnp.asarray(where, bool)
    x = jnp.where(kept[:, None], x, 0.0)  # left-out rows never enter the kernel (inf / NaN)
    onehot = jnp.where(kept[:, None], jax.nn.one_hot(bins, n_bins, dtype=jnp.float32), 0.0)
    kernel = _kernel(x, x, widths, same=True, valid=kept)  # [N, N]
    block = onehot.T @ kernel @ onehot  # [M, M]: S_mm' = sum_{i in m, j in m'} k(x_i, x_j)
    counts = jnp.sum(onehot, axis=0)  # [M]
    need = 2.0 if unbiased else 1.0
    valid = counts >= need  # [M]
    within = jnp.diagonal(block)  # [M]
    if unbiased:
        within = within - onehot.T @ jnp.diagonal(kernel)  # drop the i = j terms
        denom_w = counts * (counts - 1.0)
    else:
        denom_w = jnp.square(counts)
    safe_w = jnp.where(valid, denom_w, 1.0)
    mean_within = jnp.where(valid, within / safe_w, 0.0)  # [M]
    safe_n = jnp.where(valid, counts, 1.0)
    mean_cross = block / (safe_n[:, None] * safe_n[None, :])  # [M, M]
    # MMD^2(P_m, P_m') = E k(m, m) + E k(m', m') - 2 E k(m, m')          (eq. 4.3, kernel form)
    pair_mmd = mean_within[:, None] + mean_within[None, :] - 2.0 * mean_cross  # [M, M]
    upper = jnp.triu(jnp.ones((n_bins, n_bins), bool), k=1) & valid[:, None] & valid[None, :]
    total = jnp.sum(jnp.where(upper, pair_mmd, 0.0))  # sum over unordered pairs m < m'
    if reduction == "double_sum":
        total = 2.0 * total  # the thesis' sum over ordered (m, m'), §4.5.1 / eq. 4.4
    elif reduction == "mean":
        total = total / jnp.maximum(jnp.sum(upper), 1).astype(jnp.float32)
    out_of_range = jnp.any(kept & (bins >= n_bins))  # only reachable under jit
    return jnp.where(out_of_range, jnp.nan, total)


def crm_regularizer(chosen_features: jax.Array, rejected_features: jax.Array,
                    chosen_bins: jax.Array, rejected_bins: jax.Array, *, num_bins: int,
                    bandwidth, conditional: bool = True, unbiased: bool = True,
                    where: jax.Array | None = None, reduction: str = "sum") -> jax.Array:
    """The CRM independence penalty (thesis §4.6): conditional or unconditional binned MMD^2.

    Conditional CRM applies the binned MMD^2 within the chosen subset and within the rejected
    subset separately and adds the two (f(T) independent of Z given the preference label).
    Unconditional CRM pools the 2B responses and applies it once (f(T) independent of Z,
    eq. 4.2, the marginal regularisation of §4.5.1).

    Args:
      chosen_features: [B] or [B, D] f(T) of the chosen responses (rewards or latents).
      rejected_features: same shape, for the rejected responses.
      chosen_bins: [B] int bin ids of the chosen responses' spurious variable.
      rejected_bins: [B] int bin ids of the rejected responses.
      num_bins, bandwidth, unbiased, reduction: as in `binned_mmd2`.
      conditional: True for conditional CRM, False for unconditional.
      where: optional [B] bool pair mask (False = padding pair, both responses ignored).

    Returns:
      scalar float32.
    """
    check_same_shape(chosen_features=chosen_features, rejected_features=rejected_features)
    check_same_shape(chosen_bins=chosen_bins, rejected_bins=rejected_bins)
    kw = dict(num_bins=num_bins, bandwidth=bandwidth, unbiased=unbiased, reduction=reduction)
    if conditional:
        return (binned_mmd2(chosen_features, chosen_bins, where=where, **kw)
                + binned_mmd2(rejected_features, rejected_bins, where=where, **kw))
    pooled = jnp.concatenate([as_float32(chosen_features), as_float32(rejected_features)])
    pooled_bins = jnp.concatenate([jnp.asarray(chosen_bins), jnp.asarray(rejected_bins)])
    pooled_where = None if where is None else jnp.concatenate([jnp.asarray(where, bool)] * 2)
    return binned_mmd2(pooled, pooled_bins, where=pooled_where, **kw)  # [2B] pooled


def _sanitize(where, **arrays) -> list[jax.Array]:
    """The arrays ([B] or [B, D]) with the rows where `where` is False replaced by 0 (no inf /
    NaN of a padded row reaches any arithmetic, value or gradient); checks where is [B]."""
    arrays = {name: as_float32(a) for name, a in arrays.items()}
    if where is None:
        return list(arrays.values())
    first = next(iter(arrays.values()))
    _check_rows(first.shape[0], where=where)
    mask = jnp.asarray(where, bool)
    return [jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, 0.0)
            for a in arrays.values()]


def _spread(per_example: jax.Array, penalty: jax.Array, where) -> jax.Array:
    """Adds a batch-level penalty to every valid row, so masked mean = mean + penalty."""
    if where is None:
        return per_example + penalty
    return jnp.where(jnp.asarray(where, bool), per_example + penalty, 0.0)


def causal_reward_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                       chosen_bins: jax.Array, rejected_bins: jax.Array, *, lam,
                       num_bins: int, bandwidth="median", conditional: bool = True,
                       unbiased: bool = True, reduction: str = "sum", margin=0.0,
                       chosen_features: jax.Array | None = None,
                       rejected_features: jax.Array | None = None,
                       where: jax.Array | None = None) -> jax.Array:
    """Causal reward model objective (thesis §4.5.1, §4.6): Bradley-Terry + lambda * binned MMD^2.

    -log sigmoid(r_w - r_l) + lambda * sum_{m < m'} MMD^2(P_m(f(T)), P_m'(f(T))), with f(T) the
    rewards by default (as the §4.5.1 objective writes it) or the given latent features.

    The MMD term is a batch statistic. It is added to every (valid) row of the returned [B]
    array, so that `mean(loss)` (or `sum(loss) / sum(where)`) equals mean BT + lambda * MMD^2
    and its gradient is the gradient of the thesis objective.

    Args:
      chosen_rewards: [B] r(x, y_w).
      rejected_rewards: [B] r(x, y_l).
      chosen_bins: [B] int bin of the chosen response's spurious variable (e.g. length bin).
      rejected_bins: [B] int bin of the rejected response.
      lam: lambda >= 0, weight of the MMD term (may be traced, e.g. vmapped).
      num_bins: static M.
      bandwidth: > 0 scalar/tuple, or "median" for `median_heuristic_bandwidth` of the
        regularised features (pooled over chosen and rejected).
      conditional: conditional CRM (True) or unconditional CRM (False), see `crm_regularizer`.
      unbiased, reduction: as in `binned_mmd2`.
      margin: Bradley-Terry margin.
      chosen_features, rejected_features: optional [B, D] latents f(T) to regularise instead
        of the rewards.
      where: optional [B] bool pair mask; masked rows return 0 with zero gradient, whatever
        they hold (inf / NaN included), and the rest equals the sliced batch.

    Returns:
      [B] float32 per-example losses.
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen_rewards, rejected_rewards = _sanitize(where, chosen_rewards=chosen_rewards,
                                                 rejected_rewards=rejected_rewards)
    bt = bradley_terry_loss(chosen_rewards, rejected_rewards, margin=margin)
    feats_w = chosen_rewards if chosen_features is None else chosen_features
    feats_l = rejected_rewards if rejected_features is None else rejected_features
    bw = _resolve_bandwidth(bandwidth, feats_w, feats_l, where)
    reg = crm_regularizer(feats_w, feats_l, chosen_bins, rejected_bins, num_bins=num_bins,
                          bandwidth=bw, conditional=conditional, unbiased=unbiased,
                          where=where, reduction=reduction)
    return _spread(bt, as_float32(lam) * reg, where)


def causal_dpo_loss(chosen_h: jax.Array, rejected_h: jax.Array, chosen_bins: jax.Array,
                    rejected_bins: jax.Array, *, beta, lam, num_bins: int,
                    bandwidth="median", divergence: str = "reverse_kl", alpha=None,
                    conditional: bool = False, unbiased: bool = True,
                    reduction: str = "sum", where: jax.Array | None = None) -> jax.Array:
    """Causal DPO (thesis eq. 4.4): f-DPO loss + lambda * binned MMD^2 of the log-ratios.

    Which statistic is regularised: the per-sequence log-ratio h = log pi_theta(y|x) -
    log pi_ref(y|x). Eq. 4.4 writes the MMD over the ratio pi_theta/pi_ref itself; we use its
    logarithm because (i) beta * h is DPO's implicit reward (up to the prompt-only term
    beta log Z(x)), so this is exactly the CRM regulariser of §4.5.1 applied to the reward DPO
    learns, making Causal DPO and CRM + RLHF regularise the same quantity; (ii) independence
    of Z (eq. 4.2) is unchanged by the bijection h -> exp(h), so the population condition is
    the same, while exp(h) of sequence log-ratios over- or underflows float32 and would put
    every sample in the flat tail of a Gaussian kernel. The bandwidth is in log-ratio units
    (a bandwidth s on h equals beta * s on the implicit reward).

    Eq. 4.4 pools chosen and rejected responses (unconditional, the default here);
    `conditional=True` applies the regulariser within each subset as in §4.6. With
    divergence="reverse_kl" the first term is standard DPO, as in eq. 4.4; other divergences
    give the f-DPO generalisation (eq. 2.2).

    Args:
      chosen_h: [B] log-ratios of the preferred responses.
      rejected_h: [B] log-ratios of the dispreferred responses.
      chosen_bins, rejected_bins: [B] int spurious-variable bins of the two responses.
      beta: > 0 DPO temperature.
      lam: lambda >= 0, MMD weight.
      num_bins: static M.
      bandwidth: > 0 scalar/tuple, or "median" (median heuristic on the log-ratios).
      divergence, alpha: as in `alignax.objectives.fdpo_loss`.
      conditional, unbiased, reduction: as in `crm_regularizer` / `binned_mmd2`.
      where: optional [B] bool pair mask; masked rows return 0 with zero gradient, whatever
        they hold (inf / NaN included), and the rest equals the sliced batch.

    Returns:
      [B] float32 per-example losses (the batch MMD term is added to every valid row).
    """
    check_same_shape(chosen_h=chosen_h, rejected_h=rejected_h)
    chosen_h, rejected_h = _sanitize(where, chosen_h=chosen_h, rejected_h=rejected_h)
    dpo = fdpo_loss(chosen_h, rejected_h, beta=beta, divergence=divergence, alpha=alpha)
    bw = _resolve_bandwidth(bandwidth, chosen_h, rejected_h, where)
    reg = crm_regularizer(chosen_h, rejected_h, chosen_bins, rejected_bins, num_bins=num_bins,
                          bandwidth=bw, conditional=conditional, unbiased=unbiased,
                          where=where, reduction=reduction)
    return _spread(dpo, as_float32(lam) * reg, where)


def _resolve_bandwidth(bandwidth, feats_w, feats_l, where):
    """"median" -> median heuristic over the pooled features; anything else is passed through."""
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be > 0, a tuple, or 'median'; got {bandwidth!r}")
        check_same_shape(chosen_features=feats_w, rejected_features=feats_l)
        pooled = jnp.concatenate([as_float32(feats_w), as_float32(feats_l)])
        pooled_where = None if where is None else jnp.concatenate([jnp.asarray(where, bool)] * 2)
        return median_heuristic_bandwidth(pooled, where=pooled_where)
    return bandwidth


# ------------------------------------------------------------------------------------------
# Objective configs (the contract is in alignax.objectives.registry): Causal DPO and the causal
# reward model, on the step's scores and the batch's bins.

import dataclasses  # noqa: E402
import math  # noqa: E402
from typing import ClassVar  # noqa: E402

from alignax.objectives.fdpo import check_divergence  # noqa: E402
from alignax.objectives.registry import (CAUSAL_LM, PAIR_FORMATS, PAIR_ROLES,  # noqa: E402
                                         REWARD_MODEL, Needs, Objective, ObjectiveInputs,
                                         check_hyper, pair_metrics, register)
from alignax.objectives.reward import per_example  # noqa: E402
from alignax.schedules import Hyper  # noqa: E402


def _check_mmd_fields(objective: Objective) -> None:
    """lam >= 0, num_bins >= 2, a positive bandwidth (or a tuple of them, or "median"), a known
    reduction, bool flags."""
    check_hyper(objective, "lam", low=0.0, inclusive=True)
    name = objective.name
    if isinstance(objective.num_bins, bool) or not isinstance(objective.num_bins, int) \
            or objective.num_bins < 2:
        raise ValueError(f"{name}: num_bins must be an int >= 2 (the MMD compares bins), got "
                         f"{objective.num_bins!r}")
    if objective.bandwidth != "median":
        widths = (objective.bandwidth if isinstance(objective.bandwidth, tuple)
                  else (objective.bandwidth,))
        if not widths or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                 and math.isfinite(w) and w > 0 for w in widths):
            raise ValueError(f"{name}: bandwidth must be 'median', a finite number > 0 or a "
                             f"tuple of them, got {objective.bandwidth!r}")
    if objective.reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got "
                         f"{objective.reduction!r}")
    for flag in ("conditional", "unbiased"):
        if not isinstance(getattr(objective, flag), bool):
            raise TypeError(f"{name}: {flag} must be a bool, got {getattr(objective, flag)!r}")


@register("causal_dpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalDPO(Objective):
    """Causal DPO (thesis eq. 4.4): f-DPO + lam * binned MMD^2 of the log-ratios over the bins
    of a spurious variable (`causal_dpo_loss`).

    The MMD term is a statistic of the whole batch: with gradient accumulation it is computed
    on each micro-batch (as the thesis' mini-batch estimator is), so the update differs from a
    full-batch one. Bins: f"{role}_bin" per response when the batch has them, else "bin".

    Attributes:
      lam: >= 0 (or a schedule), MMD weight.
      num_bins: M >= 2; the bins are ints in [0, M).
      beta: > 0 (or a schedule), DPO temperature.
      bandwidth: "median" (median heuristic on the batch's log-ratios), a number > 0 or a
        tuple of them (a sum of Gaussian kernels), in log-ratio units.
      conditional: False pools chosen and rejected responses (eq. 4.4, the default of
        `causal_dpo_loss`); True regularises within each subset (§4.6).
      unbiased, reduction: as in `binned_mmd2`.
      divergence, alpha: of the f-DPO term, as in `FDPO`.
      nll_weight: >= 0 (or a schedule), as in `FDPO`.
    """

    lam: Hyper
    num_bins: int
    beta: Hyper = 0.1
    bandwidth: float | tuple[float, ...] | str = "median"
    conditional: bool = False
    unbiased: bool = True
    reduction: str = "sum"
    divergence: str = "reverse_kl"
    alpha: float | None = None
    nll_weight: Hyper = 0.0

    needs: ClassVar[Needs] = Needs(model=CAUSAL_LM, roles=PAIR_ROLES, formats=PAIR_FORMATS,
                                   bins=True, batch_level=True)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("lam", "beta", "nll_weight")

    def __post_init__(self):
        check_hyper(self, "beta", low=0.0)
        check_hyper(self, "nll_weight", low=0.0, inclusive=True)
        _check_mmd_fields(self)
        check_divergence(self)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"].h, x.scores["rejected"].h  # [B] each
        loss = causal_dpo_loss(chosen, rejected, x.bins("chosen"), x.bins("rejected"),
                               beta=hp["beta"], lam=hp["lam"], num_bins=self.num_bins,
                               bandwidth=self.bandwidth, divergence=self.divergence,
                               alpha=self.alpha, conditional=self.conditional,
                               unbiased=self.unbiased, reduction=self.reduction)  # eq. 4.4
        dpo = fdpo_loss(chosen, rejected, beta=hp["beta"], divergence=self.divergence,
                        alpha=self.alpha)
        return loss, {**pair_metrics(chosen, rejected, hp["beta"]),
                      "causal/mmd_term": jnp.mean(loss - dpo)}


@register("causal_reward")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalReward(Objective):
    """Causal reward model (thesis §4.5.1, §4.6): Bradley-Terry + lam * binned MMD^2 of the
    rewards over the bins of a spurious variable (`causal_reward_loss`), training a reward
    model (each head of a multi-head model / ensemble regularised on its own, then averaged).

    The MMD term is a statistic of the whole batch (computed per micro-batch under gradient
    accumulation, see `CausalDPO`).

    Attributes:
      lam: >= 0 (or a schedule); num_bins: M >= 2.
      bandwidth: "median" (median heuristic on the batch's rewards), a number > 0 or a tuple.
      conditional: True (the default of `causal_reward_loss`, §4.6) regularises chosen and
        rejected rewards separately; False pools them (unconditional CRM).
      unbiased, reduction: as in `binned_mmd2`.
      margin: Bradley-Terry margin (any finite number, or a schedule).
    """

    lam: Hyper
    num_bins: int
    bandwidth: float | tuple[float, ...] | str = "median"
    conditional: bool = True
    unbiased: bool = True
    reduction: str = "sum"
    margin: Hyper = 0.0

    needs: ClassVar[Needs] = Needs(model=REWARD_MODEL, roles=PAIR_ROLES, formats=PAIR_FORMATS,
                                   reference=False, bins=True, batch_level=True)
    hyper_parameters: ClassVar[tuple[str, ...]] = ("lam", "margin")

    def __post_init__(self):
        check_hyper(self, "margin", low=-math.inf)
        _check_mmd_fields(self)

    def loss(self, x: ObjectiveInputs, hp):
        chosen, rejected = x.scores["chosen"].policy, x.scores["rejected"].policy  # [B, *heads]
        size = chosen.shape[0]

        def one_head(r_w, r_l):  # [B] each -> [B]
            return causal_reward_loss(r_w, r_l, x.bins("chosen"), x.bins("rejected"),
                                      lam=hp["lam"], num_bins=self.num_bins,
                                      bandwidth=self.bandwidth, conditional=self.conditional,
                                      unbiased=self.unbiased, reduction=self.reduction,
                                      margin=hp["margin"])  # §4.5.1

        heads_w, heads_l = chosen.reshape(size, -1), rejected.reshape(size, -1)  # [B, H]
        loss = jnp.mean(jax.vmap(one_head, in_axes=1, out_axes=1)(heads_w, heads_l), axis=1)
        plain = per_example(bradley_terry_loss(chosen, rejected, margin=hp["margin"]))
        return loss, {**pair_metrics(per_example(chosen), per_example(rejected)),
                      "causal/mmd_term": jnp.mean(loss - plain)}
