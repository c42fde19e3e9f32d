"""docs/metrics.md, rendered from the metric catalog.

Run ``python -m tools.metrics_docs > docs/metrics.md`` or
``python -m tools.metrics_docs --write`` after changing the catalog;
``--check`` exits 1 when docs/metrics.md is stale. A test does the same check.

Every name, type, label value, unit and bucket comes from
:mod:`sage_otel.telemetry.catalog`. What the catalog cannot say (the subsystem a metric
belongs to, the code path that records it) is kept here, and rendering fails when that
knowledge and the catalog disagree, so the page cannot silently drift from the code.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

from sage_otel.agent.errors import ErrorCategory
from sage_otel.telemetry.catalog import HANDSHAKE_ERROR_TYPES, INSTRUMENTS, OTHER, Instrument, Kind

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
REGENERATE = "python -m tools.metrics_docs --write"

# Subsystem sections, in page order: (title, OTel name prefixes, what the section covers).
SECTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "Sessions",
        ("sage.session",),
        "Secure sessions: created by both sides of a handshake, ended by an explicit close or "
        "by a limit (max age, idle timeout, max messages).",
    ),
    (
        "Handshakes",
        ("sage.handshake",),
        "The HPKE 1-RTT handshake (`hpke/complete@v1`): `init` and `finalize` run on the "
        "client (initiator), `process` on the server (responder).",
    ),
    (
        "Crypto",
        ("sage.crypto.",),
        "Identity-key signatures (Ed25519, secp256k1) and session ChaCha20-Poly1305 "
        "sealing and opening. The HMAC-SHA256 signatures on session messages and the HPKE "
        "and X25519 steps inside the handshake are not counted here.",
    ),
    (
        "DID",
        ("sage.did.",),
        "DID resolution (cache hits included) and registration, by chain.",
    ),
    (
        "Messages",
        ("sage.message", "sage.replay_attacks.", "sage.nonce."),
        "Inbound session messages and replay protection.",
    ),
    (
        "Requests",
        ("sage.requests.", "sage.server."),
        "What a server agent refused, whatever the operation: malformed input, failed checks, "
        "and the limits that keep one peer from taking what others need (handshake rate and "
        "session share per sender DID, the session table, the per-session inbox), which "
        "answer 429 or 503 with `Retry-After` and count as `overload`; and every SAGE request "
        "it finished, by whose the outcome is (what the SLOs count).",
    ),
)

# Where each instrument is recorded: catalog key -> the code path, as the instrumentation
# patches it (src/sage_otel/instrumentation.py). Must name exactly the catalog's keys.
RECORDED_AT: dict[str, str] = {
    "server_requests": (
        "`ServerAgent.dispatch`: every SAGE request the server finishes (handshake, message, "
        "close), `served` when it returns, else `failed` when `errors.server_fault` says the "
        "server caused it (its capacity: the global handshake rate, a full session table or "
        "push backlog; an internal error; a timeout or network error of its own), else "
        "`refused`. Requests refused before dispatch (bad HTTP, bad JSON) are not counted. "
        "The SLOs' availability SLIs count it (docs/slos.md)."
    ),
    "requests_refused": (
        "`ServerAgent.refuse`: every typed refusal the server answers (parse errors, failed "
        "checks, limits, unknown paths and methods, and an unexpected failure as "
        "`internal`), by the error's category."
    ),
    "sessions_created": (
        "`SessionManager.create`, on both sides (the client's session in "
        "`Initiator.finalize`, the server's in `Responder.process`): `success` when it "
        "returns a session, `failure` when it raises (session id in use, capacity reached)."
    ),
    "sessions_expired": (
        "`SessionManager.expire`, when it removes a live session that passed a limit: found "
        "past it by `SessionManager.get` (the server, on the next message) or by the "
        "server's periodic sweep."
    ),
    "sessions_closed": (
        "`SessionManager.close`, when it closes a live session: a `sage/close@v1` request on "
        "the server, `ClientAgent.close` on the client, and `close_all` when an agent shuts "
        "down."
    ),
    "sessions_active": (
        "+1 on each successful `SessionManager.create`, -1 on each counted close or expire; "
        "both sides' sessions in the process."
    ),
    "session_duration": (
        '`SessionManager.create` (`operation="create"`: key derivation and cipher set-up); '
        "`Session.encrypt` / `Session.decrypt` on success (one timing feeds the session and "
        "crypto histograms)."
    ),
    "session_message_size": (
        "`Session.encrypt` (`outbound`) / `Session.decrypt` (`inbound`) on success: the "
        "plaintext length (one timing feeds the session and crypto histograms)."
    ),
    "handshakes_initiated": (
        '`Initiator.init` (`role="client"`) and `Responder.process` (`role="server"`), '
        "once per call whatever its outcome."
    ),
    "handshakes_completed": (
        "The client side at `ClientAgent.connect` (`failure` on any error: refusal by the "
        "peer, timeout, network), the server side at `Responder.process`. A handshake between "
        "two instrumented agents is counted once by each."
    ),
    "handshakes_failed": (
        'Wherever `handshakes_completed{status="failure"}` is counted: `ClientAgent.connect` '
        "and `Responder.process`, labelled with the error's category. On the client, a "
        "refusal by the peer counts under the category the peer sent."
    ),
    "handshake_duration": (
        "`Initiator.init` (`init`), `Responder.process` (`process`, including the sender's "
        "DID resolution), `Initiator.finalize` (`finalize`); failed stages included."
    ),
    "crypto_operations": (
        "`SigningKey.sign` and `identity.verify_signature` (identity keys: handshakes, DID "
        "registrations; algorithm = key type); `Session.encrypt` / `Session.decrypt` "
        "(`chacha20`; one timing feeds the session and crypto histograms). Cryptographic "
        "failures count too; a call refused for another reason (a closed or expired session) "
        "did no cryptography and is not counted."
    ),
    "crypto_errors": (
        "The same code paths, when the operation fails cryptographically (`SignatureError` "
        "or `CryptoError`: bad signature, failed authentication, truncated ciphertext)."
    ),
    "crypto_operation_duration": (
        "The same calls as `sage_crypto_operations_total` (for a successful `encrypt` / "
        "`decrypt`, the same timing as `sage_session_duration_seconds`)."
    ),
    "did_resolutions": (
        "`DIDResolver.resolve`, every call, cache hits included; `failure` for an unknown, "
        "inactive or malformed DID. `chain` comes from the DID (`other` if it names none)."
    ),
    "did_registrations": (
        "`Registry.register` (deactivations go through it too); `failure` when the registry "
        "refuses the document or its signature."
    ),
    "did_resolution_duration": "`DIDResolver.resolve`, every call, cache hits included.",
    "messages_processed": (
        "`MessageValidator.open_wire`, on both sides: the server processing requests (close "
        "requests included), the client processing replies. A message refused while parsing "
        "(malformed metadata, content digest mismatch) is a failure too, its `type` taken "
        "from its metadata or `other`. A request for an unknown or expired session is "
        "refused before processing and is not counted here."
    ),
    "replay_attacks_detected": (
        "`NonceCache.check` answering `invalid`: a session message's nonce, or a "
        "handshake's context and nonce, already seen."
    ),
    "nonce_validations": (
        "`NonceCache.check`, every call: session messages (in `MessageValidator.open_wire`) and "
        "handshake requests (in `Responder.process`)."
    ),
    "message_processing_duration": (
        "`MessageValidator.open_wire`: parsing, signature, timestamp, nonce and sequence "
        "checks and "
        "decryption; failures included."
    ),
    "message_size": "`MessageValidator.open_wire`: the wire size of the sealed payload.",
}

# What each handshake error_type means; must name exactly the catalog's values.
ERROR_TYPE_MEANINGS: dict[str, str] = {
    "timeout": "the client's handshake timeout expired",
    "invalid": "malformed or mismatched request or answer, timestamp out of tolerance",
    "network": "peer unreachable, request timed out, or a non-JSON answer",
    "signature": "a signature or the ackTag did not verify",
    "unknown_did": "the DID is not registered, or the agent is deactivated",
    "replay": "the handshake request was replayed",
    "crypto": "an HPKE or X25519 operation failed",
    "overload": "a limit refused it: the sender's handshake rate or session share, or a full table",
}
PLAN_ERROR_TYPES = ("timeout", "invalid", "network")  # the monitoring plan's §2.1 values

_KIND_NAMES = {
    Kind.COUNTER: "Counter",
    Kind.UP_DOWN_COUNTER: "UpDownCounter",
    Kind.HISTOGRAM: "Histogram",
}
_UNIT_NAMES = {"s": "seconds", "By": "bytes"}
TIMES = "\u00d7"  # the multiplication sign, as in the "buckets" column


class CatalogMismatch(ValueError):
    """The knowledge kept in this module and the catalog disagree."""


def _check_keys(what: str, have: Iterable[str], want: Iterable[str]) -> None:
    have, want = set(have), set(want)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise CatalogMismatch(f"{what}: missing {missing or 'none'}, unknown {extra or 'none'}")


def section_of(instrument: Instrument) -> str:
    for title, prefixes, _about in SECTIONS:
        if instrument.name.startswith(prefixes):
            return title
    raise CatalogMismatch(f"{instrument.name}: no section in docs.SECTIONS matches it")


def grouped(
    instruments: Iterable[Instrument] = INSTRUMENTS,
) -> list[tuple[str, str, list[Instrument]]]:
    """(section title, section text, its instruments in catalog order)."""
    instruments = list(instruments)
    by_section = {title: [] for title, _prefixes, _about in SECTIONS}
    for instrument in instruments:
        by_section[section_of(instrument)].append(instrument)
    return [(title, about, by_section[title]) for title, _prefixes, about in SECTIONS]


def _number(value: float) -> str:
    return f"{value:.3g}"


def human(value: float, unit: str) -> str:
    """A boundary for people: ``0.1 ms``, ``1.64 s``, ``16 MiB``."""
    if unit == "s":
        if value >= 1:
            return f"{_number(value)} s"
        if value >= 1e-4:
            return f"{_number(value * 1e3)} ms"
        return f"{_number(value * 1e6)} µs"
    if unit == "By":
        for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
            if value >= 1024**power:
                return f"{_number(value / 1024**power)} {name}"
        return f"{_number(value)} B"
    return _number(value)


def le_value(bound: float) -> str:
    """The bound as the ``le`` label value on /metrics."""
    return repr(float(bound))


def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def buckets_compact(instrument: Instrument) -> str:
    """``0.0001 x 2^0..14 (0.1 ms … 1.64 s)`` (with a multiplication sign) when exponential."""
    bounds = instrument.buckets
    if not bounds:
        return "—"
    span = f"({human(bounds[0], instrument.unit)} … {human(bounds[-1], instrument.unit)})"
    if len(bounds) >= 2 and bounds[0] > 0:
        factor = round(bounds[1] / bounds[0], 6)
        expected = tuple(float(f"{bounds[0] * factor**i:.10g}") for i in range(len(bounds)))
        if factor > 1 and all(math.isclose(a, b) for a, b in zip(bounds, expected)):
            return f"{_plain(bounds[0])} {TIMES} {_plain(factor)}^0..{len(bounds) - 1} {span}"
    return f"{len(bounds)} bounds {span}"


def labels_cell(instrument: Instrument) -> str:
    if not instrument.labels:
        return "—"
    return "<br>".join(
        f"`{label.key}`: " + ", ".join(f"`{v}`" for v in label.values) + f" (else `{OTHER}`)"
        for label in instrument.labels
    )


def unit_cell(instrument: Instrument) -> str:
    name = _UNIT_NAMES.get(instrument.unit)
    return f"`{instrument.unit}` ({name})" if name else f"`{instrument.unit}`"


def type_cell(instrument: Instrument) -> str:
    return instrument.prometheus_type


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _table(header: tuple[str, ...], rows: Iterable[Iterable[str]]) -> list[str]:
    return [_row(header), _row("---" for _ in header), *(_row(r) for r in rows)]


def _check() -> None:
    keys = [instrument.key for instrument in INSTRUMENTS]
    _check_keys("docs.RECORDED_AT", RECORDED_AT, keys)
    _check_keys("docs.ERROR_TYPE_MEANINGS", ERROR_TYPE_MEANINGS, HANDSHAKE_ERROR_TYPES)
    for instrument in INSTRUMENTS:
        section_of(instrument)


def _intro() -> list[str]:
    return [
        "# SAGE metrics",
        "",
        "<!-- Generated from src/sage_otel/telemetry/catalog.py by "
        f"`{REGENERATE}`. Do not edit by hand. -->",
        "",
        "Every SAGE instrument is defined once, in `sage_otel.telemetry.catalog`; this page "
        "is rendered from it, and a test fails when the page is stale.",
        "",
        "## Where the metrics are exposed",
        "",
        "* **`/metrics`** (Prometheus): served by `sage_otel.configure()` on "
        "`127.0.0.1:9090` by default (`metrics_host` / `metrics_port`, or "
        "`OTEL_EXPORTER_PROMETHEUS_HOST` / `OTEL_EXPORTER_PROMETHEUS_PORT`; port `0` picks "
        "a free one). It answers in the Prometheus text format, and in OpenMetrics, with "
        "exemplars, when the scraper sends `Accept: application/openmetrics-text`.",
        "* **OTLP**: the same instruments under their OpenTelemetry names, exported by "
        "`sage_otel.configure()` when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics-specific "
        "endpoint) is set, or with `otlp=True`, over `http/protobuf` (default) or `grpc`.",
        "* **Under `opentelemetry-instrument`** (or any MeterProvider the application "
        "brings): the instrumentation records through the OpenTelemetry metrics API on the "
        "meter `sage_otel`, with the same names, units, label sets and bucket boundaries "
        "(passed as advisory boundaries); the application's exporters decide where they go.",
        "",
        "## Naming",
        "",
        "The Prometheus name is derived from the OpenTelemetry instrument name: dots become "
        "underscores; the unit `s` adds `_seconds` and `By` adds `_bytes` (annotation units "
        "such as `{session}` add nothing); counters end in `_total`. An UpDownCounter is "
        "exposed as a gauge. A histogram `X` is exposed as `X_bucket{le=…}`, `X_sum` and "
        "`X_count`. Labels are the instrument's attributes, under the same keys. No "
        "`otel_scope_*` labels are added: each series carries exactly the labels listed "
        "below.",
        "",
        "## Label values",
        "",
        "Every label has a closed set of values. A value outside the set is recorded as "
        f"`{OTHER}`, so a label can never grow without bound. Every combination of the "
        "listed values exists from startup (counters at 0, histograms empty), so `rate()`, "
        f"ratios and alerts work from the first scrape. An `{OTHER}` series is outside "
        "that promise: it may not exist until a value outside the set is recorded. "
        "(Through the plain OpenTelemetry API, as under "
        "`opentelemetry-instrument`, counters are pre-created too, but histogram series "
        "appear with their first value: the API cannot create an empty one.)",
        "",
    ]


def _error_types() -> list[str]:
    added = [v for v in HANDSHAKE_ERROR_TYPES if v not in PLAN_ERROR_TYPES]
    folded = [c.value for c in ErrorCategory if c.value not in HANDSHAKE_ERROR_TYPES]
    lines = [
        "### `error_type` values",
        "",
        "`sage_handshakes_failed_total{error_type}` is the failed handshake's error "
        "category. The monitoring plan names "
        + ", ".join(f"`{v}`" for v in PLAN_ERROR_TYPES)
        + "; the set here extends it with "
        + ", ".join(f"`{v}`" for v in added)
        + ", so that refused signatures, unknown agents, replays and cryptographic failures "
        "are told apart instead of all counting as `invalid`. Categories the agent has "
        "beyond these ("
        + ", ".join(f"`{v}`" for v in folded)
        + f") are recorded as `{OTHER}`. Spans carry the finer-grained error code as "
        "`error.type` (see [tracing.md](tracing.md)).",
        "",
    ]
    lines += _table(
        ("error_type", "meaning"),
        ((f"`{value}`", ERROR_TYPE_MEANINGS[value]) for value in HANDSHAKE_ERROR_TYPES),
    )
    return [*lines, ""]


def _sections() -> list[str]:
    lines = ["## SAGE metrics", ""]
    header = (
        "Prometheus name",
        "type",
        "labels",
        "unit",
        "buckets",
        "OTel instrument",
        "description",
    )
    for title, about, instruments in grouped():
        lines += [f"### {title}", "", about, ""]
        lines += _table(
            header,
            (
                (
                    f"`{i.prometheus_name}`",
                    type_cell(i),
                    labels_cell(i),
                    unit_cell(i),
                    buckets_compact(i),
                    f"`{i.name}` ({_KIND_NAMES[i.kind]})",
                    i.description,
                )
                for i in instruments
            ),
        )
        lines.append("")
        histograms = [i for i in instruments if i.kind is Kind.HISTOGRAM]
        if histograms:
            lines += ["Bucket boundaries, as the `le` label values (then `+Inf`):", ""]
            lines += [
                f"* `{i.prometheus_name}`: " + ", ".join(le_value(b) for b in i.buckets)
                for i in histograms
            ]
            lines.append("")
        if title == "Handshakes":
            lines += _error_types()
    return lines


def _recorded_at() -> list[str]:
    lines = [
        "## Where each metric is recorded",
        "",
        "The instrumentation (`sage_otel.instrumentation.SageInstrumentor`) patches these "
        "code paths of the agent core. Values recorded inside a sampled span carry it as an "
        "exemplar.",
        "",
    ]
    lines += _table(
        ("metric", "recorded at"),
        ((f"`{i.prometheus_name}`", RECORDED_AT[i.key]) for i in INSTRUMENTS),
    )
    return [*lines, ""]


def _other_series() -> list[str]:
    return [
        "## Process and runtime metrics",
        "",
        "`/metrics` also serves the standard Python client collectors. They exist on "
        "`/metrics` only, not over OTLP.",
        "",
        *_table(
            ("metric", "type", "meaning"),
            (
                (
                    "`process_cpu_seconds_total`",
                    "counter",
                    "user and system CPU time of the process",
                ),
                (
                    "`process_resident_memory_bytes`, `process_virtual_memory_bytes`",
                    "gauge",
                    "resident and virtual memory size",
                ),
                ("`process_open_fds`, `process_max_fds`", "gauge", "open and maximum fds"),
                (
                    "`process_start_time_seconds`",
                    "gauge",
                    "start time of the process, in Unix seconds",
                ),
                (
                    "`python_gc_objects_collected_total{generation}`, "
                    "`python_gc_objects_uncollectable_total{generation}`, "
                    "`python_gc_collections_total{generation}`",
                    "counter",
                    "garbage collector activity per generation",
                ),
                (
                    "`python_info{implementation,major,minor,patchlevel,version}`",
                    "gauge",
                    "the Python runtime (value 1)",
                ),
            ),
        ),
        "",
        "The `process_*` metrics are read from `/proc` and so appear on Linux only.",
        "",
        "### `target_info`",
        "",
        "`target_info` (value 1) carries the OpenTelemetry resource as labels, dots turned "
        "into underscores: `service_name` (the `service_name` argument of "
        "`sage_otel.configure()`, else `OTEL_SERVICE_NAME`, else `sage-agent`), "
        "`service_version` (your application's, from the `service_version` argument or "
        "`OTEL_RESOURCE_ATTRIBUTES`; absent otherwise), `service_instance_id` (a UUID per "
        "process), `telemetry_sdk_*`, `telemetry_distro_name` (`sage-otel`), "
        "`telemetry_distro_version` (sage-otel's version) and anything in "
        "`OTEL_RESOURCE_ATTRIBUTES`. Join on it to label "
        "SAGE series by service, for example "
        "`sage_sessions_active * on (job, instance) group_left (service_name) target_info`.",
        "",
    ]


def _exemplars() -> list[str]:
    return [
        "## Exemplars",
        "",
        "Asked for OpenMetrics (`Accept: application/openmetrics-text`), `/metrics` attaches "
        "exemplars to counter samples and histogram buckets: the `trace_id` and `span_id` of "
        "the sampled span inside which the newest value of that series (or bucket) was "
        "recorded, with the value and its time:",
        "",
        "```",
        'sage_message_processing_duration_seconds_bucket{le="0.00016"} 6.0 '
        '# {span_id="d8006a7fbe0bbe34",trace_id="5c45b7733726fe245f250167829093c8"} '
        "8.9613e-05 1795728188.168",
        "```",
        "",
        "The Prometheus text format carries no exemplars. Values recorded outside a sampled "
        "span (unsampled traces, tracing off) carry none, and neither do the gauge "
        "`sage_sessions_active` and the `valid` / `expired` nonce checks. "
        "[tracing.md](tracing.md) shows how to follow an exemplar to its trace in Grafana.",
        "",
    ]


def _ingestion_paths() -> list[str]:
    """What each way into Prometheus 3 carries: what tests/e2e/test_ingestion_paths.py proves."""
    return [
        "## Ingestion paths",
        "",
        "Prometheus 3 gets these metrics four ways. tests/e2e/test_ingestion_paths.py records "
        "one agent's traffic once, reads it all four ways (the scrape in both text formats) "
        "into a Prometheus 3.16 each, and compares what they answer.",
        "",
        *_table(
            ("path", "how", "configured by"),
            [
                (
                    "scrape",
                    "Prometheus scrapes `/metrics` (OpenMetrics, or the text format)",
                    "the `sage-agent` job of "
                    "[prometheus.yml](../collector/prometheus/prometheus.yml)",
                ),
                (
                    "collector, OTLP (the default)",
                    "agent OTLP → collector → `otlp_http/prometheus` → Prometheus' OTLP "
                    "receiver, `/api/v1/otlp/v1/metrics` (`--web.enable-otlp-receiver`)",
                    "[otel-collector.yaml](../collector/otel-collector.yaml); the `otlp:` "
                    "section of prometheus.yml",
                ),
                (
                    "collector, remote write",
                    "agent OTLP → collector → `prometheus_remote_write` → `/api/v1/write` "
                    "(`--web.enable-remote-write-receiver`): for Prometheus 2 before 2.47, "
                    "Thanos, Mimir",
                    "otel-collector.yaml plus the overlay "
                    "[otel-collector.remote-write.yaml](../collector/otel-collector.remote-write.yaml)",
                ),
                (
                    "agent, OTLP",
                    "the agent's own OTLP metric exporter straight at Prometheus: "
                    "`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=http://prometheus:9090/api/v1/otlp/v1/metrics`",
                    "the `otlp:` section of prometheus.yml",
                ),
            ],
        ),
        "",
        "The same on every path: the series names (Prometheus' `translation_strategy: "
        "UnderscoreEscapingWithSuffixes`, and the same for the remote-write exporter), each "
        "series' own labels and no others (no `otel_scope_*`: the overlay sets "
        "`disable_scope_info`), and the values: every counter, gauge and histogram series "
        "exactly once the traffic stops, and every plan, dashboard, alert and SLO "
        "expression within the few percent by which the paths' sampling instants move "
        "`rate()`'s extrapolation (measured: at most 2%, 7% for the SLO rules' 30-day "
        "averages of their recorded 5-minute ratios).",
        "",
        "What differs, by design:",
        "",
        "* **`job` and `instance`** name the source. Scraped: the scrape job and `host:port`. "
        "Pushed (OTLP or remote write): `job` is `service.name` (`service.namespace/"
        "service.name` when a namespace is set) and `instance` is `service.instance.id`. "
        "With the default `service.name`, `sage-agent`, `job` is the same as the shipped "
        "scrape job's.",
        "* **`deployment.environment`** (and `deployment.environment.name`) is a label, "
        "`deployment_environment`, on every pushed series (prometheus.yml's "
        "`promote_resource_attributes`, the overlay's `resource_constant_labels`). Scraped, it "
        "is on `target_info` only.",
        "* **`target_info`**: scraped, it has every resource attribute; pushed, every one but "
        "`service.name`, `service.namespace` and `service.instance.id`, which are its `job` "
        "and `instance`.",
        "* **`le`** is written as OpenMetrics writes numbers when scraped (`1.0`, `1e-06`) and "
        "as the shortest decimal when pushed (`1`, `0.000001`). The buckets are the same; "
        "`histogram_quantile` and every shipped query read `le` as a number, and a query of "
        'your own must too (never `le="1.0"`).',
        "* **Exemplars** (`trace_id`, `span_id`, with `--enable-feature=exemplar-storage`) "
        "arrive by OpenMetrics, OTLP and remote write. The Prometheus text format has no "
        "syntax for them: a scrape limited to it (`scrape_protocols`) stores none.",
        "* **`up`** (and `scrape_*`) exist for scraped targets only: `SageAgentDown` watches "
        "scraped agents. A pushed series has no staleness marker: an agent that stops "
        "pushing leaves its last values current for 5 minutes (the query lookback), and "
        "`SageMetricsMissing` fires when no SAGE series is left at all.",
        "* The process and runtime metrics above are on `/metrics` only.",
        "",
    ]


def render_metrics_markdown() -> str:
    """The whole of docs/metrics.md."""
    _check()
    lines = [
        *_intro(),
        *_sections(),
        *_recorded_at(),
        *_other_series(),
        *_exemplars(),
        *_ingestion_paths(),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.metrics_docs",
        description="Render docs/metrics.md from the metric catalog (to stdout by default).",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--write", action="store_true", help="write the page to --path instead of stdout"
    )
    group.add_argument("--check", action="store_true", help="exit 1 if the page at --path is stale")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}")
    args = parser.parse_args(argv)
    text = render_metrics_markdown()
    if args.write:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text, encoding="utf-8")
        print(f"wrote {args.path}", file=sys.stderr)
        return 0
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
