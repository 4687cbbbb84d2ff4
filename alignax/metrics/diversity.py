"""Diversity metrics of generated samples (thesis Tables 2.2-2.4, 3.2-3.4, Figure 3.8).

Category metrics take counts (or probabilities) over C categories, [..., C], and normalise
them; a row with no mass has no distribution and gives NaN. They are jittable, float32.
`distinct_n` and `self_bleu` take Python sequences of samples and return a float.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import sacrebleu

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


def self_bleu(samples: Sequence, *, max_order: int = 4) -> float:
    """Self-BLEU (Zhu et al., 2018, Texygen) of a set of samples, in [0, 1]; lower is more diverse.

    Each sample in turn is the hypothesis and the other K - 1 samples are its references; the
    result is the mean of these K sentence-level BLEU scores (thesis Tables 2.2-2.4, whose
    values are on this [0, 1] scale). BLEU is sacreBLEU's sentence BLEU (`BLEU(
    effective_order=True)`, its sentence-level default: exponential smoothing of n-gram orders
    with no match, orders longer than the hypothesis left out, brevity penalty against the
    closest reference length), divided by 100.

    Args:
      samples: K >= 2 samples of one prompt, either all strings (tokenised by sacreBLEU's
        standard "13a" tokeniser) or all token sequences (lists / 1-D arrays of ints; each
        token is one word).
      max_order: highest n-gram order (BLEU-4 by default).

    Returns:
      A Python float in [0, 1] (1 when all samples are identical and at least max_order long).

    Examples:
      >>> self_bleu(["the cat sat on the mat", "the cat sat on the mat"])
      1.0
      >>> self_bleu([[1, 2, 3], [4, 5, 6]])
      0.0
    """
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples (each is scored against the "
                         f"others), got {len(samples)}")
    if not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be a positive int, got {max_order!r}")
    is_text = [isinstance(s, str) for s in samples]
    if any(is_text) and not all(is_text):
        raise TypeError("self_bleu samples must be all strings or all token sequences, got a mix")
    if all(is_text):
        texts, tokenize = samples, "13a"
    else:
        texts, tokenize = [" ".join(str(int(t)) for t in np.asarray(s).reshape(-1))
                           for s in samples], "none"
    bleu = sacrebleu.metrics.BLEU(tokenize=tokenize, effective_order=True,
                                  max_ngram_order=max_order)
    scores = [bleu.sentence_score(texts[i], texts[:i] + texts[i + 1:]).score
              for i in range(len(texts))]
    return min(float(np.mean(scores)) / 100.0, 1.0)  # 1 + 4e-16 from sacreBLEU's exp(log)
