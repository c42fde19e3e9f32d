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
import ipaddress
import math
import os
import time
from collections.abc import Callable, Iterator
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
    EVICTED = "evicted"  # the table was full and this peer held more than its share


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
        self.replays: object | None = None  # its SessionReplays, made on first use
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

    Admission, so that many identities cannot take the table from the others:

    * ``max_sessions_per_peer`` bounds each peer DID (beyond it: 429 ``peer_session_limit``)
      and ``max_sessions_per_address`` each source address, an IPv6 /64 counting as one
      (429 ``address_session_limit``; 0 turns it off; loopback sources are not counted:
      see :func:`address_key`);
    * a *newcomer* session (its peer DID held no live session when it was created) may
      hold at most ``new_peer_share`` of the table, so a flood of fresh DIDs leaves the
      rest to peers that already hold sessions (beyond it: 429 ``new_peer_share``); a peer
      whose oldest live session is ``established_after`` seconds old is *established*
      (:meth:`is_established`), which the global handshake rate favours;
    * ``max_sessions`` bounds them all. When the table (or the newcomers' share) is full,
      the longest-idle session of the biggest holder (a DID or an address) is evicted if
      that holder has at least two sessions more than the newcomer; only when no holder
      has is the newcomer refused: 429 ``new_peer_share`` (newcomers hold their share),
      429 ``session_capacity`` (it holds sessions already), else 503 ``session_capacity``
      (a table with no room at all, e.g. ``max_sessions=0``).
    """

    def __init__(
        self,
        limits: SessionLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = 100_000,
        max_sessions_per_peer: int = 64,
        *,
        max_sessions_per_address: int = 4096,
        new_peer_share: float = 0.5,
        established_after: float = 60.0,
    ) -> None:
        if not 0.0 < new_peer_share <= 1.0:
            raise ValueError(f"new_peer_share must be in (0, 1], not {new_peer_share!r}")
        self.limits = limits or SessionLimits()
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_sessions_per_peer = max_sessions_per_peer
        self.max_sessions_per_address = max_sessions_per_address
        self.new_peer_share = new_peer_share
        self.established_after = established_after
        self._sessions: dict[str, Session] = {}
        self._by_peer = _Holdings()
        self._by_address = _Holdings()
        self._address_of: dict[str, str] = {}  # session id -> address key, when counted
        self._newcomers: set[str] = set()  # ids of newcomer sessions
        self._newcomers_by_address = _Holdings()

    @property
    def active_count(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        """Whether ``session_id`` names a session still held (ended ones are not)."""
        return session_id in self._sessions

    def create(
        self,
        session_id: str,
        role: Role,
        seed: bytes,
        *,
        peer_did: str,
        kid: str,
        profile: PeerProfile = PeerProfile.NATIVE,
        source: str = "",
    ) -> Session:
        """A new live session; ``source`` is the peer's network address, if known."""
        if session_id in self._sessions:
            raise SageError("session id already in use", code="session_exists")
        self.admit(peer_did, source=source)
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
        peer, address = _peer_key(peer_did), address_key(source)
        if not self._by_peer.count(peer):
            self._newcomers.add(session_id)
            if address is not None:
                self._newcomers_by_address.add(address, session_id)
        self._sessions[session_id] = session
        self._by_peer.add(peer, session_id)
        if address is not None:
            self._by_address.add(address, session_id)
            self._address_of[session_id] = address
        return session

    def is_established(self, peer_did: str) -> bool:
        """Whether ``peer_did`` holds a live session created ``established_after`` seconds
        ago or more: what a flood of fresh DIDs cannot claim (see GlobalHandshakeLimiter)."""
        oldest = next(self._by_peer.ids(_peer_key(peer_did)), None)  # ids in creation order
        if oldest is None:
            return False
        return self.clock() - self._sessions[oldest].created_at >= self.established_after

    def check_shares(self, peer_did: str, source: str = "") -> tuple[int, int]:
        """Raise if ``peer_did`` or ``source`` already holds its whole share; else the
        sessions each holds. Changes nothing: checked before a handshake spends any shared
        allowance (the global rate), so a peer at its limit cannot spend it for others."""
        held = self._by_peer.count(_peer_key(peer_did))
        if held >= self.max_sessions_per_peer:
            raise RateLimitedError("too many sessions for this peer", code="peer_session_limit")
        address = address_key(source)
        from_address = self._by_address.count(address) if address is not None else 0
        if self.max_sessions_per_address and from_address >= self.max_sessions_per_address:
            raise RateLimitedError(
                "too many sessions from this address", code="address_session_limit"
            )
        return held, from_address

    def admit(self, peer_did: str, *, source: str = "") -> None:
        """Raise unless one more session with ``peer_did`` from ``source`` fits, evicting
        the longest-idle session of a much bigger holder to make room; cheap, so checked
        before any handshake work."""
        held, from_address = self.check_shares(peer_did, source)
        address = address_key(source)
        table_full = len(self._sessions) >= self.max_sessions
        newcomers_full = len(self._newcomers) >= math.ceil(self.new_peer_share * self.max_sessions)
        if not held and newcomers_full:
            mine = self._newcomers_by_address.count(address) if address is not None else 0
            if self._evict_from((self._newcomers_by_address, mine)):
                return
            if self._newcomers:  # other newcomers hold the share: a limit on them, not us
                raise RateLimitedError(
                    "new peers hold their share of sessions", code="new_peer_share"
                )
        by_address = (self._by_address, from_address)
        if table_full and not self._evict_from((self._by_peer, held), by_address):
            if held:  # this peer holds its fair share already
                raise RateLimitedError("session table full", code="session_capacity")
            raise OverloadError("session table full", code="session_capacity")

    def _evict_from(self, *candidates: tuple[_Holdings, int]) -> bool:
        """Expire the longest-idle session of the biggest holder among ``candidates`` (each
        a grouping and the newcomer's own count in it) if it holds at least two sessions
        more than the newcomer, so that after the swap it still holds no fewer; False when
        no holder does."""
        best: tuple[int, _Holdings, object] = (1, self._by_peer, None)
        for holdings, own in candidates:
            biggest = holdings.biggest()
            if biggest is not None and biggest[1] - own > best[0]:
                best = (biggest[1] - own, holdings, biggest[0])
        _, holdings, holder = best
        if holder is None:
            return False
        victim = min((self._sessions[i] for i in holdings.ids(holder)), key=_idle_since)
        self.expire(victim, EndReason.EVICTED)
        return True

    def _forget(self, session: Session) -> None:
        del self._sessions[session.id]
        self._by_peer.remove(_peer_key(session.peer_did), session.id)
        address = self._address_of.pop(session.id, None)
        if address is not None:
            self._by_address.remove(address, session.id)
            self._newcomers_by_address.remove(address, session.id)
        self._newcomers.discard(session.id)

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


def _idle_since(session: Session) -> float:
    return session.last_used


class _Holdings:
    """Live session ids grouped by holder (a peer DID or an address key), with the biggest
    holder found in constant time: eviction under a flood must not scan the table."""

    def __init__(self) -> None:
        self._ids: dict[object, dict[str, None]] = {}
        self._of_size: dict[int, dict[object, None]] = {}
        self._top = 0

    def count(self, holder: object) -> int:
        ids = self._ids.get(holder)
        return len(ids) if ids else 0

    def ids(self, holder: object) -> Iterator[str]:
        return iter(self._ids.get(holder, ()))

    def add(self, holder: object, session_id: str) -> None:
        ids = self._ids.setdefault(holder, {})
        if session_id not in ids:
            ids[session_id] = None
            self._resize(holder, len(ids) - 1, len(ids))

    def remove(self, holder: object, session_id: str) -> None:
        ids = self._ids.get(holder)
        if ids is None or session_id not in ids:
            return
        del ids[session_id]
        if not ids:
            del self._ids[holder]
        self._resize(holder, len(ids) + 1, len(ids))

    def biggest(self) -> tuple[object, int] | None:
        """A holder with the most sessions, and how many; None when nobody holds any."""
        if not self._top:
            return None
        return next(iter(self._of_size[self._top])), self._top

    def _resize(self, holder: object, old: int, new: int) -> None:
        if old:
            same = self._of_size[old]
            del same[holder]
            if not same:
                del self._of_size[old]
        if new:
            self._of_size.setdefault(new, {})[holder] = None
        self._top = max(self._top, new)
        while self._top and self._top not in self._of_size:
            self._top -= 1


@functools.lru_cache(maxsize=4096)
def address_key(source: str) -> str | None:
    """The unit that per-address limits count: an IPv4 address or an IPv6 /64 (one host
    usually holds a whole /64). None, not counted, for no address, a name that is not an
    address (a test transport, a Unix socket) and loopback: a loopback peer is a local
    process or a reverse proxy on this host that does not forward the client's address,
    and uvicorn believes X-Forwarded-For from loopback by default (FORWARDED_ALLOW_IPS),
    so the address says nothing about who is behind it."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
