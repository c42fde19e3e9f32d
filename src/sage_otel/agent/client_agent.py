"""The client agent: resolves peers, runs handshakes, sends session messages over HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from .did import DIDResolver
from .encoding import b64std
from .entropy import SYSTEM, Entropy
from .envelope import CLOSE_TASK, MESSAGE_TASK, MESSAGES_PATH, REPLY_METHOD, SESSION_GONE, wire_body
from .errors import (
    HandshakeTimeoutError,
    InvalidMessageError,
    NetworkError,
    PeerError,
    SageError,
)
from .handshake import TASK as HANDSHAKE_TASK
from .handshake import Initiator
from .http import AiohttpSession, BoundedSession, read_answer
from .identity import AgentIdentity
from .message import MessageValidator, seal, seal_go
from .outbound import OutboundPolicy
from .server_agent import ServerAgent
from .session import EndReason, PeerProfile, Role, Session, SessionManager


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
        http: httpx.AsyncClient | AiohttpSession | BoundedSession | None = None,
        handshake_timeout: float = 10.0,
        entropy: Entropy = SYSTEM,
        sweep_interval: float = 1.0,
        outbound: OutboundPolicy | None = None,
    ) -> None:
        self.identity = identity
        self.resolver = resolver
        self.sessions = sessions or SessionManager()
        self.validator = validator or MessageValidator()
        self.entropy = entropy
        self.initiator = Initiator(identity, self.sessions, entropy)
        # Without ``http``: a client that reads bounded answers where ``outbound`` permits.
        self.http = http or BoundedSession(outbound)
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
            return read_answer(answer)
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
        wire = seal(session, data, task_id=task_id).to_wire()
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

    def open_reply(
        self, conn: Connection, answer: Any, *, task_id: str = MESSAGE_TASK
    ) -> str | bytes:
        """Open the sealed reply to a request sent under ``task_id`` (which it is bound to)."""
        if not isinstance(answer, dict):
            raise InvalidMessageError("reply must be an object", code="bad_reply")
        return self.validator.open_wire(
            conn.session,
            answer.get("payload"),
            answer.get("metadata"),
            method=REPLY_METHOD,
            task_id=task_id,
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
