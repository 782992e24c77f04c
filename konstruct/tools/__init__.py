"""The runtime of an agent's tools: pure async code, no Temporal and no database."""
