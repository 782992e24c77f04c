"""Per-key request and token limits: a token bucket per key in PostgreSQL.

Every gateway process admits a key's requests through the same row (`key_buckets`,
migration 015), so the limits hold however many gateways serve. A bucket holds up
to a minute's allowance (`rpm` requests, `tpm` tokens) and refills continuously on
the database's clock. A request needs one request and some tokens left; its tokens
are taken once its answer says how many it used. Functions take a connection in a
transaction the caller scoped to the key's tenant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import asyncpg

_INF = float("inf")


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits per minute (None: no limit)."""

    rpm: int | None = None
    tpm: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True)
class Admission:
    """Whether a request may go, what is left after it, and when to come back."""

    admitted: bool
    limits: KeyLimits
    requests_left: float
    tokens_left: float
    # Seconds until a refused request could go (0 when admitted).
    retry_after_s: float
    # Which limit refused it: "requests" or "tokens" (None when admitted).
    refused_by: str | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers (and `Retry-After` when refused)."""
        headers: dict[str, str] = {}
        for kind, limit, left in (
            ("requests", self.limits.rpm, self.requests_left),
            ("tokens", self.limits.tpm, self.tokens_left),
        ):
            if limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(left)))
            full_in = max(0.0, (limit - left) * 60.0 / limit)
            headers[f"x-ratelimit-reset-{kind}"] = f"{full_in:.3g}s"
        if not self.admitted:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def _cap(limit: int | None) -> float:
    return _INF if limit is None else float(limit)


async def admit(
    conn: asyncpg.Connection, tenant_id: str, key_id: str, limits: KeyLimits
) -> Admission:
    """Refill the key's bucket to now and take one request from it if one is left
    and the tokens are not spent; otherwise take nothing and say when to retry."""
    rpm, tpm = _cap(limits.rpm), _cap(limits.tpm)
    row = await conn.fetchrow(
        "insert into key_buckets as b (tenant_id, key_id, requests_left, tokens_left, updated_at)"
        " values ($1, $2, $3, $4, clock_timestamp())"
        " on conflict (key_id) do update set"
        "  requests_left = least($3, b.requests_left"
        "   + extract(epoch from clock_timestamp() - b.updated_at)::float8 * $3 / 60.0),"
        "  tokens_left = least($4, b.tokens_left"
        "   + extract(epoch from clock_timestamp() - b.updated_at)::float8 * $4 / 60.0),"
        "  updated_at = clock_timestamp()"
        " returning requests_left, tokens_left",
        tenant_id,
        key_id,
        rpm,
        tpm,
    )
    requests_left, tokens_left = float(row["requests_left"]), float(row["tokens_left"])
    if requests_left < 1.0:
        wait = (1.0 - requests_left) * 60.0 / rpm
        return Admission(False, limits, requests_left, tokens_left, wait, "requests")
    if tokens_left <= 0.0:
        wait = (1.0 - tokens_left) * 60.0 / tpm
        return Admission(False, limits, requests_left, tokens_left, wait, "tokens")
    await conn.execute(
        "update key_buckets set requests_left = requests_left - 1 where key_id = $1", key_id
    )
    return Admission(True, limits, requests_left - 1.0, tokens_left, 0.0)


async def spend_tokens(conn: asyncpg.Connection, key_id: str, tokens: int) -> None:
    """Take what an answer used from the key's token allowance."""
    await conn.execute(
        "update key_buckets set tokens_left = tokens_left - $2 where key_id = $1", key_id, tokens
    )


async def set_limits(
    conn: asyncpg.Connection, tenant_id: str, key_id: str, limits: KeyLimits
) -> bool:
    """Set (or, with None, lift) a key's limits; False when the tenant has no such key.
    Its bucket starts full again at the new limits."""
    status = await conn.execute(
        "update api_keys set rpm = $3, tpm = $4 where tenant_id = $1 and key_id = $2",
        tenant_id,
        key_id,
        limits.rpm,
        limits.tpm,
    )
    await conn.execute("delete from key_buckets where key_id = $1", key_id)
    return status.endswith(" 1")
