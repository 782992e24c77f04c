"""What the provider-call activities pay: prices, the output cache, budgets.

Shared by the single-item path (`activities.provider_calls`) and the batched one
(`activities.provider_batches`): a call's price (`konstruct.providers.pricing`), its
cache key, and its budget reservation (`konstruct.experiments.store.budgets`): reserved
before the call, settled with the real usage after.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import asyncpg
from temporalio import activity

from konstruct.experiments.models import TaskSpec
from konstruct.experiments.store import budgets
from konstruct.experiments.store.budgets import Reservation, SpendFlags
from konstruct.experiments.store.cache import CacheEntry, CallKind, cache_key
from konstruct.platform.db import tenant_transaction
from konstruct.providers.adapter import Completion
from konstruct.providers.pricing import Price, cost_usd, price_of
from konstruct.providers.router import Deployment


def task_key(deployment_id: str, task: TaskSpec, messages: list[dict[str, str]], epoch: int) -> str:
    return cache_key(
        "task",
        deployment_id,
        messages,
        task.temperature,
        task.max_tokens,
        epoch,
        task.response_format,  # a structured answer is another answer
    )


def judge_key(deployment_id: str, messages: list[dict[str, str]], epoch: int) -> str:
    # Judge calls go out without temperature or max_tokens (`ProviderCallActivities._call`).
    return cache_key("judge", deployment_id, messages, None, None, epoch)


def cached_completion(hit: CacheEntry) -> Completion:
    """A cache entry as the completion its call answered."""
    return Completion(
        content=hit.output,
        model=hit.model or "",
        deployment_id=hit.deployment_id,
        prompt_tokens=hit.prompt_tokens,
        completion_tokens=hit.completion_tokens,
        total_tokens=hit.prompt_tokens + hit.completion_tokens,
    )


def new_entry(
    kind: CallKind, key: str, deployment_id: str, completion: Completion, cost: float | None
) -> CacheEntry:
    """What a successful call leaves in the cache."""
    return CacheEntry(
        key=key,
        kind=kind,
        deployment_id=deployment_id,
        output=completion.content,
        model=completion.model or None,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        cost_usd=cost,
    )


_log = logging.getLogger(__name__)
# A call whose budget's rest is held by calls in flight asks again this often.
_BUSY_RETRY_S = 0.1


class CallSpend:
    """One worker's prices (per deployment, read once) and budget bookkeeping."""

    def __init__(
        self, pool: asyncpg.Pool, deployments: dict[str, Deployment], lease_s: float = 10.0
    ) -> None:
        self.pool = pool
        self.prices: dict[str, Price | None] = {
            deployment_id: price_of(d) for deployment_id, d in deployments.items()
        }
        self.lease_s = lease_s
        # The holds of this worker's calls in flight, renewed while any is.
        self._held: dict[int, Reservation] = {}
        self._renewing: asyncio.Task[None] | None = None

    def cost(
        self, deployment_id: str, prompt_tokens: float, completion_tokens: float
    ) -> float | None:
        """What a call to the deployment costs (None: its price is unknown)."""
        price = self.prices.get(deployment_id)
        return None if price is None else cost_usd(price, prompt_tokens, completion_tokens)

    def cost_of(self, deployment_id: str, completion: Completion) -> float | None:
        return self.cost(deployment_id, completion.prompt_tokens, completion.completion_tokens)

    async def reserve(
        self,
        experiment: tuple[str, str],
        flags: SpendFlags | None,
        deployment_id: str,
        prompt_estimate: int,
        completion_estimate: int,
    ) -> Reservation | None:
        """Hold the call's estimated cost and tokens against the budgets that apply
        (None: no budget applies); raises `BudgetExhausted` when one is spent."""
        if flags is None or not flags.reserves:
            return None
        tenant_id, experiment_id = experiment
        estimate = self.cost(deployment_id, prompt_estimate, completion_estimate) or 0.0
        while True:
            held = await budgets.reserve(
                self.pool,
                tenant_id,
                experiment_id,
                estimate,
                prompt_estimate + completion_estimate,
                flags.tenant_budget,
                self.lease_s,
            )
            if held is not None:
                self._keep(held)
                return held
            # The calls in flight hold what is left: wait for them to settle.
            activity.heartbeat()
            await asyncio.sleep(_BUSY_RETRY_S)

    def _keep(self, held: Reservation) -> None:
        self._held[held.hold_id] = held
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        """Extend the leases of this worker's holds until none is left."""
        while self._held:
            await asyncio.sleep(self.lease_s / 3)
            by_tenant: defaultdict[str, list[int]] = defaultdict(list)
            for hold_id, held in list(self._held.items()):
                by_tenant[held.tenant_id].append(hold_id)
            for tenant_id, hold_ids in by_tenant.items():
                try:
                    async with tenant_transaction(self.pool, tenant_id) as conn:
                        await budgets.renew(conn, hold_ids, self.lease_s)
                except (asyncpg.PostgresError, OSError) as exc:
                    _log.warning("budget holds of %s not renewed: %s", tenant_id, exc)

    async def settle(
        self, held: Reservation | None, deployment_id: str, completion: Completion | None
    ) -> None:
        """Release the reservation and add what the call used (nothing: no answer),
        shielded: a call cancelled while it settles still settles.

        Never raises: a settle that fails leaves the reservation held until its
        lease runs out (it is no longer renewed), the budget only tighter meanwhile."""
        if held is None:
            return
        self._held.pop(held.hold_id, None)
        used_usd, used_tokens = 0.0, 0
        if completion is not None:
            used_usd = self.cost_of(deployment_id, completion) or 0.0
            used_tokens = completion.prompt_tokens + completion.completion_tokens
        await asyncio.shield(self._settle(held, used_usd, used_tokens))

    async def _settle(self, held: Reservation, used_usd: float, used_tokens: int) -> None:
        try:
            async with tenant_transaction(self.pool, held.tenant_id) as conn:
                await budgets.settle(conn, held, used_usd, used_tokens)
        except (asyncpg.PostgresError, OSError) as exc:
            _log.warning(
                "budget of %s not settled (held until its lease ends): %s", held.experiment_id, exc
            )
