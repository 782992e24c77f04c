"""Konstruct's Temporal wiring, defined once: converter, codec and interceptors.

Every client (worker, CLI, benches, tests) connects with `KonstructPlugin`
through `konstruct.platform.temporal.client.connect`, and every Worker built from such
a client inherits it; replayers and the tests' time-skipping environment take
it as `plugins=[KonstructPlugin(codec)]`. So none of them wires these by hand.

With a codec (`konstruct.platform.temporal.codec.EncryptionCodec`), every payload is encrypted
before it leaves the process, and failures carry their message and stack trace
as an encoded payload too, so neither lands in workflow history in plain text;
in their place a failure says its type and the fields at fault, which is no
user data (`konstruct.platform.temporal.failures.ReadableFailureConverter`).
"""

from __future__ import annotations

import dataclasses

from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec
from temporalio.plugin import SimplePlugin

from konstruct.platform.temporal.failures import ReadableFailureConverter
from konstruct.platform.temporal.interceptors import KonstructErrorInterceptor


def data_converter(codec: PayloadCodec | None = None) -> DataConverter:
    """The pydantic converter, with `codec` on payloads and failures when given."""
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=ReadableFailureConverter,
    )


class KonstructPlugin(SimplePlugin):
    def __init__(self, codec: PayloadCodec | None = None) -> None:
        super().__init__(
            "konstruct",
            data_converter=data_converter(codec),
            interceptors=[TracingInterceptor(), KonstructErrorInterceptor()],
        )
