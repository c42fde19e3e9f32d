"""The monitoring plan's PromQL (§4.2), corrected where it does not compute what it says.

Dashboards, alert tests and the end-to-end tests read these; metric names come from the
catalog. Each query says what it means; ``PLAN_FIXES`` says why a plan expression changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from sage_otel.telemetry.catalog import BY_KEY


def m(key: str, suffix: str = "") -> str:
    """The exposed Prometheus name of a catalog instrument (``_bucket``/``_sum``/``_count``)."""
    return BY_KEY[key].prometheus_name + suffix


@dataclass(frozen=True)
class Query:
    key: str
    title: str
    expr: str
    unit: str = ""  # Grafana unit id: s, bytes, percentunit, ops, short


def ratio(numerator: str, denominator: str) -> str:
    """A ratio of sums: both sides aggregated, so differing label sets cannot mis-match."""
    return f"sum({numerator}) / sum({denominator})"


def quantile(q: float, key: str, selector: str = "", window: str = "5m", by: str = "") -> str:
    grouping = f"le, {by}" if by else "le"
    inner = f"sum by ({grouping}) (rate({m(key, '_bucket')}{selector}[{window}]))"
    return f"histogram_quantile({q}, {inner})"


PLAN_QUERIES: tuple[Query, ...] = (
    # Session health
    Query("active_sessions", "Active sessions", f"sum({m('sessions_active')})", "short"),
    Query(
        "session_creation_rate",
        "Session creation rate (per second)",
        f"sum(rate({m('sessions_created')}[1m]))",
        "ops",
    ),
    Query(
        "session_failure_rate",
        "Session failure rate",
        ratio(
            f'rate({m("sessions_created")}{{status="failure"}}[5m])',
            f"rate({m('sessions_created')}[5m])",
        ),
        "percentunit",
    ),
    # Performance
    Query(
        "encrypt_p50",
        "Encryption latency p50",
        quantile(0.50, "session_duration", '{operation="encrypt"}'),
        "s",
    ),
    Query(
        "encrypt_p95",
        "Encryption latency p95",
        quantile(0.95, "session_duration", '{operation="encrypt"}'),
        "s",
    ),
    Query(
        "encrypt_p99",
        "Encryption latency p99",
        quantile(0.99, "session_duration", '{operation="encrypt"}'),
        "s",
    ),
    Query(
        "throughput",
        "Throughput (messages per second)",
        f"sum(rate({m('messages_processed')}[1m]))",
        "ops",
    ),
    Query(
        "average_message_size",
        "Average message size",
        f"sum by (direction) (rate({m('session_message_size', '_sum')}[5m]))"
        f" / sum by (direction) (rate({m('session_message_size', '_count')}[5m]))",
        "bytes",
    ),
    # Security
    Query(
        "replay_attacks",
        "Replay attacks detected (per second)",
        f"sum(rate({m('replay_attacks_detected')}[5m]))",
        "ops",
    ),
    Query(
        "nonce_failure_rate",
        "Nonce validation failure rate",
        ratio(
            f'rate({m("nonce_validations")}{{status="invalid"}}[5m])',
            f"rate({m('nonce_validations')}[5m])",
        ),
        "percentunit",
    ),
    # The plan's dashboard (§4.1) adds this one.
    Query(
        "handshake_success_rate",
        "Handshake success rate",
        ratio(
            f'rate({m("handshakes_completed")}{{status="success"}}[5m])',
            f"rate({m('handshakes_completed')}[5m])",
        ),
        "percentunit",
    ),
)

BY_QUERY_KEY = {query.key: query for query in PLAN_QUERIES}

PLAN_FIXES: dict[str, str] = {
    "session_failure_rate": (
        'The plan divides `rate(x{status="failure"}[5m])` by `rate(x[5m])`. PromQL matches '
        "the two sides series by series on their labels, so the failure series is divided by "
        "itself: the result is 1 whenever anything failed (and there is no result otherwise). "
        "Summing both sides first gives the failure share the query's name promises."
    ),
    "nonce_failure_rate": "Same defect as the session failure rate; both sides are summed.",
    "handshake_success_rate": "Same defect as the session failure rate; both sides are summed.",
    "encrypt_p50": (
        "`histogram_quantile` over `rate(..._bucket)` without aggregation computes one quantile "
        "per scraped instance (and per any other label). `sum by (le)` first gives the "
        "quantile of the whole service, which is what a latency panel or alert means."
    ),
    "encrypt_p95": "As for p50: aggregated by `le` before the quantile.",
    "encrypt_p99": "As for p50: aggregated by `le` before the quantile.",
    "throughput": (
        "`rate(sage_messages_processed_total[1m])` is one series per type and status; the "
        "throughput is their sum."
    ),
    "session_creation_rate": "Summed over status and instances, as the title says.",
    "active_sessions": "Summed over instances: the gauge is per agent process.",
    "replay_attacks": "Summed over instances.",
    "average_message_size": (
        "Kept per direction, but both sides are aggregated by `direction` so that several "
        "instances give one average per direction rather than one per instance."
    ),
}
