"""Predictive entropy and expected calibration error (thesis ch. 2, §2.4.1 and §2.8.8).

Two ECEs live here. The thesis' ECE (§2.8.8, Remark 3) treats the policy as *stochastic*: the
prediction y_hat is sampled from pi_theta(.|x) and its confidence is pi_theta(y_hat|x). Its
proof of Theorem 2 conditions on the context x, which for a finite toy gives the exact form

    ECE(theta) = E_x sum_y pi_theta(y|x) |P(Y = y|x) - pi_theta(y|x)|            (§2.8.8)

(`stochastic_ece`). The standard ECE of Guo et al. (2017) predicts the arg-max label and bins
its confidence into `n_bins` equal-width bins (`top_label_ece`); `sampled_ece` is the same
binned estimator with y_hat sampled from pi_theta, i.e. a sample estimate of the stochastic
variant that pools contexts by confidence bin (it estimates a binned, unconditional ECE, which
by Jensen's inequality is at most the x-conditioned `stochastic_ece` plus binning error).

`ece_difference_bounds` evaluates the chain of upper bounds in the proof of Theorem 2 on
ECE(theta_1) - ECE(theta_2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax._checks import as_float32, check_rank, check_same_shape


def predictive_entropy(logits: jax.Array | None = None, *, probs: jax.Array | None = None,
                       axis: int = -1) -> jax.Array:
    """Entropy -sum_y p(y) log p(y) in nats of categoricals given by logits or by probs.

    Exactly one of `logits` (unnormalised log-probabilities; -inf marks an impossible class)
    and `probs` (rows summing to 1; zeros allowed, 0 log 0 = 0) must be given.

    Args:
      logits: [..., N].
      probs: [..., N].
      axis: the class axis.

    Returns:
      [...] float32 entropies.

    Examples:
      >>> import jax.numpy as jnp
      >>> predictive_entropy(jnp.zeros((2, 4)))  # uniform over 4: log 4
      Array([1.3862944, 1.3862944], dtype=float32)
      >>> predictive_entropy(probs=jnp.array([1.0, 0.0]))
      Array(0., dtype=float32)
    """
    if (logits is None) == (probs is None):
        raise ValueError("predictive_entropy needs exactly one of logits= and probs=")
    if probs is not None:
        p = as_float32(probs)
        return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)
    logp = jax.nn.log_softmax(as_float32(logits), axis=axis)
    p = jnp.exp(logp)
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=axis)  # 0 log 0 = 0, finite grads


def _weights(where: jax.Array | None, batch: int) -> jax.Array:
    if where is None:
        return jnp.ones((batch,), jnp.float32)
    if jnp.shape(where) != (batch,):
        raise ValueError(f"where must have shape ({batch},), got {jnp.shape(where)}")
    return jnp.asarray(where).astype(jnp.float32)


def stochastic_ece(probs: jax.Array, true_probs: jax.Array, *,
                   where: jax.Array | None = None) -> jax.Array:
    """The thesis' ECE of a stochastic policy, exact for finite responses (§2.8.8).

    ECE = E_x sum_y pi(y|x) |P(Y = y|x) - pi(y|x)| = E_x <|P(.|x) - pi(.|x)|, pi(.|x)>, the
    form the proof of Theorem 2 reaches after conditioning on x (y_hat ~ pi(.|x), Remark 3).

    Args:
      probs: [B, N] the policy pi_theta(.|x) per context.
      true_probs: [B, N] the ground-truth conditional P(Y = .|x).
      where: optional [B] bool, contexts to average over (an empty mask gives 0).

    Returns:
      Scalar float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> stochastic_ece(jnp.array([[0.5, 0.5]]), jnp.array([[1.0, 0.0]]))
      Array(0.5, dtype=float32)
    """
    check_rank("probs", probs, 2)
    check_same_shape(probs=probs, true_probs=true_probs)
    p, q = as_float32(probs), as_float32(true_probs)
    w = _weights(where, p.shape[0])
    per_context = jnp.sum(p * jnp.abs(q - p), axis=-1)  # [B]
    return jnp.sum(w * per_context) / jnp.maximum(jnp.sum(w), 1.0)


def binned_ece(confidences: jax.Array, correct: jax.Array, *, n_bins: int = 15,
               where: jax.Array | None = None) -> jax.Array:
    """Binned ECE sum_b (n_b / n) |acc_b - conf_b| (Guo et al., 2017, eq. 3).

    Bins are the equal-width intervals ((b-1)/M, b/M], b = 1..M (a confidence of exactly 0
    goes to the first bin); empty bins contribute 0.

    Args:
      confidences: [B] in [0, 1], the probability the model gave its prediction.
      correct: [B] bool/0-1, whether that prediction equals the label.
      n_bins: M, static.
      where: optional [B] bool, samples to count.

    Returns:
      Scalar float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> binned_ece(jnp.array([0.9, 0.9]), jnp.array([True, False]), n_bins=10)
      Array(0.4, dtype=float32)
    """
    check_rank("confidences", confidences, 1)
    check_same_shape(confidences=confidences, correct=correct)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf = as_float32(confidences)
    acc = jnp.asarray(correct).astype(jnp.float32)
    w = _weights(where, conf.shape[0])
    bins = jnp.clip(jnp.ceil(conf * n_bins).astype(jnp.int32) - 1, 0, n_bins - 1)  # [B]
    count = jax.ops.segment_sum(w, bins, num_segments=n_bins)  # [M]
    gap = jax.ops.segment_sum(w * (acc - conf), bins, num_segments=n_bins)  # [M]
    # sum_b (n_b/n) |acc_b - conf_b| = sum_b |sum_{i in b} (acc_i - conf_i)| / n
    return jnp.sum(jnp.abs(gap)) / jnp.maximum(jnp.sum(count), 1.0)


def _probs_for_labels(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Checks probs [B, N] against labels [B] and returns probs as float32."""
    check_rank("probs", probs, 2)
    check_rank("labels", labels, 1)
    if jnp.shape(labels)[0] != jnp.shape(probs)[0]:
        raise ValueError(f"labels {jnp.shape(labels)} and probs {jnp.shape(probs)} disagree on B")
    return as_float32(probs)


def top_label_ece(probs: jax.Array, labels: jax.Array, *, n_bins: int = 15,
                  where: jax.Array | None = None) -> jax.Array:
    """Standard top-label ECE (Guo et al., 2017): predict argmax_y probs, bin its probability.

    Args:
      probs: [B, N] predicted class probabilities.
      labels: [B] int, observed labels.
      n_bins: number of equal-width confidence bins.
      where: optional [B] bool.

    Returns:
      Scalar float32.
    """
    p = _probs_for_labels(probs, labels)
    pred = jnp.argmax(p, axis=-1)  # [B]
    return binned_ece(jnp.max(p, axis=-1), pred == labels, n_bins=n_bins, where=where)


def sampled_ece(probs: jax.Array, labels: jax.Array, *, key: jax.Array, n_bins: int = 15,
                where: jax.Array | None = None) -> jax.Array:
    """Binned estimate of the thesis' stochastic-prediction ECE (§2.8.8, Remark 3).

    Draws y_hat ~ probs(.|x) per row, takes pi(y_hat|x) as the confidence and 1[y_hat = label]
    as correctness, and bins as in `binned_ece`.

    Args:
      probs: [B, N] policy probabilities per context.
      labels: [B] int, observed labels (drawn from the true P(Y|x)).
      key: PRNG key for the predictions.
      n_bins: number of equal-width confidence bins.
      where: optional [B] bool.

    Returns:
      Scalar float32.
    """
    p = _probs_for_labels(probs, labels)
    pred = jax.random.categorical(key, jnp.log(p), axis=-1)  # [B], y_hat ~ pi(.|x)
    conf = jnp.take_along_axis(p, pred[:, None], axis=-1)[:, 0]  # [B]
    return binned_ece(conf, pred == labels, n_bins=n_bins, where=where)


def _x_log_ratio(x: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
    """x log(num / den) for num, den >= 0, with 0 log(.) = 0 and inf where x > 0 = den.

    Near num = den it is x log1p((num - den) / den), exactly 0 at num = den on any backend (a
    rounded num / den and log would leave ~1e-8, which the square roots of Pinsker's bounds
    magnify to ~1e-4); farther apart x (log num - log den), which keeps tiny ratios.
    """
    positive = x > 0
    t = (num - den) / jnp.where(den > 0, den, 1.0)
    near = jnp.abs(t) < 0.5
    log_near = jnp.log1p(jnp.where(near, t, 0.0))
    log_far = (jnp.log(jnp.where(num > 0, num, 1.0)) - jnp.log(jnp.where(den > 0, den, 1.0)))
    value = x * jnp.where(near, log_near, log_far)
    return jnp.where(positive, jnp.where(den > 0, value, jnp.inf), 0.0)


def ece_difference_bounds(probs_1: jax.Array, probs_2: jax.Array, true_probs: jax.Array, *,
                          where: jax.Array | None = None) -> dict[str, jax.Array]:
    """Upper bounds on stochastic_ece(probs_1) - stochastic_ece(probs_2) (Theorem 2, §2.8.8).

    The proof of Theorem 2 gives, with a_i = |P - pi_i| and delta the total variation,

      ECE_1 - ECE_2 <= E_x <(pi_1 + pi_2 + a_1 + a_2)/2, |pi_1 - pi_2|>          ("inner")
                    <= E_x ||pi_1 - pi_2||_1 m(x),  m = max_y (pi_1+pi_2+a_1+a_2)/2  ("l1_m")
                    <= 4 E_x delta(pi_1, pi_2)                       (m <= 2)     ("tv")

    and then 4 delta <= 2 psi_f(D_f) for a Pinsker-type psi_f:
      - KL (Remark 2): Pinsker, delta <= sqrt(KL/2) in nats, for either direction:
        "kl_12" = 4 E sqrt(KL(pi_1||pi_2)/2), "kl_21" = 4 E sqrt(KL(pi_2||pi_1)/2).
      - JS (Remark 1): with JS = (KL(p||m) + KL(q||m))/2, m = (p+q)/2 (nats, <= log 2), Pinsker
        on both terms and delta(p, m) = delta(p, q)/2 give JS >= delta^2/2, i.e.
        delta <= sqrt(2 JS) (JS bounds via Pinsker: Corander, Remes & Koski, Kybernetika 57(6),
        2021; the thesis cites Sason & Verdu, IEEE T-IT 2016, for psi_f). "jsd" = 4 E sqrt(2 JS).
        The Table 2.1 f-divergence "jsd" equals 2 JS, so this is also 4 E sqrt(D_f^jsd).

    Args:
      probs_1: [B, N] policy 1 per context.
      probs_2: [B, N] policy 2 per context.
      true_probs: [B, N] ground-truth P(Y|x).
      where: optional [B] bool.

    Returns:
      dict with scalar float32 "inner", "l1_m", "tv", "kl_12", "kl_21", "jsd".
    """
    check_rank("probs_1", probs_1, 2)
    check_same_shape(probs_1=probs_1, probs_2=probs_2, true_probs=true_probs)
    p1, p2, q = as_float32(probs_1), as_float32(probs_2), as_float32(true_probs)
    w = _weights(where, p1.shape[0])
    a1, a2 = jnp.abs(q - p1), jnp.abs(q - p2)
    diff = jnp.abs(p1 - p2)  # [B, N]
    envelope = (p1 + p2 + a1 + a2) / 2.0  # [B, N]
    tv = 0.5 * jnp.sum(diff, axis=-1)  # [B]
    kl_12 = jnp.sum(_x_log_ratio(p1, p1, p2), axis=-1)  # [B]
    kl_21 = jnp.sum(_x_log_ratio(p2, p2, p1), axis=-1)
    # JS = (KL(p1 || m) + KL(p2 || m)) / 2 with m = (p1 + p2)/2, p_i / m = 2 p_i / (p1 + p2):
    # exactly 0 where p1 = p2 (see _x_log_ratio)
    total = p1 + p2
    js = 0.5 * jnp.sum(_x_log_ratio(p1, 2.0 * p1, total) + _x_log_ratio(p2, 2.0 * p2, total),
                       axis=-1)
    per_context = {
        "inner": jnp.sum(envelope * diff, axis=-1),
        "l1_m": jnp.sum(diff, axis=-1) * jnp.max(envelope, axis=-1),
        "tv": 4.0 * tv,
        "kl_12": 4.0 * jnp.sqrt(jnp.maximum(kl_12, 0.0) / 2.0),  # Pinsker (Remark 2)
        "kl_21": 4.0 * jnp.sqrt(jnp.maximum(kl_21, 0.0) / 2.0),
        "jsd": 4.0 * jnp.sqrt(2.0 * jnp.maximum(js, 0.0)),  # Remark 1
    }
    total = jnp.maximum(jnp.sum(w), 1.0)
    return {name: jnp.sum(w * value) / total for name, value in per_context.items()}
