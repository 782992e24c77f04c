"""Workflows: deterministic code only, one module per workflow."""
