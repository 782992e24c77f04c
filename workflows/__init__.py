"""Workflows: deterministic code only, one module (or package, for the larger ones) per workflow."""
