"""Turn raw workflow input into a model, or fail the workflow at once with InvalidInput."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio.exceptions import ApplicationError

from konstruct.errors import InvalidInput, KonstructError

ModelT = TypeVar("ModelT", bound=BaseModel)


def to_application_error(error: KonstructError) -> ApplicationError:
    details = [error.fields] if isinstance(error, InvalidInput) else []
    return ApplicationError(
        str(error), *details, type=error.error_type, non_retryable=not error.retryable
    )


def parse_input(model: type[ModelT], raw: Any, what: str) -> ModelT:
    """Validate a workflow input; raises a non-retryable ApplicationError naming each field."""
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise to_application_error(InvalidInput.from_validation_error(what, exc)) from None
