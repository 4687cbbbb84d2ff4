"""Evaluation metrics: calibration, diversity, bias, paired comparisons. One name per line, by
topic module."""

# Bias (thesis ch. 4)
from alignax.metrics.bias import concept_accuracy
from alignax.metrics.bias import concept_bias
from alignax.metrics.bias import concept_bias_metrics
from alignax.metrics.bias import sycophancy_rate
from alignax.metrics.bias import win_score

# Paired comparisons of two policies
from alignax.metrics.comparison import compare_scores
from alignax.metrics.comparison import win_rates

# Diversity (thesis chs. 2-3)
from alignax.metrics.diversity import category_counts
from alignax.metrics.diversity import category_entropy
from alignax.metrics.diversity import distinct_n
from alignax.metrics.diversity import kl_to_uniform
from alignax.metrics.diversity import self_bleu
from alignax.metrics.diversity import simpson_index
