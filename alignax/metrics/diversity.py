"""Diversity metrics of generated samples (thesis Tables 3.2-3.4, Figure 3.8).

Category metrics take counts (or probabilities) over C categories, [..., C], and normalise
them; a row with no mass has no distribution and gives NaN. All are jittable, float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from alignax._checks import as_float32


def category_counts(labels, *, num_categories: int, where=None) -> jnp.ndarray:
    """Counts [..., C] of integer labels [..., N] in 0..C-1 (entries with where=False skipped)."""
    one_hot = jnp.asarray(labels)[..., None] == jnp.arange(num_categories)  # [..., N, C]
    if where is not None:
        one_hot = one_hot & jnp.asarray(where, bool)[..., None]
    return jnp.sum(one_hot, axis=-2).astype(jnp.float32)


def _proportions(counts):
    counts = as_float32(counts)
    total = jnp.sum(counts, axis=-1, keepdims=True)
    return counts / jnp.where(total > 0, total, jnp.nan), total[..., 0]


def simpson_index(counts, *, unbiased: bool = False) -> jnp.ndarray:
    """Simpson diversity index D = 1 - sum_i (n_i / N)^2 (thesis §3.6.2), [..., C] -> [...].

    unbiased=True gives Simpson's (1949) finite-sample form 1 - sum n_i (n_i - 1) / (N (N - 1))
    (needs integer counts, N >= 2). 0 for a single category, 1 - 1/C when all are equal.
    """
    if not unbiased:
        p, _ = _proportions(counts)
        return 1.0 - jnp.sum(jnp.square(p), axis=-1)
    counts = as_float32(counts)
    total = jnp.sum(counts, axis=-1)
    pairs = jnp.where(total >= 2, total * (total - 1.0), jnp.nan)
    return 1.0 - jnp.sum(counts * (counts - 1.0), axis=-1) / pairs


def category_entropy(counts) -> jnp.ndarray:
    """Shannon entropy (nats) of the category distribution, [..., C] -> [...]; 0 log 0 = 0."""
    p, total = _proportions(counts)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.where(total > 0, -jnp.sum(plogp, axis=-1), jnp.nan)


def kl_to_uniform(counts) -> jnp.ndarray:
    """KL(p || uniform) = log C - H(p) in nats (Figure 3.8's genre score), [..., C] -> [...]."""
    return math.log(jnp.shape(counts)[-1]) - category_entropy(counts)


def distinct_n(sequences, *, n: int, per: str = "tokens") -> float:
    """distinct-n (Li et al., 2016): distinct n-grams over a corpus, divided by its size.

    Args:
      sequences: iterable of token sequences (lists / 1-D arrays of hashable tokens; for a
        padded [B, T] array, pass the unpadded rows).
      n: n-gram order (1 = distinct-1, 2 = distinct-2).
      per: "tokens" (Li et al.: scaled by the total number of generated tokens) or "ngrams"
        (the fraction of n-grams that are distinct).

    Returns:
      A Python float; 0.0 for a corpus without tokens / n-grams.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if per not in ("tokens", "ngrams"):
        raise ValueError(f"per must be 'tokens' or 'ngrams', got {per!r}")
    seen, num_ngrams, num_tokens = set(), 0, 0
    for seq in sequences:
        seq = [t.item() if isinstance(t, np.generic) else t for t in np.asarray(seq).tolist()]
        num_tokens += len(seq)
        for i in range(len(seq) - n + 1):
            seen.add(tuple(seq[i:i + n]))
            num_ngrams += 1
    denominator = num_tokens if per == "tokens" else num_ngrams
    return len(seen) / denominator if denominator else 0.0
