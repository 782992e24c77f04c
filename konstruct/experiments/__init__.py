"""Experiments: datasets, evals, statistics, comparison, the HTML report, payload models and SQL."""
