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
- case-insensitive, on word boundaries ("man" matches "Man," and "man's" but not "woman" or
  "human"); inside a keyword a space and a hyphen are interchangeable and may repeat
  ("middle-aged" == "middle aged").
- `match="inflected"` (default) also matches each keyword's plural ("teens", "kids", "babies",
  "young adults": the last word takes -s, -es or -ies) and a few irregular forms ("men",
  "women", "children"; "older", "oldest", "younger", "youngest"); `match="exact"` matches the
  tables' words only, as printed in the thesis.
- overlapping keywords: the longest keyword at a position wins and consumes the text, so
  "middle-aged" is Middle Age, not also Elderly ("aged").
- several categories of one attribute in a text: the category with the most keyword
  occurrences wins; a tie goes to the category mentioned first.
- no category of an attribute: that attribute is unmatched. With unmatched="exclude" (default)
  a text must match all three attributes, else its demographic bin is -1 (mask it out with
  `where=bins >= 0`; `demographic_bins` logs how many texts that excludes); with
  unmatched="separate" each attribute gets an extra "unspecified" level and there are
  5 x 4 x 6 = 120 bins. `keyword_coverage` counts which attributes the texts match.

`LengthQuantileBins` makes per-response length bins inside `alignax.data.prepare_dataset`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.resources
import json
import logging
import math
import re
from typing import Hashable, Sequence

import numpy as np

DEMOGRAPHIC_ATTRIBUTES = ("age", "gender", "race")  # §4.12.2, tables 4.7-4.9
KEYWORD_TABLES = ("age", "gender", "race", "nationality", "religion")  # tables 4.7-4.11
MATCH_RULES = ("exact", "inflected")
# Irregular inflections of the tables' words; every noun also gets a regular plural.
_IRREGULAR = {"man": ("men",), "woman": ("women",), "child": ("children",),
              "old": ("older", "oldest"), "young": ("younger", "youngest")}

logger = logging.getLogger("alignax.data")


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


@dataclasses.dataclass(frozen=True)
class LengthQuantileBins:
    """Per-response bins of the response length in tokens: M quantile bins (§4.10).

    `alignax.data.prepare_dataset(train, tok, response_bins=LengthQuantileBins(num_bins=10))`
    fits the edges on every response of `train` (all roles pooled, so chosen and rejected bins
    are comparable; lengths before truncation, EOS included) and returns them as
    `dataset.response_bins`; pass that to `prepare_dataset` for the evaluation split, which then
    uses the training edges.

    Attributes:
      num_bins: M.
      edges: the M - 1 interior edges (None until fitted); bin b holds edges[b-1] <= n < edges[b].
    """

    num_bins: int
    edges: tuple[float, ...] | None = None

    def __post_init__(self):
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, (int, np.integer)) \
                or self.num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {self.num_bins!r}")
        if self.edges is not None:
            edges = tuple(float(e) for e in self.edges)
            if len(edges) != self.num_bins - 1 or not all(map(math.isfinite, edges)) or any(
                    b < a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"edges must be {self.num_bins - 1} finite, non-decreasing "
                                 f"numbers for num_bins={self.num_bins}, got {self.edges!r}")
            object.__setattr__(self, "edges", edges)

    def fit(self, lengths) -> "LengthQuantileBins":
        """These bins with edges fitted on `lengths` [N], or unchanged if they have edges."""
        if self.edges is not None:
            return self
        edges = quantile_bin_edges(lengths, num_bins=self.num_bins)
        return LengthQuantileBins(num_bins=self.num_bins, edges=tuple(edges.tolist()))

    def assign(self, lengths) -> np.ndarray:
        """Bin ids [N] int32 in [0, num_bins) of `lengths` [N]."""
        if self.edges is None:
            raise ValueError("LengthQuantileBins has no edges yet: fit it first")
        return assign_quantile_bins(lengths, self.edges)


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


def _plural(word: str) -> str:
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    return word + "s"


def keyword_forms(keyword: str, *, match: str = "inflected") -> tuple[str, ...]:
    """The normalised forms of `keyword` that match (module docstring).

    >>> keyword_forms("young adult")
    ('young adult', 'young adults')
    >>> keyword_forms("woman"), keyword_forms("baby"), keyword_forms("woman", match="exact")
    (('woman', 'women'), ('baby', 'babies'), ('woman',))
    """
    if match not in MATCH_RULES:
        raise ValueError(f"match must be one of {MATCH_RULES}, got {match!r}")
    keyword = _normalise(keyword)
    if match == "exact":
        return (keyword,)
    *head, last = keyword.split(" ")
    forms = (last, *_IRREGULAR.get(last, (_plural(last),)))
    return tuple(dict.fromkeys(" ".join([*head, form]) for form in forms))


@dataclasses.dataclass(frozen=True)
class KeywordTable:
    """One demographic keyword table: categories (rows) and their keywords."""

    attribute: str
    categories: tuple[str, ...]
    keywords: tuple[tuple[str, ...], ...]

    def counts(self, text: str, *, match: str = "inflected") -> np.ndarray:
        """Keyword occurrences per category [C] int (non-overlapping, longest first)."""
        lookup, pattern = _compile(self, match)
        out = np.zeros(len(self.categories), np.int64)
        for m in pattern.finditer(text):
            out[lookup[_normalise(m.group(0))]] += 1
        return out

    def category(self, text: str, *, match: str = "inflected") -> int:
        """The category of `text` (most occurrences, ties: first mentioned) or -1 if none."""
        lookup, pattern = _compile(self, match)
        first: dict[int, int] = {}
        counts = np.zeros(len(self.categories), np.int64)
        for m in pattern.finditer(text):
            c = lookup[_normalise(m.group(0))]
            counts[c] += 1
            first.setdefault(c, m.start())
        if not first:
            return -1
        return int(min(first, key=lambda c: (-counts[c], first[c])))


@functools.lru_cache(maxsize=None)
def _compile(table: KeywordTable, match: str) -> tuple[dict[str, int], re.Pattern]:
    """form -> category, and a pattern matching any form (longest first wins at a position)."""
    lookup: dict[str, int] = {}
    for c, words in enumerate(table.keywords):
        for w in words:
            for form in keyword_forms(w, match=match):
                if lookup.setdefault(form, c) != c:
                    raise ValueError(f"{table.attribute}: {form!r} (from keyword {w!r}) is in two "
                                     "categories")
    words = sorted(lookup, key=len, reverse=True)
    parts = [r"[\s\-]+".join(re.escape(t) for t in w.split(" ")) for w in words]
    return lookup, re.compile(r"\b(?:" + "|".join(parts) + r")\b", re.IGNORECASE)


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


@dataclasses.dataclass(frozen=True)
class KeywordCoverage:
    """Which attributes' keywords a collection of texts matches.

    Attributes:
      num_texts: texts looked at.
      attributes: the attributes (keyword tables) checked.
      match: the matching rule used ("exact" or "inflected").
      matched: attribute -> texts matching one of its categories.
      combinations: the exact set of attributes a text matched -> texts (absent: 0).
    """

    num_texts: int
    attributes: tuple[str, ...]
    match: str
    matched: dict[str, int]
    combinations: dict[tuple[str, ...], int]

    @property
    def all_matched(self) -> int:
        """Texts matching every attribute (kept by unmatched="exclude")."""
        return self.combinations.get(self.attributes, 0)

    def __str__(self) -> str:
        each = ", ".join(f"{a} {self.matched[a]}" for a in self.attributes)
        return (f"{self.all_matched} of {self.num_texts} texts match all of "
                f"{'/'.join(self.attributes)} ({self.match} keywords; per attribute: {each}; "
                f"none: {self.combinations.get((), 0)})")


def keyword_coverage(texts: Sequence[str], *, attributes: Sequence[str] = DEMOGRAPHIC_ATTRIBUTES,
                     match: str = "inflected") -> KeywordCoverage:
    """Counts which of `attributes` (keyword tables) each text matches.

    >>> str(keyword_coverage(["an old woman", "two young men", "a Black child", "hello"]))
    '0 of 4 texts match all of age/gender/race (inflected keywords; per attribute: age 3, gender 2, race 1; none: 1)'
    """
    tables = [load_keyword_table(a) for a in attributes]
    combinations: collections.Counter = collections.Counter()
    for text in texts:
        combinations[tuple(a for a, t in zip(attributes, tables)
                           if t.category(text, match=match) >= 0)] += 1
    matched = {a: sum(n for combo, n in combinations.items() if a in combo) for a in attributes}
    return KeywordCoverage(num_texts=len(texts), attributes=tuple(attributes), match=match,
                           matched=matched, combinations=dict(combinations))


def demographic_bins(texts: Sequence[str], *, unmatched: str = "exclude",
                     match: str = "inflected") -> np.ndarray:
    """Age x gender x race bin of each text (§4.12.2): int32 [N].

    bin = (age * G + gender) * R + race over the category indices of tables 4.7, 4.8, 4.9
    (G = 3 genders, R = 5 races), so there are 60 bins. See the module docstring for the
    matching rule `match`, and for texts matching several categories or none (-1 under
    unmatched="exclude"; how many, and which attributes they miss, is logged as a warning).
    """
    extra = _extra_level(unmatched)
    tables = [load_keyword_table(a) for a in DEMOGRAPHIC_ATTRIBUTES]
    sizes = [len(t.categories) + extra for t in tables]
    out = np.empty(len(texts), np.int32)
    missing: collections.Counter = collections.Counter()
    for i, text in enumerate(texts):
        cats = [t.category(text, match=match) for t in tables]
        if extra:
            cats = [len(t.categories) if c < 0 else c for t, c in zip(tables, cats)]
        elif min(cats) < 0:
            out[i] = -1
            missing.update(a for a, c in zip(DEMOGRAPHIC_ATTRIBUTES, cats) if c < 0)
            continue
        out[i] = (cats[0] * sizes[1] + cats[1]) * sizes[2] + cats[2]
    excluded = int((out < 0).sum())
    if excluded:
        logger.warning("demographic_bins: %d of %d texts match not all of age/gender/race and "
                       "get bin -1 (no %s; %s keywords); unmatched='separate' keeps them with an "
                       "'unspecified' level", excluded, len(texts),
                       ", no ".join(f"{a}: {missing[a]}" for a in DEMOGRAPHIC_ATTRIBUTES), match)
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
