"""Instrumentation never changes what a SAGE call returns or raises (property tests)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from sage_otel.agent.did import DIDResolver, InMemoryRegistry
from sage_otel.agent.identity import (
    AgentIdentity,
    KeyType,
    SigningKey,
    parse_did,
    verify_signature,
)
from sage_otel.agent.message import MessageValidator, seal
from sage_otel.agent.session import Role, SessionManager
from sage_otel.agent.transport import ClientAgent, parse_envelope
from sage_otel.instrumentation import SageInstrumentor

KEYS = {kind: SigningKey.generate(kind) for kind in KeyType}
SEED = bytes(range(32))


def outcome(call: Callable[[], Any]) -> tuple:
    try:
        value = call()
        if asyncio.iscoroutine(value):
            value = asyncio.run(value)
    except Exception as exc:
        return ("raised", type(exc).__name__, getattr(exc, "code", None))
    return ("returned", repr(value))


def both_ways(call: Callable[[], Any]) -> tuple[tuple, tuple]:
    bare = outcome(call)
    instrumentor = SageInstrumentor()
    tracer_provider = TracerProvider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor.instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, crypto_detail="spans"
    )
    try:
        instrumented = outcome(call)
    finally:
        instrumentor.uninstrument()
        meter_provider.shutdown()
    return bare, instrumented


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.text(max_size=80) | st.from_regex(r"did:sage:(eth|sol|x):[\x21-\x7e]{0,40}"))
def test_parse_did(text: str) -> None:
    bare, instrumented = both_ways(lambda: parse_did(text))
    assert bare == instrumented


@SETTINGS
@given(st.sampled_from(list(KeyType)), st.binary(max_size=80), st.binary(max_size=80))
def test_verify_signature(kind: KeyType, data: bytes, signature: bytes) -> None:
    key = KEYS[kind]
    forms = [signature, key.sign(data)]
    for candidate in forms:
        bare, instrumented = both_ways(
            lambda c=candidate: verify_signature(kind, key.public_bytes(), data, c)
        )
        assert bare == instrumented


@SETTINGS
@given(st.sampled_from([KeyType.ED25519, KeyType.SECP256K1]), st.binary(max_size=64))
def test_deterministic_signatures_are_the_same_bytes(kind: KeyType, data: bytes) -> None:
    bare, instrumented = both_ways(lambda: KEYS[kind].sign(data).hex())
    assert bare == instrumented


@SETTINGS
@given(
    st.binary(max_size=200)
    | st.dictionaries(
        st.sampled_from(["id", "task_id", "payload", "did", "metadata", "signature"]),
        st.text(max_size=20) | st.integers() | st.none(),
    ).map(lambda d: json.dumps(d).encode())
)
def test_parse_envelope(body: bytes) -> None:
    bare, instrumented = both_ways(lambda: parse_envelope(body))
    assert bare == instrumented


@SETTINGS
@given(
    st.sampled_from(["payload", "seq", "nonce", "type", "signature", "none"]),
    st.text(max_size=30),
)
def test_opening_a_message(field: str, value: str) -> None:
    def run() -> Any:
        sessions = SessionManager()
        a = sessions.create("s", Role.INITIATOR, SEED, peer_did="p", kid="k")
        b = SessionManager().create("s", Role.RESPONDER, SEED, peer_did="p", kid="k")
        wire = seal(a, "hello").to_wire()
        metadata = dict(wire["metadata"])
        payload = wire["payload"]
        if field == "payload":
            payload = value
        elif field != "none":
            metadata[field] = value
        return MessageValidator().open_wire(b, payload, metadata)

    bare, instrumented = both_ways(run)
    assert bare == instrumented


@SETTINGS
@given(
    st.sampled_from(
        ["http://127.0.0.1:99999", "http://127.0.0.1:1", "not a url", "http://[::1", ""]
    ),
    st.text(max_size=30),
)
def test_connecting_anywhere(url: str, did: str) -> None:
    async def run() -> Any:
        client = ClientAgent(AgentIdentity.generate("sol"), DIDResolver(InMemoryRegistry()))
        try:
            return await client.connect(url, did)
        finally:
            await client.aclose()

    bare, instrumented = both_ways(run)
    assert bare == instrumented
