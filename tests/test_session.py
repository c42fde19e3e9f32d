from __future__ import annotations

import hmac
import os

import pytest

from sage_otel.agent.errors import (
    CryptoError,
    SageError,
    SessionExpiredError,
    SessionNotFoundError,
    SignatureError,
)
from sage_otel.agent.keyschedule import directional_keys, session_id
from sage_otel.agent.session import (
    AEAD_NONCE_SIZE,
    AEAD_TAG_SIZE,
    EndReason,
    Role,
    Session,
    SessionLimits,
    SessionManager,
)

LIMITS = SessionLimits(max_age=100.0, idle_timeout=10.0, max_messages=5)


def pair(clock, limits: SessionLimits = LIMITS) -> tuple[SessionManager, Session, Session]:
    """One manager per side would be realistic; one manager holding both keeps counts simple."""
    seed = os.urandom(32)
    sid = session_id(seed)
    initiator_mgr = SessionManager(limits, clock=clock)
    initiator = initiator_mgr.create(sid, Role.INITIATOR, seed, peer_did="did:b", kid="kid-1")
    responder = Session(
        sid, Role.RESPONDER, seed, peer_did="did:a", kid="kid-1", limits=limits, clock=clock
    )
    return initiator_mgr, initiator, responder


def test_directional_keys_are_split_by_role(clock) -> None:
    _, initiator, responder = pair(clock)
    assert len({bytes(s) for s in initiator._secrets}) == 4
    assert [bytes(s) for s in initiator._secrets] == [bytes(s) for s in responder._secrets]

    assert responder.decrypt(initiator.encrypt(b"c2s")) == b"c2s"
    assert initiator.decrypt(responder.encrypt(b"s2c")) == b"s2c"
    # Each side's own sends are not readable with its receive key.
    with pytest.raises(CryptoError) as info:
        initiator.decrypt(initiator.encrypt(b"loop"))
    assert info.value.code == "decrypt_failed"
    with pytest.raises(CryptoError):
        responder.decrypt(responder.encrypt(b"loop"))


def test_session_keys_match_the_key_schedule(clock) -> None:
    seed = bytes(range(32))
    sid = session_id(seed)
    session = Session(sid, Role.INITIATOR, seed, peer_did="p", kid="k", limits=LIMITS, clock=clock)
    keys = directional_keys(seed, sid)
    assert [bytes(s) for s in session._secrets] == [
        keys.c2s_encrypt,
        keys.c2s_sign,
        keys.s2c_encrypt,
        keys.s2c_sign,
    ]
    assert session.sign(b"data") == hmac.digest(keys.c2s_sign, b"data", "sha256")


def test_signing_is_directional(clock) -> None:
    _, initiator, responder = pair(clock)
    tag = initiator.sign(b"covered")
    responder.verify(b"covered", tag)
    with pytest.raises(SignatureError):
        responder.verify(b"covereD", tag)
    with pytest.raises(SignatureError):
        initiator.verify(b"covered", tag)
    initiator.verify(b"back", responder.sign(b"back"))


def test_wire_form_is_nonce_then_ciphertext_with_fresh_nonces(clock) -> None:
    _, initiator, responder = pair(clock)
    first, second = initiator.encrypt(b"same"), initiator.encrypt(b"same")
    assert len(first) == AEAD_NONCE_SIZE + len(b"same") + AEAD_TAG_SIZE
    assert first[:AEAD_NONCE_SIZE] != second[:AEAD_NONCE_SIZE] and first != second
    empty = initiator.encrypt(b"")
    assert len(empty) == AEAD_NONCE_SIZE + AEAD_TAG_SIZE
    assert responder.decrypt(empty) == b""


def test_aad_is_authenticated(clock) -> None:
    _, initiator, responder = pair(clock)
    wire = initiator.encrypt(b"body", b"aad-1")
    with pytest.raises(CryptoError) as info:
        responder.decrypt(wire, b"aad-2")
    assert info.value.code == "decrypt_failed"
    assert responder.decrypt(wire, b"aad-1") == b"body"


@pytest.mark.parametrize("length", [0, 1, AEAD_NONCE_SIZE, AEAD_NONCE_SIZE + AEAD_TAG_SIZE - 1])
def test_truncated_ciphertext(clock, length: int) -> None:
    _, initiator, responder = pair(clock)
    wire = initiator.encrypt(b"some plaintext")
    with pytest.raises(CryptoError) as info:
        responder.decrypt(wire[:length])
    assert info.value.code == "truncated_ciphertext"
    assert info.value.http_status == 400


def test_tampered_ciphertext(clock) -> None:
    _, initiator, responder = pair(clock)
    wire = bytearray(initiator.encrypt(b"some plaintext"))
    for index in (0, AEAD_NONCE_SIZE, len(wire) - 1):
        tampered = bytearray(wire)
        tampered[index] ^= 0x01
        with pytest.raises(CryptoError):
            responder.decrypt(bytes(tampered))
    with pytest.raises(CryptoError):
        responder.decrypt(bytes(wire[:-1]))


def test_max_age_expires_via_manager(clock) -> None:
    manager, session, responder = pair(clock, SessionLimits(max_age=100.0, idle_timeout=10.0))
    for _ in range(11):  # stay active: 11 x 9 s = 99 s, under max_age
        clock.advance(9.0)
        assert manager.get(session.id) is session
        session.decrypt(responder.encrypt(b"keeps it from idling"))
    clock.advance(0.5)
    assert manager.get(session.id) is session
    clock.advance(0.5)
    assert session.expired_reason() is EndReason.MAX_AGE
    with pytest.raises(SessionExpiredError) as info:
        manager.get(session.id)
    assert info.value.code == "session_expired" and info.value.http_status == 410
    assert manager.active_count == 0
    assert session.closed and session.end_reason is EndReason.MAX_AGE
    assert all(secret == bytearray(len(secret)) for secret in session._secrets)
    with pytest.raises(SessionNotFoundError):
        manager.get(session.id)


def test_idle_timeout_is_refreshed_by_use(clock) -> None:
    manager, session, responder = pair(clock)
    for _ in range(3):
        clock.advance(LIMITS.idle_timeout - 1)
        assert manager.get(session.id) is session
        responder.decrypt(session.encrypt(b"x"))
    # decrypt also counts as activity.
    clock.advance(LIMITS.idle_timeout - 1)
    session.decrypt(responder.encrypt(b"y"))
    clock.advance(LIMITS.idle_timeout - 1)
    assert manager.get(session.id) is session
    clock.advance(1)
    with pytest.raises(SessionExpiredError):
        manager.get(session.id)
    assert session.end_reason is EndReason.IDLE
    assert manager.active_count == 0


def test_max_messages_counts_sends_and_accepted_receipts(clock) -> None:
    manager, session, _ = pair(clock, SessionLimits(max_messages=3))
    session.encrypt(b"1")
    session.note_received()
    session.encrypt(b"3")
    assert session.message_count == 3
    with pytest.raises(SessionExpiredError):
        session.note_received()
    assert session.message_count == 3
    # The limit is enforced on inbound messages: an answer to the last one can still go out.
    session.encrypt(b"answer")
    assert session.message_count == 4
    assert session.expired_reason() is EndReason.MAX_MESSAGES
    with pytest.raises(SessionExpiredError):
        manager.get(session.id)
    assert session.end_reason is EndReason.MAX_MESSAGES
    assert manager.active_count == 0


def test_sweep_expires_only_sessions_past_a_limit(clock) -> None:
    manager = SessionManager(LIMITS, clock=clock)
    old = [
        manager.create(f"old-{i}", Role.RESPONDER, os.urandom(32), peer_did="p", kid="k")
        for i in range(2)
    ]
    clock.advance(LIMITS.idle_timeout - 1)
    fresh = manager.create("fresh", Role.RESPONDER, os.urandom(32), peer_did="p", kid="k")
    assert manager.sweep() == 0
    clock.advance(1)
    assert manager.sweep() == 2
    assert manager.active_count == 1
    assert all(s.closed and s.end_reason is EndReason.IDLE for s in old)
    assert not fresh.closed
    assert manager.sweep() == 0
    assert manager.get("fresh") is fresh


def test_close_zeroes_keys_and_refuses_further_use(clock) -> None:
    manager, session, responder = pair(clock)
    wire = responder.encrypt(b"late")
    tag = responder.sign(b"late")
    secrets = list(session._secrets)
    assert any(any(secret) for secret in secrets)
    assert manager.close(session.id) is True
    assert manager.close(session.id) is False
    assert session.closed and session.end_reason is EndReason.CLOSED
    assert all(s is t for s, t in zip(session._secrets, secrets, strict=True))
    assert all(secret == bytearray(32) for secret in secrets)
    assert session.expired_reason() is EndReason.CLOSED
    with pytest.raises(SessionExpiredError):
        session.encrypt(b"x")
    with pytest.raises(SessionExpiredError):
        session.decrypt(wire)
    with pytest.raises(SessionExpiredError):
        session.sign(b"x")
    with pytest.raises(SessionExpiredError):
        session.verify(b"late", tag)
    with pytest.raises(SessionExpiredError):
        session.note_received()
    with pytest.raises(SessionNotFoundError) as info:
        manager.get(session.id)
    assert info.value.code == "unknown_session" and info.value.http_status == 404
    assert manager.active_count == 0


def test_close_is_idempotent_and_keeps_first_reason(clock) -> None:
    _, session, _ = pair(clock)
    session.close(EndReason.IDLE)
    session.close(EndReason.CLOSED)
    assert session.end_reason is EndReason.IDLE


def test_session_closed_directly_is_expired_by_manager(clock) -> None:
    manager, session, _ = pair(clock)
    session.close()
    with pytest.raises(SessionExpiredError):
        manager.get(session.id)
    assert manager.active_count == 0


def test_manager_refuses_duplicates_and_respects_capacity(clock) -> None:
    manager = SessionManager(clock=clock, max_sessions=2)
    manager.create("a", Role.INITIATOR, os.urandom(32), peer_did="p", kid="k")
    with pytest.raises(SageError) as info:
        manager.create("a", Role.INITIATOR, os.urandom(32), peer_did="p", kid="k")
    assert info.value.code == "session_exists"
    manager.create("b", Role.INITIATOR, os.urandom(32), peer_did="p", kid="k")
    with pytest.raises(SageError) as info:
        manager.create("c", Role.INITIATOR, os.urandom(32), peer_did="p", kid="k")
    assert info.value.code == "session_capacity"
    assert manager.active_count == 2
    manager.close("a")
    manager.create("c", Role.INITIATOR, os.urandom(32), peer_did="p", kid="k")


def test_close_all(clock) -> None:
    manager = SessionManager(clock=clock)
    sessions = [
        manager.create(str(i), Role.RESPONDER, os.urandom(32), peer_did="p", kid="k")
        for i in range(5)
    ]
    manager.close_all()
    assert manager.active_count == 0
    assert all(s.closed and not any(any(k) for k in s._secrets) for s in sessions)


def test_default_limits_are_the_reference_defaults() -> None:
    limits = SessionLimits()
    assert (limits.max_age, limits.idle_timeout, limits.max_messages) == (3600.0, 600.0, 1000)


def _fill(manager: SessionManager, peer: str, count: int, source: str = "") -> list[Session]:
    return [
        manager.create(
            os.urandom(8).hex(),
            Role.RESPONDER,
            os.urandom(32),
            peer_did=peer,
            kid="k",
            source=source,
        )
        for _ in range(count)
    ]


def test_a_full_table_evicts_the_longest_idle_session_of_the_biggest_holder(clock) -> None:
    manager = SessionManager(clock=clock, max_sessions=6, new_peer_share=1.0)
    (lone,) = _fill(manager, "did:lone", 1)
    greedy = _fill(manager, "did:greedy", 5)
    clock.advance(1)
    for session in greedy[1:]:
        session.note_received()  # greedy[0] is now its longest idle
    (newcomer,) = _fill(manager, "did:new", 1)
    assert greedy[0].end_reason is EndReason.EVICTED and greedy[0].closed
    assert not lone.closed and manager.active_count == 6
    # A lone session is never evicted for someone else: a newcomer is refused 429
    # (newcomers hold the table), so is a peer at its fair share; 503 only for no room.
    small = SessionManager(clock=clock, max_sessions=2, new_peer_share=1.0)
    _fill(small, "did:a", 1)
    _fill(small, "did:b", 1)
    with pytest.raises(SageError) as info:
        _fill(small, "did:c", 1)
    assert info.value.code == "new_peer_share" and info.value.http_status == 429
    with pytest.raises(SageError) as info:
        _fill(small, "did:a", 1)
    assert info.value.code == "session_capacity" and info.value.http_status == 429
    with pytest.raises(SageError) as info:
        _fill(SessionManager(clock=clock, max_sessions=0), "did:a", 1)
    assert info.value.code == "session_capacity" and info.value.http_status == 503
    assert newcomer.peer_did == "did:new"


def test_newcomers_hold_at_most_their_share_of_the_table(clock) -> None:
    manager = SessionManager(clock=clock, max_sessions=10, new_peer_share=0.5)
    established = _fill(manager, "did:old", 1)
    for n in range(4):
        _fill(manager, f"did:fresh-{n}", 1)
    with pytest.raises(SageError) as info:
        _fill(manager, "did:fresh-5", 1)
    assert info.value.code == "new_peer_share" and info.value.http_status == 429
    _fill(manager, "did:old", 5)  # a peer that holds a session is not a newcomer
    assert manager.active_count == 10 and not established[0].closed
    assert not manager.is_established("did:old")
    clock.advance(60)
    assert manager.is_established("did:old") and not manager.is_established("did:fresh-5")


def test_newcomers_from_one_address_make_room_for_others(clock) -> None:
    manager = SessionManager(clock=clock, max_sessions=8, new_peer_share=0.5)
    crowd = [_fill(manager, f"did:bot-{n}", 1, "203.0.113.9")[0] for n in range(4)]
    (other,) = _fill(manager, "did:elsewhere", 1, "198.51.100.4")
    assert sum(s.end_reason is EndReason.EVICTED for s in crowd) == 1 and not other.closed


def test_sessions_per_address(clock) -> None:
    manager = SessionManager(clock=clock, max_sessions_per_address=2)
    _fill(manager, "did:a", 1, "2001:db8::1")
    _fill(manager, "did:b", 1, "2001:db8::2")  # the same /64
    with pytest.raises(SageError) as info:
        _fill(manager, "did:c", 1, "2001:db8::3")
    assert info.value.code == "address_session_limit" and info.value.http_status == 429
    _fill(manager, "did:c", 1, "2001:db8:0:1::3")
    _fill(manager, "did:d", 3, "127.0.0.1")  # loopback is not counted
    off = SessionManager(clock=clock, max_sessions_per_address=0)
    _fill(off, "did:e", 5, "203.0.113.9")
    assert off.active_count == 5


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8:0:0:ffff::1", "2001:db8::/64"),
        ("127.0.0.1", None),
        ("::1", None),
        ("", None),
        ("testclient", None),
    ],
)
def test_address_key(source: str, key: str | None) -> None:
    from sage_otel.agent.session import address_key

    assert address_key(source) == key
