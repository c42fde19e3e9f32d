"""Session messages: sealing, RFC 9421-style signatures, and replay protection.

Every message carries a random 16-byte nonce, a timestamp and a sequence number. The
covered metadata (method, path, context id, content digest, nonce, timestamp, sequence,
type) is signed with HMAC-SHA256 under the sender's directional signing key, and the
payload is sealed with ChaCha20-Poly1305. The receiver checks, in order: signature,
timestamp tolerance, nonce freshness (replay), sequence order, then marks the nonce seen
and opens the payload.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property

from .encoding import b64url, format_rfc3339, from_b64std, from_b64url, parse_rfc3339
from .errors import (
    InvalidMessageError,
    ReplayError,
    SequenceError,
    SignatureError,
    TimestampSkewError,
)
from .session import Session

NONCE_SIZE = 16
TIMESTAMP_TOLERANCE = 30.0
NONCE_TTL = 300.0


class MessageType(str, Enum):
    TEXT = "text"
    BINARY = "binary"


class NonceStatus(str, Enum):
    VALID = "valid"
    INVALID = "invalid"  # seen before: a replay
    EXPIRED = "expired"  # outside the time window the cache can vouch for


@dataclass(frozen=True)
class SecureMessage:
    """One sealed message as it travels: everything but ``ciphertext`` is signed metadata."""

    session_id: str
    seq: int
    nonce: bytes
    timestamp_ns: int
    type: MessageType
    ciphertext: bytes
    signature: bytes

    @cached_property  # needed by the metadata, the signature base and the parser alike
    def content_digest(self) -> str:
        return (
            "sha-256=:" + base64.b64encode(hashlib.sha256(self.ciphertext).digest()).decode() + ":"
        )

    def metadata(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "nonce": b64url(self.nonce),
            "timestamp": format_rfc3339(self.timestamp_ns),
            "type": self.type.value,
            "content-digest": self.content_digest,
            "signature-input": signature_params(self),
            "signature": f"sig1=:{base64.b64encode(self.signature).decode()}:",
        }

    def to_wire(self) -> dict[str, object]:
        return {"payload": base64.b64encode(self.ciphertext).decode(), "metadata": self.metadata()}

    @classmethod
    def from_wire(cls, session_id: str, payload: object, metadata: object) -> SecureMessage:
        """Parse the wire form; any malformation is an :class:`InvalidMessageError`."""
        if not isinstance(metadata, dict):
            raise InvalidMessageError("metadata must be an object", code="bad_metadata")
        seq = metadata.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**63:
            raise InvalidMessageError("seq must be a positive integer", code="bad_metadata")
        nonce = from_b64url(metadata.get("nonce"), "nonce")
        if len(nonce) != NONCE_SIZE:
            raise InvalidMessageError("nonce must be 16 bytes", code="bad_metadata")
        try:
            mtype = MessageType(metadata.get("type"))
        except ValueError as exc:
            raise InvalidMessageError("type must be text or binary", code="bad_metadata") from exc
        sig = metadata.get("signature")
        if not isinstance(sig, str) or not sig.startswith("sig1=:") or not sig.endswith(":"):
            raise InvalidMessageError(
                "signature must be sig1=:<base64>:", code="bad_signature_field"
            )
        message = cls(
            session_id=session_id,
            seq=seq,
            nonce=nonce,
            timestamp_ns=parse_rfc3339(metadata.get("timestamp")),
            type=mtype,
            ciphertext=from_b64std(payload, "payload"),
            signature=from_b64std(sig[6:-1], "signature"),
        )
        if metadata.get("content-digest") != message.content_digest:
            raise SignatureError("content digest does not match payload", code="digest_mismatch")
        return message


def signature_params(message: SecureMessage) -> str:
    covered = (
        '"@method" "@path" "x-sage-context-id" "content-digest" "sage-seq" "sage-nonce" '
        '"sage-type" "sage-timestamp"'
    )
    return f'sig1=({covered});created={message.timestamp_ns // 1_000_000_000};alg="hmac-sha256"'


def signature_base(message: SecureMessage, method: str, path: str) -> bytes:
    """The RFC 9421 signature base: one covered component a line, params last."""
    return (
        f'"@method": {method}\n'
        f'"@path": {path}\n'
        f'"x-sage-context-id": {message.session_id}\n'
        f'"content-digest": {message.content_digest}\n'
        f'"sage-seq": {message.seq}\n'
        f'"sage-nonce": {b64url(message.nonce)}\n'
        f'"sage-type": {message.type.value}\n'
        f'"sage-timestamp": {message.timestamp_ns}\n'
        f'"@signature-params": {signature_params(message)[5:]}'
    ).encode()


def _nonce_key(message: SecureMessage) -> bytes:
    """Nonces are unique per session: the cache key binds the two."""
    return message.session_id.encode() + message.nonce


def _aad(session_id: str, seq: int, nonce: bytes, mtype: MessageType) -> bytes:
    return b"%s|%d|%s|%s" % (session_id.encode(), seq, nonce, mtype.value.encode())


def seal(
    session: Session,
    data: str | bytes,
    *,
    method: str = "POST",
    path: str = "/messages",
    now_ns: int | None = None,
) -> SecureMessage:
    """Encrypt and sign ``data`` for the session's peer; text is sent as UTF-8."""
    mtype = MessageType.TEXT if isinstance(data, str) else MessageType.BINARY
    plaintext = data.encode() if isinstance(data, str) else data
    seq = session.next_send_seq
    session.next_send_seq = seq + 1
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = session.encrypt(plaintext, _aad(session.id, seq, nonce, mtype))
    unsigned = SecureMessage(
        session.id, seq, nonce, time.time_ns() if now_ns is None else now_ns, mtype, ciphertext, b""
    )
    signature = session.sign(signature_base(unsigned, method, path))
    return replace(unsigned, signature=signature)


class NonceCache:
    """Nonces seen within ``ttl``, bounded to ``max_size`` entries.

    When full, the oldest entry is evicted and the cache stops vouching for anything
    timestamped before it (``floor``): such messages are refused as expired, never
    accepted, so a bounded cache cannot reopen a replay window.
    """

    def __init__(
        self,
        ttl: float = NONCE_TTL,
        max_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.floor = 0.0

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, stamp = next(iter(seen.items()))
            if stamp + self.ttl > now:
                break
            del seen[key]

    def check(self, key: bytes, timestamp: float) -> NonceStatus:
        now = self.clock()
        self._prune(now)
        if timestamp <= self.floor or timestamp + self.ttl <= now:
            return NonceStatus.EXPIRED
        if key in self._seen:
            return NonceStatus.INVALID
        return NonceStatus.VALID

    def mark(self, key: bytes, timestamp: float | None = None) -> None:
        """Remember ``key``; ``timestamp`` is the message's own, which may run ahead of the clock.

        An entry is kept (and, once evicted, raises the floor) to the later of the two, so
        neither pruning nor eviction can let a replay of it through as fresh.
        """
        now = self.clock()
        self._seen[key] = now if timestamp is None else max(now, timestamp)
        while len(self._seen) > self.max_size:
            _, stamp = self._seen.popitem(last=False)
            self.floor = max(self.floor, stamp)


class MessageValidator:
    """Checks inbound messages in the protocol's order and opens them."""

    def __init__(
        self,
        nonces: NonceCache | None = None,
        tolerance: float = TIMESTAMP_TOLERANCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nonces = nonces if nonces is not None else NonceCache(clock=clock)
        self.tolerance = tolerance
        self.clock = clock

    def validate_nonce(self, message: SecureMessage) -> NonceStatus:
        """Whether ``message``'s nonce is fresh, without marking it seen."""
        return self.nonces.check(_nonce_key(message), message.timestamp_ns / 1e9)

    def open_wire(
        self,
        session: Session,
        payload: object,
        metadata: object,
        *,
        method: str = "POST",
        path: str = "/messages",
    ) -> str | bytes:
        """Process one inbound message as it arrived: parse it, then :meth:`open` it.

        This is the unit of message processing: a message refused while parsing (bad
        metadata, content digest mismatch) is a failed message like any other.
        """
        message = SecureMessage.from_wire(session.id, payload, metadata)
        return self.open(session, message, method=method, path=path)

    def open(
        self,
        session: Session,
        message: SecureMessage,
        *,
        method: str = "POST",
        path: str = "/messages",
    ) -> str | bytes:
        session.verify(signature_base(message, method, path), message.signature)
        sent_at = message.timestamp_ns / 1e9
        if abs(sent_at - self.clock()) > self.tolerance:
            raise TimestampSkewError("timestamp outside tolerance")
        key = _nonce_key(message)
        status = self.nonces.check(key, sent_at)
        if status is NonceStatus.INVALID:
            raise ReplayError("nonce already seen")
        if status is NonceStatus.EXPIRED:
            raise TimestampSkewError("nonce window expired", code="nonce_expired")
        if message.seq <= session.last_recv_seq:
            raise SequenceError("sequence number not increasing")
        self.nonces.mark(key, sent_at)
        session.last_recv_seq = message.seq
        session.note_received()
        plaintext = session.decrypt(
            message.ciphertext, _aad(message.session_id, message.seq, message.nonce, message.type)
        )
        return (
            plaintext.decode("utf-8", "replace") if message.type is MessageType.TEXT else plaintext
        )
