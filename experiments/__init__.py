"""Experiments: one module (or package) per study of the seeds, registered in `EXPERIMENTS`.

Run one as `python -m experiments.<name> [--field value ...]`: every config field can be
overridden on the command line, e.g. `--train_steps 200 --mesh 2 2 2` (tyro, through
`alignax.trainer.cli.parse_config`, the mechanism of the `alignax` command). Each study module
provides

    Config       a frozen dataclass whose defaults are the embedded default: the embedded tiny
                 model and programmatic data, a run of a few minutes on 2 CPU cores;
    SMOKE        a Config at smoke size, which the test suite runs end to end;
    PAPER        a Config with the paper-scale settings (hub models and datasets, mesh, LoRA),
                 documented in BUILD.md, for machines that have them;
    run(config)  runs the study into `config.run_dir` and returns its Markdown results table;
    main(argv)   `run(parse_config(Config, argv))`.

and writes under its run directory: per-run metrics (JSONL + TensorBoard), checkpoints (a
killed run resumes when started again with the same config), PNG figures, the results table
(Markdown, with 95% intervals over seeds and the paper's numbers beside ours where they exist)
and a JSON summary.
"""

EXPERIMENTS: tuple[str, ...] = (
    "fdpo_frontier",
    "fdpo_sentiment",
    "distill_length_bias",
    "multisample_numbers",
    "multisample_label_noise",
    "causal_reward",
)
"""Module names under `experiments`, each following the contract above."""
