"""Length study data, oracle judge, length-penalty baseline and Figure 4.2 (thesis §4.6.2, §4.10).

What the thesis did: Alpaca-Farm human preferences (instruction, two outputs, a preference);
Llama-3-8B SFT-ed on the chosen outputs; reward models with LoRA (rank 64, alpha 128, 4 epochs)
over M in {10, 20, 30} length-quantile bins and lambda in {0.1, 1, 3, 10, 100}; PPO for one
epoch with KL coefficients {0.003, 0.01, 0.03, 0.1} (60 causal models). The baseline is the
vanilla reward model (lambda = 0) with a length penalty in {0, 1e-3, 1e-4, 1e-5, 5e-4, 1e-6,
5e-6} and learning rates {5e-7, 1e-6} (56 models). Each policy is scored against the SFT model
by a judge, score = 50 + (n_win - n_lose) / N * 100; Figure 4.2 plots score against length
(left: EMA curve per method, middle: Pareto front) and, right, the mean length of the responses
at each rank when 50 samples per prompt are ranked by a reward model, per lambda.

The embedded default (`build_length`): prompts are the "How do I ...?" questions of the
embedded corpus; a response is 1 to `max_sentences` sentences, each a useful tip ("Take small
steps every day.") or a pleasantry ("Good question."). The oracle quality of a response is the
share of its sentences that are distinct useful tips (`oracle_quality`): a concise, all-useful
answer scores 1, padding with pleasantries or repeated tips lowers it, and it does not grow
with length. Each pair's label is drawn from a Bradley-Terry model on the oracle quality plus a
spurious length term, P(a > b) = sigmoid(quality_scale (q_a - q_b) + length_bias (n_a - n_b))
with n the number of sentences, so the chosen response is longer more often than the oracle
alone would say (length_bias = 0 gives oracle labels). Quality and sentence count are drawn
independently; useful tips have more tokens than pleasantries, so token length and quality
are mildly correlated, as in real data.

Record columns: prompt, chosen, rejected (standard format) and chosen_quality,
rejected_quality, chosen_sentences, rejected_sentences, oracle_probability (P(chosen >
rejected) under the oracle alone).
Bins: per-response length quantiles fitted on the train split,
`alignax.data.prepare_dataset(train, tok, response_bins=LengthQuantileBins(num_bins=M))`, M in
`PAPER_NUM_BINS`; pass the returned `dataset.response_bins` when preparing the test split.

Paper scale: `load_alpaca_farm` reads Alpaca-Farm's human preferences (hub
"tatsu-lab/alpaca_farm", `name="alpaca_human_preference"`, split "preference"; or a local file
with columns instruction, input, output_1, output_2, preference in {1, 2}). The thesis' judge
(GPT-4 / Alpaca-Farm's evaluator) is not bundled: pass outcomes from any judge to `win_score`.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import matplotlib
import numpy as np

from alignax.data import load_records
from alignax.data.tokenizer import CORPUS_PATH
from experiments.causal_reward.records import StudyData

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

USEFUL_TIPS = (
    "Take small steps every day.", "Start slowly and be patient.",
    "Set a clear goal for the week.", "Ask a friend for help if you get stuck.",
    "Check your work before you finish.", "Write down your progress.",
    "Read the instructions carefully.", "Keep it simple at first.",
    "Practice a little each morning.", "First, gather what you need.",
    "Rest when you feel tired.", "Drink some water and relax.",
)
PLEASANTRIES = ("Good question.", "Happy to help.", "Of course!", "Sure.")
PAPER_NUM_BINS = (10, 20, 30)
PAPER_LAMBDAS = (0.1, 1.0, 3.0, 10.0, 100.0)
PAPER_KL_COEFFICIENTS = (0.003, 0.01, 0.03, 0.1)
PAPER_LENGTH_PENALTIES = (0.0, 1e-3, 1e-4, 1e-5, 5e-4, 1e-6, 5e-6)
_SENTENCE = re.compile(r"[^.!?]+[.!?]")


def corpus_questions() -> list[str]:
    """The distinct "Human:" questions of the embedded tokenizer's corpus, sorted."""
    lines = pathlib.Path(CORPUS_PATH).read_text(encoding="utf-8").splitlines()
    return sorted({line[len("Human: "):].strip() for line in lines if line.startswith("Human: ")})


def sentences(response: str) -> list[str]:
    """The sentences of a response (text up to ".", "!" or "?"), stripped; a trailing fragment
    without end punctuation counts as one sentence."""
    found = [s.strip() for s in _SENTENCE.findall(response)]
    tail = _SENTENCE.sub("", response).strip()
    return [s for s in found if s] + ([tail] if tail else [])


def oracle_quality(response: str) -> float:
    """Share of the sentences that are distinct useful tips, in [0, 1]; 0 for no sentence."""
    parts = sentences(response)
    if not parts:
        return 0.0
    useful = {s for s in parts if s in USEFUL_TIPS}
    return len(useful) / len(parts)


def oracle_judge(responses_a: Sequence[str], responses_b: Sequence[str]) -> np.ndarray:
    """Outcomes [N] int: +1 where a's oracle quality is higher, -1 lower, 0 tie (for
    `alignax.metrics.bias.win_score`, a = the policy, b = the SFT policy)."""
    if len(responses_a) != len(responses_b):
        raise ValueError(f"{len(responses_a)} responses_a but {len(responses_b)} responses_b")
    qa = np.array([oracle_quality(r) for r in responses_a])
    qb = np.array([oracle_quality(r) for r in responses_b])
    return np.sign(qa - qb).astype(np.int32)


def _draw_response(rng: np.random.Generator, max_sentences: int) -> tuple[str, int]:
    n = int(rng.integers(1, max_sentences + 1))
    p_useful = rng.random()
    tips = list(rng.permutation(len(USEFUL_TIPS)))
    parts = []
    for _ in range(n):
        if rng.random() < p_useful and tips:
            parts.append(USEFUL_TIPS[tips.pop()])
        else:
            parts.append(PLEASANTRIES[int(rng.integers(len(PLEASANTRIES)))])
    return " " + " ".join(parts), n


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def build_length(*, num_train: int = 1024, num_test: int = 64, max_sentences: int = 5,
                 quality_scale: float = 6.0, length_bias: float = 1.0,
                 seed: int = 0) -> StudyData:
    """The embedded default (module docstring): train pairs and test pairs on held-out prompts.

    Args:
      num_train, num_test: pairs per split (prompts repeat; the test prompts are corpus
        questions never used in train when there are enough, else the split is refused).
      max_sentences: the most sentences of a response (>= 2).
      quality_scale: Bradley-Terry weight of the oracle quality difference.
      length_bias: the spurious weight of the sentence-count difference (0: oracle labels).
      seed: all randomness.
    """
    for name, n in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not isinstance(max_sentences, int) or max_sentences < 2:
        raise ValueError(f"max_sentences must be an int >= 2, got {max_sentences!r}")
    if quality_scale < 0 or length_bias < 0:
        raise ValueError(f"quality_scale and length_bias must be >= 0, got {quality_scale}, "
                         f"{length_bias}")
    rng = np.random.default_rng([seed, 3])
    questions = corpus_questions()
    order = rng.permutation(len(questions))
    num_test_prompts = max(1, len(questions) // 5)
    test_prompts = [questions[i] for i in order[:num_test_prompts]]
    train_prompts = [questions[i] for i in order[num_test_prompts:]]

    def pairs(prompts, count):
        records = []
        for _ in range(count):
            prompt = prompts[int(rng.integers(len(prompts)))]
            a, na = _draw_response(rng, max_sentences)
            b, nb = _draw_response(rng, max_sentences)
            while b == a:
                b, nb = _draw_response(rng, max_sentences)
            qa, qb = oracle_quality(a), oracle_quality(b)
            p_biased = _sigmoid(quality_scale * (qa - qb) + length_bias * (na - nb))
            a_wins = rng.random() < p_biased
            (c, qc, nc), (r, qr, nr) = ((a, qa, na), (b, qb, nb)) if a_wins else \
                ((b, qb, nb), (a, qa, na))
            records.append({"prompt": prompt, "chosen": c, "rejected": r,
                            "chosen_quality": qc, "rejected_quality": qr,
                            "chosen_sentences": nc, "rejected_sentences": nr,
                            "oracle_probability": _sigmoid(quality_scale * (qc - qr))})
        return records

    splits = {"train": pairs(train_prompts, num_train), "test": pairs(test_prompts, num_test)}
    return StudyData("length", "standard", splits, info={
        "source": "corpus", "num_train": num_train, "num_test": num_test,
        "train_prompts": len(train_prompts), "test_prompts": len(test_prompts),
        "max_sentences": max_sentences, "quality_scale": quality_scale,
        "length_bias": length_bias, "seed": seed})


def alpaca_farm_records(rows) -> list[dict[str, Any]]:
    """Standard-format records from Alpaca-Farm preference rows (instruction, input,
    output_1, output_2, preference in {1, 2}); the prompt is the instruction, then the input
    after a blank line when there is one, then a blank line."""
    out = []
    for i, row in enumerate(rows):
        preference = row.get("preference")
        if preference not in (1, 2):
            raise ValueError(f"record {i}: field 'preference' must be 1 or 2, got {preference!r}")
        for key in ("instruction", "output_1", "output_2"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"record {i}: field {key!r} must be a non-empty string")
        extra = row.get("input") or ""
        prompt = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "") + "\n\n"
        chosen, rejected = ((row["output_1"], row["output_2"]) if preference == 1
                            else (row["output_2"], row["output_1"]))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def load_alpaca_farm(source: str | os.PathLike = "tatsu-lab/alpaca_farm", *,
                     split: str = "preference", **load_kwargs) -> list[dict[str, Any]]:
    """Alpaca-Farm human preferences as standard records (module docstring). For the hub
    dataset pass `name="alpaca_human_preference"`; a local file's split is "train"."""
    return alpaca_farm_records(load_records(source, split=split, **load_kwargs))


def length_penalty(rewards, lengths, *, coefficient: float):
    """The baseline's reward transform: r - coefficient * length (thesis §4.10's sweep over
    `PAPER_LENGTH_PENALTIES`; Singhal et al., 2023). [B], [B] -> [B] float32.

    `lengths` are response lengths in tokens (e.g. the response mask's sum).
    """
    if coefficient < 0:
        raise ValueError(f"coefficient must be >= 0, got {coefficient}")
    r = jnp.asarray(rewards, jnp.float32)
    n = jnp.asarray(lengths, jnp.float32)
    if r.shape != n.shape:
        raise ValueError(f"rewards {r.shape} and lengths {n.shape} must have the same shape")
    return r - coefficient * n


# ---------------------------------------------------------------- Figure 4.2

def ema(values, *, alpha: float) -> np.ndarray:
    """Exponential moving average [N]: e_0 = v_0, e_t = alpha v_t + (1 - alpha) e_{t-1}."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    out = np.empty_like(v)
    out[0] = v[0]
    for t in range(1, v.size):
        out[t] = alpha * v[t] + (1 - alpha) * out[t - 1]
    return out


def _xy(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be non-empty 1-D arrays of one shape, got {x.shape}, "
                         f"{y.shape}")
    return x, y


def ema_curve(lengths, scores, *, alpha: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Figure 4.2 left: runs sorted by length [N], and the EMA of their scores in that order."""
    x, y = _xy(lengths, scores)
    order = np.argsort(x, kind="stable")
    return x[order], ema(y[order], alpha=alpha)


def pareto_front(lengths, scores) -> np.ndarray:
    """Figure 4.2 middle: indices of the runs no other run beats on both axes (shorter or equal
    length and higher or equal score, one of them strictly), sorted by length."""
    x, y = _xy(lengths, scores)
    dominated = ((x[None, :] <= x[:, None]) & (y[None, :] >= y[:, None])
                 & ((x[None, :] < x[:, None]) | (y[None, :] > y[:, None]))).any(axis=1)
    keep = np.flatnonzero(~dominated)
    return keep[np.argsort(x[keep], kind="stable")]


def length_by_rank(rewards, lengths) -> np.ndarray:
    """Figure 4.2 right: mean length [N] of the responses at each rank (0 = highest reward) when
    the N samples of each of P prompts are ranked by a reward model. rewards, lengths: [P, N].

    Ties keep sample order (a stable sort of -reward).
    """
    r, n = np.asarray(rewards, np.float64), np.asarray(lengths, np.float64)
    if r.ndim != 2 or r.shape != n.shape:
        raise ValueError(f"rewards and lengths must be [P, N] of one shape, got {r.shape}, "
                         f"{n.shape}")
    order = np.argsort(-r, axis=1, kind="stable")  # [P, N] sample index at each rank
    return np.take_along_axis(n, order, axis=1).mean(axis=0)


def plot_length_figure(runs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       rank_curves: Mapping[str, Sequence[float]],
                       path: str | pathlib.Path, *, alpha: float = 0.3) -> pathlib.Path:
    """Figure 4.2 as one PNG with three panels.

    Args:
      runs: method (e.g. "vanilla + length penalty", "conditional CRM") -> (mean response
        length [R], win score [R]) of its R runs.
      rank_curves: reward model (e.g. "lambda = 10") -> `length_by_rank` [N].
      path: the PNG to write.
      alpha: EMA weight of the left panel.
    """
    if not runs or not rank_curves:
        raise ValueError("runs and rank_curves must each hold at least one entry")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (lengths, scores) in runs.items():
        x, y = _xy(lengths, scores)
        (line,) = left.plot(*ema_curve(x, y, alpha=alpha), label=name)
        left.scatter(x, y, s=12, alpha=0.4, color=line.get_color())
        front = pareto_front(x, y)
        middle.plot(x[front], y[front], marker="o", label=name)
        middle.scatter(x, y, s=8, alpha=0.25, color=line.get_color())
    for name, curve in rank_curves.items():
        curve = np.asarray(curve, np.float64)
        right.plot(np.arange(1, curve.size + 1), curve, label=name)
    left.set(title="EMA of win score", xlabel="mean response length", ylabel="win score vs SFT")
    middle.set(title="Pareto front", xlabel="mean response length", ylabel="win score vs SFT")
    right.set(title="length by reward rank", xlabel="rank (1 = highest reward)",
              ylabel="mean length")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
