"""``sage_otel.configure()`` in-process: its signature and documented table, the singleton,
the Resource, the OTEL_* environment, /metrics, sampling, OTLP (unreachable and real), and
what ``shutdown()`` flushes and stops.

Everything stays on 127.0.0.1: the OTLP "collector" is a tiny ``http.server`` in this test.
"""

from __future__ import annotations

import gzip
import http.server
import inspect
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)

import sage_otel
from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.transport import ClientAgent, ServerAgent
from sage_otel.telemetry import setup
from sage_otel.telemetry.catalog import INSTRUMENTS, Kind
from sage_otel.telemetry.setup import Telemetry
from support import fetch, free_port

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SAGE_METRIC_NAMES = {instrument.name for instrument in INSTRUMENTS}
HISTOGRAM_NAMES = {i.name for i in INSTRUMENTS if i.kind is Kind.HISTOGRAM}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
EXCHANGE_SPANS = {
    "sage.handshake",
    "sage.handshake.init",
    "sage.handshake.process",
    "sage.handshake.finalize",
    "sage.session.create",
    "sage.did.resolve",
    "sage.message.send",
    "sage.message.receive",
    "sage.message.process",
}


# --- helpers --------------------------------------------------------------------------------


def body_of(url: str, accept: str | None = None) -> str:
    return fetch(url, accept)[1]


def metrics_url(telemetry: Telemetry) -> str:
    assert telemetry.metrics_address is not None
    host, port = telemetry.metrics_address
    return f"http://{host}:{port}/metrics"


async def register(registry: InMemoryRegistry, identity: AgentIdentity) -> None:
    document = DIDDocument.for_identity(identity)
    await registry.register(document, sign_registration(identity, document))


async def loopback_exchange(messages: int = 20) -> float:
    """A real handshake and ``messages`` round trips on 127.0.0.1; returns their duration."""
    registry = InMemoryRegistry()
    server_identity = AgentIdentity.generate(Chain.SOLANA)
    client_identity = AgentIdentity.generate(Chain.ETHEREUM)
    await register(registry, server_identity)
    await register(registry, client_identity)
    server = ServerAgent(server_identity, DIDResolver(registry))
    port = await server.start("127.0.0.1", 0)
    client = ClientAgent(client_identity, DIDResolver(registry))
    try:
        start = time.perf_counter()
        conn = await client.connect(f"http://127.0.0.1:{port}", str(server_identity.did))
        for i in range(messages):
            payload: str | bytes = f"message {i}" if i % 2 else os.urandom(200 + i)
            assert await client.send(conn, payload) == payload
        elapsed = time.perf_counter() - start
        await client.close(conn)
        return elapsed
    finally:
        await client.aclose()
        await server.stop()


class RecordingMetricExporter(MetricExporter):
    """Keeps every MetricsData it is handed."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def exported_metric_names(exports: Sequence[MetricsData]) -> set[str]:
    return {
        metric.name
        for data in exports
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* setting or proxy from the outside; no telemetry left over from elsewhere."""
    for key in list(os.environ):
        if key.startswith("OTEL_") or key.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    leftover = setup.current()
    if leftover is not None:
        leftover.shutdown()
    yield
    leftover = setup.current()
    if leftover is not None:
        leftover.shutdown()


ConfigureFn = Callable[..., Telemetry]


@pytest.fixture
def configure() -> Iterator[ConfigureFn]:
    """``sage_otel.configure`` with ``set_global=False`` and ``metrics_port=0`` by default.

    Pass ``metrics_port=None`` to let the environment decide. Whatever is still configured
    at teardown is shut down.
    """

    def make(**kwargs: Any) -> Telemetry:
        kwargs.setdefault("set_global", False)
        kwargs.setdefault("metrics_port", 0)
        return sage_otel.configure(**kwargs)

    yield make
    leftover = setup.current()
    if leftover is not None:
        leftover.shutdown()


# --- the signature and its documentation -----------------------------------------------------


def test_configure_shows_its_real_signature() -> None:
    assert sage_otel.configure is setup.configure
    signature = inspect.signature(sage_otel.configure)
    assert signature == inspect.signature(setup.configure)
    parameters = list(signature.parameters.values())
    assert len(parameters) > 10 and "service_version" in signature.parameters
    for parameter in parameters:
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter
        assert parameter.annotation is not inspect.Parameter.empty, parameter
        assert parameter.default is not inspect.Parameter.empty, parameter
        assert not parameter.name.startswith("_"), f"{parameter} is private, yet public"
    # Every annotation names a real type (what type checkers and help() show).
    resolved = inspect.signature(sage_otel.configure, eval_str=True)
    assert resolved.return_annotation is Telemetry
    assert resolved.parameters["metrics_port"].annotation == int | None


def test_import_sage_otel_loads_no_opentelemetry() -> None:
    probe = (
        "import sys, sage_otel; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def documented_parameters() -> list[tuple[str, str, str, str]]:
    """(name, type, default, meaning) of each row of docs/api.md's parameter table."""
    text = API_MD.read_text(encoding="utf-8")
    section = text.split("\n## Parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        name, kind, default, meaning = cells
        rows.append((name.strip("`"), kind.strip("`"), default.strip("`"), meaning))
    return rows


def test_docs_table_lists_exactly_the_signature() -> None:
    rows = documented_parameters()
    documented = [(name, kind, default) for name, kind, default, _ in rows]
    actual = [
        (p.name, str(p.annotation), repr(p.default))
        for p in inspect.signature(sage_otel.configure).parameters.values()
    ]
    assert documented == actual
    assert all(meaning for *_, meaning in rows)


def test_the_package_is_typed() -> None:
    assert (Path(sage_otel.__file__).parent / "py.typed").is_file()


# --- the singleton --------------------------------------------------------------------------


def test_configure_is_idempotent(configure: ConfigureFn) -> None:
    first = configure()
    assert isinstance(first, Telemetry)
    assert setup.current() is first
    with pytest.warns(RuntimeWarning, match="service_name='another-name'"):
        second = configure(service_name="another-name", metrics_port=0)
    assert second is first
    assert first.resource.attributes["service.name"] == "sage-agent"
    first.shutdown()
    assert setup.current() is None
    third = configure()
    assert third is not first
    assert setup.current() is third


# --- the Resource ---------------------------------------------------------------------------


def test_resource_defaults(configure: ConfigureFn) -> None:
    attributes = configure().resource.attributes
    assert attributes["service.name"] == "sage-agent"
    # Only the application knows its version; sage-otel's is the distribution's.
    assert "service.version" not in attributes
    assert attributes["telemetry.distro.name"] == "sage-otel"
    assert attributes["telemetry.distro.version"] == sage_otel.__version__
    uuid.UUID(str(attributes["service.instance.id"]))
    assert attributes["telemetry.sdk.language"] == "python"


def test_a_second_call_with_other_settings_warns_and_keeps_the_first(
    configure: ConfigureFn,
) -> None:
    first = configure(service_name="first", crypto_detail="events")
    with pytest.warns(RuntimeWarning) as caught:
        second = configure(service_name="other", crypto_detail="spans", traces=False)
    assert second is first
    assert first.resource.attributes["service.name"] == "first"
    [warning] = caught
    message = str(warning.message)
    # Each ignored option with both values; nothing about the ones that agree.
    for named in (
        "service_name='other'",
        "service_name='first'",
        "crypto_detail='spans'",
        "crypto_detail='events'",
        "traces=False",
        "traces=True",
    ):
        assert named in message, message
    assert "metrics_port" not in message and "set_global" not in message, message
    assert warning.filename == __file__  # points at the caller's line, not at sage-otel


def test_a_second_call_with_the_same_settings_or_none_is_silent(configure: ConfigureFn) -> None:
    first = configure(service_name="same", crypto_detail="events")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configure(service_name="same", crypto_detail="events") is first
        assert configure() is first  # defaults ask for nothing: how a library finds the setup


def test_instance_id_is_fresh_per_configuration(configure: ConfigureFn) -> None:
    first = configure()
    first_id = first.resource.attributes["service.instance.id"]
    first.shutdown()
    assert configure().resource.attributes["service.instance.id"] != first_id


def test_the_environment_names_the_instance_and_version(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=agent-7,service.version=2.0.1"
    )
    attributes = configure().resource.attributes
    assert attributes["service.instance.id"] == "agent-7"
    assert attributes["service.version"] == "2.0.1"


def test_service_version_is_the_applications(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.version=2.0.1")
    attributes = configure(service_version="1.4.2").resource.attributes
    assert attributes["service.version"] == "1.4.2"  # the argument wins over the environment
    assert attributes["telemetry.distro.version"] == sage_otel.__version__


def test_otel_service_name(configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-agent")
    assert configure().resource.attributes["service.name"] == "billing-agent"


def test_otel_resource_attributes(configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci,team=sage")
    attributes = configure().resource.attributes
    assert attributes["deployment.environment.name"] == "ci"
    assert attributes["team"] == "sage"
    assert attributes["service.name"] == "sage-agent"
    assert "service.version" not in attributes


def test_service_name_from_resource_attributes(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert configure().resource.attributes["service.name"] == "from-attributes"


def test_otel_service_name_wins_over_resource_attributes(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-service-name")
    assert configure().resource.attributes["service.name"] == "from-service-name"


def test_explicit_arguments_win_over_the_environment(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    telemetry = configure(service_name="explicit", resource_attributes={"team": "core"})
    assert telemetry.resource.attributes["service.name"] == "explicit"
    assert telemetry.resource.attributes["team"] == "core"


# --- /metrics -------------------------------------------------------------------------------


def test_prometheus_port_and_host_from_environment(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    telemetry = configure(metrics_port=None)
    assert telemetry.metrics_address == ("localhost", port)
    assert "sage_sessions_created_total" in body_of(f"http://localhost:{port}/metrics")


def test_prometheus_port_from_environment_on_default_host(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    telemetry = configure(metrics_port=None)
    assert telemetry.metrics_address == ("127.0.0.1", port)
    assert "sage_sessions_created_total" in body_of(metrics_url(telemetry))


def test_explicit_metrics_port_wins_over_environment(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_port, explicit_port = free_port(), free_port()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(env_port))
    telemetry = configure(metrics_port=explicit_port)
    assert telemetry.metrics_address == ("127.0.0.1", explicit_port)


def test_metrics_port_zero_picks_a_free_port(configure: ConfigureFn) -> None:
    telemetry = configure(metrics_port=0)
    assert telemetry.metrics_address is not None
    host, port = telemetry.metrics_address
    assert host == "127.0.0.1"
    assert 0 < port < 65536
    body = body_of(metrics_url(telemetry))
    assert "sage_sessions_created_total" in body
    assert "process_cpu_seconds_total" in body


def test_metrics_port_in_use_raises_oserror(configure: ConfigureFn) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(OSError):
            configure(metrics_port=port, metrics_host="127.0.0.1")
    # A failed configuration leaves nothing behind: the next one starts from scratch.
    assert setup.current() is None
    telemetry = configure(metrics_port=0)
    assert setup.current() is telemetry


def test_serve_metrics_false_starts_no_server(configure: ConfigureFn) -> None:
    telemetry = configure(serve_metrics=False)
    assert telemetry.metrics_address is None


# --- sampling -------------------------------------------------------------------------------


async def test_default_sampler_records_sage_spans(configure: ConfigureFn) -> None:
    exporter = InMemorySpanExporter()
    telemetry = configure(span_processors=[SimpleSpanProcessor(exporter)])
    span = telemetry.tracer_provider.get_tracer("test").start_span("probe")
    assert span.get_span_context().trace_flags.sampled
    span.end()
    await loopback_exchange(messages=4)
    names = {s.name for s in exporter.get_finished_spans()}
    assert names >= EXCHANGE_SPANS, EXCHANGE_SPANS - names


async def test_always_off_sampler(configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    telemetry = configure(span_processors=[SimpleSpanProcessor(exporter)])
    span = telemetry.tracer_provider.get_tracer("test").start_span("probe")
    assert not span.get_span_context().trace_flags.sampled
    assert not span.is_recording()
    span.end()
    await loopback_exchange(messages=4)
    assert exporter.get_finished_spans() == ()
    # Metrics are still recorded, but no exemplar can point at an unsampled trace.
    families = {f.name: f for f in parse_openmetrics(body_of(metrics_url(telemetry), OPENMETRICS))}
    processed = [
        s for s in families["sage_messages_processed"].samples if s.labels["status"] == "success"
    ]
    # Both agents open session messages: the server its requests, the client their replies.
    assert sum(s.value for s in processed) >= 4
    sage_samples = [s for n, f in families.items() if n.startswith("sage_") for s in f.samples]
    assert all(s.exemplar is None for s in sage_samples)


# --- shutdown -------------------------------------------------------------------------------


async def test_shutdown_flushes_and_stops_the_metrics_server(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing would leave on its own before shutdown: long delays, big batches.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    spans = InMemorySpanExporter()
    metrics = RecordingMetricExporter()
    reader = PeriodicExportingMetricReader(metrics, export_interval_millis=600_000)
    telemetry = configure(
        span_processors=[BatchSpanProcessor(spans, schedule_delay_millis=600_000)],
        metric_readers=[reader],
    )
    assert telemetry.metrics_address is not None
    host, port = telemetry.metrics_address
    assert "sage_" in body_of(metrics_url(telemetry))
    await loopback_exchange(messages=3)
    assert spans.get_finished_spans() == ()

    telemetry.shutdown()

    assert setup.current() is None
    assert {s.name for s in spans.get_finished_spans()} >= EXCHANGE_SPANS
    assert exported_metric_names(metrics.exports) >= SAGE_METRIC_NAMES
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()


# --- OTLP: an unreachable collector ---------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_unreachable_otlp_endpoint_neither_blocks_nor_slows_sage(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    rounds = 5
    # Without OTLP: the baseline, measured in this same test.
    baseline = configure()
    await loopback_exchange()  # warm-up (imports, first connections)
    without = [await loopback_exchange() for _ in range(rounds)]
    baseline.shutdown()

    dead_port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "1000")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export attempts during the run
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_TIMEOUT", "1000")
    telemetry = configure()
    await loopback_exchange()
    with_otlp = [await loopback_exchange() for _ in range(rounds)]

    assert statistics.median(with_otlp) <= 3 * statistics.median(without), (without, with_otlp)
    assert max(with_otlp) < 2.0, with_otlp  # never blocked on the exporter

    start = time.monotonic()
    telemetry.shutdown()
    elapsed = time.monotonic() - start
    # Two signals, each flushed within its 1 s OTLP timeout (plus a retry back-off), and
    # the /metrics server stopped: far below the 10 s default timeout of even one export.
    assert elapsed < 5.0, f"shutdown took {elapsed:.2f}s with an unreachable collector"
    assert setup.current() is None


# --- OTLP: real (tiny) collectors ---------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class OtlpHttpReceiver:
    """An OTLP/HTTP endpoint on 127.0.0.1 that records every POST and answers 200, empty."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                    body = gzip.decompress(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append(Received(self.path, headers, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpHttpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


class OtlpGrpcReceiver:
    """An OTLP/gRPC endpoint on 127.0.0.1 that records every export and its metadata."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2,
            metrics_service_pb2_grpc,
        )
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.traces: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []
        self.metrics: list[tuple[dict[str, str], ExportMetricsServiceRequest]] = []
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver.traces.append((dict(context.invocation_metadata()), request))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver.metrics.append((dict(context.invocation_metadata()), request))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> OtlpGrpcReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop(grace=None).wait(5)


def check_exported_telemetry(
    trace_requests: Sequence[ExportTraceServiceRequest],
    metric_requests: Sequence[ExportMetricsServiceRequest],
    service_name: str,
    messages: int,
) -> None:
    """What one loopback exchange must have put on the wire, whatever the OTLP protocol."""
    # Traces: the SAGE spans, one trace from the client's send to the server's processing.
    spans = []
    for request in trace_requests:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert resource["service.name"] == service_name
            # No version given: none reported, sage-otel's own is the distribution's.
            assert "service.version" not in resource
            assert resource["telemetry.distro.version"] == sage_otel.__version__
            for ss in rs.scope_spans:
                assert (ss.scope.name, ss.scope.version) == (
                    "sage_otel.instrumentation",
                    sage_otel.__version__,
                )
                spans.extend(ss.spans)
    names = {span.name for span in spans}
    assert names >= EXCHANGE_SPANS, EXCHANGE_SPANS - names
    assert all(name.startswith("sage.") for name in names), names
    by_id = {span.span_id: span for span in spans}
    sends = {span.trace_id for span in spans if span.name == "sage.message.send"}
    # The server processes each request inside its receive span, which links the client's
    # send (trace context from a request not yet authenticated: a link, docs/tracing.md).
    processed = [
        span
        for span in spans
        if span.name == "sage.message.process"
        and by_id.get(span.parent_span_id) is not None
        and by_id[span.parent_span_id].name == "sage.message.receive"
    ]
    assert len(processed) == messages
    for span in processed:
        receive = by_id[span.parent_span_id]
        assert span.trace_id == receive.trace_id and span.trace_id not in sends
        [link] = receive.links
        assert link.trace_id in sends and by_id[link.span_id].name == "sage.message.send"

    # Metrics: every catalog instrument, exemplars on some histogram points.
    points: dict[str, list[Any]] = {}
    for request in metric_requests:
        for rm in request.resource_metrics:
            resource = {a.key: a.value.string_value for a in rm.resource.attributes}
            assert resource["service.name"] == service_name
            for sm in rm.scope_metrics:
                if any(metric.name.startswith("sage.") for metric in sm.metrics):
                    assert (sm.scope.name, sm.scope.version) == ("sage_otel", sage_otel.__version__)
                for metric in sm.metrics:
                    data = getattr(metric, metric.WhichOneof("data"))
                    points.setdefault(metric.name, []).extend(data.data_points)
    assert set(points) >= SAGE_METRIC_NAMES, SAGE_METRIC_NAMES - set(points)
    histogram_exemplars = [
        exemplar for name in HISTOGRAM_NAMES for p in points[name] for exemplar in p.exemplars
    ]
    assert histogram_exemplars, "no exemplar on any exported SAGE histogram point"
    for exemplar in histogram_exemplars:
        assert len(exemplar.trace_id) == 16 and any(exemplar.trace_id)
        assert len(exemplar.span_id) == 8 and any(exemplar.span_id)
    exported_trace_ids = {span.trace_id for span in spans}
    assert any(e.trace_id in exported_trace_ids for e in histogram_exemplars)

    def total(name: str, **labels: str) -> float:
        return max(  # cumulative: the last export of a series holds its total
            [
                p.as_int or p.as_double
                for p in points[name]
                if all(
                    any(a.key == k and a.value.string_value == v for a in p.attributes)
                    for k, v in labels.items()
                )
            ],
            default=0,
        )

    # Both agents open session messages: the server each request, the client each reply.
    assert total("sage.messages.processed", type="text", status="success") >= messages // 2
    assert total("sage.messages.processed", type="binary", status="success") >= messages // 2
    assert total("sage.messages.processed", status="failure") == 0
    assert total("sage.handshakes.completed", status="success") >= 1
    assert total("sage.sessions.created", status="success") >= 1


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as running:
        yield running


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as running:
        yield running


def otlp_env(monkeypatch: pytest.MonkeyPatch, port: int, protocol: str) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sage-otlp-test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=abc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5000")  # milliseconds, per the spec
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only shutdown exports
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")


async def test_otlp_http_export_to_a_real_receiver(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch, http_receiver: OtlpHttpReceiver
) -> None:
    otlp_env(monkeypatch, http_receiver.port, "http/protobuf")
    telemetry = configure()
    await loopback_exchange(messages=20)
    assert http_receiver.on("/v1/traces") == []  # nothing leaves before the flush
    telemetry.shutdown()  # flushes both signals

    traces, metrics = http_receiver.on("/v1/traces"), http_receiver.on("/v1/metrics")
    assert traces, [r.path for r in http_receiver.requests]
    assert metrics, [r.path for r in http_receiver.requests]
    for request in traces + metrics:
        assert request.headers.get("x-api-key") == "abc", request.headers
        assert request.headers.get("content-type") == "application/x-protobuf"
    check_exported_telemetry(
        [ExportTraceServiceRequest.FromString(r.body) for r in traces],
        [ExportMetricsServiceRequest.FromString(r.body) for r in metrics],
        "sage-otlp-test",
        messages=20,
    )


async def test_otlp_grpc_export_to_a_real_receiver(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch, grpc_receiver: OtlpGrpcReceiver
) -> None:
    otlp_env(monkeypatch, grpc_receiver.port, "grpc")
    telemetry = configure()
    await loopback_exchange(messages=20)
    telemetry.shutdown()

    assert grpc_receiver.traces
    assert grpc_receiver.metrics
    for metadata, _ in grpc_receiver.traces + grpc_receiver.metrics:
        assert metadata.get("x-api-key") == "abc", metadata
    check_exported_telemetry(
        [request for _, request in grpc_receiver.traces],
        [request for _, request in grpc_receiver.metrics],
        "sage-otlp-test",
        messages=20,
    )


async def test_per_signal_endpoint_sends_only_that_signal(
    configure: ConfigureFn, monkeypatch: pytest.MonkeyPatch, http_receiver: OtlpHttpReceiver
) -> None:
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{http_receiver.port}/v1/traces"
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5000")  # milliseconds, per the spec
    telemetry = configure()
    await loopback_exchange(messages=2)
    telemetry.shutdown()
    assert http_receiver.on("/v1/traces")
    assert http_receiver.on("/v1/metrics") == []
