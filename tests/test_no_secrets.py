"""No exported telemetry of a run contains any of that run's secrets, in any encoding.

A real loopback exchange (handshake, text and binary messages, a replay, a tampered message,
an unknown DID, a close) runs under ``sage_otel.configure()`` with spans captured in memory
(crypto detail as child spans, and as span events), metrics read through an
``InMemoryMetricReader`` (exemplars included) and /metrics scraped over HTTP in both the
plain text and the OpenMetrics format. Every secret of the run is captured as it is made:
identity and KEM private keys, HPKE and ephemeral private keys and shared secrets, exporter
secrets, session seeds and directional keys, plaintexts, message and AEAD nonces and the
handshake nonce. None may appear in any span name, attribute, event, status, resource,
metric data point, exemplar or exposition line: raw, hex (both cases), or base64 (standard
and URL-safe, padded or not). Metric labels must be the catalog's closed values or
``other``: never a DID or a session id.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets as random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import coincurve
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from sage_otel.agent import handshake, hpke, server_agent
from sage_otel.agent import session as session_module
from sage_otel.agent.errors import PeerError
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.message import signature_base
from sage_otel.agent.session import Session
from sage_otel.agent.transport import MESSAGE_TASK, MESSAGES_PATH, ClientAgent, ServerAgent
from sage_otel.telemetry import setup
from sage_otel.telemetry.catalog import BY_PROMETHEUS_NAME, INSTRUMENTS, OTHER

StartServer = Callable[..., Awaitable[tuple[ServerAgent, str]]]
MakeClient = Callable[..., Awaitable[ClientAgent]]
NewAgent = Callable[..., Awaitable[AgentIdentity]]

SCOPE = "sage_otel"
MIN_SECRET = 8  # shorter values could match by chance and none of the secrets is that short
ALLOWED = {
    spec.name: {label.key: {*label.values, OTHER} for label in spec.labels} for spec in INSTRUMENTS
}


# --- the run's secrets ---------------------------------------------------------------------


@dataclasses.dataclass
class Secrets:
    values: dict[bytes, str] = dataclasses.field(default_factory=dict)  # secret -> what
    texts: dict[str, str] = dataclasses.field(default_factory=dict)  # text secret -> what
    session_ids: set[str] = dataclasses.field(default_factory=set)
    dids: set[str] = dataclasses.field(default_factory=set)

    def add(self, what: str, value: bytes | bytearray | str) -> None:
        if isinstance(value, str):
            self.texts[value] = what
            value = value.encode()
        value = bytes(value)
        assert len(value) >= MIN_SECRET, (what, len(value))
        self.values.setdefault(value, what)

    def kinds(self) -> set[str]:
        return set(self.values.values())

    def identity(self, agent: AgentIdentity) -> None:
        """An agent's long-term private keys, in their raw forms."""
        self.dids.add(str(agent.did))
        private = agent.signing_key._private
        if isinstance(private, ed25519.Ed25519PrivateKey):
            raw = private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            self.add("ed25519 identity private key", raw)
        else:
            assert isinstance(private, coincurve.PrivateKey)
            self.add("secp256k1 identity private key", private.secret)
            self.add("secp256k1 identity private key (DER)", private.to_der())
        self.add("KEM private key", agent.kem.private)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Secrets:
    """Wrap the places secrets are made, before the instrumentation wraps anything."""
    found = Secrets()

    combine_seed = handshake.combine_seed

    def seed_spy(exporter: bytes, ss_e2e: bytes, export_ctx: bytes) -> bytes:
        seed = combine_seed(exporter, ss_e2e, export_ctx)
        found.add("HPKE exported secret", exporter)
        found.add("X25519 end-to-end shared secret", ss_e2e)
        found.add("session seed", seed)
        return seed

    monkeypatch.setattr(handshake, "combine_seed", seed_spy)

    directional_keys = session_module.directional_keys

    def keys_spy(seed: bytes, session_id: str) -> Any:
        keys = directional_keys(seed, session_id)
        found.session_ids.add(session_id)
        for field in dataclasses.fields(keys):
            found.add(f"session key {field.name}", getattr(keys, field.name))
        return keys

    monkeypatch.setattr(session_module, "directional_keys", keys_spy)

    public_bytes = hpke.public_bytes

    def ephemeral_spy(private: Any) -> bytes:
        found.add("ephemeral X25519 private key", hpke.private_bytes(private))
        return public_bytes(private)

    monkeypatch.setattr(hpke, "public_bytes", ephemeral_spy)

    dh = hpke._dh

    def dh_spy(private: Any, public: Any) -> bytes:
        found.add("HPKE private key", hpke.private_bytes(private))
        shared = dh(private, public)
        found.add("HPKE DH output", shared)
        return shared

    monkeypatch.setattr(hpke, "_dh", dh_spy)

    key_schedule = hpke._key_schedule

    def schedule_spy(shared_secret: bytes, info: bytes, *, is_sender: bool) -> Any:
        context = key_schedule(shared_secret, info, is_sender=is_sender)
        found.add("HPKE shared secret", shared_secret)
        found.add("HPKE exporter secret", context._exporter_secret)
        found.add("HPKE base nonce", context._base_nonce)
        return context

    monkeypatch.setattr(hpke, "_key_schedule", schedule_spy)

    init = handshake.Initiator.init

    def init_spy(
        self: handshake.Initiator, peer: Any, ctx_id: str | None = None, **kwargs: Any
    ) -> Any:
        pending = init(self, peer, ctx_id, **kwargs)
        found.add("handshake nonce", pending.fields["nonce"].encode())
        found.add("initiator ephemeral private key", hpke.private_bytes(pending.eph_c_private))
        found.add("initiator exported secret", pending.exporter)
        return pending

    monkeypatch.setattr(handshake.Initiator, "init", init_spy)

    seal = server_agent.seal

    def seal_spy(session: Session, data: str | bytes, **kwargs: Any) -> Any:
        message = seal(session, data, **kwargs)
        found.add("message nonce", message.nonce)
        found.add("AEAD nonce", message.ciphertext[: session_module.AEAD_NONCE_SIZE])
        if data:
            found.add("plaintext", data)
        return message

    monkeypatch.setattr(server_agent, "seal", seal_spy)
    return found


# --- telemetry under test ------------------------------------------------------------------


@dataclasses.dataclass
class Telemetry:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    configured: Any

    def scrape(self, openmetrics: bool) -> str:
        host, port = self.configured.metrics_address
        accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
        answer = httpx.get(f"http://{host}:{port}/metrics", headers={"Accept": accept})
        answer.raise_for_status()
        kind = answer.headers["content-type"]
        assert ("openmetrics" in kind) is openmetrics, kind
        return answer.text


@pytest.fixture(params=["spans", "events"])
def telemetry(request: pytest.FixtureRequest, captured: Secrets) -> Iterator[Telemetry]:
    assert setup.current() is None, "configure() already owned by someone else"
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    configured = setup.configure(
        service_name="sage-no-secrets",
        metrics_port=0,
        set_global=False,
        otlp=False,
        span_processors=[SimpleSpanProcessor(spans)],
        metric_readers=[reader],
        crypto_detail=request.param,
    )
    try:
        yield Telemetry(spans, reader, configured)
    finally:
        configured.shutdown()


# --- the run -------------------------------------------------------------------------------


def _plaintexts() -> list[str | bytes]:
    return [
        "text-" + random.token_urlsafe(24),
        os.urandom(48),
        "text-" + random.token_hex(40) + " ünïcödé",
        os.urandom(3000),
    ]


def _reply(session: Session, data: str | bytes) -> str | bytes:
    return "reply-" + random.token_urlsafe(24) if isinstance(data, str) else os.urandom(64)


def _tampered_envelope(client: ClientAgent, session: Session) -> dict[str, Any]:
    message = server_agent.seal(session, "tamper-" + random.token_urlsafe(24))
    corrupt = bytearray(message.ciphertext)
    corrupt[-1] ^= 0x01
    unsigned = dataclasses.replace(message, ciphertext=bytes(corrupt), signature=b"")
    signature = session.sign(signature_base(unsigned, "POST", MESSAGES_PATH))
    wire = dataclasses.replace(unsigned, signature=signature).to_wire()
    return client.envelope(MESSAGE_TASK, session.id, wire["payload"], metadata=wire["metadata"])


async def _exchange(
    captured: Secrets, start_server: StartServer, make_client: MakeClient, new_agent: NewAgent
) -> None:
    server, url = await start_server(await new_agent(Chain.SOLANA), handler=_reply)
    client = await make_client(chain=Chain.ETHEREUM)
    stranger = await make_client(chain=Chain.SOLANA, registered=False)
    for agent in (server.identity, client.identity, stranger.identity):
        captured.identity(agent)

    conn = await client.connect(url, str(server.identity.did))
    for data in _plaintexts():
        reply = await client.send(conn, data)
        assert type(reply) is type(data)
        captured.add("reply plaintext", reply)
    # Error paths: a replayed message, a tampered one, an unknown DID.
    envelope = client.message_envelope(conn, "replay-" + random.token_urlsafe(24))
    await client.post(url, envelope)
    with pytest.raises(PeerError, match="nonce"):
        await client.post(url, envelope)
    with pytest.raises(PeerError):
        await client.post(url, _tampered_envelope(client, conn.session))
    with pytest.raises(PeerError):
        await stranger.connect(url, str(server.identity.did))

    # The live sessions' key material, read directly as a cross-check of the capture.
    server_session = server.sessions.get(conn.session.id)
    for session in (conn.session, server_session):
        for secret in session._secrets:
            assert bytes(secret) in captured.values, "directional key capture missed a key"
    await client.close(conn)
    assert conn.session.closed and server_session.closed


# --- what is exported ----------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    """Every string inside an attribute value, bytes decoded both ways."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray)):
        yield bytes(value).decode("latin-1")
        yield bytes(value).hex()
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    else:
        yield repr(value)


def _span_texts(spans: list[ReadableSpan]) -> Iterator[str]:
    for span in spans:
        yield span.to_json(indent=None)
        yield span.name
        yield from _strings(dict(span.attributes or {}))
        yield from _strings(dict(span.resource.attributes))
        if span.status.description:
            yield span.status.description
        for event in span.events:
            yield event.name
            yield from _strings(dict(event.attributes or {}))
        for link in span.links:
            yield from _strings(dict(link.attributes or {}))


def _metric_texts(data: MetricsData) -> Iterator[str]:
    yield data.to_json(indent=None)
    for resource_metrics in data.resource_metrics:
        yield from _strings(dict(resource_metrics.resource.attributes))
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                yield metric.name
                yield metric.description or ""
                yield metric.unit or ""
                for point in metric.data.data_points:
                    yield from _strings(dict(point.attributes or {}))
                    for exemplar in point.exemplars or ():
                        yield from _strings(dict(exemplar.filtered_attributes or {}))
                        yield repr(exemplar)


def _encodings(secret: bytes) -> set[str]:
    standard = base64.b64encode(secret).decode()
    urlsafe = base64.urlsafe_b64encode(secret).decode()
    forms = {
        secret.decode("latin-1"),
        secret.hex(),
        secret.hex().upper(),
        standard,
        standard.rstrip("="),
        urlsafe,
        urlsafe.rstrip("="),
    }
    return {form for form in forms if len(form) >= MIN_SECRET}


def _leaks(secrets: Secrets, haystack: str) -> list[str]:
    leaks = []
    for secret, what in secrets.values.items():
        for form in _encodings(secret):
            if form in haystack:
                leaks.append(f"{what} ({form[:16]}...)")
    for text, what in secrets.texts.items():
        if text in haystack:
            leaks.append(f"{what} (text)")
    return leaks


def _check_label(metric: str, key: str, value: str, secrets: Secrets) -> None:
    assert value not in secrets.session_ids, (metric, key, "a session id")
    assert not value.startswith("did:") and value not in secrets.dids, (metric, key, "a DID")
    allowed = ALLOWED[metric]
    assert key in allowed, (metric, key)
    assert value in allowed[key], (metric, key, value)


def _instrument_of_family(name: str) -> str | None:
    for candidate in (name, name + "_total"):
        if candidate in BY_PROMETHEUS_NAME:
            return BY_PROMETHEUS_NAME[candidate].name
    return None


def _check_exposition(text: str, openmetrics: bool, secrets: Secrets) -> int:
    families = list(parse_openmetrics(text) if openmetrics else parse_text(text))
    seen = 0
    for family in families:
        if not family.name.startswith("sage_"):
            continue
        instrument = _instrument_of_family(family.name)
        assert instrument is not None, f"{family.name} is not in the catalog"
        seen += 1
        for sample in family.samples:
            for key, value in sample.labels.items():
                if key == "le" and sample.name.endswith("_bucket"):
                    continue
                _check_label(instrument, key, value, secrets)
            if sample.exemplar is not None:
                assert set(sample.exemplar.labels) == {"trace_id", "span_id"}, sample
    return seen


async def test_exported_telemetry_holds_no_secret(
    telemetry: Telemetry,
    captured: Secrets,
    start_server: StartServer,
    make_client: MakeClient,
    new_agent: NewAgent,
) -> None:
    await _exchange(captured, start_server, make_client, new_agent)

    # The capture is complete enough to mean something.
    kinds = captured.kinds()
    for kind in (
        "ed25519 identity private key",
        "secp256k1 identity private key",
        "KEM private key",
        "session seed",
        "session key c2s_encrypt",
        "session key s2c_sign",
        "ephemeral X25519 private key",
        "HPKE private key",
        "HPKE exporter secret",
        "handshake nonce",
        "message nonce",
        "AEAD nonce",
        "plaintext",
    ):
        assert kind in kinds, f"no {kind} captured"
    assert len(captured.session_ids) == 1

    spans = list(telemetry.spans.get_finished_spans())
    data = telemetry.reader.get_metrics_data()
    plain, openmetrics = telemetry.scrape(False), telemetry.scrape(True)
    assert spans and data is not None

    span_text = "\x00".join(_span_texts(spans))
    metric_text = "\x00".join(_metric_texts(data))
    # The haystacks hold what was exported (the search is not vacuous).
    assert f"{spans[0].context.trace_id:032x}" in span_text
    assert {s.name for s in spans} >= {"sage.handshake", "sage.message.send"}
    exemplars = [
        e
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
        for e in p.exemplars or ()
    ]
    assert exemplars, "sampled spans leave exemplars"
    assert any(f"{e.trace_id:032x}" in openmetrics for e in exemplars if e.trace_id)

    for where, haystack in (
        ("spans", span_text),
        ("metric data", metric_text),
        ("/metrics text", plain),
        ("/metrics OpenMetrics", openmetrics),
    ):
        assert _leaks(captured, haystack) == [], f"secrets in {where}"

    # Metric labels are closed values, never identifiers.
    sage_points = 0
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != SCOPE:
                continue
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    sage_points += 1
                    for key, value in point.attributes.items():
                        _check_label(metric.name, key, value, captured)
                    for exemplar in point.exemplars or ():
                        assert not exemplar.filtered_attributes, metric.name
    assert sage_points
    assert _check_exposition(plain, False, captured) == len(INSTRUMENTS)
    assert _check_exposition(openmetrics, True, captured) == len(INSTRUMENTS)
