"""One way to connect to Temporal: always with `KonstructPlugin` (converter, codec,
interceptors), the codec's keys from the settings."""

from __future__ import annotations

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


async def connect(settings: Settings, address: str | None = None) -> Client:
    temporal = settings.temporal
    return await Client.connect(
        address or temporal.target,
        namespace=temporal.namespace,
        api_key=temporal.api_key,
        tls=_tls(temporal),
        plugins=[plugin(settings)],
    )
