"""Means over prompts with seeded 95% bootstrap intervals, and paired differences of policies.

The unit of resampling is the prompt (or whatever the rows of the per-prompt arrays are): the
interval of a mean over P prompts comes from `scipy.stats.bootstrap` on those P values. For a
study over several training seeds, concatenate the seeds' per-prompt arrays (units = (seed,
prompt) pairs), or pass one value per seed to resample seeds. `compare` resamples prompts with
both policies' values kept together (the paired bootstrap), which removes the between-prompt
spread that both policies share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval [low, high] at `confidence`, from n values."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def format(self, digits: int = 3) -> str:
        """"0.512 [0.480, 0.545]"."""
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def bootstrap_estimate(values, *, seed: int = 0, confidence: float = 0.95,
                       num_resamples: int = 2000, method: str = "percentile",
                       nan_policy: str = "raise") -> Estimate:
    """The mean of `values` [n] with a bootstrap confidence interval.

    Args:
      values: [n] per-unit values (n >= 2), e.g. a per-prompt metric.
      seed: seeds the resampling (the same seed and n resample the same units).
      confidence: the interval's level.
      num_resamples: bootstrap resamples.
      method: `scipy.stats.bootstrap`'s "percentile" (default; well defined for constant
        data such as all-win outcomes), "basic" or "BCa".
      nan_policy: "raise" (a NaN value is an error naming its index) or "omit" (NaN values
        are left out; `Estimate.n` counts the rest).

    Returns:
      Estimate(mean, low, high, n, confidence).
    """
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional [n], got shape {x.shape}")
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    nan = np.isnan(x)
    if nan.any() and nan_policy == "raise":
        raise ValueError(f"NaN values at indices {np.flatnonzero(nan)[:8].tolist()}; filter "
                         f"them or pass nan_policy='omit'")
    x = x[~nan]
    if np.isinf(x).any():
        raise ValueError(f"infinite values at indices {np.flatnonzero(np.isinf(x))[:8].tolist()}")
    if x.size < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {x.size}")
    result = scipy.stats.bootstrap((x,), np.mean, n_resamples=num_resamples, vectorized=True,
                                   confidence_level=confidence, method=method,
                                   rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return Estimate(float(x.mean()), float(interval.low), float(interval.high), int(x.size),
                    confidence)


def summarize(per_prompt: Mapping[str, np.ndarray], **kwargs) -> dict[str, Estimate]:
    """`bootstrap_estimate` of every per-prompt metric (name -> [P]); kwargs as there.

    Every metric is resampled with the same seed, so the intervals come from the same
    resampled prompt sets.
    """
    out = {}
    for name, values in per_prompt.items():
        try:
            out[name] = bootstrap_estimate(values, **kwargs)
        except ValueError as e:
            raise ValueError(f"metric {name!r}: {e}") from None
    return out


def compare(per_prompt_a: Mapping[str, np.ndarray], per_prompt_b: Mapping[str, np.ndarray],
            **kwargs) -> dict[str, Estimate]:
    """Paired differences A - B of the metrics both hold, prompt by prompt, with paired
    bootstrap intervals (kwargs as `bootstrap_estimate`).

    The two dicts must hold the same prompts in the same order (e.g. both policies sampled on
    one prompt set): the mean of a - b is resampled over prompts.
    """
    out = {}
    for name in per_prompt_a.keys() & per_prompt_b.keys():
        a, b = np.asarray(per_prompt_a[name], np.float64), np.asarray(per_prompt_b[name],
                                                                       np.float64)
        if a.shape != b.shape:
            raise ValueError(f"metric {name!r}: A has shape {a.shape}, B {b.shape}; a paired "
                             f"comparison needs the same prompts")
        try:
            out[name] = bootstrap_estimate(a - b, **kwargs)
        except ValueError as e:
            raise ValueError(f"metric {name!r}: {e}") from None
    return dict(sorted(out.items()))
