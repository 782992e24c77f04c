"""Konstruct: LLM agents and LLM evaluations on Temporal."""

__all__ = ["__version__"]

__version__ = "0.1.0"
