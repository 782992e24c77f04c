"""What a provider call costs: a deployment's price per token, times the tokens.

The price of a deployment is, in this order:

1. its `model_info.input_cost_per_token` / `output_cost_per_token` in the router
   config (litellm's own names; either alone counts, the other as 0);
2. litellm's bundled price map (`litellm.model_cost`, the copy litellm ships:
   `LITELLM_LOCAL_MODEL_COST_MAP` is set in `konstruct/__init__.py`, so nothing
   is downloaded), looked up by the deployment's `litellm_params.model`, and
   without its `provider/` prefix when the map lists the model under that provider;
3. unknown: `price_of` returns None, and a call's cost is None (counted as 0, with
   `cost_known: false` in the summary).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from konstruct.providers.router import DeclaredPrices, Deployment, litellm_model_cost


@dataclass(frozen=True)
class Price:
    """US dollars per prompt token and per completion token."""

    input_per_token: float
    output_per_token: float
    source: Literal["config", "litellm"]


def price_of(deployment: Deployment) -> Price | None:
    """The deployment's price: declared, else litellm's map, else None (unknown)."""
    declared = DeclaredPrices.model_validate(deployment.model_info)
    if declared.input_cost_per_token is not None or declared.output_cost_per_token is not None:
        return Price(
            declared.input_cost_per_token or 0.0, declared.output_cost_per_token or 0.0, "config"
        )
    return litellm_price(str(deployment.litellm_params.get("model") or ""))


@functools.lru_cache(maxsize=256)
def litellm_price(model: str) -> Price | None:
    """The price litellm's bundled map gives `model` (e.g. `openai/gpt-4o-mini`)."""
    if not model:
        return None
    entry = litellm_model_cost(model)
    if entry is None and "/" in model:
        provider, name = model.split("/", 1)
        bare = litellm_model_cost(name)
        if bare is not None and bare.get("litellm_provider") == provider:
            entry = bare
    if entry is None:
        return None
    prompt, completion = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if prompt is None and completion is None:
        return None
    return Price(float(prompt or 0.0), float(completion or 0.0), "litellm")


def cost_usd(price: Price, prompt_tokens: int | float, completion_tokens: int | float) -> float:
    """What `prompt_tokens` in and `completion_tokens` out cost at `price`."""
    return prompt_tokens * price.input_per_token + completion_tokens * price.output_per_token
