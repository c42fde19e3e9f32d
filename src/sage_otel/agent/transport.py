"""HTTP transport: an ASGI server agent and an async client agent.

Everything travels as ``POST {base}/messages`` with the reference's JSON envelope
``{id, context_id, task_id, payload, did, signature, metadata, role}`` (bytes in standard
base64). ``task_id`` selects the operation: the handshake, a session message, or a close.
Answers are ``{success, message_id, task_id, data, error}``; failures carry a typed error
``{code, category, message}`` and a 4xx status, and never disturb other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .did import DIDResolver
from .encoding import b64std, from_b64std
from .errors import (
    HandshakeTimeoutError,
    InvalidMessageError,
    NetworkError,
    PayloadTooLargeError,
    PeerError,
    SageError,
)
from .handshake import TASK as HANDSHAKE_TASK
from .handshake import Initiator, Responder
from .identity import AgentIdentity, parse_did
from .message import MessageValidator, seal
from .session import EndReason, Session, SessionManager

MESSAGE_TASK = "sage/message@v1"
SESSION_GONE = frozenset({"session_expired", "unknown_session"})
CLOSE_TASK = "sage/close@v1"
MESSAGES_PATH = "/messages"
REPLY_METHOD = "RESPONSE"
MAX_BODY_BYTES = 1 << 20
_ENVELOPE_STR_FIELDS = ("id", "context_id", "task_id", "did", "role")

Handler = Callable[[Session, "str | bytes"], "str | bytes | Awaitable[str | bytes]"]


@dataclass(frozen=True)
class Envelope:
    id: str
    context_id: str
    task_id: str
    did: str
    role: str
    payload: bytes
    signature: bytes
    metadata: dict[str, Any]
    raw_payload: str
    headers: Mapping[str, str] = field(default_factory=dict)


def parse_envelope(body: bytes, headers: Mapping[str, str] | None = None) -> Envelope:
    """Parse and type-check a request body; every defect is an InvalidMessageError."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessageError("body is not JSON", code="malformed_json") from exc
    if not isinstance(data, dict):
        raise InvalidMessageError("body must be a JSON object", code="malformed_json")
    for key in _ENVELOPE_STR_FIELDS:
        value = data.get(key, "")
        if not isinstance(value, str) or len(value) > 512:
            raise InvalidMessageError(f"{key} must be a short string", code="wrong_type")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidMessageError("metadata must be an object", code="wrong_type")
    if not data.get("task_id"):
        raise InvalidMessageError("task_id is required", code="missing_field")
    return Envelope(
        id=data.get("id") or str(uuid.uuid4()),
        context_id=data.get("context_id", ""),
        task_id=data["task_id"],
        did=data.get("did", ""),
        role=data.get("role", ""),
        payload=from_b64std(data.get("payload", ""), "payload"),
        signature=from_b64std(data.get("signature", ""), "signature"),
        metadata=metadata,
        raw_payload=data.get("payload", ""),
        headers=headers or {},
    )


def error_body(error: SageError, message_id: str = "", task_id: str = "") -> dict[str, Any]:
    return {
        "success": False,
        "message_id": message_id,
        "task_id": task_id,
        "data": None,
        "error": error.to_dict(),
    }


class ServerAgent:
    """A responder agent: answers handshakes and session messages over HTTP."""

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
    ) -> None:
        self.identity = identity
        self.resolver = resolver
        self.sessions = sessions or SessionManager()
        self.validator = validator or MessageValidator()
        self.responder = Responder(identity, resolver, self.sessions)
        self.handler: Handler = handler or (lambda _session, data: data)
        self.max_body = max_body
        self.sweep_interval = sweep_interval
        self.app = Starlette(
            routes=[
                Route(MESSAGES_PATH, self._endpoint, methods=["POST"]),
                Route("/healthz", self._health, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
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

    async def _health(self, _request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "did": str(self.identity.did)})

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise PayloadTooLargeError("request body too large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLargeError("request body too large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _endpoint(self, request: Request) -> JSONResponse:
        envelope: Envelope | None = None
        try:
            envelope = parse_envelope(await self._read_body(request), request.headers)
            header_did = request.headers.get("x-sage-did")
            if header_did is not None and header_did != envelope.did:
                raise InvalidMessageError("X-SAGE-DID does not match body", code="header_mismatch")
            data = await self.dispatch(envelope)
            return JSONResponse(
                {
                    "success": True,
                    "message_id": envelope.id,
                    "task_id": envelope.task_id,
                    "data": data,
                    "error": None,
                }
            )
        except SageError as error:
            ids = (envelope.id, envelope.task_id) if envelope else ("", "")
            return JSONResponse(error_body(error, *ids), status_code=error.http_status)

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
            envelope.did, envelope.payload, envelope.signature
        )
        return response

    def _open(self, envelope: Envelope) -> tuple[Session, str | bytes]:
        session = self.sessions.get(envelope.context_id)
        return session, self.validator.open_wire(session, envelope.raw_payload, envelope.metadata)

    async def process_message(self, envelope: Envelope) -> dict[str, Any]:
        """Open an inbound session message, run the handler, seal its reply."""
        session, plaintext = self._open(envelope)
        reply = self.handler(session, plaintext)
        if asyncio.iscoroutine(reply):
            reply = await reply
        return seal(session, reply, method=REPLY_METHOD).to_wire()

    def handle_close(self, envelope: Envelope) -> dict[str, bool]:
        session, _ = self._open(envelope)
        self.sessions.close(session.id)
        return {"closed": True}

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
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


@dataclass
class Connection:
    """A client's live session with one server agent."""

    base_url: str
    peer_did: str
    session: Session


class ClientAgent:
    """An initiator agent: resolves peers, runs handshakes, sends session messages."""

    def __init__(
        self,
        identity: AgentIdentity,
        resolver: DIDResolver,
        *,
        sessions: SessionManager | None = None,
        validator: MessageValidator | None = None,
        http: httpx.AsyncClient | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.identity = identity
        self.resolver = resolver
        self.sessions = sessions or SessionManager()
        self.validator = validator or MessageValidator()
        self.initiator = Initiator(identity, self.sessions)
        self.http = http or httpx.AsyncClient(timeout=10.0)
        self.handshake_timeout = handshake_timeout

    def envelope(
        self,
        task_id: str,
        context_id: str,
        payload: str,
        signature: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "context_id": context_id,
            "task_id": task_id,
            "payload": payload,
            "did": str(self.identity.did),
            "signature": signature,
            "metadata": metadata or {},
            "role": "user",
        }

    async def post(
        self, base_url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> Any:
        """POST an envelope; a typed PeerError for a failure answer, NetworkError if unreachable."""
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {
            **(headers or {}),
            "content-type": "application/json",
            "x-sage-did": str(self.identity.did),
        }
        if isinstance(body, dict):
            headers["x-sage-message-id"] = body.get("id", "")
            headers["x-sage-context-id"] = body.get("context_id", "")
            headers["x-sage-task-id"] = body.get("task_id", "")
        try:
            answer = await self.http.post(
                base_url + MESSAGES_PATH, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise NetworkError("request timed out", code="request_timeout") from exc
        except httpx.TransportError as exc:
            raise NetworkError("peer unreachable") from exc
        try:
            data = answer.json()
        except ValueError as exc:
            raise NetworkError("peer sent a non-JSON answer", code="bad_answer") from exc
        if not answer.is_success or not isinstance(data, dict) or not data.get("success"):
            error = (data.get("error") if isinstance(data, dict) else None) or {}
            raise PeerError(
                str(error.get("message", "peer refused")),
                code=str(error.get("code", "peer_error")),
                category=str(error.get("category", "internal")),
                http_status=answer.status_code,
            )
        return data.get("data")

    async def connect(self, base_url: str, peer_did: str) -> Connection:
        """Run the handshake with the agent at ``base_url``, bounded by the handshake timeout."""
        try:
            return await asyncio.wait_for(
                self._handshake(base_url, peer_did), self.handshake_timeout
            )
        except asyncio.TimeoutError as exc:
            raise HandshakeTimeoutError("handshake timed out") from exc

    async def _handshake(self, base_url: str, peer_did: str) -> Connection:
        peer = await self.resolver.resolve(peer_did)
        pending = self.initiator.init(peer)
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
        return Connection(base_url, str(peer.did), session)

    def message_envelope(
        self, conn: Connection, data: str | bytes, task_id: str = MESSAGE_TASK
    ) -> dict[str, Any]:
        wire = seal(conn.session, data).to_wire()
        return self.envelope(task_id, conn.session.id, wire["payload"], metadata=wire["metadata"])

    async def send(self, conn: Connection, data: str | bytes) -> str | bytes:
        """Send one message in the session and return the peer's (verified, decrypted) reply."""
        try:
            answer = await self.post(conn.base_url, self.message_envelope(conn, data))
        except PeerError as error:
            if error.code in SESSION_GONE:  # ended on the server: end it here too
                self.sessions.expire(conn.session, EndReason.PEER_ENDED)
            raise
        return self.open_reply(conn, answer)

    def open_reply(self, conn: Connection, answer: Any) -> str | bytes:
        if not isinstance(answer, dict):
            raise InvalidMessageError("reply must be an object", code="bad_reply")
        return self.validator.open_wire(
            conn.session, answer.get("payload"), answer.get("metadata"), method=REPLY_METHOD
        )

    async def close(self, conn: Connection) -> None:
        """Close the session on both sides; the local keys are zeroed whatever the peer says."""
        try:
            await self.post(conn.base_url, self.message_envelope(conn, "", CLOSE_TASK))
        finally:
            self.sessions.close(conn.session.id)

    async def aclose(self) -> None:
        self.sessions.close_all()
        await self.http.aclose()
