"""A workflow's failure in one line, for the CLI and the gateway alike."""

from __future__ import annotations

from temporalio.client import WorkflowFailureError

from konstruct.platform.errors import innermost_application_error


def failure_kind(error: WorkflowFailureError) -> str:
    """The type of the application error that failed the workflow ("" if none says)."""
    cause = innermost_application_error(error)
    return cause.type if cause is not None and cause.type else ""


def failure_message(error: WorkflowFailureError) -> str:
    """The error an activity or workflow raised, with its type."""
    cause = innermost_application_error(error)
    if cause is not None and cause.type:
        return f"{cause.type}: {cause.message}"
    deepest: BaseException | None = error.cause
    while getattr(deepest, "cause", None) is not None:
        deepest = deepest.cause  # type: ignore[union-attr]
    return str(deepest or error)
