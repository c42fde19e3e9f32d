"""The shipped collector lets only the catalog's metrics, with their own labels, through.

Whoever reaches the collector's OTLP receiver can push anything. collector/otel-collector.yaml
drops every metric that is not a catalog instrument (or one of the SDK's own otel.sdk.*
metrics) and every data point whose attributes are not exactly its instrument's labels with
values from their closed sets. Here a real agent (tests/e2e/ingestion_agent.py) exports
through sage-otelcol running that config into Prometheus 3's OTLP receiver and loses
nothing; then forged OTLP (``up``=0 for the agent's own job and instance, ``ALERTS``,
``scrape_*``, ``evil_metric``, a catalog metric with an extra label or a value outside its
set) is pushed through the same collector and only the well-formed catalog series arrive.
docs/security.md ("The telemetry pipeline") states what this proves and what it does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sage_otel.telemetry.catalog import INSTRUMENTS, Kind

from . import services
from .services import Collector, Prometheus

pytestmark = pytest.mark.e2e

FORGER = "forger-1"
FILTERED = "otelcol_processor_filter_datapoints_filtered"
# Names a forger would use: Prometheus' own series and any other prefix.
FORGED_NAMES = ("up", "ALERTS", "scrape_samples_scraped", "evil_metric")
DELTA, CUMULATIVE = 1, 2  # OTLP AggregationTemporality


@dataclass
class Pipeline:
    prometheus: Prometheus
    collector: Collector
    agent_instance: str
    filtered_after_agent: float


def _filtered(collector: Collector) -> float:
    """Data points the collector's filter processors dropped so far (0 before any)."""
    text = services.http_get(f"http://{collector.metrics_address}/metrics").decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(FILTERED + "{") or line.startswith(FILTERED + " ")
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("pipeline-trust")
    with contextlib.ExitStack() as stack:
        prometheus = stack.enter_context(
            services.prometheus(tmp / "prometheus", remote_write=False, otlp=True)
        )
        collector = stack.enter_context(
            services.collector(
                services.COLLECTOR_CONFIG,
                {"PROMETHEUS_OTLP_ENDPOINT": prometheus.otlp_url},
                log_dir=tmp,
            )
        )
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        args = [
            "--duration", "3",
            "--metrics-port", str(services.free_port()),
            "--otlp", collector.otlp_http + "/v1/metrics",
        ]  # fmt: skip
        agent = services.start_ingestion_agent(args, env, tmp)
        try:
            assert services.read_line(agent, 60).strip() == "ready"
            assert agent.stdin is not None
            agent.stdin.write("go\n")
            agent.stdin.flush()
            json.loads(services.read_line(agent, 60))  # the traffic is over
            # Every export after the traffic carries its final values; wait for two.
            services.wait_for(
                lambda: prometheus.query("sum(sage_handshakes_completed_total) > 0"),
                timeout=30,
                what="the agent's handshakes in Prometheus",
            )
            time.sleep(3)
            instance = prometheus.query("sage_sessions_active")[0]["metric"]["instance"]
            filtered = _filtered(collector)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
        yield Pipeline(prometheus, collector, instance, filtered)


def test_a_real_agent_loses_nothing(pipeline: Pipeline) -> None:
    """The allow-list covers everything an agent exports: no data point of it was dropped,
    and every catalog instrument reached Prometheus."""
    assert pipeline.filtered_after_agent == 0, pipeline.collector.log()[-3000:]
    names = pipeline.prometheus.metric_names()
    exposed = {
        i.prometheus_name + ("_count" if i.kind is Kind.HISTOGRAM else "") for i in INSTRUMENTS
    }
    missing = sorted(exposed - names)
    assert not missing, f"catalog metrics that did not arrive: {missing}"


def _attributes(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": key, "value": {"stringValue": value}} for key, value in values.items()]


def _gauge(name: str, value: float, labels: dict[str, str] | None = None) -> dict[str, Any]:
    point = {"asDouble": value, "timeUnixNano": str(time.time_ns())}
    return {
        "name": name,
        "gauge": {"dataPoints": [{**point, "attributes": _attributes(labels or {})}]},
    }


def _point(labels: dict[str, str], age: float = 0, **fields: Any) -> dict[str, Any]:
    """A data point timestamped ``age`` seconds ago, started a minute before that."""
    at = time.time_ns() - int(age * 1e9)
    return {
        **fields,
        "startTimeUnixNano": str(at - 60 * 10**9),
        "timeUnixNano": str(at),
        "attributes": _attributes(labels),
    }


def _sum(
    name: str,
    unit: str,
    value: float,
    labels: dict[str, str],
    *,
    temporality: int = CUMULATIVE,
    monotonic: bool = True,
    age: float = 0,
) -> dict[str, Any]:
    return {
        "name": name,
        "unit": unit,
        "sum": {
            "aggregationTemporality": temporality,
            "isMonotonic": monotonic,
            "dataPoints": [_point(labels, age, asDouble=value)],
        },
    }


def _histogram(
    name: str, unit: str, labels: dict[str, str], *, temporality: int = CUMULATIVE
) -> dict[str, Any]:
    point = _point(labels, count="1", sum=0.01, bucketCounts=["1", "0"], explicitBounds=[0.1])
    return {
        "name": name,
        "unit": unit,
        "histogram": {"aggregationTemporality": temporality, "dataPoints": [point]},
    }


def _handshakes(value: float, labels: dict[str, str], **options: Any) -> dict[str, Any]:
    return _sum("sage.handshakes.completed", "{handshake}", value, labels, **options)


def _push(collector: Collector, instance: str, metrics: list[dict[str, Any]]) -> None:
    """One OTLP/HTTP JSON request, as anyone who reaches the receiver can send."""
    body = {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": _attributes(
                        {"service.name": "sage-agent", "service.instance.id": instance}
                    )
                },
                "scopeMetrics": [{"scope": {"name": "sage_otel"}, "metrics": metrics}],
            }
        ]
    }
    request = urllib.request.Request(
        collector.otlp_http + "/v1/metrics",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_forged_metrics_and_labels_never_reach_prometheus(pipeline: Pipeline) -> None:
    """``up``=0 for the live agent's own instance (which would fire SageAgentDown), Prometheus'
    own names, any other name, an extra label and an out-of-set value are all dropped; a
    well-formed catalog series in the same request arrives, so the request was delivered."""
    prometheus, collector = pipeline.prometheus, pipeline.collector
    before = _filtered(collector)
    forged = [_gauge(name, 0, {"job": "sage-agent"}) for name in FORGED_NAMES]
    forged_labels = [
        _handshakes(1e6, {"status": "success", "evil": "x"}),
        _handshakes(1e6, {"status": "forged"}),
        _handshakes(1e6, {}),
    ]
    _push(collector, pipeline.agent_instance, forged)
    _push(collector, FORGER, [*forged_labels, _handshakes(7, {"status": "success"})])
    arrived = prometheus.wait_for(
        f'sage_handshakes_completed_total{{instance="{FORGER}"}}', timeout=30
    )
    assert [series["metric"].get("status") for series in arrived] == ["success"], arrived
    assert arrived[0]["value"][1] == "7"
    assert "evil" not in arrived[0]["metric"]
    # The first request was sent before the second, through the same batch processor.
    names = prometheus.metric_names()
    assert not names & set(FORGED_NAMES), names & set(FORGED_NAMES)
    assert not prometheus.query("up"), "a forged up reached Prometheus"
    forged_series = prometheus.query(f'{{instance="{FORGER}", __name__!="target_info"}}')
    assert [s["metric"]["__name__"] for s in forged_series] == ["sage_handshakes_completed_total"]
    dropped = len(FORGED_NAMES) + len(forged_labels)
    services.wait_for(
        lambda: _filtered(collector) - before >= dropped,
        timeout=10,
        what=f"{dropped} data points counted in {FILTERED}",
    )


def test_new_names_and_labels_create_no_series(pipeline: Pipeline) -> None:
    """50 pushes, each with a new metric name and a new label on a catalog metric (before
    the filter, 50 such pushes made 55 new series): not one new series."""
    prometheus, collector = pipeline.prometheus, pipeline.collector
    count = 'count({__name__=~".+"})'
    before = float(prometheus.query(count)[0]["value"][1])
    for i in range(50):
        _push(
            collector,
            pipeline.agent_instance,
            [
                _gauge(f"forged_{i}", i, {f"label_{i}": "x"}),
                _handshakes(i, {"status": "success", f"label_{i}": "x"}),
            ],
        )
    marker = "marker-after-50"
    _push(collector, marker, [_handshakes(1, {"status": "failure"})])
    prometheus.wait_for(f'sage_handshakes_completed_total{{instance="{marker}"}}', timeout=30)
    time.sleep(2)  # a later sample of the agent's own series is no new series
    after = float(prometheus.query(count)[0]["value"][1])
    # The marker's series and its target_info are the only new ones.
    assert after - before == 2, (before, after)
    assert not [name for name in prometheus.metric_names() if name.startswith("forged_")]


def test_rejected_pushes_raise_the_shipped_alert(pipeline: Pipeline, tmp_path: Path) -> None:
    """TelemetryRejected, from the shipped rules, goes active on the collector's own counter
    of what its filter dropped, while forged pushes keep coming (as scraped by Prometheus)."""
    collector = pipeline.collector
    _push(collector, pipeline.agent_instance, [_gauge("evil_metric", 1)])  # the counter exists
    rules = services.REPO / "collector" / "prometheus" / "alerts" / "sage-alerts.yml"
    with services.prometheus(
        tmp_path,
        {"otel-collector": [collector.metrics_address]},
        remote_write=False,
        rule_files=[rules],
    ) as watcher:
        watcher.wait_for('{__name__=~"otelcol_processor_filter_datapoints[._]filtered(_total)?"}')

        def active() -> list[dict[str, Any]]:
            _push(collector, pipeline.agent_instance, [_gauge("evil_metric", 1)])
            return watcher.query('ALERTS{alertname="TelemetryRejected"}')

        alerts = services.wait_for(active, timeout=60, interval=2, what="TelemetryRejected")
    assert {a["metric"]["job"] for a in alerts} == {"otel-collector"}
    assert {a["metric"]["alertstate"] for a in alerts} <= {"pending", "firing"}


def _samples(prometheus: Prometheus, instance: str) -> int:
    """Samples stored for ``instance``'s successful handshakes in the last 5 minutes."""
    series = f'sage_handshakes_completed_total{{instance="{instance}", status="success"}}'
    found = prometheus.query(f"count_over_time({series}[5m])")
    return int(found[0]["value"][1]) if found else 0


def test_points_prometheus_would_refuse_do_not_cost_the_batch(pipeline: Pipeline) -> None:
    """A delta sum, a delta histogram, a point 2 h old and one 1 h ahead make Prometheus'
    OTLP receiver refuse the whole request, and the exporter then drops every point batched
    with them (before the point conditions: 0 of 15 honest samples stored). They are dropped
    at the filter instead: a well-formed point in the same request arrives, and every one of
    an honest agent's 15 pushes, sent between such pushes, is stored."""
    prometheus, collector = pipeline.prometheus, pipeline.collector
    before = _filtered(collector)
    refused = [
        _handshakes(5, {"status": "success"}, temporality=DELTA),
        _histogram("sage.handshake.duration", "s", {"stage": "init"}, temporality=DELTA),
        _handshakes(5, {"status": "success"}, age=2 * 3600),
        _handshakes(5, {"status": "success"}, age=-3600),
    ]
    mixed, honest = "mixed-1", "honest-1"
    _push(collector, mixed, [*refused, _handshakes(3, {"status": "success"})])
    for i in range(15):
        _push(collector, mixed, refused)
        _push(collector, honest, [_handshakes(i + 1, {"status": "success"})])
        time.sleep(0.5)
    arrived = prometheus.wait_for(
        f'sage_handshakes_completed_total{{instance="{mixed}"}}', timeout=30
    )
    assert [series["value"][1] for series in arrived] == ["3"], arrived
    services.wait_for(
        lambda: _samples(prometheus, honest) == 15,
        timeout=30,
        what="the honest agent's 15 samples",
    )
    assert not prometheus.query(f'{{instance="{mixed}", __name__=~"sage_handshake_duration.*"}}')
    dropped = 16 * len(refused)
    services.wait_for(
        lambda: _filtered(collector) - before >= dropped,
        timeout=10,
        what=f"{dropped} data points counted in {FILTERED}",
    )


def test_a_wrong_unit_or_type_creates_no_new_name(pipeline: Pipeline) -> None:
    """Catalog names with another unit, type or monotonicity: before the shape conditions one
    push created sage_sessions_active_bytes, sage_server_requests (a gauge),
    sage_handshakes_completed_milliseconds_total and a forged histogram's _bucket, _count and
    _sum. Now none of them: only the well-formed marker in the same request arrives."""
    prometheus, collector = pipeline.prometheus, pipeline.collector
    served = {"operation": "message", "outcome": "served"}
    names_before = prometheus.metric_names()
    wrong = [
        _sum("sage.sessions.active", "By", 1, {}, monotonic=False),  # wrong unit
        _sum("sage.sessions.active", "{session}", 1, {}),  # monotonic: a counter
        {**_gauge("sage.server.requests", 1, served), "unit": "{request}"},
        _handshakes(1, {"status": "success"}) | {"unit": "ms"},
        _sum("sage.handshakes.completed", "{handshake}", 1, {"status": "success"}, monotonic=False),
        _histogram("sage.sessions.created", "{session}", {"status": "success"}),
        _histogram("sage.session.duration", "ms", {"operation": "create"}),
    ]
    marker = "marker-shapes"
    _push(collector, marker, [*wrong, _handshakes(2, {"status": "success"})])
    prometheus.wait_for(f'sage_handshakes_completed_total{{instance="{marker}"}}', timeout=30)
    new_names = prometheus.metric_names() - names_before
    assert not new_names, new_names
    series = prometheus.query(f'{{instance="{marker}", __name__!="target_info"}}')
    assert [s["metric"]["__name__"] for s in series] == ["sage_handshakes_completed_total"]
