from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from sage_otel.agent.errors import (
    ErrorCategory,
    HandshakeTimeoutError,
    NetworkError,
    PeerError,
    SessionExpiredError,
    SessionNotFoundError,
    UnknownDIDError,
)
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.session import EndReason, Session, SessionLimits, SessionManager
from sage_otel.agent.transport import ClientAgent, ServerAgent

StartServer = Callable[..., Awaitable[tuple[ServerAgent, str]]]
MakeClient = Callable[..., Awaitable[ClientAgent]]


async def test_handshake_text_binary_and_close(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))

    assert server.sessions.active_count == 1
    server_session = server.sessions.get(conn.session.id)
    assert server_session.peer_did == str(client.identity.did)
    assert conn.peer_did == str(server.identity.did)

    reply = await client.send(conn, "hello server")
    assert reply == "hello server" and isinstance(reply, str)
    blob = bytes(range(256)) * 4
    reply = await client.send(conn, blob)
    assert reply == blob and isinstance(reply, bytes)
    assert server_session.last_recv_seq == 2 and conn.session.last_recv_seq == 2

    await client.close(conn)
    assert server.sessions.active_count == 0
    assert client.sessions.active_count == 0
    assert server_session.closed and conn.session.closed
    with pytest.raises(SessionExpiredError):
        await client.send(conn, "after close")


async def test_handler_sees_the_session_and_async_replies(
    start_server: StartServer, make_client: MakeClient
) -> None:
    seen: list[tuple[str, str | bytes]] = []

    async def handler(session: Session, data: str | bytes) -> str | bytes:
        seen.append((session.peer_did, data))
        await asyncio.sleep(0)
        return data.upper() if isinstance(data, str) else data[::-1]

    server, url = await start_server(handler=handler)
    client = await make_client(chain=Chain.SOLANA)
    conn = await client.connect(url, str(server.identity.did))
    assert await client.send(conn, "shout") == "SHOUT"
    assert await client.send(conn, b"\x01\x02\x03") == b"\x03\x02\x01"
    assert seen == [
        (str(client.identity.did), "shout"),
        (str(client.identity.did), b"\x01\x02\x03"),
    ]


async def test_health_endpoint(start_server: StartServer) -> None:
    server, url = await start_server()
    async with httpx.AsyncClient() as http:
        answer = await http.get(url + "/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "did": str(server.identity.did)}


async def test_many_concurrent_clients(start_server: StartServer, make_client: MakeClient) -> None:
    server, url = await start_server()
    clients = [
        await make_client(chain=Chain.ETHEREUM if i % 2 else Chain.SOLANA) for i in range(20)
    ]
    conns = await asyncio.gather(*(c.connect(url, str(server.identity.did)) for c in clients))
    assert server.sessions.active_count == 20
    assert len({conn.session.id for conn in conns}) == 20

    async def chat(index: int) -> list[str | bytes]:
        client, conn = clients[index], conns[index]
        return [await client.send(conn, f"client {index} message {n}") for n in range(10)]

    replies = await asyncio.gather(*(chat(i) for i in range(20)))
    for index, answers in enumerate(replies):
        assert answers == [f"client {index} message {n}" for n in range(10)]
    assert server.sessions.active_count == 20

    await asyncio.gather(*(c.close(conn) for c, conn in zip(clients, conns, strict=True)))
    assert server.sessions.active_count == 0


async def test_replayed_envelope_is_refused_and_session_survives(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    body = json.dumps(client.message_envelope(conn, "only once")).encode()

    answer = await client.post(url, body)
    assert client.open_reply(conn, answer) == "only once"
    with pytest.raises(PeerError) as info:
        await client.post(url, body)
    assert info.value.code == "replay_detected"
    assert info.value.http_status == 409
    assert info.value.category is ErrorCategory.REPLAY

    assert await client.send(conn, "still here") == "still here"
    assert server.sessions.active_count == 1


async def test_unregistered_client_is_refused(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server, url = await start_server()
    client = await make_client(registered=False)
    with pytest.raises(PeerError) as info:
        await client.connect(url, str(server.identity.did))
    assert info.value.code == "unknown_did"
    assert info.value.http_status == 403
    assert info.value.category is ErrorCategory.UNKNOWN_DID
    assert server.sessions.active_count == 0 and client.sessions.active_count == 0


async def test_client_refuses_unregistered_server(
    start_server: StartServer, make_client: MakeClient
) -> None:
    stranger = AgentIdentity.generate(Chain.SOLANA)
    _, url = await start_server(stranger)
    client = await make_client()
    with pytest.raises(UnknownDIDError):
        await client.connect(url, str(stranger.did))


async def test_server_refuses_handshake_meant_for_another_agent(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server_a, url_a = await start_server()
    server_b, _ = await start_server()
    client = await make_client()
    with pytest.raises(PeerError) as info:
        await client.connect(url_a, str(server_b.identity.did))
    assert info.value.code == "did_mismatch" and info.value.http_status == 400
    assert server_a.sessions.active_count == server_b.sessions.active_count == 0


async def test_session_past_max_messages_is_expired(
    start_server: StartServer, make_client: MakeClient
) -> None:
    # Each exchange uses two of the server session's messages: the request and the reply.
    server, url = await start_server(sessions=SessionManager(SessionLimits(max_messages=4)))
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    assert await client.send(conn, "one") == "one"
    assert await client.send(conn, "two") == "two"
    with pytest.raises(PeerError) as info:
        await client.send(conn, "three")
    assert info.value.code == "session_expired"
    assert info.value.http_status == 410
    assert info.value.category is ErrorCategory.EXPIRED
    assert server.sessions.active_count == 0
    # The client ended its side too: its keys are gone and nothing more is sent.
    assert client.sessions.active_count == 0
    assert conn.session.end_reason is EndReason.PEER_ENDED
    with pytest.raises(SessionExpiredError):
        await client.send(conn, "four")


async def test_background_sweep_expires_idle_sessions(
    start_server: StartServer, make_client: MakeClient, clock
) -> None:
    sessions = SessionManager(SessionLimits(idle_timeout=5.0), clock=clock)
    server, url = await start_server(sessions=sessions, sweep_interval=0.02)
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    await asyncio.sleep(0.1)
    assert server.sessions.active_count == 1
    clock.advance(5.0)
    for _ in range(100):
        if server.sessions.active_count == 0:
            break
        await asyncio.sleep(0.02)
    assert server.sessions.active_count == 0
    with pytest.raises(PeerError) as info:
        await client.send(conn, "too late")
    assert info.value.code == "unknown_session"


async def test_stop_closes_all_sessions(start_server: StartServer, make_client: MakeClient) -> None:
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    server_session = server.sessions.get(conn.session.id)
    await server.stop()
    assert server.sessions.active_count == 0
    assert server_session.closed
    with pytest.raises(NetworkError):
        await client.send(conn, "anyone there?")


async def test_start_on_a_taken_port_raises(start_server: StartServer) -> None:
    server, _ = await start_server()
    other = ServerAgent(server.identity, server.resolver)
    with pytest.raises(OSError):
        await other.start("127.0.0.1", server.port)


async def test_unreachable_peer_is_a_network_error(make_client: MakeClient, new_agent) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    peer = await new_agent()
    client = await make_client()
    with pytest.raises(NetworkError) as info:
        await client.connect(f"http://127.0.0.1:{port}", str(peer.did))
    assert info.value.category is ErrorCategory.NETWORK
    assert client.sessions.active_count == 0


async def test_handshake_timeout(make_client: MakeClient, new_agent) -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await release.wait()
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        peer = await new_agent()
        client = await make_client(handshake_timeout=0.2)
        with pytest.raises(HandshakeTimeoutError) as info:
            await client.connect(f"http://127.0.0.1:{port}", str(peer.did))
        assert info.value.category is ErrorCategory.TIMEOUT
    finally:
        release.set()
        listener.close()
        await listener.wait_closed()


async def test_non_json_answer_is_a_network_error(make_client: MakeClient) -> None:
    async def not_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(not_json, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        client = await make_client()
        with pytest.raises(NetworkError) as info:
            await client.post(f"http://127.0.0.1:{port}", {"task_id": "x"})
        assert info.value.code == "bad_answer"
    finally:
        listener.close()
        await listener.wait_closed()


async def test_sessions_are_isolated_between_clients(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server, url = await start_server()
    alice, bob = await make_client(), await make_client()
    conn_a = await alice.connect(url, str(server.identity.did))
    conn_b = await bob.connect(url, str(server.identity.did))
    # Bob cannot speak in Alice's session: his keys do not match it.
    forged = bob.message_envelope(conn_b, "sneaky")
    forged["context_id"] = conn_a.session.id
    with pytest.raises(PeerError) as info:
        await bob.post(url, forged)
    assert info.value.code == "wrong_peer" and info.value.http_status == 400
    assert await alice.send(conn_a, "mine") == "mine"
    assert await bob.send(conn_b, "mine too") == "mine too"


async def test_answers_are_not_held_back_by_delayed_acks(start_server: StartServer) -> None:
    # Without TCP_NODELAY on accepted sockets each answer stalls ~40 ms on a delayed ACK.
    _, url = await start_server()
    async with httpx.AsyncClient() as http:
        await http.get(url + "/healthz")
        started = time.perf_counter()
        for _ in range(20):
            assert (await http.get(url + "/healthz")).status_code == 200
        elapsed = time.perf_counter() - started
    assert elapsed < 0.6, f"20 requests took {elapsed:.2f} s"


async def test_the_aiohttp_client_speaks_the_same_protocol(start_server, make_client) -> None:
    from sage_otel.agent.errors import NetworkError
    from sage_otel.agent.transport import AiohttpSession

    server, url = await start_server()
    client = await make_client(http=AiohttpSession())
    conn = await client.connect(url, str(server.identity.did))
    assert await client.send(conn, "over aiohttp") == "over aiohttp"
    server.sessions.close(conn.session.id)
    with pytest.raises(PeerError) as info:
        await client.send(conn, "gone")
    assert info.value.code == "unknown_session" and conn.session.closed
    with pytest.raises(NetworkError):
        await client.post("http://127.0.0.1:1", b"{}")


async def test_unread_go_messages_go_with_their_session(go_link) -> None:
    """Plaintext delivered to a listener and never read is dropped when the session ends."""
    server, client, conn = go_link
    server_side = server.sessions.get(conn.session.id)
    for text in ("one", "two", "three"):
        await server.push(server_side, text)
    listener = client.listener
    assert conn.session.id in listener._inboxes  # delivered, unread
    await client.close(conn)  # a go-profile close is local: the listener's session ends
    with pytest.raises(SessionNotFoundError):
        await client.receive(conn, timeout=1)
    assert conn.session.id not in listener._inboxes


async def test_the_sweep_drops_the_inbox_of_a_session_that_idled_out(go_link) -> None:
    server, client, conn = go_link
    await server.push(server.sessions.get(conn.session.id), "never read")
    listener = client.listener
    assert conn.session.id in listener._inboxes
    client.sessions.expire(conn.session, EndReason.IDLE)  # what the sweeper does past the limit
    for _ in range(40):  # the listener's sweeper runs every second
        if conn.session.id not in listener._inboxes:
            break
        await asyncio.sleep(0.1)
    assert conn.session.id not in listener._inboxes
