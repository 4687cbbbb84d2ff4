"""Oracle-relabelled pairs, the length-biased training sets D_rho and the ensemble subsets.

004 §4.1: all preference pairs are relabelled by the oracle; a pair has a "longer" response
when one has at least 10% more tokens than the other; D_rho holds `num_pairs` such pairs in
which the longer response is the preferred one in a fraction rho; the e-DPO ensemble member
r_{rho,b} is trained on D_{rho,b}, a subset of D_rho in which the longer response is preferred
in a fraction b (the largest such subset), b in `ENSEMBLE_BIASES`.

Pairs with no longer response (token counts within 10%) have no length direction and are left
out of every D_rho; the pool reports how many.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.distill_length_bias.world import World, generate_responses

ENSEMBLE_BIASES = (0.2, 0.4, 0.5, 0.6, 0.8)
"""b: the fraction of longer-preferred pairs in the e-DPO members' sub-datasets (004 §4.1)."""

PAPER_RHOS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""rho: the fraction of longer-preferred pairs in D_rho (004 §4.1)."""


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Oracle-labelled pairs of generator responses, in the generator's order (a, b).

    Attributes:
      prompt: [n] int prompt indices into `World.prompts`.
      response_a, response_b: n response texts each.
      reward_a, reward_b: [n] float oracle rewards r*(x, y).
      tokens_a, tokens_b: [n] int response lengths in tokens (no EOS).
    """

    prompt: np.ndarray
    response_a: tuple[str, ...]
    response_b: tuple[str, ...]
    reward_a: np.ndarray
    reward_b: np.ndarray
    tokens_a: np.ndarray
    tokens_b: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def a_wins(self) -> np.ndarray:
        """[n] bool: the oracle prefers response a."""
        return self.reward_a > self.reward_b

    @property
    def has_longer(self) -> np.ndarray:
        """[n] bool: one response has at least 10% more tokens than the other (004 §4.1),
        10 max >= 11 min in integers (no rounding at exactly 10%)."""
        longer = np.maximum(self.tokens_a, self.tokens_b).astype(np.int64)
        shorter = np.minimum(self.tokens_a, self.tokens_b).astype(np.int64)
        return 10 * longer >= 11 * shorter

    @property
    def longer_wins(self) -> np.ndarray:
        """[n] bool: the response with more tokens is the preferred one."""
        return (self.tokens_a > self.tokens_b) == self.a_wins

    def take(self, index) -> Pairs:
        """The pairs at `index` (an int array), in that order."""
        index = np.asarray(index, np.int64)
        pick = lambda texts: tuple(texts[i] for i in index)  # noqa: E731
        return Pairs(self.prompt[index], pick(self.response_a), pick(self.response_b),
                     self.reward_a[index], self.reward_b[index], self.tokens_a[index],
                     self.tokens_b[index])

    def chosen_rejected(self) -> tuple[list[str], list[str]]:
        """(chosen texts, rejected texts) under the oracle's labels."""
        wins = self.a_wins
        chosen = [a if w else b for a, b, w in zip(self.response_a, self.response_b, wins)]
        rejected = [b if w else a for a, b, w in zip(self.response_a, self.response_b, wins)]
        return chosen, rejected

    def preference_records(self, world: World) -> list[dict]:
        """Standard-format records {"prompt", "chosen", "rejected"} (DPO, IPO, p-DPO, and the
        reward models)."""
        chosen, rejected = self.chosen_rejected()
        return [{"prompt": world.prompts[p], "chosen": c, "rejected": r}
                for p, c, r in zip(self.prompt, chosen, rejected)]

    def unlabeled_records(self, world: World, rewards_a: np.ndarray,
                          rewards_b: np.ndarray) -> list[dict]:
        """Unlabeled-format records with target rewards (d-DPO, pd-DPO, e-DPO): responses in the
        generator's order, rewards [n] (one reward model) or [n, E] (an ensemble)."""
        if len(rewards_a) != len(self) or len(rewards_b) != len(self):
            raise ValueError(f"{len(self)} pairs but {len(rewards_a)} / {len(rewards_b)} "
                             "target rewards")
        as_value = lambda r: r.tolist() if np.ndim(r) else float(r)  # noqa: E731
        return [{"prompt": world.prompts[p], "response_1": a, "response_2": b,
                 "target_rewards_1": as_value(ra), "target_rewards_2": as_value(rb)}
                for p, a, b, ra, rb in zip(self.prompt, self.response_a, self.response_b,
                                           np.asarray(rewards_a), np.asarray(rewards_b))]


def make_pool(world: World, tokenizer, rng: np.random.Generator, *, size: int,
              max_sentences: int, useful_probability: float) -> Pairs:
    """`size` oracle-labelled pairs of two independent generator responses to a train prompt
    (drawn uniformly); pairs of two identical texts are redrawn."""
    prompt = rng.choice(np.asarray(world.train), size=size)
    a = generate_responses(rng, size, max_sentences=max_sentences,
                           useful_probability=useful_probability)
    b = generate_responses(rng, size, max_sentences=max_sentences,
                           useful_probability=useful_probability)
    for i in range(size):
        while b[i] == a[i]:
            b[i] = generate_responses(rng, 1, max_sentences=max_sentences,
                                      useful_probability=useful_probability)[0]
    count = lambda texts: np.array([len(ids) for ids in tokenizer(  # noqa: E731
        texts, add_special_tokens=False)["input_ids"]])
    return Pairs(prompt, tuple(a), tuple(b), world.rewards(prompt, a), world.rewards(prompt, b),
                 count(a), count(b))


def pool_statistics(pool: Pairs) -> dict[str, float]:
    """How many pool pairs have a longer response, and how often the longer one wins (the
    paper's 61% after relabelling)."""
    longer = pool.has_longer
    return {"pairs": len(pool), "with_longer_response": int(longer.sum()),
            "longer_preferred": float(pool.longer_wins[longer].mean()) if longer.any() else 0.0}


def sample_d_rho(pool: Pairs, rho: float, num_pairs: int,
                 rng: np.random.Generator) -> tuple[Pairs, int]:
    """D_rho: round(rho * num_pairs) pool pairs whose longer response wins, then the rest from
    those whose shorter response wins, each drawn without replacement (004 §4.1).

    Returns:
      (pairs, k): the longer response wins in pairs [0, k) and loses in [k, num_pairs).

    Raises:
      ValueError: rho outside [0, 1], or the pool has too few pairs of a kind.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    longer = pool.has_longer
    long_wins = np.flatnonzero(longer & pool.longer_wins)
    short_wins = np.flatnonzero(longer & ~pool.longer_wins)
    k = int(round(rho * num_pairs))
    for name, have, need in (("longer", len(long_wins), k),
                             ("shorter", len(short_wins), num_pairs - k)):
        if have < need:
            raise ValueError(f"D_rho with rho={rho} needs {need} pairs whose {name} response "
                             f"wins; the pool of {len(pool)} pairs has {have}: raise pool_factor")
    index = np.concatenate([rng.choice(long_wins, k, replace=False),
                            rng.choice(short_wins, num_pairs - k, replace=False)])
    return pool.take(index), k


def ensemble_subsets(num_pairs: int, k: int, biases: tuple[float, ...],
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Indices into D_rho of the subsets D_{rho,b}: for each b, the largest subset in which the
    longer response wins in a fraction b, m = floor(min(k / b, (n - k) / (1 - b))) pairs, of
    which round(b m) from the longer-wins block [0, k) and the rest from [k, n) (004 §4.1).

    Raises:
      ValueError: a bias outside (0, 1), or a subset with fewer than 2 pairs.
    """
    out = []
    for b in biases:
        if not 0.0 < b < 1.0:
            raise ValueError(f"ensemble biases must be in (0, 1), got {b!r}")
        m = int(np.floor(min(k / b, (num_pairs - k) / (1.0 - b)) + 1e-9))
        take_long = int(round(b * m))
        if m < 2:
            raise ValueError(f"D_rho,b with b={b} would hold {m} pairs (k={k} of {num_pairs} "
                             "longer-wins pairs): raise num_pairs")
        out.append(np.sort(np.concatenate([
            rng.choice(k, take_long, replace=False),
            k + rng.choice(num_pairs - k, m - take_long, replace=False)])))
    return out
