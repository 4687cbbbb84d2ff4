"""Reward-model distillation under a spurious length bias: 004 §4, Figure 2, C.1, D.1.

    python -m experiments.distill_length_bias                        # embedded default
    python -m experiments.distill_length_bias --rhos 0.2 0.4 0.6 0.8 --betas 0.1 0.3 1 3

What 004 §4 does: an oracle reward model trained on TL;DR preferences relabels every pair;
training sets D_rho (30K pairs) in which the longer summary wins in a fraction rho in
{0.2, ..., 0.8}; DPO and IPO on D_rho against d-DPO (distil r_rho, trained on D_rho; eq. 7),
p-DPO (DPO + gamma forward KL; eq. 13), pd-DPO (eq. 11 with {r_rho}) and e-DPO (eq. 11 with
the ensemble r_{rho,b}, each trained on the subset D_{rho,b} of D_rho in which the longer
response wins in a fraction b in {0.2, 0.4, 0.5, 0.6, 0.8}); gamma annealed 1e-4 -> 1e-2;
beta / tau swept and chosen on validation; the oracle advantage of each policy over pi_SFT on
test prompts with bootstrap intervals (Figure 2), the ensemble member that best matches the
e-DPO policy on each training pair (Figure C.1), validation results per hyper-parameter
(Figure D.1).

What this module does at CPU size (every piece is the paper's except where said):
- the task (`world`): the corpus' questions as prompts, responses of 1-3 tips, each useful or
  unhelpful; a PROGRAMMATIC oracle r* = mean tip value + a per-(question, tip) relevance that a
  small reward model cannot learn + 0.4 x the number of tips, so that, like the TL;DR oracle,
  it prefers longer responses (the longer response of a pool pair wins about 61-63% of the
  time, 004: 61%). It plays the oracle reward model's two roles (relabelling, evaluation);
  training an oracle reward model on oracle-sampled labels first would only add noise here;
- pairs: two generator responses per train prompt, relabelled by the oracle; "longer" = at
  least 10% more tokens (pairs within 10% are left out of every D_rho); D_rho of 256 pairs;
- pi_SFT: the embedded tiny Llama fine-tuned on generator responses (`alignax.trainer.train`);
- reward models: all 6 x |rhos| x |seeds| members (r_rho and the five r_{rho,b} of every
  (seed, rho)) are ONE `alignax.models.RewardEnsemble` trained by one vmapped step in which
  every member reads its own subset (`rewards`; why not the library's train step is said
  there); they start from pi_SFT's transformer (the paper starts every model from one
  pretrained LM);
- policies: the registered objectives `DPO`, `IPO`, `Distill`, `PessimisticDPO`,
  `PessimisticDistill` (pd-DPO: target rewards [B], e-DPO: [B, 5]) with
  `alignax.schedules.pessimism_schedule` evaluated in the train step; one compiled step per
  (method, hyper-parameter) shared by every rho and seed (`phases.PolicyRunner`);
- scaled down: rho in {0.2, 0.5, 0.8} (every rho is a flag away), beta in {0.3, 1}, tau in
  {0.1, 1}, 64 policy steps, validation at steps 32 and 64 (selection over hyper-parameter
  and step, as the paper selects during training), 3 seeds; intervals over (seed, test
  prompt) units, 12 test prompts x 8 samples (pi_SFT: 32 samples).

Outputs under `run_dir`: sft/ (the trainer's run), rewards/ (metrics.jsonl, checkpoints, the
members' scores), policies/<method>/<hyper>/<group>/metrics.jsonl, results.jsonl (one record
per policy run and per pi_SFT evaluation: per-prompt oracle reward, sentences, tokens, share
of useful tips at every eval step; e-DPO's best-member counts), summary.md (all tables and the
paper's claims judged on the run), summary.json, figure2.png, figure_c1.png, figure_d1.png,
timings.jsonl (one line per invocation: wall / CPU seconds and load averages per phase).
A killed run started again with the same config restores the SFT and reward
checkpoints, reuses the scores and skips every policy run already in results.jsonl.

What the committed run (experiments/results/distill_length_bias/) reproduces, claim by claim
as judged in its summary.md (a test checks this list against its summary.json):

- holds: sizable improvements over pi_SFT for all length biases (§4.2) [rho=0.2: best CI low
  +0.463, rho=0.5: best CI low +0.695, rho=0.8: best CI low +0.860]
- fails: d-DPO, pd-DPO and e-DPO beat DPO and IPO for rho <= 0.5 (§4.2) [2 of 6 (method, rho)
  cells]
- fails: e-DPO is the best method for rho < 0.5 (§4.2) [rho=0.2: p-dpo]
- fails: d-DPO is the best method for rho > 0.6 (§4.2) [rho=0.8: ipo]
- fails: p-DPO does no better than the best distillation method, every rho (§4.2) [rho=0.2:
  +0.314, rho=0.5: +0.206, rho=0.8: -0.043]
- fails: e-DPO's best-matching member has the opposite bias: mean b > 0.5 at the smallest rho <
  0.5, < 0.5 at the largest rho > 0.5, and falls as rho rises (App. C) [rho=0.2: mean b 0.45,
  rho=0.5: mean b 0.46, rho=0.8: mean b 0.60; slope +0.25]
- fails: the selected beta (DPO-based methods) falls as rho rises (App. D) [dpo: 1/1/1, d-dpo:
  1/0.3/1, p-dpo: 0.3/0.3/1, pd-dpo: 1/1/1, e-dpo: 0.3/0.3/0.3]

So the small run reproduces the study's premise and its first claim, not the ranking of the
methods: the reward models learn D_rho's length bias and the members r_{rho,b} span it (their
reward gap's correlation with length, averaged over seeds, rises with b: summary.md's
reward-model table), and every
method improves on pi_SFT at every rho; but the distillation methods do not beat DPO and IPO at
rho <= 0.5, p-DPO (not e-DPO) is the best method at the smaller rhos, and e-DPO's best-matching
members do not show the opposite-bias pattern of Figure C.1. Most paired differences between
methods have intervals that include 0 (summary.md). Scale is the first suspect, not the
methods: 256 pairs per D_rho instead of 30K, 64 policy steps at a large learning rate instead
of 10^4, two swept values instead of seven, a two-layer model; the run does not separate these.
"""

from experiments.distill_length_bias.study import PAPER, SMOKE, Config, main, run

__all__ = ["Config", "PAPER", "SMOKE", "main", "run"]
