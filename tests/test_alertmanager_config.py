"""collector/alertmanager/alertmanager.yml as shipped, read by amtool and against the rules.

Every alert of collector/prometheus/alerts/*.yml takes the route its severity calls for and
ends at the one receiver, `sage-notify`, which sends nothing until a user gives it an
integration; the inhibit rules name alerts and labels that the rule files have. amtool
(Debian's prometheus-alertmanager) decides the routes, as the running Alertmanager does;
tests/e2e/test_alert_delivery.py runs them, with inhibition, up to a webhook.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "collector" / "alertmanager" / "alertmanager.yml"
ALERTS = REPO / "collector" / "prometheus" / "alerts"
RECEIVER = "sage-notify"
CRITICAL = '{severity="critical"}'
PAGE = '{sloth_severity="page"}'
DEFAULT = "default-route"
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes", []):
        yield from routes(child)


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for path in sorted(ALERTS.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(rule for rule in group["rules"] if "alert" in rule)
    return rules


def seconds(duration: str) -> float:
    return sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def matchers(texts: list[str]) -> list[tuple[str, str, str]]:
    """``name = "value"`` strings as (name, operator, value)."""
    parsed = [re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', text) for text in texts]
    assert all(parsed), texts
    return [match.groups() for match in parsed if match]


def amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        reason = "amtool is not installed (run: make validators)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def route_of(labels: dict[str, str]) -> str:
    """The route amtool sends ``labels`` to (the last line of its --tree), checking that it
    ends at the one receiver."""
    result = subprocess.run(
        [
            amtool(), "config", "routes", "test", f"--config.file={CONFIG}", "--tree",
            f"--verify.receivers={RECEIVER}", *(f"{k}={v}" for k, v in labels.items()),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    tree = [line for line in result.stdout.splitlines() if "──" in line]
    assert tree[-1].endswith(f"receiver: {RECEIVER}"), result.stdout
    return tree[-1].split("── ", 1)[1].split("  receiver:")[0]


@pytest.mark.parametrize(
    "rule",
    alert_rules(),
    ids=lambda rule: f"{rule['alert']}-{rule['labels'].get('sloth_severity', '')}".rstrip("-"),
)
def test_every_shipped_alert_takes_the_route_of_its_severity(rule: dict[str, Any]) -> None:
    labels = {"alertname": rule["alert"], **rule["labels"]}
    assert labels["severity"] in ("critical", "warning"), labels
    assert route_of(labels) == (CRITICAL if labels["severity"] == "critical" else DEFAULT)


@pytest.mark.parametrize(
    ("labels", "route"),
    [
        ({"alertname": "SomeBudgetBurn", "sloth_severity": "page"}, PAGE),
        ({"alertname": "SomeBudgetBurn", "sloth_severity": "ticket"}, DEFAULT),
        ({"alertname": "SomethingElse"}, DEFAULT),
    ],
    ids=["slo-page-without-severity", "slo-ticket-without-severity", "no-severity"],
)
def test_alerts_without_a_severity_still_reach_the_receiver(
    labels: dict[str, str], route: str
) -> None:
    assert route_of(labels) == route


def test_one_receiver_that_sends_nothing_until_it_is_given_an_integration() -> None:
    """The one place a user edits; shipped without an integration, so that an unconfigured
    stack sends nothing off the machine and logs no failed deliveries."""
    shipped = config()
    assert shipped["receivers"] == [{"name": RECEIVER}]
    assert {route.get("receiver", RECEIVER) for route in routes(shipped["route"])} == {RECEIVER}


def test_critical_routes_are_faster_than_the_default() -> None:
    root = config()["route"]
    fast = [route for route in root["routes"] if matchers(route["matchers"]) in (
        [("severity", "=", "critical")], [("sloth_severity", "=", "page")]
    )]  # fmt: skip
    assert len(fast) == 2
    for route in fast:
        for timer in ("group_wait", "group_interval", "repeat_interval"):
            assert seconds(route[timer]) < seconds(root[timer]), (timer, route)
    assert "alertname" in root["group_by"] and "instance" not in root["group_by"]


def test_inhibit_rules_name_shipped_alerts_and_labels() -> None:
    """A renamed alert or label would silently turn an inhibit rule off."""
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    values: dict[str, set[str]] = {}
    for rule in rules:
        for key, value in rule["labels"].items():
            values.setdefault(key, set()).add(value)
    inhibit = config()["inhibit_rules"]
    for entry in inhibit:
        for name, operator, value in matchers(entry["source_matchers"] + entry["target_matchers"]):
            known = names if name == "alertname" else values.get(name, set())
            assert operator in ("=", "!=") and value in known, (name, value)
    sources = {matchers(entry["source_matchers"])[0][2]: entry for entry in inhibit}
    # A down agent or collector silences only its own alerts.
    assert sources["SageAgentDown"]["equal"] == ["job", "instance"]
    assert sources["CollectorDown"]["equal"] == ["job", "instance"]
    # An SLO's page silences the ticket of the same SLO.
    assert sources["page"]["target_matchers"] == ['sloth_severity = "ticket"']
    assert sources["page"]["equal"] == ["sloth_id"]
