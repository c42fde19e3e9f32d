"""Shared fixtures: a controllable clock, registries with registered agents, and live servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sage_otel.agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    Registry,
    sign_registration,
)
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.session import PeerProfile
from sage_otel.agent.transport import ClientAgent, ServerAgent

T0 = 1_700_000_000.0


class FakeClock:
    """A clock that only moves when told to; usable wherever a ``clock`` is injectable."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ns(self) -> int:
        return int(self.now * 1_000_000_000)


async def register_identity(
    registry: Registry, identity: AgentIdentity, **extra: Any
) -> DIDDocument:
    document = DIDDocument.for_identity(identity, **extra)
    await registry.register(document, sign_registration(identity, document))
    return document


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> InMemoryRegistry:
    return InMemoryRegistry()


@pytest.fixture
def new_agent(registry: InMemoryRegistry) -> Callable[..., Awaitable[AgentIdentity]]:
    """Generate an identity, registered in ``registry`` unless ``registered=False``."""

    async def make(chain: Chain = Chain.SOLANA, *, registered: bool = True) -> AgentIdentity:
        identity = AgentIdentity.generate(chain)
        if registered:
            await register_identity(registry, identity)
        return identity

    return make


@pytest.fixture
async def start_server(
    registry: InMemoryRegistry, new_agent: Callable[..., Awaitable[AgentIdentity]]
) -> AsyncIterator[Callable[..., Awaitable[tuple[ServerAgent, str]]]]:
    """Start ServerAgents on 127.0.0.1:0; every one is stopped at teardown."""
    servers: list[ServerAgent] = []

    async def start(
        identity: AgentIdentity | None = None, **kwargs: Any
    ) -> tuple[ServerAgent, str]:
        identity = identity or await new_agent(Chain.SOLANA)
        server = ServerAgent(identity, DIDResolver(registry), **kwargs)
        port = await server.start("127.0.0.1", 0)
        servers.append(server)
        return server, f"http://127.0.0.1:{port}"

    yield start
    for server in reversed(servers):
        await server.stop()


@pytest.fixture
async def make_client(
    registry: InMemoryRegistry, new_agent: Callable[..., Awaitable[AgentIdentity]]
) -> AsyncIterator[Callable[..., Awaitable[ClientAgent]]]:
    """ClientAgents resolving through ``registry``; all closed at teardown."""
    clients: list[ClientAgent] = []

    async def make(
        identity: AgentIdentity | None = None,
        *,
        chain: Chain = Chain.ETHEREUM,
        registered: bool = True,
        **kwargs: Any,
    ) -> ClientAgent:
        identity = identity or await new_agent(chain, registered=registered)
        client = ClientAgent(identity, DIDResolver(registry), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def go_link(start_server, make_client, new_agent, registry):
    """A server and a listening client in a go-profile session (the Go reference's flow)."""
    identity = AgentIdentity.generate(Chain.SOLANA)
    client = await make_client(identity, registered=False)
    port = await client.listen()
    await register_identity(registry, identity, endpoint=f"http://127.0.0.1:{port}")
    server, url = await start_server(await new_agent(Chain.ETHEREUM))
    conn = await client.connect(url, str(server.identity.did), profile=PeerProfile.GO)
    return server, client, conn
