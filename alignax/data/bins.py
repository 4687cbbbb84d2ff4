"""Bins of a spurious variable Z for the causal reward regulariser (thesis §4.5.1, §4.10, §4.12).

Three constructions, all returning int32 bin ids for `alignax.objectives.binned_mmd2`:

- `quantile_bins`: quantile bins of a scalar such as response length (M in {10, 20, 30}, §4.10).
  Fit the edges on the training set with `quantile_bin_edges`, then `assign_quantile_bins`.
- `prefix_bins` / `attribute_bins`: a response prefix such as "Yes, you are right." (§4.6.1)
  or any categorical attribute (a concept label, §4.6.3).
- `demographic_bins`: the 4 x 3 x 5 = 60 age x gender x race bins of §4.12.2, from the keyword
  tables 4.7-4.9 shipped as JSON in `alignax/data/keywords/` (4.10 nationality and 4.11
  religion ship too, for filtering).

Keyword matching rules (decided here; the thesis does not say):
- case-insensitive, on word boundaries, no stemming ("man" matches "Man," but not "woman",
  "human" or "men"); inside a keyword a space and a hyphen are interchangeable and may repeat
  ("middle-aged" == "middle aged").
- overlapping keywords: the longest keyword at a position wins and consumes the text, so
  "middle-aged" is Middle Age, not also Elderly ("aged").
- several categories of one attribute in a text: the category with the most keyword
  occurrences wins; a tie goes to the category mentioned first.
- no category of an attribute: that attribute is unmatched. With unmatched="exclude" (default)
  the demographic bin is -1, to be masked out with `where=bins >= 0`; with
  unmatched="separate" each attribute gets an extra "unspecified" level and there are
  5 x 4 x 6 = 120 bins.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import re
from typing import Hashable, Sequence

import numpy as np

DEMOGRAPHIC_ATTRIBUTES = ("age", "gender", "race")  # §4.12.2, tables 4.7-4.9
KEYWORD_TABLES = ("age", "gender", "race", "nationality", "religion")  # tables 4.7-4.11


def quantile_bin_edges(values, *, num_bins: int) -> np.ndarray:
    """Interior quantile edges [num_bins - 1] of a scalar (e.g. response lengths) [N].

    Ties can make edges coincide (then some bins stay empty, which `binned_mmd2` tolerates).
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    return np.quantile(v, np.arange(1, num_bins) / num_bins)


def assign_quantile_bins(values, edges) -> np.ndarray:
    """Bin ids [N] int32 in [0, len(edges)]: bin b holds edges[b-1] <= value < edges[b]."""
    return np.searchsorted(np.asarray(edges), np.asarray(values), side="right").astype(np.int32)


def quantile_bins(values, *, num_bins: int) -> np.ndarray:
    """Quantile bins of `values` [N] fitted on `values` itself: int32 [N] in [0, num_bins)."""
    return assign_quantile_bins(values, quantile_bin_edges(values, num_bins=num_bins))


def prefix_bins(texts: Sequence[str], prefixes: Sequence[str], *,
                case_sensitive: bool = False) -> np.ndarray:
    """Bin 1 + i for texts that start (after leading whitespace) with prefixes[i], else 0.

    The first listed prefix that matches wins. num_bins = len(prefixes) + 1.

    Examples:
      >>> prefix_bins(["Yes, you are right. 4", "It is 5"], ["Yes, you are right."]).tolist()
      [1, 0]
    """
    fold = (lambda s: s) if case_sensitive else str.casefold
    folded = [fold(p) for p in prefixes]
    out = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        head = fold(text.lstrip())
        for j, p in enumerate(folded):
            if head.startswith(p):
                out[i] = j + 1
                break
    return out


def attribute_bins(values: Sequence[Hashable], categories: Sequence[Hashable]) -> np.ndarray:
    """Bin = index of each value in `categories` (a concept label, a group). int32 [N].

    Raises:
      ValueError: naming the first record whose value is not a category.
    """
    index = {c: i for i, c in enumerate(categories)}
    out = np.empty(len(values), np.int32)
    for i, v in enumerate(values):
        if v not in index:
            raise ValueError(f"record {i}: value {v!r} is not one of the categories "
                             f"{list(categories)!r}")
        out[i] = index[v]
    return out


def _normalise(keyword: str) -> str:
    return " ".join(re.split(r"[\s\-]+", keyword.strip().casefold()))


@dataclasses.dataclass(frozen=True)
class KeywordTable:
    """One demographic keyword table: categories (rows) and their keywords."""

    attribute: str
    categories: tuple[str, ...]
    keywords: tuple[tuple[str, ...], ...]

    @functools.cached_property
    def _lookup(self) -> dict[str, int]:
        lookup: dict[str, int] = {}
        for c, words in enumerate(self.keywords):
            for w in words:
                key = _normalise(w)
                if lookup.setdefault(key, c) != c:
                    raise ValueError(f"{self.attribute}: keyword {w!r} is in two categories")
        return lookup

    @functools.cached_property
    def _pattern(self) -> re.Pattern:
        words = sorted(self._lookup, key=len, reverse=True)  # longest first wins at a position
        parts = [r"[\s\-]+".join(re.escape(t) for t in w.split(" ")) for w in words]
        return re.compile(r"\b(?:" + "|".join(parts) + r")\b", re.IGNORECASE)

    def counts(self, text: str) -> np.ndarray:
        """Keyword occurrences per category [C] int (non-overlapping, longest first)."""
        out = np.zeros(len(self.categories), np.int64)
        for m in self._pattern.finditer(text):
            out[self._lookup[_normalise(m.group(0))]] += 1
        return out

    def category(self, text: str) -> int:
        """The category of `text` (most occurrences, ties: first mentioned) or -1 if none."""
        first: dict[int, int] = {}
        counts = np.zeros(len(self.categories), np.int64)
        for m in self._pattern.finditer(text):
            c = self._lookup[_normalise(m.group(0))]
            counts[c] += 1
            first.setdefault(c, m.start())
        if not first:
            return -1
        return int(min(first, key=lambda c: (-counts[c], first[c])))


@functools.lru_cache(maxsize=None)
def load_keyword_table(attribute: str) -> KeywordTable:
    """Loads a shipped table: "age" (4.7), "gender" (4.8), "race" (4.9), "nationality" (4.10),
    "religion" (4.11)."""
    if attribute not in KEYWORD_TABLES:
        raise ValueError(f"unknown keyword table {attribute!r}; have {KEYWORD_TABLES}")
    path = importlib.resources.files("alignax.data") / "keywords" / f"{attribute}.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    return KeywordTable(attribute=spec["attribute"],
                        categories=tuple(c["name"] for c in spec["categories"]),
                        keywords=tuple(tuple(c["keywords"]) for c in spec["categories"]))


def demographic_num_bins(*, unmatched: str = "exclude") -> int:
    """60 (= 4 x 3 x 5, §4.12.2) with unmatched="exclude", 120 with unmatched="separate"."""
    extra = _extra_level(unmatched)
    sizes = [len(load_keyword_table(a).categories) + extra for a in DEMOGRAPHIC_ATTRIBUTES]
    return int(np.prod(sizes))


def demographic_bins(texts: Sequence[str], *, unmatched: str = "exclude") -> np.ndarray:
    """Age x gender x race bin of each text (§4.12.2): int32 [N].

    bin = (age * G + gender) * R + race over the category indices of tables 4.7, 4.8, 4.9
    (G = 3 genders, R = 5 races), so there are 60 bins. See the module docstring for texts
    matching several categories or none (-1 under unmatched="exclude").
    """
    extra = _extra_level(unmatched)
    tables = [load_keyword_table(a) for a in DEMOGRAPHIC_ATTRIBUTES]
    sizes = [len(t.categories) + extra for t in tables]
    out = np.empty(len(texts), np.int32)
    for i, text in enumerate(texts):
        cats = [t.category(text) for t in tables]
        if extra:
            cats = [len(t.categories) if c < 0 else c for t, c in zip(tables, cats)]
        elif min(cats) < 0:
            out[i] = -1
            continue
        out[i] = (cats[0] * sizes[1] + cats[1]) * sizes[2] + cats[2]
    return out


def demographic_bin_name(index: int, *, unmatched: str = "exclude") -> str:
    """"Age/Gender/Race" name of a demographic bin, e.g. "Elderly/Female/Asian"."""
    extra = _extra_level(unmatched)
    tables = [load_keyword_table(a) for a in DEMOGRAPHIC_ATTRIBUTES]
    names = [list(t.categories) + ["unspecified"] * extra for t in tables]
    if not 0 <= index < demographic_num_bins(unmatched=unmatched):
        raise ValueError(f"demographic bin {index} out of range")
    age, rest = divmod(index, len(names[1]) * len(names[2]))
    gender, race = divmod(rest, len(names[2]))
    return f"{names[0][age]}/{names[1][gender]}/{names[2][race]}"


def _extra_level(unmatched: str) -> int:
    if unmatched not in ("exclude", "separate"):
        raise ValueError(f"unmatched must be 'exclude' or 'separate', got {unmatched!r}")
    return int(unmatched == "separate")
