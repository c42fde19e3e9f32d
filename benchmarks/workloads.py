"""The two measured SAGE operations, in process, with no network in the way."""

from __future__ import annotations

import asyncio
import os
import time

from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.handshake import HandshakeLimiter, Initiator, Responder
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.message import MessageValidator, seal
from sage_otel.agent.session import Role, SessionLimits, SessionManager

PAYLOAD_SIZE = 1024
_UNLIMITED = SessionLimits(max_age=1e9, idle_timeout=1e9, max_messages=10**12)


class MessageRoundTrip:
    """One 1 KiB message: seal + sign, wire encode/decode, verify, replay check, open."""

    def __init__(self) -> None:
        seed = os.urandom(32)
        self.sender = SessionManager(_UNLIMITED).create(
            "bench", Role.INITIATOR, seed, peer_did="b", kid="k"
        )
        self.receiver = SessionManager(_UNLIMITED).create(
            "bench", Role.RESPONDER, seed, peer_did="a", kid="k"
        )
        self.validator = MessageValidator()  # replay state per session, bounded by its limit
        self.payload = os.urandom(PAYLOAD_SIZE)

    def run(self, n: int) -> float:
        """Seconds for ``n`` round trips."""
        sender, receiver, validator, payload = (
            self.sender,
            self.receiver,
            self.validator,
            self.payload,
        )
        start = time.perf_counter()
        for _ in range(n):
            wire = seal(sender, payload).to_wire()
            validator.open_wire(receiver, wire["payload"], wire["metadata"])
        return time.perf_counter() - start


class Handshake:
    """A full HPKE handshake between two registered agents: init, process, finalize.

    The chains pick the identity types: ethereum is secp256k1, solana is Ed25519."""

    def __init__(self, client_chain: str = "ethereum", server_chain: str = "solana") -> None:
        self.loop = asyncio.new_event_loop()
        registry = InMemoryRegistry()
        self.client, self.server = (
            AgentIdentity.generate(client_chain),
            AgentIdentity.generate(server_chain),
        )
        for identity in (self.client, self.server):
            document = DIDDocument.for_identity(identity)
            self.loop.run_until_complete(
                registry.register(document, sign_registration(identity, document))
            )
        resolver = DIDResolver(registry, ttl=1e9)
        self.client_sessions, self.server_sessions = SessionManager(), SessionManager()
        self.initiator = Initiator(self.client, self.client_sessions)
        # One initiator handshaking flat out: the per-DID limit must not be what is measured.
        self.responder = Responder(
            self.server,
            resolver,
            self.server_sessions,
            limiter=HandshakeLimiter("1000000000/second"),
        )
        self.resolver = resolver

    async def _many(self, n: int) -> None:
        for _ in range(n):
            peer = await self.resolver.resolve(self.server.did)
            pending = self.initiator.init(peer)
            request = pending.request
            response, server_session = await self.responder.process(
                request.init_did, request.payload, request.signature
            )
            client_session = self.initiator.finalize(pending, response)
            self.client_sessions.close(client_session.id)
            self.server_sessions.close(server_session.id)

    def run(self, n: int) -> float:
        start = time.perf_counter()
        self.loop.run_until_complete(self._many(n))
        return time.perf_counter() - start

    def close(self) -> None:
        self.loop.close()
