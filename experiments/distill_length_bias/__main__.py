"""`python -m experiments.distill_length_bias [--FIELD VALUE ...]`."""

import sys

from experiments.distill_length_bias.study import main

main(sys.argv[1:])
