"""The gateway's answers other than 2xx, in OpenAI's error shape."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from temporalio.client import WorkflowFailureError

from konstruct.agents.store.key_limits import Admission
from konstruct.app.failures import failure_kind, failure_message
from konstruct.platform.errors import (
    AnswerDoesNotFit,
    InputFailure,
    NotFound,
    innermost_application_error,
    is_failure,
)


class GatewayError(Exception):
    """An answer other than 2xx, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None) -> GatewayError:
    """A 400 naming the offending field or header (`param`)."""
    return GatewayError(400, message, param=param)


def model_not_found(model: str) -> GatewayError:
    """A 404 for `model`: unknown, or another tenant's."""
    # The same answer for another tenant's agent and for one that does not exist,
    # so a key cannot learn what other tenants have.
    return GatewayError(
        404,
        f"The model {model!r} does not exist or you do not have access to it"
        " (see GET /v1/models for this key's models)",
        param="model",
        code="model_not_found",
    )


def rate_limited(admission: Admission) -> GatewayError:
    """A 429 for a key over its requests or tokens per minute, with `Retry-After`
    and the `x-ratelimit-*` headers, worded as OpenAI's."""
    kind = admission.refused_by or "requests"
    limit = admission.limits.rpm if kind == "requests" else admission.limits.tpm
    wait = admission.headers()["Retry-After"]
    return GatewayError(
        429,
        f"Rate limit reached for this key on {kind} per minute: limit {limit}."
        f" Please try again in {wait}s.",
        type=kind,
        code="rate_limit_exceeded",
        headers=admission.headers(),
    )


def quota_spent(why: str) -> GatewayError:
    """A 429 `insufficient_quota`: the tenant's monthly budget is spent."""
    return GatewayError(
        429,
        f"You exceeded your current quota: {why}.",
        type="insufficient_quota",
        code="insufficient_quota",
    )


def unauthorized(message: str) -> GatewayError:
    """A 401: no key, a malformed header, or a key unknown or revoked."""
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def workflow_failure(exc: WorkflowFailureError) -> GatewayError:
    """The answer to a message whose workflow failed: 4xx for what the client sent."""
    kind = failure_kind(exc)
    cause = innermost_application_error(exc)
    # What the message asked for does not validate (400) or does not exist (404).
    status = 500
    if is_failure(cause, InputFailure):
        status = 404 if is_failure(cause, NotFound) else 400
    elif is_failure(cause, AnswerDoesNotFit):
        status = 502  # the model did not give the answer asked for
    return GatewayError(
        status,
        f"the message failed: {failure_message(exc)}",
        type="invalid_request_error" if status < 500 else "server_error",
        code=kind or None,
    )
