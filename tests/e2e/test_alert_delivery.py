"""Alerts delivered end to end: SAGE agents, Prometheus, Alertmanager, a receiver.

Two server agents (`sage-otel serve`) take the demo's failure traffic (replays, tampered,
corrupt, truncated and stale messages, rogue handshakes); a third, started with a small global
handshake rate (SAGE_OTEL_HANDSHAKE_RATE), is offered more handshakes by registered peers than
it takes. Prometheus scrapes them with the shipped rule files and sends alerts to a real
Alertmanager running the shipped alertmanager.yml, whose one receiver is pointed at a webhook
on loopback that this test runs. The notifications are checked as a receiver sees them:
labels, summary and runbook link, grouping, the route taken (and its timing), inhibition (a
down agent's alerts, an SLO's ticket while its page fires), and resolution once the traffic
stops.

What the test changes, and only because it cannot wait for it: the receiver's destination
(in its one entry, as a user does), Alertmanager's route timers, and the rules' durations:
every `for`, range window and offset ten times shorter, evaluated every second. Rates are
per second, so a steady traffic gives the same values over a window ten times shorter, and
thresholds stay as shipped. Routes, matchers, group_by, inhibit rules, labels, annotations
and expressions are otherwise as shipped.

Of the plan's four alerts (§5.1), the demo's traffic trips ReplayAttacksDetected, and its
rogue handshakes, sent faster (40/s, the demo's are 2/s, the threshold 10/s per agent), trip
HandshakeFailures. No traffic trips the other two: an agent admits a session before the
handshake's work, so creating one practically never fails (HighSessionFailureRate), and sealing
a message takes microseconds against a threshold of 10 ms (HighEncryptionLatency). Their
expressions are proven by promtool's unit tests (collector/prometheus/tests/); their delivery
here, by pushing the signals they watch into the same Prometheus through its OTLP receiver, as
an agent's own OTLP metric exporter sends them, under a service of their own: session
creations half failed, and 50 ms seals, every second until both alerts are notified firing;
then nothing, so that both resolve.

The SLOs count only what a server fails for a reason of its own: the demo's failures are its
peers' doing, refused, and burn nothing; the third agent's capacity refusals of established
peers (503 global_handshake_rate) are failures and burn the handshake SLO's budget, fast
enough to page.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk import metrics as sdk_metrics
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from sage_otel.agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    JsonFileRegistry,
    sign_registration,
)
from sage_otel.agent.errors import PeerError, SageError
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.transport import ClientAgent
from sage_otel.telemetry import catalog
from tools import services as _services

from . import services
from .promql import ALERTS, RUNBOOK_URL, runbook_anchors

pytestmark = pytest.mark.e2e

ALERTMANAGER_CONFIG = services.REPO / "collector" / "alertmanager" / "alertmanager.yml"
RECEIVER = "sage-notify"
JOB = "sage-agent"  # the agents' scrape job in collector/prometheus/prometheus.yml
SPEEDUP = 10
# Shipped route timer -> the test's: critical still faster than warning, and a critical
# group repeats within the run (the inhibition check waits for a repeat); warnings do not.
TIMERS = {
    ("group_wait", "10s"): "1s",
    ("group_interval", "1m"): "2s",
    ("repeat_interval", "1h"): "4s",
    ("group_wait", "1m"): "3s",
    ("group_interval", "10m"): "6s",
    ("repeat_interval", "12h"): "1h",
}
FAST_ROUTE = '{}/{severity="critical"}'
# Agent c's global handshake rate, and the handshakes offered to it: 4 of 6 a second fail
# for its capacity (67% against a page threshold of 14.4 x 0.5%), below HandshakeFailures'
# 10/s per agent.
CAPACITY = "2/second"
OFFERED = 6
# SessionManager's default: a peer whose oldest live session is this old is established.
ESTABLISHED_AFTER = 60
HANDSHAKE_SLO = "sage-handshake-availability"
SLOW_ROUTE = "{}"
# The pushed signals' service (job and instance over OTLP), apart from the agents', and how
# many session creations (as many failed) and 50 ms seals it records a second.
PUSHED_JOB = "sage-pushed"
PUSHED_INSTANCE = "pushed-1"
PUSHED_PER_SECOND = 200
# The alerts the pushed signals trip: alert name -> its severity and the route it takes.
PUSHED = {
    "HighSessionFailureRate": ("critical", FAST_ROUTE),
    "HighEncryptionLatency": ("warning", SLOW_ROUTE),
}

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"


# --- the shipped configuration, with only what a test cannot wait for shortened -------------


def _faster(duration: str) -> str:
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))
    return f"{round(seconds * 1000 / SPEEDUP)}ms"


def _faster_expr(expr: str) -> str:
    """Range windows, subquery steps and offsets divided by SPEEDUP."""

    def window(match: re.Match[str]) -> str:
        window, colon, step = match.groups()
        return f"[{_faster(window)}{colon}{_faster(step) if step else ''}]"

    expr = re.sub(rf"\[({_DURATION})(:?)({_DURATION})?\]", window, expr)
    return re.sub(rf"\boffset\s+({_DURATION})", lambda m: "offset " + _faster(m.group(1)), expr)


def fast_rule_files(directory: Path) -> list[Path]:
    """Every shipped rule file, its durations SPEEDUP times shorter and evaluated at the
    global interval (every second)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted(ALERTS.glob("*.yml")):
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            group.pop("interval", None)
            for rule in group["rules"]:
                rule["expr"] = _faster_expr(rule["expr"])
                if "for" in rule:
                    rule["for"] = _faster(rule["for"])
        paths.append(directory / path.name)
        paths[-1].write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


def shipped_config() -> dict[str, Any]:
    return yaml.safe_load(ALERTMANAGER_CONFIG.read_text())


def _routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes", []):
        yield from _routes(child)


def config_for(webhook_url: str) -> str:
    """The shipped alertmanager.yml, its one receiver given a webhook and its timers short."""
    config = shipped_config()
    assert config["receivers"] == [{"name": RECEIVER}], "the shipped receiver sends nothing"
    config["receivers"] = [
        {"name": RECEIVER, "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
    ]
    for route in _routes(config["route"]):
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in route:
                route[key] = TIMERS[key, route[key]]
    return yaml.safe_dump(config, sort_keys=False)


def shipped_rules() -> dict[str, list[dict[str, Any]]]:
    """Alert name -> its rules (an SLO's page and ticket alerts share a name)."""
    rules: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(ALERTS.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rules.setdefault(rule["alert"], []).append(rule)
    return rules


# --- the receiver -----------------------------------------------------------------------------


@dataclass
class Notification:
    received: float
    """Wall-clock time, as the alerts' ``startsAt``."""
    body: dict[str, Any]

    @property
    def group(self) -> str:
        return self.body["groupKey"]

    @property
    def route(self) -> str:
        return self.group.rsplit(":{", 1)[0]

    def firing(self, alertname: str | None = None) -> set[str]:
        """Instances (or "" for a fleet-wide alert) of the firing alerts it lists."""
        return {
            alert["labels"].get("instance", "")
            for alert in self.body["alerts"]
            if alert["status"] == "firing" and alertname in (None, alert["labels"]["alertname"])
        }

    def delay(self) -> float:
        """Seconds from its earliest alert's start to its arrival."""
        starts = [datetime.fromisoformat(a["startsAt"]) for a in self.body["alerts"]]
        return self.received - min(starts).timestamp()

    def key(self) -> tuple[str, frozenset[str]]:
        """What the receiver learns from it: the status and which alerts fire."""
        firing = {a["fingerprint"] for a in self.body["alerts"] if a["status"] == "firing"}
        return self.body["status"], frozenset(firing)


@dataclass
class Webhook:
    url: str
    log: Path | None = None
    notifications: list[Notification] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, alertname: str, since: float = 0) -> list[Notification]:
        with self.lock:
            return [
                n
                for n in self.notifications
                if n.received >= since and n.body["groupLabels"].get("alertname") == alertname
            ]

    def wait(
        self,
        what: str,
        alertname: str,
        check: Callable[[Notification], bool],
        *,
        since: float = 0,
        timeout: float = 60,
    ) -> Notification:
        def found() -> Notification | None:
            return next((n for n in self.received(alertname, since) if check(n)), None)

        return services.wait_for(found, timeout=timeout, interval=0.2, what=what)


@contextlib.contextmanager
def webhook(log: Path | None = None) -> Iterator[Webhook]:
    """An HTTP receiver on loopback that keeps every notification POSTed to it (and
    appends it to ``log``, one JSON a line)."""
    address = services.loopback()
    hook = Webhook(f"http://{address}/notify", log)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            notification = Notification(time.time(), body)
            with hook.lock:
                hook.notifications.append(notification)
                if hook.log is not None:  # for whoever reads a failure
                    with hook.log.open("a") as log:
                        log.write(json.dumps({"received": notification.received, **body}) + "\n")
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    host, port = address.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- the agents and their traffic -------------------------------------------------------------


@dataclass
class Agent:
    name: str
    url: str
    did: str
    metrics: str
    """``127.0.0.1:<port>`` of its /metrics: its ``instance`` label."""
    registry: Path
    process: subprocess.Popen[bytes] = field(repr=False)


def _env(**settings: str) -> dict[str, str]:
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    return inherited | settings


@contextlib.contextmanager
def agent(tmp: Path, name: str, **settings: str) -> Iterator[Agent]:
    """``sage-otel serve`` on loopback ports, its registry a file the traffic shares;
    ``settings`` are environment variables (its limits)."""
    directory = tmp / name
    directory.mkdir()
    metrics = services.loopback()
    out = directory / "serve.out"
    args = [
        sys.executable, "-m", "sage_otel.cli", "serve", "--host", services.LOOPBACK,
        "--port", str(services.free_port()), "--metrics-host", services.LOOPBACK,
        "--metrics-port", metrics.rsplit(":", 1)[1], "--identity", str(directory / "id.json"),
        "--registry", str(directory / "registry.json"),
    ]  # fmt: skip
    with (
        open(out, "wb") as stdout,
        open(directory / "serve.err", "wb") as stderr,
    ):
        process = subprocess.Popen(
            args, env=_env(**settings), cwd=directory, stdout=stdout, stderr=stderr
        )

    def first_line() -> str:
        if process.poll() is not None:
            error = (directory / "serve.err").read_text()
            raise AssertionError(f"serve exited with status {process.returncode}: {error}")
        text = out.read_text()
        return text.split("\n", 1)[0] if "\n" in text else ""

    try:
        line = services.wait_for(first_line, timeout=60, what=f"agent {name} to serve")
        fields = dict(part.split("=", 1) for part in line.split())
        yield Agent(
            name, fields["url"], fields["did"], metrics, directory / "registry.json", process
        )
    finally:
        _services.stop(process)


@contextlib.contextmanager
def traffic(tmp: Path, target: Agent) -> Iterator[subprocess.Popen[bytes]]:
    """The demo's clients, with their injected failures, against ``target``."""
    args = [
        sys.executable, "-m", "sage_otel.cli", "demo", "--server", target.url,
        "--server-did", target.did, "--registry", str(target.registry), "--clients", "2",
        "--duration", "600", "--no-telemetry", "--json",
    ]  # fmt: skip
    with open(tmp / target.name / "demo.log", "wb") as log:
        process = subprocess.Popen(args, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        _services.stop(process)


class _Known(DIDResolver):
    """Gives a client the server's document while the client itself is not registered."""

    def __init__(self, document: DIDDocument) -> None:
        super().__init__(InMemoryRegistry())
        self._document = document

    async def resolve(self, did: Any) -> DIDDocument:
        return self._document


@contextlib.contextmanager
def _in_background(
    target: Callable[[], object], stop: threading.Event, *, join_timeout: float
) -> Iterator[None]:
    """A traffic driver running in a thread while the block runs; stopped (``stop`` set,
    then joined) when it ends, however it ends."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=join_timeout)


@contextlib.contextmanager
def rogue_handshakes(target: Agent, per_second: float) -> Iterator[threading.Event]:
    """Handshakes from an unregistered DID, ``per_second`` of them, each refused by
    ``target`` (unknown_did), as the demo's rogue client makes them but faster; set the
    event to stop. The demo's two a second are below HandshakeFailures' 10/s."""
    stop = threading.Event()

    async def run() -> None:
        document = await DIDResolver(JsonFileRegistry(str(target.registry))).resolve(target.did)
        identity = AgentIdentity.generate(Chain.ETHEREUM)
        async with httpx.AsyncClient(timeout=10) as http:
            stranger = ClientAgent(identity, _Known(document), http=http)
            due = time.monotonic()
            while not stop.is_set():
                with contextlib.suppress(PeerError):
                    await stranger.connect(target.url, target.did)
                due += 1 / per_second
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    with _in_background(lambda: asyncio.run(run()), stop, join_timeout=15):
        yield stop


@dataclass
class Handshakes:
    """What a handshake driver met: sessions served, and the errors by code."""

    stop: threading.Event = field(default_factory=threading.Event)
    served: int = 0
    refused: Counter[str] = field(default_factory=Counter)


@contextlib.contextmanager
def over_capacity(target: Agent, peers: int, per_second: float) -> Iterator[Handshakes]:
    """Handshakes from ``peers`` established peers in turn, ``per_second`` of them in all,
    each session served closed at once: more than a ``target`` started with a small
    SAGE_OTEL_HANDSHAKE_RATE takes, so once even the reserve kept for established peers is
    spent it refuses them for its own capacity (503 global_handshake_rate), failures that
    burn its handshake-availability budget. A peer is established when its oldest live
    session is a minute old: each first opens one session, keeps it, and waits that minute
    (newcomers over the newcomers' half get 429, their own share, which burns nothing).
    Each peer stays far below its own limits (50 handshakes/s, 64 sessions); set ``stop``
    to stop."""
    seen = Handshakes()

    async def run() -> None:
        registry = JsonFileRegistry(str(target.registry))
        identities = [AgentIdentity.generate(Chain.ETHEREUM) for _ in range(peers)]
        for identity in identities:
            document = DIDDocument.for_identity(identity, name="over-capacity")
            await registry.register(document, sign_registration(identity, document))
        async with httpx.AsyncClient(timeout=10) as http:
            agents = [
                ClientAgent(identity, DIDResolver(registry), http=http) for identity in identities
            ]
            for agent in agents:  # one live session each, kept open
                while not seen.stop.is_set():
                    try:
                        await agent.connect(target.url, target.did)
                        break
                    except SageError:  # a newcomer over the newcomers' half: again
                        await asyncio.sleep(0.5)
            established = time.monotonic() + ESTABLISHED_AFTER + 1
            while not seen.stop.is_set() and time.monotonic() < established:
                await asyncio.sleep(0.2)
            clients = itertools.cycle(agents)
            due = time.monotonic()
            while not seen.stop.is_set():
                client = next(clients)
                try:
                    await client.close(await client.connect(target.url, target.did))
                    seen.served += 1
                except SageError as error:  # a refusal, or a timeout on a busy machine
                    seen.refused[error.code] += 1
                due += 1 / per_second
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    with _in_background(lambda: asyncio.run(run()), seen.stop, join_timeout=15):
        yield seen


# --- what no traffic here trips, pushed as an agent's own OTLP metric exporter sends it -------


@dataclass
class Pushed:
    """When the pusher stopped (wall clock), or 0 while it runs."""

    stopped: float = 0.0


@contextlib.contextmanager
def failing_sessions_and_slow_sealing(
    otlp_url: str, until: Callable[[], bool], *, timeout: float = 120
) -> Iterator[Pushed]:
    """Every second, through an OTLP metric exporter of the SDK to ``otlp_url``: session
    creations, half of them failed (HighSessionFailureRate's 10% across the fleet, still
    crossed with the agents' own), and 50 ms seals (HighEncryptionLatency's p95 of 10 ms,
    still crossed with the agents' microsecond ones), under a service of their own. It stops once
    ``until()`` holds (or after ``timeout``), so that both alerts then resolve."""
    created = catalog.BY_KEY["sessions_created"]
    duration = catalog.BY_KEY["session_duration"]
    provider = sdk_metrics.MeterProvider(
        resource=Resource({"service.name": PUSHED_JOB, "service.instance.id": PUSHED_INSTANCE}),
        metric_readers=[
            PeriodicExportingMetricReader(
                OTLPMetricExporter(
                    endpoint=otlp_url,
                    timeout=10,
                    preferred_temporality={
                        sdk_metrics.Counter: AggregationTemporality.CUMULATIVE,
                        sdk_metrics.Histogram: AggregationTemporality.CUMULATIVE,
                    },
                ),
                export_interval_millis=1000,
            )
        ],
        views=[
            View(
                instrument_name=duration.name,
                aggregation=ExplicitBucketHistogramAggregation(duration.buckets),
            )
        ],
    )
    meter = provider.get_meter("sage-otel-e2e")
    sessions = meter.create_counter(created.name, created.unit, created.description)
    seals = meter.create_histogram(duration.name, duration.unit, duration.description)
    pushed = Pushed()
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and not until() and time.monotonic() < deadline:
            sessions.add(PUSHED_PER_SECOND, {"status": "success"})
            sessions.add(PUSHED_PER_SECOND, {"status": "failure"})
            for _ in range(PUSHED_PER_SECOND):
                seals.record(0.05, {"operation": "encrypt"})
            stop.wait(1)
        provider.shutdown()  # its last export included
        pushed.stopped = time.time()

    with _in_background(run, stop, join_timeout=30):
        yield pushed


# --- the test ---------------------------------------------------------------------------------


def expected_route(labels: dict[str, str]) -> str:
    if labels.get("severity") == "critical":
        return FAST_ROUTE
    if labels.get("sloth_severity") == "page":
        return '{}/{sloth_severity="page"}'
    return SLOW_ROUTE


def check_notification(notification: Notification, rules: dict[str, list[dict[str, Any]]]) -> None:
    """What every notification must carry: its receiver, grouping by the shipped group_by,
    the route its severity takes, and each alert's labels and annotations as its rule gives
    them."""
    body = notification.body
    assert body["receiver"] == RECEIVER
    group_by = shipped_config()["route"]["group_by"]
    anchors = runbook_anchors()
    for alert in body["alerts"]:
        labels, annotations = alert["labels"], alert["annotations"]
        assert body["groupLabels"] == {key: labels[key] for key in group_by if key in labels}
        candidates = rules[labels["alertname"]]
        rule = next((r for r in candidates if labels.items() >= r["labels"].items()), None)
        assert rule is not None, f"no rule gives {labels}"
        summary = rule["annotations"]["summary"]
        assert annotations["summary"] == summary or ("{{" in summary and annotations["summary"])
        assert annotations["runbook_url"].startswith(RUNBOOK_URL), annotations
        assert annotations["runbook_url"].removeprefix(RUNBOOK_URL) in anchors, annotations
        assert notification.route == expected_route(labels), (notification.group, labels)


def firing_in_prometheus(prometheus: services.Prometheus, alertname: str, instance: str) -> bool:
    query = f'ALERTS{{alertname="{alertname}", instance="{instance}", alertstate="firing"}}'
    return bool(prometheus.query(query))


def test_alerts_reach_the_receiver_grouped_routed_inhibited_and_resolved(
    tmp_path: Path,
) -> None:
    services.binary("alertmanager")
    rules = shipped_rules()
    with contextlib.ExitStack() as stack:
        hook = stack.enter_context(webhook(tmp_path / "notifications.jsonl"))
        manager = stack.enter_context(_services.alertmanager(tmp_path, config_for(hook.url)))
        a = stack.enter_context(agent(tmp_path, "a"))
        b = stack.enter_context(agent(tmp_path, "b"))
        c = stack.enter_context(agent(tmp_path, "c", SAGE_OTEL_HANDSHAKE_RATE=CAPACITY))
        prometheus = stack.enter_context(
            services.prometheus(
                tmp_path,
                {JOB: [a.metrics, b.metrics, c.metrics]},
                remote_write=False,
                otlp=True,
                rule_files=fast_rule_files(tmp_path / "rules"),
                extra_config={
                    "alerting": {
                        "alertmanagers": [{"static_configs": [{"targets": [manager.address]}]}]
                    }
                },
            )
        )
        pushed = stack.enter_context(
            failing_sessions_and_slow_sealing(
                prometheus.otlp_url + "/v1/metrics",
                until=lambda: all(
                    any(n.firing() for n in hook.received(alertname)) for alertname in PUSHED
                ),
            )
        )
        traffic_a = stack.enter_context(traffic(tmp_path, a))
        traffic_b = stack.enter_context(traffic(tmp_path, b))
        rogues_a = stack.enter_context(rogue_handshakes(a, per_second=40))
        overload = stack.enter_context(over_capacity(c, peers=4, per_second=OFFERED))

        # The plan's replay alert, critical, on both agents: one notification lists both
        # (group_by alertname and job), sent on the critical route.
        both = hook.wait(
            "ReplayAttacksDetected on both agents in one notification",
            "ReplayAttacksDetected",
            lambda n: n.firing() == {a.metrics, b.metrics},
        )
        assert both.body["groupLabels"] == {"alertname": "ReplayAttacksDetected", "job": JOB}
        assert both.route == FAST_ROUTE

        # Agent b goes down: SageAgentDown fires for it and silences its replay alert, which
        # still fires in Prometheus (its increase window holds b's last samples).
        _services.stop(b.process)
        _services.stop(traffic_b)
        down = hook.wait(
            "SageAgentDown for agent b",
            "SageAgentDown",
            lambda n: n.firing() == {b.metrics},
            timeout=60,
        )
        inhibitor = next(x for x in down.body["alerts"] if x["labels"]["instance"] == b.metrics)
        suppressed = services.wait_for(
            lambda: [
                x
                for x in manager.alerts()
                if x["labels"]["alertname"] == "ReplayAttacksDetected"
                and x["labels"]["instance"] == b.metrics
                and x["status"]["inhibitedBy"] == [inhibitor["fingerprint"]]
            ],
            what="b's replay alert inhibited by b's SageAgentDown",
        )
        assert suppressed[0]["status"]["state"] == "suppressed"
        assert firing_in_prometheus(prometheus, "ReplayAttacksDetected", b.metrics)
        # The next notification of the replay group (a repeat: the critical route repeats)
        # lists a alone, while b's replay alert still fires in Prometheus.
        repeat = hook.wait(
            "a notification of the replay group after b's SageAgentDown",
            "ReplayAttacksDetected",
            lambda n: True,
            since=time.time(),
            timeout=30,
        )
        assert repeat.firing() == {a.metrics}
        assert firing_in_prometheus(prometheus, "ReplayAttacksDetected", b.metrics)
        inhibited_at = down.received

        # Warnings, on the slow route: the plan's HandshakeFailures on agent a (grouped by
        # alertname and job, like the replays), and two computed over the whole fleet.
        handshakes = hook.wait(
            "HandshakeFailures on agent a", "HandshakeFailures", lambda n: bool(n.firing())
        )
        assert handshakes.firing() == {a.metrics}
        assert handshakes.body["groupLabels"] == {"alertname": "HandshakeFailures", "job": JOB}
        assert handshakes.route == SLOW_ROUTE
        for alertname in ("NonceInvalidRatio", "CryptoErrors"):
            warning = hook.wait(alertname, alertname, lambda n: bool(n.firing()), timeout=90)
            assert warning.route == SLOW_ROUTE
            assert warning.firing() == {""}

        # Agent c, offered three times the handshakes it takes, fails the rest for its own
        # capacity: the handshake SLO burns fast and fires its page and its ticket (same
        # sloth_id) in Prometheus; the page is notified on the critical route and silences
        # the ticket. The demo's and the rogues' refusals on a and b burn nothing: no other
        # SLO fires, and the message SLI is measured, at 0.
        def slos_firing(severity: str) -> set[str]:
            query = f'ALERTS{{sloth_severity="{severity}", alertstate="firing"}}'
            return {x["metric"]["sloth_id"] for x in prometheus.query(query)}

        burning = services.wait_for(  # the driver's peers are established after a minute
            lambda: slos_firing("page") & slos_firing("ticket"),
            timeout=ESTABLISHED_AFTER + 90,
            what="an SLO's page and ticket firing together",
        )
        assert burning == {HANDSHAKE_SLO}, burning
        assert slos_firing("page") | slos_firing("ticket") == {HANDSHAKE_SLO}
        failed = prometheus.query(
            'sum by (instance) (sage_server_requests_total{operation="handshake",'
            'outcome="failed"}) > 0'
        )
        assert {x["metric"]["instance"] for x in failed} == {c.metrics}, failed
        # The page may fire within the first few refusals (the windows are shortened): both
        # kinds of answer were seen, whatever their tally at that moment.
        assert overload.refused["global_handshake_rate"] > 0 and overload.served > 0, overload
        sli = prometheus.query('slo:sli_error:ratio_rate5m{sloth_id="sage-message-availability"}')
        assert [float(x["value"][1]) for x in sli] == [0.0], sli
        page = hook.wait(
            "the handshake SLO's page",
            "SageHandshakeAvailabilityBudgetBurn",
            lambda n: bool(n.firing()),
        )
        assert page.route == FAST_ROUTE
        assert {x["labels"]["sloth_severity"] for x in page.body["alerts"]} == {"page"}
        services.wait_for(
            lambda: (
                burning
                <= {
                    x["labels"]["sloth_id"]
                    for x in manager.alerts()
                    if x["labels"].get("sloth_severity") == "ticket" and x["status"]["inhibitedBy"]
                }
            ),
            what=f"the tickets of {sorted(burning)} inhibited by their pages",
        )

        # The traffic stops (agent a keeps running): once the windows hold no failure, the
        # replay group's resolved notification arrives.
        _services.stop(traffic_a)
        rogues_a.set()
        overload.stop.set()
        stopped = time.time()
        resolved = hook.wait(
            "the replay group resolved",
            "ReplayAttacksDetected",
            lambda n: n.body["status"] == "resolved",
            since=stopped,
            timeout=90,
        )
        assert {x["labels"]["instance"] for x in resolved.body["alerts"]} >= {a.metrics}
        assert all(x["status"] == "resolved" for x in resolved.body["alerts"])
        for alertname in ("HandshakeFailures", "NonceInvalidRatio"):
            hook.wait(
                f"{alertname} resolved",
                alertname,
                lambda n: n.body["status"] == "resolved",
                since=stopped,
                timeout=60,
            )
        # The plan's other two alerts, from the pushed samples: each notified firing, with its
        # severity, summary and runbook entry, on the route its severity takes, and resolved
        # once the pushing stopped (it stops as soon as both have been notified firing).
        services.wait_for(lambda: pushed.stopped, what="the pushing to stop")
        for alertname, (severity, route) in PUSHED.items():
            fired = hook.wait(f"{alertname} firing", alertname, lambda n: bool(n.firing()))
            assert fired.received <= pushed.stopped
            assert fired.route == route
            assert fired.body["groupLabels"] == {"alertname": alertname}
            [alert] = fired.body["alerts"]
            assert alert["labels"]["severity"] == severity, alert
            summary = rules[alertname][0]["annotations"]["summary"]
            assert alert["annotations"]["summary"] == summary, alert
            assert alert["annotations"]["runbook_url"] == RUNBOOK_URL + alertname.lower(), alert
            resolved = hook.wait(
                f"{alertname} resolved",
                alertname,
                lambda n: n.body["status"] == "resolved",
                since=pushed.stopped,
                timeout=90,
            )
            assert [x["status"] for x in resolved.body["alerts"]] == ["resolved"]
            assert resolved.body["alerts"][0]["fingerprint"] == alert["fingerprint"]
        # SageAgentDown still fires for b, which is still down.
        assert firing_in_prometheus(prometheus, "SageAgentDown", b.metrics)

        notifications = list(hook.notifications)
        alertmanager_log = manager.log_path.read_text()

    for notification in notifications:
        check_notification(notification, rules)
    # No notification after b's SageAgentDown lists b's replay alert as firing.
    for notification in notifications:
        if notification.received > inhibited_at:
            assert b.metrics not in notification.firing("ReplayAttacksDetected")
    # Only the handshake SLO was ever notified; nor a ticket of it while its page fired (from
    # its first notification to its resolution, if the run saw one).
    slo_alerts = [
        (n, x) for n in notifications for x in n.body["alerts"] if "sloth_id" in x["labels"]
    ]
    assert {x["labels"]["sloth_id"] for _, x in slo_alerts} == {HANDSHAKE_SLO}
    pages = [
        (n.received, x["status"]) for n, x in slo_alerts if x["labels"]["sloth_severity"] == "page"
    ]
    paged = min(received for received, status in pages if status == "firing")
    unpaged = min(
        (received for received, status in pages if status == "resolved" and received > paged),
        default=float("inf"),
    )
    for notification, alert in slo_alerts:
        if alert["labels"]["sloth_severity"] == "ticket" and alert["status"] == "firing":
            assert not paged <= notification.received < unpaged, notification.body
    # The first notification of a group waits for its route's group_wait: a critical one
    # about 1 s, a warning 3 s.
    first: dict[str, Notification] = {}
    for notification in notifications:
        first.setdefault(notification.group, notification)
    waits = {
        route: [n.delay() for n in first.values() if n.route == route]
        for route in (FAST_ROUTE, SLOW_ROUTE)
    }
    assert min(waits[FAST_ROUTE]) < 2.5 <= min(waits[SLOW_ROUTE]), waits
    # Critical groups repeat with the same alerts; a warning group is sent again only when
    # its alerts change (its repeat interval is longer than the run).
    sent: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for notification in notifications:
        sent.setdefault(notification.group, []).append(notification.key())
    for group, keys in sent.items():
        if group.startswith(SLOW_ROUTE + ":"):
            assert all(x != y for x, y in itertools.pairwise(keys)), (group, keys)
    assert any(
        len(keys) > len(set(keys)) for group, keys in sent.items() if group.startswith(FAST_ROUTE)
    ), sent
    assert "level=error" not in alertmanager_log, alertmanager_log
