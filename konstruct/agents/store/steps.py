"""The agent loop's state in PostgreSQL: the inbound message, each model step, each
tool call and its result, and a thread's rolling summary.

The workflow keeps only ids; every step reads the transcript back from here. Each
function takes a connection in a transaction the caller scoped to the tenant.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass
from typing import Any

import asyncpg

from konstruct.agents.models import HandleMessageInput
from konstruct.platform.rows import fetch_all, fetch_one, row_count
from konstruct.providers.models import ChatTurn

TERMINAL = ("ok", "error", "rejected", "timed_out")


@dataclass(frozen=True)
class Inbound:
    message_id: str
    thread_id: str
    agent_id: str
    channel: str
    sender: str
    text: str

    @classmethod
    def of(cls, message: HandleMessageInput) -> Inbound:
        return cls(
            message.message_id,
            message.thread_id,
            message.agent_id,
            message.channel,
            message.sender,
            message.text,
        )

    def values(self) -> tuple[str, ...]:
        """The fields in the order of the message tables' columns (`message_id` ... `user_text`)."""
        return astuple(self)

    def message(self, tenant_id: str) -> HandleMessageInput:
        return HandleMessageInput(
            message_id=self.message_id,
            tenant_id=tenant_id,
            agent_id=self.agent_id,
            thread_id=self.thread_id,
            channel=self.channel,
            sender=self.sender,
            text=self.text,
        )


@dataclass(frozen=True)
class StoredStep:
    step: int
    assistant: dict[str, Any]
    model_group: str
    model: str
    usage: dict[str, int]


@dataclass(frozen=True)
class StoredCall:
    call_id: str
    step: int
    tool: str
    arguments: dict[str, Any]
    status: str
    result: str | None
    attempts: int


@dataclass(frozen=True)
class Memory:
    summary: str
    turns: list[ChatTurn]


def estimate_tokens(text: str) -> int:
    """About four characters a token: close enough to budget a prompt."""
    return len(text) // 4 + 1


async def record_inbound(
    conn: asyncpg.Connection, message: HandleMessageInput, workflow_id: str
) -> bool:
    """Record the message once; True when this call recorded it (a new message)."""
    status = await conn.execute(
        "insert into inbound_messages (tenant_id, message_id, thread_id, agent_id, channel,"
        " sender, user_text, workflow_id) values ($1, $2, $3, $4, $5, $6, $7, $8)"
        " on conflict do nothing",
        message.tenant_id,
        *Inbound.of(message).values(),
        workflow_id,
    )
    return row_count(status) == 1


async def inbound(conn: asyncpg.Connection, tenant_id: str, message_id: str) -> Inbound | None:
    return await fetch_one(
        conn,
        Inbound,
        "select message_id, thread_id, agent_id, channel, sender, user_text"
        " from inbound_messages where tenant_id = $1 and message_id = $2",
        tenant_id,
        message_id,
        columns={"text": "user_text"},
    )


async def steps(conn: asyncpg.Connection, tenant_id: str, message_id: str) -> list[StoredStep]:
    return await fetch_all(
        conn,
        StoredStep,
        "select step, assistant, model_group, model, usage from agent_steps"
        " where tenant_id = $1 and message_id = $2 order by step",
        tenant_id,
        message_id,
        docs=("assistant", "usage"),
    )


_CALL = "select call_id, step, tool, arguments, status, result, attempts from tool_calls"


async def calls(conn: asyncpg.Connection, tenant_id: str, message_id: str) -> list[StoredCall]:
    return await fetch_all(
        conn,
        StoredCall,
        _CALL + " where tenant_id = $1 and message_id = $2 order by step, position",
        tenant_id,
        message_id,
        docs=("arguments",),
    )


async def call(
    conn: asyncpg.Connection, tenant_id: str, message_id: str, call_id: str
) -> StoredCall | None:
    return await fetch_one(
        conn,
        StoredCall,
        _CALL + " where tenant_id = $1 and message_id = $2 and call_id = $3",
        tenant_id,
        message_id,
        call_id,
        docs=("arguments",),
    )


@dataclass(frozen=True)
class NewCall:
    call_id: str
    tool: str
    arguments: dict[str, Any]
    status: str  # pending, awaiting_approval, or error (with `result` saying why)
    result: str | None = None

    def stored(self, step: int) -> StoredCall:
        return StoredCall(
            self.call_id, step, self.tool, self.arguments, self.status, self.result, 0
        )


async def record_step(
    conn: asyncpg.Connection,
    tenant_id: str,
    message_id: str,
    step: StoredStep,
    new_calls: list[NewCall],
    workflow_id: str,
) -> bool:
    """Store a step and its tool calls once; False when another attempt stored it first."""
    status = await conn.execute(
        "insert into agent_steps (tenant_id, message_id, step, assistant, model_group, model,"
        " usage) values ($1, $2, $3, $4, $5, $6, $7) on conflict do nothing",
        tenant_id,
        message_id,
        step.step,
        json.dumps(step.assistant),
        step.model_group,
        step.model,
        json.dumps(step.usage),
    )
    if row_count(status) != 1:
        return False
    if not new_calls:
        return True
    await conn.executemany(
        "insert into tool_calls (tenant_id, message_id, call_id, step, position, tool, arguments,"
        " status, result, workflow_id, finished_at)"
        " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
        " case when $8 = 'error' then now() end)",
        [
            (
                tenant_id,
                message_id,
                c.call_id,
                step.step,
                position,
                c.tool,
                json.dumps(c.arguments),
                c.status,
                c.result,
                workflow_id,
            )
            for position, c in enumerate(new_calls)
        ],
    )
    return True


async def start_attempt(
    conn: asyncpg.Connection, tenant_id: str, message_id: str, call_id: str, approved_by: str
) -> None:
    await conn.execute(
        "update tool_calls set attempts = attempts + 1, status = 'pending',"
        " decided_by = coalesce(nullif($4, ''), decided_by)"
        " where tenant_id = $1 and message_id = $2 and call_id = $3",
        tenant_id,
        message_id,
        call_id,
        approved_by,
    )


async def finish_call(
    conn: asyncpg.Connection,
    tenant_id: str,
    message_id: str,
    call_id: str,
    status: str,
    result: str,
    decided_by: str = "",
) -> StoredCall:
    """Record a call's outcome once: the first outcome stored stays."""
    await conn.execute(
        "update tool_calls set status = $4, result = $5,"
        " decided_by = coalesce(nullif($6, ''), decided_by),"
        " finished_at = now()"
        " where tenant_id = $1 and message_id = $2 and call_id = $3"
        " and status not in ('ok', 'error', 'rejected', 'timed_out')",
        tenant_id,
        message_id,
        call_id,
        status,
        result,
        decided_by,
    )
    stored = await call(conn, tenant_id, message_id, call_id)
    assert stored is not None
    return stored


async def awaiting(conn: asyncpg.Connection, tenant_id: str) -> list[asyncpg.Record]:
    """The tenant's tool calls waiting for a person, oldest first."""
    return await conn.fetch(
        "select c.call_id, c.tool, c.arguments, c.workflow_id, c.message_id, c.created_at,"
        " m.agent_id, m.thread_id from tool_calls c"
        " join inbound_messages m using (tenant_id, message_id)"
        " where c.tenant_id = $1 and c.status = 'awaiting_approval' order by c.created_at",
        tenant_id,
    )


# --- thread memory -------------------------------------------------------------


async def _summary_row(conn: asyncpg.Connection, tenant_id: str, thread_id: str) -> tuple[str, int]:
    row = await conn.fetchrow(
        "select summary, through_seq from thread_summaries where tenant_id = $1 and thread_id = $2",
        tenant_id,
        thread_id,
    )
    return (row["summary"], row["through_seq"]) if row is not None else ("", 0)


async def memory(
    conn: asyncpg.Connection,
    tenant_id: str,
    thread_id: str,
    message_id: str,
    history_turns: int,
    memory_tokens: int,
) -> Memory:
    """The rolling summary and the newest turns after it that fit in `memory_tokens`."""
    # One round trip: the summary, and the newest turns after it.
    rows = await conn.fetch(
        "with s as (select coalesce((select summary from thread_summaries"
        "   where tenant_id = $1 and thread_id = $2), '') as summary,"
        "  coalesce((select through_seq from thread_summaries"
        "   where tenant_id = $1 and thread_id = $2), 0) as through)"
        " select s.summary, t.user_text, t.reply_text from s left join lateral"
        " (select user_text, reply_text, seq from message_turns"
        "   where tenant_id = $1 and thread_id = $2 and seq > s.through and message_id <> $3"
        "   order by seq desc limit $4) t on true order by t.seq desc",
        tenant_id,
        thread_id,
        message_id,
        history_turns,
    )
    summary = rows[0]["summary"] if rows else ""
    rows = [row for row in rows if row["user_text"] is not None]
    kept: list[asyncpg.Record] = []
    used = 0
    for row in rows:
        cost = estimate_tokens(row["user_text"]) + estimate_tokens(row["reply_text"])
        if used + cost > memory_tokens:
            break
        kept.append(row)
        used += cost
    turns: list[ChatTurn] = []
    for row in reversed(kept):
        turns.append(ChatTurn(role="user", content=row["user_text"]))
        turns.append(ChatTurn(role="assistant", content=row["reply_text"]))
    return Memory(summary, turns)


async def summary_due(
    conn: asyncpg.Connection, tenant_id: str, thread_id: str, memory_tokens: int
) -> bool:
    """The thread's turns after its summary are more than its memory budget."""
    chars = await conn.fetchval(
        "select coalesce(sum(length(user_text) + length(reply_text)), 0) from message_turns"
        " where tenant_id = $1 and thread_id = $2 and seq > coalesce((select through_seq"
        " from thread_summaries where tenant_id = $1 and thread_id = $2), 0)",
        tenant_id,
        thread_id,
    )
    return int(chars) // 4 > memory_tokens


async def turns_to_fold(
    conn: asyncpg.Connection, tenant_id: str, thread_id: str, keep: int
) -> tuple[str, list[asyncpg.Record]]:
    """The summary so far, and the turns after it except the newest `keep`."""
    summary, through = await _summary_row(conn, tenant_id, thread_id)
    rows = await conn.fetch(
        "select seq, user_text, reply_text from message_turns"
        " where tenant_id = $1 and thread_id = $2 and seq > $3 order by seq",
        tenant_id,
        thread_id,
        through,
    )
    return summary, list(rows[: max(0, len(rows) - keep)])


async def save_summary(
    conn: asyncpg.Connection,
    tenant_id: str,
    thread_id: str,
    summary: str,
    through_seq: int,
    turns: int,
) -> None:
    """Keep the newer summary: a summary of fewer turns never replaces a later one."""
    await conn.execute(
        "insert into thread_summaries (tenant_id, thread_id, summary, through_seq, turns)"
        " values ($1, $2, $3, $4, $5) on conflict (tenant_id, thread_id) do update"
        " set summary = excluded.summary, through_seq = excluded.through_seq,"
        " turns = thread_summaries.turns + excluded.turns, updated_at = now()"
        " where thread_summaries.through_seq < excluded.through_seq",
        tenant_id,
        thread_id,
        summary,
        through_seq,
        turns,
    )
