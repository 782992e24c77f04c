"""The one home of configuration: `temporal-dev.yaml`, overridden by environment variables,
and where the stack's state directory is (`load_settings` says in which order it looks).

A wrong value fails at start with a message naming the key (`postgres.port`,
or the environment variable that set it).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from konstruct.agents.address_kinds import AddressKind
from konstruct.experiments.models import (
    DEFAULT_MAX_CONCURRENCY,
    MAX_CONCURRENCY_LIMIT,
    ExperimentOptions,
)
from konstruct.platform.errors import ConfigError, field_problems
from konstruct.platform.settings import (
    PostgresSettings,
    Section,
    TelemetrySettings,
    TemporalSettings,
    resolve_path,
    write_private_file,
)
from konstruct.providers.control import AimdConfig, BreakerConfig

if TYPE_CHECKING:
    from konstruct.agents.tools.addresses import AddressPolicy
    from konstruct.platform.temporal.codec import KeyRing

CONFIG_FILE_ENV = "KONSTRUCT_CONFIG"
DEFAULT_CONFIG_FILE = "temporal-dev.yaml"
# The state directory's variable; KONSTRUCT_STATE_DIR is its older name, still read.
STATE_DIR_ENV = "KONSTRUCT_HOME"
STATE_DIR_ENV_ALIAS = "KONSTRUCT_STATE_DIR"
# A running `konstruct up` holds this lock in its state directory and describes itself in
# STACK_RECORD there; the per-user state directory's RUNNING_STACK_RECORD points at the
# last one started, so that commands run outside any project find it.
STACK_LOCK = "stack.lock"
STACK_RECORD = "stack.json"
RUNNING_STACK_RECORD = "running-stack.json"


class SimulatorSettings(Section):
    enabled: bool = True
    port: int = Field(8799, ge=1, le=65535)
    config: Path = Path("deploy/simulator.yaml")
    # Name of the env variable holding the key the simulator demands; the
    # router reads the same variable, so keys only ever live in the environment.
    api_key_env: str = "SIMULATOR_API_KEY"


class WorkerSettings(Section):
    max_concurrent_activities: int = Field(200, ge=1)
    max_concurrent_local_activities: int = Field(200, ge=1)
    max_concurrent_workflow_tasks: int = Field(100, ge=1)
    graceful_shutdown_seconds: float = Field(10.0, ge=0)
    # A workflow's next task waits this long on the queue of the worker that ran its
    # last one (its cached state) before any worker may take it: after a crash, how
    # long that worker's workflows stall (the SDK's default is 10 s). Shorter costs
    # a replay when a live worker is merely busy for longer.
    sticky_timeout_seconds: float = Field(3.0, gt=0)


class ToolSettings(Section):
    """What a tenant's tools may reach (`konstruct.agents.tools.addresses`)."""

    # Kinds of non-public address webhooks and http_request may send to: loopback,
    # private, link_local, reserved. None by default; the dev stack allows loopback.
    allow_addresses: list[AddressKind] = Field(default_factory=list)
    # An MCP server's tools are listed again (by the worker, before an agent step that
    # offers them) once their stored listing is this old; 0: only by `tools mcp refresh`.
    mcp_refresh_seconds: float = Field(3600.0, ge=0)

    @field_validator("allow_addresses", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # KONSTRUCT_TOOLS_ALLOW_ADDRESSES=loopback,private (or none)
        if isinstance(value, str):
            kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
            return [] if kinds == ["none"] else kinds
        return value

    def address_policy(self) -> AddressPolicy:
        from konstruct.agents.tools.addresses import AddressPolicy  # noqa: PLC0415 - see address_kinds

        return AddressPolicy.allowing(self.allow_addresses)


class LlmSettings(Section):
    router_config: Path = Path("deploy/llm-router.yaml")


class GatewaySettings(Section):
    """The OpenAI-compatible HTTP gateway (`konstruct gateway`, started by `konstruct up`)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8780, ge=1, le=65535)
    # Messages start eagerly (their first workflow task runs in the gateway's own
    # worker, saving a round trip) while fewer than this many are in flight here;
    # above it they go through the server to any worker, so a burst is shared by
    # every worker process instead of queueing on this one. 0: never eager.
    eager_max_in_flight: int = Field(4, ge=0, le=10_000)


class ExperimentSettings(ExperimentOptions, AimdConfig):
    """Experiment defaults: the workflow's options, the adaptive rate's knobs, the rest.

    All flat under `experiments.`. Workflows cannot read settings: the CLI copies
    `workflow_options()` into the input, and the activities read the rest from here.
    """

    model_config = ConfigDict(extra="forbid")

    # Items in flight per experiment (scheduled, waiting for capacity or calling).
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, ge=1, le=MAX_CONCURRENCY_LIMIT)
    # Circuit breaker per provider: trips after this many consecutive failures.
    breaker_threshold: int = Field(BreakerConfig.threshold, ge=1)
    breaker_cooldown_s: float = Field(BreakerConfig.cooldown_s, gt=0)
    # How often a provider call heartbeats while it waits for the answer.
    heartbeat_every_s: float = Field(2.0, gt=0)
    # A provider's first rate, when the router config has no `model_info.initial_rps`.
    initial_rps: float = Field(5.0, gt=0)
    # Calls book slots on the provider's shared schedule at most this far ahead,
    # so slots booked at an old rate are spent soon after the rate changes. A raise
    # reaches the provider only once the slots booked before it are spent: at 0.25 s
    # slow start measured ~75 % of each new rate and grew 1.5x per half second
    # instead of 2x (bench, cold at 100 req/s: 0.933-0.942 of the ceiling; at 0.1 s
    # 0.949-0.951, and 0.895-0.911 -> 0.925-0.938 at 200, CPU per item unchanged).
    schedule_horizon_s: float = Field(0.1, gt=0)
    # Batched calls' answers are counted in PostgreSQL this often (a 429 at once).
    outcome_flush_s: float = Field(0.25, gt=0)
    # A call's budget reservation lasts this long unless its worker renews it (a
    # third of it apart) while the call runs: a worker that dies gives back what its
    # calls held this soon after (the activities' heartbeat timeout by default).
    budget_hold_lease_s: float = Field(10.0, gt=0)

    def workflow_options(self) -> ExperimentOptions:
        """The workflow-side values, as the workflow input's `options`."""
        return ExperimentOptions.model_validate(
            self.model_dump(include=set(ExperimentOptions.model_fields))
        )

    def aimd_config(self) -> AimdConfig:
        return AimdConfig(**{f.name: getattr(self, f.name) for f in fields(AimdConfig)})

    def breaker_config(self) -> BreakerConfig:
        # A probe outlives the longest call by a margin before another may probe.
        return BreakerConfig(
            threshold=self.breaker_threshold,
            cooldown_s=self.breaker_cooldown_s,
            probe_timeout_s=self.call_timeout_s + 10,
        )


class Settings(Section):
    state_dir: Path = Path(".konstruct")
    temporal: TemporalSettings = TemporalSettings()
    postgres: PostgresSettings = PostgresSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    worker: WorkerSettings = WorkerSettings()
    llm: LlmSettings = LlmSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    gateway: GatewaySettings = GatewaySettings()
    tools: ToolSettings = ToolSettings()
    experiments: ExperimentSettings = ExperimentSettings()

    # Directory relative paths are resolved against (the config file's folder).
    base_dir: Path = Path(".")
    # The file these settings came from; the stack hands it to its children.
    source: Path | None = None
    # How `load_settings` found the state directory (said by `konstruct status`).
    state_dir_origin: str = "the default"

    def path(self, value: Path) -> Path:
        """A configured path, absolute (`resolve_path`: beside the config file, or the
        `deploy/` file Konstruct ships)."""
        return resolve_path(self.base_dir, value)

    @property
    def state_path(self) -> Path:
        """The state directory, absolute."""
        return self.path(self.state_dir)

    @property
    def app_password_file(self) -> Path:
        return self.state_path / "app-db-password"

    def app_db_password(self, create: bool = False) -> tuple[str, bool]:
        """The app role's password and whether it was generated now (`create`: when
        none is set or stored, generate one into `app_password_file`, mode 600)."""
        if self.postgres.app_password is not None:
            return self.postgres.app_password.get_secret_value(), False
        path = self.app_password_file
        if path.is_file():
            return path.read_text().strip(), False
        if not create:
            raise ConfigError(
                f"the app role has no password: {path} does not exist (state directory from"
                f" {self.state_dir_origin}); point at the stack's state directory"
                f" (--state-dir or KONSTRUCT_HOME), set KONSTRUCT_APP_DB_PASSWORD (what"
                f" `konstruct migrate` gave it), or run `konstruct migrate` to generate one"
                f" into {path}"
            )
        import secrets

        password = secrets.token_urlsafe(24)
        write_private_file(path, password + "\n")
        return password, True

    @property
    def key_file(self) -> Path:
        """Where the encryption keys are read from when none is given inline."""
        return self.path(self.temporal.encryption_key_file or self.state_dir / "encryption.keys")

    def key_ring(self) -> KeyRing | None:
        """The payload keys; None with encryption off. Raises naming where it looked."""
        from konstruct.platform.temporal.codec import KeyRing

        temporal = self.temporal
        if not temporal.encryption:
            return None
        if temporal.encryption_keys is not None:
            return KeyRing.parse(
                temporal.encryption_keys.get_secret_value(), "KONSTRUCT_ENCRYPTION_KEYS"
            )
        if self.key_file.is_file():
            return KeyRing.parse(self.key_file.read_text(), str(self.key_file))
        raise ConfigError(
            f"payload encryption is on but there is no key: {self.key_file} does not exist"
            " (`konstruct up` creates it; or set KONSTRUCT_ENCRYPTION_KEYS or"
            " KONSTRUCT_ENCRYPTION_KEY_FILE, or turn encryption off with"
            " KONSTRUCT_ENCRYPTION=false, leaving payloads in plain text)"
        )


# Environment variable → dotted key. The contract's names first.
ENV_OVERRIDES: dict[str, str] = {
    "TEMPORAL_ADDRESS": "temporal.address",
    "TEMPORAL_NAMESPACE": "temporal.namespace",
    "TEMPORAL_TLS_CERT": "temporal.tls_cert",
    "TEMPORAL_TLS_KEY": "temporal.tls_key",
    "TEMPORAL_API_KEY": "temporal.api_key",
    "KONSTRUCT_ENCRYPTION": "temporal.encryption",
    "KONSTRUCT_ENCRYPTION_KEYS": "temporal.encryption_keys",
    "KONSTRUCT_ENCRYPTION_KEY_FILE": "temporal.encryption_key_file",
    "KONSTRUCT_CODEC_PORT": "temporal.codec_port",
    "KONSTRUCT_CODEC_TOKEN": "temporal.codec_token",
    "KONSTRUCT_TASK_QUEUE": "temporal.task_queue",
    "KONSTRUCT_DATABASE_URL": "postgres.url",
    "KONSTRUCT_APP_DATABASE_URL": "postgres.app_url",
    "KONSTRUCT_APP_DB_PASSWORD": "postgres.app_password",
    "KONSTRUCT_ROUTER_CONFIG": "llm.router_config",
    "KONSTRUCT_OTEL_EXPORTER": "telemetry.exporter",
    "KONSTRUCT_WORKER_MAX_ACTIVITIES": "worker.max_concurrent_activities",
    "KONSTRUCT_WORKER_STICKY_TIMEOUT": "worker.sticky_timeout_seconds",
    "KONSTRUCT_SIMULATOR_PORT": "simulator.port",
    "KONSTRUCT_POSTGRES_PORT": "postgres.port",
    "KONSTRUCT_GATEWAY_PORT": "gateway.port",
    "KONSTRUCT_GATEWAY_HOST": "gateway.host",
    "KONSTRUCT_BUDGET_HOLD_LEASE_S": "experiments.budget_hold_lease_s",
    "KONSTRUCT_TOOLS_ALLOW_ADDRESSES": "tools.allow_addresses",
    "KONSTRUCT_TOOLS_MCP_REFRESH_SECONDS": "tools.mcp_refresh_seconds",
}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {part!r} must be a mapping")
    node[leaf] = value


def user_state_dir(environ: dict[str, str] | None = None) -> Path:
    """The per-user state directory: `$XDG_STATE_HOME/konstruct`, else
    `~/.local/state/konstruct` (a relative XDG_STATE_HOME is ignored, as the spec says)."""
    environ = dict(os.environ if environ is None else environ)
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "konstruct"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "konstruct"


def stack_running(state_dir: Path) -> bool:
    """Whether a `konstruct up` runs from `state_dir`: it holds `stack.lock` there while it
    runs, and the kernel lets go of it when the process ends, however it ends."""
    try:
        descriptor = os.open(state_dir / STACK_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # and with it the probe's own lock
    return False


@dataclass(frozen=True)
class StackRecord:
    """What a running `konstruct up` writes down about itself: where its state is, the
    config file it read (None: defaults) and its pid."""

    state_dir: Path
    config: Path | None
    pid: int

    def to_json(self) -> str:
        config = str(self.config) if self.config is not None else None
        return json.dumps({"state_dir": str(self.state_dir), "config": config, "pid": self.pid})

    @classmethod
    def read(cls, path: Path) -> StackRecord | None:
        """The record in `path`; None when there is none or it cannot be read."""
        try:
            data = json.loads(path.read_text())
            config = data["config"]
            return cls(Path(data["state_dir"]), Path(config) if config else None, int(data["pid"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None


def running_stack(state_dir: Path) -> StackRecord | None:
    """The stack running from `state_dir`, as it recorded itself; None when none runs."""
    if not stack_running(state_dir):
        return None
    return StackRecord.read(state_dir / STACK_RECORD)


def recorded_stack(environ: dict[str, str] | None = None) -> StackRecord | None:
    """The stack this user's last `konstruct up` recorded, if it still runs."""
    record = StackRecord.read(user_state_dir(environ) / RUNNING_STACK_RECORD)
    return None if record is None else running_stack(record.state_dir)


def _find_config_file(
    explicit: str | os.PathLike[str] | None, environ: dict[str, str], cwd: Path
) -> Path | None:
    """`--config`, else KONSTRUCT_CONFIG, else the nearest temporal-dev.yaml in the
    working directory or a folder above it (as git finds its repository)."""
    if explicit is not None:
        path = cwd / Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist ({CONFIG_FILE_ENV} or --config)")
        return path
    from_env = environ.get(CONFIG_FILE_ENV)
    if from_env:
        return _find_config_file(from_env, environ, cwd)
    for folder in (cwd, *cwd.parents):
        candidate = folder / DEFAULT_CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


def _state_dir_given(
    explicit: str | os.PathLike[str] | None, environ: dict[str, str], cwd: Path
) -> tuple[Path, str] | None:
    """The state directory named outright (`--state-dir`, KONSTRUCT_HOME or its older
    name KONSTRUCT_STATE_DIR), relative to the working directory, and by what."""

    def absolute(value: str | os.PathLike[str]) -> Path:
        return (cwd / Path(value).expanduser()).resolve()

    if explicit is not None:
        return absolute(explicit), "--state-dir"
    home, alias = environ.get(STATE_DIR_ENV), environ.get(STATE_DIR_ENV_ALIAS)
    if home and alias and absolute(home) != absolute(alias):
        raise ConfigError(
            f"{STATE_DIR_ENV} ({home}) and {STATE_DIR_ENV_ALIAS} ({alias}) name different state"
            f" directories: set only {STATE_DIR_ENV} ({STATE_DIR_ENV_ALIAS} is its older name)"
        )
    if home:
        return absolute(home), STATE_DIR_ENV
    if alias:
        return absolute(alias), STATE_DIR_ENV_ALIAS
    return None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Settings:
    """Read the YAML file, apply env overrides, validate; errors name the key.

    The config file: `config_file` (`--config`), else KONSTRUCT_CONFIG, else the nearest
    `temporal-dev.yaml` in `cwd` or above. The state directory, first that applies:
    `state_dir` (`--state-dir`); KONSTRUCT_HOME (or KONSTRUCT_STATE_DIR); the config
    file's `state_dir` (default `.konstruct` beside it); with no config file, the stack
    this user's last `konstruct up` recorded, while it runs (its config file is read too);
    else the per-user `$XDG_STATE_HOME/konstruct` (`~/.local/state/konstruct`). A state
    directory named outright that a stack runs from also gives that stack's config file
    when none is found.
    """
    environ = dict(os.environ if environ is None else environ)
    here = Path.cwd() if cwd is None else Path(cwd)
    path = _find_config_file(config_file, environ, here)
    state = _state_dir_given(state_dir, environ, here)
    if path is None:
        running = running_stack(state[0]) if state is not None else recorded_stack(environ)
        if running is not None:
            if running.config is not None and running.config.is_file():
                path = running.config
            if state is None:
                record = user_state_dir(environ) / RUNNING_STACK_RECORD
                state = running.state_dir, f"the running stack recorded in {record}"
        elif state is None:
            state = (
                user_state_dir(environ),
                f"the per-user default, no {DEFAULT_CONFIG_FILE} here or above",
            )
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        data = loaded
    origin: dict[str, str] = {}
    for env_name, dotted in ENV_OVERRIDES.items():
        if environ.get(env_name):
            _set_dotted(data, dotted, environ[env_name])
            origin[dotted] = env_name
    if state is not None:
        data["state_dir"], data["state_dir_origin"] = str(state[0]), state[1]
    elif path is not None:
        data["state_dir_origin"] = f"the config file {path.resolve()}"
    data["base_dir"] = str((path.parent if path else here).resolve())
    data["source"] = str(path.resolve()) if path else None
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:

        def source(key: str) -> str:  # the variable that set the key, or a list it is in
            names = [env for d, env in origin.items() if key == d or key.startswith(d + ".")]
            return f" (from {names[0]})" if names else ""

        problems = [
            f"{key}{source(key)}: {problem}"
            for key, problem in field_problems(exc, root="(config)")
        ]
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: " + "; ".join(problems)) from exc
