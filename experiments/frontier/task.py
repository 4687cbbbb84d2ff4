"""The review-completion task of `experiments.fdpo_frontier`: prompts, a probabilistic grammar of
short review continuations, the sentiment oracle and its Bradley-Terry preference probability.

A prompt opens a film review ("Honestly, the pacing was"); a response completes it with one or
two evaluative clauses (" fairly dull, but the cast is absolutely brilliant."). Every adjective
of the grammar is one token of the embedded tokenizer and carries a sentiment score in
{-1, -0.5, 0, 0.5, 1} (`LEXICON`), so the oracle reads a property the SFT'd tiny model produces
with some probability from the start (a 0.06 share of strongly positive adjectives, `TIERS`),
and a policy can raise it by moving probability between words it already knows:

    reward(y) = (mean score of y's adjectives + 1) / 2  in [0, 1]   (0 if y is not a sentence
                                                                of the grammar)
    P(y_1 > y_2 | x) = sigmoid((reward(y_1) - reward(y_2)) / label_temperature)

The second line is the oracle's preference probability: training pairs are labelled by draws
from it (noisy like human labels; label_temperature 0 gives the deterministic comparison), and
the calibration study (thesis §2.6.4, §2.8.8) measures the policy against it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TIERS: tuple[tuple[float, float, tuple[str, ...]], ...] = (
    # (sentiment score, probability of the tier in the SFT data, words in decreasing frequency)
    (1.0, 0.06, ("brilliant", "excellent", "wonderful", "superb")),
    (0.5, 0.20, ("good", "great", "charming", "gripping", "beautiful", "touching", "moving",
                 "fresh", "funny", "clever")),
    (0.0, 0.14, ("slow", "simple", "honest")),
    (-0.5, 0.36, ("dull", "weak", "tedious", "confusing", "lazy", "cheap", "poor", "silly",
                  "flat", "messy", "forgettable", "predictable")),
    (-1.0, 0.24, ("bad", "boring", "awful", "painful")),
)
"""The adjectives by sentiment tier. Within a tier, word i has probability proportional to
1 / (i + 1) (Zipf), so the reference has frequent and rare ways to say the same thing."""

LEXICON: dict[str, float] = {word: score for score, _, words in TIERS for word in words}
"""Adjective -> sentiment score; the oracle reads these words (whole words, any case)."""

ASPECTS = ("the acting", "the plot", "the story", "the music", "the ending", "the cast",
           "the dialogue", "the pacing", "the soundtrack", "the director", "the lead actor",
           "the lead actress", "the show", "this movie", "the film", "the twist", "the script",
           "the costumes", "the final scene", "the second act")
VERBS = ("is", "was", "felt")
OPENERS = ("", "Honestly, ", "I think ")
ADVERBS = (("", 0.40), ("very ", 0.20), ("fairly ", 0.15), ("absolutely ", 0.10),
           ("simply ", 0.08), ("rather ", 0.07))
ENDINGS = ((".", 0.35), ("!", 0.15), (", and", 0.20), (", but", 0.10), (", although", 0.10),
           (", while", 0.10))
"""A response: ' ' adverb adjective ending; an ending with a conjunction continues with
' ' aspect verb ' ' adverb adjective '.' (a second clause)."""



def _alternatives(words) -> str:
    return "(?:" + "|".join(re.escape(w.strip()) for w in words if w.strip()) + ")"


_ADVERB = f"(?:{_alternatives(a for a, _ in ADVERBS)} )?"
_RESPONSE = re.compile(  # the grammar's language: one clause, or two joined by a conjunction
    rf"^ {_ADVERB}(?P<a>[a-z]+)(?:[.!]|, {_alternatives(e[2:] for e, _ in ENDINGS[2:])} "
    rf"{_alternatives(ASPECTS)} {_alternatives(VERBS)} {_ADVERB}(?P<b>[a-z]+)\.)$")


def prompts() -> list[str]:
    """Every prompt of the task (len(OPENERS) x len(ASPECTS) x len(VERBS) = 180), in a fixed
    order: "The acting is", ..., "I think the second act felt"."""
    out = []
    for opener in OPENERS:
        for aspect in ASPECTS:
            subject = aspect if opener else aspect[0].upper() + aspect[1:]
            out.extend(f"{opener}{subject} {verb}" for verb in VERBS)
    return out


def split_prompts(num_eval: int, *, seed: int) -> tuple[list[str], list[str]]:
    """(train prompts, held-out evaluation prompts): a seeded permutation of `prompts()`."""
    everything = prompts()
    if not 0 < num_eval < len(everything):
        raise ValueError(f"num_eval must be in [1, {len(everything) - 1}], got {num_eval}")
    order = np.random.default_rng(seed).permutation(len(everything))
    return ([everything[i] for i in order[num_eval:]], [everything[i] for i in order[:num_eval]])


def _choice(rng: np.random.Generator, weighted: Sequence[tuple[str, float]]) -> str:
    items, weights = zip(*weighted)
    return items[rng.choice(len(items), p=np.asarray(weights) / np.sum(weights))]


def _adjective(rng: np.random.Generator) -> str:
    tier = TIERS[rng.choice(len(TIERS), p=[p for _, p, _ in TIERS])]
    words = tier[2]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    return words[rng.choice(len(words), p=zipf / zipf.sum())]


def sample_response(rng: np.random.Generator) -> str:
    """One continuation drawn from the grammar, e.g. " very dull, but the cast was good."."""
    first = _choice(rng, ADVERBS) + _adjective(rng)
    ending = _choice(rng, ENDINGS)
    if ending in (".", "!"):
        return f" {first}{ending}"
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    verb = VERBS[rng.integers(len(VERBS))]
    return f" {first}{ending} {aspect} {verb} {_choice(rng, ADVERBS)}{_adjective(rng)}."


def sft_examples(prompt_texts: Sequence[str], num_examples: int, *, seed: int
                 ) -> list[tuple[str, str]]:
    """`num_examples` (prompt, response) demonstrations: prompts uniform over `prompt_texts`,
    responses from the grammar."""
    rng = np.random.default_rng(seed)
    return [(prompt_texts[rng.integers(len(prompt_texts))], sample_response(rng))
            for _ in range(num_examples)]


def reward(text: str) -> float:
    """The oracle: (mean sentiment score of the response's adjectives + 1) / 2 for a sentence of
    the grammar (`well_formed`), 0 for anything else (so no string of praise words outside the
    grammar can game it).

    >>> reward(" absolutely brilliant!"), reward(" dull, but the cast was good.")
    (1.0, 0.5)
    >>> reward(" brilliant brilliant brilliant"), reward(" ok.")
    (0.0, 0.0)
    """
    match = _RESPONSE.match(text)
    words = [w for w in match.group("a", "b") if w is not None] if match else []
    if not words or not all(w in LEXICON for w in words):
        return 0.0
    return (float(np.mean([LEXICON[w] for w in words])) + 1.0) / 2.0


def rewards(texts: Sequence[str]) -> np.ndarray:
    """[R] float64 `reward` of each text."""
    return np.asarray([reward(t) for t in texts], np.float64)


def well_formed(text: str) -> bool:
    """Whether a response is a sentence of the grammar with lexicon adjectives (the share of
    well-formed samples says how well the SFT'd reference learned the task, and whether a
    policy drifted off it)."""
    match = _RESPONSE.match(text)
    return bool(match) and all(w is None or w in LEXICON for w in match.group("a", "b"))


def preference_probability(reward_1, reward_2, *, temperature: float) -> np.ndarray:
    """P(y_1 preferred to y_2) = sigmoid((r_1 - r_2) / temperature) (Bradley-Terry); with
    temperature 0 the deterministic comparison (1, 0, or 0.5 on a tie)."""
    diff = np.asarray(reward_1, np.float64) - np.asarray(reward_2, np.float64)
    if temperature < 0:
        raise ValueError(f"label_temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return 0.5 * (1.0 + np.sign(diff))
    return 0.5 * (1.0 + np.tanh(diff / (2.0 * temperature)))  # = sigmoid(diff / temperature)


def expected_sft_reward() -> float:
    """E[reward] of one-adjective responses under the grammar's adjective distribution (the
    SFT data's level; two-clause responses average two draws, which has the same mean)."""
    return sum(p * (score + 1.0) / 2.0 for score, p, _ in TIERS)
