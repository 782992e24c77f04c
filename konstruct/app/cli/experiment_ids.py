"""How the experiment commands name an experiment: its argument, and the workflow it runs as."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from konstruct.app.cli.common import app_pool

if TYPE_CHECKING:
    from konstruct.config import Settings

experiment_argument = click.argument("experiment")


async def experiment_workflow_id(settings: Settings, tenant: str, experiment: str) -> str:
    """The experiment's workflow id: recorded in PostgreSQL; else the id itself."""
    from konstruct.experiments.store.experiments import find_workflow_id
    from konstruct.platform.db import tenant_transaction

    async with app_pool(settings) as pool, tenant_transaction(pool, tenant) as conn:
        found = await find_workflow_id(conn, tenant, experiment)
    return found or experiment
