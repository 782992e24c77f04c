"""One exception hierarchy. Every error says what was wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError


class KonstructError(Exception):
    """Base of every error Konstruct raises on purpose."""

    # The ApplicationError type a workflow failure carries for this error.
    error_type = "KonstructError"
    retryable = False


class InvalidInput(KonstructError):
    """A workflow, activity or CLI input that does not validate."""

    error_type = "InvalidInput"

    def __init__(self, message: str, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.fields = list(fields)

    @classmethod
    def from_validation_error(cls, what: str, error: ValidationError) -> InvalidInput:
        problems = []
        fields = []
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"]) or "(input)"
            fields.append(field)
            if item["type"] == "extra_forbidden":
                problems.append(f"{field}: unknown field")
            else:
                problems.append(f"{field}: {item['msg']}")
        return cls(f"invalid {what} input: " + "; ".join(problems), fields)


class NotFound(KonstructError):
    """A tenant, agent, experiment, run or file that does not exist."""

    error_type = "NotFound"


class UnknownTenant(NotFound):
    error_type = "UnknownTenant"


class UnknownAgent(NotFound):
    error_type = "UnknownAgent"


class ConfigError(KonstructError):
    """A configuration value that is missing or wrong; names the key."""

    error_type = "ConfigError"


class StackError(KonstructError):
    """The local stack cannot start or stop (port in use, already running...)."""

    error_type = "StackError"
