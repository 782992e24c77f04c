"""The experiments' SQL: experiments, their items and results (the summaries are
`summaries`'; the figures in them `konstruct.experiments.statistics`').

Read by the experiment activities and the CLI alike; each function takes a
connection in the caller's `db.tenant_transaction`, so row-level security scopes
it to a tenant.
An item read for a provider call also joins the provider's breaker row, so a
call with a closed breaker needs no second round trip.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
from pydantic import TypeAdapter

from konstruct.experiments.models import (
    DatasetItem,
    EvalSpec,
    ExperimentSummary,
    PendingItem,
    TaskSpec,
    eval_name,
)

_EVALS = TypeAdapter(list[EvalSpec])
_INSERT_BATCH = 2000
# The result row of item `i`, looked up by its key: with `offset 0` the planner keeps
# it a probe per item instead of hashing every result of the experiment (which
# grows with it: 20 ms a page at 100,000 items, against 3 ms).
# An item's result row, if any. The result's `seq` is its item's: matched too, the
# lookup is exact whichever index the planner takes. Matched on `item_id` alone,
# the planner of a table not yet analysed (every new experiment's) took the
# (tenant, experiment, seq) index (dropped since, migration 019) and read every
# result of the experiment for each item: the last pass over 3,000 items read 2.8
# million buffers and took 1.2 s; each batch's lookup grew with the results
# stored, O(n^2) over a run.
RESULT_OF_ITEM = (
    "(select {columns} from experiment_results r where r.tenant_id = i.tenant_id"
    " and r.experiment_id = i.experiment_id and r.seq = i.seq and r.item_id = i.item_id"
    " offset 0) r"
)


def json_object(raw: str | None) -> dict[str, Any]:
    return json.loads(raw) if raw else {}


# --- the experiment and its items ---------------------------------------------------


@dataclass(frozen=True)
class StoredSpec:
    """The task and evals an experiment was stored with."""

    task: TaskSpec
    evals: list[Any]

    @property
    def judges(self) -> dict[str, Any]:
        """The `llm_judge` evals by name."""
        return {eval_name(e): e for e in self.evals if e.kind == "llm_judge"}

    @classmethod
    def from_json(cls, raw: str) -> StoredSpec:
        spec = json.loads(raw)
        return cls(
            task=TaskSpec.model_validate(spec["task"]), evals=_EVALS.validate_python(spec["evals"])
        )


@dataclass(frozen=True)
class ResultCounts:
    completed: int
    failed: int
    evaluated: int


async def tenant_exists(conn: asyncpg.Connection, tenant_id: str) -> bool:
    return bool(await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id))


async def _experiment_column(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    column: Literal["spec", "spec_digest", "workflow_id", "status"],
) -> str | None:
    """One text column of an experiment (None: no such experiment)."""
    found = await conn.fetchval(
        f"select {column} from experiments where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    return None if found is None else str(found)


async def spec_digest(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> str | None:
    """The digest of the spec and dataset an experiment was stored with (None: new)."""
    return await _experiment_column(conn, tenant_id, experiment_id, "spec_digest")


def epoch_item_id(item_id: str, epoch: int, epochs: int) -> str:
    """The experiment item of one epoch of a dataset item: the id itself with one epoch."""
    return item_id if epochs == 1 else f"{item_id}@{epoch}"


async def store_experiment(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    *,
    name: str,
    spec: dict[str, Any],
    digest: str,
    workflow_id: str,
    items: list[DatasetItem],
    epochs: int = 1,
    on_batch: Callable[[int], None] = lambda _start: None,
) -> ResultCounts:
    """The experiment (running again if it existed) and its items, each stored once
    per epoch; returns the results already stored. `on_batch` is told each batch's
    first index."""
    await conn.execute(
        "insert into experiments (tenant_id, experiment_id, name, spec, spec_digest,"
        " workflow_id, total, epochs) values ($1, $2, $3, $4, $5, $6, $7, $8)"
        " on conflict (tenant_id, experiment_id) do update set workflow_id = $6,"
        " status = 'running', stop_requested = false, updated_at = now()",
        tenant_id,
        experiment_id,
        name,
        json.dumps(spec),
        digest,
        workflow_id,
        len(items) * epochs,
        epochs,
    )
    # Epoch by epoch: every item once before any item twice.
    runs = [
        (epoch, index, item) for epoch in range(1, epochs + 1) for index, item in enumerate(items)
    ]
    for start in range(0, len(runs), _INSERT_BATCH):
        on_batch(start)
        batch = runs[start : start + _INSERT_BATCH]
        await conn.execute(
            "insert into experiment_items (tenant_id, experiment_id, item_id, seq, input,"
            " expected, metadata, base_id, epoch) select $1, $2, * from unnest($3::text[],"
            " $4::int[], $5::text[], $6::jsonb[], $7::jsonb[], $8::text[], $9::int[])"
            " on conflict do nothing",
            tenant_id,
            experiment_id,
            [epoch_item_id(i.id, epoch, epochs) for epoch, _, i in batch],
            list(range(start, start + len(batch))),
            [i.input for _, _, i in batch],
            [None if i.expected is None else json.dumps(i.expected) for _, _, i in batch],
            [json.dumps(i.metadata) for _, _, i in batch],
            [i.id for _, _, i in batch],
            [epoch for epoch, _, _ in batch],
        )
    counts = await conn.fetchrow(
        "select count(*) filter (where status = 'ok') as completed,"
        " count(*) filter (where status = 'failed') as failed,"
        " count(*) filter (where status = 'ok' and evaluated) as evaluated"
        " from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    return ResultCounts(counts["completed"], counts["failed"], counts["evaluated"])


async def stored_spec(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> StoredSpec | None:
    raw = await _experiment_column(conn, tenant_id, experiment_id, "spec")
    return None if raw is None else StoredSpec.from_json(raw)


PENDING_ITEMS_SQL = (
    "select i.seq, i.item_id, r.status, r.scores from experiment_items i"
    " left join lateral " + RESULT_OF_ITEM.format(columns="status, scores, evaluated") + " on true"
    " where i.tenant_id = $1 and i.experiment_id = $2 and i.seq > $3"
    " and (r.status is null or (r.status = 'ok' and not r.evaluated))"
    " order by i.seq limit $4"
)


async def pending_items(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, after_seq: int, limit: int
) -> list[PendingItem]:
    """Items after `after_seq` that have no complete result, in dataset order."""
    spec = await stored_spec(conn, tenant_id, experiment_id)
    rows = await conn.fetch(
        PENDING_ITEMS_SQL,
        tenant_id,
        experiment_id,
        after_seq,
        limit,
    )
    judges = list(spec.judges) if spec is not None else []
    items = []
    for r in rows:
        scores = json_object(r["scores"])
        items.append(
            PendingItem(
                seq=r["seq"],
                item_id=r["item_id"],
                needs_task=r["status"] is None,
                missing_evals=[n for n in judges if n not in scores],
            )
        )
    return items


async def set_stop_flag(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, stopped: bool
) -> None:
    await _update_experiment(
        conn,
        tenant_id,
        experiment_id,
        "stop_requested = $3, status = $4, updated_at = now()",
        stopped,
        "stopping" if stopped else "running",
    )


async def record_status(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, status: str
) -> None:
    """The workflow's status on the row, unless the row already holds an end status
    (a late write of a run that ended must not reopen it)."""
    await conn.execute(
        "update experiments set status = $3, updated_at = now()"
        " where tenant_id = $1 and experiment_id = $2"
        " and status not in ('completed', 'incomplete', 'failed')",
        tenant_id,
        experiment_id,
        status,
    )


async def count_retried_call(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    what: Literal["throttled", "call_failures"],
    calls: int = 1,
) -> None:
    """More calls of the experiment that a 429 or a provider failure sent back.

    The total on the experiment and the same count in this second's row of
    `experiment_retry_seconds` (the report's timeline), in one transaction.
    """
    await _update_experiment(conn, tenant_id, experiment_id, f"{what} = {what} + $3", calls)
    await conn.execute(
        f"insert into experiment_retry_seconds (tenant_id, experiment_id, at, {what})"
        " values ($1, $2, date_trunc('second', clock_timestamp()), $3)"
        f" on conflict (tenant_id, experiment_id, at) do update"
        f" set {what} = experiment_retry_seconds.{what} + excluded.{what}",
        tenant_id,
        experiment_id,
        calls,
    )


async def stop_requested(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "select stop_requested from experiments where tenant_id = $1 and experiment_id = $2",
            tenant_id,
            experiment_id,
        )
    )


async def store_summary(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    summary: ExperimentSummary,
    registry_run_id: str,
) -> None:
    """The experiment is finished: its status, summary and registry run."""
    await _update_experiment(
        conn,
        tenant_id,
        experiment_id,
        "status = $3, summary = $4, registry_run_id = $5, completed_at = now(), updated_at = now()",
        summary.status,
        summary.model_dump_json(),
        uuid.UUID(registry_run_id),
    )


async def _update_experiment(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, assignments: str, *values: Any
) -> None:
    """`update experiments set <assignments>` of one experiment; values start at $3."""
    await conn.execute(
        f"update experiments set {assignments} where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
        *values,
    )


async def find_workflow_id(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> str | None:
    """The workflow id recorded for an experiment, if PostgreSQL has the experiment."""
    return await _experiment_column(conn, tenant_id, experiment_id, "workflow_id")


async def list_experiments(conn: asyncpg.Connection, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's experiments, newest first, with how many results each has."""
    rows = await conn.fetch(
        "select e.experiment_id, e.name, e.status, e.total, e.created_at,"
        " e.workflow_id, (select count(*) from experiment_results r"
        " where r.tenant_id = e.tenant_id and r.experiment_id = e.experiment_id)"
        " as results from experiments e where e.tenant_id = $1"
        " order by e.created_at desc",
        tenant_id,
    )
    return [dict(r) for r in rows]
