"""Experiments: one module per study, each a typed config dataclass plus `main(argv)`.

Run one as `python -m experiments.<name> [--field value ...]`; every config field can be
overridden on the command line, e.g. `--train_steps 200 --mesh 2 2 2` (tyro, through
`alignax.trainer.cli.parse_config`, the mechanism of the `alignax` command). Each writes metrics
(JSONL + TensorBoard), PNG plots, a summary table and checkpoints under its `run_dir`.
"""
