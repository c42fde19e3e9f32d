"""SageInstrumentor: every metric and span of a real loopback run, asserted in memory.

In the style of opentelemetry-python-contrib's instrumentation tests: each test instruments
with private providers (never the global ones), drives real agents over loopback HTTP, and
uninstruments at teardown. Spans go to an ``InMemorySpanExporter`` through a
``SimpleSpanProcessor``; metrics are recorded into a ``MetricStore`` attached to an
``InMemoryMetricReader`` registered on a private ``MeterProvider``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import SpanKind, StatusCode

from sage_otel import instrumentation
from sage_otel.agent import did, errors, identity, message, session, transport
from sage_otel.agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    sign_registration,
)
from sage_otel.agent.errors import (
    InvalidMessageError,
    PeerError,
    SageError,
    SignatureError,
)
from sage_otel.agent.handshake import Initiator, Responder
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.message import MessageValidator, seal, signature_base
from sage_otel.agent.session import SessionLimits, SessionManager
from sage_otel.agent.transport import (
    MESSAGE_TASK,
    MESSAGES_PATH,
    ClientAgent,
    Connection,
    ServerAgent,
)
from sage_otel.instrumentation import SageInstrumentor
from sage_otel.telemetry.catalog import BY_KEY, INSTRUMENTS, OTHER, Kind
from sage_otel.telemetry.meters import ApiMeters, StoreMeters
from sage_otel.telemetry.store import MetricStore

StartServer = Callable[..., Awaitable[tuple[ServerAgent, str]]]
MakeClient = Callable[..., Awaitable[ClientAgent]]
NewAgent = Callable[..., Awaitable[AgentIdentity]]

RESOURCE = Resource.create({"service.name": "sage-otel-instrumentation-tests"})
SCOPE = "sage_otel"
ALGORITHM = {Chain.ETHEREUM: "secp256k1", Chain.SOLANA: "ed25519"}


def _open_wire(validator, session, message, **kwargs):
    """Deliver a sealed message the way a transport does: in its wire form."""
    wire = message.to_wire()
    return validator.open_wire(session, wire["payload"], wire["metadata"], **kwargs)


# --- capture -------------------------------------------------------------------------------


class Snapshot:
    """One collection of the SAGE scope, queried by catalog key and exact label set."""

    def __init__(self, metrics: dict[str, Metric]) -> None:
        self.metrics = metrics

    def metric(self, key: str) -> Metric:
        return self.metrics[BY_KEY[key].name]

    def points(self, key: str) -> list[Any]:
        return list(self.metric(key).data.data_points)

    def point(self, key: str, **labels: str) -> Any:
        found = [p for p in self.points(key) if dict(p.attributes) == labels]
        assert len(found) == 1, (key, labels, [dict(p.attributes) for p in self.points(key)])
        return found[0]

    def value(self, key: str, **labels: str) -> int:
        return self.point(key, **labels).value

    def count(self, key: str, **labels: str) -> int:
        return self.point(key, **labels).count

    def total(self, key: str) -> int:
        """Sum of a counter's series, or of a histogram's counts."""
        if BY_KEY[key].kind is Kind.HISTOGRAM:
            return sum(p.count for p in self.points(key))
        return sum(p.value for p in self.points(key))

    def values(self, key: str) -> dict[tuple[str, ...], int]:
        """Non-zero series of a counter, keyed by label values in catalog order."""
        keys = BY_KEY[key].label_keys
        return {tuple(p.attributes[k] for k in keys): p.value for p in self.points(key) if p.value}

    def exemplars(self) -> list[Any]:
        return [
            exemplar
            for metric in self.metrics.values()
            for point in metric.data.data_points
            for exemplar in point.exemplars or ()
        ]


@dataclasses.dataclass
class Captured:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    store: MetricStore
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def snapshot(self) -> Snapshot:
        data = self.reader.get_metrics_data()
        assert data is not None
        metrics: dict[str, Metric] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name == SCOPE:
                    for metric in scope_metrics.metrics:
                        assert metric.name not in metrics, f"{metric.name} exported twice"
                        metrics[metric.name] = metric
        return Snapshot(metrics)


@pytest.fixture
def instrument() -> Iterator[Callable[..., Captured]]:
    """Instrument with private providers (at most once per test); uninstrument at teardown."""
    instrumentor = SageInstrumentor()
    assert not instrumentor.is_instrumented_by_opentelemetry, "left instrumented by a test"
    providers: list[Any] = []

    def start(
        *, sampler: Sampler | None = None, tracer_provider: Any = None, **options: Any
    ) -> Captured:
        exporter = InMemorySpanExporter()
        tp = TracerProvider(resource=RESOURCE, sampler=sampler or ParentBased(ALWAYS_ON))
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        mp = MeterProvider(resource=RESOURCE, metric_readers=[reader])
        providers.extend((tp, mp))
        store = MetricStore()
        store.attach(reader, RESOURCE)
        options.setdefault("meters", StoreMeters(store))
        instrumentor.instrument(tracer_provider=tracer_provider or tp, **options)
        return Captured(exporter, reader, store, tp, mp)

    yield start
    instrumentor.uninstrument()
    for provider in providers:
        provider.shutdown()


@pytest.fixture
def tel(instrument: Callable[..., Captured]) -> Captured:
    """The server agent continues its callers' traces, as between agents that trust them."""
    return instrument(inbound_trace_context="parent")


@pytest.fixture
def default_tel(instrument: Callable[..., Captured]) -> Captured:
    """The default: a request's trace context is not trusted before it is authenticated."""
    return instrument()


# --- helpers -------------------------------------------------------------------------------


async def pair(
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
    *,
    client_chain: Chain = Chain.ETHEREUM,
    server_chain: Chain = Chain.SOLANA,
    **server_options: Any,
) -> tuple[ServerAgent, str, ClientAgent]:
    server, url = await start_server(await new_agent(server_chain), **server_options)
    client = await make_client(chain=client_chain)
    return server, url, client


async def connect(server: ServerAgent, url: str, client: ClientAgent) -> Connection:
    return await client.connect(url, str(server.identity.did))


async def send_envelope(client: ClientAgent, conn: Connection, envelope: dict[str, Any]) -> Any:
    """``client.send`` (span, propagation, reply check) with a prepared envelope on the wire."""
    client.message_envelope = lambda *_args, **_kwargs: envelope  # type: ignore[method-assign]
    try:
        return await client.send(conn, "prepared")
    finally:
        del client.message_envelope


def tampered_envelope(client: ClientAgent, conn: Connection) -> dict[str, Any]:
    """A message whose ciphertext is corrupted and then correctly re-signed."""
    message = seal(conn.session, "this ciphertext will be corrupted")
    corrupt = bytearray(message.ciphertext)
    corrupt[-1] ^= 0x01
    unsigned = dataclasses.replace(message, ciphertext=bytes(corrupt), signature=b"")
    signature = conn.session.sign(signature_base(unsigned, "POST", MESSAGES_PATH))
    wire = dataclasses.replace(unsigned, signature=signature).to_wire()
    return client.envelope(
        MESSAGE_TASK, conn.session.id, wire["payload"], metadata=wire["metadata"]
    )


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def one(spans: list[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in named(spans, name) if kind is None or s.kind is kind]
    assert len(found) == 1, (name, kind, [(s.name, s.kind) for s in spans])
    return found[0]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [
        span
        for span in spans
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


def child_names(spans: list[ReadableSpan], parent: ReadableSpan) -> set[str]:
    return {span.name for span in children(spans, parent)}


def assert_failed(span: ReadableSpan, error_type: str) -> None:
    assert span.status.status_code is StatusCode.ERROR, span.name
    assert span.attributes["error.type"] == error_type, (span.name, dict(span.attributes))


def assert_refused_by_peer(span: ReadableSpan, refusal: PeerError) -> None:
    """A client's span for a call the peer refused: an error, named by a bounded identifier.

    The peer's refusal arrives as a ``PeerError`` carrying the peer's code and category;
    the span names it by the library's ``error_type`` of that error: the code, or the
    category prefixed with ``peer_`` (a peer's code is whatever the peer chose to send).
    """
    assert span.status.status_code is StatusCode.ERROR, span.name
    kind = span.attributes["error.type"]
    assert kind == instrumentation.error_type(refusal), (span.name, kind)
    assert kind in {refusal.code, f"peer_{refusal.category.value}"}, (span.name, kind)


def assert_ok(span: ReadableSpan) -> None:
    assert span.status.status_code is not StatusCode.ERROR, span.name
    assert "error.type" not in span.attributes, span.name


def assert_sage_names(spans: list[ReadableSpan]) -> None:
    assert spans
    assert all(span.name.startswith("sage.") for span in spans), {s.name for s in spans}


# --- before any traffic --------------------------------------------------------------------


def test_every_label_combination_exists_at_zero_before_traffic(tel: Captured) -> None:
    snap = tel.snapshot()
    assert set(snap.metrics) == {instrument.name for instrument in INSTRUMENTS}
    for spec in INSTRUMENTS:
        metric = snap.metric(spec.key)
        assert metric.unit == spec.unit and metric.description == spec.description
        expected = {tuple(sorted(labels.items())) for labels in spec.label_sets()}
        seen = [tuple(sorted(dict(p.attributes).items())) for p in metric.data.data_points]
        assert len(seen) == len(set(seen)), f"{spec.key}: duplicate series"
        assert expected <= set(seen), f"{spec.key}: missing {expected - set(seen)}"
        for extra in set(seen) - expected:  # pre-bound `other` series, also at zero
            assert OTHER in dict(extra).values(), (spec.key, extra)
            assert set(dict(extra)) == set(spec.label_keys), (spec.key, extra)
        for point in metric.data.data_points:
            if spec.kind is Kind.HISTOGRAM:
                assert isinstance(metric.data, Histogram)
                assert point.count == 0 and point.sum == 0
                assert tuple(point.explicit_bounds) == spec.buckets, spec.key
                assert list(point.bucket_counts) == [0] * (len(spec.buckets) + 1)
            else:
                assert isinstance(metric.data, Sum)
                assert metric.data.is_monotonic is (spec.kind is Kind.COUNTER)
                assert point.value == 0, spec.key
    assert tel.spans() == []


def test_unknown_label_values_map_to_other(tel: Captured) -> None:
    meters = StoreMeters(tel.store)
    meters.counter("handshakes_failed", error_type="cosmic_ray").add(1)
    meters.counter("crypto_operations", operation="hash", algorithm="md5").add(2)
    meters.counter("did_resolutions", chain="bitcoin", status="success").add(3)
    meters.histogram("handshake_duration", stage="teardown").record(0.5)
    snap = tel.snapshot()
    assert snap.value("handshakes_failed", error_type=OTHER) == 1
    assert snap.value("crypto_operations", operation=OTHER, algorithm=OTHER) == 2
    assert snap.value("did_resolutions", chain=OTHER, status="success") == 3
    assert snap.count("handshake_duration", stage=OTHER) == 1
    for key in ("handshakes_failed", "crypto_operations", "did_resolutions"):
        labels = {v for p in snap.points(key) for v in p.attributes.values()}
        assert not labels & {"cosmic_ray", "hash", "md5", "bitcoin", "teardown"}


def test_unknown_label_values_map_to_other_through_the_api_path() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    try:
        meters = ApiMeters(provider)
        meters.counter("handshakes_failed", error_type="cosmic_ray").add(1)
        meters.histogram("did_resolution_duration", chain="bitcoin").record(0.001)
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    points = {
        (metric.name, tuple(sorted(p.attributes.items()))): p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for p in metric.data.data_points
    }
    assert points["sage.handshakes.failed", (("error_type", OTHER),)].value == 1
    assert points["sage.did.resolution.duration", (("chain", OTHER),)].count == 1
    assert not any("cosmic_ray" in key[1][0] or "bitcoin" in key[1][0] for key in points if key[1])


# --- handshakes ----------------------------------------------------------------------------


async def test_one_handshake_counts_on_both_sides(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    snap = tel.snapshot()
    assert snap.values("did_registrations") == {
        ("ethereum", "success"): 1,
        ("solana", "success"): 1,
    }
    assert snap.total("handshakes_initiated") == 0

    conn = await connect(server, url, client)
    snap = tel.snapshot()
    assert snap.value("handshakes_initiated", role="client") == 1
    assert snap.value("handshakes_initiated", role="server") == 1
    assert snap.value("handshakes_completed", status="success") == 2  # one per side
    assert snap.value("handshakes_completed", status="failure") == 0
    assert snap.total("handshakes_failed") == 0
    assert snap.value("sessions_created", status="success") == 2
    assert snap.value("sessions_created", status="failure") == 0
    assert snap.value("sessions_active") == 2
    for stage in ("init", "process", "finalize"):
        assert snap.count("handshake_duration", stage=stage) == 1
    assert snap.count("session_duration", operation="create") == 2
    # The client resolves the (Solana) server, the server the (Ethereum) client.
    assert snap.values("did_resolutions") == {
        ("ethereum", "success"): 1,
        ("solana", "success"): 1,
    }
    assert snap.count("did_resolution_duration", chain="ethereum") == 1
    assert snap.count("did_resolution_duration", chain="solana") == 1
    # The responder's handshake replay check is a nonce validation too.
    assert snap.value("nonce_validations", status="valid") == 1
    assert snap.total("replay_attacks_detected") == 0

    await client.close(conn)
    snap = tel.snapshot()
    assert snap.value("sessions_active") == 0
    assert snap.value("sessions_closed") == 2
    assert snap.value("sessions_expired") == 0


@pytest.mark.parametrize(
    ("client_chain", "server_chain"),
    [
        (Chain.ETHEREUM, Chain.SOLANA),
        (Chain.SOLANA, Chain.SOLANA),
        (Chain.ETHEREUM, Chain.ETHEREUM),
    ],
)
async def test_crypto_operations_name_the_chain_algorithm(
    tel: Captured,
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
    client_chain: Chain,
    server_chain: Chain,
) -> None:
    server, url, client = await pair(
        start_server, make_client, new_agent, client_chain=client_chain, server_chain=server_chain
    )
    conn = await connect(server, url, client)
    # Each registration signs and verifies once with its own key; the handshake request is
    # signed by the client and verified by the server, the response the other way round.
    expected: Counter[tuple[str, str]] = Counter()
    for chain in (client_chain, server_chain):
        expected["sign", ALGORITHM[chain]] += 2
        expected["verify", ALGORITHM[chain]] += 2
    snap = tel.snapshot()
    assert snap.values("crypto_operations") == dict(expected)
    assert snap.count("crypto_operation_duration", operation="sign") == 4
    assert snap.count("crypto_operation_duration", operation="verify") == 4
    assert snap.total("crypto_errors") == 0

    assert await client.send(conn, "one round trip") == "one round trip"
    snap = tel.snapshot()
    expected["encrypt", "chacha20"] = 2  # request and reply
    expected["decrypt", "chacha20"] = 2
    assert snap.values("crypto_operations") == dict(expected)
    assert snap.count("crypto_operation_duration", operation="encrypt") == 2
    assert snap.count("crypto_operation_duration", operation="decrypt") == 2
    assert snap.total("crypto_errors") == 0


async def test_handshake_spans_form_one_trace_across_agents(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    tel.exporter.clear()  # registrations
    conn = await connect(server, url, client)
    spans = tel.spans()
    assert_sage_names(spans)

    client_span = one(spans, "sage.handshake", SpanKind.CLIENT)
    server_span = one(spans, "sage.handshake", SpanKind.SERVER)
    assert client_span.parent is None
    assert {"sage.handshake.init", "sage.handshake.finalize"} <= child_names(spans, client_span)
    init = one(spans, "sage.handshake.init")
    finalize = one(spans, "sage.handshake.finalize")
    assert init.parent.span_id == client_span.context.span_id
    assert finalize.parent.span_id == client_span.context.span_id

    # W3C trace context over HTTP: the server's span continues the client's trace.
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.parent is not None and server_span.parent.is_remote
    client_ids = {s.context.span_id for s in spans if s.kind is not SpanKind.SERVER}
    assert server_span.parent.span_id in client_ids
    process = one(spans, "sage.handshake.process")
    assert process.parent.span_id == server_span.context.span_id
    assert process.context.trace_id == client_span.context.trace_id

    # Every SAGE span of the handshake is in that one trace.
    assert {s.context.trace_id for s in spans} == {client_span.context.trace_id}
    for span in spans:
        assert_ok(span)
    assert client_span.attributes["sage.handshake.role"] == "client"
    assert server_span.attributes["sage.handshake.role"] == "server"
    assert {s.name for s in spans} >= {"sage.did.resolve", "sage.session.create"}
    creates = named(spans, "sage.session.create")
    assert {c.parent.span_id for c in creates} == {
        finalize.context.span_id,
        process.context.span_id,
    }
    await client.close(conn)


# --- trace context from requests not yet authenticated ---------------------------------------

_FORGED_TRACE = "0af7651916cd43dd8448eb211c80319c"
_FORGED_PARENT = f"00-{_FORGED_TRACE}-b7ad6b7169203331-01"  # "sampled", says the stranger


async def _stranger_request(url: str) -> None:
    """A request with a sampled traceparent and baggage, before any authentication."""
    import httpx

    async with httpx.AsyncClient() as http:
        answer = await http.post(
            url + MESSAGES_PATH,
            content=b'{"id": "m", "task_id": "no/such@v1", "payload": "e30="}',
            headers={
                "content-type": "application/json",
                "traceparent": _FORGED_PARENT,
                "baggage": "tenant=admin,sage.did=did:sage:forged",
            },
        )
    assert answer.status_code == 400  # refused as an unknown task, after the span started


async def test_by_default_the_server_span_links_the_callers_span_and_starts_its_own_trace(
    default_tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    default_tel.exporter.clear()
    conn = await connect(server, url, client)
    spans = default_tel.spans()
    client_span = one(spans, "sage.handshake", SpanKind.CLIENT)
    server_span = one(spans, "sage.handshake", SpanKind.SERVER)
    assert server_span.parent is None
    assert server_span.context.trace_id != client_span.context.trace_id
    client_ids = {
        s.context.span_id for s in spans if s.context.trace_id == client_span.context.trace_id
    }
    [link] = server_span.links
    assert link.context.trace_id == client_span.context.trace_id
    assert link.context.span_id in client_ids
    await client.close(conn)


async def test_a_strangers_sampled_flag_does_not_force_the_servers_sampling(
    instrument: Callable[..., Captured], start_server: StartServer
) -> None:
    # This process samples nothing of its own; only a caller's "sampled" flag could force it.
    tel = instrument(sampler=ParentBased(ALWAYS_OFF))
    _server, url = await start_server()
    await _stranger_request(url)
    assert [s for s in tel.spans() if s.kind is SpanKind.SERVER] == []


async def test_a_strangers_trace_context_is_a_link_and_its_baggage_is_dropped(
    instrument: Callable[..., Captured], start_server: StartServer
) -> None:
    seen_baggage: list[dict[str, object]] = []

    def hook(span: trace.Span, name: str) -> None:
        from opentelemetry import baggage

        seen_baggage.append(dict(baggage.get_all()))

    tel = instrument(span_hook=hook)
    _server, url = await start_server()
    await _stranger_request(url)
    [span] = [s for s in tel.spans() if s.kind is SpanKind.SERVER]
    assert span.name == "sage.receive" and span.parent is None
    assert f"{span.context.trace_id:032x}" != _FORGED_TRACE
    assert [f"{link.context.trace_id:032x}" for link in span.links] == [_FORGED_TRACE]
    assert seen_baggage and all(seen == {} for seen in seen_baggage)


async def test_parent_policy_follows_the_callers_trace_sampling_and_baggage(
    instrument: Callable[..., Captured],
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The opt-in for callers the server trusts, here through the environment variable."""
    seen_baggage: list[dict[str, object]] = []

    def hook(span: trace.Span, name: str) -> None:
        from opentelemetry import baggage

        seen_baggage.append(dict(baggage.get_all()))

    monkeypatch.setenv(instrumentation.INBOUND_TRACE_CONTEXT_ENV, "parent")
    tel = instrument(sampler=ParentBased(ALWAYS_OFF), span_hook=hook)
    _server, url = await start_server()
    await _stranger_request(url)
    [span] = [s for s in tel.spans() if s.kind is SpanKind.SERVER]
    assert f"{span.context.trace_id:032x}" == _FORGED_TRACE and span.parent.is_remote
    assert seen_baggage[-1]["tenant"] == "admin"


@pytest.mark.parametrize("policy", ["ignore", "bogus"])
async def test_ignore_policy_and_a_bad_value_neither_parent_nor_link(
    policy: str,
    instrument: Callable[..., Captured],
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tel = instrument(inbound_trace_context=policy)
    _server, url = await start_server()
    await _stranger_request(url)
    [span] = [s for s in tel.spans() if s.kind is SpanKind.SERVER]
    assert span.parent is None and f"{span.context.trace_id:032x}" != _FORGED_TRACE
    if policy == "ignore":
        assert span.links == ()
    else:  # a typo warns and falls back to the default, "link"
        assert len(span.links) == 1
        assert any("'bogus'" in r.getMessage() for r in caplog.records)


async def test_unknown_did_handshake_fails_on_both_sides(
    tel: Captured, start_server: StartServer, make_client: MakeClient
) -> None:
    server, url = await start_server()
    client = await make_client(chain=Chain.ETHEREUM, registered=False)
    with pytest.raises(PeerError) as failure:
        await client.connect(url, str(server.identity.did))
    assert failure.value.code == "unknown_did"

    snap = tel.snapshot()
    assert snap.value("handshakes_initiated", role="client") == 1
    assert snap.value("handshakes_initiated", role="server") == 1
    assert snap.value("handshakes_completed", status="failure") == 2
    assert snap.value("handshakes_completed", status="success") == 0
    assert snap.values("handshakes_failed") == {("unknown_did",): 2}
    assert snap.value("did_resolutions", chain="ethereum", status="failure") == 1
    assert snap.value("did_resolutions", chain="solana", status="success") == 1
    assert snap.count("handshake_duration", stage="process") == 1
    assert snap.count("handshake_duration", stage="finalize") == 0
    assert snap.total("sessions_created") == 0
    assert snap.value("sessions_active") == 0

    spans = tel.spans()
    assert_sage_names(spans)
    client_span = one(spans, "sage.handshake", SpanKind.CLIENT)
    server_span = one(spans, "sage.handshake", SpanKind.SERVER)
    assert server_span.context.trace_id == client_span.context.trace_id
    assert_refused_by_peer(client_span, failure.value)
    for span in (server_span, one(spans, "sage.handshake.process")):
        assert_failed(span, "unknown_did")
    failed_resolve = [
        s for s in named(spans, "sage.did.resolve") if s.attributes["sage.did.chain"] == "ethereum"
    ]
    assert len(failed_resolve) == 1
    assert_failed(failed_resolve[0], "unknown_did")
    assert_ok(one(spans, "sage.handshake.init"))


async def test_session_capacity_is_counted_as_overload(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    """A full session table refuses before any HPKE work: 503 with Retry-After, ``overload``."""
    server, url, client = await pair(
        start_server, make_client, new_agent, sessions=SessionManager(max_sessions=0)
    )
    with pytest.raises(PeerError) as failure:
        await connect(server, url, client)
    assert failure.value.code == "session_capacity" and failure.value.http_status == 503
    snap = tel.snapshot()
    assert snap.values("handshakes_failed") == {("overload",): 2}
    assert snap.value("handshakes_completed", status="failure") == 2
    assert snap.value("sessions_created", status="failure") == 0  # never attempted
    assert_failed(one(tel.spans(), "sage.handshake.process"), "session_capacity")


async def test_a_chain_outside_the_enum_is_counted_as_other(tel: Captured) -> None:
    resolver = DIDResolver(InMemoryRegistry())
    with pytest.raises(InvalidMessageError):
        await resolver.resolve("did:sage:bitcoin:1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2")
    snap = tel.snapshot()
    assert snap.value("did_resolutions", chain=OTHER, status="failure") == 1
    assert snap.count("did_resolution_duration", chain=OTHER) == 1
    resolves = named(tel.spans(), "sage.did.resolve")
    unknown_chain = [s for s in resolves if s.attributes["sage.did.chain"] == OTHER]
    assert len(unknown_chain) == 1
    assert_failed(unknown_chain[0], "bad_did")


# --- messages ------------------------------------------------------------------------------


async def test_text_and_binary_messages(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    tel.exporter.clear()
    blob = bytes(range(256)) * 4
    assert await client.send(conn, "hello") == "hello"
    assert await client.send(conn, blob) == blob

    snap = tel.snapshot()
    # Each message is opened by the server and its reply by the client.
    assert snap.values("messages_processed") == {("text", "success"): 2, ("binary", "success"): 2}
    wire = [12 + 5 + 16, 12 + len(blob) + 16]  # AEAD nonce, ciphertext, tag
    assert snap.point("message_size").count == 4
    assert snap.point("message_size").sum == 2 * sum(wire)
    assert snap.point("message_processing_duration").count == 4
    for direction in ("inbound", "outbound"):
        point = snap.point("session_message_size", direction=direction)
        assert point.count == 4 and point.sum == 2 * (5 + len(blob))
    assert snap.count("session_duration", operation="encrypt") == 4
    assert snap.count("session_duration", operation="decrypt") == 4
    assert snap.value("nonce_validations", status="valid") == 1 + 4
    assert snap.total("crypto_errors") == 0

    spans = tel.spans()
    assert_sage_names(spans)
    sends = named(spans, "sage.message.send")
    receives = named(spans, "sage.message.receive")
    assert len(sends) == len(receives) == 2
    assert {s.attributes["sage.message.type"] for s in sends} == {"text", "binary"}
    assert len({s.context.trace_id for s in sends}) == 2  # one trace per message
    for send in sends:
        assert send.kind is SpanKind.CLIENT and send.parent is None
        assert send.attributes["server.address"] == "127.0.0.1"
        assert send.attributes["server.port"] == server.port
        receive = [r for r in receives if r.context.trace_id == send.context.trace_id]
        assert len(receive) == 1, "the server's receive span continues the client's trace"
        receive = receive[0]
        assert receive.kind is SpanKind.SERVER
        assert receive.parent.is_remote
        processing = [s for s in children(spans, receive) if s.name == "sage.message.process"]
        assert len(processing) == 1
        assert processing[0].context.trace_id == send.context.trace_id
        # The client opens the reply inside its send span.
        assert "sage.message.process" in child_names(spans, send)
        for span in (send, receive, *processing):
            assert_ok(span)
    await client.close(conn)


async def test_replay_is_detected_counted_and_marked_on_spans(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    envelope = client.message_envelope(conn, "say it twice")
    assert await send_envelope(client, conn, envelope) == "say it twice"
    tel.exporter.clear()
    with pytest.raises(PeerError) as failure:
        await send_envelope(client, conn, envelope)
    assert failure.value.code == "replay_detected"

    snap = tel.snapshot()
    assert snap.value("replay_attacks_detected") == 1
    assert snap.value("nonce_validations", status="invalid") == 1
    assert snap.value("nonce_validations", status="expired") == 0
    assert snap.value("messages_processed", type="text", status="failure") == 1
    assert snap.total("crypto_errors") == 0

    spans = tel.spans()
    assert_sage_names(spans)
    send = one(spans, "sage.message.send")
    receive = one(spans, "sage.message.receive")
    process = one(spans, "sage.message.process")
    assert receive.context.trace_id == send.context.trace_id
    assert process.parent.span_id == receive.context.span_id
    for span in (receive, process):
        assert_failed(span, "replay_detected")
    assert_refused_by_peer(send, failure.value)
    assert any(event.name == "sage.replay_detected" for event in process.events)
    await client.close(conn)


async def test_tampered_resigned_ciphertext_is_a_decrypt_error(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    tel.exporter.clear()
    with pytest.raises(PeerError) as failure:
        await send_envelope(client, conn, tampered_envelope(client, conn))
    assert failure.value.code == "decrypt_failed"

    snap = tel.snapshot()
    assert snap.values("crypto_errors") == {("decrypt",): 1}
    assert snap.value("crypto_operations", operation="decrypt", algorithm="chacha20") == 1
    assert snap.value("messages_processed", type="text", status="failure") == 1
    assert snap.value("nonce_validations", status="valid") == 2  # handshake, message
    assert snap.total("replay_attacks_detected") == 0

    spans = tel.spans()
    for name in ("sage.message.receive", "sage.message.process"):
        assert_failed(one(spans, name), "decrypt_failed")
    assert_refused_by_peer(one(spans, "sage.message.send"), failure.value)
    await client.close(conn)


async def test_session_driven_past_max_messages_expires(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(
        start_server,
        make_client,
        new_agent,
        sessions=SessionManager(SessionLimits(max_messages=2)),
    )
    conn = await connect(server, url, client)
    assert await client.send(conn, "first") == "first"  # request and reply: two messages
    with pytest.raises(PeerError) as failure:
        await client.send(conn, "one too many")
    assert failure.value.code == "session_expired"

    snap = tel.snapshot()
    assert snap.value("sessions_expired") >= 1
    live = server.sessions.active_count + client.sessions.active_count
    assert server.sessions.active_count == 0
    assert snap.value("sessions_active") == live
    spans = tel.spans()
    reasons = [s.attributes["sage.session.end_reason"] for s in named(spans, "sage.session.expire")]
    assert reasons.count("max_messages") == 1  # the server's session, at its limit
    assert len(reasons) == snap.value("sessions_expired")
    assert_refused_by_peer(named(spans, "sage.message.send")[-1], failure.value)

    with pytest.raises(SageError):  # the session is gone on the server
        await client.close(conn)
    snap = tel.snapshot()
    # Both sessions ended exactly once, by expiry or by close.
    assert snap.value("sessions_closed") + snap.value("sessions_expired") == 2
    assert snap.value("sessions_active") == 0


# --- DID registration ----------------------------------------------------------------------


async def test_did_registration_success_and_failure(tel: Captured) -> None:
    registry = InMemoryRegistry()
    solana, ethereum = AgentIdentity.generate(Chain.SOLANA), AgentIdentity.generate(Chain.ETHEREUM)
    for agent in (solana, ethereum):
        document = DIDDocument.for_identity(agent)
        await registry.register(document, sign_registration(agent, document))
    forged = DIDDocument.for_identity(solana, name="forged")
    with pytest.raises(SignatureError):
        await registry.register(forged, bytes(64))

    snap = tel.snapshot()
    assert snap.values("did_registrations") == {
        ("solana", "success"): 1,
        ("ethereum", "success"): 1,
        ("solana", "failure"): 1,
    }
    assert snap.values("crypto_errors") == {("verify",): 1}
    assert snap.value("crypto_operations", operation="verify", algorithm="ed25519") == 2

    spans = tel.spans()
    assert_sage_names(spans)
    registrations = named(spans, "sage.did.register")
    assert len(registrations) == 3
    failed = [s for s in registrations if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert_failed(failed[0], "bad_signature")
    assert failed[0].attributes["sage.did.chain"] == "solana"


# --- every instrument, one full run --------------------------------------------------------


async def test_every_instrument_receives_data_at_its_code_path(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(
        start_server,
        make_client,
        new_agent,
        sessions=SessionManager(SessionLimits(max_messages=8)),
    )
    conn = await connect(server, url, client)
    assert await client.send(conn, "text") == "text"
    assert await client.send(conn, b"\x00binary") == b"\x00binary"
    envelope = client.message_envelope(conn, "replayed")
    await send_envelope(client, conn, envelope)
    with pytest.raises(PeerError):
        await send_envelope(client, conn, envelope)
    with pytest.raises(PeerError):
        await send_envelope(client, conn, tampered_envelope(client, conn))
    mid_run = tel.snapshot()
    assert mid_run.value("sessions_active") == 2

    # The second session is driven past its message limit on the server.
    second = await connect(server, url, client)
    for i in range(4):
        assert await client.send(second, f"m{i}") == f"m{i}"
    with pytest.raises(PeerError):
        await client.send(second, "over the limit")

    stranger = await make_client(chain=Chain.SOLANA, registered=False)
    with pytest.raises(PeerError):
        await connect(server, url, stranger)
    with pytest.raises(SignatureError):
        await InMemoryRegistry().register(DIDDocument.for_identity(client.identity), bytes(64))
    await client.close(conn)

    snap = tel.snapshot()
    for spec in INSTRUMENTS:
        if spec.key == "sessions_active":
            continue  # checked mid-run: an up-down counter may be back at zero
        assert snap.total(spec.key) > 0, f"{spec.name} received no data"
        for point in snap.points(spec.key):
            if spec.kind is Kind.HISTOGRAM:
                assert tuple(point.explicit_bounds) == spec.buckets, spec.key
                assert len(point.bucket_counts) == len(spec.buckets) + 1
                assert sum(point.bucket_counts) == point.count
    assert snap.value("replay_attacks_detected") == 1
    assert snap.value("nonce_validations", status="invalid") == 1
    assert snap.values("crypto_errors") == {("decrypt",): 1, ("verify",): 1}
    assert snap.value("sessions_expired") >= 1
    live = server.sessions.active_count + client.sessions.active_count
    assert snap.value("sessions_active") == live
    assert_sage_names(tel.spans())


# --- crypto detail -------------------------------------------------------------------------


@pytest.mark.parametrize("crypto_detail", ["events", "spans", "none"])
async def test_crypto_detail(
    instrument: Callable[..., Captured],
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
    crypto_detail: str,
) -> None:
    tel = instrument(crypto_detail=crypto_detail)
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    assert await client.send(conn, "detail") == "detail"
    spans = tel.spans()
    assert_sage_names(spans)
    crypto_spans = [s for s in spans if s.name.startswith("sage.crypto.")]
    crypto_events = [
        (span, event)
        for span in spans
        for event in span.events
        if event.name.startswith("sage.crypto.")
    ]
    init = one(spans, "sage.handshake.init")
    if crypto_detail == "events":
        assert not crypto_spans
        names = {event.name for _, event in crypto_events}
        assert names == {f"sage.crypto.{op}" for op in ("sign", "verify", "encrypt", "decrypt")}
        signs = [e for e in init.events if e.name == "sage.crypto.sign"]
        assert len(signs) == 1
        assert signs[0].attributes["sage.crypto.algorithm"] == "secp256k1"
    elif crypto_detail == "spans":
        assert not crypto_events
        assert {s.name for s in crypto_spans} == {
            f"sage.crypto.{op}" for op in ("sign", "verify", "encrypt", "decrypt")
        }
        signs = [s for s in children(spans, init) if s.name == "sage.crypto.sign"]
        assert len(signs) == 1
        assert signs[0].attributes["sage.crypto.algorithm"] == "secp256k1"
        process = one(spans, "sage.handshake.process")
        assert "sage.crypto.verify" in child_names(spans, process)
    else:
        assert not crypto_spans and not crypto_events
    # Metrics do not depend on the level of span detail.
    snap = tel.snapshot()
    assert snap.value("crypto_operations", operation="encrypt", algorithm="chacha20") == 2
    await client.close(conn)


def test_unknown_crypto_detail_warns_and_falls_back(
    instrument: Callable[..., Captured], caplog: pytest.LogCaptureFixture
) -> None:
    """A typo must not raise inside auto-instrumentation: that stops every later instrumentor."""
    with caplog.at_level(logging.WARNING, logger="sage_otel.instrumentation"):
        instrument(crypto_detail="verbose")
    assert SageInstrumentor().is_instrumented_by_opentelemetry
    assert any("'verbose'" in r.getMessage() for r in caplog.records)


def test_sdk_disabled_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    before = [entry[3] for entry in _patched()]
    instrumentor = SageInstrumentor()
    instrumentor.instrument()
    try:
        assert all(a is b for a, b in zip([entry[3] for entry in _patched()], before))
        assert not hasattr(transport.ClientAgent.connect, "__wrapped__")
    finally:
        instrumentor.uninstrument()


# --- instrument / uninstrument -------------------------------------------------------------


def _patched() -> list[tuple[object, str, object, object]]:
    return [
        (owner, name, getattr(owner, name), vars(owner)[name])
        for owner, name, _factory in instrumentation._PATCHES
    ]


def _same(a: object, b: object) -> bool:
    """Identity; for classmethods (bound anew on each access), the same function and class."""
    if inspect.ismethod(a) and inspect.ismethod(b):
        return a.__func__ is b.__func__ and a.__self__ is b.__self__
    return a is b


def _by_name() -> tuple[object, ...]:
    return (
        identity.SigningKey.sign,
        identity.verify_signature,
        session.Session.encrypt,
        session.SessionManager.close,
        message.NonceCache.check,
        did.DIDResolver.resolve,
        did.Registry.register,
        transport.ServerAgent.dispatch,
    )


def test_uninstrument_restores_every_original_exactly() -> None:
    before = _by_name()
    originals = _patched()
    assert len(originals) == len({(id(o), n) for o, n, _, _ in originals})
    instrumentor = SageInstrumentor()
    tp = TracerProvider()
    store = MetricStore()
    for _round in range(2):  # instrument / uninstrument / instrument again
        instrumentor.instrument(tracer_provider=tp, meters=StoreMeters(store))
        try:
            for owner, name, _original, raw in originals:
                assert vars(owner)[name] is not raw, f"{owner}.{name} not patched"
        finally:
            instrumentor.uninstrument()
        for owner, name, original, raw in originals:
            # The very object that was there: the function, or the classmethod descriptor.
            assert vars(owner)[name] is raw, f"{owner}.{name} not restored"
            assert _same(getattr(owner, name), original)
        assert all(_same(a, b) for a, b in zip(before, _by_name()))
    tp.shutdown()


async def test_nothing_is_recorded_after_uninstrument(
    start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    store = MetricStore()
    instrumentor = SageInstrumentor()
    instrumentor.instrument(tracer_provider=tp, meters=StoreMeters(store))
    instrumentor.uninstrument()
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    assert await client.send(conn, "quiet") == "quiet"
    await client.close(conn)
    assert exporter.get_finished_spans() == ()
    for metric in store.metrics():
        for point in metric.data.data_points:
            assert getattr(point, "value", getattr(point, "count", 0)) == 0, metric.name
    tp.shutdown()


# --- suppression, hooks, failing meters ----------------------------------------------------


async def _in_process_workload() -> None:
    registry = InMemoryRegistry()
    alice, bob = AgentIdentity.generate(Chain.ETHEREUM), AgentIdentity.generate(Chain.SOLANA)
    for agent in (alice, bob):
        document = DIDDocument.for_identity(agent)
        await registry.register(document, sign_registration(agent, document))
    alice_sessions, bob_sessions = SessionManager(), SessionManager()
    initiator = Initiator(alice, alice_sessions)
    responder = Responder(bob, DIDResolver(registry), bob_sessions)
    pending = initiator.init(await DIDResolver(registry).resolve(str(bob.did)))
    request = pending.request
    response, bob_session = await responder.process(
        request.init_did, request.payload, request.signature
    )
    alice_session = initiator.finalize(pending, response)
    validator = MessageValidator()
    message = seal(alice_session, "suppressed")
    assert _open_wire(validator, bob_session, message) == "suppressed"
    with pytest.raises(Exception, match="nonce"):
        _open_wire(validator, bob_session, message)
    alice_sessions.close(alice_session.id)
    bob_sessions.close(bob_session.id)


def _all_zero(snap: Snapshot) -> None:
    for spec in INSTRUMENTS:
        for point in snap.points(spec.key):
            if spec.kind is Kind.HISTOGRAM:
                assert point.count == 0, (spec.key, dict(point.attributes))
            else:
                assert point.value == 0, (spec.key, dict(point.attributes))


async def test_suppression_is_honoured(tel: Captured) -> None:
    with suppress_instrumentation():
        await _in_process_workload()
    assert tel.spans() == []
    _all_zero(tel.snapshot())

    # Outside the block the same workload is recorded.
    await _in_process_workload()
    assert tel.spans()
    assert tel.snapshot().value("handshakes_initiated", role="server") == 1


async def test_a_suppressed_client_records_nothing_and_propagates_nothing(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    tel.exporter.clear()
    before = tel.snapshot()
    with suppress_instrumentation():
        conn = await connect(server, url, client)
        assert await client.send(conn, "shh") == "shh"
        await client.close(conn)
    snap = tel.snapshot()
    assert snap.value("handshakes_initiated", role="client") == 0
    assert snap.count("handshake_duration", stage="init") == 0
    assert snap.count("handshake_duration", stage="finalize") == 0
    # The client (Ethereum) signed nothing recorded; the server resolved no one it recorded
    # for the client (the client resolves the Solana server).
    assert snap.value("crypto_operations", operation="sign", algorithm="secp256k1") == (
        before.value("crypto_operations", operation="sign", algorithm="secp256k1")
    )
    assert snap.value("did_resolutions", chain="solana", status="success") == 0
    spans = tel.spans()
    assert not [s for s in spans if s.kind is SpanKind.CLIENT]
    assert not named(spans, "sage.handshake.init") and not named(spans, "sage.message.send")
    # No trace context left the suppressed client: each server span starts its own trace.
    for span in spans:
        if span.kind is SpanKind.SERVER:
            assert span.parent is None, span.name


async def test_a_raising_span_hook_is_logged_and_breaks_nothing(
    instrument: Callable[..., Captured],
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(instrumentation, "_logged", set(), raising=False)
    seen: list[str] = []

    def hook(span: trace.Span, operation: str) -> None:
        seen.append(operation)
        raise RuntimeError("hook failure")

    tel = instrument(span_hook=hook)
    with caplog.at_level(logging.ERROR, logger="sage_otel"):
        server, url, client = await pair(start_server, make_client, new_agent)
        conn = await connect(server, url, client)
        assert await client.send(conn, "hooked") == "hooked"
        await client.close(conn)
    assert "sage.handshake" in seen and "sage.message.send" in seen
    assert any(
        record.name.startswith("sage_otel") and record.levelno >= logging.ERROR
        for record in caplog.records
    ), "the hook's failure is logged"
    assert tel.snapshot().value("handshakes_completed", status="success") == 2
    assert one(tel.spans(), "sage.handshake", SpanKind.CLIENT)


class _Broken:
    def add(self, amount: int = 1, exemplar: Any = None) -> None:
        raise RuntimeError("meter down")

    def record(self, value: float, exemplar: Any = None) -> None:
        raise RuntimeError("meter down")


class RaisingMeters:
    """A ``meters`` whose every bound handle raises."""

    def counter(self, key: str, **labels: str) -> _Broken:
        return _Broken()

    def histogram(self, key: str, **labels: str) -> _Broken:
        return _Broken()


async def test_raising_meters_never_break_a_sage_call(
    instrument: Callable[..., Captured],
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(instrumentation, "_logged", set(), raising=False)
    tel = instrument(meters=RaisingMeters())
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    assert await client.send(conn, "still works") == "still works"
    blob = bytes(range(200))
    assert await client.send(conn, blob) == blob
    envelope = client.message_envelope(conn, "again")
    await send_envelope(client, conn, envelope)
    with pytest.raises(PeerError) as failure:  # the SAGE error, not the meter's
        await send_envelope(client, conn, envelope)
    assert failure.value.code == "replay_detected"
    with pytest.raises(PeerError) as failure:
        await send_envelope(client, conn, tampered_envelope(client, conn))
    assert failure.value.code == "decrypt_failed"
    await client.close(conn)
    assert server.sessions.active_count == 0 and client.sessions.active_count == 0
    # Failed handshakes and registrations still raise their own errors.
    stranger = await make_client(registered=False)
    with pytest.raises(PeerError) as failure:
        await connect(server, url, stranger)
    assert failure.value.code == "unknown_did"
    with pytest.raises(SignatureError):
        await InMemoryRegistry().register(DIDDocument.for_identity(client.identity), bytes(64))
    assert tel.spans(), "tracing goes on without metrics"


# --- exemplars and sampling ----------------------------------------------------------------


async def _exchange(
    start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    conn = await connect(server, url, client)
    assert await client.send(conn, "exemplary") == "exemplary"
    assert await client.send(conn, b"bytes") == b"bytes"
    await client.close(conn)


async def test_exemplars_name_exported_spans(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    await _exchange(start_server, make_client, new_agent)
    snap = tel.snapshot()
    exported = {(s.context.trace_id, s.context.span_id) for s in tel.spans()}
    histogram_exemplars = [
        (spec.key, exemplar)
        for spec in INSTRUMENTS
        if spec.kind is Kind.HISTOGRAM
        for point in snap.points(spec.key)
        for exemplar in point.exemplars
    ]
    keys_with_exemplars = {key for key, _ in histogram_exemplars}
    assert {
        "handshake_duration",
        "message_processing_duration",
        "message_size",
        "session_duration",
    } <= keys_with_exemplars
    for key, exemplar in histogram_exemplars:
        assert (exemplar.trace_id, exemplar.span_id) in exported, key
    for exemplar in snap.exemplars():
        assert (exemplar.trace_id, exemplar.span_id) in exported
    # The processing-duration exemplars point at processing spans.
    names = {(s.context.trace_id, s.context.span_id): s.name for s in tel.spans()}
    for exemplar in snap.point("message_processing_duration").exemplars:
        assert names[exemplar.trace_id, exemplar.span_id] == "sage.message.process"


async def test_no_exemplar_carries_a_trace_when_nothing_is_sampled(
    instrument: Callable[..., Captured],
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
) -> None:
    tel = instrument(sampler=ALWAYS_OFF)
    await _exchange(start_server, make_client, new_agent)
    assert tel.spans() == []
    snap = tel.snapshot()
    assert snap.value("handshakes_completed", status="success") == 2
    assert snap.point("message_size").count == 2 * 2 + 1  # messages, replies, the close
    assert all(not exemplar.trace_id for exemplar in snap.exemplars())


async def test_noop_tracer_provider_starts_no_span_but_records_metrics(
    instrument: Callable[..., Captured],
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[str] = []
    for method in ("start_span", "start_as_current_span"):
        original = getattr(trace.NoOpTracer, method)

        def spy(self: Any, name: str, *args: Any, _original: Any = original, **kwargs: Any):
            started.append(name)
            return _original(self, name, *args, **kwargs)

        monkeypatch.setattr(trace.NoOpTracer, method, spy)
    hooked: list[str] = []
    tel = instrument(
        tracer_provider=trace.NoOpTracerProvider(),
        span_hook=lambda span, operation: hooked.append(operation),
        crypto_detail="spans",
    )
    await _exchange(start_server, make_client, new_agent)
    assert started == [] and hooked == []
    assert tel.spans() == []
    snap = tel.snapshot()
    assert snap.value("handshakes_initiated", role="client") == 1
    assert snap.value("handshakes_completed", status="success") == 2
    assert snap.values("messages_processed") == {("text", "success"): 3, ("binary", "success"): 2}
    assert snap.value("sessions_closed") == 2 and snap.value("sessions_active") == 0
    assert all(not exemplar.trace_id for exemplar in snap.exemplars())


# --- the go peer profile, P-256 and reference-shaped refusals --------------------------------


async def test_go_profile_exchange_is_counted_and_traced(tel: Captured, go_link) -> None:
    _server, client, conn = go_link
    assert await client.send(conn, "ping") is None
    assert await client.receive(conn, timeout=5) == b"ping"  # the server's echo, POSTed back
    snap = tel.snapshot()
    # Opened once by the server (the ping) and once by the client's listener (the echo).
    assert snap.value("messages_processed", type="binary", status="success") == 2
    assert snap.total("messages_processed") == 2
    for _ in range(100):  # the echo's send span ends when the client's listener answers
        if len(named(tel.spans(), "sage.message.send")) == 2:
            break
        await asyncio.sleep(0.01)
    spans = tel.spans()
    client_span = one(spans, "sage.handshake", SpanKind.CLIENT)
    assert client_span.attributes["sage.peer.profile"] == "go"
    assert one(spans, "sage.handshake.process").attributes["sage.peer.profile"] == "go"
    sends = named(spans, "sage.message.send")
    receives = named(spans, "sage.message.receive")
    assert len(sends) == len(receives) == 2  # the ping and the echo, each sent and received
    # Each POST carries its trace: every receive continues one send's trace.
    assert {s.context.trace_id for s in receives} == {s.context.trace_id for s in sends}
    assert_sage_names(spans)


async def test_native_handshake_span_names_its_profile(
    tel: Captured, start_server, make_client, new_agent
) -> None:
    server, url, client = await pair(start_server, make_client, new_agent)
    await connect(server, url, client)
    spans = tel.spans()
    assert one(spans, "sage.handshake", SpanKind.CLIENT).attributes["sage.peer.profile"] == "native"
    assert one(spans, "sage.handshake.process").attributes["sage.peer.profile"] == "native"


def test_p256_and_key_proofs_are_counted_by_algorithm(tel: Captured) -> None:
    from sage_otel.agent.identity import KeyType, SigningKey
    from sage_otel.agent.proofs import prove_possession, verify_possession

    p256 = SigningKey.generate(KeyType.P256)
    identity.verify_signature(KeyType.P256, p256.public_bytes(), b"x", p256.sign(b"x"))
    secp = SigningKey.generate(KeyType.SECP256K1)
    proof = prove_possession(secp, "did:sage:eth:agent-one")
    verify_possession(KeyType.SECP256K1, secp.key_data(), "did:sage:eth:agent-one", proof)
    snap = tel.snapshot()
    assert snap.value("crypto_operations", operation="sign", algorithm="p256") == 1
    assert snap.value("crypto_operations", operation="verify", algorithm="p256") == 1
    assert snap.value("crypto_operations", operation="sign", algorithm="secp256k1") == 1
    assert snap.value("crypto_operations", operation="verify", algorithm="secp256k1") == 1
    assert snap.value("crypto_operations", operation="verify", algorithm=OTHER) == 0


async def test_a_reference_shaped_refusal_counts_as_its_bounded_category(
    tel: Captured, make_client, new_agent
) -> None:
    import httpx

    server_identity = await new_agent(Chain.SOLANA)
    body = (
        b'{"success":false,"message_id":"m","task_id":"hpke/complete@v1",'
        b'"error":"replay detected"}\n'
    )
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    )
    client = await make_client(http=http)
    with pytest.raises(PeerError) as info:
        await client.connect("http://peer.test", str(server_identity.did))
    assert info.value.code == "handshake_replay"
    snap = tel.snapshot()
    assert snap.value("handshakes_failed", error_type="replay") == 1
    assert snap.value("handshakes_completed", status="failure") == 1
    span = one(tel.spans(), "sage.handshake", SpanKind.CLIENT)
    assert_refused_by_peer(span, info.value)
    assert span.attributes["error.type"] == "peer_replay"
    assert "replay detected" not in str(dict(span.attributes))  # peer text never exported


async def test_every_refusal_is_counted_by_category(
    tel: Captured, start_server: StartServer, make_client: MakeClient
) -> None:
    import httpx

    server, url = await start_server(handshake_rate="1/minute")
    client = await make_client()
    await client.connect(url, str(server.identity.did))
    with pytest.raises(PeerError):
        await client.connect(url, str(server.identity.did))  # overload: rate limited
    async with httpx.AsyncClient() as http:
        await http.get(url + "/messages")  # invalid: method not allowed
        await http.post(url + "/messages", content=b"{")  # invalid: not JSON content type
        await http.post(url + "/elsewhere", content=b"{}")  # invalid: not found
    snap = tel.snapshot()
    assert snap.value("requests_refused", category="overload") == 1
    assert snap.value("requests_refused", category="invalid") == 3
    assert snap.total("requests_refused") == 4


async def test_refusals_at_the_http_edge_are_counted_too(
    tel: Captured, start_server: StartServer
) -> None:
    """Malformed HTTP and oversized headers never reach the app; they count all the same."""
    _server, url = await start_server()
    host, port = url.removeprefix("http://").split(":")
    for request in (
        b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        answer = await reader.read()
        writer.close()
        assert answer.split(b" ", 2)[1] in (b"400", b"431")
    assert tel.snapshot().value("requests_refused", category="invalid") == 2


# --- what the SLOs count ---------------------------------------------------------------------


async def test_server_requests_say_whose_outcome_it_is(
    tel: Captured, start_server: StartServer, make_client: MakeClient
) -> None:
    """Served, refused (the request's doing: a replay, over its own peer's rate) or failed
    (the server's capacity): only ``failed`` counts against the SLOs, so no peer can burn
    them by misbehaving."""
    server, url = await start_server(handshake_rate="1/minute")
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    envelope = client.message_envelope(conn, "once")
    assert await send_envelope(client, conn, envelope) == "once"
    with pytest.raises(PeerError):
        await send_envelope(client, conn, envelope)  # replayed: the request's own doing
    with pytest.raises(PeerError) as limited:
        await client.connect(url, str(server.identity.did))  # over this peer's own rate
    assert limited.value.http_status == 429
    snap = tel.snapshot()
    assert snap.value("server_requests", operation="handshake", outcome="served") == 1
    assert snap.value("server_requests", operation="handshake", outcome="refused") == 1
    assert snap.value("server_requests", operation="message", outcome="served") == 1
    assert snap.value("server_requests", operation="message", outcome="refused") == 1
    assert snap.total("server_requests") == 4  # nothing failed


async def test_a_full_session_table_is_the_servers_failure(
    tel: Captured, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url, client = await pair(
        start_server, make_client, new_agent, sessions=SessionManager(max_sessions=0)
    )
    with pytest.raises(PeerError):
        await connect(server, url, client)
    snap = tel.snapshot()
    assert snap.value("server_requests", operation="handshake", outcome="failed") == 1
    assert snap.total("server_requests") == 1


@pytest.mark.parametrize(
    ("error", "servers"),
    [
        (errors.OverloadError("full"), True),
        (errors.OverloadError("x", code="global_handshake_rate"), True),  # established: 503
        (errors.OverloadError("x", code="session_capacity"), True),
        (errors.OverloadError("x", code="push_backlog"), True),
        (errors.RateLimitedError("x", code="global_handshake_rate"), False),  # newcomers' half
        (errors.RateLimitedError("x", code="session_capacity"), False),  # holds its share
        (errors.RateLimitedError("x", code="push_backlog"), False),  # its endpoint's share
        (errors.RateLimitedError("x", code="new_peer_share"), False),
        (errors.RateLimitedError("x", code="rate_limited"), False),
        (errors.RateLimitedError("x", code="peer_session_limit"), False),
        (errors.RateLimitedError("x", code="inbox_full"), False),
        (errors.InternalError("defect"), True),
        (errors.HandshakeTimeoutError("slow resolver"), True),
        (errors.NetworkError("push failed"), True),
        (errors.RequestTimeoutError("a slow client"), False),
        (RuntimeError("a defect"), True),
        (errors.InvalidMessageError("bad"), False),
        (errors.SignatureError("forged"), False),
        (errors.ReplayError("again"), False),
        (errors.SessionExpiredError("old"), False),
        (errors.UnknownDIDError("who"), False),
        (errors.CryptoError("tampered"), False),
    ],
)
def test_server_fault_blames_the_server_only_for_its_own_failures(
    error: BaseException, servers: bool
) -> None:
    assert errors.server_fault(error) is servers
