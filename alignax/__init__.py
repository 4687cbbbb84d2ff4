"""alignax: robust preference optimization of language models in JAX/Flax.

The pure, jittable objectives, their registered configs (`alignax.DPO(beta=0.1)`, ...) and the
log-prob functions are re-exported here, one name per line; schedules, models, data, training
and the analytic toy lab live in their modules and subpackages.
"""

from alignax.logprobs import chunked_sequence_logprobs
from alignax.logprobs import chunked_token_logprobs
from alignax.logprobs import next_token_targets
from alignax.logprobs import sequence_logprobs
from alignax.logprobs import token_logprobs
from alignax.objectives import *  # noqa: F401,F403  (the objectives' public names)
from alignax.objectives import __all__ as _objective_names

__all__ = [
    "chunked_sequence_logprobs",
    "chunked_token_logprobs",
    "next_token_targets",
    "sequence_logprobs",
    "token_logprobs",
    *_objective_names,
]
