"""One way to connect to Temporal: always with `KonstructPlugin` (converter, codec,
interceptors), the codec's keys from the settings."""

from __future__ import annotations

import asyncio
import time

from temporalio.client import Client, TLSConfig

from konstruct.platform.settings import ClientSettings as Settings
from konstruct.platform.settings import TemporalSettings
from konstruct.platform.temporal.plugin import KonstructPlugin


def _tls(settings: TemporalSettings) -> TLSConfig | bool:
    if settings.tls_cert and settings.tls_key:
        return TLSConfig(
            client_cert=settings.tls_cert.read_bytes(),
            client_private_key=settings.tls_key.read_bytes(),
        )
    # Temporal Cloud API keys always travel over TLS.
    return bool(settings.api_key)


def plugin(settings: Settings) -> KonstructPlugin:
    """The plugin with this configuration's payload codec (none with encryption off)."""
    from konstruct.platform.temporal.codec import EncryptionCodec

    ring = settings.key_ring()
    return KonstructPlugin(EncryptionCodec(ring) if ring is not None else None)


# A dev server accepts connections a moment before its frontend is healthy; a
# client connecting then is told so and waits, up to this long, instead of failing.
STARTING_SERVER_WAIT_S = 60.0


def _starting_up(exc: RuntimeError) -> bool:
    return "not healthy yet" in str(exc)


def _refused(exc: RuntimeError) -> bool:
    """Nothing listens at the address (yet): a server that is restarting."""
    return "ConnectionRefused" in str(exc) or "tcp connect error" in str(exc)


async def connect(
    settings: Settings,
    address: str | None = None,
    *,
    wait_s: float = STARTING_SERVER_WAIT_S,
    refused_wait_s: float = 0.0,
) -> Client:
    """A client of the configured server. A server still starting up ("Frontend is
    not healthy yet") is waited for, up to `wait_s`; with `refused_wait_s`, so is one
    that refuses connections (a worker started while its server restarts: it waits
    instead of exiting with a traceback); any other failure raises at once."""
    temporal = settings.temporal
    deadline = time.monotonic() + wait_s
    refused_until = time.monotonic() + refused_wait_s
    while True:
        try:
            return await Client.connect(
                address or temporal.target,
                namespace=temporal.namespace,
                api_key=temporal.api_key,
                tls=_tls(temporal),
                plugins=[plugin(settings)],
            )
        except RuntimeError as exc:
            now = time.monotonic()
            waiting = (_starting_up(exc) and now < deadline) or (
                _refused(exc) and now < refused_until
            )
            if not waiting:
                raise
            await asyncio.sleep(0.2)
