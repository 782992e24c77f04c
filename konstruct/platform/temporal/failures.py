"""Failures readable in history, their user data still encrypted.

With a codec, the SDK's `DefaultFailureConverterWithEncodedAttributes` moves a
failure's message and stack trace into `encoded_attributes` (a payload the
codec encrypts) and leaves `Encoded failure` as the message. The `temporal` CLI
prints only that message (`workflow describe`, `show`, `execute`, `result`):
its `--codec-endpoint` decodes payloads, `encoded_attributes` among them
(`show --detailed`, `-o json`), but it never puts the decoded text back in the
message. The Web UI likewise shows the message, and the decoded attributes in
the event's details.

So `ReadableFailureConverter` encrypts the message and stack trace just the
same, and writes in their place a message made only of what is no user data:
the error's type, the fields an `InvalidInput` names, and where the rest is —
`InvalidInput at tenant_id (full message encrypted in encodedAttributes: read
it via the codec server)`. With `--codec-endpoint`, `temporal workflow
describe -o json` and `show --detailed` print the decoded `encodedAttributes`
(message and stack trace), as the Web UI's event details do. An exception of
a `PlainMessage` class, whose message is made only of ids (`CodecError`'s key
ids), keeps its whole message plain. Whoever holds the key (our clients and
workers) reads the full message, as before.

The trade-off: a field path is plain (`evals.0.kind`, or a dict key the path
goes through), a value never is.
"""

from __future__ import annotations

from collections.abc import Sequence

from temporalio.api.failure.v1 import Failure
from temporalio.converter import DefaultFailureConverter, PayloadConverter
from temporalio.exceptions import ApplicationError

from konstruct.platform.errors import InvalidInput, is_failure

HINT = "full message encrypted in encodedAttributes: read it via the codec server"
# At most this many of an InvalidInput's fields are named in the plain message.
MAX_FIELDS = 5


class PlainMessage(Exception):
    """An error whose message carries no user data (ids, key ids, field names), so
    history keeps it readable: the failure's message is `<type>: <message>`."""


def _fields(exception: BaseException) -> Sequence[str]:
    if isinstance(exception, InvalidInput):
        return exception.fields
    # `to_application_error` gives an InvalidInput's fields as its first detail.
    if isinstance(exception, ApplicationError) and is_failure(exception, InvalidInput):
        first = exception.details[0] if exception.details else None
        if isinstance(first, list) and all(isinstance(f, str) for f in first):
            return first
    return ()


def plain_message(exception: BaseException) -> str:
    """What a failure of `exception` says in history, readable without the key."""
    if isinstance(exception, PlainMessage):
        return f"{type(exception).__name__}: {exception}"
    kind = type(exception).__name__
    if isinstance(exception, ApplicationError) and exception.type:
        kind = exception.type
    fields = list(_fields(exception))
    where = ""
    if fields:
        more = ", …" if len(fields) > MAX_FIELDS else ""
        where = " at " + ", ".join(fields[:MAX_FIELDS]) + more
    return f"{kind}{where} ({HINT})"


class ReadableFailureConverter(DefaultFailureConverter):
    """Message and stack trace encoded (so encrypted by the codec); a data-free
    message in their place (`plain_message`), at every level of the cause chain."""

    def __init__(self) -> None:
        super().__init__(encode_common_attributes=True)

    def to_failure(
        self, exception: BaseException, payload_converter: PayloadConverter, failure: Failure
    ) -> None:
        super().to_failure(exception, payload_converter, failure)
        failure.message = plain_message(exception)
