"""``sage_otel.configure()``: providers, readers, exporters, /metrics, instrumentation.

One call sets up what a SAGE agent needs and honours the standard OpenTelemetry environment
variables: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (and
``_ARG``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``_TRACES_ENDPOINT`` / ``_METRICS_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or ``http/protobuf``, the default) and its per-signal
forms, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``, and
``OTEL_SDK_DISABLED``. Explicit arguments win over the environment. docs/api.md lists every
argument.

``service.version`` is the application's own version (``service_version``, else
``service.version`` in ``OTEL_RESOURCE_ATTRIBUTES``, else absent). sage-otel's version is
the instrumentation scope's (tracers and meters named ``sage_otel``) and, on the resource,
``telemetry.distro.version`` (with ``telemetry.distro.name=sage-otel``): the semantic
conventions' attributes for the distribution that set up the SDK, which is what
``configure()`` does; they are also the only place /metrics shows it (no scope labels).

``OTEL_EXPORTER_OTLP_TIMEOUT`` (and its per-signal forms) is read in milliseconds, as the
specification says (the Python exporters alone read seconds). The SDK's own metrics about
its exporting pipeline (``otel_sdk_processor_span_processed_total{error_type="queue_full"}``
and the like) are switched on unless ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` says
otherwise, and the exporters' failure logs are limited to one line a minute each.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes, see
:mod:`sage_otel.telemetry.multiprocess`), SAGE metrics go to the shared directory and
``/metrics`` is served only when a port is passed explicitly (it then reports all workers).
"""

from __future__ import annotations

import inspect
import logging
import os
import reprlib
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import MeterProvider as ApiMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler
from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .. import __version__
from .exposition import ExemplarPrometheusMetricReader
from .meters import ApiMeters, Meters, StoreMeters
from .multiprocess import BothMeters, MultiprocessMeters, multiprocess_dir, multiprocess_registry
from .store import MetricStore
from .web import WEB_CONFIG_ENV, start_metrics_server

_logger = logging.getLogger(__name__)
DEFAULT_SERVICE_NAME = "sage-agent"
DISTRO_NAME = "sage-otel"
DEFAULT_METRICS_PORT = 9090  # the monitoring plan's agent metrics port
DEFAULT_METRICS_HOST = "127.0.0.1"
# Seconds: well inside a 30 s termination grace period; SAGE_OTEL_SHUTDOWN_TIMEOUT overrides.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_OTLP_TIMEOUT_MS = 10_000
_QUEUE_LOGGER = "opentelemetry.sdk._shared_internal"
_EXPORT_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk.metrics._internal.export",
)


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


class OncePerInterval(logging.Filter):
    """Lets each distinct message template through at most once per ``interval`` seconds.

    A collector that is down makes the SDK log a line per failed batch; one a minute tells
    the operator as much, and the drops themselves are counted as metrics.
    """

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        return True


_export_log_filter = OncePerInterval()


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
    meters: Any = None
    disabled: bool = False
    options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.meters is None:
            self.meters = StoreMeters(self.store)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush and stop, within ``timeout`` seconds in all; False if it had to give up.

        The default is ``SAGE_OTEL_SHUTDOWN_TIMEOUT`` (seconds), else 5.

        Both providers shut down at once, in daemon threads: an unreachable collector
        cannot hold the process past its termination grace period.
        """
        global _current
        with _lock:
            if self._instrumentor is not None:
                self._instrumentor.uninstrument()
                self._instrumentor = None
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
            if _current is self:
                _current = None
        if timeout is None:
            try:
                timeout = float(os.environ.get("SAGE_OTEL_SHUTDOWN_TIMEOUT") or 0) or None
            except ValueError:
                timeout = None
            timeout = timeout or DEFAULT_SHUTDOWN_TIMEOUT
        deadline = time.monotonic() + timeout
        meter_timeout_ms = max(1, int(timeout * 1000))
        workers = [
            threading.Thread(target=self.tracer_provider.shutdown, daemon=True),
            threading.Thread(
                target=self.meter_provider.shutdown,
                kwargs={"timeout_millis": meter_timeout_ms},
                daemon=True,
            ),
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        finished = not any(worker.is_alive() for worker in workers)
        if not finished:
            _logger.warning("sage-otel: telemetry shutdown gave up after %.1f s", timeout)
        return finished


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
    service_name: str | None = None,
    attributes: dict[str, Any] | None = None,
    service_version: str | None = None,
) -> Resource:
    """Resource from the environment (parsed by the SDK), with a unique ``service.instance.id``.

    Precedence: ``attributes``, then ``service_name`` and ``service_version``, then
    ``OTEL_SERVICE_NAME``, then ``OTEL_RESOURCE_ATTRIBUTES``, then sage-otel's defaults.
    ``service.version`` has no default: only the application knows its own version.
    """
    defaults = {
        "service.instance.id": str(uuid.uuid4()),
        "telemetry.distro.name": DISTRO_NAME,
        "telemetry.distro.version": __version__,
    }
    # The defaults fill in only what OTEL_RESOURCE_ATTRIBUTES leaves out: an operator's own
    # service.instance.id (e.g. a pod name) is what their series are labelled with.
    from_env = OTELResourceDetector().detect().attributes
    resource = Resource.create({k: v for k, v in defaults.items() if k not in from_env})
    named = resource.attributes.get("service.name", "")
    if service_name:
        resource = resource.merge(Resource({"service.name": service_name}))
    elif not named or str(named).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    if service_version:
        resource = resource.merge(Resource({"service.version": service_version}))
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


def otlp_timeout(signal: str) -> float:
    """The export timeout in seconds, from the environment's milliseconds (the spec's unit)."""
    raw = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    )
    try:
        millis = float(raw) if raw else DEFAULT_OTLP_TIMEOUT_MS
    except ValueError:
        _logger.warning("sage-otel: OTLP timeout %r is not a number of milliseconds", raw)
        millis = DEFAULT_OTLP_TIMEOUT_MS
    return max(millis, 1.0) / 1000.0


def _otlp_span_exporter() -> SpanExporter:
    if _otlp_protocol("TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(timeout=otlp_timeout("TRACES"))


def _otlp_metric_reader() -> MetricReader:
    if _otlp_protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    timeout = otlp_timeout("METRICS")
    return PeriodicExportingMetricReader(
        OTLPMetricExporter(timeout=timeout), export_timeout_millis=timeout * 1000
    )


def configure(
    *,
    service_name: str | None = None,
    service_version: str | None = None,
    resource_attributes: dict[str, Any] | None = None,
    metrics_host: str | None = None,
    metrics_port: int | None = None,
    metrics_web_config: str | None = None,
    serve_metrics: bool = True,
    otlp: bool | None = None,
    traces: bool = True,
    sampler: Sampler | None = None,
    span_processors: list[SpanProcessor] | None = None,
    metric_readers: list[MetricReader] | None = None,
    instrument: bool = True,
    crypto_detail: str | None = None,
    inbound_trace_context: str | None = None,
    set_global: bool = True,
) -> Telemetry:
    """Set up traces and metrics for this process; calling it again returns the same setup.

    A second call that sets an option to something other than its default and the first
    call's value warns (``RuntimeWarning``, naming the options) and changes nothing: one
    process has one setup. ``otlp=None`` exports over OTLP exactly when an OTLP endpoint is
    configured in the environment. ``traces=False`` records metrics only: no span is ever
    started. ``metrics_port=0`` picks a free port (see ``Telemetry.metrics_address``).
    ``metrics_web_config`` (or ``SAGE_OTEL_METRICS_WEB_CONFIG``) adds TLS and basic auth to
    /metrics (:mod:`sage_otel.telemetry.web`). ``crypto_detail`` and
    ``inbound_trace_context`` go to the instrumentation (:mod:`sage_otel.instrumentation`).
    Raises ``OSError`` when the metrics port cannot be bound. docs/api.md has the table.
    """
    options = dict(locals())  # exactly the arguments: what a later call is compared with
    with _lock:
        if _current is not None:
            _warn_if_ignored(_current.options, options)
            return _current
        if sdk_disabled():
            # Nothing opened, nothing patched: the SDK's providers are no-ops under this flag.
            return Telemetry(
                Resource.get_empty(),
                TracerProvider(),
                MeterProvider(),
                MetricStore(),
                CollectorRegistry(),
                disabled=True,
                options=options,
            )
        return _start(options)


def _warn_if_ignored(first: dict[str, Any], again: dict[str, Any]) -> None:
    """Warn about the options of a later ``configure()`` call that the first setup ignores.

    An option left at its default asks for nothing (``configure()`` is how a library finds
    the process's setup), so only options set to something else and unlike the first
    call's are named.
    """
    defaults = {name: p.default for name, p in inspect.signature(configure).parameters.items()}
    ignored = [
        name
        for name, value in again.items()
        if value is not defaults[name] and value != defaults[name] and value != first.get(name)
    ]
    if ignored:
        shown = ", ".join(f"{name}={reprlib.repr(again[name])}" for name in ignored)
        warnings.warn(
            f"sage_otel.configure() was already called; ignoring {shown} (first call: "
            + ", ".join(f"{name}={reprlib.repr(first.get(name))}" for name in ignored)
            + "): call shutdown() on the first setup to configure again",
            RuntimeWarning,
            stacklevel=3,
        )


def _start(
    options: dict[str, Any], resource: Resource | None = None, *, forked: bool = False
) -> Telemetry:
    """Build and install the setup ``options`` (``configure``'s arguments) ask for.

    ``forked``: renewing in a child after fork, which serves no /metrics (the port is the
    parent's) and sets no global provider (the parent's cannot be replaced).
    """
    global _current
    serve_metrics: bool = options["serve_metrics"] and not forked
    metrics_port: int | None = options["metrics_port"]
    metric_readers: list[MetricReader] | None = options["metric_readers"]
    otlp: bool | None = options["otlp"]
    traces: bool = options["traces"]
    os.environ.setdefault("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    for name in _EXPORT_LOGGERS:
        logging.getLogger(name).addFilter(_export_log_filter)
    # The batch processor warns once per span it drops while its queue is full: a log
    # record per span is a real cost when the collector is down. The drops are counted
    # (otel_sdk_processor_span_processed_total{error_type="queue_full"}) and the
    # exporters' own failures are still logged, once a minute each.
    queue_logger = logging.getLogger(_QUEUE_LOGGER)
    if queue_logger.level == logging.NOTSET:
        queue_logger.setLevel(logging.ERROR)
    resource = resource or build_resource(
        options["service_name"], options["resource_attributes"], options["service_version"]
    )
    shared_dir = multiprocess_dir()

    registry = CollectorRegistry(auto_describe=True)
    readers: list[MetricReader] = list(metric_readers or ())
    server, address = None, None
    if shared_dir is not None and metrics_port is None:
        serve_metrics = False  # one endpoint reports every worker; workers do not bind
    if serve_metrics:
        host = (
            options["metrics_host"]
            or os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST")
            or DEFAULT_METRICS_HOST
        )
        port = (
            metrics_port
            if metrics_port is not None
            else int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT") or DEFAULT_METRICS_PORT)
        )
        served = multiprocess_registry(shared_dir) if shared_dir else registry
        server, _thread = start_metrics_server(
            port,
            host,
            served,
            options["metrics_web_config"] or os.environ.get(WEB_CONFIG_ENV) or None,
        )
        address = (host, server.server_address[1])
        if shared_dir is None:
            for collector in (ProcessCollector, GCCollector, PlatformCollector):
                collector(registry=registry)
            readers.append(ExemplarPrometheusMetricReader(registry))
    if otlp if otlp is not None else otlp_configured("METRICS"):
        readers.append(_otlp_metric_reader())
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)

    tracer_provider = TracerProvider(resource=resource, sampler=options["sampler"])
    for processor in options["span_processors"] or ():
        tracer_provider.add_span_processor(processor)
    if otlp if otlp is not None else otlp_configured("TRACES"):
        tracer_provider.add_span_processor(
            BatchSpanProcessor(_otlp_span_exporter(), meter_provider=meter_provider)
        )

    store = MetricStore()
    store.exemplars = True  # only sampled spans leave exemplars, so this costs nothing unsampled
    for reader in readers:
        store.attach(reader, resource)
    meters: Meters = StoreMeters(store)
    if shared_dir is not None:
        shared = MultiprocessMeters()
        meters = BothMeters(shared, meters) if readers else shared

    telemetry = Telemetry(
        resource,
        tracer_provider,
        meter_provider,
        store,
        registry,
        address,
        server,
        meters=meters,
        options=options,
    )
    if options["set_global"] and not forked:
        if traces:
            trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    _current = telemetry
    if options["instrument"]:
        from ..instrumentation import SageInstrumentor

        instrumentor = SageInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(
                tracer_provider=tracer_provider if traces else trace.NoOpTracerProvider(),
                meters=telemetry.meters,
                crypto_detail=options["crypto_detail"],
                inbound_trace_context=options["inbound_trace_context"],
            )
            telemetry._instrumentor = instrumentor
    return telemetry


def _renew_after_fork() -> None:
    """In a forked child (gunicorn ``--preload``): fresh telemetry, not the parent's.

    The child gets its own ``service.instance.id``, a store starting from zero and its own
    exporting threads; it never serves the parent's /metrics port. The instrumentation is
    re-bound to the new setup. A global provider the parent set cannot be replaced (the
    OpenTelemetry API forbids it), so tracers taken from the global API keep the parent's
    resource; sage-otel's own spans and metrics use the new one.
    """
    global _current
    inherited = _current
    if inherited is None or inherited.disabled:
        return
    _current = None
    try:
        if inherited._instrumentor is not None:
            inherited._instrumentor.uninstrument()
        inherited._server = None  # the listening socket belongs to the parent
        # The parent's resource with a new instance id: resource detection would use a
        # thread pool, which cannot start inside an at-fork hook.
        attributes = dict(inherited.resource.attributes)
        attributes["service.instance.id"] = str(uuid.uuid4())
        with _lock:
            _start(
                inherited.options,
                Resource(attributes, inherited.resource.schema_url),
                forked=True,
            )
    except Exception:  # telemetry must never break the worker
        _logger.exception("sage-otel: could not renew telemetry after fork")


os.register_at_fork(after_in_child=_renew_after_fork)
