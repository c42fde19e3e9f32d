"""Grafana dashboards for SAGE agents, built with grafana-foundation-sdk.

Run ``python -m tools.dashboards --write`` after changing the catalog, the
queries or this module; it writes ``collector/grafana/dashboards/*.json`` (``--check`` exits 1
when they are stale, and a test does the same check).

Every metric name comes from :mod:`sage_otel.telemetry.catalog` through the helpers of
:mod:`tools.queries` (``m()``, ``quantile()``, ``ratio()``, ``PLAN_QUERIES``);
none is typed here. Panels are written unscoped and :func:`scoped` adds the dashboard's
``job``/``instance`` filters to every SAGE selector in one place.

The SLO dashboard reads the recording rules Sloth generates from the SLO spec
(``collector/prometheus/alerts/sage-slos.yml``, ``make slos``): each SLO, its objective and
its alert thresholds come from that file, so the dashboard follows the spec.

The dashboards use a ``datasource`` variable (a Prometheus data source, default uid
``prometheus``). The debugging dashboard's latency queries ask Prometheus for exemplars;
the data source's ``exemplarTraceIdDestinations`` (datasource uid ``tempo``) turns each
exemplar's ``trace_id`` into a link to the trace.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import heatmap, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

from sage_otel.telemetry.catalog import INSTRUMENTS, Kind

from .queries import BY_QUERY_KEY, m, quantile

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "collector" / "grafana" / "dashboards"
SLO_RULES = REPO / "collector" / "prometheus" / "alerts" / "sage-slos.yml"
SLO_FILE = "sage-slos.json"
REGENERATE = "python -m tools.dashboards --write"

DATASOURCE_VARIABLE = "datasource"
DATASOURCE_UID = "prometheus"
RATE_INTERVAL = "$__rate_interval"
TAG = "sage"

# What panel_queries() puts in place of each template variable: a 5-minute rate window and
# job/instance filters that match every series (the "All" value of both variables).
DEFAULT_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("$__rate_interval", "5m"),
    ("${job}", ".*"),
    ("$job", ".*"),
    ("${instance}", ".*"),
    ("$instance", ".*"),
)

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _exposed_names() -> list[str]:
    names = []
    for instrument in INSTRUMENTS:
        names.append(m(instrument.key))
        if instrument.kind is Kind.HISTOGRAM:
            names.extend(m(instrument.key, suffix) for suffix in _HISTOGRAM_SUFFIXES)
    return sorted(names, key=len, reverse=True)


_SELECTOR = re.compile(
    r"(?<![\w:])(" + "|".join(map(re.escape, _exposed_names())) + r")(?![\w:])(?:\{([^}]*)\})?"
)
_SCOPE = 'job=~"$job", instance=~"$instance"'


def scoped(expr: str) -> str:
    """``expr`` with the dashboard's job and instance filters added to every SAGE selector."""

    def add(match: re.Match[str]) -> str:
        name, matchers = match.group(1), match.group(2)
        return f"{name}{{{_SCOPE}{', ' + matchers if matchers else ''}}}"

    return _SELECTOR.sub(add, expr)


# --- query shapes -------------------------------------------------------------------------


def _sum(inner: str, by: str = "") -> str:
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def rate_by(key: str, by: str = "", selector: str = "") -> str:
    """Per-second rate of a counter, summed (over instances) and kept per ``by`` labels."""
    return _sum(f"rate({m(key)}{selector}[{RATE_INTERVAL}])", by)


def quantiles(key: str, by: str = "", selector: str = "") -> list[Target]:
    """p50, p95 and p99 of a histogram, aggregated over instances, kept per ``by``."""
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        Target(quantile(q, key, selector, window=RATE_INTERVAL, by=by), f"{legend}p{name}")
        for q, name in ((0.5, "50"), (0.95, "95"), (0.99, "99"))
    ]


def average(key: str, by: str = "") -> str:
    """Mean observed value of a histogram: rate of its sum over rate of its count."""
    return (
        _sum(f"rate({m(key, '_sum')}[{RATE_INTERVAL}])", by)
        + " / "
        + _sum(f"rate({m(key, '_count')}[{RATE_INTERVAL}])", by)
    )


def ratio_by(numerator: str, denominator: str, by: str) -> str:
    """Like :func:`queries.ratio`, but kept per ``by`` labels on both sides."""
    return f"{_sum(numerator, by)} / {_sum(denominator, by)}"


# --- panels -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    exemplar: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    description: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"  # or "heatmap"
    width: int = 12
    height: int = 8
    min: float | None = 0
    max: float | None = None
    stack: bool = False


def panel(
    title: str,
    unit: str,
    description: str,
    *targets: Target | str,
    exemplar: bool = False,
    **options: Any,
) -> Panel:
    """A panel; plain strings are targets without a legend, ``exemplar`` applies to all."""
    built = tuple(
        Target(t.expr, t.legend, t.exemplar or exemplar)
        if isinstance(t, Target)
        else Target(t, exemplar=exemplar)
        for t in targets
    )
    return Panel(title, unit, description, built, **options)


def plan(key: str, title: str, description: str, legend: str = "", **options: Any) -> Panel:
    """A panel showing one of the monitoring plan's queries (corrected), unit included."""
    query = BY_QUERY_KEY[key]
    return panel(title, query.unit, description, Target(query.expr, legend), **options)


def _datasource() -> dashboard_models.DataSourceRef:
    return dashboard_models.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")


def _query(target: Target, ref_id: str, heatmap_format: bool) -> prometheus.Dataquery:
    query = (
        prometheus.Dataquery()
        .ref_id(ref_id)
        .datasource(_datasource())
        .expr(scoped(target.expr))
        .range()
        .editor_mode(prometheus_models.QueryEditorMode.CODE)
        .legend_format(target.legend or "__auto")
    )
    if heatmap_format:
        query = query.format(prometheus_models.PromQueryFormat.HEATMAP)
    if target.exemplar:
        query = query.exemplar(True)
    return query


def _build_panel(spec: Panel) -> Any:
    if spec.kind == "heatmap":
        builder: Any = (
            heatmap.Panel()
            .calculate(False)
            .y_axis(heatmap.YAxisConfig().unit(spec.unit))
            .cell_values(heatmap.CellValues().unit("ops"))
            .color(
                heatmap.HeatmapColorOptions()
                .mode(heatmap_models.HeatmapColorMode.SCHEME)
                .scheme("Oranges")
                .scale(heatmap_models.HeatmapColorScale.EXPONENTIAL)
                .exponent(0.5)
                .steps(64)
            )
            .rows_frame(heatmap.RowsHeatmapOptions().layout(common_models.HeatmapCellLayout.LE))
            .show_legend()
            .mode(common_models.TooltipDisplayMode.SINGLE)
            .show_y_histogram()
            .exemplars_color("rgba(255,0,255,0.7)")
        )
    else:
        builder = (
            timeseries.Panel()
            .legend(
                common_builders.VizLegendOptions()
                .show_legend(True)
                .display_mode(common_models.LegendDisplayMode.LIST)
                .placement(common_models.LegendPlacement.BOTTOM)
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common_models.TooltipDisplayMode.MULTI)
                .sort(common_models.SortOrder.DESCENDING)
            )
            .fill_opacity(10)
        )
        if spec.min is not None:
            builder = builder.min(spec.min)
        if spec.max is not None:
            builder = builder.max(spec.max)
        if spec.stack:
            builder = builder.stacking(
                common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL)
            )
    builder = (
        builder.title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .datasource(_datasource())
        .span(spec.width)
        .height(spec.height)
    )
    for index, target in enumerate(spec.targets):
        builder = builder.with_target(_query(target, chr(ord("A") + index), spec.kind == "heatmap"))
    return builder


# --- dashboards ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    file: str
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]
    # job/instance filters; the SLO dashboard's recording rules are summed over all agents.
    per_agent: bool = True


def _variables(per_agent: bool = True) -> list[Any]:
    anchor = m("sessions_active")  # a gauge every agent exposes from startup
    datasource = (
        dashboard_builders.DatasourceVariable(DATASOURCE_VARIABLE)
        .label("Data source")
        .description("The Prometheus data source holding SAGE metrics.")
        .type("prometheus")  # the builder's name for the data source plugin id ("query")
        .current(dashboard_models.VariableOption(text="Prometheus", value=DATASOURCE_UID))
    )
    if not per_agent:
        return [datasource]
    return [
        datasource,
        _filter_variable(
            "job",
            "Job",
            "Prometheus job (scrape job, or service.name for OTLP-pushed metrics).",
            f"label_values({anchor}, job)",
        ),
        _filter_variable(
            "instance",
            "Instance",
            "Agent instance within the selected jobs.",
            f'label_values({anchor}{{job=~"$job"}}, instance)',
        ),
    ]


def _filter_variable(name: str, label: str, description: str, query: str) -> Any:
    """A multi-value label filter whose "All" matches everything."""
    return (
        dashboard_builders.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(_datasource())
        .query(query)
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dashboard_models.VariableOption(text="All", value="$__all"))
    )


def _annotations() -> Any:
    return (
        dashboard_builders.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(dashboard_models.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .built_in(1)
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
    )


def build(spec: Dashboard) -> dict[str, Any]:
    """The dashboard as a JSON-able dict, panels numbered in layout order."""
    builder = (
        dashboard_builders.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags([TAG])
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .variables(_variables(spec.per_agent))
        .annotation(_annotations())
        .link(
            dashboard_builders.DashboardLink("SAGE dashboards")
            .type(dashboard_models.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for row_title, panels in spec.rows:
        builder = builder.with_row(dashboard_builders.Row(row_title))
        for spec_panel in panels:
            builder = builder.with_panel(_build_panel(spec_panel))
    model = builder.build()
    for number, built_panel in enumerate(model.panels or [], start=1):
        built_panel.id_val = number
    return json.loads(json.dumps(model, cls=JSONEncoder))


def _overview() -> Dashboard:
    plan_panels = (
        plan(
            "active_sessions",
            "Active Sessions",
            "Sessions currently live, summed over the selected agents (the plan's panel).",
            "active",
            width=6,
        ),
        plan(
            "session_creation_rate",
            "Session Creation Rate",
            "Sessions created per second, successful or not, over a 1-minute window "
            "(the plan's panel).",
            "created",
            width=6,
        ),
        plan(
            "handshake_success_rate",
            "Handshake Success Rate",
            "Share of finished handshakes that succeeded over 5 minutes (the plan's panel, "
            "with both sides summed so the ratio is the success share).",
            "success rate",
            width=6,
            max=1,
        ),
        plan(
            "encrypt_p95",
            "Encryption Latency (p95)",
            "95th percentile time to seal one session message over 5 minutes, aggregated "
            "over the selected agents (the plan's panel).",
            "p95",
            width=6,
        ),
    )
    health = (
        plan(
            "session_failure_rate",
            "Session Failure Rate",
            "Share of session creations that failed over 5 minutes.",
            "failure rate",
            width=8,
            max=1,
        ),
        plan(
            "throughput",
            "Throughput",
            "Inbound session messages processed per second (all types and outcomes), "
            "over a 1-minute window.",
            "messages/s",
            width=8,
        ),
        panel(
            "Encryption Latency (p50 / p95 / p99)",
            "s",
            "Time to seal one session message: median, 95th and 99th percentile over 5 "
            "minutes, aggregated over the selected agents.",
            Target(BY_QUERY_KEY["encrypt_p50"].expr, "p50"),
            Target(BY_QUERY_KEY["encrypt_p95"].expr, "p95"),
            Target(BY_QUERY_KEY["encrypt_p99"].expr, "p99"),
            width=8,
        ),
    )
    security = (
        plan(
            "replay_attacks",
            "Replay Attacks Detected",
            "Messages or handshakes refused per second because their nonce was already "
            "seen, over 5 minutes. Anything above zero deserves a look.",
            "replays/s",
            width=8,
        ),
        plan(
            "nonce_failure_rate",
            "Nonce Validation Failure Rate",
            "Share of nonce checks that found a nonce already seen (invalid) over 5 minutes.",
            "invalid share",
            width=8,
            max=1,
        ),
        plan(
            "average_message_size",
            "Average Message Size",
            "Mean plaintext size of messages sealed (outbound) and opened (inbound) by "
            "sessions over 5 minutes.",
            "{{direction}}",
            width=8,
        ),
    )
    return Dashboard(
        "sage-overview.json",
        "sage-overview",
        "SAGE Overview",
        "Health of SAGE agents at a glance: the monitoring plan's four panels, session "
        "failures, throughput, encryption latency and security signals.",
        (
            ("Monitoring plan", plan_panels),
            ("Health and performance", health),
            ("Security and messages", security),
        ),
    )


def _sessions() -> Dashboard:
    return Dashboard(
        "sage-sessions.json",
        "sage-sessions",
        "SAGE Sessions",
        "Secure sessions: how many are created, end and are live, how long session "
        "operations take, and how large the messages they carry are.",
        (
            (
                "Lifecycle",
                (
                    panel(
                        "Sessions Created by Status",
                        "ops",
                        "Sessions created per second, split by outcome (success or failure).",
                        Target(rate_by("sessions_created", "status"), "{{status}}"),
                        width=8,
                    ),
                    panel(
                        "Sessions Expired and Closed",
                        "ops",
                        "Sessions ended per second: expired by a limit (max age, idle timeout, "
                        "max messages) or closed explicitly.",
                        Target(rate_by("sessions_expired"), "expired"),
                        Target(rate_by("sessions_closed"), "closed"),
                        width=8,
                    ),
                    panel(
                        "Active Sessions by Instance",
                        "short",
                        "Sessions currently live in each agent process.",
                        Target(f"sum by (instance) ({m('sessions_active')})", "{{instance}}"),
                        width=8,
                    ),
                ),
            ),
            (
                "Operations",
                (
                    panel(
                        "Session Operation Latency by Operation",
                        "s",
                        "p50, p95 and p99 duration of session operations (create, encrypt, "
                        "decrypt), aggregated over the selected agents.",
                        *quantiles("session_duration", by="operation"),
                    ),
                    panel(
                        "Session Message Size by Direction",
                        "bytes",
                        "p50, p95 and p99 plaintext size of messages sealed (outbound) and "
                        "opened (inbound) by sessions.",
                        *quantiles("session_message_size", by="direction"),
                    ),
                ),
            ),
        ),
    )


def _handshakes() -> Dashboard:
    return Dashboard(
        "sage-handshakes.json",
        "sage-handshakes",
        "SAGE Handshakes",
        "The HPKE handshake: handshakes started and finished, failures by cause, stage "
        "durations and the success rate.",
        (
            (
                "Volume and outcome",
                (
                    panel(
                        "Handshakes Initiated by Role",
                        "ops",
                        "Handshakes started per second, as client (initiator) or server "
                        "(responder).",
                        Target(rate_by("handshakes_initiated", "role"), "{{role}}"),
                        width=8,
                    ),
                    panel(
                        "Handshakes Completed by Status",
                        "ops",
                        "Handshakes finished per second, by outcome.",
                        Target(rate_by("handshakes_completed", "status"), "{{status}}"),
                        width=8,
                    ),
                    panel(
                        "Handshakes Failed by Error Type",
                        "ops",
                        "Failed handshakes per second, by error category (timeout, invalid, "
                        "network, signature, unknown DID, replay, crypto).",
                        Target(rate_by("handshakes_failed", "error_type"), "{{error_type}}"),
                        width=8,
                        stack=True,
                    ),
                ),
            ),
            (
                "Latency and success",
                (
                    panel(
                        "Handshake Stage Duration by Stage",
                        "s",
                        "p50, p95 and p99 duration of each handshake stage: init and "
                        "finalize on the client, process on the server.",
                        *quantiles("handshake_duration", by="stage"),
                    ),
                    plan(
                        "handshake_success_rate",
                        "Handshake Success Rate",
                        "Share of finished handshakes that succeeded over 5 minutes.",
                        "success rate",
                        max=1,
                    ),
                ),
            ),
        ),
    )


def _crypto() -> Dashboard:
    return Dashboard(
        "sage-crypto.json",
        "sage-crypto",
        "SAGE Crypto",
        "Cryptographic operations (sign, verify, encrypt, decrypt): volume by algorithm, "
        "errors and per-operation latency.",
        (
            (
                "Operations",
                (
                    panel(
                        "Crypto Operations by Operation and Algorithm",
                        "ops",
                        "Cryptographic operations per second, by operation and algorithm.",
                        Target(
                            rate_by("crypto_operations", "operation, algorithm"),
                            "{{operation}} {{algorithm}}",
                        ),
                        width=8,
                    ),
                    panel(
                        "Crypto Errors by Operation",
                        "ops",
                        "Failed cryptographic operations per second (bad signature, failed "
                        "authentication), by operation.",
                        Target(rate_by("crypto_errors", "operation"), "{{operation}}"),
                        width=8,
                    ),
                    panel(
                        "Crypto Error Ratio by Operation",
                        "percentunit",
                        "Share of cryptographic operations that failed, by operation.",
                        Target(
                            ratio_by(
                                f"rate({m('crypto_errors')}[{RATE_INTERVAL}])",
                                f"rate({m('crypto_operations')}[{RATE_INTERVAL}])",
                                "operation",
                            ),
                            "{{operation}}",
                        ),
                        width=8,
                        max=1,
                    ),
                ),
            ),
            (
                "Latency",
                (
                    panel(
                        "Crypto Operation Duration by Operation",
                        "s",
                        "p50, p95 and p99 duration of one cryptographic operation, by operation.",
                        *quantiles("crypto_operation_duration", by="operation"),
                        width=24,
                    ),
                ),
            ),
        ),
    )


def _did() -> Dashboard:
    return Dashboard(
        "sage-did.json",
        "sage-did",
        "SAGE DID",
        "Decentralised identifiers: resolutions and registrations by chain and outcome, "
        "and resolution latency per chain.",
        (
            (
                "Resolutions and registrations",
                (
                    panel(
                        "DID Resolutions by Chain and Status",
                        "ops",
                        "DID resolutions per second, by chain and outcome (cache hits included).",
                        Target(rate_by("did_resolutions", "chain, status"), "{{chain}} {{status}}"),
                        width=8,
                    ),
                    panel(
                        "DID Registrations by Chain and Status",
                        "ops",
                        "DID registrations per second, by chain and outcome.",
                        Target(
                            rate_by("did_registrations", "chain, status"), "{{chain}} {{status}}"
                        ),
                        width=8,
                    ),
                    panel(
                        "DID Resolution Failure Ratio by Chain",
                        "percentunit",
                        "Share of DID resolutions that failed, by chain.",
                        Target(
                            ratio_by(
                                f'rate({m("did_resolutions")}{{status="failure"}}[{RATE_INTERVAL}])',
                                f"rate({m('did_resolutions')}[{RATE_INTERVAL}])",
                                "chain",
                            ),
                            "{{chain}}",
                        ),
                        width=8,
                        max=1,
                    ),
                ),
            ),
            (
                "Latency",
                (
                    panel(
                        "DID Resolution Latency by Chain",
                        "s",
                        "p50, p95 and p99 duration of a DID resolution, by chain (cache hits "
                        "included).",
                        *quantiles("did_resolution_duration", by="chain"),
                        width=24,
                    ),
                ),
            ),
        ),
    )


def _messages() -> Dashboard:
    return Dashboard(
        "sage-messages.json",
        "sage-messages",
        "SAGE Messages and Security",
        "Inbound session messages (volume, processing latency, size) and the replay "
        "protection that guards them (replays, nonce checks).",
        (
            (
                "Messages",
                (
                    panel(
                        "Messages Processed by Type and Status",
                        "ops",
                        "Inbound session messages validated and opened per second, by type "
                        "and outcome.",
                        Target(
                            rate_by("messages_processed", "type, status"), "{{type}} {{status}}"
                        ),
                        width=8,
                    ),
                    panel(
                        "Message Processing Latency",
                        "s",
                        "p50, p95 and p99 time to validate and open one inbound message.",
                        *quantiles("message_processing_duration"),
                        width=8,
                    ),
                    panel(
                        "Message Size",
                        "bytes",
                        "Wire size of inbound messages (nonce, ciphertext and tag): mean, "
                        "p50 and p95.",
                        Target(average("message_size"), "mean"),
                        *quantiles("message_size")[:2],
                        width=8,
                    ),
                ),
            ),
            (
                "Security",
                (
                    plan(
                        "replay_attacks",
                        "Replay Attacks Detected",
                        "Messages or handshakes refused per second because their nonce was "
                        "already seen, over 5 minutes.",
                        "replays/s",
                        width=8,
                    ),
                    panel(
                        "Nonce Validations by Status",
                        "ops",
                        "Nonce checks per second: valid, invalid (seen before) or expired "
                        "(outside the window).",
                        Target(rate_by("nonce_validations", "status"), "{{status}}"),
                        width=8,
                    ),
                    plan(
                        "nonce_failure_rate",
                        "Nonce Validation Failure Rate",
                        "Share of nonce checks that found a nonce already seen (invalid) over "
                        "5 minutes.",
                        "invalid share",
                        width=8,
                        max=1,
                    ),
                    panel(
                        "Requests Refused by Category",
                        "ops",
                        "Requests the server refused per second, by error category; "
                        "`overload` is a limit (rate, session share, table, inbox).",
                        Target(rate_by("requests_refused", "category"), "{{category}}"),
                        width=12,
                        stack=True,
                    ),
                    panel(
                        "Server Requests by Outcome",
                        "ops",
                        "SAGE requests the server finished per second: served, refused (the "
                        "request's own doing) or failed (the server's: what the SLOs count "
                        "against their objectives).",
                        Target(
                            rate_by("server_requests", "operation, outcome"),
                            "{{operation}} {{outcome}}",
                        ),
                        width=12,
                        stack=True,
                    ),
                ),
            ),
        ),
    )


def _debugging() -> Dashboard:
    p95 = 0.95
    return Dashboard(
        "sage-debugging.json",
        "sage-debugging",
        "SAGE Debugging",
        "Latency with exemplars: each dot is one recorded operation carrying the trace id "
        "of the span it ran in; click it to open the trace.",
        (
            (
                "Latency with exemplars",
                (
                    panel(
                        "Handshake Stage Duration (p95, exemplars)",
                        "s",
                        "95th percentile duration of each handshake stage, with exemplars "
                        "linking to the handshake's trace.",
                        Target(
                            quantile(p95, "handshake_duration", window=RATE_INTERVAL, by="stage"),
                            "{{stage}} p95",
                        ),
                        exemplar=True,
                    ),
                    panel(
                        "Message Processing Duration (p95, exemplars)",
                        "s",
                        "95th percentile time to validate and open one inbound message, with "
                        "exemplars linking to the message's trace.",
                        Target(
                            quantile(p95, "message_processing_duration", window=RATE_INTERVAL),
                            "p95",
                        ),
                        exemplar=True,
                    ),
                    panel(
                        "Session Encrypt and Decrypt Duration (p95, exemplars)",
                        "s",
                        "95th percentile time to seal (encrypt) and open (decrypt) one session "
                        "message, with exemplars linking to the traces.",
                        Target(
                            quantile(
                                p95,
                                "session_duration",
                                '{operation=~"encrypt|decrypt"}',
                                window=RATE_INTERVAL,
                                by="operation",
                            ),
                            "{{operation}} p95",
                        ),
                        exemplar=True,
                    ),
                    panel(
                        "DID Resolution Duration (p95, exemplars)",
                        "s",
                        "95th percentile DID resolution time per chain, with exemplars "
                        "linking to the resolving trace.",
                        Target(
                            quantile(
                                p95, "did_resolution_duration", window=RATE_INTERVAL, by="chain"
                            ),
                            "{{chain}} p95",
                        ),
                        exemplar=True,
                    ),
                ),
            ),
            (
                "Distribution",
                (
                    panel(
                        "Message Processing Duration Heatmap",
                        "s",
                        "How inbound message processing times are distributed over the "
                        "histogram's buckets (messages per second in each bucket), with "
                        "exemplars.",
                        Target(
                            f"sum by (le) (rate({m('message_processing_duration', '_bucket')}"
                            f"[{RATE_INTERVAL}]))",
                            "{{le}}",
                        ),
                        kind="heatmap",
                        width=24,
                        height=10,
                        exemplar=True,
                    ),
                ),
            ),
        ),
    )


# --- SLOs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slo:
    """One SLO as Sloth generated it: ids, objective and its alerts' window pairs."""

    id: str
    service: str
    name: str
    objective: str  # percent, as written in the spec
    alert: str
    # (severity, burn-rate factor, long window, short window), in the alerts' order
    conditions: tuple[tuple[str, float, str, str], ...]


_CONDITION = re.compile(
    r"max\(slo:sli_error:ratio_rate(\w+)\{[^}]*\} > \(([\d.]+) \*[^)]*\)\) without \(sloth_window\)"
    r"\s*and\s*"
    r"max\(slo:sli_error:ratio_rate(\w+)\{[^}]*\} > \(([\d.]+) \*"
)


def slos(path: Path = SLO_RULES) -> list[Slo]:
    """The SLOs of the generated rule file, in its order."""
    groups = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    found = []
    for info in (rule for rule in rules if rule.get("record") == "sloth_slo_info"):
        labels = info["labels"]
        alerts = [
            rule
            for rule in rules
            if "alert" in rule and f'sloth_id="{labels["sloth_id"]}"' in rule["expr"]
        ]
        conditions = []
        for rule in alerts:
            for short, factor, long, factor_again in _CONDITION.findall(rule["expr"]):
                assert factor == factor_again, rule["expr"]
                conditions.append((rule["labels"]["sloth_severity"], float(factor), long, short))
        found.append(
            Slo(
                labels["sloth_id"],
                labels["sloth_service"],
                labels["sloth_slo"],
                labels["sloth_objective"],
                alerts[0]["alert"],
                tuple(conditions),
            )
        )
    return found


def _of(record: str, slo: Slo) -> str:
    return f'{record}{{sloth_id="{slo.id}"}}'


def _burn_rate(slo: Slo, window: str) -> str:
    """The error ratio over ``window`` in multiples of the error budget (1 = on budget)."""
    return (
        f"{_of(f'slo:sli_error:ratio_rate{window}', slo)} / on (sloth_id) group_left () "
        f"{_of('slo:error_budget:ratio', slo)}"
    )


def _burn_panel(slo: Slo, severity: str) -> Panel:
    conditions = [c for c in slo.conditions if c[0] == severity]
    targets: list[Target] = []
    for _, _, long, short in conditions:
        targets += [Target(_burn_rate(slo, long), long), Target(_burn_rate(slo, short), short)]
    for _, factor, long, short in conditions:
        targets.append(
            Target(f"vector({factor:g})", f"{severity} at {factor:g}x ({long} & {short})")
        )
    pairs = "; ".join(
        f"{factor:g}x over both {long} and {short}" for _, factor, long, short in conditions
    )
    return panel(
        f"Burn Rate: {severity.title()} Windows",
        "short",
        f"Burn rate of the error budget over the {severity} alert's windows: the error "
        f"ratio in multiples of the budget (1 spends exactly the budget in 30 days). "
        f"{slo.alert} {severity}s at {pairs}.",
        *targets,
        width=6,
    )


def _slo_row(slo: Slo) -> tuple[str, tuple[Panel, ...]]:
    return (
        f"{slo.name}: objective {slo.objective}% over 30 days",
        (
            panel(
                "Error Budget Remaining",
                "percentunit",
                "Share of the 30-day error budget not yet spent: 1 minus the 30-day error "
                "ratio (the mean of the 5-minute ratios) over the budget. Below zero the "
                "objective is missed.",
                Target(_of("slo:period_error_budget_remaining:ratio", slo), "remaining"),
                width=6,
                min=None,
            ),
            _burn_panel(slo, "page"),
            _burn_panel(slo, "ticket"),
            panel(
                "SLI and Objective",
                "percentunit",
                "Share of good events over 5 minutes and 1 hour, against the objective.",
                Target(f"1 - {_of('slo:sli_error:ratio_rate5m', slo)}", "SLI (5m)"),
                Target(f"1 - {_of('slo:sli_error:ratio_rate1h', slo)}", "SLI (1h)"),
                Target(_of("slo:objective:ratio", slo), "objective"),
                width=6,
                min=None,
                max=1,
            ),
        ),
    )


def _slos() -> Dashboard:
    found = slos()
    every = f'sloth_service="{found[0].service}"'
    summary = (
        panel(
            "Error Budget Remaining by SLO",
            "percentunit",
            "Share of each SLO's 30-day error budget not yet spent.",
            Target(f"slo:period_error_budget_remaining:ratio{{{every}}}", "{{sloth_slo}}"),
            width=12,
            min=None,
        ),
        panel(
            "Current Burn Rate by SLO",
            "short",
            "Error ratio over 5 minutes in multiples of each SLO's budget: 1 spends the "
            "budget in exactly 30 days, 14.4 spends 2% of it in an hour.",
            Target(f"slo:current_burn_rate:ratio{{{every}}}", "{{sloth_slo}}"),
            width=12,
        ),
    )
    return Dashboard(
        SLO_FILE,
        "sage-slos",
        "SAGE SLOs",
        "Service-level objectives (collector/prometheus/slos/sage.yaml, docs/slos.md): "
        "error budget remaining, burn rates against the page and ticket thresholds of "
        "their multi-window alerts, and each SLI against its objective. Summed over all "
        "agents.",
        (("All SLOs", summary), *(_slo_row(slo) for slo in found)),
        per_agent=False,
    )


def metric_specs() -> tuple[Dashboard, ...]:
    """The dashboards on SAGE metrics: any Prometheus holding them answers their queries."""
    return (
        _overview(),
        _sessions(),
        _handshakes(),
        _crypto(),
        _did(),
        _messages(),
        _debugging(),
    )


def specs() -> tuple[Dashboard, ...]:
    return (*metric_specs(), _slos())


def all_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard: file name -> JSON-able dict."""
    return {spec.file: build(spec) for spec in specs()}


def render(dashboard: Mapping[str, Any]) -> str:
    """The committed form: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def iter_panels(dashboard: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """Every non-row panel, including panels nested in collapsed rows."""
    for item in dashboard.get("panels", []):
        if item.get("type") == "row":
            yield from item.get("panels", [])
        else:
            yield item


def substitute_defaults(expr: str) -> str:
    """``expr`` with each template variable replaced by the value a query would run with."""
    for variable, value in DEFAULT_SUBSTITUTIONS:
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise ValueError(f"unsubstituted template variable in {expr!r}")
    return expr


def panel_queries(
    dashboards: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, runnable PromQL) for every target of every panel; by
    default of the dashboards on SAGE metrics (:func:`slo_panel_queries` has the rest)."""
    if dashboards is None:
        dashboards = {spec.file: build(spec) for spec in metric_specs()}
    return [
        (file, item["title"], substitute_defaults(target["expr"]))
        for file, dashboard in sorted(dashboards.items())
        for item in iter_panels(dashboard)
        for target in item.get("targets", [])
    ]


def slo_panel_queries() -> list[tuple[str, str, str]]:
    """The SLO dashboard's queries: they read Sloth's recording rules, so they return data
    where Prometheus evaluates ``alerts/sage-slos.yml`` on SAGE metrics."""
    return panel_queries({SLO_FILE: build(_slos())})


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file, dashboard in all_dashboards().items():
        path = directory / file
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path = DEFAULT_DIR) -> list[str]:
    """File names whose committed JSON differs from what the code generates."""
    return [
        file
        for file, dashboard in all_dashboards().items()
        if not (directory / file).exists()
        or (directory / file).read_text(encoding="utf-8") != render(dashboard)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.dashboards",
        description="Generate the SAGE Grafana dashboards (lists them by default).",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write the JSON files to --dir")
    group.add_argument("--check", action="store_true", help="exit 1 if any file in --dir is stale")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"default: {DEFAULT_DIR}")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(args.dir):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    if args.check:
        outdated = stale(args.dir)
        if outdated:
            print(f"stale: {', '.join(outdated)}: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    for file, title, expr in panel_queries():
        print(f"{file}\t{title}\t{expr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
