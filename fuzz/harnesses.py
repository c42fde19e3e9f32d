"""Coverage-guided atheris targets for every parser of the SAGE agent and its HTTP endpoint.

The rule every target enforces: an input is either accepted or refused with a
:class:`~sage_otel.agent.errors.SageError` (typed: ``code``, ``category``, ``http_status``).
Any other exception escapes the target and is a finding. The HTTP target also requires
every answer to be JSON in the typed shape with a 4xx status (or 200 with ``success:
true``), and every label value of every ``sage.*`` metric to stay inside the catalog's
closed sets (or ``other``).

Each target is ``target_<name>(data: bytes) -> None``. Most are structured: the first byte
picks a mode (raw bytes, a valid artifact mutated, a valid artifact mutated and correctly
re-signed so the input gets past the signature, replays...), and the rest drives an
:class:`atheris.FuzzedDataProvider`. Valid artifacts are built fresh at execution time, so
seeds never go stale. Clocks are fixed (:data:`T0`), identities derive from fixed secrets.

Import this module inside ``atheris.instrument_imports()`` (``fuzz.run`` does) to get
coverage feedback from ``sage_otel``; imported plainly, the targets are ordinary functions
(the pytest suite and the minimizer use them that way).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import atheris
import httpx

from sage_otel.agent import envelope as envelope_module
from sage_otel.agent import identity as identity_module
from sage_otel.agent import server_agent, transport
from sage_otel.agent.canonical import go_json, jcs, loads_ieee
from sage_otel.agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    sign_registration,
)
from sage_otel.agent.encoding import b64std, b64url, format_rfc3339
from sage_otel.agent.entropy import Entropy
from sage_otel.agent.errors import ErrorCategory, SageError
from sage_otel.agent.handshake import (
    ANSWER_FIELDS,
    PROFILE_FIELD,
    Initiator,
    PendingHandshake,
    Responder,
    answer_signed_bytes,
)
from sage_otel.agent.handshake import (
    TASK as HANDSHAKE_TASK,
)
from sage_otel.agent.identity import AgentIdentity, Chain, KeyType, SigningKey, parse_did
from sage_otel.agent.keyschedule import session_id
from sage_otel.agent.message import (
    MessageValidator,
    SecureMessage,
    go_signature_base,
    go_signature_params,
    seal,
    seal_go,
    signature_base,
)
from sage_otel.agent.proofs import sign_agent_card, verify_agent_card
from sage_otel.agent.session import (
    PeerProfile,
    Role,
    Session,
    SessionLimits,
    SessionManager,
)
from sage_otel.agent.transport import (
    CLOSE_TASK,
    MESSAGE_TASK,
    MESSAGES_PATH,
    Envelope,
    ServerAgent,
    parse_envelope,
)

T0 = 1_700_000_000.0
T0_NS = 1_700_000_000 * 1_000_000_000
FIXED_ENTROPY = Entropy(time_ns=lambda: T0_NS)
MIN_NS = -62_135_596_800 * 10**9  # 0001-01-01T00:00:00Z
MAX_NS = 253_402_300_799 * 10**9  # 9999-12-31T23:59:59Z
UNLIMITED = SessionLimits(max_age=1e18, idle_timeout=1e18, max_messages=1 << 62)
REQUEST_KEYS = ("initDid", "respDid", "info", "exportCtx", "nonce", "ts", "enc", "ephC", "profile")
ANSWER_KEYS = (*ANSWER_FIELDS, "sigB64")
ENVELOPE_KEYS = ("id", "context_id", "task_id", "payload", "did", "signature", "metadata", "role")
NATIVE_METADATA_KEYS = (
    "seq",
    "nonce",
    "timestamp",
    "type",
    "content-digest",
    "signature-input",
    "signature",
)
GO_METADATA_KEYS = ("kid", "signature-input")
DOCUMENT_KEYS = (
    "did",
    "keyType",
    "publicKey",
    "kemPublicKey",
    "name",
    "endpoint",
    "capabilities",
    "active",
)
CARD_KEYS = ("@context", "id", "name", "publicKey", "proof", "endpoint")
PROOF_KEYS = ("type", "created", "verificationMethod", "proofPurpose", "proofValue")
CARD_KEY_KEYS = ("id", "type", "controller", "publicKeyHex")
ANSWER_BODY_KEYS = ("success", "message_id", "task_id", "data", "error")
ERROR_KEYS = ("code", "category", "message")
TOKENS = (
    "",
    " ",
    "did:sage:ethereum:",
    "did:sage:solana:",
    "did:sage:eth:0x",
    "did:sage:sol:",
    "did:sage:",
    "0x",
    ":",
    "=",
    "==",
    "|ctx=",
    "sig1=:",
    'sig1=("@method");keyid="k";alg="hmac-sha256";created=1',
    "sha-256=::",
    HANDSHAKE_TASK,
    MESSAGE_TASK,
    CLOSE_TASK,
    "native",
    "go",
    "text",
    "binary",
    "v1",
    "2023-11-14T22:13:20Z",
    "2023-11-14T22:13:20.123456789+23:59",
    "9999-12-31T23:59:59-23:59",
    "0000-01-01T00:00:00Z",
    "\ud800",
    "\u2028",
    "\x00",
    "é",
    "99999999999999999999",
    "-1",
    "1e400",
    "NaN",
    "AAAAAAAAAAAAAAAAAAAAAA",
    "_-",
    "+/",
)
METHODS = ("POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE")
PATHS = ("/messages", "/healthz", "/", "/messages/", "/MESSAGES", "/messages/x", "//messages")
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
)
ODD_LENGTHS = (b"-1", b"+5", b"1_0", b" 7 ", b"\xb2", b"\xb9\xb2", b"0x10", b"1e3", b"9" * 30)
MAX_BODY = 4096
MAX_SESSIONS = 128


class RuleViolation(AssertionError):
    """The target finished without an exception but broke the rule (answer, labels).

    ``kind`` is a short, stable description used to de-duplicate findings.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# --- what every target shares --------------------------------------------------------------

OUTCOMES: Counter[str] = Counter()  # "accepted" or the SageError code, over all calls
LAST_CALL: list[Any] = [None]  # (function name, args, kwargs) of the call in progress


def _count(code: str) -> None:
    # Codes are bounded for our own errors, not for a peer's (PeerError): cap the table.
    OUTCOMES[code if code in OUTCOMES or len(OUTCOMES) < 200 else "(other peer codes)"] += 1


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the API under test: typed refusals are fine, anything else escapes."""
    LAST_CALL[0] = (getattr(fn, "__qualname__", repr(fn)), args, kwargs)
    try:
        result = fn(*args, **kwargs)
    except SageError as error:
        _count(error.code)
        return None
    OUTCOMES["accepted"] += 1
    return result


def _acall(loop: asyncio.AbstractEventLoop, fn: Callable[..., Coroutine], *args: Any) -> Any:
    LAST_CALL[0] = (getattr(fn, "__qualname__", repr(fn)), args, {})
    try:
        result = loop.run_until_complete(fn(*args))
    except SageError as error:
        _count(error.code)
        return None
    OUTCOMES["accepted"] += 1
    return result


def last_call() -> str:
    """The API call that was in progress, for finding reports."""
    if LAST_CALL[0] is None:
        return ""
    name, args, kwargs = LAST_CALL[0]
    parts = [_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _short(value: Any, limit: int = 1500) -> str:
    if isinstance(value, Session):
        return f"<Session {value.profile.value} {value.role.value} id={value.id}>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...<{len(text)} chars>"


def _split(data: bytes, modes: int) -> tuple[int, atheris.FuzzedDataProvider]:
    """The first byte picks a mode; the rest feeds the data provider."""
    if not data:
        return 0, atheris.FuzzedDataProvider(b"")
    return data[0] % modes, atheris.FuzzedDataProvider(data[1:])


def _pick(fdp: atheris.FuzzedDataProvider, options: Any) -> Any:
    return options[fdp.ConsumeIntInRange(0, len(options) - 1)]


def _rest(fdp: atheris.FuzzedDataProvider) -> bytes:
    return fdp.ConsumeBytes(fdp.remaining_bytes())


def _text(fdp: atheris.FuzzedDataProvider, limit: int = 48) -> str:
    choice = fdp.ConsumeIntInRange(0, 5)
    if choice == 0:
        return _pick(fdp, TOKENS)
    if choice == 1:
        return _pick(fdp, TOKENS) + fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit))
    if choice == 2:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, limit))
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit))


def _json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 16))
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind <= 6:
        return _text(fdp)
    if kind == 7:
        return [_json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {_text(fdp, 12): _json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}


def _mutate_str(fdp: atheris.FuzzedDataProvider, text: str) -> str:
    op = fdp.ConsumeIntInRange(0, 8)
    pos = fdp.ConsumeIntInRange(0, len(text))
    if op == 0:
        return _text(fdp)
    if op == 1:
        return text[:pos]
    if op == 2:
        return text[:pos] + _text(fdp, 16) + text[pos:]
    if op == 3:
        return text[:pos] + chr(fdp.ConsumeIntInRange(0, 0x10FFFF)) + text[pos + 1 :]
    if op == 4:
        return text[:pos] + chr(fdp.ConsumeIntInRange(0x20, 0x7E)) + text[pos + 1 :]
    if op == 5:
        return text.swapcase()
    if op == 6:
        return text + text
    if op == 7:
        return text[pos:]
    return text + _pick(fdp, TOKENS)


def _mutate_fields(
    fdp: atheris.FuzzedDataProvider, fields: Any, keys: tuple[str, ...], most: int = 3
) -> Any:
    """A copy of ``fields`` with 0..most edits: values changed, retyped, dropped, added."""
    if not isinstance(fields, dict):
        return fields
    out = dict(fields)
    for _ in range(fdp.ConsumeIntInRange(0, most)):
        key = _pick(fdp, keys)
        op = fdp.ConsumeIntInRange(0, 6)
        if op <= 1:
            value = out.get(key)
            out[key] = _mutate_str(fdp, value) if isinstance(value, str) else _text(fdp)
        elif op == 2:
            out.pop(key, None)
        elif op == 3:
            out[key] = _json_value(fdp)
        elif op == 4:
            out[_text(fdp, 16)] = _json_value(fdp)
        elif op == 5:
            other = _pick(fdp, keys)
            if key in out and other in out:
                out[key], out[other] = out[other], out[key]
        else:
            out[key] = _pick(fdp, TOKENS)
    return out


def _serialize(
    fdp: atheris.FuzzedDataProvider, value: Any, canonical: Callable[[Any], bytes] = go_json
) -> bytes:
    style = fdp.ConsumeIntInRange(0, 5)
    if style <= 2:
        body = canonical(value)
    elif style == 3:
        body = json.dumps(value).encode()  # lone surrogates as \\ud800 escapes
    elif style == 4:
        body = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        body = json.dumps(value, indent=1).encode()
    return _tweak(fdp, body)


def _tweak(fdp: atheris.FuzzedDataProvider, body: bytes) -> bytes:
    """Sometimes a byte-level edit on top of the structured one."""
    op = fdp.ConsumeIntInRange(0, 19) - 16  # mostly none: a zero provider means no edit
    if op < 0 or not body:
        return body
    pos = fdp.ConsumeIntInRange(0, len(body) - 1)
    if op == 0:
        return body[:pos]
    if op == 1:
        return body[:pos] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)) + body[pos:]
    if op == 2:
        return (
            body[:pos] + bytes([body[pos] ^ (1 << fdp.ConsumeIntInRange(0, 7))]) + body[pos + 1 :]
        )
    return body + body


def _mutate_bytes(fdp: atheris.FuzzedDataProvider, data: bytes) -> bytes:
    op = fdp.ConsumeIntInRange(0, 5)
    if op == 0 or not data:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    pos = fdp.ConsumeIntInRange(0, len(data) - 1)
    if op == 1:
        return (
            data[:pos] + bytes([data[pos] ^ (1 << fdp.ConsumeIntInRange(0, 7))]) + data[pos + 1 :]
        )
    if op == 2:
        return data[:pos]
    if op == 3:
        return data + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
    if op == 4:
        return data[:pos] + bytes([fdp.ConsumeIntInRange(0, 255)]) + data[pos + 1 :]
    return bytes(len(data))


def _loads(raw: bytes) -> Any:
    """A JSON value from the fuzz bytes; bytes that are not JSON become a string."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")


def fixed_clock() -> float:
    return T0


def _supported(factory: Callable[..., Any], **options: Any) -> dict[str, Any]:
    """The options ``factory`` accepts (the agent's constructors are still evolving)."""
    accepted = inspect.signature(factory).parameters
    return {k: v for k, v in options.items() if k in accepted}


@functools.cache
def _no_rate_limit() -> dict[str, Any]:
    """A handshake limiter that never limits: the fuzzer runs thousands of handshakes a
    second from the same two DIDs, and the checks after the limiter are what it is for."""
    try:
        from sage_otel.agent.handshake import HandshakeLimiter
    except ImportError:
        return {}
    return {"limiter": HandshakeLimiter("100000000/second")}


def _identity(chain: Chain, label: str) -> AgentIdentity:
    secret = hashlib.sha256(b"sage-fuzz/signing/" + label.encode()).digest()
    kem = hashlib.sha256(b"sage-fuzz/kem/" + label.encode()).digest()
    return AgentIdentity.from_secrets(chain, secret, kem)


def _pair(
    profile: PeerProfile,
    peer_did: str,
    own_did: str,
    receiver: SessionManager | None = None,
    receiver_role: Role = Role.RESPONDER,
) -> tuple[Session, Session]:
    """Two ends of one session: (sender, receiver); the sender never hits a limit."""
    seed = os.urandom(32)
    sid, kid = session_id(seed), f"kid-{uuid.uuid4()}"
    sender_role = Role.INITIATOR if receiver_role is Role.RESPONDER else Role.RESPONDER
    sender = SessionManager(UNLIMITED, fixed_clock).create(
        sid, sender_role, seed, peer_did=own_did, kid=kid, profile=profile
    )
    receiver = receiver or SessionManager(clock=fixed_clock)
    end = receiver.create(sid, receiver_role, seed, peer_did=peer_did, kid=kid, profile=profile)
    return sender, end


class Base:
    """Identities and a registry shared by every target (one per process)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.registry = InMemoryRegistry()
        self.alice = _identity(Chain.ETHEREUM, "alice")  # initiators
        self.dave = _identity(Chain.SOLANA, "dave")
        self.bob = _identity(Chain.SOLANA, "bob")  # the responder / server
        self.carol = _identity(Chain.ETHEREUM, "carol")  # a second responder
        self.mallory = _identity(Chain.SOLANA, "mallory")  # never registered
        self.retired = _identity(Chain.ETHEREUM, "retired")  # registered, then inactive
        for ident in (self.alice, self.dave, self.bob, self.carol, self.retired):
            document = DIDDocument.for_identity(ident)
            self.run(self.registry.register(document, sign_registration(ident, document)))
        gone = DIDDocument.for_identity(self.retired, active=False)
        self.run(self.registry.deactivate(gone, sign_registration(self.retired, gone)))
        self.senders = (self.alice, self.dave)

    def run(self, coro: Coroutine) -> Any:
        return self.loop.run_until_complete(coro)

    def doc(self, ident: AgentIdentity) -> DIDDocument:
        return DIDDocument.for_identity(ident)

    def pick_did(self, fdp: atheris.FuzzedDataProvider, ident: AgentIdentity) -> str:
        choice = fdp.ConsumeIntInRange(0, 9)
        text = str(ident.did)
        if choice <= 4:
            return text
        if choice == 5:
            return str(self.dave.did if ident is self.alice else self.alice.did)
        if choice == 6:
            return str(_pick(fdp, [self.mallory, self.retired, self.bob]).did)
        if choice == 7:  # an alias of the same DID: short chain name, address case
            alias = text.replace(":ethereum:", ":eth:").replace(":solana:", ":sol:")
            return alias.upper().replace("DID:SAGE:", "did:sage:") if fdp.ConsumeBool() else alias
        if choice == 8:
            return _mutate_str(fdp, text)
        return _text(fdp)


@functools.cache
def base() -> Base:
    return Base()


# --- transport.parse_envelope --------------------------------------------------------------


class EnvelopeWorld:
    def __init__(self) -> None:
        b = base()
        pending = Initiator(b.alice, SessionManager(), FIXED_ENTROPY).init(b.doc(b.bob))
        request = pending.request
        sender, _ = _pair(PeerProfile.NATIVE, str(b.alice.did), str(b.bob.did))
        wire = seal(sender, "hello", now_ns=T0_NS).to_wire()
        close = seal(sender, "", now_ns=T0_NS, task_id=CLOSE_TASK).to_wire()
        go_sender, _ = _pair(PeerProfile.GO, str(b.dave.did), str(b.bob.did))
        go = seal_go(
            go_sender,
            b"hi",
            sender_did=str(b.dave.did),
            task_id=MESSAGE_TASK,
            message_id=str(uuid.uuid4()),
            created=int(T0),
        )
        self.samples = [
            transport_envelope(
                HANDSHAKE_TASK,
                request.ctx_id,
                b64std(request.payload),
                str(b.alice.did),
                b64std(request.signature),
            ),
            transport_envelope(
                MESSAGE_TASK, sender.id, wire["payload"], str(b.alice.did), None, wire["metadata"]
            ),
            transport_envelope(
                MESSAGE_TASK,
                go.context_id,
                b64std(go.sealed),
                go.did,
                b64std(go.signature),
                go.metadata(),
                message_id=go.id,
            ),
            transport_envelope(
                CLOSE_TASK, sender.id, close["payload"], "", None, close["metadata"]
            ),
        ]


def transport_envelope(
    task_id: str,
    context_id: str,
    payload: str,
    did: str,
    signature: str | None,
    metadata: dict[str, str] | None = None,
    *,
    message_id: str | None = None,
    role: str = "user",
) -> dict[str, Any]:
    """An envelope as the client writes it (payload and signature already base64)."""
    return {
        "id": message_id or str(uuid.uuid4()),
        "context_id": context_id,
        "task_id": task_id,
        "payload": payload,
        "did": did,
        "signature": signature,
        "metadata": metadata or {},
        "role": role,
    }


_envelope_world = functools.cache(EnvelopeWorld)


def _mutate_envelope(fdp: atheris.FuzzedDataProvider, envelope: dict[str, Any]) -> dict[str, Any]:
    out = _mutate_fields(fdp, envelope, ENVELOPE_KEYS)
    if isinstance(out.get("metadata"), dict) and fdp.ConsumeBool():
        keys = GO_METADATA_KEYS if "kid" in out["metadata"] else NATIVE_METADATA_KEYS
        out["metadata"] = _mutate_fields(fdp, out["metadata"], keys)
    return out


def target_envelope(data: bytes) -> None:
    """parse_envelope(body, headers): raw bodies and mutations of the four real envelopes."""
    w = _envelope_world()
    mode, fdp = _split(data, 3)
    headers: dict[str, str] = {}
    if mode == 0:
        body = _rest(fdp)
    else:
        envelope = _mutate_envelope(fdp, _pick(fdp, w.samples))
        for header in ("x-sage-did", "x-sage-message-id", "content-type", "traceparent"):
            if fdp.ConsumeIntInRange(0, 3) == 0:
                headers[header] = _text(fdp, 24)
        body = _serialize(fdp, envelope)
        if mode == 2:
            body = body + _rest(fdp)
    _call(parse_envelope, body, headers)


# --- SecureMessage.from_wire and MessageValidator.open_wire ---------------------------------


class MessageWorld:
    """Session pairs per profile (reset every few hundred executions) and a validator each."""

    RESET_EVERY = 512

    def __init__(self) -> None:
        self.calls = 0
        self.pairs: dict[PeerProfile, tuple[Session, Session, MessageValidator]] = {}

    def pair(self, profile: PeerProfile) -> tuple[Session, Session, MessageValidator]:
        current = self.pairs.get(profile)
        if current is None or current[1].closed or self.calls % self.RESET_EVERY == 0:
            b = base()
            sender, receiver = _pair(profile, str(b.alice.did), str(b.bob.did))
            current = self.pairs[profile] = (sender, receiver, MessageValidator(clock=fixed_clock))
        return current


def _message_world() -> MessageWorld:
    w = _the_message_world()
    w.calls += 1
    return w


_the_message_world = functools.cache(MessageWorld)


def _plaintext(fdp: atheris.FuzzedDataProvider) -> str | bytes:
    if fdp.ConsumeBool():
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64))


def _offset_ns(fdp: atheris.FuzzedDataProvider) -> int:
    choice = fdp.ConsumeIntInRange(0, 7)
    if choice <= 3:
        return 0
    if choice == 4:
        return fdp.ConsumeIntInRange(-60, 60) * 1_000_000_000
    if choice == 5:
        return fdp.ConsumeIntInRange(-(10**9), 10**9)
    if choice == 6:
        return fdp.ConsumeIntInRange(-3600 * 10**9, 3600 * 10**9)
    return fdp.ConsumeIntInRange(MIN_NS, MAX_NS) - T0_NS  # any time RFC 3339 can write


def target_message_from_wire(data: bytes) -> None:
    """SecureMessage.from_wire(session_id, payload, metadata), metadata from the fuzz JSON."""
    w = _message_world()
    sender, receiver, _ = w.pair(PeerProfile.NATIVE)
    mode, fdp = _split(data, 3)
    sid = receiver.id if fdp.ConsumeIntInRange(0, 3) else _text(fdp, 32)
    wire = seal(sender, _plaintext(fdp), now_ns=T0_NS + _offset_ns(fdp)).to_wire()
    payload: Any = wire["payload"]
    if mode == 0:
        if fdp.ConsumeBool():
            payload = _json_value(fdp)
        metadata = _loads(_rest(fdp))
    elif mode == 1:
        metadata = _mutate_fields(fdp, wire["metadata"], NATIVE_METADATA_KEYS, most=4)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            payload = _mutate_str(fdp, payload)
    else:
        extra = _loads(_rest(fdp))
        metadata = {**wire["metadata"], **extra} if isinstance(extra, dict) else extra
    _call(SecureMessage.from_wire, sid, payload, metadata)


def _method_path(fdp: atheris.FuzzedDataProvider) -> tuple[str, str]:
    """Method and path the receiver checks the MAC with: the local caller's values (the
    server passes its own route), so text without lone surrogates."""
    if fdp.ConsumeIntInRange(0, 7):
        return "POST", MESSAGES_PATH
    return fdp.ConsumeUnicodeNoSurrogates(12), fdp.ConsumeUnicodeNoSurrogates(24)


def _message_id(fdp: atheris.FuzzedDataProvider) -> str:
    """A message id the local sender can seal with (the forged paths vary it further)."""
    if fdp.ConsumeIntInRange(0, 5):
        return str(uuid.uuid4())
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))


def _open_native(w: MessageWorld, mode: int, fdp: atheris.FuzzedDataProvider) -> None:
    sender, receiver, validator = w.pair(PeerProfile.NATIVE)
    method, path = _method_path(fdp)
    sign_method, sign_path = (method, path) if fdp.ConsumeIntInRange(0, 7) else _method_path(fdp)
    message = seal(
        sender, _plaintext(fdp), method=sign_method, path=sign_path, now_ns=T0_NS + _offset_ns(fdp)
    )
    if mode == 0:  # raw
        payload = _json_value(fdp) if fdp.ConsumeBool() else message.to_wire()["payload"]
        _call(validator.open_wire, receiver, payload, _loads(_rest(fdp)), method=method, path=path)
        return
    if mode == 2:  # forged fields, correctly re-signed: past the MAC, into the later checks
        changes: dict[str, Any] = {}
        if fdp.ConsumeBool():
            changes["seq"] = fdp.ConsumeIntInRange(1, 10**18)
        if fdp.ConsumeBool():
            changes["nonce"] = _mutate_bytes(fdp, message.nonce)
        if fdp.ConsumeBool():
            changes["timestamp_ns"] = T0_NS + _offset_ns(fdp)
        if fdp.ConsumeBool():
            changes["type"] = _pick(fdp, list(type(message.type)))
        if fdp.ConsumeBool():
            changes["ciphertext"] = _mutate_bytes(fdp, message.ciphertext)
        message = dataclasses.replace(message, **changes)
        try:
            base_bytes = signature_base(message, sign_method, sign_path)
        except (ValueError, UnicodeError):  # a forged field the harness cannot sign
            base_bytes = b""
        message = dataclasses.replace(message, signature=sender.sign(base_bytes))
    wire = message.to_wire()
    payload, metadata = wire["payload"], wire["metadata"]
    if mode in (1, 2):
        metadata = _mutate_fields(fdp, metadata, NATIVE_METADATA_KEYS, most=2 if mode == 1 else 1)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            payload = _mutate_str(fdp, payload)
    elif mode == 3:  # replay, or two messages out of order
        later = seal(sender, b"later", now_ns=T0_NS).to_wire()
        if fdp.ConsumeBool():
            _call(validator.open_wire, receiver, later["payload"], later["metadata"])
        else:
            _call(validator.open_wire, receiver, payload, metadata, method=method, path=path)
    elif mode == 4:  # a session closed (or expired) under the message
        receiver.close()
    _call(validator.open_wire, receiver, payload, metadata, method=method, path=path)


def _go_envelope(fdp: atheris.FuzzedDataProvider, envelope: Envelope) -> Envelope:
    changes: dict[str, Any] = {}
    for name in ("id", "did", "context_id", "task_id"):
        if fdp.ConsumeIntInRange(0, 5) == 0:
            changes[name] = _mutate_str(fdp, getattr(envelope, name))
    return dataclasses.replace(envelope, **changes) if changes else envelope


def _open_go(w: MessageWorld, mode: int, fdp: atheris.FuzzedDataProvider) -> None:
    sender, receiver, validator = w.pair(PeerProfile.GO)
    b = base()
    method, path = _method_path(fdp)
    message_id = _message_id(fdp)
    created = int(T0) + _offset_ns(fdp) // 1_000_000_000
    message = seal_go(
        sender,
        _plaintext(fdp),
        sender_did=str(b.alice.did),
        task_id=MESSAGE_TASK,
        message_id=message_id,
        created=created,
        method=method,
        path=path,
    )
    payload: Any = b64std(message.sealed)
    metadata: Any = message.metadata()
    envelope = Envelope(
        id=message.id,
        context_id=message.context_id,
        task_id=message.task_id,
        did=message.did,
        role="user",
        payload=message.sealed,
        signature=message.signature,
        metadata=metadata,
        raw_payload=payload,
    )
    if mode == 0:  # raw metadata from the fuzz JSON, envelope fields fuzzed
        envelope = dataclasses.replace(
            _go_envelope(fdp, envelope), signature=_mutate_bytes(fdp, envelope.signature)
        )
        if fdp.ConsumeBool():
            payload = _json_value(fdp)
        metadata = _loads(_rest(fdp))
    elif mode == 1:  # mutated, not re-signed
        metadata = _mutate_fields(fdp, metadata, GO_METADATA_KEYS, most=2)
        envelope = _go_envelope(fdp, envelope)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            payload = _mutate_str(fdp, payload)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            envelope = dataclasses.replace(
                envelope, signature=_mutate_bytes(fdp, envelope.signature)
            )
    elif mode == 2:  # envelope fields and created changed, MAC recomputed by the sender
        envelope = _go_envelope(fdp, envelope)
        kid = sender.kid if fdp.ConsumeIntInRange(0, 5) else _mutate_str(fdp, sender.kid)
        created = created + (0 if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-100, 100))
        try:
            mac = sender.sign(go_signature_base(envelope, kid, created, method=method, path=path))
        except (ValueError, UnicodeError):  # a field the harness cannot sign
            mac = b""
        envelope = dataclasses.replace(envelope, signature=mac)
        metadata = {"kid": kid, "signature-input": f"sig1={go_signature_params(kid, created)}"}
        if fdp.ConsumeIntInRange(0, 3) == 0:
            payload = b64std(_mutate_bytes(fdp, message.sealed))
    elif mode == 3:  # replay
        _call(
            validator.open_wire,
            receiver,
            payload,
            metadata,
            method=method,
            path=path,
            envelope=envelope,
        )
    else:
        receiver.close()
    _call(
        validator.open_wire,
        receiver,
        payload,
        metadata,
        method=method,
        path=path,
        envelope=envelope,
    )


def target_message_open(data: bytes) -> None:
    """MessageValidator.open_wire on live native and go sessions: raw, mutated, re-signed,
    replayed, out of order, on a closed session."""
    w = _message_world()
    mode, fdp = _split(data, 10)
    if mode < 5:
        _open_native(w, mode, fdp)
    else:
        _open_go(w, mode - 5, fdp)


# --- the handshake ------------------------------------------------------------------------


@dataclass
class HandshakeSample:
    sender: AgentIdentity
    responder: AgentIdentity
    pending: PendingHandshake
    response: dict[str, str]


class HandshakeWorld:
    RESET_EVERY = 1000

    def __init__(self) -> None:
        b = base()
        self.calls = 0
        self.responder = self._responder()
        self.samples: list[HandshakeSample] = []
        for responder in (b.bob, b.carol):
            for sender in b.senders:
                for profile in (PeerProfile.NATIVE, PeerProfile.GO):
                    pending = Initiator(sender, SessionManager(), FIXED_ENTROPY).init(
                        b.doc(responder), profile=profile
                    )
                    answerer = Responder(
                        responder,
                        DIDResolver(b.registry),
                        SessionManager(),
                        **_supported(Responder, clock=fixed_clock, entropy=FIXED_ENTROPY),
                    )
                    request = pending.request
                    response, _ = b.run(
                        answerer.process(request.init_did, request.payload, request.signature)
                    )
                    self.samples.append(HandshakeSample(sender, responder, pending, response))

    def _responder(self) -> Responder:
        b = base()
        return Responder(
            b.bob,
            DIDResolver(b.registry),
            SessionManager(clock=fixed_clock),
            **_supported(Responder, clock=fixed_clock, entropy=FIXED_ENTROPY, **_no_rate_limit()),
        )

    def tick(self) -> None:
        self.calls += 1
        if self.calls % self.RESET_EVERY == 0 or self.responder.sessions.active_count >= 48:
            self.responder = self._responder()


def _handshake_world() -> HandshakeWorld:
    w = _the_handshake_world()
    w.tick()
    return w


_the_handshake_world = functools.cache(HandshakeWorld)


def _mutate_request(fdp: atheris.FuzzedDataProvider, fields: dict[str, str], fresh: bool) -> Any:
    out: dict[str, Any] = dict(fields)
    if fresh:  # past the replay cache, with the fields the fuzzer most wants to vary
        out["nonce"] = str(uuid.uuid4()) if fdp.ConsumeBool() else _text(fdp, 40)
        if fdp.ConsumeBool():
            out["ts"] = format_rfc3339(T0_NS + _offset_ns(fdp))
        if fdp.ConsumeBool():
            out[_pick(fdp, ["enc", "ephC"])] = b64url(
                fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            )
        if fdp.ConsumeBool():
            out[PROFILE_FIELD] = _pick(fdp, ["native", "go", "", "NATIVE", "quic"])
    return _mutate_fields(fdp, out, REQUEST_KEYS, most=2 if fresh else 3)


def target_handshake_process(data: bytes) -> None:
    """Responder.process(sender_did, payload, signature, ctx_id): raw payloads, fuzz JSON
    signed by the registered sender, and valid init payloads mutated then re-signed."""
    w = _handshake_world()
    b = base()
    mode, fdp = _split(data, 4)
    sample = _pick(fdp, w.samples[: len(w.samples) // 2])  # those addressed to bob
    request = sample.pending.request
    did = b.pick_did(fdp, sample.sender)
    ctx_choice = fdp.ConsumeIntInRange(0, 5)
    ctx_id = (request.ctx_id, None, request.ctx_id, "", _text(fdp, 40), request.ctx_id + "x")[
        ctx_choice
    ]
    key = sample.sender.signing_key
    if mode == 0:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024))
        signature = _mutate_bytes(fdp, key.sign(payload)) if fdp.ConsumeBool() else _rest(fdp)
    elif mode == 1:
        payload = _rest(fdp)
        signature = key.sign(payload)
    else:
        fields = _mutate_request(fdp, sample.pending.fields, fresh=mode == 3)
        payload = _serialize(fdp, fields, lambda v: go_json(v, sort_keys=True))
        signature = key.sign(payload)
        if fdp.ConsumeIntInRange(0, 15) == 0:
            signature = _mutate_bytes(fdp, signature)
    _acall(b.loop, w.responder.process, did, payload, signature, ctx_id)


def _resign(response: Any, signer: SigningKey) -> Any:
    if not isinstance(response, dict):
        return response
    try:
        signed = answer_signed_bytes({k: v for k, v in response.items() if k != "sigB64"})
    except KeyError:
        return response
    return {**response, "sigB64": b64url(signer.sign(signed))}


def target_handshake_finalize(data: bytes) -> None:
    """Initiator.finalize(pending, response): raw answers, mutated answers, and mutated
    answers correctly re-signed by the responder (so the ackTag and keys are reached)."""
    w = _handshake_world()
    mode, fdp = _split(data, 4)
    sample = _pick(fdp, w.samples)
    pending = dataclasses.replace(sample.pending)  # finalize wipes its pending: wipe a copy
    initiator = Initiator(sample.sender, SessionManager(), FIXED_ENTROPY)
    signer = sample.responder.signing_key
    response: Any
    if mode == 0:
        response = _loads(_rest(fdp))
    elif mode == 1:
        response = _mutate_fields(fdp, sample.response, ANSWER_KEYS)
    elif mode == 2:
        response = _resign(_mutate_fields(fdp, sample.response, ANSWER_KEYS, most=2), signer)
    else:  # the fields only the ackTag and key agreement check, re-signed
        response = dict(sample.response)
        for name in ("ephS", "ackTagB64"):
            if fdp.ConsumeBool():
                response[name] = b64url(_mutate_bytes(fdp, b"\x00" * 32))
        if fdp.ConsumeBool():
            response["kid"] = _text(fdp, 40)
        if fdp.ConsumeBool():
            response["did"] = base().pick_did(fdp, sample.responder)
        response = _resign(response, signer)
    _call(initiator.finalize, pending, response)


# --- DIDs, signatures, agent cards, JCS ----------------------------------------------------


class IdentityWorld:
    def __init__(self) -> None:
        b = base()
        self.documents = [b.doc(ident).to_json() for ident in (b.alice, b.dave, b.retired)]
        self.documents[2]["active"] = False
        self.keys = {
            KeyType.ED25519: b.dave.signing_key,
            KeyType.SECP256K1: b.alice.signing_key,
            KeyType.P256: SigningKey.from_private_bytes(
                KeyType.P256, hashlib.sha256(b"sage-fuzz/p256").digest()
            ),
        }
        self.cards = [
            sign_agent_card(
                {
                    "@context": ["https://www.w3.org/ns/did/v1"],
                    "id": str(ident.did),
                    "name": "fuzz agent",
                    "publicKey": [
                        {
                            "id": f"{ident.did}#key-1",
                            "type": key_type,
                            "controller": str(ident.did),
                            "publicKeyHex": ident.signing_key.key_data().hex(),
                        }
                    ],
                    "endpoint": "http://127.0.0.1:1/messages",
                },
                ident.signing_key,
                f"{ident.did}#key-1",
                "2023-11-14T22:13:20Z",
            )
            for ident, key_type in (
                (b.dave, "Ed25519VerificationKey2020"),
                (b.alice, "EcdsaSecp256k1VerificationKey2019"),
            )
        ]


_identity_world = functools.cache(IdentityWorld)


def target_did_document(data: bytes) -> None:
    """DIDDocument.from_json(obj): any JSON value, and mutated real documents."""
    w = _identity_world()
    mode, fdp = _split(data, 2)
    if mode == 0:
        document = _loads(_rest(fdp))
    else:
        document = _mutate_fields(fdp, _pick(fdp, w.documents), DOCUMENT_KEYS, most=4)
    _call(DIDDocument.from_json, document)


def target_parse_did(data: bytes) -> None:
    """identity.parse_did(text): arbitrary text, JSON values, mutated real DIDs."""
    mode, fdp = _split(data, 3)
    if mode == 0:
        text: Any = _rest(fdp).decode("utf-8", "surrogateescape")
    elif mode == 1:
        text = _loads(_rest(fdp))
    else:
        b = base()
        text = _mutate_str(fdp, str(_pick(fdp, [b.alice, b.dave, b.bob]).did))
        if fdp.ConsumeBool():
            text = _mutate_str(fdp, text)
    _call(parse_did, text)


_KEY_TYPES = (KeyType.ED25519, KeyType.SECP256K1, KeyType.P256)


def target_verify_signature(data: bytes) -> None:
    """identity.verify_signature (and verify_digest) for every KeyType: real keys with
    mutated signatures, and fuzz keys."""
    w = _identity_world()
    mode, fdp = _split(data, 4)
    key_type: Any = _pick(fdp, _KEY_TYPES)
    key = w.keys[key_type]
    public = key.public_bytes()
    if mode == 1:
        public = _mutate_bytes(fdp, public)
    elif mode == 2:
        public = key.key_data() if fdp.ConsumeBool() else _mutate_bytes(fdp, key.key_data())
    if fdp.ConsumeIntInRange(0, 31) == 0:
        key_type = _pick(fdp, ["ed25519", None, 3])
    digest = fdp.ConsumeIntInRange(0, 3) == 0
    message = fdp.ConsumeBytes(32 if digest else fdp.ConsumeIntInRange(0, 128))
    if mode == 3:
        signature = _rest(fdp)
    else:
        try:
            valid = key.sign_digest(message) if digest else key.sign(message)
        except (SageError, ValueError):  # p256 signs no digests; secp256k1 needs 32 bytes
            valid = b""
        signature = valid if fdp.ConsumeIntInRange(0, 3) == 0 else _mutate_bytes(fdp, valid)
        if fdp.ConsumeIntInRange(0, 7) == 0 and len(signature) >= 64:  # r or s near the order
            edge = _pick(fdp, [b"\x00" * 32, b"\xff" * 32, (1).to_bytes(32, "big")])
            signature = (
                edge + signature[32:]
                if fdp.ConsumeBool()
                else signature[:32] + edge + signature[64:]
            )
    verify = identity_module.verify_digest if digest else identity_module.verify_signature
    _call(verify, key_type, public, message, signature)


def target_agent_card(data: bytes) -> None:
    """proofs.verify_agent_card(card_json): raw text, mutated signed cards, and mutated
    cards signed again (so the proof is valid and the card's structure is what varies)."""
    w = _identity_world()
    mode, fdp = _split(data, 4)
    if mode == 0:
        raw = _rest(fdp)
        card_json: Any = raw if fdp.ConsumeBool() else raw.decode("utf-8", "replace")
        _call(verify_agent_card, card_json)
        return
    index = fdp.ConsumeIntInRange(0, len(w.cards) - 1)
    card = dict(w.cards[index])
    op = fdp.ConsumeIntInRange(0, 2)
    if op == 0 or mode == 3:
        card = _mutate_fields(fdp, card, CARD_KEYS, most=2)
    if (op == 1 or mode == 3) and isinstance(card.get("proof"), dict):
        card["proof"] = _mutate_fields(fdp, card["proof"], PROOF_KEYS, most=2)
    if op == 2 and isinstance(card.get("publicKey"), list) and card["publicKey"]:
        entries = list(card["publicKey"])
        entries[0] = _mutate_fields(fdp, entries[0], CARD_KEY_KEYS, most=2)
        if fdp.ConsumeBool():
            entries.append(entries[0])
        card["publicKey"] = entries
    if mode == 2:  # sign the mutated card again with the card's real key
        ident_key = (base().dave, base().alice)[index].signing_key
        proof = card.get("proof") if isinstance(card.get("proof"), dict) else {}
        try:
            signed = sign_agent_card(
                card, ident_key, str(proof.get("verificationMethod", "")), "2023-11-14T22:13:20Z"
            )
            card = {
                **signed,
                "proof": {**signed["proof"], **proof, "proofValue": signed["proof"]["proofValue"]},
            }
        except SageError:  # a card with no canonical form cannot be signed
            pass
    body = _serialize(fdp, card, lambda v: json.dumps(v).encode())
    _call(verify_agent_card, body if fdp.ConsumeBool() else body.decode("utf-8", "replace"))


def target_jcs(data: bytes) -> None:
    """canonical.jcs(loads_ieee(text)): any JSON text (text that is not JSON is skipped:
    loads_ieee is json.loads), and generated values with NaN, huge numbers, surrogates."""
    mode, fdp = _split(data, 2)
    if mode == 0:
        raw = _rest(fdp)
        text: Any = raw if fdp.ConsumeBool() else raw.decode("utf-8", "surrogateescape")
    else:
        text = json.dumps(_json_value(fdp))
    try:
        value = loads_ieee(text)
    except (ValueError, RecursionError):
        return
    _call(jcs, value)


# --- the client's answer reader ------------------------------------------------------------


_STATUSES = (200, 200, 201, 204, 299, 301, 400, 401, 403, 404, 409, 410, 413, 429, 500, 502, 504)


class AnswerWorld:
    def __init__(self) -> None:
        handshake = _handshake_world()
        sender, _ = _pair(PeerProfile.NATIVE, "did:sage:sol:x", "did:sage:sol:y")
        reply = seal(sender, "pong", now_ns=T0_NS).to_wire()
        error = SageError("boom", code="replay_detected")
        self.samples = [
            {
                "success": True,
                "message_id": "m",
                "task_id": HANDSHAKE_TASK,
                "data": handshake.samples[0].response,
            },
            {"success": True, "message_id": "m", "task_id": MESSAGE_TASK, "data": reply},
            {"success": True, "message_id": "m", "data": {"closed": True}},
            {"success": True, "message_id": "m"},
            {"success": False, "message_id": "m", "error": error.to_dict()},
            {"success": False, "message_id": "m", "error": "signature verification failed: x"},
            {"success": False, "error": "replay detected"},
        ]


_answer_world = functools.cache(AnswerWorld)


def target_read_answer(data: bytes) -> None:
    """transport.read_answer(httpx.Response(status, content)): raw bodies, and answers in
    both the typed shape and the Go reference's shape, mutated."""
    w = _answer_world()
    mode, fdp = _split(data, 3)
    status = _pick(fdp, _STATUSES) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(100, 599)
    if mode == 0:
        content = _rest(fdp)
    else:
        answer = dict(_pick(fdp, w.samples))
        if isinstance(answer.get("data"), dict):  # data travels as base64 of JSON bytes
            inner = answer["data"]
            if mode == 2:
                inner = _mutate_fields(fdp, inner, (*ANSWER_KEYS, "payload", "metadata"))
            answer["data"] = b64std(_serialize(fdp, inner))
        answer = _mutate_fields(fdp, answer, ANSWER_BODY_KEYS)
        if isinstance(answer.get("error"), dict) and fdp.ConsumeBool():
            answer["error"] = _mutate_fields(fdp, answer["error"], ERROR_KEYS)
        content = _serialize(fdp, answer)
    _call(transport.read_answer, httpx.Response(status, content=content))


# --- the whole HTTP endpoint, in process ---------------------------------------------------


ANSWER_OK_KEYS = frozenset({"success", "message_id", "task_id", "data"})
ANSWER_ERROR_KEYS = frozenset({"success", "message_id", "task_id", "error"})
CATEGORIES = frozenset(c.value for c in ErrorCategory)


@dataclass
class Link:
    """A live session between a fuzz peer and the server: ``peer`` is the harness's end."""

    sender: AgentIdentity
    profile: PeerProfile
    server_role: Role
    peer: Session | None = None
    server_end: Session | None = None


class DefectTrap(logging.Handler):
    """Catches exceptions that sage_otel logs instead of raising (the server answers a
    defect with a generic typed error and logs it once; telemetry errors are logged and
    swallowed), so each one is reported with its own traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.caught: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None and self.caught is None:
            self.caught = record.exc_info[1]

    def install(self) -> DefectTrap:
        logging.getLogger("sage_otel").addHandler(self)
        otel = logging.getLogger("opentelemetry")
        self._otel_level = otel.level
        otel.setLevel(logging.ERROR)  # e.g. warnings about fuzzed baggage headers
        return self

    def uninstall(self) -> None:
        logging.getLogger("sage_otel").removeHandler(self)
        logging.getLogger("opentelemetry").setLevel(getattr(self, "_otel_level", logging.NOTSET))

    def rearm(self) -> None:
        self.caught = None
        if getattr(server_agent, "_defect_logged", None):  # the server logs a defect only once
            server_agent._defect_logged = False

    def raise_caught(self) -> None:
        caught, self.caught = self.caught, None
        if caught is not None:
            raise caught


class Telemetry:
    """SageInstrumentor on private SDK providers: an InMemoryMetricReader, and the project's
    Prometheus exposition reader so /metrics text is checked too."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from prometheus_client import CollectorRegistry

        from sage_otel.instrumentation import SageInstrumentor
        from sage_otel.telemetry.exposition import ExemplarPrometheusMetricReader

        self.reader = InMemoryMetricReader()
        self.registry = CollectorRegistry(auto_describe=False)
        self.prometheus = ExemplarPrometheusMetricReader(self.registry)
        self.meter_provider = MeterProvider(metric_readers=[self.reader, self.prometheus])
        self.tracer_provider = TracerProvider()  # spans recorded, then dropped
        self.instrumentor = SageInstrumentor()
        self.instrumentor.instrument(
            meter_provider=self.meter_provider, tracer_provider=self.tracer_provider
        )

    def check(self) -> int:
        """Every sage metric's labels inside the catalog; returns how many points were read."""
        points = check_metric_labels(self.reader.get_metrics_data())
        check_exposition_labels(self.registry)
        return points

    def close(self) -> None:
        self.instrumentor.uninstrument()
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


def check_metric_labels(data: Any) -> int:
    """Raise RuleViolation unless every ``sage.*`` point has exactly its catalog labels, each
    with a value from the closed set or ``other``."""
    from sage_otel.telemetry.catalog import INSTRUMENTS, OTHER

    by_name = {i.name: i for i in INSTRUMENTS}
    points = 0
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if not metric.name.startswith("sage."):
                    continue
                spec = by_name.get(metric.name)
                if spec is None:
                    raise RuleViolation("metric outside the catalog", metric.name)
                for point in metric.data.data_points:
                    points += 1
                    labels = dict(point.attributes)
                    if set(labels) != set(spec.label_keys):
                        raise RuleViolation(
                            f"label keys of {metric.name}", f"{sorted(labels)} != {spec.label_keys}"
                        )
                    for label in spec.labels:
                        value = labels[label.key]
                        if value not in label.values and value != OTHER:
                            raise RuleViolation(
                                f"unbounded label {metric.name}{{{label.key}}}", repr(value)[:200]
                            )
    return points


def check_exposition_labels(registry: Any) -> None:
    """The same rule on the Prometheus text exposition (what /metrics serves)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from sage_otel.telemetry.catalog import INSTRUMENTS, OTHER

    text = generate_latest(registry).decode()
    bases = sorted(
        ((i.prometheus_name.removesuffix("_total"), i) for i in INSTRUMENTS),
        key=lambda pair: -len(pair[0]),
    )
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("sage_"):
                continue
            spec = next((i for name, i in bases if sample.name.startswith(name)), None)
            if spec is None:
                raise RuleViolation("exposed metric outside the catalog", sample.name)
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            if set(labels) != set(spec.label_keys):
                raise RuleViolation(f"exposed label keys of {sample.name}", repr(sorted(labels)))
            for label in spec.labels:
                if labels[label.key] not in label.values and labels[label.key] != OTHER:
                    raise RuleViolation(
                        f"unbounded exposed label {sample.name}{{{label.key}}}",
                        repr(labels[label.key])[:200],
                    )


def check_answer(method: str, path: str, status: int, headers: dict[str, str], body: bytes) -> None:
    """The typed-answer rule for one HTTP answer: 200 with ``success: true`` or a 4xx (or a
    503 ``session_capacity`` with Retry-After: a full table is a limit, not a defect) with
    ``{success: false, message_id, error: {code, category, message}}`` (task_id optional),
    always JSON. Only ``GET /healthz`` answers in its own shape."""
    text = body[:300].decode("utf-8", "replace")
    if path == "/healthz" and status == 200:
        return
    # A limit may answer 503 (the session table is full): typed, overload, with Retry-After.
    overloaded = status == 503 and _error_code(body) == "session_capacity"
    if overloaded and not headers.get("retry-after", "").isdigit():
        raise RuleViolation("HTTP 503 without Retry-After", text)
    if status != 200 and not 400 <= status < 500 and not overloaded:
        raise RuleViolation(f"HTTP {status} {_error_code(body)}".rstrip(), text)
    if not headers.get("content-type", "").startswith("application/json"):
        raise RuleViolation(f"HTTP {status} not JSON", headers.get("content-type", "<none>"))
    if method == "HEAD" and not body:
        return
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        raise RuleViolation(f"HTTP {status} body not JSON", text) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("message_id"), str):
        raise RuleViolation(f"HTTP {status} answer shape", text)
    if not isinstance(answer.get("task_id", ""), str):
        raise RuleViolation(f"HTTP {status} task_id not a string", text)
    if status == 200:
        if (
            answer.get("success") is not True
            or not set(answer) <= ANSWER_OK_KEYS
            or not isinstance(answer.get("data", ""), str)
        ):
            raise RuleViolation("HTTP 200 answer shape", text)
        return
    error = answer.get("error")
    if (
        answer.get("success") is not False
        or not set(answer) <= ANSWER_ERROR_KEYS
        or not isinstance(error, dict)
        or set(error) != set(ERROR_KEYS)
        or not all(isinstance(v, str) for v in error.values())
        or error["category"] not in CATEGORIES
    ):
        raise RuleViolation(f"HTTP {status} error shape", text)


def _error_code(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return str(error.get("code", ""))[:40] if isinstance(error, dict) else ""


async def asgi_request(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[int, dict[str, str], bytes]:
    """One request straight through the ASGI app (no sockets); (status, headers, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("sage.test", 80),
        "state": {},
    }
    pending = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks or [b""])
    ]
    answer: dict[str, Any] = {"status": 0, "headers": {}, "body": b""}

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]
            }
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


class HttpWorld:
    """A ServerAgent (fixed clocks, small limits) with live sessions to fuzz against."""

    RESET_EVERY = 20_000
    CHECK_EVERY = 1000

    def __init__(self, telemetry: bool = True) -> None:
        self.telemetry = Telemetry() if telemetry else None
        self.trap = DefectTrap().install()
        self.calls = 0
        self.answers: Counter[str] = Counter()
        self.metric_points = 0
        self.reset()

    def reset(self) -> None:
        b = base()
        self.server = ServerAgent(
            b.bob,
            DIDResolver(b.registry),
            sessions=SessionManager(clock=fixed_clock, max_sessions=MAX_SESSIONS),
            validator=MessageValidator(clock=fixed_clock),
            **_supported(
                ServerAgent,
                clock=fixed_clock,
                entropy=FIXED_ENTROPY,
                max_body=MAX_BODY,
                handshake_rate="100000000/second",
            ),
        )
        self.links = [
            Link(b.alice, PeerProfile.NATIVE, Role.RESPONDER),
            Link(b.dave, PeerProfile.NATIVE, Role.RESPONDER),
            Link(b.alice, PeerProfile.GO, Role.RESPONDER),
            Link(b.dave, PeerProfile.GO, Role.RESPONDER),
            Link(b.dave, PeerProfile.GO, Role.INITIATOR),  # the server initiated: _deliver
        ]
        self.full_since = 0

    def link(self, fdp: atheris.FuzzedDataProvider, profile: PeerProfile) -> Link:
        candidates = [link for link in self.links if link.profile is profile]
        link = _pick(fdp, candidates)
        if link.server_end is None or link.server_end.closed or link.peer is None:
            try:
                link.peer, link.server_end = _pair(
                    link.profile,
                    str(link.sender.did),
                    str(base().bob.did),
                    receiver=self.server.sessions,
                    receiver_role=link.server_role,
                )
            except SageError:  # the table, or this peer's share of it, is full: start over
                self.reset()
                return self.link(fdp, profile)
        return link

    def tick(self) -> None:
        self.calls += 1
        if self.server.sessions.active_count >= MAX_SESSIONS:
            self.full_since += 1  # leave the server full for a while: capacity is a path too
        if self.calls % self.RESET_EVERY == 0 or self.full_since > 50:
            self.reset()
        if self.telemetry is not None and self.calls % self.CHECK_EVERY == 0:
            self.metric_points = self.telemetry.check()

    def finish(self) -> dict[str, Any]:
        if self.telemetry is not None:
            self.metric_points = self.telemetry.check()
        return {
            "answers": dict(self.answers.most_common(40)),
            "metric_points_checked": self.metric_points,
        }


def _http_world() -> HttpWorld:
    w = _the_http_world()
    w.tick()
    return w


_the_http_world = functools.cache(HttpWorld)


def _native_envelope(
    fdp: atheris.FuzzedDataProvider, link: Link, task_id: str, forge: bool
) -> dict[str, Any]:
    peer = link.peer
    assert peer is not None
    message = seal(peer, _plaintext(fdp), now_ns=T0_NS + _offset_ns(fdp), task_id=task_id)
    if forge:  # fields changed and the MAC recomputed by the real peer
        changes: dict[str, Any] = {}
        if fdp.ConsumeBool():
            changes["seq"] = fdp.ConsumeIntInRange(1, 10**18)
        if fdp.ConsumeBool():
            changes["nonce"] = _mutate_bytes(fdp, message.nonce)
        if fdp.ConsumeBool():
            changes["ciphertext"] = _mutate_bytes(fdp, message.ciphertext)
        message = dataclasses.replace(message, **changes)
        message = dataclasses.replace(
            message,
            signature=peer.sign(signature_base(message, "POST", MESSAGES_PATH, task_id)),
        )
    wire = message.to_wire()
    role = "user" if peer.role is Role.INITIATOR else "agent"
    return transport_envelope(
        task_id, peer.id, wire["payload"], str(link.sender.did), None, wire["metadata"], role=role
    )


def _go_message_envelope(
    fdp: atheris.FuzzedDataProvider, link: Link, forge: bool
) -> dict[str, Any]:
    peer = link.peer
    assert peer is not None
    message_id = _message_id(fdp)
    message = seal_go(
        peer,
        _plaintext(fdp),
        sender_did=str(link.sender.did),
        task_id=MESSAGE_TASK,
        message_id=message_id,
        created=int(T0) + _offset_ns(fdp) // 1_000_000_000,
    )
    envelope = transport_envelope(
        MESSAGE_TASK,
        message.context_id,
        b64std(message.sealed),
        message.did,
        b64std(message.signature),
        message.metadata(),
        message_id=message.id,
    )
    if forge:  # envelope fields changed, MAC recomputed over them by the real peer
        for name in ("id", "did", "task_id"):
            if fdp.ConsumeIntInRange(0, 3) == 0:
                envelope[name] = _mutate_str(fdp, envelope[name])
        fields = Envelope(
            envelope["id"],
            envelope["context_id"],
            envelope["task_id"],
            envelope["did"],
            "",
            b"",
            b"",
            {},
            "",
        )
        try:
            mac = peer.sign(go_signature_base(fields, peer.kid, message.created))
        except (ValueError, UnicodeError):
            mac = b""
        envelope["signature"] = b64std(mac)
    return envelope


def _handshake_envelope(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    b = base()
    sender = _pick(fdp, b.senders)
    profile = PeerProfile.NATIVE if fdp.ConsumeBool() else PeerProfile.GO
    ctx_id = None if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicodeNoSurrogates(40)
    pending = Initiator(sender, SessionManager(), FIXED_ENTROPY).init(
        b.doc(b.bob), ctx_id or None, profile=profile
    )
    request = pending.request
    payload, signature = request.payload, request.signature
    if fdp.ConsumeIntInRange(0, 2) == 0:  # fields mutated, re-signed by the real sender
        fields = _mutate_request(fdp, pending.fields, fresh=False)
        payload = _serialize(fdp, fields, lambda v: go_json(v, sort_keys=True))
        signature = sender.signing_key.sign(payload)
    return transport_envelope(
        HANDSHAKE_TASK, request.ctx_id, b64std(payload), str(sender.did), b64std(signature)
    )


def _headers(
    fdp: atheris.FuzzedDataProvider, envelope: dict[str, Any] | None, body: bytes
) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []

    def value(text: str) -> bytes:
        return text.encode("utf-8", "surrogatepass").translate(None, b"\r\n\x00")

    choice = fdp.ConsumeIntInRange(0, 15)
    if choice <= 9:
        headers.append((b"content-type", b"application/json"))
    elif choice <= 13:
        headers.append((b"content-type", _pick(fdp, CONTENT_TYPES).encode()))
    elif choice == 14:
        headers.append((b"content-type", value(_text(fdp, 40))))
    for header, name in envelope_module.HEADER_FIELDS:
        pick = fdp.ConsumeIntInRange(0, 7)
        if pick == 1 and isinstance(envelope, dict) and isinstance(envelope.get(name), str):
            headers.append((header.encode(), value(envelope[name])))
        elif pick == 2:
            headers.append((header.encode(), value(_text(fdp, 40))))
    length = fdp.ConsumeIntInRange(0, 15)
    if length <= 5:
        headers.append((b"content-length", str(len(body)).encode()))
    elif length == 6:
        headers.append((b"content-length", str(fdp.ConsumeIntInRange(0, 1 << 40)).encode()))
    elif length == 7:  # what a lenient front server might pass through
        headers.append((b"content-length", _pick(fdp, ODD_LENGTHS)))
    elif length == 8:
        headers.append((b"content-length", value(_text(fdp, 8))))
    trace = fdp.ConsumeIntInRange(0, 7)
    if trace == 1:
        headers.append((b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
    elif trace == 2:
        headers.append((b"traceparent", value(_text(fdp, 60))))
    elif trace == 3:
        headers.append((b"tracestate", value(_text(fdp, 60))))
    elif trace == 4:
        headers.append((b"baggage", value(_text(fdp, 60))))
    if fdp.ConsumeIntInRange(0, 15) == 0:
        name = _text(fdp, 16).encode("ascii", "ignore").lower().translate(None, b"\r\n\x00: ")
        headers.append((name or b"x-fuzz", value(_text(fdp, 40))))
    return headers


def _chunks(fdp: atheris.FuzzedDataProvider, body: bytes) -> list[bytes]:
    if fdp.ConsumeIntInRange(0, 3) or len(body) < 2:
        return [body]
    cut = fdp.ConsumeIntInRange(1, len(body) - 1)
    return [body[:cut], b"", body[cut:]] if fdp.ConsumeBool() else [body[:cut], body[cut:]]


def _request_line(fdp: atheris.FuzzedDataProvider) -> tuple[str, str]:
    choice = fdp.ConsumeIntInRange(0, 31)
    if choice <= 27:
        return "POST", MESSAGES_PATH
    if choice == 28:
        return _pick(fdp, METHODS), _pick(fdp, PATHS)
    if choice == 29:
        return "GET", "/healthz"
    method = "".join(c for c in _text(fdp, 10) if c.isascii() and c.isalpha()).upper() or "POST"
    path = "/" + fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 30))
    return method, path


def _exchange(w: HttpWorld, fdp: atheris.FuzzedDataProvider, envelope: Any, body: bytes) -> None:
    method, path = _request_line(fdp)
    headers = _headers(fdp, envelope if isinstance(envelope, dict) else None, body)
    chunks = _chunks(fdp, body)
    LAST_CALL[0] = ("ServerAgent.app", (method, path, headers, body), {})
    w.trap.rearm()
    status, answer_headers, answer = base().run(
        asgi_request(w.server.app, method, path, headers, chunks)
    )
    w.trap.raise_caught()
    w.answers[f"{status} {_error_code(answer) or 'ok'}"] += 1
    OUTCOMES[f"http {status}"] += 1
    check_answer(method, path, status, answer_headers, answer)


def target_http(data: bytes) -> None:
    """ServerAgent.app through ASGI: fuzzed method, path, headers and body (raw bytes, fuzz
    JSON envelopes, real handshakes and native/go messages and closes, mutated, forged and
    re-signed, replayed). Every answer must be typed JSON, 4xx or 200; the metrics' labels
    are checked every CHECK_EVERY executions and at the end."""
    w = _http_world()
    mode, fdp = _split(data, 9)
    envelope: Any = None
    if mode == 0:
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, MAX_BODY + 64))
        _exchange(w, fdp, None, body)
        return
    if mode == 1:
        envelope = _handshake_envelope(fdp)
    elif mode in (2, 3):
        envelope = _native_envelope(fdp, w.link(fdp, PeerProfile.NATIVE), MESSAGE_TASK, mode == 3)
    elif mode in (4, 5):
        envelope = _go_message_envelope(fdp, w.link(fdp, PeerProfile.GO), mode == 5)
    elif mode == 6:
        envelope = _native_envelope(fdp, w.link(fdp, PeerProfile.NATIVE), CLOSE_TASK, False)
    elif mode == 7:  # every field an arbitrary JSON value
        envelope = {key: _json_value(fdp) for key in ENVELOPE_KEYS if fdp.ConsumeIntInRange(0, 3)}
    else:  # a valid message, then its exact replay
        link = w.link(fdp, _pick(fdp, [PeerProfile.NATIVE, PeerProfile.GO]))
        if link.profile is PeerProfile.NATIVE:
            envelope = _native_envelope(fdp, link, MESSAGE_TASK, False)
        else:
            envelope = _go_message_envelope(fdp, link, False)
        body = go_json(envelope)
        _exchange(w, fdp, envelope, body)
        _exchange(w, fdp, envelope, body)
        return
    if mode != 7 and fdp.ConsumeIntInRange(0, 2) == 0:
        envelope = _mutate_envelope(fdp, envelope)
    body = _serialize(fdp, envelope)
    _exchange(w, fdp, envelope, body)


def finish_http() -> dict[str, Any]:
    made = _the_http_world.cache_info().currsize  # nothing to report if never used
    return _the_http_world().finish() if made else {}


# --- the registry of targets ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    fn: Callable[[bytes], None]
    modes: int
    covers: str
    max_len: int = 4096
    finish: Callable[[], dict[str, Any]] | None = None
    raw_seeds: Callable[[], list[bytes]] | None = None


def _raw_envelopes() -> list[bytes]:
    return [go_json(sample) for sample in _envelope_world().samples]


def _raw_documents() -> list[bytes]:
    return [json.dumps(doc).encode() for doc in _identity_world().documents]


def _raw_cards() -> list[bytes]:
    return [json.dumps(card).encode() for card in _identity_world().cards]


def _raw_metadata() -> list[bytes]:
    w = _message_world()
    sender, _, _ = w.pair(PeerProfile.NATIVE)
    return [json.dumps(seal(sender, "seed", now_ns=T0_NS).to_wire()["metadata"]).encode()]


def _raw_answers() -> list[bytes]:
    out = []
    for sample in _answer_world().samples:
        sample = dict(sample)
        if isinstance(sample.get("data"), dict):
            sample["data"] = b64std(go_json(sample["data"]))
        out.append(go_json(sample) + b"\n")
    return out


def _raw_handshake() -> list[bytes]:
    return [s.pending.request.payload for s in _handshake_world().samples[:4]]


def _raw_dids() -> list[bytes]:
    b = base()
    return [str(i.did).encode() for i in (b.alice, b.dave, b.bob)] + [b"did:sage:eth:0xABC"]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "envelope",
            target_envelope,
            3,
            "transport.parse_envelope: JSON, field types and sizes, base64, metadata",
            raw_seeds=_raw_envelopes,
        ),
        Target(
            "message_from_wire",
            target_message_from_wire,
            3,
            "SecureMessage.from_wire: seq, nonce, timestamp, type, digest, signature fields",
            raw_seeds=_raw_metadata,
        ),
        Target(
            "message_open",
            target_message_open,
            10,
            "MessageValidator.open_wire on native and go sessions: MAC, skew, replay, order, AEAD",
            raw_seeds=_raw_metadata,
        ),
        Target(
            "handshake_process",
            target_handshake_process,
            4,
            "Responder.process: signature, payload JSON, DIDs, ts, ctx, replay, HPKE, X25519",
            raw_seeds=_raw_handshake,
        ),
        Target(
            "handshake_finalize",
            target_handshake_finalize,
            4,
            "Initiator.finalize: answer fields, DID, signature, ephS, kid, ackTag",
        ),
        Target(
            "did_document",
            target_did_document,
            2,
            "DIDDocument.from_json: types, base64url keys, key type, DID",
            raw_seeds=_raw_documents,
        ),
        Target("parse_did", target_parse_did, 3, "identity.parse_did", raw_seeds=_raw_dids),
        Target(
            "verify_signature",
            target_verify_signature,
            4,
            "identity.verify_signature / verify_digest for ed25519, secp256k1 (64/65/DER), p256",
        ),
        Target(
            "agent_card",
            target_agent_card,
            4,
            "proofs.verify_agent_card: JSON, proof, key entries, hex, base58, JCS, signature",
            max_len=16384,
            raw_seeds=_raw_cards,
        ),
        Target("jcs", target_jcs, 2, "canonical.jcs(loads_ieee(text)): RFC 8785 over any JSON"),
        Target(
            "read_answer",
            target_read_answer,
            3,
            "transport.read_answer: typed and Go-shaped answers, any status, base64 data",
            raw_seeds=_raw_answers,
        ),
        Target(
            "http",
            target_http,
            9,
            "ServerAgent.app in process: method, path, headers, body; typed answers; metric labels",
            max_len=8192,
            finish=finish_http,
            raw_seeds=_raw_envelopes,
        ),
    )
}


# Shrunk inputs of the findings of the campaign (fuzz/README.md), kept as seeds so that a
# short CI run replays them first: each one fails until its defect is fixed.
REGRESSIONS: dict[str, tuple[str, ...]] = {
    "agent_card": ("fe448ff5168ff5",),  # a key entry whose type is an object: TypeError
    "handshake_process": (  # raw UTF-8-encoded surrogates in nonce / exportCtx
        "03b7b10cd4888d5a311fd001000000d0",
        "abab000000d08d5a78a96400000000",
    ),
    "http": (  # the same over HTTP, and a go message id: 500 internal_error
        "40ff40ff6fff962922daff96da",
        "010040ff6f0d00d7d8daff96da",
        "561576311000000000000000000000d92500000000000000005b2e0000000000",
    ),
    "message_open": (  # go metadata that is not a string; an envelope id '\ud800'
        "e27368612d3235363d3a58575577434231314e4e77616b7a66796561574d583134327a424f51343d3a24a31919",
        "07ebeb0100ebebebeb6d576a4a537668507365346138633733613471303665345462746b517a33326b3255"
        "34376331673d3a002aebebeb1e",
    ),
}


def seeds(name: str) -> list[bytes]:
    """A small corpus made in code: every mode with no mutation (all-zero provider bytes),
    every mode with a few random provider bytes, raw valid artifacts for raw modes, and the
    shrunk inputs of past findings."""
    target = TARGETS[name]
    rng = hashlib.sha256(name.encode()).digest()
    out = [bytes([mode]) + b"\x00" * 64 for mode in range(target.modes)]
    for mode in range(target.modes):
        for i in range(3):
            noise = hashlib.sha256(rng + bytes([mode, i])).digest() * 4
            out.append(bytes([mode]) + noise[: 16 + 24 * i])
    if target.raw_seeds is not None:
        out += [b"\x00" + raw for raw in target.raw_seeds()]
    out += [bytes.fromhex(seed) for seed in REGRESSIONS.get(name, ())]
    return out
