"""The causal-reward studies of thesis ch. 4 end to end: data, SFT, reward models (vanilla and
causal), PPO and Causal DPO, and the chapter's metrics.

    python -m experiments.causal_reward [--studies sycophancy,length,concept,discrimination]

The study-module contract (`experiments`) is in `pipeline`: `Config` (the embedded default),
`SMOKE`, `PAPER`, `run(config)`, `main(argv)`, re-exported here. The phases it runs are in
`phases`, what it measures per study in `studies`, the shared measurement helpers in
`evaluation`.

Each study makes preference data with a known spurious variable Z, trains reward models three
ways (vanilla Bradley-Terry, conditional and unconditional CRM: Bradley-Terry + lambda * binned
MMD^2 over bins of Z, `alignax.objectives.causal_reward_loss`), optimises a policy against each
and measures the chapter's metric on the policy. This package holds the data builders, the bins
and the metrics, one module per study:

- `sycophancy` (§4.6.1, Table 4.1): Z = the prefix "Yes, you are right."; metric: % of test
  prompts whose N samples all contain it.
- `length` (§4.6.2, Figure 4.2): Z = response length (quantile bins); metric: win score
  against the SFT policy under an oracle judge; EMA / Pareto / length-by-rank plots; the
  length-penalty baseline.
- `concept` (§4.6.3, Table 4.2): Z = whether the review mentions a concept; metrics: Acc@NoC,
  Acc@C, Bias@C.
- `discrimination` (§4.6.4, Table 4.3, Figure 4.3): Z = the age x gender x race bin from the
  keyword tables; metrics: mixed-effects coefficients of the decision on the demographic
  variables (explicit and implicit questions) and a utility win rate.

Every builder has an embedded default (programmatic, seeded, short texts in the embedded
tokenizer's vocabulary, learnable by the embedded tiny model on a CPU) and paper-scale loaders
for the datasets the thesis used. Builders return a `records.StudyData` (splits in the standard
or HH format, written as JSONL by `.write(dir)`); `tables` formats results next to the
thesis' numbers.

    from experiments.causal_reward import sycophancy
    data = sycophancy.build_sycophancy(seed=0)
    paths = data.write("runs/causal_reward/sycophancy/data")
"""

from experiments.causal_reward.pipeline import PAPER, SMOKE, Config, main, run

__all__ = ["Config", "PAPER", "SMOKE", "main", "run"]
