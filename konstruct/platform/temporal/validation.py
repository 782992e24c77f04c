"""Turn raw workflow input into a model, or fail the workflow at once with InvalidInput."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from konstruct.platform.errors import InvalidInput, to_application_error

ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_input(model: type[ModelT], raw: Any, what: str) -> ModelT:
    """Validate a workflow input; raises a non-retryable ApplicationError naming each field."""
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise to_application_error(InvalidInput.from_validation_error(what, exc)) from None
