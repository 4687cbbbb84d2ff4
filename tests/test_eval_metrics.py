"""alignax.eval's model-free parts and alignax.metrics.comparison against hand-computed and
float64 references: bootstrap intervals (exact enumeration), win rates, divergence estimates,
category diversity, per-prompt metrics of hand-built samples, and the report helpers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import alignax.eval as ev
from alignax.metrics import compare_scores, win_rates, win_score


# ------------------------------------------------------------------ bootstrap intervals

def exact_bootstrap_quantiles(values, levels):
    """Quantiles of the mean over all n^n equally likely resamples, with the CDF just below
    and at each quantile (the percentile interval's exact limit as resamples -> inf)."""
    n = len(values)
    means = np.sort([np.mean([values[i] for i in idx])
                     for idx in itertools.product(range(n), repeat=n)])
    out = []
    for q in levels:
        value = means[int(math.ceil(q * means.size)) - 1]
        out.append((value, np.mean(means < value), np.mean(means <= value)))
    return out


def test_bootstrap_interval_matches_exact_enumeration():
    values = [0.0, 1.0, 1.0, 3.0]  # 4^4 = 256 equally likely resamples, a skewed mean
    resamples = 20000
    got = ev.bootstrap_estimate(values, seed=3, num_resamples=resamples)
    (low, below_low, at_low), (high, below_high, at_high) = exact_bootstrap_quantiles(
        values, (0.025, 0.975))
    # Each exact quantile sits on a plateau of the discrete CDF that holds the 2.5% / 97.5%
    # level with a margin of more than 5 binomial standard errors of the resampled CDF, so the
    # percentile interval of 20000 resamples lands on it exactly.
    se = math.sqrt(0.025 * 0.975 / resamples)
    assert below_low < 0.025 - 5 * se and at_low > 0.025 + 5 * se
    assert below_high < 0.975 - 5 * se and at_high > 0.975 + 5 * se
    assert (got.mean, got.low, got.high, got.n) == (1.25, low, high, 4)
    assert got.format(2) == f"1.25 [{low:.2f}, {high:.2f}]"


def test_bootstrap_seeded_nan_policy_and_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    a, b = ev.bootstrap_estimate(x, seed=1), ev.bootstrap_estimate(x, seed=1)
    assert a == b and a.low < x.mean() < a.high
    assert ev.bootstrap_estimate(x, seed=2) != a
    constant = ev.bootstrap_estimate(np.full(5, 0.7))  # e.g. a policy that wins every prompt
    assert (constant.low, constant.high) == pytest.approx((0.7, 0.7))
    with pytest.raises(ValueError, match=r"NaN values at indices \[3\]"):
        ev.bootstrap_estimate(np.r_[x[:3], np.nan, x[3:]])
    omitted = ev.bootstrap_estimate(np.r_[x[:3], np.nan, x[3:]], nan_policy="omit", seed=1)
    assert omitted == a and omitted.n == 50
    with pytest.raises(ValueError, match="at least 2"):
        ev.bootstrap_estimate([1.0])
    with pytest.raises(ValueError, match="one-dimensional"):
        ev.bootstrap_estimate(np.ones((2, 2)))
    with pytest.raises(ValueError, match="metric 'b'"):
        ev.summarize({"a": x, "b": [1.0]})


def test_paired_comparison_is_the_bootstrap_of_differences():
    rng = np.random.default_rng(1)
    prompt_effect = rng.normal(scale=5.0, size=40)  # shared by both policies
    a = {"reward": prompt_effect + 0.3 + rng.normal(scale=0.1, size=40), "only_a": np.ones(40)}
    b = {"reward": prompt_effect + rng.normal(scale=0.1, size=40)}
    paired = ev.compare(a, b, seed=4)
    assert list(paired) == ["reward"]
    assert paired["reward"] == ev.bootstrap_estimate(a["reward"] - b["reward"], seed=4)
    # the shared prompt effect cancels: the paired interval is far narrower than either mean's
    width = paired["reward"].high - paired["reward"].low
    single = ev.summarize(a, seed=4)["reward"]
    assert 0.2 < paired["reward"].low and width < 0.1 * (single.high - single.low)
    with pytest.raises(ValueError, match="same prompts"):
        ev.compare(a, {"reward": np.ones(3)})


# ------------------------------------------------------------------ win rates

def test_compare_scores_and_win_rates_by_hand():
    np.testing.assert_array_equal(compare_scores([1, 2, 3, 4], [2, 2, 1, 4.05], tolerance=0.1),
                                  [-1, 0, 1, 0])
    np.testing.assert_array_equal(compare_scores([1.0, 3.0], [2.0, 2.0], higher_is_better=False),
                                  [1, -1])
    with pytest.raises(ValueError, match=r"NaN scores at indices \[\[1\]\]"):
        compare_scores([1.0, np.nan], [0.0, 0.0])
    outcomes = np.array([[1, 1, 0, -1], [-1, -1, -1, 0], [1, 1, 1, 1]])
    rates = win_rates(outcomes)
    np.testing.assert_allclose(rates["win"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(rates["tie"], [0.25, 0.25, 0.0])
    np.testing.assert_allclose(rates["loss"], [0.25, 0.75, 0.0])
    np.testing.assert_allclose(rates["win_score"], [75.0, -25.0, 150.0])
    # over all 12 comparisons: 6 wins, 2 ties, 4 losses; win score 50 + 100 (6 - 4) / 12
    assert float(rates["win_score"].mean()) == pytest.approx(50 + 100 * 2 / 12)
    assert float(rates["win_score"].mean()) == pytest.approx(float(win_score(outcomes.ravel())))
    np.testing.assert_allclose(win_rates([1, 0, -1])["tie"], [0.0, 1.0, 0.0])  # [P] outcomes
    with pytest.raises(ValueError, match=r"\+1, 0 or -1"):
        win_rates([[1, 2]])


# ------------------------------------------------------------------ divergences, categories

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", ("alpha", 0.25), "total_variation")


def float64_terms(h):
    """The §2.8.2 estimator of D_f(p, q) from x ~ p, written out per divergence in float64:
    the conjugate g(t) = t f(1/t) at t = q/p, minus g'(1)(t - 1)."""
    t = np.exp(-h)
    return {"reverse_kl": h + t - 1.0,  # g(t) = -log t, g'(1) = -1
            "forward_kl": t * np.log(t) - (t - 1.0),  # g(t) = t log t, g'(1) = 1
            "jsd": t * np.log(t) - (t + 1.0) * np.log((t + 1.0) / 2.0),  # g = f, g'(1) = 0
            "alpha_0.25": (t ** 0.25 - 0.25 * t - 0.75) / (0.75 * -0.25),  # alpha 0.75
            "total_variation": 0.5 * np.abs(t - 1.0)}


def test_divergence_estimates_float64_reference():
    h = np.array([[0.0, 0.3, -0.7, 2.0], [5.0, -3.0, 0.01, -0.01]], np.float32)
    ref = np.zeros_like(h)
    out = ev.divergence_estimates(h, ref, divergences=DIVERGENCES)
    np.testing.assert_allclose(out["log_ratio"], h.mean(-1, dtype=np.float64), rtol=1e-7)
    for label, terms in float64_terms(h.astype(np.float64)).items():
        # float32 terms: a few ulps each, relative to the mean of non-negative terms
        np.testing.assert_allclose(out[f"divergence/{label}"], terms.mean(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        ev.divergence_estimates(np.array([[np.inf]]), np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        ev.divergence_estimates(np.zeros(3), np.zeros(3))


def test_divergence_estimates_are_unbiased_for_d_f_pi_ref():
    """On a 6-outcome p and q, the mean over 40000 draws from p lies within 5 standard errors
    of D_f(p, q) = sum_x q f(p / q): the direction f-DPO's regulariser has."""
    rng = np.random.default_rng(5)
    log_p = np.log(rng.dirichlet(np.ones(6) * 2.0))
    log_q = np.log(rng.dirichlet(np.ones(6) * 2.0))
    draws = rng.choice(6, size=40000, p=np.exp(log_p))
    out = ev.divergence_estimates(log_p[draws][None], log_q[draws][None], divergences=DIVERGENCES)
    u = np.exp(log_p - log_q)
    f = {"reverse_kl": u * np.log(u), "forward_kl": -np.log(u),
         "jsd": u * np.log(u) - (u + 1) * np.log((u + 1) / 2),
         "alpha_0.25": (u ** 0.75 - 0.75 * u - 0.25) / (0.25 * -0.75),
         "total_variation": 0.5 * np.abs(u - 1)}
    terms = float64_terms((log_p - log_q)[draws])
    for label in f:
        exact = np.sum(np.exp(log_q) * f[label])
        se = terms[label].std(ddof=1) / np.sqrt(draws.size)
        assert abs(out[f"divergence/{label}"][0] - exact) < 5 * se, label


def test_category_metrics_by_hand():
    labels = np.array([[0, 0, 1, 1], [2, 2, 2, -1], [0, 5, 1, 7], [-1, -1, 9, 9]])
    out = ev.category_metrics(labels, np.array([2, 3, 6, 4]))
    # entropies and Simpson indices are float32 (alignax.metrics.diversity): a few ulps of
    # values below log 6
    f32 = dict(rtol=4 * 2.0 ** -23, atol=4 * 2.0 ** -23 * math.log(6))
    np.testing.assert_allclose(out["category/entropy"][:3], [math.log(2), 0.0, math.log(3)],
                               **f32)
    np.testing.assert_allclose(out["category/simpson"][:3], [0.5, 0.0, 2 / 3], **f32)
    np.testing.assert_allclose(out["category/kl_to_uniform"][:3],
                               [0.0, math.log(3), math.log(6) - math.log(3)], **f32)
    np.testing.assert_allclose(out["category/invalid"], [0.0, 0.25, 0.25, 1.0])
    assert all(np.isnan(out[k][3]) for k in ("category/entropy", "category/simpson"))
    with pytest.raises(ValueError, match="integers"):
        ev.category_metrics(labels.astype(float), 3)


# ------------------------------------------------------------------ per-prompt metrics

def hand_samples(**config):
    """2 prompts x 2 samples of at most 4 tokens, with EOS = 9."""
    tokens = np.array([[[5, 6, 9, 0], [5, 6, 7, 8]], [[4, 9, 0, 0], [4, 9, 0, 0]]], np.int32)
    mask = tokens != 0
    logprobs = np.array([[-2.0, -3.0], [-0.5, -0.5]], np.float32)
    return ev.Samples(np.ones((2, 1), np.int32), np.ones((2, 1), bool), tokens, mask, logprobs,
                      logprobs, ev.SamplingConfig(num_samples=2, max_new_tokens=4,
                                                  eos_token_id=9, **config))


def test_prompt_metrics_by_hand():
    samples = hand_samples()
    out = ev.prompt_metrics(samples, scores={"oracle": [[1.0, 0.0], [0.5, 0.5]]},
                            reference_logprobs=[[-2.0, -2.0], [-0.5, -1.5]])
    np.testing.assert_allclose(out["length"], [3.5, 2.0])
    np.testing.assert_allclose(out["truncated"], [0.5, 0.0])  # [5, 6, 7, 8] hit the cap
    np.testing.assert_allclose(out["entropy/sequence"], [2.5, 0.5])
    np.testing.assert_allclose(out["entropy/token"], [5.0 / 7.0, 1.0 / 4.0])
    np.testing.assert_allclose(out["score/oracle"], [0.5, 0.5])
    np.testing.assert_allclose(out["log_ratio"], [-0.5, 0.5])
    kl = [np.mean([0.0, -1.0 + math.e - 1.0]), np.mean([0.0, 1.0 + math.exp(-1.0) - 1.0])]
    np.testing.assert_allclose(out["divergence/reverse_kl"], kl, rtol=1e-6)
    # distinct-1: {5, 6, 9, 7, 8} over 7 tokens; {4, 9} over 4. distinct-2: 4/7 and 1/4
    np.testing.assert_allclose(out["distinct_1"], [5 / 7, 2 / 4])
    np.testing.assert_allclose(out["distinct_2"], [4 / 7, 1 / 4])
    assert out["self_bleu"][1] == pytest.approx(1.0)  # two identical responses
    assert set(out) == {"length", "truncated", "entropy/sequence", "entropy/token",
                        "score/oracle", "log_ratio", "divergence/reverse_kl", "self_bleu",
                        "distinct_1", "distinct_2"}
    with pytest.raises(ValueError, match=r"scores\['oracle'\] must be \[P, K\]"):
        ev.prompt_metrics(samples, scores={"oracle": np.ones((3, 2, 2))})
    with pytest.raises(ValueError, match="top_p"):
        ev.prompt_metrics(hand_samples(top_p=0.9), reference_logprobs=np.zeros((2, 2)))


# ------------------------------------------------------------------ report helpers

def test_markdown_table_record_and_frontier_plot(tmp_path):
    e = ev.Estimate(0.5, 0.25, 0.75, 8)
    table = ev.markdown_table({"dpo": {"reward": e, "beta": 0.1, "note": "x"},
                               "ipo": {"reward": e}}, digits=2)
    assert table.splitlines() == ["| policy | reward | beta | note |", "|---|---|---|---|",
                                  "| dpo | 0.50 [0.25, 0.75] | 0.10 | x |",
                                  "| ipo | 0.50 [0.25, 0.75] |  |  |"]
    record = ev.summary_record({"kl": e}, policy="dpo", seed=0)
    assert record == {"policy": "dpo", "seed": 0, "kl": 0.5, "kl/low": 0.25, "kl/high": 0.75,
                      "n": 8}
    curves = {"reverse_kl": [{"kl": e, "reward": e}, {"kl": ev.Estimate(1, 0.9, 1.1, 8),
                                                      "reward": e}]}
    path = tmp_path / "frontier.png"
    fig = ev.frontier_plot(curves, x="kl", y="reward", path=path,
                           point_labels={"reverse_kl": ["0.1", "1"]})
    assert path.stat().st_size > 1000 and len(fig.axes[0].lines) >= 1
    with pytest.raises(ValueError, match="lack"):
        ev.frontier_plot({"c": [{"kl": e}]}, x="kl", y="reward")
