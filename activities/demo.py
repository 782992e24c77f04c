"""The DemoCascade step activities, one module per phase, and the worker's list of them.

- `activities.demo_session`: the session row, precheck, reset, cleanup, compensations' deletes
- `activities.demo_data`: sales, features, models, backtests, the sweep, scenario plans
- `activities.demo_registry`: registering runs, alias moves, stale and regression checks, verify
- `activities.demo_agent`: the RAG index, the agent's decision, its evaluation
- `activities.demo_step`: what they share (timing, failure injection, artifacts)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from activities.demo_agent import DOCS_DIR, DemoAgentActivities
from activities.demo_data import DemoDataActivities
from activities.demo_registry import DemoRegistryActivities
from activities.demo_session import DemoSessionActivities
from konstruct.providers.router import RouterConfig


def demo_activities(
    pool: asyncpg.Pool, router: Any, router_config: RouterConfig, docs_dir: Path = DOCS_DIR
) -> list[Callable[..., Awaitable[Any]]]:
    """Every demo step activity, bound to the worker's pool and router."""
    groups = router_config.groups()
    return [
        *DemoSessionActivities(pool, groups).all(),
        *DemoDataActivities(pool).all(),
        *DemoRegistryActivities(pool).all(),
        *DemoAgentActivities(pool, router, groups, docs_dir).all(),
    ]
