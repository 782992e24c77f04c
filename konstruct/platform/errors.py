"""The one exception tree: every error Konstruct raises on purpose, each saying what to do.

    KonstructError              base; `error_type` (the class's name) and `retryable`
    ├── InputFailure            family: what no retry and no fallback reply can fix
    │   ├── InvalidInput        a workflow, activity, CLI or HTTP input that does not validate
    │   ├── UnknownTenant       (also a NotFound)
    │   └── UnknownAgent        (also a NotFound)
    ├── NotFound                a tenant, agent, experiment, run or file that does not exist
    │   └── ArtifactMissing
    ├── ConfigError             a configuration value that is missing or wrong
    │   └── KnowledgeUnavailable  no knowledge tables (no pgvector, or never migrated)
    ├── StackError              the local stack cannot start or stop
    ├── ArtifactIntegrityError  stored bytes no longer match their sha256 (also a ValueError)
    ├── ForecastingError        the forecasting domain refused its input (also a ValueError)
    ├── EmbeddingFailed         the router's `embed` group gave no usable vectors (retryable)
    ├── ToolError               a tool failed; retryable or not, per failure
    ├── ServiceUnreachable      Temporal or PostgreSQL does not answer (retryable)
    ├── DemoFailure             family: the demo cascade's own failures
    │   ├── InjectedFailure     a failure the demo was asked to inject (`fail_at`)
    │   ├── PrecheckFailed      the demo's environment is not ready
    │   └── InvariantViolated   a registry invariant does not hold
    │       └── RegressionNotDetected  the safer promote missed the regression it made
    ├── ExperimentStopped       an experiment call found the stop flag raised; no request made
    └── ExperimentPaused        family: the experiment pauses until resumed (`pause_kind`)
        ├── QuotaExceeded       a provider's quota is spent
        └── BudgetExhausted     an experiment's or its tenant's budget is spent

An activity raises these; the worker's interceptor (`konstruct.platform.temporal.interceptors`)
turns each into an `ApplicationError` whose `type` is `error_type` and whose
`non_retryable` is `not retryable`, so a workflow's retry policy needs no list
of type names. Workflows, the gateway and the CLI read a failure back through
`innermost_application_error`, and ask `failure_of` / `is_failure` whether it is
of a class or family, never comparing type strings themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

if TYPE_CHECKING:
    # Imported where used otherwise: the CLI's start-up loads neither (temporalio
    # alone takes a tenth of a second).
    from pydantic import ValidationError
    from temporalio.exceptions import ApplicationError

# Every KonstructError class by its `error_type`, to read a recorded failure back.
_BY_TYPE: dict[str, type[KonstructError]] = {}

E = TypeVar("E", bound="KonstructError")


class KonstructError(Exception):
    """Base of every error Konstruct raises on purpose."""

    # The ApplicationError type a workflow failure carries for this error: the
    # class's own name (recorded in histories, so a class is never renamed).
    error_type: ClassVar[str] = "KonstructError"
    # Whether Temporal may retry the activity that raised it.
    retryable: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.error_type = cls.__name__
        _BY_TYPE[cls.error_type] = cls


_BY_TYPE[KonstructError.error_type] = KonstructError


def failure_of(cause: BaseException | None, family: type[E]) -> type[E] | None:
    """The class of `family` (itself or a subclass) whose error a recorded failure
    (an ApplicationError, as `innermost_application_error` finds it) carries, else None."""
    from temporalio.exceptions import ApplicationError

    if not isinstance(cause, ApplicationError) or not cause.type:
        return None
    found = _BY_TYPE.get(cause.type)
    return found if found is not None and issubclass(found, family) else None


def is_failure(cause: BaseException | None, *families: type[KonstructError]) -> bool:
    """Whether a recorded failure is of one of `families` (a class and its subclasses)."""
    return any(failure_of(cause, family) is not None for family in families)


def field_problems(error: ValidationError, root: str = "(input)") -> list[tuple[str, str]]:
    """(dotted field, problem) for each error of a pydantic ValidationError."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or root
        text = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append((field, text))
    return problems


class InputFailure(KonstructError):
    """Family: the caller asked for something that does not validate or does not
    exist; no retry and no fallback reply can fix it (a message fails at once)."""


class InvalidInput(InputFailure):
    """A workflow, activity or CLI input that does not validate."""

    def __init__(self, message: str, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.fields = list(fields)

    @classmethod
    def from_validation_error(cls, what: str, error: ValidationError) -> InvalidInput:
        problems = field_problems(error)
        return cls(
            f"invalid {what} input: " + "; ".join(f"{field}: {text}" for field, text in problems),
            [field for field, _ in problems],
        )


class NotFound(KonstructError):
    """A tenant, agent, experiment, run or file that does not exist."""


class UnknownTenant(NotFound, InputFailure):
    """A tenant that does not exist; says which command creates it."""


class UnknownAgent(NotFound, InputFailure):
    """An agent the tenant does not have; says which command creates it."""


class ArtifactMissing(NotFound):
    """An artifact the registry or a demo step expects is not stored."""


class ConfigError(KonstructError):
    """A configuration value that is missing or wrong; names the key."""


class KnowledgeUnavailable(ConfigError):
    """The knowledge tables do not exist: the server lacks pgvector, or never migrated."""


class StackError(KonstructError):
    """The local stack cannot start or stop (port in use, already running...)."""


class ArtifactIntegrityError(KonstructError, ValueError):
    """An artifact whose bytes no longer match the sha256 recorded for them."""


class ForecastingError(KonstructError, ValueError):
    """The forecasting domain refused its input (unknown model, bad URI...)."""


class EmbeddingFailed(KonstructError):
    """The router's `embed` group did not give one vector per text (the cause is chained)."""

    retryable = True


class ToolError(KonstructError):
    """A tool failed. retryable=False: the model is told at once (bad arguments, host not allowed, 4xx).
    retryable=True: worth another attempt (timeout, connection error, 5xx, 429)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"ToolError({self.message!r}, retryable={self.retryable})"


class ServiceUnreachable(KonstructError):
    """Temporal or PostgreSQL does not answer; says where it was looked for."""

    retryable = True


class DemoFailure(KonstructError):
    """Family: a failure of the demo cascade's own making or checking."""


class InjectedFailure(DemoFailure):
    """A failure injected on purpose at a demo step (`fail_at`)."""


class PrecheckFailed(DemoFailure):
    """The demo's environment is not ready; says what to run."""


class InvariantViolated(DemoFailure):
    """A registry invariant the demo checks does not hold."""


class RegressionNotDetected(InvariantViolated):
    """The demo's safer promote swapped to a worse run and its check saw no regression."""


class ExperimentStopped(KonstructError):
    """A provider call of a stopping experiment: no request made, the item stays pending."""


class ExperimentPaused(KonstructError):
    """Family: no retry helps until someone raises a limit, so the experiment
    pauses until resumed and the item stays pending; `pause_kind` says why."""

    pause_kind: ClassVar[Literal["quota", "budget"]]


class TenantBudgetSpent(KonstructError):
    """The tenant's monthly budget is spent: a message gets the agent's polite fallback
    (degraded) without a model call, and the gateway answers 429 `insufficient_quota`."""


class AnswerDoesNotFit(KonstructError):
    """The model's final answer did not fit the response format asked for (an agent's
    response schema, a request's `response_format`), even after one repair step:
    the message fails with the validation error (no fallback reply stands in)."""


class QuotaExceeded(ExperimentPaused):
    """A provider answered that its quota is spent (429 `insufficient_quota`)."""

    pause_kind = "quota"


class BudgetExhausted(ExperimentPaused):
    """A call's reservation did not fit in the experiment's budget (`budget.max_usd`,
    `budget.max_tokens`) or its tenant's monthly budget: no request made."""

    pause_kind = "budget"


def to_application_error(error: KonstructError) -> ApplicationError:
    """The one mapping from our errors to what Temporal records and retries (or not)."""
    from temporalio.exceptions import ApplicationError

    details = [error.fields] if isinstance(error, InvalidInput) else []
    return ApplicationError(
        str(error), *details, type=error.error_type, non_retryable=not error.retryable
    )


def innermost_application_error(error: BaseException | None) -> ApplicationError | None:
    """The deepest ApplicationError in a failure's cause chain (the one an activity raised)."""
    from temporalio.exceptions import ApplicationError

    found = None
    cause = error
    while cause is not None:
        if isinstance(cause, ApplicationError):
            found = cause
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return found


def workflow_failure(error: BaseException) -> ApplicationError:
    """An activity's own error as the workflow's failure: type, message and details
    kept, never retried (a workflow task retry could not fix it)."""
    from temporalio.exceptions import ApplicationError

    cause = innermost_application_error(error)
    if cause is not None:
        return ApplicationError(cause.message, *cause.details, type=cause.type, non_retryable=True)
    return ApplicationError(str(getattr(error, "cause", None) or error), non_retryable=True)
