"""The model registry: runs, aliases and their history; payload models and SQL."""
