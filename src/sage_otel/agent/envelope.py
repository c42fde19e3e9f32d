"""The SAGE envelope: its codec and the protocol constants every HTTP side shares.

Everything travels as ``POST {base}/messages`` with the SAGE reference's JSON envelope
``{id, context_id, task_id, payload, did, signature, metadata, role}`` (bytes in standard
base64, metadata values strings, an empty signature as ``null``), written with Go's field
order and escaping. ``task_id`` selects the operation: the handshake, a session message, or
a close. Answers have the reference's shape ``{success, message_id, task_id, data, error}``
with ``data`` the standard base64 of JSON bytes; failures add a typed error
``{code, category, message}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .canonical import go_json, loads
from .encoding import b64std, from_b64std
from .entropy import SYSTEM
from .errors import InvalidMessageError, SageError

MESSAGE_TASK = "sage/message@v1"
SESSION_GONE = frozenset({"session_expired", "unknown_session"})
CLOSE_TASK = "sage/close@v1"
MESSAGES_PATH = "/messages"
REPLY_METHOD = "RESPONSE"
MAX_BODY_BYTES = 1 << 20
MAX_METADATA_ENTRIES = 32
MAX_METADATA_VALUE = 1024
MAX_FIELD = 256  # id, context_id, task_id, did, role
MAX_SIGNATURE = 1024  # base64 characters: a DER secp256k1 signature is about 100
_METADATA_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ENVELOPE_STR_FIELDS = ("id", "context_id", "task_id", "did", "role")
# Request headers the reference's client sets, and the envelope field each must agree with.
HEADER_FIELDS = (
    ("x-sage-did", "did"),
    ("x-sage-message-id", "id"),
    ("x-sage-context-id", "context_id"),
    ("x-sage-task-id", "task_id"),
)


@dataclass(frozen=True)
class Envelope:
    id: str
    context_id: str
    task_id: str
    did: str
    role: str
    payload: bytes
    signature: bytes
    metadata: dict[str, str]
    raw_payload: str
    headers: Mapping[str, str] = field(default_factory=dict)
    source: str = ""  # the sender's network address, as the server saw it (per-address limits)


def parse_envelope(body: bytes, headers: Mapping[str, str] | None = None) -> Envelope:
    """Parse and type-check a request body; every defect is an InvalidMessageError."""
    try:
        data = loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessageError("body is not JSON", code="malformed_json") from exc
    if not isinstance(data, dict):
        raise InvalidMessageError("body must be a JSON object", code="malformed_json")
    for key in _ENVELOPE_STR_FIELDS:
        value = data.get(key, "")
        if not isinstance(value, str) or len(value) > MAX_FIELD:
            raise InvalidMessageError(f"{key} must be a short string", code="wrong_type")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidMessageError("metadata must be a small object", code="wrong_type")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidMessageError("metadata values must be strings", code="wrong_type")
        if not _METADATA_KEY.fullmatch(key) or len(value) > MAX_METADATA_VALUE:
            raise InvalidMessageError("metadata key or value out of bounds", code="bad_metadata")
    signature = data.get("signature")
    if signature is not None and (not isinstance(signature, str) or len(signature) > MAX_SIGNATURE):
        raise InvalidMessageError("signature must be a short base64 string", code="wrong_type")
    if not data.get("task_id"):
        raise InvalidMessageError("task_id is required", code="missing_field")
    if not data.get("payload"):
        raise InvalidMessageError("payload is required", code="missing_field")
    return Envelope(
        id=data.get("id") or SYSTEM.uuid4(),
        context_id=data.get("context_id", ""),
        task_id=data["task_id"],
        did=data.get("did", ""),
        role=data.get("role", ""),
        payload=from_b64std(data["payload"], "payload"),
        signature=b"" if signature is None else from_b64std(signature, "signature"),
        metadata=metadata,
        raw_payload=data["payload"],
        headers=headers or {},
    )


def envelope_body(
    *,
    message_id: str,
    context_id: str,
    task_id: str,
    payload: bytes,
    did: str,
    signature: bytes = b"",
    metadata: Mapping[str, str] | None = None,
    role: str = "",
) -> bytes:
    """A request body byte for byte as the reference's client writes it (``omitempty``)."""
    return wire_body(
        {
            "id": message_id,
            "context_id": context_id,
            "task_id": task_id,
            "payload": b64std(payload),
            "did": did,
            "signature": b64std(signature) if signature else None,
            "metadata": metadata,
            "role": role,
        }
    )


def wire_body(envelope: Mapping[str, Any]) -> bytes:
    """:func:`envelope_body` for an envelope whose bytes are already base64 (as
    :meth:`ClientAgent.envelope` builds it): Go's field order, empty fields left out."""
    wire: dict[str, Any] = {"id": envelope.get("id", "")}
    for key in ("context_id", "task_id"):
        if envelope.get(key):
            wire[key] = envelope[key]
    wire["payload"] = envelope.get("payload", "")
    wire["did"] = envelope.get("did", "")
    wire["signature"] = envelope.get("signature") or None
    for key in ("metadata", "role"):
        if envelope.get(key):
            wire[key] = envelope[key]
    return go_json(wire)


def answer_body(
    *,
    success: bool,
    message_id: str,
    task_id: str = "",
    data: bytes | None = None,
    error: SageError | None = None,
) -> bytes:
    """An answer in the reference's shape (``omitempty``, a trailing newline)."""
    wire: dict[str, Any] = {"success": success, "message_id": message_id}
    if task_id:
        wire["task_id"] = task_id
    if data:
        wire["data"] = b64std(data)
    if error is not None:
        wire["error"] = error.to_dict()
    return go_json(wire) + b"\n"
