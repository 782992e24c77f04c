"""Structured answers (OpenAI's `response_format`): what a format may be, and whether
an answer fits one. Shared by experiments (`task.response_format`, the `json_schema`
eval) and agents (an agent's response schema, a gateway request's format)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator

FORMAT_SHAPES = (
    '{"type": "json_object"} or {"type": "json_schema", "json_schema":'
    ' {"name": ..., "schema": {...}}}'
)


def check_response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """The format as it is when it is one OpenAI accepts (`text` included); raises
    ValueError naming what is wrong."""
    if value is None or value.get("type") in ("text", "json_object"):
        return value
    inner = value.get("json_schema")
    if value.get("type") != "json_schema" or not isinstance(inner, dict):
        raise ValueError(f"must be {FORMAT_SHAPES}")
    if not isinstance(inner.get("schema"), dict):
        raise ValueError("json_schema.schema must be a JSON schema (an object)")
    check_schema(inner["schema"])
    return value


# A payload field holding a format (None: free text).
ResponseFormat = Annotated[dict[str, Any] | None, AfterValidator(check_response_format)]


def check_schema(schema: dict[str, Any]) -> None:
    """Raises ValueError when `schema` is not a valid JSON schema."""
    from temporalio import workflow

    # Workflows validate their inputs in their sandbox: jsonschema is imported from
    # outside it (its check of a schema is deterministic).
    with workflow.unsafe.imports_passed_through():
        import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: {exc.message}") from None


def as_json(text: str) -> tuple[Any, str | None]:
    """The answer as JSON (a ```json fence allowed), or why it is not."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        return json.loads(body), None
    except ValueError as exc:
        return None, str(exc)[:200]


def schema_problem(schema: dict[str, Any], document: Any) -> str | None:
    """Where and why `document` does not fit `schema` (None: it fits)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(the document)"
    return f"{where}: {error.message}"[:300]


def answer_problem(response_format: dict[str, Any] | None, text: str) -> str | None:
    """Why an answer does not fit the format (None: it fits, or there is none)."""
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    assert response_format is not None
    document, problem = as_json(text)
    if problem is not None:
        return f"not JSON: {problem}"
    if kind == "json_object":
        return None if isinstance(document, dict) else "not a JSON object"
    return schema_problem(response_format["json_schema"]["schema"], document)
