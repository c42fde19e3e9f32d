"""HTTP transport: an ASGI server agent and an async client agent.

Everything travels as ``POST {base}/messages`` with the SAGE reference's JSON envelope
``{id, context_id, task_id, payload, did, signature, metadata, role}`` (bytes in standard
base64, metadata values strings, an empty signature as ``null``), written with Go's field
order and escaping. ``task_id`` selects the operation: the handshake, a session message, or
a close. Answers have the reference's shape ``{success, message_id, task_id, data, error}``
with ``data`` the standard base64 of JSON bytes. Failures keep what the reference lacks: a
typed error ``{code, category, message}`` and a 4xx status, and never disturb other
sessions. Answers in the reference's own error shape (HTTP 200, ``success: false``, free
text) are read too, and mapped to typed errors.

A session's :class:`~.session.PeerProfile` decides how its messages flow: ``native`` replies
travel sealed in the answer; ``go`` messages are answered bare and each side POSTs its own
messages to the other's endpoint (from its DID document), as the reference's agents do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .canonical import go_json, loads
from .did import DIDResolver
from .encoding import b64std, from_b64std
from .entropy import SYSTEM, Entropy
from .errors import (
    HandshakeTimeoutError,
    InternalError,
    InvalidMessageError,
    NetworkError,
    PayloadTooLargeError,
    PeerError,
    RateLimitedError,
    SageError,
    UnsupportedMediaTypeError,
    peer_error_from_text,
)
from .handshake import TASK as HANDSHAKE_TASK
from .handshake import HandshakeLimiter, Initiator, Responder
from .identity import AgentIdentity, parse_did
from .message import MessageValidator, seal, seal_go
from .session import EndReason, PeerProfile, Role, Session, SessionManager

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
INBOX_SIZE = 256
_ENVELOPE_STR_FIELDS = ("id", "context_id", "task_id", "did", "role")
# Request headers the reference's client sets, and the envelope field each must agree with.
_HEADER_FIELDS = (
    ("x-sage-did", "did"),
    ("x-sage-message-id", "id"),
    ("x-sage-context-id", "context_id"),
    ("x-sage-task-id", "task_id"),
)

Handler = Callable[[Session, "str | bytes"], "str | bytes | Awaitable[str | bytes | None] | None"]


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


def error_answer(error: SageError, message_id: str = "", task_id: str = "") -> Response:
    body = answer_body(success=False, message_id=message_id, task_id=task_id, error=error)
    return Response(body, status_code=error.http_status, media_type="application/json")


_logger = logging.getLogger(__name__)
_defect_logged = False


def _log_defect_once() -> None:
    global _defect_logged
    if not _defect_logged:
        _defect_logged = True
        _logger.exception("sage-otel: unexpected error answering a request (logged once)")


@dataclass(frozen=True)
class RawAnswer:
    """An HTTP answer as the client reads it, whatever library fetched it."""

    status_code: int
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


class AiohttpSession:
    """An aiohttp-based HTTP client for :class:`ClientAgent` (``http=AiohttpSession()``).

    Several times faster per request than httpx on this path; used where throughput
    matters (the HTTP benchmark). Connection errors become :class:`NetworkError`.
    """

    def __init__(self, timeout: float = 10.0, limit: int = 64) -> None:
        self.timeout = timeout
        self.limit = limit
        self._session = None

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> RawAnswer:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.limit),
                trust_env=False,
            )
        try:
            async with self._session.post(url, data=content, headers=headers) as answer:
                return RawAnswer(answer.status, await answer.read())
        except asyncio.TimeoutError as exc:
            raise NetworkError("request timed out", code="request_timeout") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise NetworkError("peer unreachable") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _default_handler(_session: Session, data: str | bytes) -> str | bytes:
    return data


def _read_answer(answer: httpx.Response | RawAnswer) -> Any:
    """The JSON inside an answer's ``data``, None without data; failures raise typed errors."""
    try:
        body = loads(answer.content)
    except (ValueError, RecursionError):
        body = None
    if not answer.is_success:
        error = body.get("error") if isinstance(body, dict) else None
        raise _peer_error(error, answer.status_code)
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise NetworkError("peer sent an answer of unknown shape", code="bad_answer")
    if not body["success"] or body.get("error"):
        raise _peer_error(body.get("error"), answer.status_code)
    raw = body.get("data")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise NetworkError("answer data must be base64", code="bad_answer")
    try:
        return loads(from_b64std(raw, "data"))
    except (ValueError, RecursionError) as exc:
        raise NetworkError("answer data is not JSON", code="bad_answer") from exc


def _peer_error(error: object, status: int) -> PeerError:
    if isinstance(error, dict):
        return PeerError(
            str(error.get("message", "peer refused")),
            code=str(error.get("code", "peer_error")),
            category=str(error.get("category", "internal")),
            http_status=status,
        )
    if isinstance(error, str) and error:
        return peer_error_from_text(error, status)
    category = "invalid" if 400 <= status < 500 else "internal"
    return PeerError("peer refused", code="peer_error", category=category, http_status=status)


class ServerAgent:
    """A responder agent: answers handshakes and session messages over HTTP.

    It also receives the messages go-profile peers POST back to sessions this agent (or a
    :class:`ClientAgent` sharing its session manager) initiated: those wait in a bounded
    per-session inbox for :meth:`next_message`.
    """

    def __init__(
        self,
        identity: AgentIdentity,
        resolver: DIDResolver,
        *,
        sessions: SessionManager | None = None,
        validator: MessageValidator | None = None,
        handler: Handler | None = None,
        max_body: int = MAX_BODY_BYTES,
        sweep_interval: float = 1.0,
        entropy: Entropy = SYSTEM,
        clock: Callable[[], float] | None = None,
        handshake_rate: str = "50/second",
    ) -> None:
        self.identity = identity
        self.resolver = resolver
        self.sessions = sessions or SessionManager()
        self.validator = validator or MessageValidator()
        self.entropy = entropy
        self.responder = Responder(
            identity,
            resolver,
            self.sessions,
            clock=clock or time.time,
            entropy=entropy,
            limiter=HandshakeLimiter(handshake_rate),
        )
        self.handler: Handler = handler or _default_handler
        self.max_body = max_body
        self.sweep_interval = sweep_interval
        self.app = Starlette(
            routes=[
                Route(MESSAGES_PATH, self._endpoint, methods=["POST"]),
                Route("/healthz", self._health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},
            lifespan=self._lifespan,
        )
        self.app.router.redirect_slashes = False  # "/messages/" is a typed 404, not a 307
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._inboxes: dict[str, asyncio.Queue[str | bytes]] = {}
        self._outbound: ClientAgent | None = None
        self._pushes: set[asyncio.Task[None]] = set()
        self.port = 0

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette):
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            self.sessions.close_all()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sessions.sweep()

    async def _health(self, _request: Request) -> Response:
        return Response(go_json({"status": "ok", "did": str(self.identity.did)}))

    async def _http_error(self, _request: Request, exc: Exception) -> Response:
        """Routing failures (wrong path or method) in the same typed shape as the rest."""
        status = getattr(exc, "status_code", 400)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
        error = InvalidMessageError(f"{code.replace('_', ' ')}", code=code)
        error.http_status = status if 400 <= status < 500 else 400
        return self.refuse(error)

    def refuse(self, error: SageError, message_id: str = "", task_id: str = "") -> Response:
        """Every refusal the server answers goes through here (and is counted here)."""
        response = error_answer(error, message_id, task_id)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            response.headers["retry-after"] = str(retry_after)
        return response

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        # isdigit() alone admits "²": only ASCII digits are a length worth trusting early.
        too_long = declared is not None and declared.isascii() and declared.isdigit()
        if too_long and int(declared) > self.max_body:
            raise PayloadTooLargeError("request body too large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLargeError("request body too large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _endpoint(self, request: Request) -> Response:
        envelope: Envelope | None = None
        try:
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                raise UnsupportedMediaTypeError("content-type must be application/json")
            envelope = parse_envelope(await self._read_body(request), request.headers)
            for header, name in _HEADER_FIELDS:
                value = request.headers.get(header)
                if value is not None and value != getattr(envelope, name):
                    raise InvalidMessageError(
                        f"{header} does not match the body", code="header_mismatch"
                    )
            data = await self.dispatch(envelope)
            body = answer_body(
                success=True,
                message_id=envelope.id,
                task_id=envelope.task_id,
                data=None if data is None else go_json(data, sort_keys=True),
            )
            return Response(body, media_type="application/json")
        except SageError as error:
            ids = (envelope.id, envelope.task_id) if envelope else ("", "")
            return self.refuse(error, *ids)
        except Exception:  # a defect, not the caller's fault: typed, logged once, counted
            _log_defect_once()
            ids = (envelope.id, envelope.task_id) if envelope else ("", "")
            return self.refuse(InternalError("internal error"), *ids)

    async def dispatch(self, envelope: Envelope) -> Any:
        if envelope.task_id == HANDSHAKE_TASK:
            return await self.handle_handshake(envelope)
        if envelope.task_id == MESSAGE_TASK:
            return await self.process_message(envelope)
        if envelope.task_id == CLOSE_TASK:
            return self.handle_close(envelope)
        raise InvalidMessageError("unknown task_id", code="unknown_task")

    async def handle_handshake(self, envelope: Envelope) -> dict[str, str]:
        parse_did(envelope.did)
        response, _session = await self.responder.process(
            envelope.did, envelope.payload, envelope.signature, envelope.context_id or None
        )
        return response

    def _open(self, envelope: Envelope) -> tuple[Session, str | bytes]:
        session = self.sessions.get(envelope.context_id)
        if (
            envelope.did
            and envelope.did != session.peer_did  # the common case: no parsing at all
            and parse_did(envelope.did) != parse_did(session.peer_did)
        ):
            raise InvalidMessageError("sender is not the session's peer", code="wrong_peer")
        plaintext = self.validator.open_wire(
            session, envelope.raw_payload, envelope.metadata, envelope=envelope
        )
        return session, plaintext

    async def process_message(self, envelope: Envelope) -> dict[str, Any] | None:
        """Open an inbound session message; answer it as the session's profile wants."""
        session, plaintext = self._open(envelope)
        if session.profile is PeerProfile.GO and session.role is Role.INITIATOR:
            self._deliver(session, plaintext)
            return None
        reply = self.handler(session, plaintext)
        if asyncio.iscoroutine(reply):
            reply = await reply
        if session.profile is PeerProfile.GO:
            if reply is not None:
                self._push_later(session, reply)
            return None
        return seal(session, b"" if reply is None else reply, method=REPLY_METHOD).to_wire()

    def handle_close(self, envelope: Envelope) -> dict[str, bool]:
        session, _ = self._open(envelope)
        self.sessions.close(session.id)
        self._inboxes.pop(session.id, None)
        return {"closed": True}

    # -- go profile: messages both ways by POST ----------------------------------------

    def _inbox(self, session_id: str) -> asyncio.Queue[str | bytes]:
        inbox = self._inboxes.get(session_id)
        if inbox is None:
            inbox = self._inboxes[session_id] = asyncio.Queue(INBOX_SIZE)
        return inbox

    def _deliver(self, session: Session, plaintext: str | bytes) -> None:
        try:
            self._inbox(session.id).put_nowait(plaintext)
        except asyncio.QueueFull:
            raise RateLimitedError("inbox full: retry later", code="inbox_full") from None

    async def next_message(self, session_id: str, timeout: float | None = None) -> str | bytes:
        """The next message a go-profile peer POSTed to this session."""
        try:
            return await asyncio.wait_for(self._inbox(session_id).get(), timeout)
        except asyncio.TimeoutError as exc:
            raise NetworkError("no message from the peer in time", code="receive_timeout") from exc

    def _push_later(self, session: Session, data: str | bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._push_quietly(session, data))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def _push_quietly(self, session: Session, data: str | bytes) -> None:
        with contextlib.suppress(SageError):  # the sender already had its answer
            await self.push(session, data)

    async def push(self, session: Session, data: str | bytes) -> None:
        """POST one message of a go-profile session to the peer's endpoint."""
        peer = await self.resolver.resolve(session.peer_did)
        if not peer.endpoint:
            raise NetworkError("peer publishes no endpoint", code="no_endpoint")
        if self._outbound is None:
            self._outbound = ClientAgent(
                self.identity,
                self.resolver,
                sessions=self.sessions,
                validator=self.validator,
                entropy=self.entropy,
            )
        await self._outbound.send(Connection(peer.endpoint, session.peer_did, session), data)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind (raising OSError if the port is taken), serve in the background, return the port."""
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose
        # protocol is TCP, and without it every answer waits out a delayed ACK (~40 ms).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        # Serve in a fresh context: the server's tasks must not inherit the caller's span.
        serve = self._server.serve(sockets=[sock])
        self._task = contextvars.Context().run(asyncio.create_task, serve)
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        for task in list(self._pushes):
            task.cancel()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None
        if self._outbound is not None:
            await self._outbound.http.aclose()


@dataclass
class Connection:
    """A client's live session with one server agent."""

    base_url: str
    peer_did: str
    session: Session


class ClientAgent:
    """An initiator agent: resolves peers, runs handshakes, sends session messages.

    Go-profile peers answer by POSTing to this agent's own endpoint: :meth:`listen` serves
    it and :meth:`receive` returns what arrived.
    """

    def __init__(
        self,
        identity: AgentIdentity,
        resolver: DIDResolver,
        *,
        sessions: SessionManager | None = None,
        validator: MessageValidator | None = None,
        http: httpx.AsyncClient | AiohttpSession | None = None,
        handshake_timeout: float = 10.0,
        entropy: Entropy = SYSTEM,
        sweep_interval: float = 1.0,
    ) -> None:
        self.identity = identity
        self.resolver = resolver
        self.sessions = sessions or SessionManager()
        self.validator = validator or MessageValidator()
        self.entropy = entropy
        self.initiator = Initiator(identity, self.sessions, entropy)
        self.http = http or httpx.AsyncClient(timeout=10.0)
        self.handshake_timeout = handshake_timeout
        self.sweep_interval = sweep_interval
        self.listener: ServerAgent | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def envelope(
        self,
        task_id: str,
        context_id: str,
        payload: str,
        signature: str = "",
        metadata: dict[str, str] | None = None,
        *,
        message_id: str | None = None,
        role: str = "user",
    ) -> dict[str, Any]:
        """An envelope as a dict (payload and signature already base64)."""
        return {
            "id": message_id or self.entropy.uuid4(),
            "context_id": context_id,
            "task_id": task_id,
            "payload": payload,
            "did": str(self.identity.did),
            "signature": signature or None,
            "metadata": metadata or {},
            "role": role,
        }

    async def post(
        self, base_url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> Any:
        """POST an envelope; the answer's data, a typed PeerError, or NetworkError."""
        content = wire_body(body) if isinstance(body, dict) else body
        headers = {
            **(headers or {}),
            "content-type": "application/json",
            "x-sage-did": str(self.identity.did),
        }
        if isinstance(body, dict):
            headers["x-sage-message-id"] = body.get("id", "")
            if body.get("context_id"):
                headers["x-sage-context-id"] = body["context_id"]
            if body.get("task_id"):
                headers["x-sage-task-id"] = body["task_id"]
        try:
            answer = await self.http.post(
                base_url + MESSAGES_PATH, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise NetworkError("request timed out", code="request_timeout") from exc
        except (httpx.TransportError, httpx.InvalidURL, ValueError) as exc:
            raise NetworkError("peer unreachable") from exc
        try:
            return _read_answer(answer)
        except PeerError as error:
            if error.code in SESSION_GONE and isinstance(body, dict):
                self._peer_ended(body.get("context_id", ""))
            raise

    def _peer_ended(self, session_id: str) -> None:
        """The peer says the session is over: end it here too, keys included."""
        try:
            session = self.sessions.get(session_id)
        except SageError:
            return  # already ended here
        self.sessions.expire(session, EndReason.PEER_ENDED)

    async def connect(
        self,
        base_url: str,
        peer_did: str,
        *,
        profile: PeerProfile = PeerProfile.NATIVE,
        ctx_id: str | None = None,
    ) -> Connection:
        """Run the handshake with the agent at ``base_url``, bounded by the handshake timeout.

        ``profile`` must be ``go`` for a SAGE Go reference peer (see :class:`PeerProfile`);
        ``ctx_id`` names the handshake context (default ``ctx-<uuid>``).
        """
        try:
            return await asyncio.wait_for(
                self._handshake(base_url, peer_did, profile, ctx_id), self.handshake_timeout
            )
        except asyncio.TimeoutError as exc:
            raise HandshakeTimeoutError("handshake timed out") from exc

    async def _handshake(
        self, base_url: str, peer_did: str, profile: PeerProfile, ctx_id: str | None
    ) -> Connection:
        peer = await self.resolver.resolve(peer_did)
        pending = self.initiator.init(peer, ctx_id, profile=profile)
        request = pending.request
        body = self.envelope(
            HANDSHAKE_TASK, request.ctx_id, b64std(request.payload), b64std(request.signature)
        )
        try:
            response = await self.post(base_url, body)
        except BaseException:
            pending.wipe()
            raise
        session = self.initiator.finalize(pending, response)
        self._start_sweeper()
        return Connection(base_url, str(peer.did), session)

    def _start_sweeper(self) -> None:
        """Expire aged and idle sessions here as the server does there (from the first one)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sessions.sweep()

    def message_envelope(
        self, conn: Connection, data: str | bytes, task_id: str = MESSAGE_TASK
    ) -> dict[str, Any]:
        session = conn.session
        role = "user" if session.role is Role.INITIATOR else "agent"
        if session.profile is PeerProfile.GO:
            message = seal_go(
                session,
                data,
                sender_did=str(self.identity.did),
                task_id=task_id,
                message_id=self.entropy.uuid4(),
                created=self.entropy.time_ns() // 1_000_000_000,
                aead_nonce=self.entropy.random(12),
            )
            return self.envelope(
                task_id,
                session.id,
                b64std(message.sealed),
                b64std(message.signature),
                message.metadata(),
                message_id=message.id,
                role=role,
            )
        wire = seal(session, data).to_wire()
        return self.envelope(
            task_id, session.id, wire["payload"], metadata=wire["metadata"], role=role
        )

    async def send(self, conn: Connection, data: str | bytes) -> str | bytes | None:
        """Send one message in the session; the peer's (verified, decrypted) reply.

        A go-profile peer answers without a reply (None): its messages arrive through
        :meth:`receive`.
        """
        answer = await self.post(conn.base_url, self.message_envelope(conn, data))
        if conn.session.profile is PeerProfile.GO:
            return None
        return self.open_reply(conn, answer)

    def open_reply(self, conn: Connection, answer: Any) -> str | bytes:
        if not isinstance(answer, dict):
            raise InvalidMessageError("reply must be an object", code="bad_reply")
        return self.validator.open_wire(
            conn.session, answer.get("payload"), answer.get("metadata"), method=REPLY_METHOD
        )

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve this agent's endpoint (for go-profile peers' messages); returns the port."""
        if self.listener is None:
            self.listener = ServerAgent(
                self.identity,
                self.resolver,
                sessions=self.sessions,
                validator=self.validator,
                entropy=self.entropy,
            )
        return await self.listener.start(host, port)

    async def receive(self, conn: Connection, timeout: float | None = None) -> str | bytes:
        """The next message a go-profile peer POSTed to this session (needs :meth:`listen`)."""
        if self.listener is None:
            raise NetworkError("receive needs listen() first", code="not_listening")
        return await self.listener.next_message(conn.session.id, timeout)

    async def close(self, conn: Connection) -> None:
        """Close the session on both sides; locally it is closed whatever the peer says.

        The reference has no close message: a go-profile session is closed locally only.
        """
        try:
            if conn.session.profile is PeerProfile.NATIVE:
                await self.post(conn.base_url, self.message_envelope(conn, "", CLOSE_TASK))
        finally:
            self.sessions.close(conn.session.id)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.sessions.close_all()
        if self.listener is not None:
            await self.listener.stop()
        await self.http.aclose()
