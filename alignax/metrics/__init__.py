"""Evaluation metrics: calibration, diversity, bias. One name per line, by topic module."""
