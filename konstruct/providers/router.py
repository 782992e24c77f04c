"""The LiteLLM Router built from `deploy/llm-router.yaml`, with keys from the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from konstruct.platform.errors import ConfigError
from konstruct.providers.adapter import load_litellm

ENV_PREFIX = "os.environ/"


class RateLimits(BaseModel):
    """A deployment's declared limits, from its `model_info` (every field optional).

    `rpm` / `tpm`: the provider's requests and tokens per minute (its dashboard's
    figures); the rate never goes above `rpm`, starts just under it, and prompt +
    completion tokens are metered against `tpm`. `limit_window_s`: the window of
    the provider's `x-ratelimit-limit-*` headers (60: OpenAI's and Anthropic's per
    minute). `initial_rps`, `min_rps`, `max_rps`: the adaptive rate's bounds.
    """

    model_config = ConfigDict(extra="ignore")

    initial_rps: float | None = Field(None, gt=0)
    min_rps: float | None = Field(None, gt=0)
    max_rps: float | None = Field(None, gt=0)
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    limit_window_s: float = Field(60.0, gt=0)


class DeclaredPrices(BaseModel):
    """A deployment's declared prices, from its `model_info` (litellm's own names, US
    dollars per token; see `konstruct.providers.pricing`). Unset: litellm's price map decides."""

    model_config = ConfigDict(extra="ignore")

    input_cost_per_token: float | None = Field(None, ge=0)
    output_cost_per_token: float | None = Field(None, ge=0)


class Deployment(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_name: str
    litellm_params: dict[str, Any]
    model_info: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model_info")
    @classmethod
    def _limits_valid(cls, info: dict[str, Any]) -> dict[str, Any]:
        RateLimits.model_validate(info)
        DeclaredPrices.model_validate(info)
        return info

    @property
    def limits(self) -> RateLimits:
        return RateLimits.model_validate(self.model_info)

    @property
    def deployment_id(self) -> str:
        return str(self.model_info.get("id") or self.litellm_params["model"])

    @property
    def provider(self) -> str:
        return str(self.model_info.get("provider") or self.deployment_id)

    def required_env(self) -> list[str]:
        return [
            value[len(ENV_PREFIX) :]
            for value in self.litellm_params.values()
            if isinstance(value, str) and value.startswith(ENV_PREFIX)
        ]


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_list: list[Deployment]
    router_settings: dict[str, Any] = Field(default_factory=dict)

    def active(self, environ: dict[str, str] | None = None) -> list[Deployment]:
        """Deployments whose environment variables are all set, with values resolved."""
        env = os.environ if environ is None else environ
        active = []
        for deployment in self.model_list:
            if not all(env.get(name) for name in deployment.required_env()):
                continue
            params = {
                key: env[value[len(ENV_PREFIX) :]]
                if isinstance(value, str) and value.startswith(ENV_PREFIX)
                else value
                for key, value in deployment.litellm_params.items()
            }
            active.append(deployment.model_copy(update={"litellm_params": params}))
        return active

    def groups(self, environ: dict[str, str] | None = None) -> set[str]:
        return {d.model_name for d in self.active(environ)}

    def fallbacks(self) -> dict[str, list[str]]:
        merged: dict[str, list[str]] = {}
        for entry in self.router_settings.get("fallbacks", []):
            for group, targets in entry.items():
                merged.setdefault(group, []).extend(targets)
        return merged


def load_router_config(path: Path) -> RouterConfig:
    if not path.is_file():
        raise ConfigError(
            f"router config {path} does not exist (llm.router_config / KONSTRUCT_ROUTER_CONFIG)"
        )
    try:
        return RouterConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"router config {path} is invalid: {exc}") from exc


def litellm_model_cost(model: str) -> dict[str, Any] | None:
    """litellm's bundled price-map entry for a model name (the copy litellm ships:
    `LITELLM_LOCAL_MODEL_COST_MAP` is set in `konstruct/__init__.py`); None: not listed."""
    litellm = load_litellm()

    entry = litellm.model_cost.get(model)
    return dict(entry) if isinstance(entry, dict) else None


def build_router(config: RouterConfig, environ: dict[str, str] | None = None) -> Any:
    """A litellm Router over the active deployments. Raises ConfigError if none is active."""
    litellm = load_litellm()
    # The OpenAI client imports its resource modules (most of the time in
    # `openai.resources.admin`) on a client's first `.chat`: a fresh worker's first
    # call took 0.74 s instead of 0.04 s, the first second of its first experiment
    # at a fraction of the rate. Imported here, they are paid while the worker starts.
    import openai.resources  # noqa: F401

    deployments = config.active(environ)
    if not deployments:
        wanted = sorted({n for d in config.model_list for n in d.required_env()})
        raise ConfigError(
            "no LLM deployment is active: set the environment variables of at least one "
            f"entry in the router config ({', '.join(wanted)})"
        )
    settings = dict(config.router_settings)
    active_groups = {d.model_name for d in deployments}
    settings["fallbacks"] = [
        {group: [t for t in targets if t in active_groups]}
        for group, targets in config.fallbacks().items()
        if group in active_groups
    ]
    model_list = []
    for d in deployments:
        params = dict(d.litellm_params)
        # The OpenAI client's own retries would multiply with Temporal's.
        params.setdefault("max_retries", 0)
        # Prices are Konstruct's business (konstruct.providers.pricing); given to litellm, it
        # warns at every start about each model its own map does not list.
        info = {k: v for k, v in d.model_info.items() if k not in DeclaredPrices.model_fields}
        model_list.append(
            {"model_name": d.model_name, "litellm_params": params, "model_info": info}
        )
    return litellm.Router(model_list=model_list, **settings)
