"""The parts of `experiments.fdpo_frontier` (thesis ch. 2: f-DPO against PPO under each
f-divergence).

    task.py        prompts, the review grammar, the sentiment oracle and its preference model
    training.py    the phases: SFT of the reference, preference pairs, f-DPO runs, PPO runs
    evaluation.py  per-prompt metrics of one policy (reward, divergences, diversity, ECE)
    report.py      tables beside the thesis' numbers, the claims checked, figures
"""
