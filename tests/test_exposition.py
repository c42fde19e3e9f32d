"""/metrics as Prometheus sees it: a live ``sage-otel demo`` scraped in both formats.

The contract is the monitoring plan, §2.1: metric names, types, label keys and values, and
bucket layouts, hard-coded here from the plan (not read from the catalog) and checked against
the catalog and a real scrape. OpenMetrics scrapes must carry trace exemplars; the plain
text format must not, and must still parse. ``exposition.families()`` is unit-tested on
hand-built OTel metric data.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Exemplar as OtelExemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

import sage_otel
from sage_otel.telemetry import exposition
from sage_otel.telemetry.catalog import INSTRUMENTS, OTHER
from support import fetch, free_port, running

# --- the contract: monitoring plan §2.1 ------------------------------------------------------

STATUS = ("success", "failure")
CRYPTO_OPS = ("sign", "verify", "encrypt", "decrypt")
CHAIN = ("ethereum", "solana")

PLAN: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    # Sessions
    "sage_sessions_created_total": ("counter", {"status": STATUS}),
    "sage_sessions_expired_total": ("counter", {}),
    "sage_sessions_closed_total": ("counter", {}),
    "sage_sessions_active": ("gauge", {}),
    "sage_session_duration_seconds": ("histogram", {"operation": ("create", "encrypt", "decrypt")}),
    "sage_session_message_size_bytes": ("histogram", {"direction": ("inbound", "outbound")}),
    # Handshakes
    "sage_handshakes_initiated_total": ("counter", {"role": ("client", "server")}),
    "sage_handshakes_completed_total": ("counter", {"status": STATUS}),
    "sage_handshakes_failed_total": ("counter", {"error_type": ("timeout", "invalid", "network")}),
    "sage_handshake_duration_seconds": ("histogram", {"stage": ("init", "process", "finalize")}),
    # Crypto
    "sage_crypto_operations_total": (
        "counter",
        {"operation": CRYPTO_OPS, "algorithm": ("ed25519", "secp256k1", "chacha20")},
    ),
    "sage_crypto_errors_total": ("counter", {"operation": CRYPTO_OPS}),
    "sage_crypto_operation_duration_seconds": ("histogram", {"operation": CRYPTO_OPS}),
    # DIDs
    "sage_did_resolutions_total": ("counter", {"chain": CHAIN, "status": STATUS}),
    "sage_did_registrations_total": ("counter", {"chain": CHAIN, "status": STATUS}),
    "sage_did_resolution_duration_seconds": ("histogram", {"chain": CHAIN}),
    # Messages
    "sage_messages_processed_total": (
        "counter",
        {"type": ("text", "binary"), "status": STATUS},
    ),
    "sage_replay_attacks_detected_total": ("counter", {}),
    "sage_nonce_validations_total": ("counter", {"status": ("valid", "invalid", "expired")}),
    "sage_message_processing_duration_seconds": ("histogram", {}),
    "sage_message_size_bytes": ("histogram", {}),
}

# Beyond the plan: what the server refused, by the closed set of error categories, and
# what it finished, by outcome.
EXTRAS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "sage_requests_refused_total": (
        "counter",
        {
            "category": (
                "invalid",
                "signature",
                "crypto",
                "replay",
                "expired",
                "unknown_did",
                "overload",
                "timeout",
                "network",
                "internal",
            )
        },
    ),
    # Every SAGE request a server finished, by whose outcome it is: what the SLOs count.
    "sage_server_requests_total": (
        "counter",
        {
            "operation": ("handshake", "message", "close"),
            "outcome": ("served", "refused", "failed"),
        },
    ),
}
EXPOSED = {**PLAN, **EXTRAS}

# The plan's bucket formulas (Prometheus ExponentialBuckets(start, factor, count)).
PLAN_BUCKETS: dict[str, list[float]] = {
    "sage_session_duration_seconds": [0.0001 * 2**i for i in range(15)],
    "sage_handshake_duration_seconds": [0.001 * 2**i for i in range(12)],
    "sage_session_message_size_bytes": [64.0 * 4**i for i in range(10)],
    "sage_message_size_bytes": [64.0 * 4**i for i in range(10)],
}

CATALOG = {instrument.prometheus_name: instrument for instrument in INSTRUMENTS}
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
SERVICE_NAME = "sage-exposition-test"
DEMO_DURATION = 5.0


def family_name(prometheus_name: str) -> str:
    """The family name the prometheus_client parsers report (counters lose ``_total``)."""
    kind = EXPOSED[prometheus_name][0]
    return prometheus_name.removesuffix("_total") if kind == "counter" else prometheus_name


def combinations(labels: dict[str, tuple[str, ...]]) -> list[dict[str, str]]:
    keys = list(labels)
    return [dict(zip(keys, values)) for values in itertools.product(*labels.values())]


# --- the plan against the catalog ----------------------------------------------------------


def test_plan_names_are_exactly_the_catalog() -> None:
    """Every §2.1 name, and only the listed extras beside them."""
    assert len(PLAN) == 21
    assert sorted(CATALOG) == sorted(EXPOSED)
    assert len(INSTRUMENTS) == len(PLAN) + len(EXTRAS)


@pytest.mark.parametrize("name", sorted(EXPOSED))
def test_catalog_matches_plan_types_labels_and_values(name: str) -> None:
    kind, labels = EXPOSED[name]
    instrument = CATALOG[name]
    assert instrument.prometheus_type == kind
    assert set(instrument.label_keys) == set(labels)
    for label in instrument.labels:
        assert set(labels[label.key]) <= set(label.values), label.key
        assert OTHER not in label.values
    if kind == "histogram":
        assert list(instrument.buckets) == sorted(instrument.buckets)
        assert len(set(instrument.buckets)) == len(instrument.buckets)
    else:
        assert instrument.buckets == ()


@pytest.mark.parametrize("name", sorted(PLAN_BUCKETS))
def test_catalog_buckets_follow_the_plan_formulas(name: str) -> None:
    expected = PLAN_BUCKETS[name]
    assert len(CATALOG[name].buckets) == len(expected)
    for got, want in zip(CATALOG[name].buckets, expected):
        assert math.isclose(got, want, rel_tol=1e-9), (name, got, want)


# --- the live demo --------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def sample_value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[family_name(name)]
    sample_name = name if EXPOSED[name][0] != "histogram" else name + "_count"
    return sum(
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def traffic_done(families: dict[str, Any]) -> bool:
    """Every code path the assertions below need has run at least once."""
    try:
        return all(
            (
                sample_value(families, "sage_handshakes_completed_total", status="success") > 0,
                sample_value(families, "sage_messages_processed_total") > 0,
                sample_value(families, "sage_replay_attacks_detected_total") > 0,
                sample_value(families, "sage_nonce_validations_total", status="invalid") > 0,
                sample_value(families, "sage_did_resolutions_total") > 0,
                sample_value(families, "sage_did_registrations_total", status="failure") > 0,
                sample_value(families, "sage_sessions_created_total", status="success") > 0,
            )
        )
    except KeyError:
        return False


@dataclass
class Scrape:
    openmetrics_body: str
    openmetrics_type: str
    text_body: str
    text_type: str
    openmetrics: dict[str, Any]
    text: dict[str, Any]
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def scrape() -> Scrape:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "sage_otel.cli",
        "demo",
        "--in-process",  # one /metrics with the server's series and exemplars
        "--duration",
        str(DEMO_DURATION),
        "--metrics-port",
        str(port),
        "--json",
    ]
    url = f"http://127.0.0.1:{port}/metrics"
    with running(argv, clean_env(OTEL_SERVICE_NAME=SERVICE_NAME)) as proc:
        deadline = time.monotonic() + DEMO_DURATION + 20
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _, body = fetch(url, OPENMETRICS)
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
                continue
            if traffic_done({f.name: f for f in parse_openmetrics(body)}):
                ready = True
                break
            time.sleep(0.2)
        if not ready:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"no SAGE traffic on {url} (rc={proc.returncode}):\n{out}\n{err}")
        om_type, om_body = fetch(url, OPENMETRICS)
        text_type, text_body = fetch(url)
        out, err = proc.communicate(timeout=DEMO_DURATION + 30)
    return Scrape(
        om_body,
        om_type,
        text_body,
        text_type,
        {f.name: f for f in parse_openmetrics(om_body)},
        {f.name: f for f in parse_text(text_body)},
        proc.returncode,
        out,
        err,
    )


def test_demo_exits_zero_with_its_json_summary_last(scrape: Scrape) -> None:
    assert scrape.returncode == 0, scrape.stderr
    summary = json.loads(scrape.stdout.strip().splitlines()[-1])
    assert summary["handshakes_ok"] > 0
    assert summary["messages_ok"] > 0
    assert summary["unexpected_errors"] == {}


def test_content_negotiation(scrape: Scrape) -> None:
    assert scrape.openmetrics_type.startswith("application/openmetrics-text")
    assert scrape.openmetrics_body.rstrip().endswith("# EOF")
    assert scrape.text_type.startswith("text/plain")
    assert "# EOF" not in scrape.text_body


@pytest.mark.parametrize("fmt", ["openmetrics", "text"])
@pytest.mark.parametrize("name", sorted(EXPOSED))
def test_every_plan_metric_has_its_type_labels_and_series(
    scrape: Scrape, fmt: str, name: str
) -> None:
    families = getattr(scrape, fmt)
    kind, labels = EXPOSED[name]
    family = families.get(family_name(name))
    assert family is not None, f"{name} missing from the {fmt} scrape"
    assert family.type == kind
    allowed = {label.key: {*label.values, OTHER} for label in CATALOG[name].labels}
    series: set[tuple[tuple[str, str], ...]] = set()
    for sample in family.samples:
        keys = set(sample.labels)
        if sample.name == name + "_bucket":
            assert "le" in keys
            keys.discard("le")
        else:
            assert sample.name in (name, name + "_count", name + "_sum"), sample.name
        # Exactly the plan's label keys: no otel_scope_*, no job/instance, nothing extra.
        assert keys == set(labels), (sample.name, sample.labels)
        for key in keys:
            assert sample.labels[key] in allowed[key], (sample.name, sample.labels)
        series.add(tuple(sorted((k, sample.labels[k]) for k in labels)))
    for combination in combinations(labels):
        assert tuple(sorted(combination.items())) in series, (name, combination)


@pytest.mark.parametrize("fmt", ["openmetrics", "text"])
@pytest.mark.parametrize("name", sorted(n for n, (kind, _) in PLAN.items() if kind == "histogram"))
def test_histogram_buckets(scrape: Scrape, fmt: str, name: str) -> None:
    family = getattr(scrape, fmt)[name]
    expected = [*(repr(float(b)) for b in CATALOG[name].buckets), "+Inf"]
    by_series: dict[tuple[tuple[str, str], ...], list[tuple[str, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for sample in family.samples:
        key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        if sample.name == name + "_bucket":
            by_series.setdefault(key, []).append((sample.labels["le"], sample.value))
        elif sample.name == name + "_count":
            counts[key] = sample.value
    assert by_series
    for key, buckets in by_series.items():
        bounds = [le for le, _ in buckets]
        assert [float(b) for b in bounds] == [float(b) for b in expected], key
        assert bounds[-1] == "+Inf"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{name}{key}: buckets not cumulative"
        assert values[-1] == counts[key]
    if name in PLAN_BUCKETS:
        for key, buckets in by_series.items():
            finite = [float(le) for le, _ in buckets[:-1]]
            assert len(finite) == len(PLAN_BUCKETS[name])
            for got, want in zip(finite, PLAN_BUCKETS[name]):
                assert math.isclose(got, want, rel_tol=1e-9), (name, key, got, want)


@pytest.mark.parametrize("fmt", ["openmetrics", "text"])
def test_counters_advanced_by_demo_traffic(scrape: Scrape, fmt: str) -> None:
    families = getattr(scrape, fmt)
    assert sample_value(families, "sage_handshakes_completed_total", status="success") > 0
    assert sample_value(families, "sage_messages_processed_total") > 0
    assert sample_value(families, "sage_replay_attacks_detected_total") > 0
    assert sample_value(families, "sage_nonce_validations_total", status="invalid") > 0
    assert sample_value(families, "sage_did_resolutions_total") > 0
    # The demo forges one registration (signed by the wrong key): the registry refuses it.
    assert sample_value(families, "sage_did_registrations_total", status="failure") > 0
    assert sample_value(families, "sage_sessions_created_total", status="success") > 0


def _exemplars(scrape: Scrape, kind: str) -> list[tuple[Any, Any]]:
    found = []
    for name, (plan_kind, _) in PLAN.items():
        if plan_kind != kind:
            continue
        for sample in scrape.openmetrics[family_name(name)].samples:
            if sample.exemplar is not None:
                found.append((sample, sample.exemplar))
    return found


def _assert_trace_labels(exemplar: Any) -> None:
    assert set(exemplar.labels) == {"trace_id", "span_id"}, exemplar.labels
    assert HEX32.match(exemplar.labels["trace_id"]), exemplar.labels
    assert HEX16.match(exemplar.labels["span_id"]), exemplar.labels
    assert int(exemplar.labels["trace_id"], 16) != 0
    assert int(exemplar.labels["span_id"], 16) != 0


def test_openmetrics_exemplars_on_histogram_buckets(scrape: Scrape) -> None:
    found = _exemplars(scrape, "histogram")
    assert found, "no exemplar on any SAGE histogram bucket"
    for sample, exemplar in found:
        assert sample.name.endswith("_bucket"), sample.name
        _assert_trace_labels(exemplar)
        # The exemplar's value belongs to the bucket it is attached to.
        assert exemplar.value <= float(sample.labels["le"]), (sample, exemplar)
    families_with = {sample.name for sample, _ in found}
    assert len(families_with) >= 2, families_with


def test_openmetrics_exemplars_on_counters(scrape: Scrape) -> None:
    found = _exemplars(scrape, "counter")
    assert found, "no exemplar on any SAGE counter"
    for sample, exemplar in found:
        assert sample.name.endswith("_total"), sample.name
        assert sample.value > 0
        _assert_trace_labels(exemplar)


def test_histogram_exemplars_sit_in_their_own_bucket(scrape: Scrape) -> None:
    for name, (kind, _) in PLAN.items():
        if kind != "histogram":
            continue
        previous: dict[tuple[tuple[str, str], ...], float] = {}
        for sample in scrape.openmetrics[name].samples:
            if sample.name != name + "_bucket":
                continue
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            lower = previous.get(key, -math.inf)
            upper = float(sample.labels["le"])
            if sample.exemplar is not None:
                assert lower < sample.exemplar.value <= upper, (sample, lower)
            previous[key] = upper


def test_text_format_has_no_exemplars_and_parses(scrape: Scrape) -> None:
    for line in scrape.text_body.splitlines():
        if line and not line.startswith("#"):
            assert " # " not in line, line
            assert "trace_id" not in line, line
    assert all(s.exemplar is None for f in scrape.text.values() for s in f.samples)
    sage_text = {n for n in scrape.text if n.startswith("sage_")}
    sage_om = {n for n in scrape.openmetrics if n.startswith("sage_")}
    assert sage_text == sage_om == {family_name(n) for n in EXPOSED}


@pytest.mark.parametrize("fmt", ["openmetrics", "text"])
def test_process_and_runtime_metrics(scrape: Scrape, fmt: str) -> None:
    families = getattr(scrape, fmt)
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["process_cpu_seconds_total"].value > 0
    assert samples["process_resident_memory_bytes"].value > 0
    assert samples["process_open_fds"].value > 0
    assert any(name.startswith("python_gc_") for name in families), sorted(families)


@pytest.mark.parametrize("fmt", ["openmetrics", "text"])
def test_target_info_names_the_service(scrape: Scrape, fmt: str) -> None:
    families = getattr(scrape, fmt)
    info = [s for f in families.values() for s in f.samples if s.name == "target_info"]
    assert len(info) == 1
    assert info[0].labels["service_name"] == SERVICE_NAME
    # The application's version only when it gives one; sage-otel's is the distro's.
    assert "service_version" not in info[0].labels
    assert info[0].labels["telemetry_distro_name"] == "sage-otel"
    assert info[0].labels["telemetry_distro_version"] == sage_otel.__version__
    assert info[0].labels.get("service_instance_id")


def test_no_scope_labels_anywhere(scrape: Scrape) -> None:
    for fmt in ("openmetrics", "text"):
        for family in getattr(scrape, fmt).values():
            for sample in family.samples:
                assert not any(k.startswith("otel_scope") for k in sample.labels), sample


# --- exposition.families() on hand-built data -------------------------------------------------

TRACE_A, SPAN_A = 0x0123456789ABCDEF0123456789ABCDEF, 0x1122334455667788
TRACE_B, SPAN_B = 0xFEDCBA9876543210FEDCBA9876543210, 0x0000000000000042
T0 = 1_700_000_000_000_000_000


def _metrics_data(*metrics: Metric) -> MetricsData:
    resource = Resource({"service.name": "unit", "service.version": "1.2.3"})
    scope = ScopeMetrics(InstrumentationScope("unit.scope", "0.1"), list(metrics), "")
    return MetricsData([ResourceMetrics(resource, [scope], "")])


def _counter(
    name: str, unit: str, value: int, exemplars: list[OtelExemplar], monotonic: bool = True
) -> Metric:
    point = NumberDataPoint({"status": "success"}, T0, T0 + 1, value, exemplars)
    data = Sum([point], AggregationTemporality.CUMULATIVE, monotonic)
    return Metric(name, "A test counter.", unit, data)


def _histogram(name: str, unit: str, exemplars: list[OtelExemplar]) -> Metric:
    point = HistogramDataPoint(
        {"stage": "init"},
        T0,
        T0 + 1,
        count=5,
        sum=21.15,
        bucket_counts=[1, 2, 0, 2],
        explicit_bounds=[0.1, 1.0, 10.0],
        min=0.05,
        max=20.0,
        exemplars=exemplars,
    )
    return Metric(
        name, "A test histogram.", unit, Histogram([point], AggregationTemporality.CUMULATIVE)
    )


def _by_name(data: MetricsData) -> dict[str, Any]:
    return {family.name: family for family in exposition.families(data)}


def test_families_counter_carries_its_exemplar() -> None:
    exemplar = OtelExemplar({}, 1, T0 + 5, SPAN_A, TRACE_A)
    families = _by_name(_metrics_data(_counter("unit.requests", "{request}", 7, [exemplar])))
    family = families["unit_requests"]
    assert family.type == "counter"
    assert family.unit == ""
    [sample] = family.samples
    assert sample.name == "unit_requests_total"
    assert sample.labels == {"status": "success"}
    assert sample.value == 7
    assert sample.exemplar is not None
    assert sample.exemplar.labels == {"trace_id": f"{TRACE_A:032x}", "span_id": f"{SPAN_A:016x}"}
    assert sample.exemplar.labels["trace_id"] == "0123456789abcdef0123456789abcdef"
    assert sample.exemplar.labels["span_id"] == "1122334455667788"
    assert sample.exemplar.value == 1
    assert sample.exemplar.timestamp == pytest.approx((T0 + 5) / 1e9)


def test_families_counter_ignores_unsampled_exemplars() -> None:
    unsampled = OtelExemplar({}, 1, T0 + 5, None, None)
    families = _by_name(_metrics_data(_counter("unit.requests", "{request}", 3, [unsampled])))
    [sample] = families["unit_requests"].samples
    assert sample.exemplar is None


def test_families_histogram_exemplars_land_in_their_buckets() -> None:
    exemplars = [
        OtelExemplar({}, 0.5, T0 + 10, SPAN_A, TRACE_A),  # 0.1 < v <= 1.0
        OtelExemplar({}, 20.0, T0 + 20, SPAN_B, TRACE_B),  # > 10: the +Inf bucket
    ]
    families = _by_name(_metrics_data(_histogram("unit.latency", "s", exemplars)))
    family = families["unit_latency_seconds"]
    assert family.type == "histogram"
    assert family.unit == "seconds"
    buckets = [s for s in family.samples if s.name == "unit_latency_seconds_bucket"]
    assert [s.labels["le"] for s in buckets] == ["0.1", "1.0", "10.0", "+Inf"]
    assert [s.value for s in buckets] == [1, 3, 3, 5]
    assert all(s.labels["stage"] == "init" for s in buckets)
    by_le = {s.labels["le"]: s.exemplar for s in buckets}
    assert by_le["0.1"] is None
    assert by_le["10.0"] is None
    assert by_le["1.0"] is not None
    assert by_le["1.0"].value == 0.5
    assert by_le["1.0"].labels == {"trace_id": f"{TRACE_A:032x}", "span_id": f"{SPAN_A:016x}"}
    assert by_le["+Inf"] is not None
    assert by_le["+Inf"].value == 20.0
    assert by_le["+Inf"].labels == {"trace_id": f"{TRACE_B:032x}", "span_id": f"{SPAN_B:016x}"}
    others = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert others["unit_latency_seconds_count"] == 5
    assert others["unit_latency_seconds_sum"] == pytest.approx(21.15)


def test_families_histogram_bucket_bounds_are_upper_inclusive() -> None:
    exemplars = [
        OtelExemplar({}, 0.1, T0 + 1, SPAN_A, TRACE_A),  # exactly on a bound: le="0.1"
        OtelExemplar({}, 10.0, T0 + 2, SPAN_B, TRACE_B),  # exactly on a bound: le="10.0"
    ]
    families = _by_name(_metrics_data(_histogram("unit.latency", "s", exemplars)))
    by_le = {
        s.labels["le"]: s.exemplar
        for s in families["unit_latency_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert by_le["0.1"] is not None and by_le["0.1"].value == 0.1
    assert by_le["10.0"] is not None and by_le["10.0"].value == 10.0
    assert by_le["1.0"] is None and by_le["+Inf"] is None


def test_families_keep_the_newest_exemplar_per_bucket() -> None:
    exemplars = [
        OtelExemplar({}, 0.7, T0 + 50 * 10**9, SPAN_B, TRACE_B),
        OtelExemplar({}, 0.3, T0 + 10 * 10**9, SPAN_A, TRACE_A),
    ]
    families = _by_name(_metrics_data(_histogram("unit.latency", "s", exemplars)))
    [bucket] = [
        s
        for s in families["unit_latency_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["le"] == "1.0"
    ]
    assert bucket.exemplar is not None
    assert bucket.exemplar.value == 0.7
    assert bucket.exemplar.labels["trace_id"] == f"{TRACE_B:032x}"


def test_families_up_down_counter_is_a_gauge() -> None:
    metric = _counter("unit.active", "{x}", -2, [], monotonic=False)
    families = _by_name(_metrics_data(metric))
    family = families["unit_active"]
    assert family.type == "gauge"
    assert family.unit == ""
    [sample] = family.samples
    assert sample.name == "unit_active"
    assert sample.value == -2
    assert sample.exemplar is None


@pytest.mark.parametrize(
    ("unit", "name", "prom_unit"),
    [
        ("s", "unit_wait_seconds", "seconds"),
        ("By", "unit_wait_bytes", "bytes"),
        ("{x}", "unit_wait", ""),
    ],
)
def test_families_unit_mapping(unit: str, name: str, prom_unit: str) -> None:
    families = _by_name(_metrics_data(_histogram("unit.wait", unit, [])))
    assert name in families, sorted(families)
    assert families[name].unit == prom_unit
    assert {s.name for s in families[name].samples} == {
        f"{name}_bucket",
        f"{name}_count",
        f"{name}_sum",
    }


def test_families_target_info_and_no_scope_labels() -> None:
    families = _by_name(_metrics_data(_counter("unit.requests", "{request}", 1, [])))
    [info] = families["target"].samples
    assert info.name == "target_info"
    assert info.labels == {"service_name": "unit", "service_version": "1.2.3"}
    for family in families.values():
        for sample in family.samples:
            assert not any(k.startswith("otel_scope") for k in sample.labels)


def test_families_empty_data_yields_nothing() -> None:
    assert list(exposition.families(MetricsData([]))) == []


def test_families_round_trip_through_both_parsers() -> None:
    exemplars = [
        OtelExemplar({}, 0.5, T0 + 10, SPAN_A, TRACE_A),
        OtelExemplar({}, 20.0, T0 + 20, SPAN_B, TRACE_B),
    ]
    data = _metrics_data(
        _counter("unit.requests", "{request}", 7, [OtelExemplar({}, 1, T0, SPAN_A, TRACE_A)]),
        _counter("unit.active", "{x}", 4, [], monotonic=False),
        _histogram("unit.latency", "s", exemplars),
    )

    class Collector:
        def collect(self) -> Iterator[Any]:
            yield from exposition.families(data)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    om = {f.name: f for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    assert om["unit_requests"].type == "counter"
    assert om["unit_active"].type == "gauge"
    assert om["unit_latency_seconds"].type == "histogram"
    om_exemplars = [s.exemplar for f in om.values() for s in f.samples if s.exemplar]
    assert len(om_exemplars) == 3

    from prometheus_client.exposition import generate_latest

    text_body = generate_latest(registry).decode()
    text = {f.name: f for f in parse_text(text_body)}
    assert {"unit_requests", "unit_active", "unit_latency_seconds"} <= set(text)
    assert "trace_id" not in text_body
