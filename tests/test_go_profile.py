"""The go peer profile between two Python agents over loopback: the Go reference's envelope
and message flow, fixed at the handshake, with every malformed input refused typed."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from sage_otel.agent.encoding import b64std
from sage_otel.agent.errors import NetworkError, PeerError
from sage_otel.agent.handshake import PROFILE_FIELD
from sage_otel.agent.message import go_signature_base
from sage_otel.agent.session import PeerProfile, Role
from sage_otel.agent.transport import INBOX_SIZE, ClientAgent, Connection


async def test_messages_flow_both_ways_by_post(go_link) -> None:
    server, client, conn = go_link
    session = server.sessions.get(conn.session.id)
    assert session.profile is PeerProfile.GO and session.role is Role.RESPONDER
    for text in ("one", "two", "three"):
        assert await client.send(conn, text) is None
    assert [await client.receive(conn, timeout=5) for _ in range(3)] == [b"one", b"two", b"three"]
    # The server can also speak first in the session.
    await server.push(session, b"unprompted")
    assert await client.receive(conn, timeout=5) == b"unprompted"


async def test_native_is_the_default_and_is_announced_inside_the_signature(
    start_server, make_client
) -> None:
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    assert conn.session.profile is PeerProfile.NATIVE
    assert server.sessions.get(conn.session.id).profile is PeerProfile.NATIVE
    assert await client.send(conn, "reply inline") == "reply inline"


async def test_the_profile_marker_cannot_be_stripped_in_transit(start_server, make_client) -> None:
    """Removing the signed marker from a native request breaks the initiator's signature."""
    server, url = await start_server()
    client = await make_client()
    pending = client.initiator.init(await client.resolver.resolve(str(server.identity.did)))
    fields = json.loads(pending.request.payload)
    assert fields.pop(PROFILE_FIELD) == "native"
    stripped = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    body = client.envelope(
        "hpke/complete@v1",
        pending.request.ctx_id,
        b64std(stripped),
        b64std(pending.request.signature),
    )
    with pytest.raises(PeerError) as info:
        await client.post(url, body)
    assert info.value.code == "bad_signature" and server.sessions.active_count == 0


def _resign(
    client: ClientAgent, conn: Connection, envelope: dict[str, Any], created: int
) -> dict[str, Any]:
    """Rebuild signature-input with ``created`` and MAC it correctly (a peer holding the keys)."""
    kid = conn.session.kid
    envelope["metadata"]["signature-input"] = (
        'sig1=("@method" "@path" "x-sage-did" "x-sage-message-id" "x-sage-context-id" '
        f'"x-sage-task-id");keyid="{kid}";alg="hmac-sha256";created={created}'
    )

    class Fields:
        id = envelope["id"]
        did = envelope["did"]
        context_id = envelope["context_id"]
        task_id = envelope["task_id"]

    mac = conn.session.sign(go_signature_base(Fields, kid, created))
    envelope["signature"] = base64.b64encode(mac).decode()
    return envelope


def _metadata(**change: str | None):
    def apply(envelope: dict[str, Any]) -> None:
        for key, value in change.items():
            if value is None:
                envelope["metadata"].pop(key)
            else:
                envelope["metadata"][key] = value

    return apply


def _field(**change: Any):
    return lambda envelope: envelope.update(change)


BAD = [
    ("no kid", _metadata(kid=None), "bad_metadata"),
    ("extra metadata", _metadata(seq="1"), "bad_metadata"),
    ("other alg", _metadata(**{"signature-input": 'sig1=();alg="none"'}), "bad_signature_field"),
    ("wrong kid", _metadata(kid="kid-other"), "wrong_kid"),
    ("bad mac", _field(signature=base64.b64encode(bytes(32)).decode()), "bad_signature"),
    ("no mac", _field(signature=None), "bad_signature"),
    ("other message id", _field(id="another-id"), "bad_signature"),
    ("other task", _field(task_id="sage/close@v1"), "bad_signature"),
]


@pytest.mark.parametrize(("name", "change", "code"), BAD, ids=[b[0] for b in BAD])
async def test_malformed_go_messages_are_refused_typed(go_link, name, change, code) -> None:
    _server, client, conn = go_link
    envelope = client.message_envelope(conn, "x")
    change(envelope)
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, envelope)
    assert info.value.code == code and 400 <= info.value.http_status < 500
    assert await client.send(conn, "still fine") is None  # the session is untouched
    assert await client.receive(conn, timeout=5) == b"still fine"


@pytest.mark.parametrize("skew", [-120, 120])
async def test_stale_or_future_created_is_refused(go_link, skew: int) -> None:
    _server, client, conn = go_link
    envelope = _resign(client, conn, client.message_envelope(conn, "late"), int(time.time()) + skew)
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, envelope)
    assert info.value.code == "timestamp_skew"


async def test_a_replayed_go_message_is_refused(go_link) -> None:
    _server, client, conn = go_link
    envelope = client.message_envelope(conn, "once")
    await client.post(conn.base_url, envelope)
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, envelope)
    assert info.value.code == "replay_detected" and info.value.http_status == 409
    assert await client.receive(conn, timeout=5) == b"once"  # delivered exactly once


async def test_a_full_inbox_answers_429_and_loses_nothing_delivered(go_link) -> None:
    server, client, conn = go_link
    client_session = conn.session
    sender = ClientAgent(server.identity, server.resolver, sessions=server.sessions)
    back = Connection(
        conn.base_url, str(client.identity.did), server.sessions.get(client_session.id)
    )
    back.base_url = f"http://127.0.0.1:{client.listener.port}"
    for i in range(INBOX_SIZE):
        await sender.send(back, f"m{i}")
    with pytest.raises(PeerError) as info:
        await sender.send(back, "one too many")
    assert info.value.code == "inbox_full" and info.value.http_status == 429
    assert await client.receive(conn, timeout=1) == b"m0"
    await sender.http.aclose()


async def test_receive_needs_a_listener_and_times_out_typed(
    start_server, make_client, new_agent
) -> None:
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did), profile=PeerProfile.GO)
    with pytest.raises(NetworkError) as info:
        await client.receive(conn, timeout=0.01)
    assert info.value.code == "not_listening"
    await client.listen()
    with pytest.raises(NetworkError) as info:
        await client.receive(conn, timeout=0.01)
    assert info.value.code == "receive_timeout"


async def test_a_peer_without_endpoint_gets_no_push_and_the_sender_its_answer(
    start_server, make_client
) -> None:
    server, url = await start_server()
    client = await make_client()  # registered without an endpoint
    conn = await client.connect(url, str(server.identity.did), profile=PeerProfile.GO)
    assert await client.send(conn, "echo goes nowhere") is None
    with pytest.raises(NetworkError) as info:
        await server.push(server.sessions.get(conn.session.id), b"x")
    assert info.value.code == "no_endpoint"


async def test_go_session_close_is_local(go_link) -> None:
    server, client, conn = go_link
    await client.close(conn)
    assert conn.session.closed
    assert (
        server.sessions.get(conn.session.id).profile is PeerProfile.GO
    )  # the reference has no close
