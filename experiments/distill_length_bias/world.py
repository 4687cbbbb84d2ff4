"""The length-bias world: prompts, tips, the programmatic oracle and the response generator.

A summarisation-sized analogue of 004 §4.1 that the embedded tokenizer and tiny model handle:

- prompts: the embedded corpus' questions ("How do I cook rice?") of at most
  `max_prompt_tokens` tokens, split into train / validation / test prompts;
- a response: 1 to `max_sentences` tips, each a sentence of `USEFUL_TIPS` (helpful, v = +1)
  or `BAD_TIPS` (unhelpful, v = -1), about six tokens each;
- the oracle (the role of 004's oracle reward model, which relabels every pair and scores the
  policies' samples):

      r*(x, y) = mean_s [v(s) + relevance_scale * eps(x, s)] + length_weight * n(y)

  over the n(y) sentences s of y; eps(x, s) ~ N(0, 1) is a fixed "relevance of tip s to
  question x" drawn once per world. A sentence that is neither a tip nor new in the response
  (garbage, a cut-off fragment, a repeated tip) has value -1 and no relevance; an empty
  response scores -1. Like the TL;DR oracle of 004 (after relabelling, the longer summary wins
  61% of the pairs) r* prefers longer responses at equal quality: with the defaults the
  longer response of a generator pair wins about 60% of the time. The relevance term is what
  a small reward model cannot learn from a few hundred pairs (one value per question and tip),
  so the labels are not a function of what the reward models see, as for real reward models, and a
  length-biased D_rho can tilt what they learn about length;
- the generator (the pairs' source and the SFT data): n ~ Uniform{1..max_sentences}, each
  sentence useful with probability `useful_probability`, no tip twice.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from alignax.data.tokenizer import CORPUS_PATH

USEFUL_TIPS = (
    "Take small steps every day.", "Start slowly and be patient.",
    "Check your work before you finish.", "Write down your progress.",
    "Read the instructions carefully.", "Keep it simple at first.",
    "Practice a little each morning.", "First, gather what you need.",
    "Rest when you feel tired.", "Drink some water and relax.",
)
"""Helpful tips (v = +1): sentences of the embedded corpus, 5-7 tokens after a space."""

BAD_TIPS = (
    "Never read the instructions.", "Never check your work.",
    "Never write down your progress.", "Never take a break.", "Start late every day.",
    "Rest all day and relax.", "Never gather what you need.", "Never finish your work.",
    "Never set a goal.", "Start the week tired.",
)
"""Unhelpful tips (v = -1) from corpus words, 5-7 tokens after a space (6 on average, as the\nuseful ones, so that token length says nothing about quality)."""

_SENTENCE = re.compile(r"[^.!?]+[.!?]")


def corpus_questions() -> list[str]:
    """The distinct "Human:" questions of the embedded tokenizer's corpus, sorted."""
    lines = pathlib.Path(CORPUS_PATH).read_text(encoding="utf-8").splitlines()
    return sorted({line[len("Human: "):].strip() for line in lines if line.startswith("Human: ")})


def sentences(response: str) -> list[str]:
    """The sentences of a response (text up to ".", "!" or "?"), stripped; a trailing fragment
    without end punctuation counts as one sentence.

    >>> sentences(" Never be patient. Take small")
    ['Never be patient.', 'Take small']
    """
    found = [s.strip() for s in _SENTENCE.findall(response)]
    tail = _SENTENCE.sub("", response).strip()
    return [s for s in found if s] + ([tail] if tail else [])


@dataclasses.dataclass(frozen=True)
class World:
    """Prompts, tips and the oracle of one study (see the module docstring).

    Attributes:
      prompts: all prompt texts; `train`, `val`, `test` index them (disjoint).
      train, val, test: prompt indices of D_rho / validation selection / the Figure 2 test.
      relevance: [len(prompts), len(tips)] eps(x, s) ~ N(0, 1).
      relevance_scale, length_weight: the oracle's weights.
    """

    prompts: tuple[str, ...]
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    relevance: np.ndarray
    relevance_scale: float
    length_weight: float

    tips: tuple[str, ...] = USEFUL_TIPS + BAD_TIPS

    @property
    def values(self) -> np.ndarray:
        """[len(tips)] v(s): +1 for a useful tip, -1 for a bad one."""
        return np.array([1.0] * len(USEFUL_TIPS) + [-1.0] * len(BAD_TIPS))

    def prompt_index(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise ValueError(f"{prompt!r} is not a prompt of this world") from None

    def sentence_values(self, prompt: int, response: str) -> list[float]:
        """v(s) + relevance_scale * eps(x, s) for each sentence; -1 for one that is not a tip
        or repeats an earlier one."""
        seen, out = set(), []
        for sentence in sentences(response):
            if sentence in self.tips and sentence not in seen:
                s = self.tips.index(sentence)
                out.append(float(self.values[s] + self.relevance_scale * self.relevance[prompt, s]))
            else:
                out.append(-1.0)
            seen.add(sentence)
        return out

    def reward(self, prompt: str | int, response: str) -> float:
        """r*(x, y) = mean sentence value + length_weight * number of sentences; -1 if empty."""
        index = prompt if isinstance(prompt, (int, np.integer)) else self.prompt_index(prompt)
        values = self.sentence_values(int(index), response)
        if not values:
            return -1.0
        return float(np.mean(values) + self.length_weight * len(values))

    def rewards(self, prompts: Sequence[str | int], responses: Sequence[str]) -> np.ndarray:
        """[N] oracle rewards of N (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return np.array([self.reward(p, r) for p, r in zip(prompts, responses)], np.float64)


def make_world(tokenizer, *, seed: int, max_prompt_tokens: int, num_val: int, num_test: int,
               relevance_scale: float, length_weight: float) -> World:
    """The corpus questions of at most `max_prompt_tokens` tokens (with the tokenizer's special
    tokens), shuffled with `seed` into test / val / train prompts, and the relevance table.

    Raises:
      ValueError: fewer than num_val + num_test + 1 questions fit.
    """
    questions = [q for q in corpus_questions()
                 if len(tokenizer(q)["input_ids"]) <= max_prompt_tokens]
    if len(questions) < num_val + num_test + 1:
        raise ValueError(f"only {len(questions)} corpus questions have at most "
                         f"max_prompt_tokens={max_prompt_tokens} tokens; need num_val + num_test "
                         f"+ 1 = {num_val + num_test + 1}")
    rng = np.random.default_rng([seed, 0])
    order = [int(i) for i in rng.permutation(len(questions))]
    test, val, train = (tuple(order[:num_test]), tuple(order[num_test:num_test + num_val]),
                        tuple(order[num_test + num_val:]))
    relevance = rng.standard_normal((len(questions), len(USEFUL_TIPS) + len(BAD_TIPS)))
    return World(tuple(questions), train, val, test, relevance, relevance_scale, length_weight)


def generate_responses(rng: np.random.Generator, count: int, *, max_sentences: int,
                       useful_probability: float) -> list[str]:
    """`count` generator responses (module docstring), each " tip tip ..." (a leading space,
    so the first tip tokenizes as it does mid-text)."""
    out = []
    for _ in range(count):
        n = int(rng.integers(1, max_sentences + 1))
        useful = list(rng.permutation(len(USEFUL_TIPS)))
        bad = list(rng.permutation(len(BAD_TIPS)))
        parts = [USEFUL_TIPS[useful.pop()] if rng.random() < useful_probability
                 else BAD_TIPS[bad.pop()] for _ in range(n)]
        out.append(" " + " ".join(parts))
    return out
