"""The documentation's pictures, drawn from a live run: ``make pictures``.

``python -m tools.pictures --out docs/images`` starts, on loopback ports:

* Jaeger v2 (the trace backend of the end-to-end tests, standing in for Tempo) and
  Prometheus with exemplar storage, scraping both agents every second and evaluating the
  alert rules of ``collector/prometheus/alerts/`` with their ``for:`` durations and group
  intervals divided by :data:`ALERT_TIME_DIVISOR` (the expressions are the files' own);
* ``sage-otel serve``: a server agent in its own process (service ``sage-server``);
* ``sage-otel demo --server …``: client agents with the demo's ordinary and deliberately
  failing traffic (service ``sage-clients``). Both export spans over OTLP to Jaeger; the
  trace context travels in ``traceparent``, so a message is one trace across two processes.

After ``--seconds`` of traffic (by default 7 minutes: the dashboards' 5-minute rate windows
fill up, and the overview and heatmap show the last 2 minutes, the alert the first 150 s)
it draws, from what Prometheus and Jaeger stored:

* ``overview.png``: every panel of the SAGE Overview dashboard
  (``collector/grafana/dashboards/sage-overview.json``) in the dashboard's own grid, each
  from its own PromQL through ``/api/v1/query_range``;
* ``exemplar-trace.png``: the debugging dashboard's message-processing heatmap with its
  exemplars (``/api/v1/query_exemplars``), and the trace one exemplar names, fetched from
  Jaeger (``/api/traces/<trace id>``) and drawn as a waterfall;
* ``alert.png``: an alert from inactive to pending to firing, from Prometheus' ``ALERTS``;
* ``architecture.png``: ``docs/images/architecture.dot`` rendered by Graphviz's ``dot``.

Dashboard queries run as :func:`tools.dashboards.panel_queries` runs them (``$__rate_interval``
as 5m, every job and instance). :func:`draw_all` returns what each picture was drawn from,
so that ``tests/e2e/test_pictures.py`` can check it; the command exits 1 when a picture
would show nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import yaml
from matplotlib.colors import PowerNorm
from PIL import Image

from sage_otel.demo import DemoConfig

from . import services
from .dashboards import iter_panels, substitute_defaults

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "images"
DASHBOARDS = REPO / "collector" / "grafana" / "dashboards"
ALERT_RULES = REPO / "collector" / "prometheus" / "alerts"
ARCHITECTURE_SOURCE = DEFAULT_OUT / "architecture.dot"

OVERVIEW = "sage-overview.json"
DEBUGGING = "sage-debugging.json"
HEATMAP_PANEL = "Message Processing Duration Heatmap"
ALERT = "ReplayAttacksDetected"
# The rules' `for:` (1m to 10m) and the critical group's 30s interval, divided by this, so
# that a run of a minute or two shows alerts going pending and firing.
ALERT_TIME_DIVISOR = 6
# The dashboards' rates look back 1m or 5m: a rate over a window reaching back before the
# first scrape is too low (Prometheus divides by the whole window). The overview and the
# heatmap show the last STEADY_SECONDS of the run, the alert its first ALERT_SECONDS.
RATE_WINDOW = 300
STEADY_SECONDS = 120
ALERT_SECONDS = 150
DEFAULT_SECONDS = RATE_WINDOW + STEADY_SECONDS

SERVER_SERVICE = "sage-server"
CLIENT_SERVICE = "sage-clients"
# Scrape targets are labelled with readable instance names instead of host:port.
SERVER_INSTANCE = "server-agent"
CLIENT_INSTANCE = "client-agents"

DPI = 80
COLORS = ("#3274d9", "#e0752d", "#56a64b", "#a352cc", "#e02f44", "#8ab8ff", "#f2cc0c")
STATE_COLORS = {"pending": "#f2a900", "firing": "#d62728"}
EXEMPLAR_COLOR = "#e600e6"  # the debugging heatmap's exemplar colour, rgba(255,0,255,0.7)


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """The services of a live run, still up, and the time range the traffic covered."""

    prometheus: services.Prometheus
    jaeger: services.Jaeger
    start: float
    end: float
    demo_summary: dict[str, Any]

    def steady(self) -> Window:
        """The last STEADY_SECONDS: every rate window full once the run is long enough."""
        return Window(max(self.start, self.end - STEADY_SECONDS), self.end)

    def opening(self) -> Window:
        """The first ALERT_SECONDS, when the alerts go pending and fire."""
        return Window(self.start, min(self.end, self.start + ALERT_SECONDS))


@dataclass(frozen=True)
class Window:
    start: float
    end: float

    @property
    def step(self) -> float:
        """A query_range step giving about 120 points (at least 1s)."""
        return max(1.0, round((self.end - self.start) / 120))


def _duration_seconds(text: str) -> float:
    """A Prometheus duration (``90s``, ``5m``, ``1h30m``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(number) * units[unit] for number, unit in parts)


def scaled_rules(source: Path, destination: Path, divisor: float = ALERT_TIME_DIVISOR) -> Path:
    """``source`` with every ``for:`` and group ``interval:`` divided by ``divisor``.

    Everything else (expressions, labels, annotations) is the file's own.
    """
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        if "interval" in group:
            group["interval"] = f"{max(1, round(_duration_seconds(group['interval']) / divisor))}s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{max(1, round(_duration_seconds(rule['for']) / divisor))}s"
    destination.write_text(yaml.safe_dump(rules, sort_keys=False))
    return destination


def _agent_env(jaeger: services.Jaeger, service: str) -> dict[str, str]:
    """The caller's environment without its OTEL_* settings, plus spans to Jaeger over OTLP.

    Only traces go over OTLP (metrics are scraped), as docs/stack.md describes for agents
    with one metrics path.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(
        OTEL_SERVICE_NAME=service,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=jaeger.otlp_http + "/v1/traces",
        OTEL_BSP_SCHEDULE_DELAY="500",
    )
    return env


# The demo clients' session limit, and their trust: the server continues their traces, so an
# exemplar's trace crosses both agents (docs/tracing.md, "Trace context between agents").
_DEMO_LIMIT = {
    "SAGE_OTEL_SESSION_MAX_MESSAGES": str(DemoConfig.session_max_messages),
    "OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT": "parent",
}


@contextlib.contextmanager
def _server_agent(workdir: Path, jaeger: services.Jaeger) -> Iterator[dict[str, str]]:
    """``sage-otel serve`` with a JSON-file registry; yields its first line's fields."""
    port, metrics_port = services.free_port(), services.free_port()
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "sage_otel.cli", "serve",
                "--host", services.LOOPBACK, "--port", str(port),
                "--metrics-host", services.LOOPBACK, "--metrics-port", str(metrics_port),
                "--identity", str(workdir / "server-identity.json"),
                "--registry", str(workdir / "registry.json"),
            ],
            # What `sage-otel demo` gives a server it starts: sessions a client has finished
            # end on the server too, and the server continues the clients' traces.
            env={**_agent_env(jaeger, SERVER_SERVICE), **_DEMO_LIMIT},
            cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            if not {"did", "url", "metrics"} <= set(fields):
                raise RuntimeError(
                    f"sage-otel serve did not start: {line!r}\n{services.log_tail(log_path)}"
                )
            fields["registry"] = str(workdir / "registry.json")
            yield fields
        finally:
            services.stop(process)


def _say(message: str) -> None:
    """A progress line on stderr: a live run takes minutes (make pictures)."""
    print(f"pictures: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _ticking(what: str, seconds: float, every: float = 30.0) -> Iterator[None]:
    """Say every ``every`` seconds how far along ``what`` (``seconds`` long) is."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(every):
            elapsed = time.monotonic() - start
            share = min(99, int(100 * elapsed / seconds)) if seconds else 99
            _say(f"  {what}: {elapsed:.0f}/{seconds:.0f} s ({share}%)")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _run_demo(
    workdir: Path, jaeger: services.Jaeger, server: Mapping[str, str], metrics_port: int, seconds
) -> dict[str, Any]:
    with _ticking("demo traffic", seconds):
        result = _demo_process(workdir, jaeger, server, metrics_port, seconds)
    if result.returncode != 0:
        raise RuntimeError(f"sage-otel demo exited {result.returncode}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _demo_process(
    workdir: Path, jaeger: services.Jaeger, server: Mapping[str, str], metrics_port: int, seconds
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "sage_otel.cli", "demo", "--json",
            "--duration", str(seconds), "--server", server["url"],
            "--server-did", server["did"], "--registry", server["registry"],
            "--metrics-host", services.LOOPBACK, "--metrics-port", str(metrics_port),
        ],
        env=_agent_env(jaeger, CLIENT_SERVICE), cwd=workdir, capture_output=True, text=True,
        timeout=seconds + 120, check=False,
    )  # fmt: skip


def _wait_for_restored_rules(prometheus: services.Prometheus) -> None:
    """Wait until every rule group has been evaluated twice.

    Prometheus writes no ALERTS samples until it has restored the alerts' ``for`` state,
    which it does after a group's second evaluation: an alert going active before that
    would show in ALERTS late, its pending time cut short.
    """

    def evaluations() -> dict[str, str]:
        groups = prometheus.api("rules")["groups"]
        return {g["name"]: g.get("lastEvaluation", "") for g in groups}

    def evaluated_once() -> dict[str, str]:
        seen = evaluations()
        # A group not evaluated yet reports Go's zero time, 0001-01-01T00:00:00Z.
        return seen if seen and not any(v.startswith("0001") for v in seen.values()) else {}

    first = services.wait_for(evaluated_once, timeout=60, what="the rule groups' evaluation")
    services.wait_for(
        lambda: all(evaluations()[name] != when for name, when in first.items()),
        timeout=60,
        interval=0.2,
        what="the rule groups' second evaluation",
    )
    time.sleep(0.5)  # the restore runs right after the second evaluation


@contextlib.contextmanager
def live_run(workdir: Path, seconds: float) -> Iterator[Run]:
    """Jaeger, Prometheus, a server agent and the demo's clients for ``seconds``; the
    services stay up while the caller draws, and are all stopped afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    rules = workdir / "rules"
    rules.mkdir(exist_ok=True)
    rule_files = [
        scaled_rules(path, rules / path.name) for path in sorted(ALERT_RULES.glob("*.yml"))
    ]
    with services.jaeger(workdir) as jaeger, _server_agent(workdir, jaeger) as server:
        client_metrics_port = services.free_port()
        server_metrics = server["metrics"].split("://", 1)[1].rsplit("/", 1)[0]
        targets = {
            "sage-agent": {
                "static_configs": [
                    {
                        "targets": [f"{services.LOOPBACK}:{client_metrics_port}"],
                        "labels": {"instance": CLIENT_INSTANCE},
                    },
                    {"targets": [server_metrics], "labels": {"instance": SERVER_INSTANCE}},
                ]
            }
        }
        with services.prometheus(
            workdir, targets, remote_write=False, rule_files=rule_files
        ) as prometheus:
            _wait_for_restored_rules(prometheus)
            start = time.time()
            summary = _run_demo(workdir, jaeger, server, client_metrics_port, seconds)
            end = time.time()
            time.sleep(2)  # the last scrape and rule evaluation
            yield Run(prometheus, jaeger, start, end, summary)


# ----------------------------------------------------------------------------- data


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]


@dataclass
class PanelData:
    title: str
    unit: str
    exprs: list[str]
    series: list[Series]


@dataclass
class TraceData:
    trace_id: str
    span_id: str
    exemplar_value: float
    exemplar_time: float
    exemplars: int
    spans: list[dict[str, Any]]
    services: list[str]


@dataclass
class AlertData:
    alert: str
    expr: str
    first: dict[str, float]
    """alertstate -> first time ALERTS showed the alert in that state."""
    series: list[Series]
    states: dict[str, list[tuple[float, str]]]
    """every alert seen active -> its (time, state) samples."""


@dataclass
class Pictures:
    files: dict[str, Path] = field(default_factory=dict)
    overview: list[PanelData] = field(default_factory=list)
    trace: TraceData | None = None
    alert: AlertData | None = None

    def problems(self) -> list[str]:
        """What a picture would show empty or not at all."""
        found = []
        for panel in self.overview:
            if not any(_finite(s.values) for s in panel.series):
                found.append(f"overview panel {panel.title!r} has no data")
        if self.trace is None:
            found.append("no exemplar whose trace crosses two agents")
        if self.alert is None or "firing" not in self.alert.first:
            found.append(f"{ALERT} did not fire")
        return found


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _dashboard(file: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / file).read_text())


def _legend(template: str, labels: Mapping[str, str], expr: str) -> str:
    if not template or template == "__auto":
        shown = {k: v for k, v in labels.items() if k != "__name__"}
        return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or expr
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def _range(run: Run, window: Window, expr: str, template: str = "") -> list[Series]:
    result = run.prometheus.query_range(expr, window.start, window.end, window.step)
    return [
        Series(
            _legend(template, item["metric"], expr),
            [float(t) for t, _ in item["values"]],
            [float(v) for _, v in item["values"]],
        )
        for item in result
    ]


# ----------------------------------------------------------------------------- drawing


def _save(fig: plt.Figure, path: Path) -> Path:
    """PNG at DPI, reduced to a 256-colour palette (a third of the size, same look)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def _unit(unit: str, values: Sequence[float]) -> tuple[str, float]:
    """Axis label and multiplier for a Grafana unit id, scaled as Grafana would show it."""
    if unit == "s":
        top = max((abs(v) for v in values), default=0)
        if top < 1e-3:
            return "µs", 1e6
        if top < 1:
            return "ms", 1e3
        return "s", 1
    return {
        "ops": ("per second", 1),
        "percentunit": ("%", 100),
        "bytes": ("bytes", 1),
        "short": ("", 1),
    }.get(unit, (unit, 1))


def _time_axis(ax: Any, label: bool = True) -> None:
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))
    if label:
        ax.set_xlabel("time (UTC)", fontsize=8)


def _dates(times: Sequence[float]) -> list[datetime]:
    return [datetime.fromtimestamp(t, tz=timezone.utc) for t in times]


def _style(ax: Any) -> None:
    ax.grid(True, color="#e4e4e4", linewidth=0.6)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw_overview(run: Run, path: Path) -> list[PanelData]:
    """Every panel of the overview dashboard, in its grid, from its own queries."""
    dashboard = _dashboard(OVERVIEW)
    items = dashboard["panels"]
    window = run.steady()
    grid_rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in items)
    row_inches, header, width_inches = 0.36, 0.75, 16.0
    height = grid_rows * row_inches + header
    fig = plt.figure(figsize=(width_inches, height))
    fig.text(
        0.008,
        1 - 0.3 / height,
        f"{dashboard['title']}, the last {window.end - window.start:.0f} s of a "
        f"{run.end - run.start:.0f} s run of sage-otel demo against a server agent",
        fontsize=13,
        fontweight="bold",
    )
    fig.text(
        0.008,
        1 - 0.58 / height,
        "Each panel: its PromQL from collector/grafana/dashboards/sage-overview.json through "
        "Prometheus' /api/v1/query_range ($__rate_interval = 5m, all jobs and instances).",
        fontsize=8.5,
        color="#555555",
    )
    drawn = []
    for item in items:
        pos = item["gridPos"]
        top = 1 - (header + pos["y"] * row_inches) / height
        if item.get("type") == "row":
            fig.text(0.008, top - 0.7 * row_inches / height, item["title"], fontsize=10.5,
                     fontweight="bold", color="#333333")  # fmt: skip
            continue
        bottom = 1 - (header + (pos["y"] + pos["h"]) * row_inches) / height
        rect = (
            pos["x"] / 24 + 0.62 / width_inches,  # room for the y axis' labels
            bottom + 0.78 / height,  # time ticks and the legend below the graph
            pos["w"] / 24 - 0.85 / width_inches,
            (top - bottom) - 1.1 / height,  # and the title above
        )
        drawn.append(_draw_panel(fig.add_axes(rect), item, run, window))
    _save(fig, path)
    return drawn


def _draw_panel(ax: Any, item: Mapping[str, Any], run: Run, window: Window) -> PanelData:
    defaults = item.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "")
    series: list[Series] = []
    exprs = []
    for target in item.get("targets", []):
        expr = substitute_defaults(target["expr"])
        exprs.append(expr)
        series.extend(_range(run, window, expr, target.get("legendFormat", "")))
    label, scale = _unit(unit, [v for s in series for v in _finite(s.values)])
    drawable = [one for one in series if _finite(one.values)]  # not a 0/0 series (NaN only)
    for index, one in enumerate(drawable):
        ax.plot(
            _dates(one.times),
            [v * scale for v in one.values],
            color=COLORS[index % len(COLORS)],
            linewidth=1.5,
            label=one.label,
        )
    values = [v * scale for s in series for v in _finite(s.values)]
    if defaults.get("min") is not None:
        ax.set_ylim(bottom=defaults["min"] * scale)
    if defaults.get("max") is not None:
        ax.set_ylim(top=defaults["max"] * scale)
    elif values:
        ax.set_ylim(top=max(values) * 1.2 or 1)  # a steady line, not on the frame's edge
    ax.set_xlim(_dates([window.start, window.end]))
    ax.set_title(item["title"], loc="left", fontsize=10.5, fontweight="bold")
    ax.set_ylabel(label, fontsize=8.5)
    _time_axis(ax, label=False)
    _style(ax)
    if drawable:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.16), fontsize=8, frameon=False,
                  ncol=len(drawable), handlelength=1.5, borderaxespad=0)  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#999999")
    return PanelData(item["title"], unit, exprs, series)


def _heatmap_panel() -> tuple[dict[str, Any], str]:
    for item in iter_panels(_dashboard(DEBUGGING)):
        if item["title"] == HEATMAP_PANEL:
            return item, substitute_defaults(item["targets"][0]["expr"])
    raise LookupError(f"{DEBUGGING} has no panel {HEATMAP_PANEL!r}")


def _tree(spans: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, span) in depth-first order, children by start time."""
    ids = {span["spanID"] for span in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parents = [r["spanID"] for r in span.get("references", []) if r["spanID"] in ids]
        children.setdefault(parents[0] if parents else None, []).append(dict(span))
    ordered: list[tuple[int, dict[str, Any]]] = []

    def visit(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["startTime"]):
            ordered.append((depth, span))
            visit(span["spanID"], depth + 1)

    visit(None, 0)
    return ordered


def find_exemplar_trace(run: Run, window: Window, expr: str, tries: int = 40) -> TraceData | None:
    """The slowest exemplar of ``expr`` in ``window`` whose trace Jaeger holds with spans of
    two or more services (a message's trace crosses the client and the server agent)."""
    found = run.prometheus.query_exemplars(expr, window.start, window.end)
    exemplars = [e for series in found for e in series["exemplars"]]
    candidates = sorted(exemplars, key=lambda e: float(e["value"]), reverse=True)[:tries]
    for exemplar in candidates:
        trace_id = exemplar["labels"].get("trace_id", "")
        if not re.fullmatch(r"[0-9a-f]{32}", trace_id):
            continue
        trace = run.jaeger.find_trace(trace_id)
        if not trace:
            continue
        processes = trace["processes"]
        names = sorted({processes[s["processID"]]["serviceName"] for s in trace["spans"]})
        span_ids = {s["spanID"] for s in trace["spans"]}
        if len(names) >= 2 and exemplar["labels"].get("span_id") in span_ids:
            spans = [
                {**s, "serviceName": processes[s["processID"]]["serviceName"]}
                for s in trace["spans"]
            ]
            return TraceData(
                trace_id,
                exemplar["labels"]["span_id"],
                float(exemplar["value"]),
                float(exemplar["timestamp"]),
                len(exemplars),
                spans,
                names,
            )
    return None


def draw_exemplar_trace(run: Run, path: Path) -> TraceData | None:
    """The heatmap with its exemplars, and the waterfall of the slowest exemplar's trace."""
    item, expr = _heatmap_panel()
    window = run.steady()
    buckets = run.prometheus.query_range(expr, window.start, window.end, window.step)
    exemplars = run.prometheus.query_exemplars(expr, window.start, window.end)
    trace = None
    if exemplars:
        # Spans reach Jaeger within a second or so of ending; wait for the last ones.
        trace = services.wait_for(
            lambda: find_exemplar_trace(run, window, expr),
            timeout=30,
            what="an exemplar whose trace crosses two agents",
        )

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(13, 9.6), gridspec_kw={"height_ratios": [1.1, 1], "hspace": 0.5}
    )
    fig.subplots_adjust(left=0.25, right=0.95, top=0.9, bottom=0.08)
    fig.text(
        0.01,
        0.965,
        "From a latency bucket to its trace: exemplars stored by Prometheus, one trace from "
        "the trace backend",
        fontsize=13,
        fontweight="bold",
    )
    fig.text(
        0.01,
        0.94,
        f"The last {window.end - window.start:.0f} s of a {run.end - run.start:.0f} s run: "
        f"sage-otel demo's client agents ({CLIENT_SERVICE}) and a server agent "
        f"({SERVER_SERVICE}) in two processes.",
        fontsize=8.5,
        color="#555555",
    )
    _draw_heatmap(top, fig, item, buckets, exemplars, window, expr, trace)
    if trace is not None:
        _draw_waterfall(bottom, trace)
    else:
        bottom.text(0.5, 0.5, "no trace found", transform=bottom.transAxes, ha="center")
    _save(fig, path)
    return trace


def _draw_heatmap(
    ax: Any,
    fig: Any,
    item: Mapping[str, Any],
    buckets: Sequence[Mapping[str, Any]],
    exemplars: Sequence[Mapping[str, Any]],
    window: Window,
    expr: str,
    trace: TraceData | None,
) -> None:
    ax.set_title(item["title"], loc="left", fontsize=10.5, fontweight="bold")
    _style(ax)
    ax.grid(False)
    if not buckets:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
        return
    by_le = sorted(
        ((float(b["metric"]["le"]), b["values"]) for b in buckets), key=lambda pair: pair[0]
    )
    times = sorted({float(t) for _, values in by_le for t, _ in values})
    # Prometheus' buckets are cumulative (observations <= le): one row per bucket instead.
    cumulative = [{float(t): float(v) for t, v in values} for _, values in by_le]
    rows = [
        [
            max(0.0, cumulative[i].get(t, 0.0) - (cumulative[i - 1].get(t, 0.0) if i else 0.0))
            for t in times
        ]
        for i in range(len(by_le))
    ]
    finite = [le for le, _ in by_le if math.isfinite(le)]
    uppers = [*finite, finite[-1] * 2][: len(by_le)]  # +Inf drawn as one more doubling
    edges = [uppers[0] / 2, *uppers]
    used = [i for i, row in enumerate(rows) if any(row)] or [0, len(rows) - 1]
    low, high = max(0, used[0] - 1), min(len(rows), used[-1] + 2)
    half = window.step / 2
    time_edges = _dates([times[0] - half, *(t + half for t in times)])
    mesh = ax.pcolormesh(
        time_edges,
        [e * 1e3 for e in edges[low : high + 1]],
        rows[low:high],
        cmap="Oranges",
        norm=PowerNorm(gamma=0.5, vmin=0),
        shading="flat",
    )
    colorbar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.035)
    colorbar.set_label("messages per second in the bucket", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("processing time (ms),\nbucket bounds", fontsize=8.5)
    ax.set_xlim(time_edges[0], time_edges[-1])
    _time_axis(ax)
    points = [(float(e["timestamp"]), float(e["value"])) for s in exemplars for e in s["exemplars"]]
    if points:
        ax.scatter(
            _dates([t for t, _ in points]),
            [v * 1e3 for _, v in points],
            s=10,
            color=EXEMPLAR_COLOR,
            alpha=0.75,
            linewidths=0,
            label=f"exemplars ({len(points)}), each with a trace id",
        )
    if trace is not None:
        when = _dates([trace.exemplar_time])[0]
        ax.scatter(
            [when], [trace.exemplar_value * 1e3], s=130, facecolors="none",
            edgecolors="black", linewidths=1.8, label="the exemplar whose trace is below",
        )  # fmt: skip
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False,
              borderaxespad=0.2)  # fmt: skip
    ax.text(
        0.0,
        -0.27,
        f"Cells: query_range of the debugging dashboard's {expr}\n"
        "Dots: /api/v1/query_exemplars of the same query (the newest exemplar per bucket at "
        "each scrape of OpenMetrics /metrics).",
        transform=ax.transAxes,
        fontsize=7.5,
        color="#555555",
        va="top",
    )


def _draw_waterfall(ax: Any, trace: TraceData) -> None:
    ordered = _tree(trace.spans)
    origin = min(span["startTime"] for _, span in ordered)
    services_seen = sorted({span["serviceName"] for _, span in ordered})
    color = {name: COLORS[i % len(COLORS)] for i, name in enumerate(services_seen)}
    end = max(span["startTime"] + span["duration"] - origin for _, span in ordered) / 1e3
    labels = []
    for row, (depth, span) in enumerate(ordered):
        start_ms = (span["startTime"] - origin) / 1e3
        duration_ms = span["duration"] / 1e3
        mine = span["spanID"] == trace.span_id
        ax.barh(
            row,
            max(duration_ms, end * 0.003),
            left=start_ms,
            height=0.62,
            color=color[span["serviceName"]],
            edgecolor="black" if mine else "none",
            linewidth=1.8,
        )
        ax.text(
            start_ms + duration_ms + end * 0.012,
            row,
            f"{duration_ms:.2f} ms" + ("  ← the exemplar's span" if mine else ""),
            va="center",
            fontsize=8.5,
            fontweight="bold" if mine else "normal",
        )
        branch = "   " * (depth - 1) + "└─ " if depth else ""
        labels.append(f"{branch}{span['operationName']}   {span['serviceName']}")
    ax.set_yticks(range(len(ordered)), labels, fontsize=8.5, family="monospace")
    for label in ax.get_yticklabels():
        label.set_horizontalalignment("left")
    ax.tick_params(axis="y", pad=215, length=0)  # labels left-aligned in the margin
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.35)
    ax.set_xlabel("milliseconds since the trace's first span started", fontsize=8.5)
    ax.set_title(
        f"Trace {trace.trace_id}: {len(ordered)} spans from {len(services_seen)} services",
        loc="left",
        fontsize=10.5,
        fontweight="bold",
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[name]) for name in services_seen]
    ax.legend(handles, services_seen, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2,
              fontsize=8, frameon=False, borderaxespad=0.2)  # fmt: skip
    _style(ax)
    ax.grid(True, axis="x", color="#e4e4e4")
    ax.grid(False, axis="y")
    ax.text(
        0.0,
        -0.2,
        f"Bars: GET /api/traces/{trace.trace_id} on Jaeger v2, which received the spans "
        "over OTLP from both processes (trace context in the traceparent header).",
        transform=ax.transAxes,
        fontsize=7.5,
        color="#555555",
        va="top",
    )


def _alert_rule(name: str) -> str:
    for path in sorted(ALERT_RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    return " ".join(rule["expr"].split())
    raise LookupError(f"no alert rule {name!r} in {ALERT_RULES}")


def draw_alert(run: Run, path: Path, alert: str = ALERT) -> AlertData:
    """The alert's expression per instance, and every alert's state from ``ALERTS``."""
    expr = _alert_rule(alert)
    window = run.opening()
    series = _range(run, window, expr, "{{instance}}")
    states: dict[str, list[tuple[float, str]]] = {}
    first: dict[str, float] = {}
    for item in run.prometheus.query_range("ALERTS", window.start, window.end, 1):
        labels = item["metric"]
        key = labels["alertname"] + (f" ({labels['instance']})" if "instance" in labels else "")
        for t, _ in item["values"]:
            states.setdefault(key, []).append((float(t), labels["alertstate"]))
            if labels["alertname"] == alert:
                state = labels["alertstate"]
                first[state] = min(first.get(state, math.inf), float(t))

    lanes = max(len(states), 1)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(13, 4.6 + 0.34 * lanes),
        sharex=True,
        gridspec_kw={"height_ratios": [2.6, 0.5 + 0.34 * lanes], "hspace": 0.3},
    )
    fig.subplots_adjust(left=0.25, right=0.97, top=0.84, bottom=0.1)
    fig.text(
        0.01,
        0.95,
        f"Alert {alert} on the demo's injected replays: inactive, pending, firing",
        fontsize=13,
        fontweight="bold",
    )
    fig.text(
        0.01,
        0.91,
        f"The first {window.end - window.start:.0f} s of the run. Prometheus evaluates the "
        "rule files of collector/prometheus/alerts/ with their expressions unchanged and "
        f"every for: and group interval divided by {ALERT_TIME_DIVISOR} ({alert}: for 1m -> "
        f"{60 // ALERT_TIME_DIVISOR}s).",
        fontsize=8.5,
        color="#555555",
    )
    for index, one in enumerate(series):
        top.plot(_dates(one.times), one.values, color=COLORS[index % len(COLORS)],
                 linewidth=1.5, marker=".", markersize=3, label=one.label)  # fmt: skip
    top.set_title(f"{alert}: {expr}", loc="left", fontsize=9.5, fontweight="bold")
    top.set_ylabel("replays refused\nin the last 5 min", fontsize=8.5)
    top.set_ylim(bottom=0)
    if series:
        top.legend(loc="lower right", fontsize=8, title="instance", title_fontsize=8)
    for state, when in first.items():
        for ax in (top, bottom):
            ax.axvline(_dates([when])[0], color=STATE_COLORS.get(state, "gray"),
                       linestyle="--", linewidth=1)  # fmt: skip
        lower = state != "pending"  # both labels right of their lines, firing's lower
        top.annotate(
            f"{state} at +{when - run.start:.0f} s",
            (_dates([when])[0], 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -26 if lower else -12),
            textcoords="offset points",
            ha="left",
            fontsize=8.5,
            color=STATE_COLORS.get(state, "gray"),
            fontweight="bold",
        )
    _style(top)

    names = sorted(states, key=lambda key: (not key.startswith(alert), key))
    one_second = 1 / 86400  # in matplotlib's date unit, days: ALERTS is queried every second
    for row, name in enumerate(names):
        for t, state in states[name]:
            bottom.barh(row, one_second, left=mdates.date2num(_dates([t])[0]), height=0.7,
                        color=STATE_COLORS.get(state, "gray"), linewidth=0)  # fmt: skip
    bottom.set_yticks(range(len(names)), names, fontsize=8.5)
    bottom.invert_yaxis()
    bottom.set_title(
        "query_range of ALERTS: every alert Prometheus held pending or firing (alertstate)",
        loc="left",
        fontsize=9.5,
        fontweight="bold",
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLORS.values()]
    bottom.legend(handles, list(STATE_COLORS), loc="lower right", bbox_to_anchor=(1.0, 1.0),
                  ncol=2, fontsize=8, frameon=False, borderaxespad=0.2)  # fmt: skip
    bottom.set_xlim(_dates([window.start, window.end]))
    _time_axis(bottom)
    _style(bottom)
    bottom.grid(False, axis="y")
    _save(fig, path)
    return AlertData(alert, expr, first, series, states)


def draw_architecture(source: Path, path: Path) -> Path:
    """``source`` (Graphviz DOT) rendered by ``dot`` into a palette PNG at ``path``."""
    dot = services.binary("dot")
    rendered = subprocess.run(
        [dot, "-Tpng", f"-Gdpi={DPI}", str(source)], capture_output=True, check=True, timeout=60
    ).stdout
    image = Image.open(io.BytesIO(rendered)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


# ----------------------------------------------------------------------------- all


def draw_all(out: Path, seconds: float, workdir: Path | None = None) -> Pictures:
    """A live run of ``seconds``, then every picture into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = Pictures()
    _say("[1/5] the architecture (Graphviz)")
    pictures.files["architecture"] = draw_architecture(
        ARCHITECTURE_SOURCE, out / "architecture.png"
    )
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pictures-")))
        _say(f"[2/5] Jaeger, Prometheus, a server agent, then {seconds:.0f} s of demo traffic")
        run = stack.enter_context(live_run(workdir, seconds))
        _say("[3/5] the overview dashboard")
        pictures.files["overview"] = out / "overview.png"
        pictures.overview = draw_overview(run, pictures.files["overview"])
        _say("[4/5] an exemplar's trace")
        pictures.files["exemplar-trace"] = out / "exemplar-trace.png"
        pictures.trace = draw_exemplar_trace(run, pictures.files["exemplar-trace"])
        _say("[5/5] an alert")
        pictures.files["alert"] = out / "alert.png"
        pictures.alert = draw_alert(run, pictures.files["alert"])
    return pictures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.pictures",
        description="Draw docs/images/*.png from a live run of the demo (make pictures).",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"demo traffic (default {DEFAULT_SECONDS}: the 5m rate windows filled, then "
        f"{STEADY_SECONDS}s to draw)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    try:
        pictures = draw_all(args.out, args.seconds)
    except services.Unavailable as exc:
        print(f"pictures: {exc}", file=sys.stderr)
        return 2
    for name, path in pictures.files.items():
        print(f"{name}: {path} ({path.stat().st_size // 1024} KB)")
    problems = pictures.problems()
    for problem in problems:
        print(f"pictures: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
