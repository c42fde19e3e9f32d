"""The server agent: an ASGI app that answers handshakes, session messages and closes.

Failures are typed errors ``{code, category, message}`` with a 4xx status, and never
disturb other sessions. A session's :class:`~.session.PeerProfile` decides how its messages
flow: ``native`` replies travel sealed in the answer; ``go`` messages are answered bare and
each side POSTs its own messages to the other's endpoint (from its DID document), as the
reference's agents do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .canonical import go_json
from .did import DIDResolver
from .edge import EdgeLimits, SageHttpProtocol
from .entropy import SYSTEM, Entropy
from .envelope import (
    CLOSE_TASK,
    HEADER_FIELDS,
    MAX_BODY_BYTES,
    MESSAGE_TASK,
    MESSAGES_PATH,
    REPLY_METHOD,
    Envelope,
    answer_body,
    parse_envelope,
)
from .errors import (
    InternalError,
    InvalidMessageError,
    NetworkError,
    PayloadTooLargeError,
    RateLimitedError,
    SageError,
    SessionNotFoundError,
    UnsupportedMediaTypeError,
)
from .handshake import (
    ADDRESS_HANDSHAKE_RATE,
    GLOBAL_HANDSHAKE_RATE,
    AddressLimiter,
    GlobalHandshakeLimiter,
    HandshakeLimiter,
    Responder,
)
from .handshake import TASK as HANDSHAKE_TASK
from .identity import AgentIdentity, parse_did
from .message import MessageValidator, seal
from .outbound import OutboundPolicy, PushSlot, PushSlots
from .session import PeerProfile, Role, Session, SessionManager

if TYPE_CHECKING:
    from .client_agent import ClientAgent

INBOX_SIZE = 256

Handler = Callable[[Session, "str | bytes"], "str | bytes | Awaitable[str | bytes | None] | None"]


def error_answer(error: SageError, message_id: str = "", task_id: str = "") -> Response:
    body = answer_body(success=False, message_id=message_id, task_id=task_id, error=error)
    return Response(body, status_code=error.http_status, media_type="application/json")


_logger = logging.getLogger(__name__)
_defect_logged = False
_push_failures_logged: set[str] = set()


def _log_defect_once() -> None:
    global _defect_logged
    if not _defect_logged:
        _defect_logged = True
        _logger.exception("sage-otel: unexpected error answering a request (logged once)")


def _default_handler(_session: Session, data: str | bytes) -> str | bytes:
    return data


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the application's own event loop: the application's signals are its
    own (Ctrl-C ends its run as it chooses, then :meth:`ServerAgent.stop`), not a cue for
    the server to shut down under requests still in flight."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        global_handshake_rate: str | None = GLOBAL_HANDSHAKE_RATE,
        address_handshake_rate: str | None = ADDRESS_HANDSHAKE_RATE,
        outbound: OutboundPolicy | None = None,
        edge: EdgeLimits | None = None,
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
            # Many identities share these two: per source address, and one for the server
            # (None turns either off; the session table's own admission is in SessionManager).
            address_limiter=(
                AddressLimiter(address_handshake_rate) if address_handshake_rate else None
            ),
            global_limiter=(
                GlobalHandshakeLimiter(global_handshake_rate, self.sessions.new_peer_share)
                if global_handshake_rate
                else None
            ),
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
        self.outbound = outbound or OutboundPolicy()
        self.push_slots = PushSlots(self.outbound.per_peer, self.outbound.total)
        self.edge = edge or EdgeLimits()
        self.port = 0

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette):
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            self.sessions.close_all()
            if self._outbound is not None:  # its pooled connections to peers' endpoints
                await self._outbound.http.aclose()
                self._outbound = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sessions.sweep()
            self._drop_ended_inboxes()

    def _drop_ended_inboxes(self) -> None:
        """Plaintext nobody read goes with its session, however the session ended."""
        for session_id in [s for s in self._inboxes if s not in self.sessions]:
            del self._inboxes[session_id]

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
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLargeError("request body too large")
                chunks.append(chunk)
        except ClientDisconnect:  # hung up or cut at the request deadline: the peer's doing
            raise InvalidMessageError("request ended early", code="client_disconnected") from None
        return b"".join(chunks)

    async def _endpoint(self, request: Request) -> Response:
        envelope: Envelope | None = None
        try:
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                raise UnsupportedMediaTypeError("content-type must be application/json")
            envelope = parse_envelope(await self._read_body(request), request.headers)
            if request.client is not None:  # behind a trusted proxy: its X-Forwarded-For
                envelope = dataclasses.replace(envelope, source=request.client.host)
            for header, name in HEADER_FIELDS:
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
            envelope.did,
            envelope.payload,
            envelope.signature,
            envelope.context_id or None,
            source=envelope.source,
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
            session,
            envelope.raw_payload,
            envelope.metadata,
            envelope=envelope,
            task_id=envelope.task_id,  # covered by the MAC: a relabelled task is refused
        )
        return session, plaintext

    async def process_message(self, envelope: Envelope) -> dict[str, Any] | None:
        """Open an inbound session message; answer it as the session's profile wants."""
        slot = await self._reserve_push(envelope)  # refused here, before any work, if full
        try:
            session, plaintext = self._open(envelope)
            if session.profile is PeerProfile.GO and session.role is Role.INITIATOR:
                self._deliver(session, plaintext)
                return None
            reply = self.handler(session, plaintext)
            if asyncio.iscoroutine(reply):
                reply = await reply
            if session.profile is PeerProfile.GO:
                if reply is not None:
                    self._push_later(session, reply, slot)
                    slot = None  # the push releases it
                return None
            reply = b"" if reply is None else reply
            return seal(session, reply, method=REPLY_METHOD, task_id=envelope.task_id).to_wire()
        finally:
            if slot is not None:
                slot.release()

    async def _reserve_push(self, envelope: Envelope) -> PushSlot | None:
        """A go reply's push slot, taken before the message is opened or handled.

        When the peer's endpoint (or every endpoint together) already has its pushes in
        flight, the message is refused 429 ``push_backlog`` untouched: not handled, not
        marked seen, so the sender may send it again as it is; nothing queues behind an
        endpoint that never answers.
        """
        session = self.sessions.get(envelope.context_id)  # _open's own first check
        if session.profile is not PeerProfile.GO or session.role is Role.INITIATOR:
            return None
        try:
            peer = await self.resolver.resolve(session.peer_did)
        except SageError:
            return None  # the push fails on its own; the sender still gets its answer
        return self.push_slots.acquire(peer.endpoint) if peer.endpoint else None

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
        if session_id not in self.sessions:  # what it left unread went with it
            self._inboxes.pop(session_id, None)
            raise SessionNotFoundError("no such session")
        try:
            return await asyncio.wait_for(self._inbox(session_id).get(), timeout)
        except asyncio.TimeoutError as exc:
            raise NetworkError("no message from the peer in time", code="receive_timeout") from exc

    def _push_later(self, session: Session, data: str | bytes, slot: PushSlot | None) -> None:
        task = asyncio.get_running_loop().create_task(self._push_quietly(session, data, slot))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        if slot is not None:  # also when the task is cancelled before it starts
            task.add_done_callback(lambda _task: slot.release())
            slot.attach(task)  # cancelled if the slot is evicted (already: cancelled now)

    async def _push_quietly(
        self, session: Session, data: str | bytes, slot: PushSlot | None
    ) -> None:
        try:
            await self.push(session, data, slot=slot)
        except SageError as error:  # the sender already had its answer: tell the operator
            if error.code not in _push_failures_logged:
                _push_failures_logged.add(error.code)
                _logger.warning(
                    "sage-otel: a push to a peer's endpoint failed: %s (logged once per code)",
                    error.code,
                )

    async def push(
        self, session: Session, data: str | bytes, *, slot: PushSlot | None = None
    ) -> None:
        """POST one message of a go-profile session to the peer's endpoint.

        Bounded by :attr:`outbound` (answer size, total deadline, no redirects, permitted
        addresses only) and holding a push slot: ``slot`` if the caller reserved one, else
        one taken here (429 ``push_backlog`` when none is free).
        """
        try:
            peer = await self.resolver.resolve(session.peer_did)
            if not peer.endpoint:
                raise NetworkError("peer publishes no endpoint", code="no_endpoint")
            if slot is None:
                slot = self.push_slots.acquire(peer.endpoint)
            from .client_agent import ClientAgent, Connection  # the two agents use each other

            if self._outbound is None:
                self._outbound = ClientAgent(
                    self.identity,
                    self.resolver,
                    sessions=self.sessions,
                    validator=self.validator,
                    entropy=self.entropy,
                    outbound=self.outbound,
                )
            await self._outbound.send(Connection(peer.endpoint, session.peer_did, session), data)
        finally:
            if slot is not None:
                slot.release()

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
            http=SageHttpProtocol.with_limits(self.edge),  # deadlines and caps: agent/edge.py
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _EmbeddedServer(config)
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
