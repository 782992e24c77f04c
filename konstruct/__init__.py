"""Konstruct: LLM agents and LLM evaluations on Temporal."""

import os

# litellm fetches its model price map from GitHub on import unless told to use
# the copy it ships; Konstruct must never download at run time.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = ["__version__"]

__version__ = "0.1.0"
