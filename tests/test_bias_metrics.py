"""Concept-bias metrics (Zhou et al., 2023), win score and sycophancy rate."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.metrics import concept_bias_metrics, sycophancy_rate, win_score

_metrics = jax.jit(concept_bias_metrics, static_argnames="num_labels")


def _reference(pred, label, concept, k):
    acc = lambda m: 100.0 * np.mean(pred[m] == label[m])  # noqa: E731
    recall = [acc(concept & (label == c)) for c in range(k)]
    pairs = [(i, j) for i, j in itertools.combinations(range(k), 2)]
    return acc(~concept), acc(concept), np.mean([recall[j] - recall[i] for i, j in pairs])


@pytest.mark.parametrize("k", [2, 5])
def test_concept_metrics_match_reference(k):
    rng = np.random.default_rng(k)
    label = rng.integers(0, k, 400)
    concept = rng.random(400) < 0.4
    pred = np.where(rng.random(400) < 0.7, label, rng.integers(0, k, 400))
    out = _metrics(pred, label, concept, num_labels=k)
    ref = _reference(pred, label, concept, k)
    np.testing.assert_allclose([out["acc_no_concept"], out["acc_concept"], out["bias_concept"]],
                               ref, rtol=1e-5)


def test_bias_sign_convention():
    # a model that says "positive" whenever the concept is present: Bias@C = +100
    label = np.array([0, 1, 0, 1, 0, 1])
    concept = np.array([1, 1, 1, 0, 0, 0], bool)
    pred = np.where(concept, 1, label)
    out = _metrics(pred, label, concept, num_labels=2)
    assert float(out["bias_concept"]) == 100.0
    assert float(out["acc_no_concept"]) == 100.0
    np.testing.assert_allclose(out["acc_concept"], 100 / 3, rtol=1e-6)
    out = _metrics(np.where(concept, 0, label), label, concept, num_labels=2)
    assert float(out["bias_concept"]) == -100.0
    assert np.isnan(_metrics(pred, label, np.zeros(6, bool), num_labels=2)["acc_concept"])


def test_win_score():
    assert float(win_score(jnp.array([1, 1, -1, 0]))) == 75.0  # 50 + (2 - 1) / 4 * 100
    assert float(win_score(jnp.array([1, -1, 1, 1]), where=jnp.array([1, 1, 0, 0], bool))) \
        == 50.0
    assert float(win_score(-jnp.ones(3))) == -50.0


def test_sycophancy_rate():
    c = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], bool)
    assert float(sycophancy_rate(c)) == 50.0
    mask = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 0]], bool)
    assert float(sycophancy_rate(c, sample_mask=mask)) == 75.0  # masked-out misses ignored
    with pytest.raises(ValueError, match=r"\[P, S\]"):
        sycophancy_rate(np.ones(3, bool))
