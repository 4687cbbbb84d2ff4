"""Per-prompt metrics of sampled responses: one value per prompt, [P], for every metric.

A study computes these for each policy and hands them to `alignax.eval.summarize` (mean with a
95% bootstrap interval over prompts) or `alignax.eval.compare` (paired differences):

- "length": mean response length in tokens; "truncated": share of responses cut at
  max_new_tokens without an EOS (when the config names an EOS id);
- "entropy/sequence": predictive entropy E_y[-log q(y|x)] of the sampling distribution q,
  estimated by the mean of -log q over the K samples (thesis Table 2.2's "Entropy");
  "entropy/token": the same sum divided by the number of response tokens;
- "score/NAME": the mean over K of any per-sample score [P, K] (reward model, oracle);
- with the reference log-probs of the samples: "log_ratio", the mean of h = log pi(y|x) -
  log pi_ref(y|x) (the plain estimate of KL(pi || pi_ref)), and "divergence/NAME", the mean of
  the §2.8.2 estimator's terms of D_f(pi, pi_ref) = E_ref[f(pi / pi_ref)] (the divergence
  f-DPO regularises) from samples of pi;
- "self_bleu" and "distinct_N" over the K samples of a prompt (token ids);
- with category labels per sample: "category/entropy", "category/simpson",
  "category/kl_to_uniform" of the sampled category distribution, and "category/invalid", the
  share of samples outside the prompt's categories (left out of the other three).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from alignax.divergences import f_divergence_estimator
from alignax.eval.sampling import Samples
from alignax.metrics.diversity import (category_counts, category_entropy, distinct_n,
                                       simpson_index)
from alignax.metrics.diversity import self_bleu as _self_bleu

Divergence = str | tuple[str, float]
"""A divergence of Table 2.1 by name ("reverse_kl", "forward_kl", "jsd", "total_variation"), or
("alpha", alpha) for the alpha-divergence."""


def divergence_label(divergence: Divergence) -> str:
    """"reverse_kl" -> "reverse_kl"; ("alpha", 0.5) -> "alpha_0.5"."""
    if isinstance(divergence, str):
        return divergence
    name, alpha = divergence
    return f"{name}_{alpha:g}"


def divergence_estimates(logprobs, reference_logprobs, *,
                         divergences: Sequence[Divergence] = ("reverse_kl",)
                         ) -> dict[str, np.ndarray]:
    """Per-prompt estimates of D_f(pi, pi_ref) from K samples y ~ pi of each prompt.

    Args:
      logprobs: [P, K] log pi(y|x) of the samples (the policy they were drawn from).
      reference_logprobs: [P, K] log pi_ref(y|x) of the same samples.
      divergences: names or ("alpha", alpha) pairs.

    Returns:
      {"log_ratio": mean_k h, "divergence/LABEL": mean_k of
      `f_divergence_estimator(name, h, alpha=alpha, sampled_from="p")`}, each [P] float64.
      Every divergence term is >= 0 and exactly 0 where h = 0; for reverse KL the terms are
      h + e^-h - 1.
    """
    h = np.asarray(logprobs, np.float32) - np.asarray(reference_logprobs, np.float32)  # [P, K]
    if h.ndim != 2 or np.shape(logprobs) != np.shape(reference_logprobs):
        raise ValueError(f"logprobs and reference_logprobs must both be [P, K], got "
                         f"{np.shape(logprobs)} and {np.shape(reference_logprobs)}")
    bad = np.argwhere(~np.isfinite(h))
    if bad.size:
        raise ValueError(f"non-finite log-ratios at (prompt, sample) {bad[:8].tolist()}")
    out = {"log_ratio": h.mean(-1, dtype=np.float64)}
    for divergence in divergences:
        name, alpha = (divergence, None) if isinstance(divergence, str) else divergence
        terms = f_divergence_estimator(name, jnp.asarray(h), alpha=alpha, sampled_from="p")
        out[f"divergence/{divergence_label(divergence)}"] = np.asarray(terms).mean(
            -1, dtype=np.float64)
    return out


def category_metrics(labels, num_categories) -> dict[str, np.ndarray]:
    """Diversity of the sampled categories of each prompt (thesis §3.6.1-3.6.3).

    Args:
      labels: [P, K] int category of each sample, valid in [0, C_p); anything else (e.g. -1
        for an unparsable response or a number outside the prompt's range) is invalid.
      num_categories: C, an int or [P] ints (prompts may have different category counts,
        e.g. the integers in [a, b]).

    Returns:
      {"category/entropy", "category/simpson", "category/kl_to_uniform" (log C_p - entropy),
      "category/invalid"}, each [P] float64; the first three are over the valid samples only
      and NaN for a prompt with none.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be [P, K] integers, got shape {labels.shape}, dtype "
                         f"{labels.dtype}")
    c = np.broadcast_to(np.asarray(num_categories), labels.shape[:1])
    if not np.issubdtype(c.dtype, np.integer) or np.any(c < 1):
        raise ValueError(f"num_categories must be positive ints, got {num_categories!r}")
    valid = (labels >= 0) & (labels < c[:, None])  # [P, K]
    counts = np.asarray(category_counts(np.where(valid, labels, 0), num_categories=int(c.max()),
                                        where=valid), np.float64)  # [P, C_max]
    entropy = np.asarray(category_entropy(counts), np.float64)
    return {"category/entropy": entropy,
            "category/simpson": np.asarray(simpson_index(counts), np.float64),
            "category/kl_to_uniform": np.log(c.astype(np.float64)) - entropy,
            "category/invalid": 1.0 - valid.mean(-1, dtype=np.float64)}


def prompt_metrics(samples: Samples, *, scores: Mapping[str, np.ndarray] | None = None,
                   reference_logprobs=None, divergences: Sequence[Divergence] = ("reverse_kl",),
                   diversity: bool = True, distinct: Sequence[int] = (1, 2),
                   categories: tuple[np.ndarray, int | np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
    """Every per-prompt metric of `samples` (see the module docstring for the names).

    Args:
      samples: from `alignax.eval.sample`.
      scores: name -> [P, K] per-sample scores (`reward_scores`, `token_scores`, ...).
      reference_logprobs: [P, K] log pi_ref(y|x) (`response_logprobs(reference, samples)`);
        adds "log_ratio" and "divergence/*". The samples must come from the policy itself
        (temperature 1, no top-k / top-p), else the estimates would not be of D_f(pi, pi_ref).
      divergences: which "divergence/*" to add.
      diversity: add "self_bleu" (needs K >= 2) and "distinct_N" for N in `distinct`.
      distinct: the n-gram orders of distinct-n (per prompt, over its K samples, divided by
        their token count as Li et al. 2016); for a corpus-level value call
        `alignax.metrics.distinct_n` on every prompt's responses together.
      categories: (labels [P, K], num_categories) for `category_metrics`.

    Returns:
      name -> [P] float64.
    """
    p, k = samples.tokens.shape[:2]
    lengths = samples.lengths
    out = {"length": lengths.mean(-1, dtype=np.float64)}
    if samples.config.eos_ids:
        last = np.take_along_axis(samples.tokens, np.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
        ended = (lengths > 0) & np.isin(last, samples.config.eos_ids)
        out["truncated"] = 1.0 - ended.mean(-1, dtype=np.float64)
    neg = -samples.sampling_logprobs.astype(np.float64)  # [P, K]
    out["entropy/sequence"] = neg.mean(-1)
    out["entropy/token"] = neg.sum(-1) / np.maximum(lengths.sum(-1), 1)
    for name, values in (scores or {}).items():
        values = np.asarray(values, np.float64)
        if values.shape != (p, k):
            raise ValueError(f"scores[{name!r}] must be [P, K] = {(p, k)}, got {values.shape} "
                             f"(reduce an ensemble's member axis first)")
        out[f"score/{name}"] = values.mean(-1)
    if reference_logprobs is not None:
        if not samples.config.from_policy:
            c = samples.config
            raise ValueError(
                f"divergence estimates need samples from the policy itself (temperature=1, no "
                f"top_k / top_p), got temperature={c.temperature}, top_k={c.top_k}, "
                f"top_p={c.top_p}; sample again with those for the divergence columns")
        out.update(divergence_estimates(samples.logprobs, reference_logprobs,
                                        divergences=divergences))
    if diversity:
        if k < 2:
            raise ValueError("self_bleu needs num_samples >= 2 per prompt; pass diversity=False")
        responses = samples.responses()
        out["self_bleu"] = np.asarray([_self_bleu(r) for r in responses])
        for n in distinct:
            out[f"distinct_{n}"] = np.asarray([distinct_n(r, n=n) for r in responses])
    if categories is not None:
        labels, num_categories = categories
        if np.shape(labels) != (p, k):
            raise ValueError(f"category labels must be [P, K] = {(p, k)}, got {np.shape(labels)}")
        out.update(category_metrics(labels, num_categories))
    return out
