"""A client for the simulator's admin API, for tests and benchmarks."""

from __future__ import annotations

from typing import Any

import httpx


class SimulatorAdmin:
    def __init__(self, base_url: str) -> None:
        # base_url is the server root, e.g. http://127.0.0.1:8799
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=10)

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    async def set_profile(self, model: str, **fields: Any) -> dict[str, Any]:
        response = await self._http.put(f"/admin/models/{model}", json=fields)
        response.raise_for_status()
        return dict(response.json())

    async def stats(self) -> dict[str, Any]:
        response = await self._http.get("/admin/stats")
        response.raise_for_status()
        return dict(response.json())

    async def model_stats(self, model: str) -> dict[str, int]:
        return dict((await self.stats())["models"].get(model, {}))

    async def timeline(self, model: str, bucket_s: float = 1.0) -> dict[str, Any]:
        """ok and 429 answers per bucket of `bucket_s` since start or the last reset."""
        response = await self._http.get(
            f"/admin/stats/{model}/timeline", params={"bucket_s": bucket_s}
        )
        response.raise_for_status()
        return dict(response.json())

    async def requests_by_content(self, model: str) -> dict[str, Any]:
        response = await self._http.get(f"/admin/requests/{model}")
        response.raise_for_status()
        return dict(response.json())

    async def reset(self) -> None:
        (await self._http.post("/admin/reset")).raise_for_status()

    async def clock(self) -> dict[str, Any]:
        """The rate-limit clock: {now_s, frozen}."""
        response = await self._http.get("/admin/clock")
        response.raise_for_status()
        return dict(response.json())

    async def _set_clock(self, **change: Any) -> dict[str, Any]:
        response = await self._http.post("/admin/clock", json=change)
        response.raise_for_status()
        return dict(response.json())

    async def freeze_clock(self) -> dict[str, Any]:
        """Stop the clock limiters, windows and the timeline read (no refill meanwhile)."""
        return await self._set_clock(frozen=True)

    async def advance_clock(self, seconds: float) -> dict[str, Any]:
        """Move that clock `seconds` forward, frozen or not: as if that long passed idle."""
        return await self._set_clock(advance_s=seconds)

    async def real_clock(self) -> dict[str, Any]:
        """Run that clock at real speed again, from where it is (it never goes back)."""
        return await self._set_clock(frozen=False)

    async def close(self) -> None:
        await self._http.aclose()
