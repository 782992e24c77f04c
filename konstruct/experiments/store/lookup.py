"""One experiment's row, read the same way by every store module: NotFound, with
where to look, when the tenant has no such experiment."""

from __future__ import annotations

import asyncpg

from konstruct.platform.errors import NotFound


def missing_experiment(tenant_id: str, experiment_id: str) -> NotFound:
    return NotFound(
        f"experiment {experiment_id!r} of tenant {tenant_id!r} does not exist;"
        " see `konstruct experiments list`"
    )


async def experiment_row(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    columns: str = "*",
    *,
    for_update: bool = False,
) -> asyncpg.Record:
    """The experiment's `columns` (locked `for_update`)."""
    row = await conn.fetchrow(
        f"select {columns} from experiments where tenant_id = $1 and experiment_id = $2"
        + (" for update" if for_update else ""),
        tenant_id,
        experiment_id,
    )
    if row is None:
        raise missing_experiment(tenant_id, experiment_id)
    return row
