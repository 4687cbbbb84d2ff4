"""The label-noise task of the multi-sample study (thesis §3.6.4, Remark 1, Figure 3.11):
addition problems "Item: x + y =", answered by one integer, and an oracle that knows the sum.

The thesis labels groups of Llama-3-70B responses "chosen" and Llama-3-8B ones "rejected"
(by group membership: the stronger generator is better on average, not response by response,
so some labels are wrong), and checks them with GPT-4o (the noise-free labels). Here the two
generators are the embedded model fine-tuned on the sums for fewer and for more steps, and the
oracle scores an answer by how far it is from the sum:

    r(y) = -min(|y - (x + y')|, max_error)      (-max_error for a response that is no integer)

A group's oracle score is the sum of its members' (Remark 1 compares sums). Default labels
(noisy) always prefer the stronger generator's group; oracle labels (clean) swap a pair when
the weaker group's score is strictly higher (a tie keeps the default). The judge of two
policies compares their answers to the same problem by r (equal r: a tie).
"""

from __future__ import annotations

import numpy as np

PROMPT = "Item: {x} + {y} ="


def prompt(x: int, y: int) -> str:
    """The prompt of the problem x + y."""
    return PROMPT.format(x=int(x), y=int(y))


def answer(number: int) -> str:
    """The response text of an answer (a space, then the digits)."""
    return f" {int(number)}"


def problems(rng: np.random.Generator, n: int, *, high: int) -> np.ndarray:
    """[n, 2] int operands uniform in [0, high]."""
    if high < 1:
        raise ValueError(f"high must be >= 1, got {high}")
    return rng.integers(0, high + 1, size=(n, 2))


def oracle_reward(values, operands, *, max_error: int) -> np.ndarray:
    """r = -min(|answer - (x + y)|, max_error) per answer, float64 of values' shape.

    Args:
      values: [..., K] int answers, -1 for a response that is not an integer.
      operands: [..., 2] the problems' (x, y).
      max_error: the clip (> 0); a response that is no integer scores -max_error.

    >>> oracle_reward([[5, 7, -1, 40]], [[2, 3]], max_error=10).tolist()
    [[0.0, -2.0, -10.0, -10.0]]
    """
    if max_error < 1:
        raise ValueError(f"max_error must be >= 1, got {max_error}")
    values, operands = np.asarray(values, np.int64), np.asarray(operands, np.int64)
    if operands.shape[-1] != 2 or operands.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"operands must be [..., 2] matching values [..., K], got "
                         f"{operands.shape} and {values.shape}")
    total = operands.sum(-1, keepdims=True)  # [..., 1]
    error = np.minimum(np.abs(values - total), max_error).astype(np.float64)
    return np.where(values < 0, -float(max_error), -error)


def label_swaps(strong_rewards, weak_rewards, k: int, *, clean: bool) -> np.ndarray:
    """[G] bool: whether the pair of groups is relabelled (the weaker generator's group
    becomes "chosen"): never with default labels; with oracle labels where the sum of the
    weaker group's first k oracle rewards is strictly higher than the stronger group's."""
    strong, weak = np.asarray(strong_rewards), np.asarray(weak_rewards)
    if strong.shape != weak.shape or strong.ndim != 2 or not 1 <= k <= strong.shape[1]:
        raise ValueError(f"rewards must be two [G, K] arrays with K >= k={k}, got "
                         f"{strong.shape} and {weak.shape}")
    if not clean:
        return np.zeros(len(strong), bool)
    return weak[:, :k].sum(-1) > strong[:, :k].sum(-1)


def label_agreement(strong_rewards, weak_rewards, k: int) -> dict[str, float]:
    """How often the oracle agrees with the default label at group size k (Remark 1): the
    shares of pairs whose stronger group scores strictly higher ("agree"), the same ("tie")
    and strictly lower ("disagree")."""
    diff = (np.asarray(strong_rewards)[:, :k].sum(-1) - np.asarray(weak_rewards)[:, :k].sum(-1))
    return {"agree": float(np.mean(diff > 0)), "tie": float(np.mean(diff == 0)),
            "disagree": float(np.mean(diff < 0))}
