"""What the e2e tests evaluate: the plan's queries, every dashboard query, every alert."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "collector" / "prometheus" / "alerts"
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/sage-otel/sage-otel/blob/main/docs/runbook.md#"
# Alerts on the collector's own telemetry: measured in test_collector.py and
# test_pipeline_trust.py, where one runs.
COLLECTOR_ALERTS = frozenset({"TelemetryExportFailures", "TelemetryRejected", "CollectorDown"})
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPERATORS = (" and ", " or ", " unless ")


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expression) for every alert in every rule file."""
    rules = []
    for path in sorted(ALERTS.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend((r["alert"], r["expr"].strip()) for r in group["rules"] if "alert" in r)
    return rules


@functools.cache
def _recorded() -> dict[tuple[str, str], str]:
    """(record name, sloth_id) -> the recording rule's own expression, over raw series: it
    measures the same where the rules are not loaded (Thanos query, a bare Prometheus)."""
    recorded = {}
    for path in sorted(ALERTS.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule and "sloth_id" in rule.get("labels", {}):
                    key = (rule["record"], rule["labels"]["sloth_id"])
                    recorded[key] = " ".join(rule["expr"].split())
    return recorded


def _top_level(expr: str) -> list[int]:
    """Indexes of characters outside (), {}, [] and string literals."""
    depth, quote, out = 0, "", []
    for i, char in enumerate(expr):
        if quote:
            if char == quote and expr[i - 1] != "\\":
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif depth == 0:
            out.append(i)
    return out


def measured(expr: str) -> str:
    """The part of an alert expression that measures, without its threshold.

    ``A > 0.1`` gives ``A``; ``A > x and B > y`` gives ``A``; ``absent(m)`` gives ``m``.
    With healthy traffic an alert's full expression is rightly empty; what must return data
    is the measurement, proving that its names, labels and functions match real series.
    """
    expr = " ".join(expr.split())
    sloth = re.search(r"(slo:sli_error:ratio_rate\w+)\{[^}]*sloth_id=\"([^\"]+)\"", expr)
    if sloth:  # a Sloth burn-rate alert: what it measures is its SLI's ratio, as recorded
        return _recorded()[sloth.group(1), sloth.group(2)]
    positions = set(_top_level(expr))
    for operator in _SET_OPERATORS:
        index = next((i for i in sorted(positions) if expr.startswith(operator, i)), None)
        if index is not None:
            expr = expr[:index]
            positions = set(_top_level(expr))
    for i in sorted(positions, reverse=True):
        for operator in _COMPARISONS:
            if expr.startswith(operator, i) and i - 1 in positions:
                return expr[:i].strip()
    if expr.startswith("absent(") and expr.endswith(")"):
        return expr[len("absent(") : -1]
    return expr


def runbook_anchors() -> set[str]:
    """GitHub's anchors for the runbook's headings."""
    anchors = set()
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors
