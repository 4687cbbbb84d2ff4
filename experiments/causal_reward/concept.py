"""Concept-bias study data and metrics (thesis §4.6.3, §4.11, Table 4.2).

What the thesis did: Yelp (concepts price, service, food), IMDB (music, acting, comedy) and
Amazon Shoe Reviews (size, color, style) with the concept labels of Zhou et al. (2023); each
training set was made concept-biased by keeping only positive reviews that mention the concept
C ("all positive sentiment entries were linked to the 'food' concept"), then put in the
Anthropic HH format: the prompt "Classify the text into negative, or positive" in front of the
review, the true label as the chosen assistant response and the wrong label as the rejected
one. Llama-3-8B was SFT-ed on the chosen transcripts, reward models were trained with LoRA
(rank 64, alpha 128; lambda: conditional 0.1 / 0.3 / 0.1, unconditional 0.5 / 3 / 1 for Yelp /
IMDB / Amazon) and PPO ran against each. Metrics (Zhou et al.): Acc@NoC and Acc@C, the accuracy
on test texts without / with C, and Bias@C, the gap between the recall of the positive and of
the negative label on texts with C (`alignax.metrics.bias.concept_bias_metrics`).

The embedded default (`build_concept`): one- or two-sentence film reviews in the embedded
tokenizer's vocabulary ("The soundtrack was wonderful. The ending was dull."); the concepts are
IMDB's (music: "music"/"soundtrack", acting: "acting"/"lead actor", comedy: "jokes"), every
other aspect (script, ending, plot, ...) is concept-free, and the adjectives carry the label.
A text "with C" has one sentence about C. The split construction (`build_concept_from`, shared
with the paper-scale loader) draws texts without replacement from a pool:
- train: label positive with probability 1/2; a positive text mentions C with probability
  `positive_concept_rate` (thesis: 1, "all positive samples"), a negative one with
  `negative_concept_rate` (not stated in the thesis; default 0.3), so C predicts "positive";
- test: every (label, C) cell equally often, so Acc@C, Acc@NoC and Bias@C are measured on
  unbiased data.

Record columns: chosen, rejected (HH format) and text, label (1 positive, 0 negative), concept
(C), has_concept, concept_bin (1 if the text mentions C, else 0; `NUM_BINS` = 2; prepare with
`alignax.data.prepare_dataset(..., bin_column="concept_bin")`).

Paper scale: `load_concept_texts` reads any dataset with a text, a label and a concept column
(hub id or local file), e.g. Zhou et al.'s concept-annotated Yelp / IMDB / Amazon files
(columns text or cf_text, label, concepts), and `build_concept_from(pool, concept=...)` makes
the biased splits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alignax.data import load_records
from alignax.metrics.bias import concept_bias_metrics
from experiments.causal_reward.records import StudyData, hh_pair
from experiments.causal_reward.tables import (format_interval, markdown_table, ordered_keys,
                                              row_label, split_row_key)

INSTRUCTION = "Classify the text into negative, or positive"
LABELS = ("negative", "positive")
NUM_BINS = 2
CONCEPT_ASPECTS = {"music": (("music", "was"), ("soundtrack", "was")),
                   "acting": (("acting", "was"), ("lead actor", "was")),
                   "comedy": (("jokes", "were"),)}
NEUTRAL_ASPECTS = (("script", "was"), ("ending", "was"), ("pacing", "was"), ("story", "was"),
                   ("plot", "was"), ("camera work", "was"), ("photography", "was"),
                   ("dialogue", "was"), ("director", "was"), ("villain", "was"),
                   ("costumes", "were"))
ADJECTIVES = (("awful", "terrible", "boring", "dull", "tedious", "predictable", "messy",
               "forgettable", "weak", "poor"),
              ("great", "wonderful", "brilliant", "excellent", "charming", "delightful",
               "beautiful", "gripping", "touching", "superb"))
PAPER_TABLE_4_2 = {
    ("yelp", "price"): {"vanilla": (59.26, 71.47, 18.88), "conditional": (97.22, 99.04, 0.52),
                        "unconditional": (94.44, 98.35, 6.86)},
    ("yelp", "service"): {"vanilla": (69.09, 71.43, -15.54),
                          "conditional": (99.45, 97.56, -0.61),
                          "unconditional": (98.18, 97.21, -3.56)},
    ("yelp", "food"): {"vanilla": (78.77, 67.48, 7.31), "conditional": (97.77, 99.09, 0.71),
                       "unconditional": (98.88, 97.57, -0.86)},
    ("imdb", "music"): {"vanilla": (77.78, 73.98, 13.49), "conditional": (68.89, 55.73, 2.86),
                        "unconditional": (88.89, 88.35, 9.52)},
    ("imdb", "acting"): {"vanilla": (75.54, 71.81, -20.94), "conditional": (54.84, 60.64, -7.68),
                         "unconditional": (89.52, 86.17, -13.24)},
    ("imdb", "comedy"): {"vanilla": (69.93, 75.78, 20.09), "conditional": (58.04, 56.35, 7.99),
                         "unconditional": (85.31, 89.45, 12.41)},
    ("amazon", "size"): {"vanilla": (76.17, 54.08, -4.05), "conditional": (79.95, 85.87, -2.37),
                         "unconditional": (73.89, 53.26, -1.58)},
    ("amazon", "color"): {"vanilla": (63.88, 72.47, 15.48), "conditional": (84.58, 80.73, 2.45),
                          "unconditional": (62.56, 70.41, 3.93)},
    ("amazon", "style"): {"vanilla": (38.30, 74.35, -10.16), "conditional": (87.94, 80.64, -0.70),
                          "unconditional": (38.30, 72.20, -1.49)},
}
"""Table 4.2: (Acc@NoC, Acc@C, Bias@C) in % after PPO, per (dataset, concept) and reward model."""
METRIC_KEYS = ("acc_no_concept", "acc_concept", "bias_concept")


@dataclasses.dataclass(frozen=True)
class ConceptText:
    """A labelled text and whether it mentions the study's concept."""

    text: str
    label: int  # 1 positive, 0 negative
    has_concept: bool


def _sentence(aspect: tuple[str, str], adjective: str) -> str:
    noun, verb = aspect
    return f"The {noun} {verb} {adjective}."


def film_review_pool(*, concept: str, per_cell: int, seed: int = 0) -> list[ConceptText]:
    """`per_cell` distinct embedded reviews for each (label, has C) cell (module docstring)."""
    if concept not in CONCEPT_ASPECTS:
        raise ValueError(f"unknown embedded concept {concept!r}; have {sorted(CONCEPT_ASPECTS)}")
    rng = np.random.default_rng([seed, 4])
    pool = []
    for label in (0, 1):
        adjectives = ADJECTIVES[label]
        for has in (False, True):
            found: dict[str, None] = {}
            attempts = 0
            while len(found) < per_cell:
                attempts += 1
                if attempts > 100 * per_cell:
                    raise ValueError(f"cannot make {per_cell} distinct reviews per cell; found "
                                     f"{len(found)} for label {label}, concept {has}")
                n = int(rng.integers(1, 3))
                aspects = [NEUTRAL_ASPECTS[i] for i in rng.choice(len(NEUTRAL_ASPECTS), n,
                                                                   replace=False)]
                if has:
                    options = CONCEPT_ASPECTS[concept]
                    aspects[int(rng.integers(n))] = options[int(rng.integers(len(options)))]
                found[" ".join(_sentence(a, adjectives[int(rng.integers(len(adjectives)))])
                               for a in aspects)] = None
            pool += [ConceptText(text, label, has) for text in found]
    return pool


def concept_record(item: ConceptText, *, concept: str) -> dict[str, Any]:
    """The HH record of one text (columns: module docstring)."""
    pair = hh_pair(f"{INSTRUCTION}\n{item.text}", " " + LABELS[item.label],
                   " " + LABELS[1 - item.label])
    return {**pair, "text": item.text, "label": item.label, "concept": concept,
            "has_concept": item.has_concept, "concept_bin": int(item.has_concept)}


def _check_rate(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def build_concept_from(pool: Sequence[ConceptText], *, concept: str, num_train: int,
                       num_test: int, positive_concept_rate: float = 1.0,
                       negative_concept_rate: float = 0.3, seed: int = 0,
                       info: Mapping[str, Any] | None = None) -> StudyData:
    """Concept-biased train and balanced test splits drawn from `pool` (module docstring).

    num_test must be a multiple of 4 (one quarter per (label, C) cell). Raises ValueError
    naming the cell that the pool cannot fill.
    """
    _check_rate("positive_concept_rate", positive_concept_rate)
    _check_rate("negative_concept_rate", negative_concept_rate)
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"num_train must be a positive int, got {num_train!r}")
    if isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 4 \
            or num_test % 4:
        raise ValueError(f"num_test must be a positive multiple of 4, got {num_test!r}")
    rng = np.random.default_rng([seed, 5])
    cells: dict[tuple[int, bool], list[ConceptText]] = {(l, h): [] for l in (0, 1)
                                                         for h in (False, True)}
    for item in pool:
        if item.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {item.label!r} for {item.text[:40]!r}")
        cells[(item.label, bool(item.has_concept))].append(item)
    for key in cells:
        cells[key] = [cells[key][i] for i in rng.permutation(len(cells[key]))]
    labels = (rng.random(num_train) < 0.5).astype(int)
    rates = np.where(labels == 1, positive_concept_rate, negative_concept_rate)
    has = rng.random(num_train) < rates
    need = {key: num_test // 4 for key in cells}
    for label, h in zip(labels, has):
        need[(int(label), bool(h))] += 1
    for key, n in need.items():
        if len(cells[key]) < n:
            raise ValueError(f"the pool holds {len(cells[key])} texts with label {key[0]} and "
                             f"has_concept={key[1]}, but the splits need {n}")
    test = [item for key in cells for item in cells[key][:num_test // 4]]
    test = [test[i] for i in rng.permutation(len(test))]
    taken = {key: num_test // 4 for key in cells}
    train = []
    for label, h in zip(labels, has):
        key = (int(label), bool(h))
        train.append(cells[key][taken[key]])
        taken[key] += 1
    splits = {"train": [concept_record(t, concept=concept) for t in train],
              "test": [concept_record(t, concept=concept) for t in test]}
    return StudyData("concept", "hh", splits, info={
        "concept": concept, "num_train": num_train, "num_test": num_test,
        "positive_concept_rate": positive_concept_rate,
        "negative_concept_rate": negative_concept_rate, "seed": seed,
        "pool_cells": {f"label={k[0]},concept={k[1]}": len(v) for k, v in cells.items()},
        **(info or {})})


def build_concept(*, concept: str = "acting", num_train: int = 1024, num_test: int = 256,
                  positive_concept_rate: float = 1.0, negative_concept_rate: float = 0.3,
                  seed: int = 0) -> StudyData:
    """The embedded default: biased film-review splits for one IMDB concept."""
    pool = film_review_pool(concept=concept, per_cell=num_train + num_test // 4, seed=seed)
    return build_concept_from(pool, concept=concept, num_train=num_train, num_test=num_test,
                              positive_concept_rate=positive_concept_rate,
                              negative_concept_rate=negative_concept_rate, seed=seed,
                              info={"source": "embedded film reviews"})


def load_concept_texts(source: str | os.PathLike, *, concept: str, split: str = "train",
                       text_column: str = "text", label_column: str = "label",
                       concept_column: str = "concepts", positive_labels: Sequence = (1,),
                       **load_kwargs) -> list[ConceptText]:
    """A pool of labelled texts from a dataset with a concept annotation.

    A text mentions `concept` when its `concept_column` equals it, or is a list holding it, or
    a comma-separated string naming it (case-insensitive). A label in `positive_labels` is
    positive (1), any other negative (0) (e.g. `positive_labels=(3, 4)` for 0-4 star ratings).
    """
    records = load_records(source, split=split, **load_kwargs)
    pool = []
    want = concept.strip().casefold()
    for i, record in enumerate(records):
        for key in (text_column, label_column, concept_column):
            if key not in record:
                raise ValueError(f"record {i}: field {key!r} is missing (have {sorted(record)})")
        text = record[text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"record {i}: field {text_column!r} must be a non-empty string")
        tags = record[concept_column]
        if tags is None:
            tags = []
        elif isinstance(tags, str):
            tags = tags.split(",")
        pool.append(ConceptText(text.strip(), int(record[label_column] in positive_labels),
                                want in {str(t).strip().casefold() for t in tags}))
    return pool


def parse_label(response: str) -> int:
    """1 if "positive" comes first in the response, 0 if "negative" does, else -1 (wrong for
    either label)."""
    text = response.casefold()
    found = [(text.find(name), value) for value, name in enumerate(LABELS) if name in text]
    return min(found)[1] if found else -1


def concept_metrics(responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict:
    """Acc@NoC, Acc@C, Bias@C (%) of one policy's responses to the test records' prompts."""
    if len(responses) != len(records):
        raise ValueError(f"{len(responses)} responses for {len(records)} records")
    predictions = np.array([parse_label(r) for r in responses])
    labels = np.array([int(r["label"]) for r in records])
    has = np.array([bool(r["has_concept"]) for r in records])
    out = concept_bias_metrics(predictions, labels, has, num_labels=2)
    return {key: float(out[key]) for key in METRIC_KEYS}


def concept_table(results: Mapping[tuple[str, str], Mapping[str, Sequence[Mapping[str, float]]]]
                  ) -> str:
    """Table 4.2's layout: one block per (dataset, concept), a row per policy with our
    Acc@NoC / Acc@C / Bias@C (mean ± interval over seeds) next to the thesis' numbers.

    Args:
      results: (dataset, concept) -> policy key (`tables.row_key`) -> one `concept_metrics`
        dict per seed; datasets absent from the thesis (e.g. ("embedded", "acting")) get "-"
        as the thesis column.
    """
    blocks = []
    header = ["Model", "Acc@NoC", "thesis", "Acc@C", "thesis", "Bias@C", "thesis"]
    for (dataset, concept), by_model in results.items():
        paper = PAPER_TABLE_4_2.get((dataset, concept), {})
        rows = []
        for key in ordered_keys(by_model):
            model, _ = split_row_key(key)
            row = [row_label(key)]
            for k, metric in enumerate(METRIC_KEYS):
                row += [format_interval([seed[metric] for seed in by_model[key]]),
                        f"{paper[model][k]:.2f}" if model in paper else "-"]
            rows.append(row)
        blocks.append(f"**{concept.capitalize()} ({dataset})**\n\n" + markdown_table(header, rows))
    return "\n\n".join(blocks)
