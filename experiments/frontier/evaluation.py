"""Evaluating one policy of `experiments.fdpo_frontier`: every metric per held-out prompt, [P].

    EvalSet.build(reference, prompts, ...)     reference samples, held-out pairs (once per seed)
    evaluate(policy, eval_set, key=...)        name -> [P] per-prompt values (one checkpoint)
    diversity(policy, eval_set, key=...)       Table 2.2-2.4 metrics at each temperature

Everything is computed with `alignax.eval` (sampling at fixed shapes, `prompt_metrics`,
`response_logprobs`) and `alignax.metrics` (`stochastic_ece`), from two sample sets per prompt:
K samples of the policy (temperature 1) and K fixed samples of the reference.

Divergences. `prompt_metrics` estimates D_f(pi, pi_ref) with the §2.8.2 estimator from the
policy's samples ("divergence/NAME"). Per sample its forward-KL term, g(t) - g'(1)(t - 1) with
t = pi_ref / pi, is below 1 wherever pi_ref << pi, so once a policy leaves the reference's
support that estimate saturates near 1 per response however large KL(pi_ref || pi) is (seen here
on collapsed PPO runs). The frontier therefore uses the multiple-importance-sampling
estimator over both sample sets (`mixture_divergence_terms`, "mis/NAME"): with
m = (pi + pi_ref) / 2 and equally many samples from pi and pi_ref (balance heuristic),

    D_f(pi, pi_ref) = E_ref[f(u)] = E_m[(2 / (1 + u)) (f(u) - f'(1)(u - 1))],   u = pi / pi_ref,

whose terms grow at most like |log u| in either direction, for every divergence.

Calibration (thesis §2.6.4, §2.8.8). Each held-out prompt carries K/2 pairs of reference samples
(2i, 2i+1) with the oracle's preference probability P* (`task.preference_probability`). As in
§2.6.4 the pair is a binary prediction: the policy predicts "y_a preferred" with probability
p_a = exp(s_a) / (exp(s_a) + exp(s_b)), where s is the response's length-normalised log-prob
log pi(y|x) / |y| (the "exponentials of normalized scores"), and the stochastic ECE of Remark 3
is p_a |P* - p_a| + p_b |(1 - P*) - p_b| per pair (`alignax.metrics.calibration.stochastic_ece`).
"Accuracy" is the share of non-tied pairs whose implicit rewards beta f'(pi / pi_ref) order them
as the oracle does; f' is increasing, so that is sign(h_a - h_b) for every divergence and beta.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import alignax.eval as ev
from alignax.divergences import f_divergence_estimator
from alignax.eval.prompt_metrics import Divergence, divergence_label
from alignax.metrics.calibration import stochastic_ece

Oracle = Callable[[Sequence[str]], np.ndarray]
"""texts [R] -> rewards [R] float64."""


def mixture_divergence_terms(name: str, log_ratio, *, alpha: float | None = None) -> np.ndarray:
    """Per-sample terms (2 / (1 + u)) (f(u) - f'(1)(u - 1)), u = e^h, of the balance-heuristic
    estimator of D_f(pi, pi_ref) (module docstring); h = log pi - log pi_ref of samples drawn
    half from pi and half from pi_ref, pooled. Their mean is unbiased for D_f.

    Evaluated without overflow: for h <= 0 as 2 sigmoid(-h) times the §2.8.2 term from samples
    of the reference, for h > 0 as 2 sigmoid(h) times the term from samples of the policy (the
    same number: (f(u) - f'(1)(u - 1)) / u is the conjugate's term at t = 1 / u).

    Args:
      name, alpha: the divergence (Table 2.1, admissible ones).
      log_ratio: any shape, float.

    Returns:
      Same shape, float64, every term >= 0.
    """
    h = jnp.asarray(log_ratio, jnp.float32)
    low, high = jnp.minimum(h, 0.0), jnp.maximum(h, 0.0)  # each branch at a safe argument
    from_reference = 2.0 * jax.nn.sigmoid(-low) * f_divergence_estimator(
        name, low, alpha=alpha, sampled_from="q")
    from_policy = 2.0 * jax.nn.sigmoid(high) * f_divergence_estimator(
        name, high, alpha=alpha, sampled_from="p")
    return np.asarray(jnp.where(h <= 0.0, from_reference, from_policy), np.float64)


def _split(divergence: Divergence) -> tuple[str, float | None]:
    return (divergence, None) if isinstance(divergence, str) else divergence


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """The held-out prompts of one seed and the reference's samples on them.

    Attributes:
      prompts: P prompt texts.
      prompt_ids, prompt_mask: [P, L] left-padded.
      sampling: the SamplingConfig of every evaluation sample (K, N, batch, L).
      reference: the reference's K samples per prompt (temperature 1).
      reference_rewards: [P, K] oracle rewards of the reference samples.
      pair_probability: [P, K/2] P*(sample 2i preferred to sample 2i+1) of the oracle.
    """

    prompts: tuple[str, ...]
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    sampling: ev.SamplingConfig
    reference: ev.Samples
    reference_rewards: np.ndarray
    pair_probability: np.ndarray

    @classmethod
    def build(cls, reference_model, tokenizer, prompts: Sequence[str], *,
              sampling: ev.SamplingConfig, oracle: Oracle, key: jax.Array,
              preference_probability: Callable[[np.ndarray, np.ndarray], np.ndarray]
              ) -> EvalSet:
        """Samples K responses per prompt from the reference and pairs them up (K even)."""
        if sampling.num_samples % 2:
            raise ValueError(f"eval_samples must be even (held-out pairs), got "
                             f"{sampling.num_samples}")
        ids, mask = ev.encode_prompts(tokenizer, prompts, prompt_length=sampling.prompt_length)
        samples = ev.sample(reference_model, ids, mask, key=key, config=sampling)
        rewards = _rewards(oracle, samples, tokenizer)
        probability = preference_probability(rewards[:, 0::2], rewards[:, 1::2])  # [P, K/2]
        return cls(tuple(prompts), ids, mask, sampling, samples, rewards, probability)


def _rewards(oracle: Oracle, samples: ev.Samples, tokenizer) -> np.ndarray:
    """[P, K] oracle rewards of the samples' texts."""
    texts = samples.texts(tokenizer)
    flat = oracle([t for row in texts for t in row])
    return np.asarray(flat, np.float64).reshape(samples.tokens.shape[:2])


def evaluate(policy, reference_model, eval_set: EvalSet, tokenizer, *, oracle: Oracle,
             key: jax.Array, divergences: Sequence[Divergence],
             well_formed: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Every per-prompt metric of `policy` on the eval set (temperature-1 samples).

    Returns:
      name -> [P] float64: "score/oracle", "length", "truncated", "entropy/sequence",
      "entropy/token", "self_bleu", "distinct_1", "distinct_2", "log_ratio",
      "divergence/LABEL" (§2.8.2 from policy samples), "mis/LABEL" (both sample sets),
      "ece", "accuracy" (NaN for a prompt whose pairs are all tied), and "well_formed" when
      given a grammar check.
    """
    samples = ev.sample(policy, eval_set.prompt_ids, eval_set.prompt_mask, key=key,
                        config=eval_set.sampling)
    scores = _rewards(oracle, samples, tokenizer)
    reference_logps = ev.response_logprobs(reference_model, samples)  # [P, K]
    out = ev.prompt_metrics(samples, scores={"oracle": scores},
                            reference_logprobs=reference_logps, divergences=divergences)
    if well_formed is not None:
        out["well_formed"] = np.asarray([[well_formed(t) for t in row]
                                         for row in samples.texts(tokenizer)], np.float64).mean(-1)
    # The reference's samples under the policy: the other half of the mixture estimator, and
    # the held-out pairs' scores.
    ref = eval_set.reference
    policy_on_ref = ev.response_logprobs(policy, ref)  # [P, K]
    h_policy = samples.logprobs - reference_logps  # [P, K], y ~ pi
    h_reference = policy_on_ref - ref.logprobs  # [P, K], y ~ pi_ref
    pooled = np.concatenate([h_policy, h_reference], axis=1)  # [P, 2K]
    for divergence in divergences:
        name, alpha = _split(divergence)
        out[f"mis/{divergence_label(divergence)}"] = mixture_divergence_terms(
            name, pooled, alpha=alpha).mean(-1)
    out.update(pair_metrics(policy_on_ref, h_reference, ref.lengths, eval_set.reference_rewards,
                            eval_set.pair_probability))
    return out


def pair_metrics(logps, log_ratios, lengths, rewards, probability) -> dict[str, np.ndarray]:
    """Calibration and accuracy on the held-out pairs (module docstring).

    Args:
      logps: [P, K] log pi(y|x) of the reference samples; pairs are (2i, 2i+1).
      log_ratios: [P, K] h = log pi - log pi_ref of the same samples.
      lengths: [P, K] response lengths in tokens.
      rewards: [P, K] oracle rewards.
      probability: [P, K/2] the oracle's P*(y_2i preferred).

    Returns:
      {"ece": [P] mean stochastic ECE over the prompt's pairs, "accuracy": [P] share of its
      non-tied pairs ordered as the oracle orders them, a pair with h_a = h_b counting 1/2
      (NaN if all are tied)}.
    """
    scores = np.asarray(logps, np.float64) / np.maximum(lengths, 1)  # [P, K]
    a, b = scores[:, 0::2], scores[:, 1::2]  # [P, K/2]
    p_a = 1.0 / (1.0 + np.exp(b - a))  # softmax over the pair
    probs = np.stack([p_a, 1.0 - p_a], axis=-1)  # [P, K/2, 2]
    truth = np.stack([probability, 1.0 - probability], axis=-1)
    ece = np.asarray(jax.vmap(stochastic_ece)(probs, truth), np.float64)  # [P]
    margin = log_ratios[:, 0::2] - log_ratios[:, 1::2]  # h_a - h_b
    better = np.sign(rewards[:, 0::2] - rewards[:, 1::2])  # +1: a preferred by the oracle
    counted = better != 0
    # a pair the policy does not separate (h_a = h_b, e.g. the reference itself) counts half
    agree = np.where(margin == 0, 0.5, np.sign(margin) == better) * counted
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = agree.sum(-1) / np.where(counted.any(-1), counted.sum(-1), np.nan)
    return {"ece": ece, "accuracy": accuracy}


def diversity(policy, eval_set: EvalSet, tokenizer, *, key: jax.Array, temperature: float,
              top_p: float | None = None) -> dict[str, np.ndarray]:
    """Table 2.2-2.4 metrics at one temperature: "entropy/sequence" (of the tempered sampling
    distribution), "self_bleu", "distinct_1", "distinct_2", each [P]."""
    sampling = dataclasses.replace(eval_set.sampling, temperature=temperature, top_p=top_p)
    samples = ev.sample(policy, eval_set.prompt_ids, eval_set.prompt_mask, key=key,
                        config=sampling)
    metrics = ev.prompt_metrics(samples)
    return {k: metrics[k] for k in ("entropy/sequence", "self_bleu", "distinct_1",
                                    "distinct_2")}
