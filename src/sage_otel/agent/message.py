"""Session messages: sealing, RFC 9421-style signatures, and replay protection.

Two envelopes exist, one per :class:`~.session.PeerProfile` of the session:

* native: every message carries a random 16-byte nonce, a timestamp and a sequence number.
  Every field that selects what the receiver does is signed with HMAC-SHA256 under the
  sender's directional signing key: method, path, context id, task id (message or close),
  content digest, nonce, timestamp, sequence and type. The payload is sealed with
  ChaCha20-Poly1305 bound to context, task, sequence, nonce and type as associated data.
  The receiver checks, in order: signature, timestamp tolerance, nonce freshness (replay),
  sequence order, then opens the payload.
* go: the SAGE Go reference's envelope. The MAC covers the RFC 9421 signature base of
  ``"@method" "@path" "x-sage-did" "x-sage-message-id" "x-sage-context-id"
  "x-sage-task-id"`` with ``keyid``, ``alg`` and ``created``; the payload is sealed without
  associated data. The MAC key is the sender's directional signing key, never the all-zero
  key the reference uses. The receiver checks the MAC, ``created`` against the tolerance,
  the message id as the nonce (replay) and the AEAD nonce as a ciphertext never accepted
  before in the session (see :meth:`MessageValidator.open_go`); the envelope has no
  sequence number.

In both profiles replay state (nonce, sequence, AEAD nonce) is checked before the payload is
opened but recorded only once it has opened: a copy tampered in transit is refused without
spending the genuine message's nonce. Checks and commit run in one synchronous call, so on
the agent's single event loop two copies delivered at once cannot both pass.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property
from typing import Protocol

from .encoding import b64url, format_rfc3339, from_b64std, from_b64url, parse_rfc3339
from .envelope import MESSAGE_TASK
from .errors import (
    InvalidMessageError,
    ReplayError,
    SequenceError,
    SessionExpiredError,
    SignatureError,
    TimestampSkewError,
)
from .replay import NonceCache, NonceStatus, SessionReplays
from .session import AEAD_NONCE_SIZE, PeerProfile, Session

NONCE_SIZE = 16
TIMESTAMP_TOLERANCE = 30.0
NONCE_TTL = 300.0
_SEQ = re.compile(r"^[1-9][0-9]{0,17}$")
GO_COMPONENTS = (
    "@method",
    "@path",
    "x-sage-did",
    "x-sage-message-id",
    "x-sage-context-id",
    "x-sage-task-id",
)
_GO_COVERED = " ".join(f'"{c}"' for c in GO_COMPONENTS)
_GO_SIGNATURE_INPUT = re.compile(
    r"^sig1=\(" + re.escape(_GO_COVERED) + r'\);keyid="([^"\\]{1,256})";alg="hmac-sha256";'
    r"created=(0|[1-9][0-9]{0,11})$"
)
GO_METADATA_KEYS = frozenset({"kid", "signature-input"})
MAX_MESSAGE_ID = 256


class MessageType(str, Enum):
    TEXT = "text"
    BINARY = "binary"


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

    def metadata(self) -> dict[str, str]:
        return {
            "seq": str(self.seq),
            "nonce": b64url(self.nonce),
            "timestamp": format_rfc3339(self.timestamp_ns),
            "type": self.type.value,
            "content-digest": self.content_digest,
            "signature-input": signature_params(self),
            "signature": f"sig1=:{base64.b64encode(self.signature).decode()}:",
        }

    def to_wire(self) -> dict[str, object]:  # metadata values are strings, as on Go's side
        return {"payload": base64.b64encode(self.ciphertext).decode(), "metadata": self.metadata()}

    @classmethod
    def from_wire(cls, session_id: str, payload: object, metadata: object) -> SecureMessage:
        """Parse the wire form; any malformation is an :class:`InvalidMessageError`."""
        if not isinstance(metadata, dict):
            raise InvalidMessageError("metadata must be an object", code="bad_metadata")
        seq_text = metadata.get("seq")
        if not isinstance(seq_text, str) or not _SEQ.fullmatch(seq_text):
            raise InvalidMessageError("seq must be a positive decimal string", code="bad_metadata")
        seq = int(seq_text)
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
        '"@method" "@path" "x-sage-context-id" "x-sage-task-id" "content-digest" "sage-seq" '
        '"sage-nonce" "sage-type" "sage-timestamp"'
    )
    return f'sig1=({covered});created={message.timestamp_ns // 1_000_000_000};alg="hmac-sha256"'


def signature_base(
    message: SecureMessage, method: str, path: str, task_id: str = MESSAGE_TASK
) -> bytes:
    """The RFC 9421 signature base: one covered component a line, params last.

    ``task_id`` is covered because it selects the action (deliver or close): without it an
    on-path attacker could relabel a message as a close, or a close as a message.
    """
    return (
        f'"@method": {method}\n'
        f'"@path": {path}\n'
        f'"x-sage-context-id": {message.session_id}\n'
        f'"x-sage-task-id": {task_id}\n'
        f'"content-digest": {message.content_digest}\n'
        f'"sage-seq": {message.seq}\n'
        f'"sage-nonce": {b64url(message.nonce)}\n'
        f'"sage-type": {message.type.value}\n'
        f'"sage-timestamp": {message.timestamp_ns}\n'
        f'"@signature-params": {signature_params(message)[5:]}'
    ).encode()


def _aad(session_id: str, task_id: str, seq: int, nonce: bytes, mtype: MessageType) -> bytes:
    # Redundant with the signature (which covers the ciphertext's digest), so that the AEAD
    # alone would also refuse a ciphertext moved to another session, task or position.
    return b"%s|%s|%d|%s|%s" % (
        session_id.encode(),
        task_id.encode(),
        seq,
        nonce,
        mtype.value.encode(),
    )


def seal(
    session: Session,
    data: str | bytes,
    *,
    method: str = "POST",
    path: str = "/messages",
    now_ns: int | None = None,
    task_id: str = MESSAGE_TASK,
) -> SecureMessage:
    """Encrypt and sign ``data`` for the session's peer, under ``task_id`` (message, close,
    or for a reply the request's); text is sent as UTF-8."""
    mtype = MessageType.TEXT if isinstance(data, str) else MessageType.BINARY
    plaintext = data.encode() if isinstance(data, str) else data
    seq = session.next_send_seq
    session.next_send_seq = seq + 1
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = session.encrypt(plaintext, _aad(session.id, task_id, seq, nonce, mtype))
    unsigned = SecureMessage(
        session.id, seq, nonce, time.time_ns() if now_ns is None else now_ns, mtype, ciphertext, b""
    )
    signature = session.sign(signature_base(unsigned, method, path, task_id))
    return replace(unsigned, signature=signature)


class EnvelopeFields(Protocol):
    """The request fields a go-profile MAC covers (the transport's envelope has them)."""

    id: str
    did: str
    context_id: str
    task_id: str
    signature: bytes


@dataclass(frozen=True)
class GoMessage:
    """A go-profile message as it travels: the envelope fields, sealed payload and MAC."""

    id: str
    did: str
    context_id: str
    task_id: str
    kid: str
    created: int
    sealed: bytes
    signature: bytes

    def signature_input(self) -> str:
        return f"sig1={go_signature_params(self.kid, self.created)}"

    def metadata(self) -> dict[str, str]:
        return {"kid": self.kid, "signature-input": self.signature_input()}


def go_signature_params(kid: str, created: int) -> str:
    return f'({_GO_COVERED});keyid="{kid}";alg="hmac-sha256";created={created}'


def go_signature_base(
    message: GoMessage | EnvelopeFields,
    kid: str,
    created: int,
    *,
    method: str = "POST",
    path: str = "/messages",
) -> bytes:
    """The RFC 9421 signature base the reference's canonicalizer builds for this request."""
    return (
        f'"@method": {method}\n'
        f'"@path": {path}\n'
        f'"x-sage-did": {message.did}\n'
        f'"x-sage-message-id": {message.id}\n'
        f'"x-sage-context-id": {message.context_id}\n'
        f'"x-sage-task-id": {message.task_id}\n'
        f'"@signature-params": {go_signature_params(kid, created)}'
    ).encode()


def seal_go(
    session: Session,
    data: str | bytes,
    *,
    sender_did: str,
    task_id: str,
    message_id: str,
    created: int,
    aead_nonce: bytes | None = None,
    method: str = "POST",
    path: str = "/messages",
) -> GoMessage:
    """Encrypt (no associated data) and MAC ``data`` in the reference's envelope."""
    plaintext = data.encode() if isinstance(data, str) else data
    sealed = session.encrypt(plaintext, b"", aead_nonce)
    unsigned = GoMessage(
        message_id, sender_did, session.id, task_id, session.kid, created, sealed, b""
    )
    base = go_signature_base(unsigned, session.kid, created, method=method, path=path)
    return replace(unsigned, signature=session.sign(base))


def _parse_go_metadata(session: Session, metadata: object) -> int:
    """The ``created`` of a well-formed go-profile metadata object bound to this session."""
    if (
        not isinstance(metadata, dict)
        or set(metadata) != GO_METADATA_KEYS
        or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidMessageError(
            "metadata must be exactly kid and signature-input, as strings", code="bad_metadata"
        )
    match = _GO_SIGNATURE_INPUT.fullmatch(metadata["signature-input"])
    if match is None:
        raise InvalidMessageError(
            "signature-input is not the go profile's", code="bad_signature_field"
        )
    if not (match.group(1) == metadata["kid"] == session.kid):
        raise SignatureError("keyid does not name this session's key", code="wrong_kid")
    return int(match.group(2))


class MessageValidator:
    """Checks inbound messages in the protocol's order and opens them.

    Every ``open*`` checks replay state first (cheap refusals), then opens the payload, and
    only then records the message as seen (:func:`_accept`): the check and the commit run
    in one synchronous call with no ``await`` between them, so on the agent's event loop
    two copies of one message can never both pass, and a copy that fails to open leaves
    the genuine message acceptable.
    """

    def __init__(
        self,
        tolerance: float = TIMESTAMP_TOLERANCE,
        clock: Callable[[], float] = time.time,
        nonce_ttl: float = NONCE_TTL,
    ) -> None:
        self.tolerance = tolerance
        self.clock = clock
        self.nonce_ttl = nonce_ttl

    def replays(self, session: Session) -> SessionReplays:
        """The session's own replay state, bounded by its message limit.

        A session accepts at most ``max_messages`` messages, so its caches never have to
        evict; if the nonce cache ever did, the raised floor would refuse only this
        session's input.
        """
        state = session.replays
        if not isinstance(state, SessionReplays):
            state = session.replays = SessionReplays(
                NonceCache(self.nonce_ttl, session.limits.max_messages, self.clock)
            )
        return state

    def nonces(self, session: Session) -> NonceCache:
        """The session's message nonce (or go message id) cache."""
        return self.replays(session).nonces

    def validate_nonce(self, session: Session, message: SecureMessage) -> NonceStatus:
        """Whether ``message``'s nonce is fresh in ``session``, without marking it seen."""
        return self.nonces(session).check(message.nonce, message.timestamp_ns / 1e9)

    def open_wire(
        self,
        session: Session,
        payload: object,
        metadata: object,
        *,
        method: str = "POST",
        path: str = "/messages",
        envelope: EnvelopeFields | None = None,
        task_id: str = MESSAGE_TASK,
    ) -> str | bytes:
        """Process one inbound message as it arrived: parse it, then open it.

        This is the unit of message processing: a message refused while parsing (bad
        metadata, content digest mismatch) is a failed message like any other. The
        session's profile decides the envelope; go-profile messages need ``envelope`` (its
        MAC covers the envelope's task id), native ones are verified under ``task_id``.
        """
        if session.profile is PeerProfile.GO:
            if envelope is None:
                raise InvalidMessageError(
                    "go-profile message without envelope", code="bad_metadata"
                )
            return self.open_go(session, payload, metadata, envelope, method=method, path=path)
        message = SecureMessage.from_wire(session.id, payload, metadata)
        return self.open(session, message, method=method, path=path, task_id=task_id)

    def open_go(
        self,
        session: Session,
        payload: object,
        metadata: object,
        envelope: EnvelopeFields,
        *,
        method: str = "POST",
        path: str = "/messages",
    ) -> bytes:
        """Verify, replay-check and open a go-profile message; see the module docstring.

        The reference's MAC covers no payload and its AEAD has no associated data (a defect
        of SAGE Go v1.5.2's wire format, kept for interoperability): an on-path attacker can
        put an earlier ciphertext under a fresh, validly MACed envelope. The AEAD nonce (the
        first 12 bytes of the sealed payload) is therefore remembered for the session's
        life, and a ciphertext whose nonce was already accepted is refused 409
        ``ciphertext_replayed``. This leaves what the wire cannot express: a ciphertext
        never delivered on its own can still arrive under another message's envelope.
        """
        created = _parse_go_metadata(session, metadata)
        if not 0 < len(envelope.id) <= MAX_MESSAGE_ID:
            raise InvalidMessageError("message id missing or too long", code="bad_metadata")
        sealed = from_b64std(payload, "payload")
        try:
            base = go_signature_base(envelope, session.kid, created, method=method, path=path)
        except (UnicodeEncodeError, AttributeError, TypeError) as exc:  # API callers only
            raise InvalidMessageError("envelope fields unusable", code="bad_metadata") from exc
        session.verify(base, envelope.signature)
        if abs(created - self.clock()) > self.tolerance:
            raise TimestampSkewError("timestamp outside tolerance")
        replays, key = self.replays(session), envelope.id.encode()
        _check_nonce(replays.nonces.check(key, float(created)), "message id already seen")
        aead_nonce = sealed[:AEAD_NONCE_SIZE]
        if aead_nonce in replays.sealed:
            raise ReplayError("ciphertext already accepted", code="ciphertext_replayed")
        _refuse_if_ended(session)
        plaintext = session.decrypt(sealed, b"")
        _accept(session, replays.nonces, key, float(created))
        replays.sealed.add(aead_nonce)  # bounded: one per accepted message, max_messages
        return plaintext

    def open(
        self,
        session: Session,
        message: SecureMessage,
        *,
        method: str = "POST",
        path: str = "/messages",
        task_id: str = MESSAGE_TASK,
    ) -> str | bytes:
        """Verify, replay-check and open a native message sent under ``task_id``."""
        session.verify(signature_base(message, method, path, task_id), message.signature)
        sent_at = message.timestamp_ns / 1e9
        if abs(sent_at - self.clock()) > self.tolerance:
            raise TimestampSkewError("timestamp outside tolerance")
        nonces, key = self.nonces(session), message.nonce
        _check_nonce(nonces.check(key, sent_at), "nonce already seen")
        if message.seq <= session.last_recv_seq:
            raise SequenceError("sequence number not increasing")
        _refuse_if_ended(session)
        plaintext = session.decrypt(
            message.ciphertext,
            _aad(message.session_id, task_id, message.seq, message.nonce, message.type),
        )
        _accept(session, nonces, key, sent_at)
        session.last_recv_seq = message.seq
        return (
            plaintext.decode("utf-8", "replace") if message.type is MessageType.TEXT else plaintext
        )


def _check_nonce(status: NonceStatus, replayed: str) -> None:
    if status is NonceStatus.INVALID:
        raise ReplayError(replayed)
    if status is NonceStatus.EXPIRED:
        raise TimestampSkewError("nonce window expired", code="nonce_expired")


def _refuse_if_ended(session: Session) -> None:
    """Refuse before decrypting, since decrypting refreshes the idle clock."""
    reason = session.expired_reason()
    if reason is not None:
        raise SessionExpiredError(f"session ended: {reason.value}")


def _accept(session: Session, nonces: NonceCache, key: bytes, timestamp: float) -> None:
    """Commit an opened message: count it against the session's limits, then mark it seen.

    Called only after the payload opened, with no ``await`` since the checks.
    """
    session.note_received()
    nonces.mark(key, timestamp)
