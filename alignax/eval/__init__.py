"""Evaluation from samples: sample K responses per prompt, score them, per-prompt metrics, and
means with bootstrap intervals.

    samples = sample(policy, prompt_ids, prompt_mask, key=key, config=SamplingConfig(...))
    reference = response_logprobs(reference_model, samples)               # [P, K]
    per_prompt = prompt_metrics(samples, reference_logprobs=reference,
                                scores={"oracle": reward_scores(rm, samples)})   # name -> [P]
    table = markdown_table({"policy": summarize(per_prompt, seed=0)})     # mean [95% CI]

Win rates: `judge_pairs` / `alignax.metrics.compare_scores` -> outcomes -> `alignax.metrics.
win_rates` -> `summarize`. Paired differences of two policies on the same prompts: `compare`.
"""

from alignax.eval.intervals import Estimate
from alignax.eval.intervals import bootstrap_estimate
from alignax.eval.intervals import compare
from alignax.eval.intervals import summarize
from alignax.eval.prompt_metrics import category_metrics
from alignax.eval.prompt_metrics import divergence_estimates
from alignax.eval.prompt_metrics import divergence_label
from alignax.eval.prompt_metrics import prompt_metrics
from alignax.eval.report import frontier_plot
from alignax.eval.report import markdown_table
from alignax.eval.report import summary_record
from alignax.eval.sampling import Samples
from alignax.eval.sampling import SamplingConfig
from alignax.eval.sampling import encode_prompts
from alignax.eval.sampling import response_logprobs
from alignax.eval.sampling import sample
from alignax.eval.scoring import judge_pairs
from alignax.eval.scoring import reward_scores
from alignax.eval.scoring import text_scores
from alignax.eval.scoring import token_scores

__all__ = [
    "Estimate",
    "Samples",
    "SamplingConfig",
    "bootstrap_estimate",
    "category_metrics",
    "compare",
    "divergence_estimates",
    "divergence_label",
    "encode_prompts",
    "frontier_plot",
    "judge_pairs",
    "markdown_table",
    "prompt_metrics",
    "response_logprobs",
    "reward_scores",
    "sample",
    "summarize",
    "summary_record",
    "text_scores",
    "token_scores",
]
