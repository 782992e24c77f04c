"""One way to connect to Temporal: always with `KonstructPlugin` (converter, interceptors)."""

from __future__ import annotations

from temporalio.client import Client, TLSConfig

from konstruct.config import TemporalSettings
from konstruct.plugin import KonstructPlugin


def _tls(settings: TemporalSettings) -> TLSConfig | bool:
    if settings.tls_cert and settings.tls_key:
        return TLSConfig(
            client_cert=settings.tls_cert.read_bytes(),
            client_private_key=settings.tls_key.read_bytes(),
        )
    # Temporal Cloud API keys always travel over TLS.
    return bool(settings.api_key)


async def connect(settings: TemporalSettings) -> Client:
    return await Client.connect(
        settings.target,
        namespace=settings.namespace,
        api_key=settings.api_key,
        tls=_tls(settings),
        plugins=[KonstructPlugin()],
    )
