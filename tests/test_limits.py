"""Limits that keep one peer from hurting the others, each answered typed, with Retry-After."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sage_otel.agent.errors import PeerError
from sage_otel.agent.identity import Chain
from sage_otel.agent.session import SessionLimits, SessionManager


async def test_handshake_rate_is_limited_per_sender(start_server, make_client) -> None:
    server, url = await start_server(handshake_rate="3/minute")
    greedy, polite = await make_client(), await make_client(chain=Chain.SOLANA)
    for _ in range(3):
        await greedy.connect(url, str(server.identity.did))
    with pytest.raises(PeerError) as info:
        await greedy.connect(url, str(server.identity.did))
    assert info.value.code == "handshake_rate_limited" and info.value.http_status == 429
    assert info.value.category.value == "overload"
    # Another peer's allowance is its own.
    conn = await polite.connect(url, str(server.identity.did))
    assert await polite.send(conn, "unaffected") == "unaffected"


async def test_sessions_are_capped_per_peer(start_server, make_client) -> None:
    server, url = await start_server(sessions=SessionManager(max_sessions_per_peer=2))
    greedy, polite = await make_client(), await make_client()
    for _ in range(2):
        await greedy.connect(url, str(server.identity.did))
    with pytest.raises(PeerError) as info:
        await greedy.connect(url, str(server.identity.did))
    assert info.value.code == "peer_session_limit" and info.value.http_status == 429
    await polite.connect(url, str(server.identity.did))
    assert server.sessions.active_count == 3


async def test_a_full_table_answers_503_with_retry_after(start_server, make_client) -> None:
    server, url = await start_server(sessions=SessionManager(max_sessions=0))
    client = await make_client()
    envelope_answer: list[httpx.Response] = []
    original = client.http.post

    async def spy(*args, **kwargs):
        envelope_answer.append(await original(*args, **kwargs))
        return envelope_answer[-1]

    client.http.post = spy  # type: ignore[method-assign]
    with pytest.raises(PeerError) as info:
        await client.connect(url, str(server.identity.did))
    assert info.value.code == "session_capacity" and info.value.http_status == 503
    assert int(envelope_answer[-1].headers["retry-after"]) >= 1


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml"])
async def test_content_type_must_be_json(start_server, content_type: str | None) -> None:
    _server, url = await start_server()
    headers = {} if content_type is None else {"content-type": content_type}
    async with httpx.AsyncClient() as http:
        answer = await http.post(url + "/messages", content=b"{}", headers=headers)
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"


async def test_an_unexpected_handler_failure_is_typed_and_the_server_keeps_serving(
    start_server, make_client
) -> None:
    def broken(_session, data):
        if data == "boom":
            raise RuntimeError("a defect with private details")
        return data

    server, url = await start_server(handler=broken)
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    with pytest.raises(PeerError) as info:
        await client.send(conn, "boom")
    assert info.value.code == "internal_error" and "private" not in str(info.value)
    assert await client.send(conn, "still serving") == "still serving"


async def test_any_call_that_learns_the_session_ended_ends_it_here(
    start_server, make_client
) -> None:
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    server.sessions.close(conn.session.id)  # the server ends it (e.g. its sweep)
    with pytest.raises(PeerError) as info:
        await client.post(url, client.message_envelope(conn, "via post"))
    assert info.value.code == "unknown_session"
    assert conn.session.closed and client.sessions.active_count == 0


async def test_the_client_sweeps_its_own_aged_sessions(start_server, make_client) -> None:
    server, url = await start_server()
    client = await make_client(
        sessions=SessionManager(SessionLimits(idle_timeout=0.05)), sweep_interval=0.02
    )
    conn = await client.connect(url, str(server.identity.did))
    for _ in range(100):
        if client.sessions.active_count == 0:
            break
        await asyncio.sleep(0.01)
    assert conn.session.closed and conn.session.end_reason.value == "idle"


def test_refusal_categories_are_exactly_the_error_categories() -> None:
    from sage_otel.agent.errors import ErrorCategory
    from sage_otel.telemetry.catalog import REFUSAL_CATEGORIES

    assert set(REFUSAL_CATEGORIES) == {c.value for c in ErrorCategory}


async def test_the_active_sessions_gauge_equals_the_sessions_really_live_in_the_demo() -> None:
    """Sampled while the demo runs (injected failures, closes and server-side expiries)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from sage_otel.demo import Demo, DemoConfig
    from sage_otel.instrumentation import SageInstrumentor
    from sage_otel.telemetry.meters import StoreMeters
    from sage_otel.telemetry.store import MetricStore

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    store = MetricStore()
    store.attach(reader, provider._sdk_config.resource)
    instrumentor = SageInstrumentor()
    instrumentor.instrument(meter_provider=provider, meters=StoreMeters(store))
    try:
        demo = Demo(DemoConfig(duration=4.0, clients=4, rate=0, session_max_messages=40))
        task = asyncio.create_task(demo.run())
        samples = []
        for _ in range(6):
            await asyncio.sleep(0.5)
            data = reader.get_metrics_data()  # no await between this and the count below
            gauge = next(
                p.value
                for rm in data.resource_metrics
                for sm in rm.scope_metrics
                for m in sm.metrics
                if m.name == "sage.sessions.active"
                for p in m.data.data_points
            )
            server, clients = demo.live_sessions()
            samples.append((gauge, server + clients, clients))
        stats = await task
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    assert stats.sessions_expired > 0 and stats.sessions_closed > 0  # both ways happened
    for gauge, live, clients in samples:
        assert gauge == live, samples
        assert clients <= 4, samples  # each client holds at most its one current session


async def test_a_70000_byte_nonce_is_a_typed_400_and_stores_nothing(
    start_server, make_client
) -> None:
    import base64
    import json

    server, url = await start_server()
    client = await make_client()
    pending = client.initiator.init(await client.resolver.resolve(str(server.identity.did)))
    fields = dict(pending.fields, nonce="n" * 70_000)
    payload = json.dumps(fields).encode()
    body = client.envelope(
        "hpke/complete@v1",
        pending.request.ctx_id,
        base64.b64encode(payload).decode(),
        base64.b64encode(client.identity.signing_key.sign(payload)).decode(),
    )
    for _ in range(5):
        with pytest.raises(PeerError) as info:
            await client.post(url, body)
        assert info.value.http_status == 400 and info.value.code == "bad_handshake"
    assert len(server.responder.replays) == 0 and server.sessions.active_count == 0


def test_the_token_bucket_refills_and_says_when_to_retry() -> None:
    from sage_otel.agent.errors import RateLimitedError
    from sage_otel.agent.handshake import HandshakeLimiter

    now = [0.0]
    limiter = HandshakeLimiter("2/second", clock=lambda: now[0], max_peers=2)
    limiter.hit("a")
    limiter.hit("a")
    with pytest.raises(RateLimitedError) as info:
        limiter.hit("a")
    assert info.value.retry_after == 1  # half a token short at 2/s: 0.5 s, rounded up
    limiter.hit("b")  # another peer is untouched
    now[0] += 0.5
    limiter.hit("a")  # refilled by one token
    limiter.hit("c")
    assert len(limiter._buckets) == 2  # bounded: the least recent peer was forgotten
    with pytest.raises(ValueError):
        HandshakeLimiter("fast")


async def test_a_peer_at_its_session_limit_spends_nothing_of_the_global_rate(
    start_server, make_client
) -> None:
    """Refused for its own share, a peer's further handshakes must not drain the rate that
    all peers share: another peer still gets in."""
    server, url = await start_server(
        sessions=SessionManager(max_sessions_per_peer=2), global_handshake_rate="20/minute"
    )
    did = str(server.identity.did)
    greedy = await make_client()
    for _ in range(2):
        await greedy.connect(url, did)
    for _ in range(12):
        with pytest.raises(PeerError) as info:
            await greedy.connect(url, did)
        assert info.value.code == "peer_session_limit"
    newcomer = await make_client()
    conn = await newcomer.connect(url, did)
    assert await newcomer.send(conn, "in") == "in"
