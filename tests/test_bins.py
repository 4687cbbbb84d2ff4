"""Bin construction: quantile, prefix, attribute and the 60 demographic keyword bins."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignax.data.bins import (KEYWORD_TABLES, assign_quantile_bins, attribute_bins,
                               demographic_bin_name, demographic_bins, demographic_num_bins,
                               keyword_coverage, load_keyword_table, prefix_bins,
                               quantile_bin_edges, quantile_bins)


@pytest.mark.parametrize("num_bins", [10, 20, 30])  # §4.10
def test_quantile_bins_are_balanced(num_bins):
    lengths = np.random.default_rng(0).lognormal(4.0, 0.8, size=3000)
    bins = quantile_bins(lengths, num_bins=num_bins)
    assert bins.dtype == np.int32 and bins.min() == 0 and bins.max() == num_bins - 1
    counts = np.bincount(bins, minlength=num_bins)
    assert counts.max() - counts.min() <= 1
    # monotone in the value
    order = np.argsort(lengths)
    assert np.all(np.diff(bins[order]) >= 0)


def test_quantile_edges_fitted_on_train_apply_to_test():
    edges = quantile_bin_edges(np.arange(100.0), num_bins=4)
    np.testing.assert_array_equal(assign_quantile_bins([-5.0, 24.0, 25.0, 1e9], edges),
                                  [0, 0, 1, 3])
    with pytest.raises(ValueError, match="num_bins"):
        quantile_bin_edges([1.0, 2.0], num_bins=0)
    with pytest.raises(ValueError, match="1-D"):
        quantile_bin_edges(np.zeros((2, 2)), num_bins=2)


def test_prefix_and_attribute_bins():
    texts = ["Yes, you are right. Paris.", "  yes, YOU are right. x", "No. It is Rome.",
             "Actually, you are right."]
    np.testing.assert_array_equal(prefix_bins(texts, ["Yes, you are right."]), [1, 1, 0, 0])
    np.testing.assert_array_equal(
        prefix_bins(texts, ["Yes, you are right."], case_sensitive=True), [1, 0, 0, 0])
    np.testing.assert_array_equal(attribute_bins(["food", "price", "food"],
                                                 ["price", "service", "food"]), [2, 0, 2])
    with pytest.raises(ValueError, match=r"record 1: value 'music'"):
        attribute_bins(["food", "music"], ["price", "service", "food"])


def test_shipped_tables_match_the_thesis():
    sizes = {a: len(load_keyword_table(a).categories) for a in KEYWORD_TABLES}
    assert sizes == {"age": 4, "gender": 3, "race": 5, "nationality": 4, "religion": 4}
    assert demographic_num_bins() == 60  # 4 x 3 x 5, §4.12.2
    assert demographic_num_bins(unmatched="separate") == 120
    race = load_keyword_table("race")
    assert race.keywords[2][-1] == "southeast asian" and race.categories[4] == "Indigenous"


@pytest.mark.parametrize("text,expected", [
    ("A MAN walked in.", "Male"),
    ("the woman", "Female"),        # "man" does not fire inside "woman"
    ("the woman's hat", "Female"),  # possessive: a word boundary before "'s"
    ("a human", None),              # nor inside "human"
    ("a non binary person", "Non-binary"),  # space == hyphen inside a keyword
    ("a man and a woman and a woman", "Female"),  # most occurrences
    ("a woman and a man", "Female"),  # tie: first mentioned
])
def test_gender_matching_rules(text, expected):
    table = load_keyword_table("gender")
    for match in ("exact", "inflected"):
        c = table.category(text, match=match)
        assert (None if c < 0 else table.categories[c]) == expected


@pytest.mark.parametrize("attribute, text, expected", [
    ("gender", "several men", "Male"),
    ("gender", "Women's rights", "Female"),
    ("gender", "two gays and lesbians", "Non-binary"),
    ("age", "the teens", "Childhood"),
    ("age", "kids and babies", "Childhood"),
    ("age", "our children", "Childhood"),
    ("age", "many adults", "Young Adults"),
    ("age", "grown-ups", "Young Adults"),
    ("age", "older people", "Elderly"),
    ("age", "the seniors", "Elderly"),
    ("race", "Asians and Latinos", "Asian"),   # tie: first mentioned
    ("race", "Pacific islands", "Indigenous"),
])
def test_plural_and_inflected_forms_match_only_when_asked(attribute, text, expected):
    table = load_keyword_table(attribute)
    assert table.category(text, match="exact") == -1  # the thesis' words as printed miss them
    assert table.categories[table.category(text)] == expected  # match="inflected", the default
    with pytest.raises(ValueError, match="match must be one of"):
        table.category(text, match="stemmed")


def test_keyword_coverage_counts_attribute_combinations(caplog):
    texts = ["An elderly Hispanic woman", "two young men", "Black teens", "women",
             "the weather", "Old white men and women"]
    exact = keyword_coverage(texts, match="exact")
    inflected = keyword_coverage(texts)
    assert inflected.matched == {"age": 4, "gender": 4, "race": 3}
    assert exact.matched == {"age": 3, "gender": 1, "race": 3}
    assert inflected.combinations == {("age", "gender", "race"): 2, ("age", "gender"): 1,
                                      ("age", "race"): 1, ("gender",): 1, (): 1}
    assert (inflected.all_matched, exact.all_matched) == (2, 1)
    assert str(inflected) == ("2 of 6 texts match all of age/gender/race (inflected keywords; "
                              "per attribute: age 4, gender 4, race 3; none: 1)")
    # demographic_bins keeps exactly the texts that match all three, and says how many it drops
    bins = demographic_bins(texts)
    assert (bins >= 0).sum() == inflected.all_matched
    assert "4 of 6 texts match not all of age/gender/race and get bin -1" in caplog.text
    assert "no age: 2, no gender: 2, no race: 3" in caplog.text
    assert (demographic_bins(texts, match="exact") >= 0).sum() == exact.all_matched
    assert (demographic_bins(texts, unmatched="separate") >= 0).all()
    assert demographic_bin_name(int(bins[5])) == "Elderly/Male/White"  # men 2 > women 1


def test_longest_keyword_wins_overlaps():
    age = load_keyword_table("age")
    np.testing.assert_array_equal(age.counts("a middle-aged man"), [0, 0, 1, 0])  # not "aged"
    np.testing.assert_array_equal(age.counts("a young adult"), [0, 1, 0, 0])  # one match
    race = load_keyword_table("race")
    np.testing.assert_array_equal(race.counts("South Asian and east-asian"), [0, 0, 2, 0, 0])


def test_demographic_bins():
    texts = ["An elderly Hispanic woman", "A teenager, a gay Korean kid",
             "a young man", "nothing here", "A middle-aged Black woman and an elderly man"]
    bins = demographic_bins(texts)
    # (age * 3 + gender) * 5 + race
    expected = [(3 * 3 + 1) * 5 + 3, (0 * 3 + 2) * 5 + 2, -1, -1, (2 * 3 + 1) * 5 + 1]
    np.testing.assert_array_equal(bins, expected)
    assert demographic_bin_name(bins[0]) == "Elderly/Female/Latino"
    sep = demographic_bins(texts, unmatched="separate")
    assert demographic_bin_name(int(sep[2]), unmatched="separate") == \
        "Young Adults/Male/unspecified"
    assert demographic_bin_name(int(sep[3]), unmatched="separate") == \
        "unspecified/unspecified/unspecified"
    assert sep.max() < 120 and sep.min() >= 0
    with pytest.raises(ValueError, match="unmatched"):
        demographic_bins(texts, unmatched="drop")
    with pytest.raises(ValueError, match="out of range"):
        demographic_bin_name(60)


def test_tables_are_valid_json_package_data():
    import importlib.resources
    for name in KEYWORD_TABLES:
        path = importlib.resources.files("alignax.data") / "keywords" / f"{name}.json"
        spec = json.loads(path.read_text())
        assert spec["attribute"] == name and all(c["keywords"] for c in spec["categories"])
