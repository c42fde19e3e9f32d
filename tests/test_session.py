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
