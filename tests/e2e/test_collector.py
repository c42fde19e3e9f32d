"""The collector distribution end to end: sage-otel demo -> OTLP -> sage-otelcol running
collector/otel-collector.yaml -> Prometheus 3 (its OTLP receiver) and Jaeger v2 (standing in
for Tempo, over the same OTLP gRPC exporter), and from a Prometheus exemplar back to its
trace. The remote-write overlay is compared with this path in test_ingestion_paths.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sage_otel.telemetry.catalog import INSTRUMENTS, Kind

from . import services
from .promql import alert_rules, measured
from .services import COLLECTOR_CONFIG, REMOTE_WRITE_OVERLAY, Collector, Jaeger, Prometheus

pytestmark = pytest.mark.e2e

DEMO_SERVICE = "sage-otel-demo"
DEMO_SECONDS = 8
EXEMPLAR_HISTOGRAM = "sage_message_processing_duration_seconds_bucket"


def expected_names() -> set[str]:
    """The catalog's (§2.1) Prometheus names, as series names: histograms by their parts."""
    names = set()
    for instrument in INSTRUMENTS:
        if instrument.kind is Kind.HISTOGRAM:
            names.update(
                instrument.prometheus_name + part for part in ("_bucket", "_count", "_sum")
            )
        else:
            names.add(instrument.prometheus_name)
    return names


@pytest.mark.parametrize(
    "configs",
    [[COLLECTOR_CONFIG], [COLLECTOR_CONFIG, REMOTE_WRITE_OVERLAY]],
    ids=["otlp", "remote-write-overlay"],
)
def test_validate(configs: list[Path]) -> None:
    collector = services.binary("sage-otelcol")
    result = subprocess.run(
        [collector, "validate", *(f"--config={path}" for path in configs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_components_match_the_manifest() -> None:
    """The built distribution has exactly the manifest's modules, all at one release."""
    collector = services.binary("sage-otelcol")
    listing = subprocess.run(
        [collector, "components"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    manifest = (COLLECTOR_CONFIG.parent / "builder-config.yaml").read_text()
    wanted = {
        line.split("gomod:", 1)[1].strip()
        for line in manifest.splitlines()
        if line.strip().startswith("- gomod:")
    }
    built = {
        line.split("module:", 1)[1].strip()
        for line in listing.splitlines()
        if line.strip().startswith("module:")
    }
    assert built == wanted
    releases = {module.rsplit(" v", 1)[1] for module in wanted if "/provider/" not in module}
    assert len(releases) == 1, releases


@dataclass
class Stack:
    prometheus: Prometheus
    jaeger: Jaeger
    collector: Collector
    summary: dict[str, Any]
    started: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Jaeger, Prometheus and the collector on loopback ports; the demo run once through them."""
    tmp = tmp_path_factory.mktemp("collector-e2e")
    with services.jaeger(tmp) as jaeger:
        env = services.collector_env(TEMPO_ENDPOINT=jaeger.otlp_grpc)
        collector_metrics = f"{env['COLLECTOR_METRICS_HOST']}:{env['COLLECTOR_METRICS_PORT']}"
        with services.prometheus(
            tmp, {"otel-collector": [collector_metrics]}, remote_write=False, otlp=True
        ) as prometheus:
            env["PROMETHEUS_OTLP_ENDPOINT"] = prometheus.otlp_url
            with services.collector(COLLECTOR_CONFIG, env, log_dir=tmp) as collector:
                started = time.time()
                summary = run_demo(collector, tmp)
                yield Stack(prometheus, jaeger, collector, summary, started)


def run_demo(collector: Collector, tmp: Path) -> dict[str, Any]:
    # Only the endpoint and intervals below: no OTEL_* setting of the caller's leaks in.
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.otlp_http,  # http/protobuf, the SDK's default
        OTEL_METRIC_EXPORT_INTERVAL="1000",
        OTEL_BSP_SCHEDULE_DELAY="500",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sage_otel.cli",
            "demo",
            "--in-process",  # every span of a trace from this one process
            "--duration",
            str(DEMO_SECONDS),
            "--json",
            "--metrics-host",
            services.LOOPBACK,
            "--metrics-port",
            str(services.free_port()),
        ],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS + 90,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_metrics_arrive_in_prometheus_through_the_collector(stack: Stack) -> None:
    prometheus = stack.prometheus
    # The demo's last export happens at its shutdown; the collector batches for up to 1s.
    services.wait_for(
        lambda: expected_names() <= prometheus.metric_names(),
        timeout=30,
        what="every catalog metric",
    )
    missing = expected_names() - prometheus.metric_names()
    assert not missing, f"catalog names that did not arrive over OTLP: {sorted(missing)}"

    # Every series pushed by the collector carries the demo's job and the resource
    # processor's deployment label (prometheus.yml's otlp.promote_resource_attributes); the
    # SDK's telemetry.sdk.* stay on target_info, and no otel_scope_* label is added.
    for sample in prometheus.query('{__name__=~"sage_.+"}'):
        labels = sample["metric"]
        assert labels.get("job") == DEMO_SERVICE, labels
        assert labels.get("deployment_environment") == "e2e", labels
        assert not [key for key in labels if key.startswith(("telemetry_", "otel_scope"))], labels
    target_info = prometheus.query(f'target_info{{job="{DEMO_SERVICE}"}}')
    assert target_info and target_info[0]["metric"].get("telemetry_sdk_language") == "python"

    # The demo's traffic shows up in the values, not just as zero series.
    summary = stack.summary
    assert summary["handshakes_ok"] > 0 and summary["messages_ok"] > 0
    for promql in (
        'sum(sage_handshakes_completed_total{status="success"})',
        'sum(sage_messages_processed_total{status="success"})',
        "sum(sage_crypto_operations_total)",
        "sum(sage_message_processing_duration_seconds_count)",
        "sum(sage_replay_attacks_detected_total)",
    ):
        value = float(prometheus.wait_for(promql)[0]["value"][1])
        assert value > 0, promql


def test_traces_arrive_in_the_trace_backend(stack: Stack) -> None:
    jaeger = stack.jaeger
    services.wait_for(lambda: DEMO_SERVICE in jaeger.services(), what="the demo's service")
    traces = services.wait_for(lambda: jaeger.traces(DEMO_SERVICE, limit=50), what="traces")
    operations = {span["operationName"] for trace in traces for span in trace["spans"]}
    assert any(name.startswith("sage.") for name in operations), operations
    # The resource processor ran on the traces pipeline too.
    process = next(iter(traces[0]["processes"].values()))
    tags = {tag["key"]: tag["value"] for tag in process["tags"]}
    assert tags.get("deployment.environment") == "e2e", tags


def test_exemplar_trace_ids_are_found_in_the_trace_backend(stack: Stack) -> None:
    prometheus, jaeger = stack.prometheus, stack.jaeger

    def exemplars() -> list[dict[str, Any]]:
        series = prometheus.query_exemplars(EXEMPLAR_HISTOGRAM, stack.started - 60, time.time())
        return [exemplar for entry in series for exemplar in entry["exemplars"]]

    found = services.wait_for(exemplars, what=f"exemplars on {EXEMPLAR_HISTOGRAM}")
    exemplar = found[-1]
    trace_id, span_id = exemplar["labels"]["trace_id"], exemplar["labels"]["span_id"]
    assert len(trace_id) == 32 and len(span_id) == 16, exemplar
    trace = services.wait_for(lambda: jaeger.find_trace(trace_id), what=f"trace {trace_id}")
    spans = {span["spanID"]: span for span in trace["spans"]}
    assert span_id in spans, f"exemplar span {span_id} not in trace {trace_id}"
    assert spans[span_id]["operationName"].startswith("sage."), spans[span_id]


def test_otlp_grpc_receiver(stack: Stack) -> None:
    """The gRPC receiver takes spans as well (the demo above used HTTP)."""
    trace_id = _send_probe_span(stack.collector.otlp_grpc)
    trace = services.wait_for(
        lambda: stack.jaeger.find_trace(trace_id), what=f"gRPC-sent trace {trace_id}"
    )
    assert [span["operationName"] for span in trace["spans"]] == ["sage.e2e.grpc-probe"]


def test_collector_reports_its_own_telemetry(stack: Stack) -> None:
    """Prometheus scrapes the collector's own /metrics: data accepted and sent, none refused."""
    prometheus = stack.prometheus
    prometheus.wait_for('up{job="otel-collector"} == 1')
    sent = prometheus.wait_for(
        'sum(otelcol_exporter_sent_metric_points{exporter="otlp_http/prometheus"}) > 0'
    )
    assert float(sent[0]["value"][1]) > 0
    prometheus.wait_for('sum(otelcol_exporter_sent_spans{exporter="otlp_grpc/tempo"}) > 0')
    failed = prometheus.query("sum(otelcol_exporter_send_failed_metric_points) or vector(0)")
    assert float(failed[0]["value"][1]) == 0, stack.collector.log()[-4000:]


def test_collector_down_alert_measures_the_scraped_collector(stack: Stack) -> None:
    expr = dict(alert_rules())["CollectorDown"]
    stack.prometheus.query(expr)  # the whole expression parses and evaluates
    up = stack.prometheus.wait_for(measured(expr))
    assert float(up[0]["value"][1]) == 1


def test_export_failures_alert_measures_a_failing_exporter(tmp_path: Path) -> None:
    """A collector whose trace backend is gone: the failure series appear and the alert's
    measurement turns positive. Retries are off in this copy of the config only, so the
    failure is counted at once instead of after the exporter's five minutes of retrying."""
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    config["exporters"]["otlp_grpc/tempo"]["retry_on_failure"] = {"enabled": False}
    failing_config = tmp_path / "otel-collector.yaml"
    failing_config.write_text(yaml.safe_dump(config))
    dead_backend = f"{services.LOOPBACK}:{services.free_port()}"  # nothing listens there
    env = services.collector_env(TEMPO_ENDPOINT=dead_backend)
    collector_metrics = f"{env['COLLECTOR_METRICS_HOST']}:{env['COLLECTOR_METRICS_PORT']}"
    expr = dict(alert_rules())["TelemetryExportFailures"]
    with services.prometheus(
        tmp_path, {"otel-collector": [collector_metrics]}, remote_write=False, otlp=True
    ) as prometheus:
        env["PROMETHEUS_OTLP_ENDPOINT"] = prometheus.otlp_url
        with services.collector(failing_config, env, log_dir=tmp_path) as collector:

            def failing_now() -> list[dict]:
                _send_probe_span(collector.otlp_grpc)  # keep failing: rate() needs an increase
                return [s for s in prometheus.query(measured(expr)) if float(s["value"][1]) > 0]

            measured_now = services.wait_for(failing_now, timeout=60, what="failed span exports")
            prometheus.query(expr)  # the whole expression parses and evaluates
    assert {s["metric"]["data_type"] for s in measured_now} == {"traces"}
    assert {s["metric"]["exporter"] for s in measured_now} == {"otlp_grpc/tempo"}


def _send_probe_span(endpoint: str) -> str:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "sage-e2e-grpc-probe"}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("e2e").start_as_current_span("sage.e2e.grpc-probe") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
    provider.shutdown()
    return trace_id
