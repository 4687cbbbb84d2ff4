"""`python -m experiments.causal_reward [--field value ...]` (see `pipeline`)."""

import sys

from experiments.causal_reward.pipeline import main

main(sys.argv[1:])
