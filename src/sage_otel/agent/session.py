"""Secure sessions: directional ChaCha20-Poly1305 keys, HMAC signing keys, and limits.

A session is created from the handshake seed. Each direction has its own encryption and
signing key; the initiator sends with the client-to-server pair. Sessions end by explicit
close or by a limit (max age, idle timeout, max messages); either way the session refuses all
further use and overwrites its own key buffers. That is best effort, not erasure: see
:meth:`Session.close`.
"""

from __future__ import annotations

import functools
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import (
    CryptoError,
    OverloadError,
    RateLimitedError,
    SageError,
    SessionExpiredError,
    SessionNotFoundError,
    SignatureError,
)
from .identity import parse_did
from .keyschedule import directional_keys

AEAD_NONCE_SIZE = 12
AEAD_TAG_SIZE = 16


class PeerProfile(str, Enum):
    """How a session's messages travel; fixed at the handshake, never changed afterwards.

    ``native``: each message carries nonce, timestamp and sequence under the directional MAC,
    and the reply comes back sealed in the HTTP answer. ``go``: the SAGE Go reference's
    envelope (MAC over the RFC 9421 base of method, path and the ``X-SAGE-*`` fields, AEAD
    without associated data); the answer is bare and each side POSTs its messages to the
    other's endpoint. The initiator announces ``native`` inside its signed payload, so the
    profile cannot be changed in transit; a payload without it (any Go client) is ``go``.
    """

    NATIVE = "native"
    GO = "go"


class Role(str, Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class EndReason(str, Enum):
    CLOSED = "closed"
    MAX_AGE = "max_age"
    IDLE = "idle"
    MAX_MESSAGES = "max_messages"
    PEER_ENDED = "peer_ended"  # the peer answered that the session is gone


@dataclass(frozen=True)
class SessionLimits:
    """Reference defaults: 1 h max age, 10 min idle, 1000 messages."""

    max_age: float = 3600.0
    idle_timeout: float = 600.0
    max_messages: int = 1000


class Session:
    __slots__ = (
        "_closed",
        "_recv_aead",
        "_recv_sign",
        "_secrets",
        "_send_aead",
        "_send_sign",
        "clock",
        "created_at",
        "end_reason",
        "id",
        "kid",
        "last_recv_seq",
        "last_used",
        "limits",
        "message_count",
        "next_send_seq",
        "peer_did",
        "profile",
        "replays",
        "role",
    )

    def __init__(
        self,
        session_id: str,
        role: Role,
        seed: bytes,
        *,
        peer_did: str,
        kid: str,
        limits: SessionLimits,
        clock: Callable[[], float] = time.monotonic,
        profile: PeerProfile = PeerProfile.NATIVE,
    ) -> None:
        keys = directional_keys(seed, session_id)
        # Keys live in bytearrays so close() can overwrite them in place.
        self._secrets = [
            bytearray(k) for k in (keys.c2s_encrypt, keys.c2s_sign, keys.s2c_encrypt, keys.s2c_sign)
        ]
        c2s_enc, c2s_sign, s2c_enc, s2c_sign = self._secrets
        if role is Role.INITIATOR:
            send_enc, self._send_sign, recv_enc, self._recv_sign = (
                c2s_enc,
                c2s_sign,
                s2c_enc,
                s2c_sign,
            )
        else:
            send_enc, self._send_sign, recv_enc, self._recv_sign = (
                s2c_enc,
                s2c_sign,
                c2s_enc,
                c2s_sign,
            )
        self._send_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(bytes(send_enc))
        self._recv_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(bytes(recv_enc))
        self.id = session_id
        self.role = role
        self.peer_did = peer_did
        self.kid = kid
        self.profile = profile
        self.replays: object | None = None  # the session's NonceCache, made on first use
        self.limits = limits
        self.clock = clock
        self.created_at = self.last_used = clock()
        self.message_count = 0
        self.next_send_seq = 1
        self.last_recv_seq = 0
        self.end_reason: EndReason | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def expired_reason(
        self, now: float | None = None, *, count_messages: bool = True
    ) -> EndReason | None:
        """Which limit, if any, this session has passed."""
        if self._closed:
            return self.end_reason or EndReason.CLOSED
        now = self.clock() if now is None else now
        if now - self.created_at >= self.limits.max_age:
            return EndReason.MAX_AGE
        if now - self.last_used >= self.limits.idle_timeout:
            return EndReason.IDLE
        if count_messages and self.message_count >= self.limits.max_messages:
            return EndReason.MAX_MESSAGES
        return None

    def _use(self, *, inbound: bool) -> None:
        # The message limit is enforced on inbound messages only, so a request accepted
        # as the last one can still be answered (both directions count towards it).
        reason = self.expired_reason(count_messages=inbound)
        if reason is not None:
            raise SessionExpiredError(f"session ended: {reason.value}")
        self.message_count += 1
        self.last_used = self.clock()

    def encrypt(self, plaintext: bytes, aad: bytes = b"", nonce: bytes | None = None) -> bytes:
        """Seal with a fresh random nonce; the wire form is nonce || ciphertext.

        ``nonce`` comes from the caller's :class:`~.entropy.Entropy` when it replays a
        recorded exchange; it must never repeat under one key.
        """
        self._use(inbound=False)
        nonce = os.urandom(AEAD_NONCE_SIZE) if nonce is None else nonce
        if len(nonce) != AEAD_NONCE_SIZE:
            raise CryptoError("AEAD nonce must be 12 bytes")
        return nonce + self._send_aead.encrypt(nonce, plaintext, aad)  # type: ignore[union-attr]

    def decrypt(self, wire: bytes, aad: bytes = b"") -> bytes:
        if self._closed:
            raise SessionExpiredError("session closed")
        if len(wire) < AEAD_NONCE_SIZE + AEAD_TAG_SIZE:
            raise CryptoError("ciphertext truncated", code="truncated_ciphertext")
        try:
            plaintext = self._recv_aead.decrypt(  # type: ignore[union-attr]
                wire[:AEAD_NONCE_SIZE], wire[AEAD_NONCE_SIZE:], aad
            )
        except InvalidTag as exc:
            raise CryptoError("message authentication failed", code="decrypt_failed") from exc
        self.last_used = self.clock()
        return plaintext

    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 under this direction's signing key (never the zero key)."""
        if self._closed:
            raise SessionExpiredError("session closed")
        return hmac.digest(self._send_sign, data, "sha256")

    def verify(self, data: bytes, tag: bytes) -> None:
        if self._closed:
            raise SessionExpiredError("session closed")
        if not hmac.compare_digest(hmac.digest(self._recv_sign, data, "sha256"), tag):
            raise SignatureError("message signature invalid")

    def note_received(self) -> None:
        """Count an accepted inbound message against the limits."""
        self._use(inbound=True)

    def close(self, reason: EndReason = EndReason.CLOSED) -> None:
        """Overwrite the key buffers with zeros and refuse any further use.

        Best effort, not erasure: the AEAD objects hold their own copies inside OpenSSL
        (released, not wiped, when dropped here), and Python may have copied a key before.
        """
        if self._closed:
            return
        self._closed = True
        self.replays = None
        self.end_reason = reason
        for secret in self._secrets:
            secret[:] = bytes(len(secret))
        self._send_aead = self._recv_aead = None


class SessionManager:
    """Owns live sessions by id; expired ones are closed on touch or by :meth:`sweep`.

    ``max_sessions`` bounds them all (beyond it: 503 ``session_capacity``);
    ``max_sessions_per_peer`` bounds each peer DID's share (beyond it: 429
    ``peer_session_limit``), so one peer cannot take the table from the others.
    """

    def __init__(
        self,
        limits: SessionLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = 100_000,
        max_sessions_per_peer: int = 64,
    ) -> None:
        self.limits = limits or SessionLimits()
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_sessions_per_peer = max_sessions_per_peer
        self._sessions: dict[str, Session] = {}
        self._per_peer: dict[object, int] = {}

    @property
    def active_count(self) -> int:
        return len(self._sessions)

    def create(
        self,
        session_id: str,
        role: Role,
        seed: bytes,
        *,
        peer_did: str,
        kid: str,
        profile: PeerProfile = PeerProfile.NATIVE,
    ) -> Session:
        if session_id in self._sessions:
            raise SageError("session id already in use", code="session_exists")
        self.admit(peer_did)
        session = Session(
            session_id,
            role,
            seed,
            peer_did=peer_did,
            kid=kid,
            limits=self.limits,
            clock=self.clock,
            profile=profile,
        )
        self._sessions[session_id] = session
        key = _peer_key(peer_did)
        self._per_peer[key] = self._per_peer.get(key, 0) + 1
        return session

    def admit(self, peer_did: str) -> None:
        """Raise unless one more session with ``peer_did`` fits; cheap, so checked early."""
        if len(self._sessions) >= self.max_sessions:
            raise OverloadError("session table full", code="session_capacity")
        if self._per_peer.get(_peer_key(peer_did), 0) >= self.max_sessions_per_peer:
            raise RateLimitedError("too many sessions for this peer", code="peer_session_limit")

    def _forget(self, session: Session) -> None:
        del self._sessions[session.id]
        key = _peer_key(session.peer_did)
        left = self._per_peer.get(key, 1) - 1
        if left > 0:
            self._per_peer[key] = left
        else:
            self._per_peer.pop(key, None)

    def get(self, session_id: str) -> Session:
        """The live session, or a typed error; a session found past a limit is expired here."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFoundError("no such session")
        reason = session.expired_reason()
        if reason is not None:
            self.expire(session, reason)
            raise SessionExpiredError(f"session ended: {reason.value}")
        return session

    def close(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        self._forget(session)
        session.close(EndReason.CLOSED)
        return True

    def expire(self, session: Session, reason: EndReason) -> bool:
        """Remove a session that passed a limit and close it; False if it was not live."""
        live = self._sessions.get(session.id) is session
        if live:
            self._forget(session)
        session.close(reason)
        return live

    def sweep(self) -> int:
        """Expire every session past a limit; returns how many."""
        now = self.clock()
        ended = [(s, r) for s in list(self._sessions.values()) if (r := s.expired_reason(now))]
        for session, reason in ended:
            self.expire(session, reason)
        return len(ended)

    def close_all(self) -> None:
        for session_id in list(self._sessions):
            self.close(session_id)


@functools.lru_cache(maxsize=4096)
def _peer_key(peer_did: str) -> object:
    """A peer counts once however it spells its DID (aliases, address case). Cached: a
    session is admitted, created and ended under the same text; the cache is bounded."""
    try:
        return parse_did(peer_did)
    except SageError:
        return peer_did
