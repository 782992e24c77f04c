"""A local OpenAI-compatible LLM provider simulator.

Reached through litellm exactly like a real provider (`openai/<model>` with
`api_base=http://127.0.0.1:8799/v1`). Per model: latency, a server-side rate
limit in one of five shapes (`rate_limit_shape`: token_bucket with Retry-After,
sliding_window with OpenAI's x-ratelimit headers, leaky_bucket without
Retry-After, tokens_per_minute, daily_quota answering insufficient_quota; see
`limiters`), injected 500s, hangs and outages,
deterministic answers (including arithmetic at a chosen accuracy), usage
tokens, and an admin API to read counters, change profiles at run time and
freeze or advance the clock the limits read (`clock`).

    python -m konstruct.providers.simulator --port 8799 --config deploy/simulator.yaml

Every random choice comes from a `random.Random` seeded by a hash of the
model's seed, the model, the request content and (for faults) how many times
that content was seen, so runs repeat exactly and a retried request can get
a different fault decision than the first attempt.
"""

from konstruct.providers.simulator.profiles import STATS_KEYS, ModelProfile, SimulatorConfig
from konstruct.providers.simulator.responders import EMBEDDING_DIMS, embed_text, simulated_reply
from konstruct.providers.simulator.server import Simulator, SimulatorHandle, main, start_simulator

__all__ = [
    "EMBEDDING_DIMS",
    "STATS_KEYS",
    "ModelProfile",
    "Simulator",
    "SimulatorConfig",
    "SimulatorHandle",
    "embed_text",
    "main",
    "simulated_reply",
    "start_simulator",
]
