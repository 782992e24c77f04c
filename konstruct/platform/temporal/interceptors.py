"""Worker interceptors: the one place our errors become Temporal failures."""

from __future__ import annotations

from typing import Any

from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from konstruct.platform.errors import KonstructError, to_application_error


class _TranslateErrors(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await self.next.execute_activity(input)
        except KonstructError as error:
            # Not chained: the failure then ends at our ApplicationError (with its
            # details), while the traceback still shows where the activity raised.
            raise to_application_error(error).with_traceback(error.__traceback__) from None


class KonstructErrorInterceptor(Interceptor):
    """Turns a KonstructError raised by any activity (local ones too) into an
    ApplicationError with the error's type, and retryable only if its class is."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TranslateErrors(next)
