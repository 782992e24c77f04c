"""Budgets' SQL: an experiment's (`experiments.budget_*`) and a tenant's monthly
(`tenant_budgets`), with the reservations of the calls in flight.

Before a call goes out it **reserves** its estimated cost and tokens: one
`update ... set reserved = reserved + estimate where spent + reserved + estimate
<= max` per budget, the experiment's and (when the tenant has one) the tenant's
for the current month, in one transaction, so the check and the reservation are
one atomic step however many workers call at once. The call's share is also a
row of `budget_holds` with a lease its worker renews while the call runs.
After the call it **settles**: its row deleted and its share taken off the
sums, what the call really used added to `spent`, whether it succeeded, failed,
was refused or cancelled. A worker that dies stops renewing: the next
reservation of the experiment deletes the rows whose lease ran out and gives
their share back, so nothing stays held longer than a lease.

A refused reservation pauses the experiment (`BudgetExhausted`) only when what
is spent leaves no room for the call; when it is the calls in flight that hold
the rest, the call waits for them to settle (`reserve` returns None) instead of
pausing the experiment at a fraction of its budget on their estimates. So a
budget pauses within one call's estimate of itself, and the calls in flight at
the pause can overshoot it by at most what they use beyond their estimates;
what they had reserved is kept (`reserved_at_pause_*`) as that bound.

Locks are taken experiment row first, then the tenant's month row, in every
transaction here, so two of them never wait on each other in a cycle. Functions
take a connection in the caller's `db.tenant_transaction`, except `reserve`, which
owns its transaction (the refusal is kept although `BudgetExhausted` is raised).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from konstruct.experiments.models import BudgetProgress, usd
from konstruct.experiments.store.lookup import experiment_row
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import BudgetExhausted, InvalidInput, NotFound

# The current month (its first day, UTC) on the database clock, which every worker shares.
MONTH = "(date_trunc('month', now() at time zone 'utc'))::date"
# For the item reads of provider calls: the experiment's cache switch, and whether
# any budget applies to its calls (none: they reserve nothing and skip this SQL).
SPEND_COLUMNS = (
    "e.cache, (e.budget_max_usd is not null or e.budget_max_tokens is not null) as own_budget,"
    " exists (select 1 from tenant_budgets tb where tb.tenant_id = e.tenant_id)"
    " as tenant_budget"
)


@dataclass(frozen=True)
class SpendFlags:
    """What an item read says about its experiment's calls."""

    cache: bool = True
    own_budget: bool = False
    tenant_budget: bool = False

    @property
    def reserves(self) -> bool:
        return self.own_budget or self.tenant_budget

    @classmethod
    def from_row(cls, row: Any) -> SpendFlags:
        return cls(
            cache=bool(row["cache"]),
            own_budget=bool(row["own_budget"]),
            tenant_budget=bool(row["tenant_budget"]),
        )


@dataclass(frozen=True)
class Reservation:
    """What one call holds until it settles."""

    tenant_id: str
    experiment_id: str
    usd: float
    tokens: int
    # The tenant budget's month it is held in (None: the tenant has no budget).
    month: dt.date | None
    # Its row in `budget_holds` (0: none, as in a settle of an older reservation).
    hold_id: int = 0


class _Refused(Exception):
    def __init__(self, which: Literal["experiment", "tenant"]) -> None:
        super().__init__(which)
        self.which: Literal["experiment", "tenant"] = which


async def configure(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    *,
    cache: bool,
    max_usd: float | None,
    max_tokens: int | None,
) -> None:
    """The experiment's cache switch and budget, from its input (at every prepare):
    the budget is the input's plus what `resume --raise-budget` added since."""
    await conn.execute(
        "update experiments set cache = $3,"
        " budget_max_usd = case when $4::float8 is null then null"
        " else $4::float8 + budget_raised_usd end,"
        " budget_max_tokens = case when $5::bigint is null then null"
        " else $5::bigint + budget_raised_tokens end"
        " where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
        cache,
        max_usd,
        max_tokens,
    )


# Takes the pool, as a named exception: the refusal is kept on the experiment
# although BudgetExhausted is raised, so the reservation is tried in a savepoint.
async def reserve(
    pool: asyncpg.Pool,
    tenant_id: str,
    experiment_id: str,
    usd_estimate: float,
    token_estimate: int,
    tenant_budget: bool,
    lease_s: float,
) -> Reservation | None:
    """Hold a call's estimate against every budget that applies for `lease_s`
    (renewed with `renew`); None: the calls in flight hold what is left, so try
    again once they settle. Raises `BudgetExhausted` (the reason recorded on the
    experiment) when what is spent leaves no room for the call."""
    async with tenant_transaction(pool, tenant_id) as conn:
        await _release_expired(conn, tenant_id, experiment_id)
        want = Reservation(tenant_id, experiment_id, usd_estimate, token_estimate, None)
        try:
            async with conn.transaction():  # a savepoint: a refusal undoes only this
                return await _hold(conn, want, tenant_budget, lease_s)
        except _Refused as refused:
            if await _room_once_settled(conn, want, refused.which):
                return None
            message = await record_refusal(conn, want, refused.which)
    raise BudgetExhausted(message)


async def _hold(
    conn: asyncpg.Connection, want: Reservation, tenant_budget: bool, lease_s: float
) -> Reservation:
    held = await conn.fetchval(
        "update experiments set reserved_usd = reserved_usd + $3,"
        " reserved_tokens = reserved_tokens + $4"
        " where tenant_id = $1 and experiment_id = $2"
        " and (budget_max_usd is null or spent_usd + reserved_usd + $3 <= budget_max_usd)"
        " and (budget_max_tokens is null"
        " or spent_tokens + reserved_tokens + $4 <= budget_max_tokens)"
        " returning true",
        want.tenant_id,
        want.experiment_id,
        want.usd,
        want.tokens,
    )
    if not held:
        raise _Refused("experiment")
    month = None
    if tenant_budget:
        month = await _reserve_tenant(conn, want.tenant_id, want.usd)
        if month is None:
            raise _Refused("tenant")  # the experiment's reservation rolls back too
    hold_id: int = await conn.fetchval(
        "insert into budget_holds (tenant_id, experiment_id, usd, tokens, month, expires_at)"
        " values ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) returning hold_id",
        want.tenant_id,
        want.experiment_id,
        want.usd,
        want.tokens,
        month,
        lease_s,
    )
    return dataclasses.replace(want, month=month, hold_id=hold_id)


async def _room_once_settled(
    conn: asyncpg.Connection, want: Reservation, which: Literal["experiment", "tenant"]
) -> bool:
    """Whether a refused call (`want`: its estimate) would fit once the calls in flight
    settle: some hold a share, and what is spent leaves room for its estimate."""
    if which == "tenant":
        row = await conn.fetchrow(
            "select spent_usd + $2 <= max_usd and reserved_usd > 0 as room from tenant_budgets"
            f" where tenant_id = $1 and month = {MONTH}",
            want.tenant_id,
            want.usd,
        )
    else:
        row = await conn.fetchrow(
            "select (reserved_usd > 0 or reserved_tokens > 0)"
            " and (budget_max_usd is null or spent_usd + $3 <= budget_max_usd)"
            " and (budget_max_tokens is null or spent_tokens + $4 <= budget_max_tokens) as room"
            " from experiments where tenant_id = $1 and experiment_id = $2",
            want.tenant_id,
            want.experiment_id,
            want.usd,
            want.tokens,
        )
    return row is not None and bool(row["room"])


async def _release_expired(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> None:
    """Give back the shares of the experiment's calls whose lease ran out (their
    worker died mid-call), experiment row locked first."""
    if not await conn.fetchval(
        "select exists (select 1 from budget_holds where tenant_id = $1"
        " and experiment_id = $2 and expires_at < now())",
        tenant_id,
        experiment_id,
    ):
        return
    await _give_back(conn, tenant_id, experiment_id, expired_only=True)


async def _give_back(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, *, expired_only: bool
) -> None:
    """Delete the experiment's holds (those whose lease ran out, or all) and take
    their shares off the sums they were added to, experiment row locked first."""
    await experiment_row(conn, tenant_id, experiment_id, "1", for_update=True)
    holds = await conn.fetch(
        "delete from budget_holds where tenant_id = $1 and experiment_id = $2"
        + (" and expires_at < now()" if expired_only else "")
        + " returning usd, tokens, month",
        tenant_id,
        experiment_id,
    )
    if not holds:
        return
    await conn.execute(
        "update experiments set reserved_usd = greatest(0, reserved_usd - $3),"
        " reserved_tokens = greatest(0, reserved_tokens - $4)"
        " where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
        sum(h["usd"] for h in holds),
        sum(h["tokens"] for h in holds),
    )
    by_month: dict[dt.date, float] = {}
    for h in holds:
        if h["month"] is not None:
            by_month[h["month"]] = by_month.get(h["month"], 0.0) + h["usd"]
    for month, held_usd in sorted(by_month.items()):
        await conn.execute(
            "update tenant_budgets set reserved_usd = greatest(0, reserved_usd - $3),"
            " updated_at = now() where tenant_id = $1 and month = $2",
            tenant_id,
            month,
            held_usd,
        )


async def renew(conn: asyncpg.Connection, hold_ids: list[int], lease_s: float) -> None:
    """Extend the leases of a worker's calls still in flight (of one tenant)."""
    await conn.execute(
        "update budget_holds set expires_at = now() + make_interval(secs => $2)"
        " where hold_id = any($1::bigint[])",
        hold_ids,
        lease_s,
    )


async def _reserve_tenant(
    conn: asyncpg.Connection, tenant_id: str, usd_estimate: float
) -> dt.date | None:
    reserve_month = (
        "update tenant_budgets set reserved_usd = reserved_usd + $2, updated_at = now()"
        f" where tenant_id = $1 and month = {MONTH}"
        " and spent_usd + reserved_usd + $2 <= max_usd returning month"
    )
    month: dt.date | None = await conn.fetchval(reserve_month, tenant_id, usd_estimate)
    if month is not None:
        return month
    await _open_month(conn, tenant_id)
    month = await conn.fetchval(reserve_month, tenant_id, usd_estimate)
    return month


async def _open_month(conn: asyncpg.Connection, tenant_id: str) -> None:
    """A new month: it takes the latest month's max (a concurrent call may create it first)."""
    await conn.execute(
        f"insert into tenant_budgets (tenant_id, month, max_usd) select tenant_id, {MONTH},"
        f" max_usd from tenant_budgets where tenant_id = $1 and month < {MONTH}"
        " order by month desc limit 1 on conflict do nothing",
        tenant_id,
    )


async def month_spent(conn: asyncpg.Connection, tenant_id: str) -> str | None:
    """Why the tenant's monthly budget admits no more messages this month: what it
    spent of what; None when it has room, or no budget."""
    read = (
        "select month, max_usd, spent_usd from tenant_budgets"
        f" where tenant_id = $1 and month = {MONTH}"
    )
    row = await conn.fetchrow(read, tenant_id)
    if row is None:
        await _open_month(conn, tenant_id)
        row = await conn.fetchrow(read, tenant_id)
    if row is None or row["spent_usd"] < row["max_usd"]:
        return None
    return (
        f"tenant {tenant_id!r} has spent ${row['spent_usd']:.6f} of its ${row['max_usd']:g}"
        f" budget for {row['month']:%Y-%m} (`konstruct budgets set {tenant_id} --monthly-usd N`)"
    )


async def count_message_spend(conn: asyncpg.Connection, tenant_id: str, usd: float) -> None:
    """Add what a message's model call cost to the tenant's month (when it has a budget)."""
    if usd <= 0:
        return
    await conn.execute(
        "update tenant_budgets set spent_usd = spent_usd + $2, updated_at = now()"
        f" where tenant_id = $1 and month = {MONTH}",
        tenant_id,
        usd,
    )


def _usd_refused(exp: Any, usd_estimate: float, token_estimate: int) -> bool:
    """Which of the experiment's budgets refused a call: the dollars unless it has
    none, the tokens unless it has none, else the one nearer its end.

    Decided on a fresh read after the refused update, so it must not need the
    refusal to still hold: calls settling in between may have lowered what is
    reserved (the first version tested the dollar condition again and, when a
    settle had made it pass, named a tokens budget the experiment did not have).
    """
    if exp["budget_max_tokens"] is None:
        return True
    if exp["budget_max_usd"] is None:
        return False
    usd_share = (exp["spent_usd"] + exp["reserved_usd"] + usd_estimate) / exp["budget_max_usd"]
    token_share = (exp["spent_tokens"] + exp["reserved_tokens"] + token_estimate) / exp[
        "budget_max_tokens"
    ]
    return bool(usd_share >= token_share)


async def record_refusal(
    conn: asyncpg.Connection, want: Reservation, which: Literal["experiment", "tenant"]
) -> str:
    """Why the reservation `want` was refused, in words, kept on the experiment as its
    `paused_reason` with what the calls in flight hold (the overshoot bound)."""
    tenant_id, experiment_id = want.tenant_id, want.experiment_id
    exp = await experiment_row(
        conn,
        tenant_id,
        experiment_id,
        "budget_max_usd, budget_max_tokens, spent_usd, spent_tokens, reserved_usd, reserved_tokens",
        for_update=True,
    )
    if which == "tenant":
        month = await conn.fetchrow(
            "select month, max_usd, spent_usd, reserved_usd from tenant_budgets"
            f" where tenant_id = $1 and month = {MONTH}",
            tenant_id,
        )
        if month is None:
            reason = f"tenant {tenant_id!r} has no monthly budget for this month"
        else:
            reason = (
                f"tenant {tenant_id!r}'s monthly budget for {month['month']:%Y-%m} is spent:"
                f" {usd(month['spent_usd'])} of {usd(month['max_usd'])}, with"
                f" {usd(month['reserved_usd'])} reserved by calls in flight; raise it with"
                f" `konstruct budgets set {tenant_id} --monthly-usd N`, then"
                f" `konstruct experiments resume {experiment_id} --tenant {tenant_id}`"
            )
    elif _usd_refused(exp, want.usd, want.tokens):
        reason = (
            f"experiment {experiment_id!r} has spent {usd(exp['spent_usd'])} of its"
            f" {usd(exp['budget_max_usd'])} budget, with {usd(exp['reserved_usd'])} reserved"
            f" by calls in flight; raise it with `konstruct experiments resume"
            f" {experiment_id} --tenant {tenant_id} --raise-budget USD`"
        )
    else:
        reason = (
            f"experiment {experiment_id!r} has used {exp['spent_tokens']} of its"
            f" {exp['budget_max_tokens']} tokens budget, with {exp['reserved_tokens']}"
            " reserved by calls in flight; raise it with `konstruct experiments resume"
            f" {experiment_id} --tenant {tenant_id} --raise-tokens N`"
        )
    await conn.execute(
        "update experiments set paused_reason = coalesce(paused_reason, $3),"
        " reserved_at_pause_usd = greatest(coalesce(reserved_at_pause_usd, 0), reserved_usd),"
        " reserved_at_pause_tokens ="
        " greatest(coalesce(reserved_at_pause_tokens, 0), reserved_tokens),"
        " updated_at = now() where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
        f"budget: {reason}",
    )
    return reason


async def settle(
    conn: asyncpg.Connection, held: Reservation, used_usd: float, used_tokens: int
) -> None:
    """Release a call's reservation and add what it used (0, 0: it made no answer).
    A hold already given back (its lease ran out) is not taken off twice."""
    await experiment_row(conn, held.tenant_id, held.experiment_id, "1", for_update=True)
    gone = await conn.fetchrow(
        "with gone as (delete from budget_holds where hold_id = $3 returning usd, tokens, month)"
        " update experiments set"
        " reserved_usd = greatest(0, reserved_usd - coalesce((select usd from gone), 0)),"
        " reserved_tokens = greatest(0, reserved_tokens - coalesce((select tokens from gone), 0)),"
        " spent_usd = spent_usd + $4, spent_tokens = spent_tokens + $5"
        " where tenant_id = $1 and experiment_id = $2"
        " returning (select usd from gone) as usd, (select month from gone) as month",
        held.tenant_id,
        held.experiment_id,
        held.hold_id,
        used_usd,
        used_tokens,
    )
    if held.month is not None:
        await conn.execute(
            "update tenant_budgets set reserved_usd = greatest(0, reserved_usd - $3),"
            " spent_usd = spent_usd + $4, updated_at = now()"
            " where tenant_id = $1 and month = $2",
            held.tenant_id,
            held.month,
            gone["usd"] if gone is not None and gone["month"] is not None else 0.0,
            used_usd,
        )


async def release_all(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, *, clear_pause: bool
) -> None:
    """No call of the experiment is in flight (it resumes, or it has finished): what
    is still held was left by calls whose worker died; give it back, and with
    `clear_pause` forget the budget pause."""
    await _give_back(conn, tenant_id, experiment_id, expired_only=False)
    # Held before holds had rows (a database migrated mid-run): this month's share.
    left = await conn.fetchval(
        "select reserved_usd from experiments where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    if left:
        await conn.execute(
            "update tenant_budgets set reserved_usd = greatest(0, reserved_usd - $2)"
            f" where tenant_id = $1 and month = {MONTH}",
            tenant_id,
            left,
        )
    pause = (
        ", paused_reason = null, reserved_at_pause_usd = null, reserved_at_pause_tokens = null"
        if clear_pause
        else ""
    )
    await conn.execute(
        f"update experiments set reserved_usd = 0, reserved_tokens = 0{pause}"
        " where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )


async def mark_paused(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> None:
    """A stop the experiment made itself for a spent budget shows as `paused`."""
    await conn.execute(
        "update experiments set status = 'paused'"
        " where tenant_id = $1 and experiment_id = $2 and paused_reason is not null",
        tenant_id,
        experiment_id,
    )


async def status(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> BudgetProgress | None:
    """The experiment's budget and its tenant's this month (None: neither has one)."""
    row = await conn.fetchrow(
        "select e.budget_max_usd, e.budget_max_tokens, e.spent_usd, e.spent_tokens,"
        " e.reserved_usd, e.reserved_tokens, tb.month, tb.max_usd, tb.spent_usd as t_spent,"
        f" tb.reserved_usd as t_reserved, {MONTH} as this_month from experiments e"
        " left join lateral (select * from tenant_budgets t where t.tenant_id = e.tenant_id"
        f" and t.month <= {MONTH} order by t.month desc limit 1) tb on true"
        " where e.tenant_id = $1 and e.experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    if row is None:
        return None
    if row["budget_max_usd"] is None and row["budget_max_tokens"] is None and row["month"] is None:
        return None
    current = row["month"] is not None and row["month"] == row["this_month"]
    return BudgetProgress(
        max_usd=row["budget_max_usd"],
        max_tokens=row["budget_max_tokens"],
        spent_usd=round(row["spent_usd"], 9),
        spent_tokens=row["spent_tokens"],
        reserved_usd=round(row["reserved_usd"], 9),
        reserved_tokens=row["reserved_tokens"],
        tenant_month=None if row["month"] is None else f"{row['this_month']:%Y-%m}",
        tenant_max_usd=row["max_usd"],
        tenant_spent_usd=round(row["t_spent"], 9) if current else 0.0,
        tenant_reserved_usd=round(row["t_reserved"], 9) if current else 0.0,
    )


async def raise_budget(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    *,
    usd_more: float = 0.0,
    tokens_more: int = 0,
) -> dict[str, Any]:
    """Raise the experiment's budget (kept apart too, so a restart keeps the raise);
    returns its budget now."""
    row = await experiment_row(
        conn, tenant_id, experiment_id, "budget_max_usd, budget_max_tokens", for_update=True
    )
    for more, column, what in (
        (usd_more, "budget_max_usd", "--raise-budget: budget.max_usd"),
        (tokens_more, "budget_max_tokens", "--raise-tokens: budget.max_tokens"),
    ):
        if more and row[column] is None:
            raise InvalidInput(
                f"{what}: experiment {experiment_id!r} has no such budget of its own; a"
                f" tenant's monthly budget is raised with `konstruct budgets set {tenant_id}"
                " --monthly-usd N`"
            )
    raised = await conn.fetchrow(
        "update experiments set budget_max_usd = budget_max_usd + $3,"
        " budget_raised_usd = budget_raised_usd + $3,"
        " budget_max_tokens = budget_max_tokens + $4,"
        " budget_raised_tokens = budget_raised_tokens + $4, updated_at = now()"
        " where tenant_id = $1 and experiment_id = $2"
        " returning budget_max_usd, budget_max_tokens, spent_usd, spent_tokens",
        tenant_id,
        experiment_id,
        usd_more,
        tokens_more,
    )
    return dict(raised)


async def set_monthly(conn: asyncpg.Connection, tenant_id: str, max_usd: float) -> dict[str, Any]:
    """Set the tenant's monthly budget from this month on. A month's first budget
    counts what the tenant's experiment calls already cost that month."""
    if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
        raise NotFound(
            f"tenant {tenant_id!r} does not exist; create it with"
            f" `konstruct agents put {tenant_id} AGENT ...`"
        )
    row = await conn.fetchrow(
        "insert into tenant_budgets (tenant_id, month, max_usd, spent_usd)"
        f" values ($1, {MONTH}, $2, (select coalesce(sum(coalesce(r.cost_usd, 0)"
        " + r.judge_cost_usd), 0) from experiment_results r where r.tenant_id = $1"
        f" and r.created_at >= {MONTH}::timestamp at time zone 'utc'))"
        " on conflict (tenant_id, month) do update set max_usd = excluded.max_usd,"
        " updated_at = now() returning month, max_usd, spent_usd, reserved_usd",
        tenant_id,
        max_usd,
    )
    return _month_json(row)


def _month_json(row: Any) -> dict[str, Any]:
    return {
        "month": f"{row['month']:%Y-%m}",
        "max_usd": row["max_usd"],
        "spent_usd": round(row["spent_usd"], 9),
        "reserved_usd": round(row["reserved_usd"], 9),
        "left_usd": round(max(0.0, row["max_usd"] - row["spent_usd"] - row["reserved_usd"]), 9),
    }


async def tenant_budget(conn: asyncpg.Connection, tenant_id: str) -> dict[str, Any]:
    """The tenant's monthly budget: this month's figures, the months before, and
    the experiments paused for a spent budget."""
    if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
        raise NotFound(f"tenant {tenant_id!r} does not exist")
    rows = await conn.fetch(
        "select month, max_usd, spent_usd, reserved_usd from tenant_budgets"
        " where tenant_id = $1 order by month desc limit 12",
        tenant_id,
    )
    this_month = await conn.fetchval(f"select {MONTH}")
    paused = await conn.fetch(
        "select experiment_id, paused_reason from experiments"
        " where tenant_id = $1 and paused_reason is not null order by experiment_id",
        tenant_id,
    )
    months = [_month_json(r) for r in rows]
    current: dict[str, Any] | None = None
    if rows:
        latest = rows[0]
        if latest["month"] == this_month:
            current = months[0]
        else:  # not used yet this month: the latest month's max applies, nothing spent
            current = _month_json(
                {
                    "month": this_month,
                    "max_usd": latest["max_usd"],
                    "spent_usd": 0.0,
                    "reserved_usd": 0.0,
                }
            )
    return {
        "tenant_id": tenant_id,
        "month": current,
        "history": months,
        "paused": [
            {"experiment_id": r["experiment_id"], "reason": r["paused_reason"]} for r in paused
        ],
    }
