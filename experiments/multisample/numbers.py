"""The random-number task of thesis §3.6.1: "Pick a number between a and b:", answered by one
integer, and how uniform a policy's answers are.

- Training ranges: a uniform in [low, high], the gap b - a uniform in [min_gap, max_gap] (the
  thesis: a in [0, 1000], gaps 5-10). Test ranges: the same distribution on fresh prompts, and
  the thesis' unconstrained test ranges, a < b anywhere in [low, high].
- The biased reference: Llama-3 favours 7 (Figure 3.3); the reference here is fine-tuned on
  answers that are the range's *favourite* (the smallest number in [a, b] whose last digit is
  7, else a) with probability `favourite_share`, else uniform in [a, b].
- Preference groups (§3.6.1: "the preferred response group is based on a uniform distribution
  of numbers, while non-uniform distributions are classified as rejected"): a chosen group is
  k uniform draws from [a, b]; a rejected group is k draws from one non-uniform distribution,
  with probability 1/2 the reference's (favourite-biased) one, else uniform over two numbers
  of the range picked at random (a "few numbers" distribution: its single draws are uniform,
  only a group shows that it is not).
- Uniformity of K sampled answers to a prompt: the thesis' predictive entropy (of the answers
  inside [a, b]), KL to the uniform distribution on [a, b], the share of answers outside the
  range (not a plain integer in [a, b]) and the total-variation distance to uniform that counts
  the outside answers as mass in the wrong place.
"""

from __future__ import annotations

import re

import numpy as np

from alignax.eval import category_metrics

PROMPT = "Pick a number between {low} and {high}:"
FAVOURITE_DIGIT = 7

_INTEGER = re.compile(r"\s*(\d+)\s*")


def prompt(low: int, high: int) -> str:
    """The prompt asking for a random integer in [low, high]."""
    return PROMPT.format(low=int(low), high=int(high))


def answer(number: int) -> str:
    """The response text of an answer (a space, then the digits)."""
    return f" {int(number)}"


def favourite(low: int, high: int) -> int:
    """The biased reference's favourite in [low, high]: the smallest number whose last digit is
    7 (as Llama-3 favours 7, thesis Figure 3.3), or `low` when the range holds none.

    >>> favourite(531, 540), favourite(8, 13), favourite(0, 20)
    (537, 8, 7)
    """
    first = low + (FAVOURITE_DIGIT - low) % 10
    return int(first) if first <= high else int(low)


def training_ranges(rng: np.random.Generator, n: int, *, low: int, high: int, min_gap: int,
                    max_gap: int) -> np.ndarray:
    """[n, 2] int ranges (a, a + gap): a uniform in [low, high], gap uniform in
    [min_gap, max_gap] (§3.6.1's training prompts)."""
    if not 1 <= min_gap <= max_gap:
        raise ValueError(f"need 1 <= min_gap <= max_gap, got {min_gap}, {max_gap}")
    a = rng.integers(low, high + 1, size=n)
    return np.stack([a, a + rng.integers(min_gap, max_gap + 1, size=n)], axis=1)


def unconstrained_ranges(rng: np.random.Generator, n: int, *, low: int,
                         high: int) -> np.ndarray:
    """[n, 2] int ranges a < b drawn uniformly from [low, high] with no gap constraint (the
    thesis' test prompts)."""
    if high - low < 1:
        raise ValueError(f"need high > low, got [{low}, {high}]")
    pairs = np.stack([rng.choice(high - low + 1, size=2, replace=False) for _ in range(n)])
    return np.sort(pairs, axis=1) + low


def reference_draws(rng: np.random.Generator, ranges: np.ndarray, *, size: int,
                    favourite_share: float) -> np.ndarray:
    """[n, size] answers from the biased reference distribution of each range: its favourite
    with probability `favourite_share`, else uniform in [a, b]."""
    if not 0.0 <= favourite_share <= 1.0:
        raise ValueError(f"favourite_share must be in [0, 1], got {favourite_share}")
    ranges = np.asarray(ranges)
    fav = np.array([favourite(a, b) for a, b in ranges])[:, None]  # [n, 1]
    uniform = rng.integers(ranges[:, :1], ranges[:, 1:] + 1, size=(len(ranges), size))
    return np.where(rng.random((len(ranges), size)) < favourite_share, fav, uniform)


def few_number_draws(rng: np.random.Generator, ranges: np.ndarray, *, size: int) -> np.ndarray:
    """[n, size] answers uniform over two distinct numbers of each range, picked at random."""
    ranges = np.asarray(ranges)
    offsets = np.stack([rng.choice(b - a + 1, size=2, replace=False) for a, b in ranges])
    pick = rng.integers(0, 2, size=(len(ranges), size))
    return ranges[:, :1] + np.take_along_axis(offsets, pick, axis=1)


def preference_groups(rng: np.random.Generator, ranges: np.ndarray, *, size: int,
                      favourite_share: float) -> dict[str, np.ndarray]:
    """Chosen and rejected groups of `size` answers for each range (module docstring).

    Smaller groups are the first k members of these (`methods.records`), so the data of every
    group size, and the single pairs of DPO / IPO, are nested and comparisons are paired.

    Returns:
      {"chosen": [n, size] uniform answers, "rejected": [n, size] non-uniform answers,
      "rejected_kind": [n] 0 where the rejected group is favourite-biased, 1 where it is
      uniform over two numbers}.
    """
    ranges = np.asarray(ranges)
    chosen = rng.integers(ranges[:, :1], ranges[:, 1:] + 1, size=(len(ranges), size))
    biased = reference_draws(rng, ranges, size=size, favourite_share=favourite_share)
    few = few_number_draws(rng, ranges, size=size)
    kind = rng.integers(0, 2, size=len(ranges))
    return {"chosen": chosen, "rejected": np.where(kind[:, None] == 0, biased, few),
            "rejected_kind": kind}


def parse_answers(texts) -> np.ndarray:
    """[P, K] int answers from P lists of K response texts; -1 where a text is not one plain
    non-negative integer (surrounding whitespace allowed).

    >>> parse_answers([[" 537", "537!", " 5 3"], ["12", "", " 0012"]]).tolist()
    [[537, -1, -1], [12, -1, 12]]
    """
    out = []
    for row in texts:
        values = []
        for text in row:
            match = _INTEGER.fullmatch(text)
            values.append(int(match.group(1)) if match else -1)
        out.append(values)
    return np.asarray(out, dtype=np.int64)


def uniformity(values, ranges) -> dict[str, np.ndarray]:
    """How uniform the K answers to each of P prompts are, each [P] float64.

    Args:
      values: [P, K] int answers (-1 for a response that is not an integer).
      ranges: [P, 2] the prompts' (a, b).

    Returns:
      "entropy": the entropy (nats) of the empirical distribution of the answers inside
        [a, b] (the thesis' predictive entropy; 0 when no answer is inside);
      "kl_to_uniform": log(b - a + 1) - entropy, the KL divergence of that distribution from
        the uniform one on [a, b];
      "out_of_range": the share of answers that are not an integer in [a, b];
      "tv_to_uniform": the total-variation distance from the uniform distribution on [a, b]
        of the empirical distribution of all K answers, the outside ones included:
        (sum_n |count_n / K - 1 / C| + out_of_range) / 2 with C = b - a + 1.
    """
    values, ranges = np.asarray(values, np.int64), np.asarray(ranges, np.int64)
    if values.ndim != 2 or ranges.shape != (values.shape[0], 2):
        raise ValueError(f"values must be [P, K] and ranges [P, 2], got {values.shape} and "
                         f"{ranges.shape}")
    low, high = ranges[:, :1], ranges[:, 1:]
    inside = (values >= low) & (values <= high)
    labels = np.where(inside, values - low, -1)  # category n - a, -1 outside
    sizes = (high - low + 1)[:, 0]
    metrics = category_metrics(labels, sizes)
    entropy = np.nan_to_num(metrics["category/entropy"], nan=0.0)  # no answer inside: 0
    k = values.shape[1]
    tv = np.empty(len(values))
    for p, (row, c) in enumerate(zip(labels, sizes)):
        counts = np.bincount(row[row >= 0], minlength=c)
        tv[p] = 0.5 * (np.abs(counts / k - 1.0 / c).sum() + np.mean(row < 0))
    return {"entropy": entropy, "kl_to_uniform": np.log(sizes.astype(np.float64)) - entropy,
            "out_of_range": metrics["category/invalid"], "tv_to_uniform": tv}
