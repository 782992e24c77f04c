"""OpenTelemetry set-up: traces across workflow -> activity -> provider call, and metrics."""

from __future__ import annotations

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

from konstruct.platform.settings import TelemetrySettings

_configured = False


def setup_telemetry(settings: TelemetrySettings) -> None:
    """Install tracer and meter providers once per process; exporter chosen by settings."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create({"service.name": settings.service_name})
    tracer_provider = TracerProvider(resource=resource)
    span_exporter: SpanExporter | None = None
    readers: list[MetricReader] = []
    if settings.exporter == "console":
        span_exporter = ConsoleSpanExporter()
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), 60_000))
    elif settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(), 15_000))
    if span_exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
