"""Experiments: one module per study, each a typed config dataclass plus `main(argv)`.

Run one as `python -m experiments.<name> [--field value ...]`; every config field can be
overridden on the command line (see `experiments.cli.parse_config`). Each writes metrics
(JSONL + TensorBoard), PNG plots, a summary table and checkpoints under its `run_dir`.
"""
