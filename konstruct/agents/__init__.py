"""Agents: prompts, the tools runtime, the knowledge base, API keys, their payload models and SQL."""
