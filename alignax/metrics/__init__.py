"""Evaluation metrics: calibration, diversity, bias. One name per line, by topic module."""

# Bias (thesis ch. 4)
from alignax.metrics.bias import concept_accuracy
from alignax.metrics.bias import concept_bias
from alignax.metrics.bias import concept_bias_metrics
from alignax.metrics.bias import sycophancy_rate
from alignax.metrics.bias import win_score
