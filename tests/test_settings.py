"""Settings that do what they say, and a telemetry backend that is down costs nothing."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import sage_otel
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.transport import ClientAgent
from sage_otel.telemetry import setup
from support import fetch, free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("OTEL_") or key.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield
    leftover = setup.current()
    if leftover is not None:
        leftover.shutdown()


def test_sdk_disabled_opens_nothing_and_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_otel.agent import transport

    port = free_port()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry = sage_otel.configure(metrics_port=port, set_global=False)
    assert telemetry.disabled and telemetry.metrics_address is None
    assert not hasattr(transport.ClientAgent.connect, "__wrapped__")
    with socket.socket() as probe:  # the port was never bound
        probe.bind(("127.0.0.1", port))
    assert setup.current() is None


@pytest.mark.parametrize(
    ("attributes", "service_name", "expected"),
    [
        ("app.service.name=x", None, setup.DEFAULT_SERVICE_NAME),
        ("service.name=from-attributes,team=a", None, "from-attributes"),
        ("service.name=from-attributes", "explicit", "explicit"),
        ("", None, setup.DEFAULT_SERVICE_NAME),
    ],
)
def test_resource_attributes_are_parsed_not_searched(
    monkeypatch: pytest.MonkeyPatch, attributes: str, service_name: str | None, expected: str
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", attributes)
    resource = setup.build_resource(service_name)
    assert resource.attributes["service.name"] == expected
    if "app.service.name" in attributes:
        assert resource.attributes["app.service.name"] == "x"


def test_otel_service_name_wins_over_resource_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=a")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "b")
    assert setup.build_resource().attributes["service.name"] == "b"


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}, 2.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "2000", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "500"}, 0.5),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, 10.0),
    ],
)
def test_otlp_timeout_is_milliseconds(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], seconds: float
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert setup.otlp_timeout("TRACES") == seconds


def test_connecting_to_an_impossible_port_fails_the_same_with_instrumentation() -> None:
    from sage_otel.agent.did import DIDResolver, InMemoryRegistry
    from sage_otel.instrumentation import SageInstrumentor

    async def attempt() -> tuple[type, str]:
        client = ClientAgent(AgentIdentity.generate("sol"), DIDResolver(InMemoryRegistry()))
        try:
            await client.connect("http://127.0.0.1:99999", "did:sage:sol:agent")
        except Exception as exc:  # the outcome, whatever it is, must not change
            return type(exc), getattr(exc, "code", "")
        finally:
            await client.aclose()
        return type(None), ""

    bare = asyncio.run(attempt())
    instrumentor = SageInstrumentor()
    instrumentor.instrument()
    try:
        instrumented = asyncio.run(attempt())
    finally:
        instrumentor.uninstrument()
    assert instrumented == bare and bare[0] is not ValueError


class BlackHole:
    """A TCP listener that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
@pytest.mark.parametrize("backend", ["refused", "black hole"])
def test_shutdown_is_bounded_whatever_the_backend_does(
    monkeypatch: pytest.MonkeyPatch, protocol: str, backend: str
) -> None:
    hole = BlackHole() if backend == "black hole" else None
    port = hole.port if hole else free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30000")  # a patient exporter
    try:
        telemetry = sage_otel.configure(metrics_port=0, set_global=False)
        tracer = telemetry.tracer_provider.get_tracer("t")
        for _ in range(50):
            tracer.start_span("x").end()
        started = time.monotonic()
        telemetry.shutdown(timeout=2.0)
        assert time.monotonic() - started < 3.0
    finally:
        if hole:
            hole.close()


def test_dropped_spans_show_as_sdk_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "200")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    telemetry = sage_otel.configure(metrics_port=0, set_global=False)
    tracer = telemetry.tracer_provider.get_tracer("t")
    for _ in range(100):
        tracer.start_span("x").end()
    host, port = telemetry.metrics_address
    _type, text = fetch(f"http://{host}:{port}/metrics")
    drops = [
        line
        for line in text.splitlines()
        if line.startswith("otel_sdk_processor_span_processed")
        and 'error_type="queue_full"' in line
    ]
    assert drops and float(drops[0].rsplit(" ", 1)[1]) >= 80
    telemetry.shutdown(timeout=1.0)


def test_export_failures_are_logged_once_a_minute() -> None:
    import logging

    log_filter = setup.OncePerInterval(60.0)
    record = logging.LogRecord(
        "x", logging.WARNING, "", 0, "Queue full, dropping %s.", ("Span",), None
    )
    assert log_filter.filter(record)
    assert not any(log_filter.filter(record) for _ in range(1000))


def test_delta_temporality_preference_reaches_every_sage_series() -> None:
    from opentelemetry.sdk.metrics import Counter, Histogram, UpDownCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(
        preferred_temporality={Counter: delta, Histogram: delta, UpDownCounter: delta}
    )
    telemetry = sage_otel.configure(metric_readers=[reader], serve_metrics=False, set_global=False)
    meters = telemetry.meters
    counter = meters.counter("sessions_created", status="success")
    histogram = meters.histogram("handshake_duration", stage="init")

    def collect() -> dict:
        data = reader.get_metrics_data()
        return {
            metric.name: metric.data
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }

    counter.add(3)
    histogram.record(0.002)
    collect()  # the first interval
    counter.add(2)
    histogram.record(0.004)
    histogram.record(0.004)
    second = collect()  # each collection is the interval since the one before
    sums = second["sage.sessions.created"]
    assert sums.aggregation_temporality is delta
    point = next(p for p in sums.data_points if p.attributes == {"status": "success"})
    assert point.value == 2
    hist = second["sage.handshake.duration"]
    assert hist.aggregation_temporality is delta
    point = next(p for p in hist.data_points if p.attributes == {"stage": "init"})
    assert point.count == 2 and abs(point.sum - 0.008) < 1e-12


def test_otlp_temporality_preference_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_otel.telemetry.catalog import Kind
    from sage_otel.telemetry.store import _Delta

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    reader = setup._otlp_metric_reader()
    delta = _Delta.of(reader, 0)
    # The specification's "delta": counters and histograms; up-down counters stay cumulative.
    assert delta is not None and delta.kinds == {Kind.COUNTER, Kind.HISTOGRAM}
    reader.shutdown(timeout_millis=100)


def test_a_forked_child_gets_fresh_telemetry() -> None:
    """gunicorn --preload: configure() ran in the parent, then the worker was forked."""
    import json as _json

    telemetry = sage_otel.configure(serve_metrics=False, set_global=False)
    telemetry.meters.counter("sessions_created", status="success").add(5)
    parent_id = telemetry.resource.attributes["service.instance.id"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without running atexit hooks
        try:
            child = setup.current()
            cell = child.store.cell(
                next(
                    i
                    for i in __import__("sage_otel.telemetry.catalog", fromlist=["x"]).INSTRUMENTS
                    if i.key == "sessions_created"
                ),
                ("success",),
            )
            report = {
                "renewed": child is not telemetry,
                "instance": child.resource.attributes["service.instance.id"],
                "count": cell.value,
            }
            os.write(write, _json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = _json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert report["renewed"] and report["instance"] != parent_id and report["count"] == 0
    # The parent's own telemetry is untouched.
    assert setup.current() is telemetry


def test_export_resumes_when_the_backend_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[str] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            received.append(self.path)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    telemetry = sage_otel.configure(metrics_port=0, set_global=False)
    tracer = telemetry.tracer_provider.get_tracer("t")
    for _ in range(20):
        tracer.start_span("while down").end()
    time.sleep(1.0)  # the backend is down: those batches fail and are dropped
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for _ in range(20):
            tracer.start_span("after it came back").end()
        deadline = time.monotonic() + 10
        while "/v1/traces" not in received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "/v1/traces" in received
    finally:
        telemetry.shutdown(timeout=2.0)
        server.shutdown()
