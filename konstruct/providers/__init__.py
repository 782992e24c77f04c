"""LLM providers: the litellm adapter and router, prices, the adaptive rate and breaker decisions, queue limits, their SQL, and the simulator."""
