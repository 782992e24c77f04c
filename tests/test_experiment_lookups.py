"""An item's row and its result are read by their own keys, whatever the planner
knows of the tables.

On tables never analysed (a new install's first experiments, every bench), a
lookup by `item_id` alone tied with the other indexes of the table, and the
planner took the smaller: it read every row of the experiment for each item. The
last pending page of 3,000 items read 2.8 million buffers in 1.2 s, each batch's
lookup grew with the experiment, and the summary's join was O(n^2).

The queries run here against copies of the tables made just now (the same
columns, keys, indexes and reference, never analysed) and count the buffers they
touch.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.experiments.store.experiments import PENDING_ITEMS_SQL
from konstruct.experiments.store.results import BY_SEQS, TASK_CALLS_SQL
from konstruct.experiments.store.summaries import EVAL_ENTRIES_SQL, ROWS_SQL

ITEMS = 3000
TABLES = ("experiments", "experiment_items", "experiment_results")


@pytest.fixture
async def fresh(postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose experiment tables are new copies holding one experiment
    of `ITEMS` items, each with an `ok` result scored by `exact_match`."""
    conn = await asyncpg.connect(postgres.owner_url)
    schema = f"fresh_{uuid.uuid4().hex[:8]}"
    try:
        await conn.execute(f"create schema {schema}")
        for table in TABLES:
            await conn.execute(f"create table {schema}.{table} (like public.{table} including all)")
        # The result's reference to its item, as the schema has it (LIKE copies none).
        reference = await conn.fetchval(
            "select pg_get_constraintdef(oid) from pg_constraint"
            " where conrelid = 'public.experiment_results'::regclass and contype = 'f'"
        )
        await conn.execute(f"set search_path = {schema}, public")
        await conn.execute(f"alter table experiment_results add constraint item_ref {reference}")
        await conn.execute(
            "insert into experiments (tenant_id, experiment_id, name, spec, spec_digest,"
            " workflow_id, total, epochs) values ('t', 'e', 'e', '{}', 'd', 'w', $1, 1)",
            ITEMS,
        )
        ids = [f"item-{n:05d}" for n in range(ITEMS)]
        await conn.execute(
            "insert into experiment_items (tenant_id, experiment_id, item_id, seq, input,"
            " metadata, base_id, epoch) select 't', 'e', id, seq, 'q', '{}', id, 1"
            " from unnest($1::text[], $2::int[]) as u(id, seq)",
            ids,
            list(range(ITEMS)),
        )
        scores = json.dumps({"exact_match": {"score": 1.0, "passed": True}})
        await conn.execute(
            "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
            " scores, evaluated) select 't', 'e', id, seq, 'ok', $3::jsonb, true"
            " from unnest($1::text[], $2::int[]) as u(id, seq)",
            ids,
            list(range(ITEMS)),
            scores,
        )
        yield conn
    finally:
        await conn.execute(f"drop schema if exists {schema} cascade")
        await conn.close()


async def buffers(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """Shared buffers the query touched (hit or read), from its plan as run."""
    raw = await conn.fetchval("explain (analyze, buffers, format json) " + sql, *args)
    plan = json.loads(raw)[0]["Plan"]
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def test_the_last_pending_page_reads_each_item_once(fresh: asyncpg.Connection) -> None:
    # Every item has its result: the pass that finds none pending reads each item
    # and its result by key, a few buffers each (2.8 million before, 935 per item).
    touched = await buffers(fresh, PENDING_ITEMS_SQL, "t", "e", -1, 500)
    assert touched < 5 * ITEMS, touched


async def test_a_batch_reads_only_its_own_items(fresh: asyncpg.Connection) -> None:
    seqs = [2999, 2998, 2997, 2996, 2995, 2994]
    ids = [f"item-{n:05d}" for n in seqs]
    touched = await buffers(fresh, TASK_CALLS_SQL + BY_SEQS, "t", "e", ids, "q", "p", seqs)
    # Six items and their results: tens of buffers, not the experiment's thousands.
    assert touched < 100, touched


async def test_the_summary_joins_each_result_to_its_item_by_key(
    fresh: asyncpg.Connection,
) -> None:
    touched = await buffers(fresh, EVAL_ENTRIES_SQL, "t", "e", "exact_match")
    assert touched < 5 * ITEMS, touched


async def test_the_report_joins_each_item_to_its_result_by_key(fresh: asyncpg.Connection) -> None:
    touched = await buffers(fresh, ROWS_SQL, "t", "e")
    assert touched < 5 * ITEMS, touched


async def test_each_results_reference_to_its_item_is_checked_by_key(
    fresh: asyncpg.Connection,
) -> None:
    # Inserting the 3,000 results checked each one's item: one index entry read
    # each (through item_id alone the check read the experiment's items: 0.23 ms an
    # insert, 4.5 million entries for these).
    await fresh.execute("select pg_stat_force_next_flush()")
    read = await fresh.fetchval(
        "select (select coalesce(sum(idx_tup_read), 0) from pg_stat_user_indexes"
        " where relid = 'experiment_items'::regclass)"
        " + (select coalesce(seq_tup_read, 0) from pg_stat_user_tables"
        " where relid = 'experiment_items'::regclass)"
    )
    assert read <= 2 * ITEMS, read
