"""Konstruct's Temporal wiring, defined once: converter and interceptors.

Every client (worker, CLI, benches, tests) connects with `KonstructPlugin`
through `konstruct.temporal_client.connect`, and every Worker built from such
a client inherits it; replayers and the tests' time-skipping environment take
it as `plugins=[KonstructPlugin()]`. So none of them wires these by hand.
"""

from __future__ import annotations

from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.plugin import SimplePlugin

from konstruct.interceptors import KonstructErrorInterceptor


class KonstructPlugin(SimplePlugin):
    def __init__(self) -> None:
        super().__init__(
            "konstruct",
            data_converter=pydantic_data_converter,
            interceptors=[TracingInterceptor(), KonstructErrorInterceptor()],
        )
