"""Issue 16, deliver 3: every field that changes what the receiver does is authenticated,
and replay state is spent only by a message that opened.

The attacks are an on-path attacker's, holding no key: it can relabel the task of a
captured request, swap a go-profile payload (the reference's MAC does not cover it) under
a fresh envelope, or tamper with a copy and deliver it before the genuine message.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest

from sage_otel.agent.encoding import b64std
from sage_otel.agent.envelope import CLOSE_TASK, MESSAGE_TASK, Envelope
from sage_otel.agent.errors import (
    CryptoError,
    NetworkError,
    PeerError,
    ReplayError,
    SessionExpiredError,
    SignatureError,
)
from sage_otel.agent.keyschedule import session_id
from sage_otel.agent.message import NONCE_TTL, MessageValidator, seal_go
from sage_otel.agent.session import PeerProfile, Role, Session, SessionLimits

# -- native profile: the task id is signed --------------------------------------------------


async def _native(start_server, make_client):
    server, url = await start_server()
    client = await make_client()
    conn = await client.connect(url, str(server.identity.did))
    return server, client, conn


async def test_native_message_relabelled_as_close_is_refused_and_the_session_stays_open(
    start_server, make_client
) -> None:
    server, client, conn = await _native(start_server, make_client)
    genuine = client.message_envelope(conn, "deliver me")
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, {**genuine, "task_id": CLOSE_TASK})
    assert info.value.code == "bad_signature" and info.value.http_status == 401
    assert server.sessions.get(conn.session.id) is not None  # still open, keys intact
    # The refused copy spent nothing: the genuine message is delivered once.
    answer = await client.post(conn.base_url, genuine)
    assert client.open_reply(conn, answer) == "deliver me"


async def test_native_close_relabelled_as_message_is_refused_and_the_genuine_close_works(
    start_server, make_client
) -> None:
    server, client, conn = await _native(start_server, make_client)
    seen: list[str | bytes] = []
    server.handler = lambda _session, data: seen.append(data) or data
    close = client.message_envelope(conn, "", CLOSE_TASK)
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, {**close, "task_id": MESSAGE_TASK})
    assert info.value.code == "bad_signature" and info.value.http_status == 401
    assert seen == []  # nothing reached the handler
    assert await client.post(conn.base_url, close) == {"closed": True}
    assert server.sessions.active_count == 0


async def test_native_reply_is_bound_to_the_task_of_its_request(start_server, make_client) -> None:
    _server, client, conn = await _native(start_server, make_client)
    answer = await client.post(conn.base_url, client.message_envelope(conn, "ping"))
    with pytest.raises(SignatureError) as info:
        client.open_reply(conn, answer, task_id=CLOSE_TASK)
    assert info.value.code == "bad_signature"
    assert client.open_reply(conn, answer) == "ping"  # the refusal spent nothing


# -- go profile: a ciphertext is accepted once per session ---------------------------------


def _swap_payload(envelope: dict[str, Any], payload: str) -> dict[str, Any]:
    """What the attacker can build: the fresh envelope's MACed fields, verbatim, with
    another payload (the reference's MAC covers method, path, DID, message id, context
    id, task id and ``created``, none of them the payload)."""
    return {**envelope, "payload": payload}


async def _nothing_more(client, conn) -> None:
    with pytest.raises(NetworkError):
        await client.receive(conn, timeout=0.3)


async def test_go_earlier_ciphertext_under_a_fresh_envelope_is_refused(go_link) -> None:
    _server, client, conn = go_link
    first = client.message_envelope(conn, "one")
    await client.post(conn.base_url, first)
    assert await client.receive(conn, timeout=5) == b"one"

    fresh = client.message_envelope(conn, "two")
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, _swap_payload(fresh, first["payload"]))
    assert info.value.code == "ciphertext_replayed" and info.value.http_status == 409
    assert info.value.category.value == "replay"

    await client.post(conn.base_url, fresh)  # the genuine message is still accepted
    assert await client.receive(conn, timeout=5) == b"two"
    await _nothing_more(client, conn)


def _tamper(sealed_b64: str, how: str) -> str:
    sealed = bytearray(base64.b64decode(sealed_b64))
    if how == "tag":
        sealed[-1] ^= 0x01
    elif how == "ciphertext":
        sealed[12] ^= 0x01
    elif how == "aead nonce":
        sealed[0] ^= 0x01
    else:  # truncated
        sealed = sealed[:20]
    return b64std(bytes(sealed))


@pytest.mark.parametrize("how", ["tag", "ciphertext", "aead nonce", "truncated"])
async def test_go_tampered_copy_first_does_not_spend_the_genuine_message(go_link, how) -> None:
    _server, client, conn = go_link
    genuine = client.message_envelope(conn, "genuine")
    with pytest.raises(PeerError) as info:
        await client.post(conn.base_url, _swap_payload(genuine, _tamper(genuine["payload"], how)))
    assert info.value.category.value == "crypto" and info.value.http_status == 400
    await client.post(conn.base_url, genuine)
    assert await client.receive(conn, timeout=5) == b"genuine"
    with pytest.raises(PeerError) as info:  # and a replay of it is still refused
        await client.post(conn.base_url, genuine)
    assert info.value.code == "replay_detected" and info.value.http_status == 409
    await _nothing_more(client, conn)


@pytest.mark.parametrize("profile", [PeerProfile.NATIVE, PeerProfile.GO])
async def test_two_copies_delivered_at_once_are_accepted_once(
    profile, go_link, start_server, make_client
) -> None:
    """A guard on the check-then-commit split (not an attack the old code let through):
    the check and the commit run with no await between them."""
    if profile is PeerProfile.GO:
        _server, client, conn = go_link
    else:
        _server, client, conn = await _native(start_server, make_client)
    envelope = client.message_envelope(conn, "twice")
    results = await asyncio.gather(
        *(client.post(conn.base_url, envelope) for _ in range(2)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, PeerError)]
    assert len(refused) == 1 and refused[0].code == "replay_detected"
    if profile is PeerProfile.GO:
        assert await client.receive(conn, timeout=5) == b"twice"
        await _nothing_more(client, conn)


# -- go profile, in process: the session's memory of ciphertexts ---------------------------


class GoPair:
    """Both ends of one go-profile session, the receiver validating on ``clock``."""

    def __init__(self, clock, max_messages: int = 1000) -> None:
        seed = os.urandom(32)
        sid = session_id(seed)
        limits = SessionLimits(max_age=1e9, idle_timeout=1e9, max_messages=max_messages)
        self.clock = clock
        self.a = Session(
            sid, Role.INITIATOR, seed, peer_did="b", kid="k", limits=limits, profile=PeerProfile.GO
        )
        self.b = Session(
            sid, Role.RESPONDER, seed, peer_did="a", kid="k", limits=limits, profile=PeerProfile.GO
        )
        self.validator = MessageValidator(clock=clock)

    def send(self, data: bytes) -> Envelope:
        message = seal_go(
            self.a,
            data,
            sender_did="did:a",
            task_id=MESSAGE_TASK,
            message_id=os.urandom(8).hex(),
            created=int(self.clock()),
        )
        return Envelope(
            id=message.id,
            context_id=message.context_id,
            task_id=message.task_id,
            did=message.did,
            role="user",
            payload=message.sealed,
            signature=message.signature,
            metadata=message.metadata(),
            raw_payload=b64std(message.sealed),
        )

    def receive(self, envelope: Envelope, payload: str | None = None) -> bytes:
        return self.validator.open_go(
            self.b, payload or envelope.raw_payload, envelope.metadata, envelope
        )


def test_go_swap_is_refused_even_after_the_message_id_window(clock) -> None:
    """The message-id cache forgets after its TTL; the ciphertext memory must not."""
    pair = GoPair(clock)
    first = pair.send(b"old")
    assert pair.receive(first) == b"old"
    clock.advance(NONCE_TTL + 60)
    fresh = pair.send(b"new")
    with pytest.raises(ReplayError) as info:
        pair.receive(fresh, first.raw_payload)
    assert info.value.code == "ciphertext_replayed"
    assert pair.receive(fresh) == b"new"


def test_go_tampered_copies_neither_count_nor_are_remembered(clock) -> None:
    pair = GoPair(clock, max_messages=3)
    genuine = pair.send(b"x")
    for _ in range(20):  # more copies than the session's whole message budget
        with pytest.raises(CryptoError):
            pair.receive(genuine, _tamper(genuine.raw_payload, "tag"))
    assert pair.b.message_count == 0 and not pair.validator.replays(pair.b).sealed
    assert pair.receive(genuine) == b"x"


def test_go_ciphertext_memory_is_bounded_by_the_message_limit(clock) -> None:
    pair = GoPair(clock, max_messages=3)
    for i in range(3):
        assert pair.receive(pair.send(b"%d" % i)) == b"%d" % i
    replays = pair.validator.replays(pair.b)
    assert len(replays.sealed) == 3 and len(replays.nonces) == 3
    with pytest.raises(SessionExpiredError):
        pair.receive(pair.send(b"one too many"))
    assert len(replays.sealed) == 3
    pair.b.close()
    assert pair.b.replays is None  # dropped with the session
