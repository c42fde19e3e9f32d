"""``sage_otel.configure()``: providers, readers, exporters, /metrics, instrumentation.

One call sets up what a SAGE agent needs and honours the standard OpenTelemetry environment
variables: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (and
``_ARG``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``_TRACES_ENDPOINT`` / ``_METRICS_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or ``http/protobuf``, the default) and its per-signal
forms, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``, and
``OTEL_SDK_DISABLED``. Explicit arguments win over the environment.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import MeterProvider as ApiMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .. import __version__
from .exposition import ExemplarPrometheusMetricReader
from .meters import ApiMeters, Meters, StoreMeters
from .store import MetricStore

_logger = logging.getLogger(__name__)
DEFAULT_SERVICE_NAME = "sage-agent"
DEFAULT_METRICS_PORT = 9090  # the monitoring plan's agent metrics port
DEFAULT_METRICS_HOST = "127.0.0.1"


@dataclass
class Telemetry:
    """What ``configure`` built; ``shutdown`` flushes and stops it."""

    resource: Resource
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    store: MetricStore
    registry: CollectorRegistry
    metrics_address: tuple[str, int] | None = None
    _server: Any = field(default=None, repr=False)
    _instrumentor: Any = field(default=None, repr=False)

    @property
    def meters(self) -> StoreMeters:
        return StoreMeters(self.store)

    def shutdown(self) -> None:
        global _current
        with _lock:
            if self._instrumentor is not None:
                self._instrumentor.uninstrument()
                self._instrumentor = None
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown()
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
            if _current is self:
                _current = None


_current: Telemetry | None = None
_lock = threading.RLock()


def current() -> Telemetry | None:
    return _current


def meters_for(meter_provider: ApiMeterProvider | None) -> Meters:
    """The fast store when sage-otel owns ``meter_provider``, else the plain OTel API."""
    telemetry = _current
    if (
        telemetry is not None
        and (meter_provider or metrics.get_meter_provider()) is telemetry.meter_provider
    ):
        return telemetry.meters
    return ApiMeters(meter_provider)


def build_resource(
    service_name: str | None = None, attributes: dict[str, Any] | None = None
) -> Resource:
    base: dict[str, Any] = {
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid4()),
    }
    env_names_service = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if service_name:
        base["service.name"] = service_name
    elif not env_names_service:
        base["service.name"] = DEFAULT_SERVICE_NAME
    resource = Resource.create(base)
    return resource.merge(Resource(attributes or {}))


def _otlp_protocol(signal: str) -> str:
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def otlp_configured(signal: str) -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def _otlp_span_exporter() -> SpanExporter:
    if _otlp_protocol("TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def _otlp_metric_reader() -> MetricReader:
    if _otlp_protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return PeriodicExportingMetricReader(OTLPMetricExporter())


def configure(
    *,
    service_name: str | None = None,
    resource_attributes: dict[str, Any] | None = None,
    metrics_host: str | None = None,
    metrics_port: int | None = None,
    serve_metrics: bool = True,
    otlp: bool | None = None,
    traces: bool = True,
    sampler: Sampler | None = None,
    span_processors: list[SpanProcessor] | None = None,
    metric_readers: list[MetricReader] | None = None,
    instrument: bool = True,
    crypto_detail: str | None = None,
    set_global: bool = True,
) -> Telemetry:
    """Set up traces and metrics for this process; calling it again returns the same setup.

    ``otlp=None`` exports over OTLP exactly when an OTLP endpoint is configured in the
    environment. ``traces=False`` records metrics only: no span is ever started.
    ``metrics_port=0`` picks a free port (see ``Telemetry.metrics_address``).
    Raises ``OSError`` when the metrics port cannot be bound.
    """
    global _current
    with _lock:
        if _current is not None:
            return _current
        resource = build_resource(service_name, resource_attributes)
        tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        for processor in span_processors or ():
            tracer_provider.add_span_processor(processor)
        if otlp if otlp is not None else otlp_configured("TRACES"):
            tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))

        registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = list(metric_readers or ())
        server, address = None, None
        if serve_metrics:
            host = (
                metrics_host
                or os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST")
                or DEFAULT_METRICS_HOST
            )
            port = (
                metrics_port
                if metrics_port is not None
                else int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT") or DEFAULT_METRICS_PORT)
            )
            server, _thread = start_http_server(port, addr=host, registry=registry)
            address = (host, server.server_address[1])
            for collector in (ProcessCollector, GCCollector, PlatformCollector):
                collector(registry=registry)
            readers.append(ExemplarPrometheusMetricReader(registry))
        if otlp if otlp is not None else otlp_configured("METRICS"):
            readers.append(_otlp_metric_reader())
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)

        store = MetricStore()
        store.exemplars = (
            True  # only sampled spans leave exemplars, so this costs nothing unsampled
        )
        for reader in readers:
            store.attach(reader, resource)

        telemetry = Telemetry(
            resource, tracer_provider, meter_provider, store, registry, address, server
        )
        if set_global:
            if traces:
                trace.set_tracer_provider(tracer_provider)
            metrics.set_meter_provider(meter_provider)
        _current = telemetry
        if instrument:
            from ..instrumentation import SageInstrumentor

            instrumentor = SageInstrumentor()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument(
                    tracer_provider=tracer_provider if traces else trace.NoOpTracerProvider(),
                    meters=telemetry.meters,
                    crypto_detail=crypto_detail,
                )
                telemetry._instrumentor = instrumentor
        return telemetry
