"""The scale-out tiers on loopback, every process real (docs/scaling.md).

Four SAGE agents (two ``sage-otel serve`` server agents, two demo client agents driving
them) export OTLP to two agent-tier collectors (collector/tiers/agent.yaml), crossed so that
every trace between a client and its server passes through both. The agent collectors
route spans by trace id to two gateway collectors (collector/tiers/gateway.yaml), which tail
sample into Jaeger; metrics go by remote write to two Thanos routers in front of three
Thanos ingesters (replication factor 3), read back through ``thanos query``.

Two references run beside the system under test, fed by the same agents:
  - truth: the agent collectors also export every span to a second Jaeger and every sample
    to a plain Prometheus (a copy of agent.yaml with one more exporter per pipeline);
  - scrape: a single Prometheus scraping the four agents' /metrics, as without the tiers.

During the traffic one gateway is stopped and started again and one ingester is stopped
for good. Then: (1) every trace with an injected failure, a replay, a signature failure or
a slow handshake is in Jaeger whole (every span of both agents), and ordinary traces are
kept at the configured share within statistical bounds; (2) the plan's queries, every
dashboard query and every alert's measurement return data from Thanos, equal to what the
scraping Prometheus returns; (3) no sample and no kept trace was lost to the stops.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sage_otel.telemetry.catalog import INSTRUMENTS
from tools.dashboards import panel_queries
from tools.queries import PLAN_QUERIES

from . import services
from .promql import COLLECTOR_ALERTS, alert_rules, measured
from .services import Collector, Jaeger, Prometheus, ThanosQuery

pytestmark = pytest.mark.e2e

REPO = services.REPO
AGENT_CONFIG = REPO / "collector" / "tiers" / "agent.yaml"
GATEWAY_CONFIG = REPO / "collector" / "tiers" / "gateway.yaml"
SCALE_AGENT = Path(__file__).with_name("scale_agent.py")

TRAFFIC_SECONDS = 30
BASELINE_PERCENT = 25
DECISION_WAIT = "4s"
# Kept whatever the baseline says: a handshake span longer than this. Low here, so that every
# completed handshake of the run counts (about a dozen); ordinary traces are then the
# message exchanges, about 1,300 of them.
SLOW_HANDSHAKE_MS = 2
GATEWAY_DOWN = (8.0, 16.0)  # seconds into the traffic: one gateway stopped, then restarted
INGESTER_DOWN_AT = 12.0  # seconds into the traffic: one ingester stopped for good
ENVIRONMENT = "e2e"

RETRY = "Exporting failed. Will retry the request after interval."
REPLAY_CODES = {"replay_detected", "handshake_replay", "peer_replay"}
SIGNATURE_CODES = {"bad_signature", "digest_mismatch", "peer_signature"}


# ----------------------------------------------------------------------------- the run


class CountingRelay:
    """A loopback TCP relay that counts the bytes clients send through it: what one hop
    carries on the wire (gRPC framing and the exporter's gzip included)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.listener = socket.create_server((services.LOOPBACK, 0))
        self.address = f"{services.LOOPBACK}:{self.listener.getsockname()[1]}"
        self.sent = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        host, port = self.upstream.rsplit(":", 1)
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((host, int(port)), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self.listener.close()


@dataclass
class Agent:
    name: str
    service: str
    metrics: str  # host:port of its /metrics
    process: subprocess.Popen[str] = field(repr=False)


@dataclass
class Run:
    thanos: ThanosQuery
    truth_prometheus: Prometheus
    scrape: Prometheus
    truth_jaeger: Jaeger
    jaeger: Jaeger
    agent_collectors: list[Collector]
    agents: list[Agent]
    summaries: list[dict[str, Any]]
    traffic: tuple[float, float]  # wall-clock start and end of the traffic
    gateway_down: tuple[float, float]  # wall-clock stop and restart of gateway 2
    ingester_down: float  # wall-clock stop of ingester 3
    retries_during_outage: int  # retry log lines of the agent collectors while it was down
    gateway_1: Collector
    ingester_1: services.ThanosReceive
    span_relay: CountingRelay
    write_relay: CountingRelay
    evaluated_at: float = 0.0


def agent_env(service: str, instance: str, collector: Collector) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(
        OTEL_SERVICE_NAME=service,
        OTEL_RESOURCE_ATTRIBUTES=f"service.instance.id={instance}",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.otlp_http,
        OTEL_METRIC_EXPORT_INTERVAL="1000",
        OTEL_BSP_SCHEDULE_DELAY="500",
        # One organisation's fleet: servers continue their clients' traces, so that a trace
        # (and the tail-sampling decision on it) spans both agents (docs/scaling.md).
        OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT="parent",
    )
    return env


def read_line(process: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The next stdout line of ``process``, or fail after ``timeout`` seconds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line:
                return line.strip()
        if process.poll() is not None:
            break
    raise AssertionError(f"{what}: no output line (exit status {process.poll()})")


@contextlib.contextmanager
def agent_process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            argv, env=env, cwd=log.parent, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)


def truth_config(tmp: Path, jaeger: Jaeger, prometheus: Prometheus) -> Path:
    """agent.yaml with one more exporter per pipeline: every span and sample, unsampled."""
    config = yaml.safe_load(AGENT_CONFIG.read_text())
    config["exporters"]["otlp_grpc/truth"] = {
        "endpoint": jaeger.otlp_grpc,
        "tls": {"insecure": True},
    }
    truth_rw = json.loads(json.dumps(config["exporters"]["prometheus_remote_write"]))
    truth_rw["http"]["endpoint"] = prometheus.remote_write_url
    config["exporters"]["prometheus_remote_write/truth"] = truth_rw
    pipelines = config["service"]["pipelines"]
    pipelines["traces"]["exporters"].append("otlp_grpc/truth")
    pipelines["metrics"]["exporters"].append("prometheus_remote_write/truth")
    path = tmp / "agent-with-truth.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("scale-e2e")
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        truth_jaeger = enter(services.jaeger(tmp / "jaeger-truth"))
        jaeger = enter(services.jaeger(tmp / "jaeger"))
        truth_prometheus = enter(services.prometheus(tmp / "truth"))

        # The metrics store: three ingesters, two routers, one query.
        thanos_root = tmp / "thanos"
        ingesters = [
            enter(services.thanos_receive(thanos_root, f"ingester-{i}", replica=f"r{i}"))
            for i in (1, 2, 3)
        ]
        hashring = services.write_hashring(
            thanos_root / "hashring.json", [node.grpc for node in ingesters]
        )
        routers = [
            enter(services.thanos_receive(thanos_root, f"router-{i}", hashring=hashring))
            for i in (1, 2)
        ]
        thanos = enter(services.thanos_query(thanos_root, [node.grpc for node in ingesters]))

        # Gateways on fixed ports (gateway 2 comes back on its own).
        gateway_env = []
        for _ in (1, 2):
            env = services.collector_env(
                TRACE_BACKEND_ENDPOINT=jaeger.otlp_grpc,
                DECISION_WAIT=DECISION_WAIT,
                BASELINE_PERCENT=str(BASELINE_PERCENT),
                SLOW_HANDSHAKE_NS=str(SLOW_HANDSHAKE_MS * 1_000_000),
            )
            gateway_env.append(env)
        gateway_1 = enter(services.collector(GATEWAY_CONFIG, gateway_env[0], log_dir=tmp / "gw1"))
        gateway_2_running = services.collector(GATEWAY_CONFIG, gateway_env[1], log_dir=tmp / "gw2")
        gateway_2_running.__enter__()
        stack.callback(lambda: gateway_2_running.__exit__(None, None, None))

        agent_config = truth_config(tmp, truth_jaeger, truth_prometheus)
        # Gateway 1 (never stopped) and router 1 are reached through byte-counting relays:
        # the bytes per span and per sample of docs/scaling.md.
        span_relay = CountingRelay(gateway_env[0]["OTLP_GRPC_ENDPOINT"])
        stack.callback(span_relay.close)
        write_relay = CountingRelay(routers[0].remote_write_url.split("/")[2])
        stack.callback(write_relay.close)
        endpoints = f"[{span_relay.address}, {gateway_env[1]['OTLP_GRPC_ENDPOINT']}]"
        write_urls = [
            f"http://{write_relay.address}/api/v1/receive",
            routers[1].remote_write_url,
        ]
        agent_collectors = [
            enter(
                services.collector(
                    agent_config,
                    {
                        "GATEWAY_ENDPOINTS": endpoints,
                        "REMOTE_WRITE_URL": write_url,
                        "DEPLOYMENT_ENVIRONMENT": ENVIRONMENT,
                    },
                    log_dir=tmp / f"agent-collector-{i}",
                )
            )
            for i, write_url in ((1, write_urls[0]), (2, write_urls[1]))
        ]

        # Two server agents; each client agent exports through the other agent collector.
        agents: list[Agent] = []
        servers = []
        for i, collector in ((1, agent_collectors[0]), (2, agent_collectors[1])):
            work = tmp / f"server-{i}"
            work.mkdir()
            metrics = services.loopback()
            process = enter(
                agent_process(
                    [
                        sys.executable,
                        "-m",
                        "sage_otel.cli",
                        "serve",
                        "--host",
                        services.LOOPBACK,
                        "--port",
                        str(services.free_port()),
                        "--metrics-host",
                        services.LOOPBACK,
                        "--metrics-port",
                        metrics.rsplit(":", 1)[1],
                        "--identity",
                        str(work / "identity.json"),
                        "--registry",
                        str(work / "registry.json"),
                    ],
                    agent_env(f"sage-scale-server-{i}", f"server-{i}", collector),
                    work / "serve.log",
                )
            )
            first = dict(part.split("=", 1) for part in read_line(process, 60, "serve").split())
            servers.append((first, work / "registry.json"))
            agents.append(Agent(f"server-{i}", f"sage-scale-server-{i}", metrics, process))
        client_metrics = [services.loopback(), services.loopback()]

        targets: dict[str, Any] = {}
        for i in (1, 2):
            for kind, address in (
                ("server", agents[i - 1].metrics),
                ("client", client_metrics[i - 1]),
            ):
                labels = {
                    "job": f"sage-scale-{kind}-{i}",
                    "instance": f"{kind}-{i}",
                    "deployment_environment": ENVIRONMENT,
                }
                targets[f"{kind}-{i}"] = {
                    "static_configs": [{"targets": [address], "labels": labels}]
                }
        scrape = enter(services.prometheus(tmp / "scrape", targets, remote_write=False))

        started = time.time()
        for i, collector in ((1, agent_collectors[1]), (2, agent_collectors[0])):
            (first, registry) = servers[i - 1]
            work = tmp / f"client-{i}"
            work.mkdir()
            process = enter(
                agent_process(
                    [
                        sys.executable,
                        str(SCALE_AGENT),
                        "--server",
                        first["url"],
                        "--server-did",
                        first["did"],
                        "--registry",
                        str(registry),
                        "--duration",
                        str(TRAFFIC_SECONDS),
                        "--clients",
                        "3",
                        "--rate",
                        "8",
                        "--metrics-port",
                        client_metrics[i - 1].rsplit(":", 1)[1],
                    ],
                    agent_env(f"sage-scale-client-{i}", f"client-{i}", collector),
                    work / "client.log",
                )
            )
            agents.append(Agent(f"client-{i}", f"sage-scale-client-{i}", "", process))

        # The outages, during the traffic.
        time.sleep(max(0.0, started + GATEWAY_DOWN[0] - time.time()))
        gateway_2_running.__exit__(None, None, None)
        gateway_stopped = time.time()
        time.sleep(max(0.0, started + INGESTER_DOWN_AT - time.time()))
        ingesters[2].stop()
        ingester_stopped = time.time()
        time.sleep(max(0.0, started + GATEWAY_DOWN[1] - time.time()))
        retries_during_outage = sum(c.log().count(RETRY) for c in agent_collectors)
        gateway_2_running = services.collector(
            GATEWAY_CONFIG, gateway_env[1], log_dir=tmp / "gw2-restarted"
        )
        gateway_2 = gateway_2_running.__enter__()
        gateway_restarted = time.time()
        assert gateway_2.process.poll() is None

        summaries = []
        for agent in agents[2:]:
            line = read_line(agent.process, TRAFFIC_SECONDS + 60, agent.name)
            summaries.append(json.loads(line))
        ended = time.time()

        yield Run(
            thanos=thanos,
            truth_prometheus=truth_prometheus,
            scrape=scrape,
            truth_jaeger=truth_jaeger,
            jaeger=jaeger,
            agent_collectors=agent_collectors,
            agents=agents,
            summaries=summaries,
            traffic=(started, ended),
            gateway_down=(gateway_stopped, gateway_restarted),
            ingester_down=ingester_stopped,
            retries_during_outage=retries_during_outage,
            gateway_1=gateway_1,
            ingester_1=ingesters[0],
            span_relay=span_relay,
            write_relay=write_relay,
        )


# ----------------------------------------------------------------------------- traces


@dataclass
class Trace:
    trace_id: str
    spans: dict[str, dict[str, Any]]  # span id -> Jaeger span
    services: set[str]
    start: float  # seconds since the epoch


def collect_traces(jaeger: Jaeger, service_names: list[str]) -> dict[str, Trace]:
    traces: dict[str, Trace] = {}
    for service in service_names:
        for found in jaeger.traces(service, limit=100_000, lookback="1h"):
            processes = {key: p["serviceName"] for key, p in found["processes"].items()}
            trace = traces.setdefault(
                found["traceID"], Trace(found["traceID"], {}, set(), math.inf)
            )
            for span in found["spans"]:
                trace.spans[span["spanID"]] = span
                trace.services.add(processes[span["processID"]])
                trace.start = min(trace.start, span["startTime"] / 1e6)
    return traces


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def events(span: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {field["key"]: field["value"] for field in log.get("fields", [])}
        for log in span.get("logs", [])
    ]


def reasons(trace: Trace) -> set[str]:
    """Why the gateway must keep this trace whatever the baseline (empty: ordinary)."""
    why = set()
    for span in trace.spans.values():
        span_tags = tags(span)
        error_type = span_tags.get("error.type")
        if span_tags.get("otel.status_code") == "ERROR":
            why.add("error")
        for event in events(span):
            name = event.get("event")
            if name == "sage.replay_detected":
                why.add("replay")
            if name == "sage.crypto.verify" and event.get("sage.crypto.ok") is False:
                why.add("signature")
        if error_type in REPLAY_CODES:
            why.add("replay")
        if error_type in SIGNATURE_CODES:
            why.add("signature")
        slow = span["duration"] > SLOW_HANDSHAKE_MS * 1000  # microseconds
        if span["operationName"] == "sage.handshake" and slow:
            why.add("slow_handshake")
    return why


@pytest.fixture(scope="module")
def traces(run: Run) -> tuple[dict[str, Trace], dict[str, Trace]]:
    """(every span the agents exported, what the gateways kept), once both are settled."""
    names = [agent.service for agent in run.agents]
    end = run.traffic[1]

    def snapshot() -> tuple[dict[str, Trace], dict[str, Trace]]:
        # Traces of the traffic only: a server agent may still start one later (a sweep).
        return tuple(  # type: ignore[return-value]
            {tid: t for tid, t in collect_traces(jaeger, names).items() if t.start <= end}
            for jaeger in (run.truth_jaeger, run.jaeger)
        )

    def settled() -> tuple[dict[str, Trace], dict[str, Trace]] | None:
        # Retries delivered and decisions made: two snapshots a decision apart are the same.
        first = snapshot()
        time.sleep(float(DECISION_WAIT.rstrip("s")) + 3)
        second = snapshot()
        same = all(
            {t: set(x.spans) for t, x in a.items()} == {t: set(x.spans) for t, x in b.items()}
            for a, b in zip(first, second, strict=True)
        )
        return second if same else None

    return services.wait_for(settled, timeout=120, interval=1, what="traces to settle")


def test_the_run_had_traffic_and_failures(run: Run) -> None:
    for summary in run.summaries:
        assert summary["messages_ok"] > 100, summary
        assert summary["handshakes_ok"] > 5, summary
        assert summary["replays_rejected"] > 0, summary
        assert sum(summary["injected"].values()) > 10, summary
        assert not summary["unexpected_errors"], summary
    # The stopped gateway's share waited in the agent collectors' retry queues (the
    # load_balancing exporter's per-gateway queues have no metrics of their own).
    assert run.retries_during_outage > 0


def test_the_agent_collectors_dropped_nothing(run: Run, traces) -> None:
    for collector in run.agent_collectors:
        log = collector.log()
        assert "Dropping data" not in log and "Rejecting data" not in log, log[-3000:]
        assert collector_metric(collector, "otelcol_receiver_refused_spans") == 0
        assert collector_metric(collector, "otelcol_exporter_send_failed_metric_points") == 0


def test_failure_traces_arrive_whole(traces) -> None:
    truth, kept = traces
    must_keep = {tid: trace for tid, trace in truth.items() if reasons(trace)}
    found = set().union(*(reasons(trace) for trace in must_keep.values()))
    assert {"error", "replay", "signature", "slow_handshake"} <= found, found
    # Kept for their handshake alone, at least this many: at the 25% baseline, keeping all
    # of them by chance would happen once in about 65,000 runs.
    slow_only = [tid for tid, trace in must_keep.items() if reasons(trace) == {"slow_handshake"}]
    assert len(slow_only) >= 8, len(slow_only)
    # Some of them span both agents (a client's refused handshake and the server's refusal).
    assert any(len(trace.services) == 2 for trace in must_keep.values())
    missing = sorted(tid for tid in must_keep if tid not in kept)
    assert not missing, f"{len(missing)} of {len(must_keep)} must-keep traces lost: {missing[:5]}"
    partial = sorted(
        tid for tid, trace in must_keep.items() if set(kept[tid].spans) != set(trace.spans)
    )
    assert not partial, f"{len(partial)} must-keep traces incomplete: {partial[:5]}"


def test_failure_traces_survive_the_gateway_restart(run: Run, traces) -> None:
    truth, kept = traces
    stopped, restarted = run.gateway_down
    during = [
        tid
        for tid, trace in truth.items()
        if reasons(trace) and stopped <= trace.start <= restarted
    ]
    assert len(during) > 5, "no failure traffic while the gateway was down"
    assert all(tid in kept and set(kept[tid].spans) == set(truth[tid].spans) for tid in during)


def test_ordinary_traces_are_kept_at_the_baseline_share(traces) -> None:
    truth, kept = traces
    ordinary = [tid for tid, trace in truth.items() if not reasons(trace)]
    n = len(ordinary)
    k = sum(1 for tid in ordinary if tid in kept)
    p = BASELINE_PERCENT / 100
    assert n > 300, n
    # Binomial: within 5 standard deviations (a false alarm about once in 3.5 million runs).
    bound = 5 * math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= bound, f"kept {k} of {n} ordinary traces, expected {n * p:.0f}"
    # A kept trace is kept whole, across both agents.
    assert all(set(kept[tid].spans) == set(truth[tid].spans) for tid in ordinary if tid in kept)
    assert any(len(truth[tid].services) == 2 for tid in ordinary if tid in kept)


def test_nothing_kept_that_was_not_sent(traces) -> None:
    truth, kept = traces
    assert set(kept) <= set(truth)


# ----------------------------------------------------------------------------- metrics


def series_key(
    labels: dict[str, str], instances: dict[str, str] | None = None
) -> tuple[tuple[str, str], ...]:
    """A series' identity across the stores. Thanos adds its tenant label to everything;
    pushed series name their agent by service.instance.id, scraped ones by the target
    label the scrape config gives them (``instances`` maps the first to the second)."""
    labels = {k: v for k, v in labels.items() if k != "tenant_id"}
    if "le" in labels:  # /metrics writes 1.6e-05 where remote write writes 0.000016
        labels["le"] = repr(float(labels["le"]))
    if instances and labels.get("instance") in instances:
        labels["instance"] = instances[labels["instance"]]
    return tuple(sorted(labels.items()))


def by_series(
    result: list[dict[str, Any]], instances: dict[str, str] | None = None
) -> dict[tuple, Any]:
    return {series_key(sample["metric"], instances): sample for sample in result}


@pytest.fixture(scope="module")
def settled_metrics(run: Run) -> Run:
    """Wait until every path shows the agents' final counts, then fix the evaluation time."""
    probe = 'sum by (job) (sage_messages_processed_total{status="success"})'

    def same() -> bool:
        values = [
            {series_key(s["metric"]): s["value"][1] for s in store.query(probe)}
            for store in (run.scrape, run.thanos, run.truth_prometheus)
        ]
        return len(values[0]) == 4 and values[0] == values[1] == values[2]

    services.wait_for(same, timeout=60, interval=1, what="the final counts on every path")
    time.sleep(3)  # one more scrape and push of the same values
    run.evaluated_at = time.time()
    # The agents keep exporting (the same values): let every sample stamped before the
    # evaluation time reach both stores (SDK export, the collector's 1 s batch, remote
    # write), so that they are compared on the same samples.
    time.sleep(5)
    return run


@pytest.fixture(scope="module")
def instances(settled_metrics: Run) -> dict[str, str]:
    """service.instance.id of each agent -> the instance label its scrape target has."""
    found = settled_metrics.thanos.query(
        'group by (job, instance) (target_info{job=~"sage-scale-.+"})'
    )
    mapping = {
        s["metric"]["instance"]: s["metric"]["job"].removeprefix("sage-scale-") for s in found
    }
    assert sorted(mapping.values()) == ["client-1", "client-2", "server-1", "server-2"]
    return mapping


def final_values(
    store: Prometheus, at: float, instances: dict[str, str] | None = None
) -> dict[tuple, float]:
    return {
        series_key(s["metric"], instances): float(s["value"][1])
        for s in store.query('{__name__=~"sage_.+"}', time=at)
    }


def test_every_series_is_equal_in_thanos_and_the_scrape(
    settled_metrics: Run, instances: dict[str, str]
) -> None:
    """The data under every query: each SAGE series in Thanos is on the agents' /metrics,
    scraped by a single Prometheus, with the same labels and the same final value. The
    scrape has more: a `sage-otel serve` agent's /metrics (multiprocess mode) also lists
    label combinations never recorded, at zero, which its OTLP export leaves out."""
    at = settled_metrics.evaluated_at
    scraped = final_values(settled_metrics.scrape, at)
    stored = final_values(settled_metrics.thanos, at, instances)
    assert len(stored) > 500
    assert set(stored) <= set(scraped), sorted(set(stored) - set(scraped))[:3]
    assert all(scraped[key] == 0 for key in set(scraped) - set(stored))
    unequal = {key: (stored[key], scraped[key]) for key in stored if stored[key] != scraped[key]}
    assert not unequal, list(unequal.items())[:5]


def raw_samples(store: Prometheus, run: Run) -> dict[tuple, list]:
    window = int(run.evaluated_at - run.traffic[0] + 60)
    result = store.query(f'{{__name__=~"sage_.+|target_info"}}[{window}s]', run.evaluated_at)
    return {key: sample["values"] for key, sample in by_series(result).items()}


def test_no_sample_lost_while_an_ingester_was_down(settled_metrics: Run) -> None:
    """Every sample the agent collectors wrote, sample for sample: Thanos (one ingester
    down since mid-run) against the plain Prometheus that received the same writes."""
    run = settled_metrics
    thanos, truth = raw_samples(run.thanos, run), raw_samples(run.truth_prometheus, run)
    assert len(truth) > 500
    assert set(thanos) == set(truth)
    differing = [key for key in truth if thanos[key] != truth[key]]
    assert not differing, f"{len(differing)} series differ, e.g. {differing[:3]}"
    after_stop = sum(
        1 for values in truth.values() for ts, _ in values if float(ts) > run.ingester_down
    )
    assert after_stop > 10_000, "too few samples written after the ingester stopped"


QUERIES = (
    [(f"plan:{q.key}", q.expr) for q in PLAN_QUERIES]
    + [(f"{d}:{t}", expr) for d, t, expr in panel_queries()]
    + [(f"alert:{name}", expr) for name, expr in alert_rules() if name not in COLLECTOR_ALERTS]
)
# Alerts that read what only a scrape creates: `up` (docs/scaling.md, "What differs").
SCRAPE_ONLY = {"alert:SageAgentDown"}


def values(result: list[dict[str, Any]], instances=None) -> dict[tuple, float]:
    return {key: float(s["value"][1]) for key, s in by_series(result, instances).items()}


def same(a: float, b: float, tolerance: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tolerance, abs_tol=1e-12)


# Thanos 0.42 evaluates PromQL with Prometheus 3's engine, Debian's Prometheus is 2.42: on
# the same samples, rate() extrapolates differently at a window's edges (Prometheus 3's
# range selectors leave out a sample exactly at the window's start): rates at most 0.4%
# apart in these runs. histogram_quantile interpolates linearly within the bucket the
# quantile falls in, from those rates: where a bucket holds few observations the estimate
# moves by several percent (7% seen), so a quantile is compared by what it says, the bucket
# it falls in. Expressions without a range are equal exactly.
ENGINE_TOLERANCE = 0.01
BOUNDS = {f"{i.prometheus_name}_bucket": i.buckets for i in INSTRUMENTS if i.buckets}


def same_bucket(promql: str, a: float, b: float) -> bool:
    """Both quantile estimates in the same bucket of the histogram ``promql`` reads."""
    (bounds,) = {v for name, v in BOUNDS.items() if name in promql}
    return math.isnan(a) == math.isnan(b) and (
        math.isnan(a) or bisect.bisect_left(bounds, a) == bisect.bisect_left(bounds, b)
    )


def agree(promql: str, stored: float, truth: float) -> bool:
    if "histogram_quantile" in promql:
        return same_bucket(promql, stored, truth)
    return same(stored, truth, ENGINE_TOLERANCE if "[" in promql else 0.0)


@pytest.mark.parametrize("name, expr", QUERIES, ids=[name for name, _ in QUERIES])
def test_queries_run_unchanged_on_thanos(
    settled_metrics: Run, instances: dict[str, str], name: str, expr: str
) -> None:
    """Each query of the plan, of every dashboard panel and of every alert (its whole
    expression and its measurement) runs on Thanos query unchanged:
      - the answer of a single Prometheus holding the same samples (the truth store, written
        by the same agent collectors), although one ingester is down: exactly, or within
        ENGINE_TOLERANCE where a range function meets a different PromQL engine version;
      - data where a single Prometheus scraping the same agents has data, for the same
        series (rate() values differ between the two paths: they sample the counters at
        different instants; the samples themselves are compared in the test above)."""
    run, at = settled_metrics, settled_metrics.evaluated_at
    for promql in {expr, measured(expr)} if name.startswith("alert:") else {expr}:
        stored = values(run.thanos.query(promql, at))
        truth = values(run.truth_prometheus.query(promql, at))
        assert set(stored) == set(truth), promql
        unequal = {
            k: (stored[k], truth[k]) for k in truth if not agree(promql, stored[k], truth[k])
        }
        assert not unequal, f"{promql}: {unequal}"
    measurement = measured(expr) if name.startswith("alert:") else expr
    scraped = values(run.scrape.query(measurement, at))
    stored = values(run.thanos.query(measurement, at), instances)
    if name in SCRAPE_ONLY:
        assert scraped and not stored, measurement
        return
    if "sage_server_requests_total" in measurement and not scraped:
        # An SLI over served requests is guarded by `total > 0`: where the window holds
        # (almost) no requests of its kind, one path's samples can just catch a last increase
        # that the other's miss. Then the two agree that nothing failed: no data, or 0.
        assert all(value == 0 for value in stored.values()), (measurement, stored)
        return
    assert scraped, f"no data from the scrape for {measurement}"
    assert stored, f"no data from Thanos for {measurement}"
    # The same series, but for those the scrape adds from never-recorded (zero) series.
    assert set(stored) <= set(scraped), measurement
    extra = [scraped[key] for key in set(scraped) - set(stored)]
    assert all(value == 0 or math.isnan(value) for value in extra), (measurement, extra)


# ----------------------------------------------------------------------------- capacity


def collector_metric(collector: Collector, name: str) -> float:
    text = services.http_get(f"http://{collector.metrics_address}/metrics").decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def test_capacity_figures(settled_metrics: Run, traces) -> None:
    """The measured inputs of docs/scaling.md's sizing, written to SAGE_OTEL_SCALE_REPORT
    (a JSON file) when that is set, and checked for sense here."""
    run = settled_metrics
    at = run.evaluated_at
    # Series per agent: what one scrape of each agent's /metrics holds, and the SAGE ones.
    exposed = {
        s["metric"]["job"]: float(s["value"][1])
        for s in run.scrape.query('scrape_samples_scraped{job=~"sage-scale-.+"}', at)
    }
    sage = {
        s["metric"]["job"]: float(s["value"][1])
        for s in run.scrape.query('count by (job) ({__name__=~"sage_.+"})', at)
    }
    assert len(exposed) == 4 and len(sage) == 4
    # Bytes per span on the agent collector -> gateway hop (OTLP gRPC, gzip).
    spans = collector_metric(run.gateway_1, "otelcol_receiver_accepted_spans")
    assert spans > 1000
    bytes_per_span = run.span_relay.sent / spans
    # Bytes per sample on the agent collector -> router hop (remote write, snappy):
    # every sample of the two agents that export through agent collector 1.
    jobs = {"sage-scale-server-1", "sage-scale-client-2"}
    samples = sum(
        len(values)
        for key, values in raw_samples(run.truth_prometheus, run).items()
        if dict(key).get("job") in jobs
    )
    assert samples > 10_000
    bytes_per_sample = run.write_relay.sent / samples
    truth, kept = traces
    # What the tiers spent on this: CPU seconds and resident memory, from their own /metrics.
    agent_1 = run.agent_collectors[0]
    ingester = services.http_get(run.ingester_1.http + "/metrics").decode()

    def thanos_metric(name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in ingester.splitlines()
            if line.startswith((name + "{", name + " "))
        )

    resources = {
        "agent_collector_1": {
            "cpu_seconds": collector_metric(agent_1, "otelcol_process_cpu_seconds"),
            "rss_bytes": collector_metric(agent_1, "otelcol_process_memory_rss"),
            "spans_in": collector_metric(agent_1, "otelcol_receiver_accepted_spans"),
            "metric_points_in": collector_metric(
                agent_1, "otelcol_receiver_accepted_metric_points"
            ),
        },
        "gateway_1": {
            "cpu_seconds": collector_metric(run.gateway_1, "otelcol_process_cpu_seconds"),
            "rss_bytes": collector_metric(run.gateway_1, "otelcol_process_memory_rss"),
            "spans_in": spans,
        },
        "ingester_1": {
            "cpu_seconds": thanos_metric("process_cpu_seconds_total"),
            "rss_bytes": thanos_metric("process_resident_memory_bytes"),
            "head_series": thanos_metric("prometheus_tsdb_head_series"),
            "samples_appended": thanos_metric("prometheus_tsdb_head_samples_appended_total"),
        },
    }
    figures = {
        "series_exposed_per_agent": exposed,
        "sage_series_per_agent": sage,
        "spans_through_gateway_1": spans,
        "bytes_per_span_agent_to_gateway": round(bytes_per_span, 1),
        "samples_through_router_1": samples,
        "bytes_per_sample_agent_to_store": round(bytes_per_sample, 2),
        "traces_sent": len(truth),
        "traces_kept": len(kept),
        "traces_must_keep": sum(1 for trace in truth.values() if reasons(trace)),
        "traces_spanning_two_agents": sum(1 for trace in truth.values() if len(trace.services) > 1),
        "spans_sent": sum(len(t.spans) for t in truth.values()),
        "spans_kept": sum(len(t.spans) for t in kept.values()),
        "traffic_seconds": round(run.traffic[1] - run.traffic[0], 1),
        "messages_ok": sum(s["messages_ok"] for s in run.summaries),
        "resources": resources,
    }
    report = os.environ.get("SAGE_OTEL_SCALE_REPORT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    # Sense: a compressed span is tens to hundreds of bytes, a sample a few bytes.
    assert 10 < bytes_per_span < 2000, figures
    assert 0.1 < bytes_per_sample < 100, figures
    assert all(sage[job] <= exposed[job] for job in exposed), figures
