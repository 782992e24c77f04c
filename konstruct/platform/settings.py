"""The platform's settings sections (Temporal, PostgreSQL, telemetry) and what the
platform needs of the whole configuration, as protocols: `konstruct.config`
composes these sections with the features' own into `Settings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from konstruct.platform.errors import ConfigError

if TYPE_CHECKING:
    from konstruct.platform.temporal.codec import KeyRing


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# SQLite pragmas of the dev server's state file. WAL with synchronous=normal
# survives a killed server (only an OS crash can lose the last commits) and cut
# HandleMessage overhead p50 from 95 to 47 ms on 2 cores (bench/messages.py).
DEV_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")


class TemporalSettings(Section):
    # `address` unset means the local dev server on `port`.
    address: str | None = None
    namespace: str = "default"
    port: int = Field(7233, ge=1, le=65535)
    ui_port: int = Field(8233, ge=1, le=65535)
    task_queue: str = "konstruct"
    # Temporal Cloud / mTLS clusters; paths and key come from env, never history.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_key: str | None = None
    dev_sqlite_pragmas: list[str] = Field(default_factory=lambda: list(DEV_SQLITE_PRAGMAS))
    # Payloads encrypted in workflow history (AES-256-GCM, konstruct/platform/temporal/codec.py).
    # Off stores inputs, results and failures in plain text, readable by anyone
    # with Web UI or CLI access to the namespace.
    encryption: bool = True
    # Keys: `id:base64,...` (the last encrypts), else a file of `id:base64`
    # lines; unset, `<state_dir>/encryption.keys`, which `konstruct up` creates.
    encryption_keys: SecretStr | None = None
    encryption_key_file: Path | None = None
    # The codec server the Web UI and CLI decode with (`konstruct codec-server`),
    # and the bearer token it asks for (none: loopback only, no token).
    codec_port: int = Field(8234, ge=1, le=65535)
    codec_token: SecretStr | None = None

    @property
    def target(self) -> str:
        return self.address or f"localhost:{self.port}"


class PostgresSettings(Section):
    # Owner connection used for migrations; unset means the embedded server.
    url: str | None = None
    # Connection of the application role (non-superuser, under RLS). Unset:
    # derived from `url` with the app role's name and password.
    app_url: str | None = None
    app_role: str = "konstruct_app"
    # The app role's password. Unset: the one `konstruct migrate` (or `konstruct up`)
    # generated into `<state_dir>/app-db-password`; there is no fixed default.
    app_password: SecretStr | None = None
    port: int = Field(55432, ge=1, le=65535)
    database: str = "konstruct"
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(20, ge=1)


class TelemetrySettings(Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    service_name: str = "konstruct"


def deploy_dir() -> Path:
    """The `deploy/` folder of this install (migrations, default router and simulator
    configs, sample datasets): the `deploy` package's files, found with importlib.resources.
    In a checkout or an editable install that is the checkout's own `deploy/`; in a wheel,
    the copy it ships."""
    from importlib import resources

    try:
        found = resources.files("deploy")
    except ModuleNotFoundError:
        found = None
    if not isinstance(found, Path) or not (found / "__init__.py").is_file():
        raise ConfigError(
            "Konstruct's `deploy` package (migrations, default configs, sample datasets) is"
            " not installed: reinstall Konstruct (`pip install .`, or `pip install -e .` in a"
            " checkout)"
        )
    return found


def resolve_path(base_dir: Path, value: Path) -> Path:
    """A configured path: absolute as it is; relative, against `base_dir` (the config
    file's folder). A relative `deploy/...` that is not there is the file Konstruct ships
    (`deploy_dir()`), so the defaults and the documented sample paths work from anywhere."""
    if value.is_absolute():
        return value
    local = (base_dir / value).resolve()
    if local.exists() or value.parts[:1] != ("deploy",) or len(value.parts) < 2:
        return local
    shipped = deploy_dir().joinpath(*value.parts[1:])
    return shipped if shipped.exists() else local


def write_private_file(path: Path, text: str) -> None:
    """A new file readable by its owner only (mode 600, never an existing one
    overwritten): a generated secret in the state directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)


class DatabaseSettings(Protocol):
    """What `db` reads of the configuration."""

    @property
    def postgres(self) -> PostgresSettings: ...

    def app_db_password(self, create: bool = False) -> tuple[str, bool]: ...


class ClientSettings(Protocol):
    """What a Temporal client reads of the configuration."""

    @property
    def temporal(self) -> TemporalSettings: ...

    def key_ring(self) -> KeyRing | None: ...
