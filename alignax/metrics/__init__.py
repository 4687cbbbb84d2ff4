"""Evaluation metrics: calibration, diversity, bias. One name per line, by topic module."""

# Bias (thesis ch. 4)
from alignax.metrics.bias import concept_accuracy
from alignax.metrics.bias import concept_bias
from alignax.metrics.bias import concept_bias_metrics
from alignax.metrics.bias import sycophancy_rate
from alignax.metrics.bias import win_score

# Diversity (thesis ch. 3)
from alignax.metrics.diversity import category_counts
from alignax.metrics.diversity import category_entropy
from alignax.metrics.diversity import distinct_n
from alignax.metrics.diversity import kl_to_uniform
from alignax.metrics.diversity import simpson_index
