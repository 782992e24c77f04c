"""Worker interceptors: the one place our errors become Temporal failures."""

from __future__ import annotations

from typing import Any

from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from konstruct.errors import KonstructError, to_application_error


class _TranslateErrors(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await self.next.execute_activity(input)
        except KonstructError as error:
            raise to_application_error(error) from error


class KonstructErrorInterceptor(Interceptor):
    """Turns a KonstructError raised by any activity (local ones too) into an
    ApplicationError with the error's type, and retryable only if its class is."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TranslateErrors(next)
