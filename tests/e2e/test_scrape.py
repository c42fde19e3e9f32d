"""Real Prometheus scraping `sage-otel demo`'s /metrics: every query the project ships runs.

The monitoring plan's queries (§4.2, as corrected in tools.queries), every
dashboard panel's query and every alert's expression parse and return data from a real
scrape by Prometheus 3, and it stores the exemplars /metrics offers in OpenMetrics.
Debian's Prometheus 2.42 scrapes the same /metrics into the same series, exemplars too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tools.dashboards import panel_queries
from tools.queries import PLAN_QUERIES

from . import services
from .promql import ALERTS, COLLECTOR_ALERTS, alert_rules, measured
from .services import Prometheus

pytestmark = pytest.mark.e2e


@dataclass
class Scrape:
    prometheus: Prometheus
    started: float
    target: str
    """``host:port`` of the demo's /metrics."""


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """The demo serving /metrics, Prometheus scraping it every second with the alert rules."""
    tmp = tmp_path_factory.mktemp("scrape-e2e")
    port = services.free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    demo = subprocess.Popen(
        [
            sys.executable, "-m", "sage_otel.cli", "demo", "--in-process", "--duration", "120",
            "--json", "--clients", "3", "--metrics-host", services.LOOPBACK,
            "--metrics-port", str(port),
        ],
        env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        targets = {"sage-agent": [f"{services.LOOPBACK}:{port}"]}
        with services.prometheus(
            tmp, targets, remote_write=False, rule_files=sorted(ALERTS.glob("*.yml"))
        ) as prometheus:
            started = time.time()
            # rate() needs two scrapes in its window with traffic in between.
            prometheus.wait_for(
                'sum(rate(sage_messages_processed_total{status="success"}[1m])) > 0', timeout=60
            )
            prometheus.wait_for("sum(rate(sage_handshake_duration_seconds_count[1m])) > 0")
            yield Scrape(prometheus, started, targets["sage-agent"][0])
    finally:
        demo.terminate()
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def _returns_data(prometheus: Prometheus, expr: str) -> list[dict]:
    result = prometheus.query(expr)
    assert result, f"no data for {expr}"
    return result


@pytest.mark.parametrize("query", PLAN_QUERIES, ids=lambda q: q.key)
def test_plan_queries_return_data(scrape: Scrape, query) -> None:
    _returns_data(scrape.prometheus, query.expr)


@pytest.mark.parametrize(
    "dashboard, title, expr", panel_queries(), ids=[f"{d}:{t}" for d, t, _ in panel_queries()]
)
def test_every_dashboard_query_returns_data(scrape: Scrape, dashboard, title, expr) -> None:
    _returns_data(scrape.prometheus, expr)


AGENT_ALERTS = [(name, expr) for name, expr in alert_rules() if name not in COLLECTOR_ALERTS]


@pytest.mark.parametrize("name, expr", AGENT_ALERTS, ids=[name for name, _ in AGENT_ALERTS])
def test_every_alert_expression_parses_and_measures(scrape: Scrape, name: str, expr: str) -> None:
    scrape.prometheus.query(expr)  # the whole expression parses and evaluates
    # A measurement on a recorded series (the SLO rules) has data from the rule's first
    # evaluation on.
    scrape.prometheus.wait_for(measured(expr), timeout=20)


def test_prometheus_loaded_every_alert_and_the_target_is_up(scrape: Scrape) -> None:
    loaded = {rule["name"] for rule in scrape.prometheus.rules() if rule.get("type") == "alerting"}
    assert loaded == {name for name, _ in alert_rules()}
    health = {target["labels"]["job"]: target["health"] for target in scrape.prometheus.targets()}
    assert health == {"sage-agent": "up"}


# What the demo's deliberate failure traffic explains: replayed messages, corrupted
# ciphertexts re-signed by a peer holding the keys (decrypt failures), handshakes from
# an unregistered and a deactivated DID (the server fails to resolve them). Every one of
# them is the peer's doing, refused by the server: none burns an SLO's budget.
INJECTED = {
    "ReplayAttacksDetected",
    "NonceInvalidRatio",
    "CryptoErrors",
    "DIDResolutionFailures",
}
SLO_ALERTS = {name for name, expr in alert_rules() if "slo:sli_error:ratio_rate" in expr}
# The availability SLIs, over the page's short window: what the demo's refusals would raise.
AVAILABILITY_SLIS = 'slo:sli_error:ratio_rate5m{sloth_id=~"sage-(handshake|message)-availability"}'


def test_alerts_follow_the_demos_injected_failures(scrape: Scrape) -> None:
    """Alerting on real data: the replay alert goes active, nothing unexplained does, and
    the demo's refused requests (one message in seven, the rogue handshakes) burn no SLO:
    both availability SLIs are measured, at 0."""

    def active() -> set[str]:
        return {
            rule["name"]
            for rule in scrape.prometheus.rules()
            if rule.get("type") == "alerting" and rule.get("state") in ("pending", "firing")
        }

    # The plan's critical group is evaluated every 30s, so this can take one interval.
    states = services.wait_for(
        lambda: active() if "ReplayAttacksDetected" in active() else set(),
        timeout=60,
        what="ReplayAttacksDetected pending or firing",
    )
    assert states <= INJECTED, states - INJECTED
    assert "SageMessageAvailabilityBudgetBurn" in SLO_ALERTS, SLO_ALERTS
    refused = scrape.prometheus.query(
        'sum by (operation) (sage_server_requests_total{outcome="refused"}) > 0'
    )
    assert {x["metric"]["operation"] for x in refused} >= {"handshake", "message"}, refused
    slis = {
        x["metric"]["sloth_id"]: float(x["value"][1])
        for x in scrape.prometheus.query(AVAILABILITY_SLIS)
    }
    assert slis == {"sage-handshake-availability": 0.0, "sage-message-availability": 0.0}
    assert not active() & SLO_ALERTS, active() & SLO_ALERTS


@pytest.mark.parametrize(
    "series",
    [
        "sage_message_processing_duration_seconds_bucket",
        "sage_handshake_duration_seconds_bucket",
        "sage_session_duration_seconds_bucket",
        "sage_messages_processed_total",
    ],
)
def test_exemplars_are_stored_with_trace_ids(scrape: Scrape, series: str) -> None:
    prometheus = scrape.prometheus

    def stored() -> list[dict]:
        found = prometheus.query_exemplars(series, scrape.started - 60, time.time() + 5)
        return [e for s in found for e in s["exemplars"]]

    exemplars = services.wait_for(stored, timeout=30, what=f"exemplars on {series}")
    for exemplar in exemplars:
        labels = exemplar["labels"]
        assert len(labels["trace_id"]) == 32 and int(labels["trace_id"], 16)
        assert len(labels["span_id"]) == 16 and int(labels["span_id"], 16)


def _series(prometheus: Prometheus) -> set[tuple[tuple[str, str], ...]]:
    """The SAGE series now, le written one way (Prometheus 3 rewrites it as OpenMetrics)."""

    def le(value: str) -> str:
        return repr(float(value))

    return {
        tuple(sorted((k, le(v) if k == "le" else v) for k, v in sample["metric"].items()))
        for sample in prometheus.query('{__name__=~"sage_.+"}')
    }


def test_debian_prometheus_2_scrapes_the_same_series(scrape: Scrape, tmp_path) -> None:
    """Debian's 2.42 (kept for the remote-write overlay's users on Prometheus 2) scraping the
    same /metrics: the same series and label sets as Prometheus 3, and exemplars."""
    older = services.binary("prometheus-2")
    targets = {"sage-agent": [scrape.target]}
    with services.prometheus(tmp_path, targets, remote_write=False, executable=older) as prometheus:
        version = prometheus.api("status/buildinfo")["version"]
        assert version.startswith("2."), version
        # Equal at one moment: the demo keeps adding label combinations as it runs.
        services.wait_for(
            lambda: _series(prometheus) == _series(scrape.prometheus),
            timeout=30,
            what="the same series in Prometheus 2 and 3",
        )
        exemplars = services.wait_for(
            lambda: prometheus.query_exemplars(
                "sage_message_processing_duration_seconds_bucket", scrape.started, time.time()
            ),
            what="exemplars in Prometheus 2",
        )
        assert exemplars[0]["exemplars"][0]["labels"]["trace_id"]
