"""Diversity metrics (Tables 3.2-3.4, Figure 3.8) against float64 references."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from alignax.metrics import (category_counts, category_entropy, distinct_n, kl_to_uniform,
                             self_bleu, simpson_index)

COUNTS = np.array([[5, 0, 3, 2], [1, 1, 1, 1], [0, 7, 0, 0], [10, 2, 0, 0]], np.float32)


def _p(counts):
    counts = np.asarray(counts, np.float64)
    return counts / counts.sum(-1, keepdims=True)


def test_simpson_index_float64_reference():
    want = 1.0 - (_p(COUNTS) ** 2).sum(-1)
    np.testing.assert_allclose(simpson_index(COUNTS), want, rtol=1e-6)
    c = COUNTS.astype(np.float64)
    n = c.sum(-1)
    np.testing.assert_allclose(simpson_index(COUNTS, unbiased=True),
                               1.0 - (c * (c - 1)).sum(-1) / (n * (n - 1)), rtol=1e-6)
    # the thesis' bounds: 0 for one category, 1 - 1/C for equal counts
    assert float(simpson_index(COUNTS[2])) == 0.0
    assert float(simpson_index(COUNTS[1])) == pytest.approx(0.75)


def test_entropy_and_kl_to_uniform_float64_reference():
    p = _p(COUNTS)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    np.testing.assert_allclose(category_entropy(COUNTS), h, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kl_to_uniform(COUNTS), (p * np.log(np.where(p > 0, p, 1) * 4)).sum(-1),
                               rtol=1e-5, atol=1e-6)
    assert float(kl_to_uniform(COUNTS[1])) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_uniform(COUNTS[2])) == pytest.approx(math.log(4), rel=1e-6)


def test_probabilities_counts_and_empty_rows():
    np.testing.assert_allclose(simpson_index(_p(COUNTS)), simpson_index(COUNTS), rtol=1e-6)
    labels = np.array([[0, 2, 2, 1, 0], [3, 3, 3, 3, 3]])
    where = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(category_counts(labels, num_categories=4, where=where),
                                  [[1, 1, 2, 0], [0, 0, 0, 2]])
    assert np.isnan(simpson_index(np.zeros(3))) and np.isnan(category_entropy(np.zeros(3)))


def test_distinct_n_reference():
    corpus = [[1, 2, 3, 1, 2], [2, 3, 4], []]
    # unigrams {1,2,3,4}: 4 distinct over 8 tokens; bigrams {12,23,31,34}: 4 of 6 bigrams
    assert distinct_n(corpus, n=1) == pytest.approx(4 / 8)
    assert distinct_n(corpus, n=2) == pytest.approx(4 / 8)
    assert distinct_n(corpus, n=2, per="ngrams") == pytest.approx(4 / 6)
    assert distinct_n([np.array([5, 5, 5])], n=1, per="ngrams") == pytest.approx(1 / 3)
    assert distinct_n([], n=1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(corpus, n=0)


def reference_sentence_bleu(hyp, refs, max_order=4):
    """Sentence BLEU in float64 from its definition (Papineni et al., 2002): clipped n-gram
    precisions (a hypothesis n-gram counts at most its largest count in one reference), the
    brevity penalty against the closest reference length (shorter on a tie), orders longer
    than the hypothesis left out, an order without a match smoothed to 1 / (2^j total) for
    the j-th such order (the NIST "exp" smoothing), 0 when nothing matches at all."""
    def ngrams(words, n):
        return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    closest = min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
    logs, smooth, any_match = [], 1.0, False
    for n in range(1, max_order + 1):
        total = len(hyp) - n + 1
        if total <= 0:
            break
        best = collections.Counter()
        for r in refs:
            best |= ngrams(r, n)  # elementwise max of counts
        correct = sum(min(c, best[g]) for g, c in ngrams(hyp, n).items())
        any_match |= correct > 0
        if correct == 0:
            smooth *= 2.0
            logs.append(math.log(1.0 / (smooth * total)))
        else:
            logs.append(math.log(correct / total))
    if not any_match:
        return 0.0
    bp = 1.0 if len(hyp) >= closest else math.exp(1.0 - closest / len(hyp))
    return bp * math.exp(sum(logs) / len(logs))


def reference_self_bleu(samples, max_order=4):
    return float(np.mean([reference_sentence_bleu(s, samples[:i] + samples[i + 1:], max_order)
                          for i, s in enumerate(samples)]))


@pytest.mark.parametrize("seed", range(4))
def test_self_bleu_float64_reference(seed):
    rng = np.random.default_rng(seed)
    # token sequences over a small vocabulary, lengths 1-12 (some shorter than 4-grams)
    samples = [rng.integers(0, 5, rng.integers(1, 13)).tolist() for _ in range(6)]
    for order in (2, 4):
        assert self_bleu(samples, max_order=order) == pytest.approx(
            reference_self_bleu(samples, order), rel=1e-12, abs=1e-15)


def test_self_bleu_texts_and_bounds():
    texts = ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park"]
    want = reference_self_bleu([t.split() for t in texts])
    assert self_bleu(texts) == pytest.approx(want, rel=1e-12)
    assert self_bleu(["same words here today"] * 3) == 1.0
    assert self_bleu([[1, 2], [3, 4], [5]]) == 0.0
    assert self_bleu([np.array([1, 2, 3]), np.array([1, 2, 3])]) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu([[1, 2, 3]])
    with pytest.raises(TypeError, match="mix"):
        self_bleu(["a b", [1, 2]])
