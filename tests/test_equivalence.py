"""Every way of recording exports the same metrics.

One deterministic in-process workload (registrations, a handshake through Initiator and
Responder, messages both ways through ``seal`` and ``MessageValidator.open``, a replay, a
tampered message, an unknown DID, a close and an expiry) is run under each variant:

* ``store``: ``StoreMeters``, the store attached to an ``InMemoryMetricReader``, no tracing;
* ``api``: ``ApiMeters`` on a private SDK ``MeterProvider`` with an ``InMemoryMetricReader``;
* ``store+traces`` and ``api+traces``: the same with every span sampled.

All variants must export the same metric names, units, descriptions, types, label sets,
counter values, histogram counts and bucket boundaries. Durations differ from run to run, so
time histograms are compared by count; size histograms are deterministic and compared whole.
The OTel API cannot create an empty histogram series, so for histograms the API variant is
compared on the series that have data, and the store must have the others, empty.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    InMemoryMetricReader,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.errors import CryptoError, ReplayError, SignatureError, UnknownDIDError
from sage_otel.agent.handshake import Initiator, Responder
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.message import MessageValidator, SecureMessage, seal, signature_base
from sage_otel.agent.session import Session, SessionManager
from sage_otel.instrumentation import SageInstrumentor
from sage_otel.telemetry.catalog import INSTRUMENTS, OTHER, Kind
from sage_otel.telemetry.meters import ApiMeters, StoreMeters
from sage_otel.telemetry.store import MetricStore

RESOURCE = Resource.create({"service.name": "sage-otel-equivalence"})
SCOPE = "sage_otel"
ROUNDS = 4
# Fixed payloads: sizes (and so the size histograms) are identical in every run.
OUTBOUND: tuple[str | bytes, ...] = ("hello", bytes(range(256)) * 3, "é" * 300, b"\x00" * 5000)
INBOUND: tuple[str | bytes, ...] = ("ok", b"\xff" * 70, "reply " * 50, bytes(100_000))
SIZE_UNITS = {"By"}


def _open_wire(validator, session, message, **kwargs):
    """Deliver a sealed message the way a transport does: in its wire form."""
    wire = message.to_wire()
    return validator.open_wire(session, wire["payload"], wire["metadata"], **kwargs)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def _register(registry: InMemoryRegistry, agent: AgentIdentity) -> DIDDocument:
    document = DIDDocument.for_identity(agent)
    await registry.register(document, sign_registration(agent, document))
    return document


async def _handshake(
    initiator: Initiator, responder: Responder, resolver: DIDResolver, peer_did: str
) -> tuple[Session, Session]:
    pending = initiator.init(await resolver.resolve(peer_did))
    request = pending.request
    response, responder_session = await responder.process(
        request.init_did, request.payload, request.signature
    )
    return initiator.finalize(pending, response), responder_session


def _tampered(session: Session) -> SecureMessage:
    message = seal(session, "to be corrupted")
    corrupt = bytearray(message.ciphertext)
    corrupt[0] ^= 0x80
    unsigned = dataclasses.replace(message, ciphertext=bytes(corrupt), signature=b"")
    return dataclasses.replace(
        unsigned, signature=session.sign(signature_base(unsigned, "POST", "/messages"))
    )


async def workload() -> None:
    """The fixed sequence of SAGE operations every variant records."""
    registry = InMemoryRegistry()
    alice = AgentIdentity.generate(Chain.ETHEREUM)
    bob = AgentIdentity.generate(Chain.SOLANA)
    carol = AgentIdentity.generate(Chain.SOLANA)  # never registered
    await _register(registry, alice)
    bob_document = await _register(registry, bob)
    with pytest.raises(SignatureError):
        await registry.register(DIDDocument.for_identity(carol), bytes(64))

    clock = Clock()
    alice_sessions, bob_sessions = SessionManager(), SessionManager(clock=clock)
    initiator = Initiator(alice, alice_sessions)
    responder = Responder(bob, DIDResolver(registry), bob_sessions)
    resolver = DIDResolver(registry)
    alice_session, bob_session = await _handshake(initiator, responder, resolver, str(bob.did))

    alice_validator, bob_validator = MessageValidator(), MessageValidator()
    sent: list[SecureMessage] = []
    for i in range(ROUNDS):
        message = seal(alice_session, OUTBOUND[i])
        sent.append(message)
        assert _open_wire(bob_validator, bob_session, message) == OUTBOUND[i]
        reply = seal(bob_session, INBOUND[i], method="RESPONSE")
        assert _open_wire(alice_validator, alice_session, reply, method="RESPONSE") == INBOUND[i]

    with pytest.raises(ReplayError):
        _open_wire(bob_validator, bob_session, sent[1])
    with pytest.raises(CryptoError):
        _open_wire(bob_validator, bob_session, _tampered(alice_session))

    stranger = Initiator(carol, SessionManager()).init(bob_document)
    with pytest.raises(UnknownDIDError):
        await responder.process(
            stranger.request.init_did, stranger.request.payload, stranger.request.signature
        )

    assert alice_sessions.close(alice_session.id) and bob_sessions.close(bob_session.id)

    # A second session outlives its idle timeout on the responder's side.
    alice_second, _ = await _handshake(initiator, responder, resolver, str(bob.did))
    clock.now += bob_sessions.limits.idle_timeout + 1
    assert bob_sessions.sweep() == 1
    assert alice_sessions.close(alice_second.id)


# --- variants ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    data: MetricsData
    spans: int


VARIANTS = {  # name: (meters, traced)
    "store": ("store", False),
    "api": ("api", False),
    "store+traces": ("store", True),
    "api+traces": ("api", True),
}


async def run_variant(meters_kind: str, traced: bool) -> Run:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    if meters_kind == "store":
        store = MetricStore()
        store.attach(reader, RESOURCE)
        meters: Any = StoreMeters(store)
    else:
        meters = ApiMeters(meter_provider)
    exporter = InMemorySpanExporter()
    tracer_provider: Any = trace.NoOpTracerProvider()
    if traced:
        tracer_provider = TracerProvider(resource=RESOURCE, sampler=ALWAYS_ON)
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = SageInstrumentor()
    assert not instrumentor.is_instrumented_by_opentelemetry
    instrumentor.instrument(tracer_provider=tracer_provider, meters=meters)
    try:
        await workload()
    finally:
        instrumentor.uninstrument()
    try:
        return Run(reader.get_metrics_data(), len(exporter.get_finished_spans()))
    finally:
        meter_provider.shutdown()
        if traced:
            tracer_provider.shutdown()


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    """Every variant, one after the other, on the same workload."""

    async def all_variants() -> dict[str, Run]:
        return {name: await run_variant(*how) for name, how in VARIANTS.items()}

    return asyncio.run(all_variants())


# --- what is compared ----------------------------------------------------------------------


def _sage_metrics(data: MetricsData) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != SCOPE:
                continue
            for metric in scope_metrics.metrics:
                assert metric.name not in found, f"{metric.name} exported twice"
                found[metric.name] = metric
    return found


def _labels(point: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(point.attributes.items()))


def _series(metric: Any) -> dict[tuple[tuple[str, str], ...], tuple[Any, ...]]:
    """What must match, per label set; durations are compared by count only."""
    out = {}
    for point in metric.data.data_points:
        if isinstance(metric.data, Histogram):
            shape: tuple[Any, ...] = (point.count, tuple(point.explicit_bounds))
            if metric.unit in SIZE_UNITS:
                shape += (point.sum, tuple(point.bucket_counts))
                if point.count:
                    shape += (point.min, point.max)
        else:
            shape = (point.value,)
        assert _labels(point) not in out, f"{metric.name}: duplicate series {_labels(point)}"
        out[_labels(point)] = shape
    return out


def _header(metric: Any) -> tuple[Any, ...]:
    data = metric.data
    kind = type(data).__name__
    monotonic = getattr(data, "is_monotonic", None)
    return (metric.unit, metric.description, kind, monotonic, data.aggregation_temporality)


def test_the_workload_was_recorded_and_traced(runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        metrics = _sage_metrics(run.data)
        assert set(metrics) == {spec.name for spec in INSTRUMENTS}, name
        assert (run.spans > 0) is VARIANTS[name][1], name
        for metric in metrics.values():
            assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    store = _sage_metrics(runs["store"].data)
    by_key = {spec.key: store[spec.name] for spec in INSTRUMENTS}

    def value(key: str, **labels: str) -> int:
        points = [p for p in by_key[key].data.data_points if dict(p.attributes) == labels]
        assert len(points) == 1, (key, labels)
        point = points[0]
        return point.count if isinstance(by_key[key].data, Histogram) else point.value

    # Spot checks that the workload did what it says, so the comparison is not vacuous.
    assert value("handshakes_initiated", role="client") == 3  # alice twice, carol once
    assert value("handshakes_initiated", role="server") == 3
    assert value("handshakes_failed", error_type="unknown_did") == 1
    assert value("sessions_created", status="success") == 4
    assert value("sessions_closed") == 3 and value("sessions_expired") == 1
    assert value("sessions_active") == 0
    assert value("replay_attacks_detected") == 1
    assert value("nonce_validations", status="invalid") == 1
    assert value("crypto_errors", operation="decrypt") == 1
    assert value("crypto_errors", operation="verify") == 1
    assert value("messages_processed", type="binary", status="success") == 4
    assert value("messages_processed", type="text", status="success") == 4
    assert value("messages_processed", type="binary", status="failure") == 1  # the replay
    assert value("messages_processed", type="text", status="failure") == 1  # the tampered one
    assert value("did_registrations", chain="solana", status="failure") == 1


OTHERS = ["api", "store+traces", "api+traces"]


def _differences(ours: dict, theirs: dict) -> dict[str, Any]:
    return {
        "only in store": sorted(ours.keys() - theirs.keys()),
        "only in variant": sorted(theirs.keys() - ours.keys()),
        "different": {
            k: (ours[k], theirs[k]) for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]
        },
    }


@pytest.mark.parametrize("variant", OTHERS)
def test_same_names_units_descriptions_and_types(runs: dict[str, Run], variant: str) -> None:
    expected = _sage_metrics(runs["store"].data)
    actual = _sage_metrics(runs[variant].data)
    assert sorted(actual) == sorted(expected)
    for name, metric in expected.items():
        assert _header(actual[name]) == _header(metric), name


@pytest.mark.parametrize("variant", OTHERS)
def test_same_counter_series_and_values(runs: dict[str, Run], variant: str) -> None:
    """Counters and up-down counters: the same label sets (zeros included), the same values."""
    expected = _sage_metrics(runs["store"].data)
    actual = _sage_metrics(runs[variant].data)
    diverging = {}
    for spec in INSTRUMENTS:
        if spec.kind is Kind.HISTOGRAM:
            continue
        assert isinstance(actual[spec.name].data, Sum), (variant, spec.key)
        ours, theirs = _series(expected[spec.name]), _series(actual[spec.name])
        if ours != theirs:
            diverging[spec.name] = _differences(ours, theirs)
        enumerated = {tuple(sorted(labels.items())) for labels in spec.label_sets()}
        assert enumerated <= set(theirs), (variant, spec.key, "enumerated series missing")
        for labels in set(theirs) - enumerated:
            assert OTHER in dict(labels).values(), (variant, spec.key, labels)
    assert diverging == {}, f"{variant} exports other counter series than the store"


@pytest.mark.parametrize("variant", OTHERS)
def test_same_histogram_series_counts_and_buckets(runs: dict[str, Run], variant: str) -> None:
    """Counts and bounds for every histogram; sums and bucket counts for the size ones.

    The OTel API cannot pre-create an empty histogram series, so the API variants are compared
    on the series that have data, and the store must hold the others, empty.
    """
    expected = _sage_metrics(runs["store"].data)
    actual = _sage_metrics(runs[variant].data)
    api = variant.startswith("api")
    diverging = {}
    for spec in INSTRUMENTS:
        if spec.kind is not Kind.HISTOGRAM:
            continue
        ours, theirs = _series(expected[spec.name]), _series(actual[spec.name])
        if api:
            empty = {labels for labels, shape in ours.items() if shape[0] == 0}
            assert not empty & theirs.keys(), (variant, spec.key, "an empty API series")
            ours = {labels: shape for labels, shape in ours.items() if labels not in empty}
        if ours != theirs:
            diverging[spec.name] = _differences(ours, theirs)
    assert diverging == {}, f"{variant} exports other histogram data than the store"


def test_store_holds_every_enumerated_histogram_series(runs: dict[str, Run]) -> None:
    store = _sage_metrics(runs["store"].data)
    api = _sage_metrics(runs["api"].data)
    for spec in INSTRUMENTS:
        if spec.kind is not Kind.HISTOGRAM:
            continue
        enumerated = {tuple(sorted(labels.items())) for labels in spec.label_sets()}
        store_series = _series(store[spec.name])
        assert enumerated <= set(store_series), spec.key
        assert set(_series(api[spec.name])) <= set(store_series), spec.key
        for point in store[spec.name].data.data_points:
            assert tuple(point.explicit_bounds) == spec.buckets, spec.key
        for point in api[spec.name].data.data_points:
            assert tuple(point.explicit_bounds) == spec.buckets, spec.key
            assert point.count > 0, "the API path only has series with data"
