"""One exception tree. Every error says what was wrong and what to do.

    KonstructError                 base; `retryable` and `error_type` are class properties
    ├── InvalidInput               a workflow, activity, CLI or HTTP input that does not validate
    ├── NotFound                   a tenant, agent, experiment, run or file that does not exist
    │   ├── UnknownTenant
    │   ├── UnknownAgent
    │   └── ArtifactMissing
    ├── ConfigError                a configuration value that is missing or wrong
    ├── StackError                 the local stack cannot start or stop
    ├── ArtifactIntegrityError     stored bytes no longer match their sha256 (also a ValueError)
    ├── ForecastingError           the forecasting domain refused its input (also a ValueError)
    ├── InjectedFailure            a failure the demo was asked to inject (`fail_at`)
    ├── InvariantViolated          a registry invariant does not hold
    │   └── RegressionNotDetected  the demo's safer promote missed the regression it made
    ├── PrecheckFailed             the demo's environment is not ready
    ├── ServiceUnreachable         Temporal or PostgreSQL does not answer (retryable)
    ├── ExperimentStopped          an experiment call found the stop flag raised; it made no request
    ├── QuotaExceeded              a provider's quota is spent; the experiment pauses until resumed
    └── BudgetExhausted            an experiment's or its tenant's budget is spent; it pauses until resumed

An activity raises these; the worker's interceptor (`konstruct.platform.temporal.interceptors`)
turns each into an `ApplicationError` whose `type` is `error_type` and whose
`non_retryable` is `not retryable`, so a workflow's retry policy needs no list
of type names. Workflows and the CLI read a failure back through
`innermost_application_error`.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError
from temporalio.exceptions import ApplicationError


class KonstructError(Exception):
    """Base of every error Konstruct raises on purpose."""

    # The ApplicationError type a workflow failure carries for this error.
    error_type = "KonstructError"
    # Whether Temporal may retry the activity that raised it.
    retryable = False


def field_problems(error: ValidationError, root: str = "(input)") -> list[tuple[str, str]]:
    """(dotted field, problem) for each error of a pydantic ValidationError."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or root
        text = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append((field, text))
    return problems


class InvalidInput(KonstructError):
    """A workflow, activity or CLI input that does not validate."""

    error_type = "InvalidInput"

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

    error_type = "NotFound"


class UnknownTenant(NotFound):
    error_type = "UnknownTenant"


class UnknownAgent(NotFound):
    error_type = "UnknownAgent"


class ArtifactMissing(NotFound):
    """An artifact the registry or a demo step expects is not stored."""

    error_type = "ArtifactMissing"


class ConfigError(KonstructError):
    """A configuration value that is missing or wrong; names the key."""

    error_type = "ConfigError"


class StackError(KonstructError):
    """The local stack cannot start or stop (port in use, already running...)."""

    error_type = "StackError"


class ArtifactIntegrityError(KonstructError, ValueError):
    """An artifact whose bytes no longer match the sha256 recorded for them."""

    error_type = "ArtifactIntegrityError"


class ForecastingError(KonstructError, ValueError):
    """The forecasting domain refused its input (unknown model, bad URI...)."""

    error_type = "ForecastingError"


class InjectedFailure(KonstructError):
    """A failure injected on purpose at a demo step (`fail_at`)."""

    error_type = "InjectedFailure"


class InvariantViolated(KonstructError):
    error_type = "InvariantViolated"


class PrecheckFailed(KonstructError):
    error_type = "PrecheckFailed"


class RegressionNotDetected(InvariantViolated):
    """The demo's safer promote swapped to a worse run and its check saw no regression."""

    error_type = "RegressionNotDetected"


class ServiceUnreachable(KonstructError):
    """Temporal or PostgreSQL does not answer; says where it was looked for."""

    error_type = "ServiceUnreachable"
    retryable = True


class ExperimentStopped(KonstructError):
    """A provider call of a stopping experiment: no request made, the item stays pending."""

    error_type = "ExperimentStopped"


class QuotaExceeded(KonstructError):
    """A provider answered that its quota is spent (429 `insufficient_quota`): no retry
    helps until someone raises it, so the experiment pauses until resumed."""

    error_type = "QuotaExceeded"


class BudgetExhausted(KonstructError):
    """A call's reservation did not fit in the experiment's budget (`budget.max_usd`,
    `budget.max_tokens`) or its tenant's monthly budget: no request made; the
    experiment pauses until its budget is raised and it is resumed."""

    error_type = "BudgetExhausted"


def to_application_error(error: KonstructError) -> ApplicationError:
    """The one mapping from our errors to what Temporal records and retries (or not)."""
    details = [error.fields] if isinstance(error, InvalidInput) else []
    return ApplicationError(
        str(error), *details, type=error.error_type, non_retryable=not error.retryable
    )


def innermost_application_error(error: BaseException | None) -> ApplicationError | None:
    """The deepest ApplicationError in a failure's cause chain (the one an activity raised)."""
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
    cause = innermost_application_error(error)
    if cause is not None:
        return ApplicationError(cause.message, *cause.details, type=cause.type, non_retryable=True)
    return ApplicationError(str(getattr(error, "cause", None) or error), non_retryable=True)
