"""Diversity metrics (Tables 3.2-3.4, Figure 3.8) against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignax.metrics import (category_counts, category_entropy, distinct_n, kl_to_uniform,
                             simpson_index)

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
