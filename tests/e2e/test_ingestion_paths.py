"""Every way metrics reach Prometheus 3 gives the same series and the same answers.

One agent (tests/e2e/ingestion_agent.py: the in-process demo's traffic, recorded once) is
read five ways at the same time, each into a Prometheus 3 of its own:

* ``scrape-text``: its /metrics scraped in the Prometheus text format (0.0.4);
* ``scrape-openmetrics``: the same /metrics scraped as OpenMetrics (the reference below);
* ``collector-otlp``: the SDK's OTLP exporter -> sage-otelcol running the shipped
  collector/otel-collector.yaml -> Prometheus' OTLP receiver;
* ``collector-remote-write``: the same with collector/otel-collector.remote-write.yaml
  added -> Prometheus' remote-write receiver;
* ``agent-otlp``: the SDK's OTLP exporter straight at Prometheus' /api/v1/otlp/v1/metrics.

Each OTLP-receiving Prometheus has the shipped prometheus.yml's ``otlp:`` settings. The
traffic starts once every path holds every series at zero, and after it the agent idles
with its telemetry up, so every path converges on the same final values. Then: the same
series names and label sets, the same totals exactly, the same answer from every
expression the project ships (the plan's queries, every dashboard query, every alert and
recording rule of collector/prometheus/alerts/*.yml, files added later included), and
which paths carry exemplars. docs/metrics.md ("Ingestion paths") states what it proves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.dashboards import panel_queries
from tools.queries import PLAN_QUERIES

from . import services
from .promql import ALERTS, measured
from .services import Prometheus

pytestmark = pytest.mark.e2e

TRAFFIC_SECONDS = 30
REFERENCE = "scrape-openmetrics"
SCRAPES = {"scrape-text": "PrometheusText0.0.4", "scrape-openmetrics": "OpenMetricsText1.0.0"}
PUSHED = ("collector-otlp", "collector-remote-write", "agent-otlp")
PATHS = (*SCRAPES, *PUSHED)
# The scrape job, and service.name (the agent's default): the same job on every path.
JOB = "sage-agent"
ENVIRONMENT = "e2e"
# Resource attributes the pushed paths make labels (prometheus.yml's
# otlp.promote_resource_attributes, the overlay's resource_constant_labels); a scrape keeps
# them on target_info only.
SHIPPED_OTLP = yaml.safe_load(services.PROMETHEUS_CONFIG.read_text())["otlp"]
PROMOTED = tuple(name.replace(".", "_") for name in SHIPPED_OTLP["promote_resource_attributes"])
# Labels that name the source and so differ by design: instance is host:port when
# scraped, service.instance.id when pushed.
SOURCE_LABELS = ("instance", *PROMOTED)
SAGE_SERIES = '{__name__=~"sage_.+"}'
# Rates, ratios and quantiles. Every path's first sample of a series is its zero before the
# traffic and its last the final value, so the increase in every window is the same; what
# differs is where each path sampled, from which rate() extrapolates to the window's end: at
# most about one interval (a second's scrape or export, plus up to a second of the
# collector's batching) against the ~35 s the samples span, so up to about 6%. Measured:
# at most 2%. Quantiles and ratios mostly cancel it (every bucket of a series is sampled at
# the same instants).
RELATIVE_TOLERANCE = 0.10
# Rules that average a recorded series over its history (Sloth's 30-day ratio, and what is
# computed from it): each Prometheus recorded the 5-minute ratio every second from its own
# samples, so the early, small-count ratios differ between paths before they converge.
# Measured: at most 7%.
HISTORY_TOLERANCE = 0.20


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    prometheus: dict[str, Prometheus]
    summary: dict[str, Any]
    started: float
    at: float
    """When the expressions are evaluated: every path settled, every window over the traffic."""
    metrics_address: str


def _rule_files(directory: Path) -> list[Path]:
    """The shipped rule files, each group evaluated every second (the Prometheus-wide
    interval here): recorded series are then as fresh on every path when compared."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in sorted(ALERTS.glob("*.yml")):
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group.pop("interval", None)
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(rules, sort_keys=False))
        copies.append(copy)
    return copies


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("ingestion-paths")
    rules = _rule_files(tmp / "rules")
    metrics_address = services.loopback()
    with contextlib.ExitStack() as stack:
        prometheus: dict[str, Prometheus] = {}
        for path, protocol in SCRAPES.items():
            job = {"static_configs": [{"targets": [metrics_address]}]}
            prometheus[path] = stack.enter_context(
                services.prometheus(
                    tmp / path,
                    {JOB: {**job, "scrape_protocols": [protocol]}},
                    remote_write=False,
                    rule_files=rules,
                )
            )
        for path in PUSHED:
            prometheus[path] = stack.enter_context(
                services.prometheus(
                    tmp / path,
                    remote_write=path == "collector-remote-write",
                    otlp=path != "collector-remote-write",
                    rule_files=rules,
                )
            )
        via_otlp = stack.enter_context(
            services.collector(
                services.COLLECTOR_CONFIG,
                {
                    "PROMETHEUS_OTLP_ENDPOINT": prometheus["collector-otlp"].otlp_url,
                    "DEPLOYMENT_ENVIRONMENT": "not-" + ENVIRONMENT,  # the agent's own wins
                },
                log_dir=tmp,
                name="collector-otlp",
            )
        )
        via_remote_write = stack.enter_context(
            services.collector(
                [services.COLLECTOR_CONFIG, services.REMOTE_WRITE_OVERLAY],
                {
                    "PROMETHEUS_REMOTE_WRITE_URL": prometheus[
                        "collector-remote-write"
                    ].remote_write_url,
                    "DEPLOYMENT_ENVIRONMENT": "not-" + ENVIRONMENT,
                },
                log_dir=tmp,
                name="collector-remote-write",
            )
        )
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        host, port = metrics_address.rsplit(":", 1)
        args = [
            "--duration", str(TRAFFIC_SECONDS),
            "--metrics-host", host, "--metrics-port", port,
            "--environment", ENVIRONMENT,
            "--otlp", via_otlp.otlp_http + "/v1/metrics",
            "--otlp", via_remote_write.otlp_http + "/v1/metrics",
            "--otlp", prometheus["agent-otlp"].otlp_url + "/v1/metrics",
        ]  # fmt: skip
        started = time.time()
        agent = services.start_ingestion_agent(args, env, tmp)
        try:
            assert services.read_line(agent, 60).strip() == "ready"
            # Every series at zero on every path before any traffic.
            services.wait_for(
                lambda: _settled(prometheus), timeout=30, what="every series on every path"
            )
            assert agent.stdin is not None
            agent.stdin.write("go\n")
            agent.stdin.flush()
            summary = json.loads(services.read_line(agent, TRAFFIC_SECONDS + 60))
            # Every path holds the agent's final values: identical snapshots, twice running.
            try:
                reference = services.wait_for(
                    lambda: _settled(prometheus), timeout=45, what="the same final values"
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {differences(prometheus)}") from None
            services.wait_for(
                lambda: _settled(prometheus) == reference, timeout=10, what="stable values"
            )
            yield Run(prometheus, summary, started, time.time(), metrics_address)
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()


# ----------------------------------------------------------------------------- comparing


def _number(text: str) -> str:
    """A label value that is a number, written one way (le="1" and le="1.0" are one bucket)."""
    try:
        return repr(float(text))
    except ValueError:
        return text


def normalized(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A label set without the labels that name the source, its le written one way."""
    return tuple(
        sorted(
            (key, _number(value) if key == "le" else value)
            for key, value in labels.items()
            if key not in SOURCE_LABELS
        )
    )


def answer(prometheus: Prometheus, expr: str, at: float) -> dict[tuple, float]:
    result = prometheus.query(expr, time=at)
    answers = {normalized(sample["metric"]): float(sample["value"][1]) for sample in result}
    assert len(answers) == len(result), f"{expr}: series that differ only by their source"
    return answers


def snapshot(prometheus: Prometheus, at: float | None = None) -> dict[tuple, float]:
    return answer(prometheus, SAGE_SERIES, time.time() if at is None else at)


def _settled(prometheus: dict[str, Prometheus]) -> dict[tuple, float] | None:
    snapshots = {path: snapshot(p) for path, p in prometheus.items()}
    reference = snapshots[REFERENCE]
    if reference and all(s == reference for s in snapshots.values()):
        return reference
    return None


def differences(prometheus: dict[str, Prometheus]) -> dict[str, Any]:
    """What keeps the paths apart: per path, a few series only there, missing, or unequal."""
    snapshots = {path: snapshot(p) for path, p in prometheus.items()}
    reference = snapshots[REFERENCE]
    found: dict[str, Any] = {}
    for path, other in snapshots.items():
        only = sorted(set(other) - set(reference))
        missing = sorted(set(reference) - set(other))
        unequal = {k: (other[k], v) for k, v in reference.items() if k in other and other[k] != v}
        if only or missing or unequal:
            found[path] = {
                "only here": only[:3],
                "missing": missing[:3],
                "unequal (here, reference)": dict(list(unequal.items())[:3]),
                "counts": (len(only), len(missing), len(unequal), len(reference)),
            }
    return found


def _close(a: float, b: float, tolerance: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=1e-9)


def scrape_only(expr: str) -> bool:
    """``up`` and ``scrape_*`` describe a scrape target; a pushed agent is none."""
    return "sage_" not in expr and bool(re.search(r"(?<![\w:])(up|scrape_\w+)\b", expr))


def _history_records() -> set[str]:
    """Recorded series computed from a recorded series' history, directly or not."""
    records = {
        rule["record"]: rule["expr"]
        for path in sorted(ALERTS.glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    found = {name for name, expr in records.items() if re.search(r"_over_time\(\s*\w*:", expr)}
    while True:
        more = {
            n for n, e in records.items() if any(re.search(rf"{re.escape(h)}\b", e) for h in found)
        }
        if more <= found:
            return found
        found |= more


HISTORY = _history_records()


def tolerance(expr: str) -> float:
    history = re.search(r"_over_time\(\s*\w*:", expr) or any(name in expr for name in HISTORY)
    return HISTORY_TOLERANCE if history else RELATIVE_TOLERANCE


def expressions() -> list[tuple[str, str]]:
    """(id, PromQL): the plan's queries, every dashboard query, and every alert's and
    recording rule's expression in collector/prometheus/alerts/*.yml, with each alert's
    measurement (its expression without the threshold)."""
    found = [(f"plan:{query.key}", query.expr) for query in PLAN_QUERIES]
    found += [(f"{file}:{title}", expr) for file, title, expr in panel_queries()]
    for path in sorted(ALERTS.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expr = " ".join(rule["expr"].split())
                if "alert" in rule:
                    found.append((f"alert:{rule['alert']}", expr))
                    if measured(expr) != expr:
                        found.append((f"alert:{rule['alert']}:measured", measured(expr)))
                else:
                    found.append((f"record:{rule['record']}", expr))
    unique: dict[str, str] = {}
    for key, expr in found:
        while key in unique and unique[key] != expr:
            key += "'"
        unique[key] = expr
    return sorted(unique.items())


EXPRESSIONS = expressions()


# ----------------------------------------------------------------------------- series


def test_the_same_series_on_every_path(run: Run) -> None:
    """Names and label sets equal, but for instance and the promoted resource labels."""
    start, end = run.started - 60, time.time()
    series = {
        path: {
            normalized(s) for s in p.api("series", **{"match[]": SAGE_SERIES}, start=start, end=end)
        }
        for path, p in run.prometheus.items()
    }
    reference = series[REFERENCE]
    names = {dict(labels)["__name__"] for labels in reference}
    assert len(names) >= 20, sorted(names)
    for path, found in series.items():
        assert found == reference, (
            f"{path}: only there {sorted(found - reference)[:5]}, "
            f"missing {sorted(reference - found)[:5]}"
        )


def test_how_each_path_names_its_source(run: Run) -> None:
    """job is the scrape job or service.name (both sage-agent); instance is host:port or
    service.instance.id; deployment.environment is a label only when pushed."""
    scraped_info = run.prometheus[REFERENCE].query("target_info", time=run.at)
    assert len(scraped_info) == 1, scraped_info
    resource = scraped_info[0]["metric"]
    assert resource["service_name"] == JOB
    assert resource["deployment_environment"] == ENVIRONMENT
    for path, prometheus in run.prometheus.items():
        for sample in prometheus.query(SAGE_SERIES, time=run.at):
            labels = sample["metric"]
            assert labels["job"] == JOB, (path, labels)
            if path in SCRAPES:
                assert labels["instance"] == run.metrics_address, (path, labels)
                assert not set(PROMOTED) & set(labels), (path, labels)
            else:
                assert labels["instance"] == resource["service_instance_id"], (path, labels)
                assert labels["deployment_environment"] == ENVIRONMENT, (path, labels)
            assert not [key for key in labels if key.startswith(("otel_scope", "telemetry_"))]


def test_target_info_keeps_the_other_resource_attributes(run: Run) -> None:
    """Scraped, target_info holds every resource attribute; pushed, the same ones but
    service.name and service.instance.id, which are its job and instance."""
    infos = {
        path: p.query("target_info", time=run.at)[0]["metric"] for path, p in run.prometheus.items()
    }
    identifying = {"job", "instance", "service_name", "service_instance_id"}
    reference = {k: v for k, v in infos[REFERENCE].items() if k not in identifying}
    assert reference["telemetry_sdk_language"] == "python"
    assert reference["telemetry_distro_name"] == "sage-otel"
    for path, labels in infos.items():
        assert {k: v for k, v in labels.items() if k not in identifying} == reference, path


def test_bucket_bounds_are_written_differently_but_are_the_same_numbers(run: Run) -> None:
    """A scrape writes le as OpenMetrics does (64.0, 1e-06), OTLP and remote write as the
    shortest decimal (64, 0.000001): compare le as a number, never as a string."""
    written = {
        "sage_session_message_size_bytes_bucket": ("64.0", "64"),
        "sage_crypto_operation_duration_seconds_bucket": ("1e-06", "0.000001"),
    }
    for name, (scraped, pushed) in written.items():
        values = {
            path: set(p.api("label/le/values", **{"match[]": name}))
            for path, p in run.prometheus.items()
        }
        for path, found in values.items():
            assert (scraped if path in SCRAPES else pushed) in found, (path, sorted(found))
            assert (pushed if path in SCRAPES else scraped) not in found, (path, sorted(found))
            assert {_number(v) for v in found} == {_number(v) for v in values[REFERENCE]}, path


# ----------------------------------------------------------------------------- values


def test_totals_are_equal_exactly(run: Run) -> None:
    """Every counter, gauge and histogram series: the same value on every path."""
    reference = snapshot(run.prometheus[REFERENCE], run.at)
    assert run.summary["messages_ok"] > 0 and run.summary["handshakes_ok"] > 0, run.summary
    assert sum(v for k, v in reference.items() if dict(k)["__name__"].endswith("_total")) > 0
    for path, prometheus in run.prometheus.items():
        assert snapshot(prometheus, run.at) == reference, path


@pytest.mark.parametrize("key, expr", EXPRESSIONS, ids=[key for key, _ in EXPRESSIONS])
def test_every_expression_gives_the_same_answer(run: Run, key: str, expr: str) -> None:
    """Equal label sets and values (within the tolerances above) on every path; an
    expression on ``up`` answers where Prometheus scrapes, and nowhere else."""
    answers = {path: answer(p, expr, run.at) for path, p in run.prometheus.items()}
    reference = answers[REFERENCE]
    if scrape_only(expr):
        assert not any(answers[path] for path in PUSHED), answers
        answers = {path: answers[path] for path in SCRAPES}
    for path, found in answers.items():
        assert found.keys() == reference.keys(), f"{path}: {sorted(found)} != {sorted(reference)}"
        different = {
            labels: (found[labels], value)
            for labels, value in reference.items()
            if not _close(found[labels], value, tolerance(expr))
        }
        assert not different, f"{path} (its value, the reference's): {different}"


def test_the_expressions_measure_real_data(run: Run) -> None:
    """The comparison above is not of empty answers: the plan's and dashboards' queries
    all return data, on every path."""
    for path, prometheus in run.prometheus.items():
        empty = [
            key
            for key, expr in EXPRESSIONS
            if key.startswith("plan:") or ".json:" in key
            if not answer(prometheus, expr, run.at)
        ]
        assert not empty, (path, empty)


# ----------------------------------------------------------------------------- exemplars


EXEMPLAR_SERIES = (
    "sage_message_processing_duration_seconds_bucket",
    "sage_handshake_duration_seconds_bucket",
    "sage_messages_processed_total",
)


@pytest.mark.parametrize("series", EXEMPLAR_SERIES)
def test_exemplars_on_every_path_but_the_text_format(run: Run, series: str) -> None:
    """OpenMetrics, OTLP and remote write carry trace_id/span_id exemplars; the Prometheus
    text format has no syntax for them."""
    for path, prometheus in run.prometheus.items():
        found = [
            exemplar
            for entry in prometheus.query_exemplars(series, run.started - 60, time.time())
            for exemplar in entry["exemplars"]
        ]
        if path == "scrape-text":
            assert not found, found[:3]
            continue
        assert found, f"{path}: no exemplars on {series}"
        for exemplar in found:
            labels = exemplar["labels"]
            assert len(labels["trace_id"]) == 32 and int(labels["trace_id"], 16), (path, labels)
            assert len(labels["span_id"]) == 16 and int(labels["span_id"], 16), (path, labels)
