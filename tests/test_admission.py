"""Admission that many identities cannot beat (issue 16, deliver 4).

Each test is an attack that worked before: a flood of fresh DIDs filling the session table,
handshakes beyond any per-DID limit, many DIDs from one address, a registry file rewritten
with another key for a registered DID, and registry re-reads stalling the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sage_otel.agent.did import (
    DIDDocument,
    DIDResolver,
    JsonFileRegistry,
    registration_entry,
    registry_file_bytes,
    sign_registration,
)
from sage_otel.agent.encoding import b64url
from sage_otel.agent.errors import PeerError, UnknownDIDError
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.session import SessionManager
from sage_otel.agent.transport import ClientAgent, ServerAgent

NewAgent = Callable[..., Awaitable[AgentIdentity]]
MakeClient = Callable[..., Awaitable[ClientAgent]]


def supported(factory: Callable[..., object], **options: object) -> dict[str, object]:
    """The options ``factory`` takes in this version: an attack also runs against a
    version that predates them, and fails there for what it tests, not for a keyword."""
    accepted = inspect.signature(factory).parameters
    return {key: value for key, value in options.items() if key in accepted}


def from_address(client: ClientAgent, address: str) -> ClientAgent:
    """Send ``client``'s requests as a reverse proxy on loopback would forward them from
    ``address`` (uvicorn believes X-Forwarded-For from 127.0.0.1 by default)."""
    post = client.http.post

    async def forwarded(url: str, **kwargs):
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "x-forwarded-for": address}
        return await post(url, **kwargs)

    client.http.post = forwarded  # type: ignore[method-assign]
    return client


async def try_connect(client: ClientAgent, url: str, server_did: str) -> str:
    """``"ok"``, or the refusal's code."""
    try:
        await client.connect(url, server_did)
    except PeerError as error:
        assert 400 <= error.http_status < 500, error  # never a 5xx for a client's doing
        return error.code
    return "ok"


async def test_a_fresh_did_flood_neither_pushes_out_nor_locks_out_an_established_peer(
    start_server, make_client: MakeClient, clock
) -> None:
    """A small table (40) and 60 fresh DIDs trying 4 sessions each, more handshakes than
    the server's rate allows: the established peer's session keeps working and its new
    handshake succeeds. Before, the flood filled the table and the peer's handshake got
    503 ``session_capacity``."""
    server, url = await start_server(
        sessions=SessionManager(max_sessions=40, max_sessions_per_peer=4, clock=clock),
        handshake_rate="1000/second",
        **supported(
            ServerAgent, global_handshake_rate="1000/minute"
        ),  # the table is what is tested
    )
    did = str(server.identity.did)
    legit = await make_client()
    conn = await legit.connect(url, did)
    assert await legit.send(conn, "before") == "before"
    clock.advance(120)  # the peer has held its session for two minutes

    attackers = [await make_client(chain=Chain.SOLANA) for _ in range(60)]

    async def flood(attacker: ClientAgent) -> list[str]:
        return [await try_connect(attacker, url, did) for _ in range(4)]

    outcomes = [code for codes in await asyncio.gather(*map(flood, attackers)) for code in codes]
    assert server.sessions.active_count == 40
    assert outcomes.count("ok") >= 39  # the attackers did fill the table

    assert await legit.send(conn, "after") == "after"  # not pushed out
    second = await legit.connect(url, did)  # and not locked out
    assert await legit.send(second, "new") == "new"
    assert await legit.send(conn, "still") == "still"


async def test_the_global_handshake_rate_holds_and_keeps_a_reserve_for_established_peers(
    start_server, make_client: MakeClient, clock
) -> None:
    """30 fresh DIDs at once against 20 handshakes a minute: newcomers get the top half
    of the bucket; a peer that has held a session for a minute still gets in; no 5xx."""
    server, url = await start_server(
        sessions=SessionManager(clock=clock),
        **supported(ServerAgent, global_handshake_rate="20/minute"),
    )
    did = str(server.identity.did)
    clients = [await make_client() for _ in range(30)]
    outcomes = await asyncio.gather(*(try_connect(c, url, did) for c in clients))
    assert outcomes.count("ok") in (10, 11)  # 10 of 20 tokens, and at most one refilled
    assert set(outcomes) == {"ok", "global_handshake_rate"}
    established = clients[outcomes.index("ok")]
    assert await try_connect(established, url, did) == "global_handshake_rate"  # too young
    clock.advance(60)
    for _ in range(5):
        assert await try_connect(established, url, did) == "ok"  # from the reserve
    assert server.sessions.active_count == outcomes.count("ok") + 5


async def test_handshakes_per_address_are_limited(start_server, make_client: MakeClient) -> None:
    server, url = await start_server(**supported(ServerAgent, address_handshake_rate="5/minute"))
    did = str(server.identity.did)
    crowd = [from_address(await make_client(), "203.0.113.9") for _ in range(8)]
    outcomes = [await try_connect(client, url, did) for client in crowd]
    assert outcomes == ["ok"] * 5 + ["address_rate_limited"] * 3
    # Other addresses have their own allowance; an IPv6 /64 counts as one address.
    assert await try_connect(from_address(await make_client(), "198.51.100.4"), url, did) == "ok"
    v6 = [from_address(await make_client(), f"2001:db8:1:2::{n}") for n in range(1, 8)]
    assert [await try_connect(c, url, did) for c in v6].count("address_rate_limited") == 2
    # Loopback (a local process, or a proxy that forwards no address) is not counted.
    assert await try_connect(await make_client(), url, did) == "ok"


async def test_sessions_per_address_are_capped(start_server, make_client: MakeClient) -> None:
    server, url = await start_server(
        sessions=SessionManager(**supported(SessionManager, max_sessions_per_address=3)),
        **supported(ServerAgent, address_handshake_rate=None),
    )
    did = str(server.identity.did)
    crowd = [from_address(await make_client(), "203.0.113.9") for _ in range(5)]
    outcomes = [await try_connect(client, url, did) for client in crowd]
    assert outcomes == ["ok"] * 3 + ["address_session_limit"] * 2
    assert await try_connect(from_address(await make_client(), "203.0.113.10"), url, did) == "ok"


async def test_per_address_limits_can_be_turned_off(start_server, make_client: MakeClient) -> None:
    server, url = await start_server(
        sessions=SessionManager(max_sessions_per_address=0), address_handshake_rate=None
    )
    did = str(server.identity.did)
    crowd = [from_address(await make_client(), "203.0.113.9") for _ in range(12)]
    assert [await try_connect(client, url, did) for client in crowd] == ["ok"] * 12


# --- the registry file ------------------------------------------------------------------


async def _registered(path: Path, *identities: AgentIdentity) -> list[DIDDocument]:
    registry = JsonFileRegistry(path)
    documents = []
    for identity in identities:
        document = DIDDocument.for_identity(identity, endpoint="http://127.0.0.1:9")
        await registry.register(document, sign_registration(identity, document))
        documents.append(document)
    return documents


def _swap_keys(entry: dict, attacker: AgentIdentity, *, resign: bool) -> None:
    """Put the attacker's keys in ``entry`` (keeping its DID), signed by the attacker."""
    forged = DIDDocument(
        DIDDocument.from_json(entry).did,
        attacker.signing_key.key_type,
        attacker.signing_key.public_bytes(),
        attacker.kem.public,
        endpoint="http://evil.example",
    )
    entry.update(forged.to_json())
    if resign:
        entry["signature"] = b64url(sign_registration(attacker, forged))


def _swap_kem_key(entry: dict, attacker: AgentIdentity, *, resign: bool) -> None:
    """Keep the victim's identity key, put in the attacker's KEM key (what a session's
    secrets are encrypted to): only the victim's signature could cover that."""
    entry["kemPublicKey"] = b64url(attacker.kem.public)
    if resign:
        forged = DIDDocument.from_json(entry)
        entry["signature"] = b64url(sign_registration(attacker, forged))


@pytest.mark.parametrize("swap", [_swap_keys, _swap_kem_key])
@pytest.mark.parametrize("resign", [True, False])
@pytest.mark.parametrize("layout", ["lines", "json"])
async def test_a_tampered_registry_file_is_refused_on_load(
    tmp_path: Path, swap, resign: bool, layout: str
) -> None:
    path = tmp_path / "registry.json"
    victim, bystander = AgentIdentity.generate(Chain.SOLANA), AgentIdentity.generate(Chain.ETHEREUM)
    attacker = AgentIdentity.generate(Chain.SOLANA)
    genuine, other = await _registered(path, victim, bystander)
    reader = JsonFileRegistry(path)  # a server that loaded the genuine file
    assert await reader.lookup(victim.did) == genuine

    stored = json.loads(path.read_bytes())
    for entry in stored["documents"]:
        if entry["did"] == str(victim.did):
            swap(entry, attacker, resign=resign)
    if layout == "lines":
        entries = [
            json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
            for e in stored["documents"]
        ]
        path.write_bytes(registry_file_bytes(entries))
    else:  # edited by hand: any JSON layout
        path.write_text(json.dumps(stored, indent=2))

    fresh = JsonFileRegistry(path)
    assert await fresh.lookup(victim.did) is None
    assert fresh.refused == 1
    assert await fresh.lookup(bystander.did) == other
    with pytest.raises(UnknownDIDError):
        await DIDResolver(fresh).resolve(victim.did)
    # A reader that re-reads the file keeps refusing the swapped document too.
    reader._docs.pop(victim.did)
    assert await reader.lookup(victim.did) is None
    assert await reader.lookup(bystander.did) == other


# --- re-reads off the event loop ----------------------------------------------------------

REGISTRY_SIZE = 20_000


@pytest.fixture(scope="module")
def big_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DIDDocument]]:
    """A registry file of 20,000 signed documents, built once (a few seconds)."""
    entries, documents = [], []
    for _ in range(REGISTRY_SIZE):
        identity = AgentIdentity.generate(Chain.ETHEREUM)
        document = DIDDocument.for_identity(identity, endpoint="http://127.0.0.1:9")
        entries.append(registration_entry(document, sign_registration(identity, document)))
        documents.append(document)
    path = tmp_path_factory.mktemp("big") / "registry.json"
    path.write_bytes(registry_file_bytes(entries))
    return path, documents


class LoopLag:
    """A ticker on the event loop, recording how long the loop ran other code between two
    of its 5 ms sleeps: in CPU time of the loop's thread (what code on the loop blocked
    it, whatever else the machine runs) and in wall time (which also counts the OS
    scheduling this process out: noisy on a loaded machine)."""

    def __init__(self) -> None:
        self.worst_cpu = self.worst_wall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.005)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu)
            self.worst_wall = max(self.worst_wall, time.perf_counter() - wall - 0.005)

    async def __aenter__(self) -> LoopLag:
        # The cyclic GC is paused while measuring: a full collection stops every thread for
        # a time that grows with the whole heap (a test suite's: 300 ms), not with the code
        # measured here.
        gc.disable()
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(0.02)  # the tick that was due sees how late it is
        self._task.cancel()
        gc.enable()

    def check(self, what: str) -> None:
        assert self.worst_cpu < 0.05, f"{what}: the loop ran {self.worst_cpu * 1e3:.0f} ms"
        assert self.worst_wall < 0.25, f"{what}: the loop waited {self.worst_wall * 1e3:.0f} ms"


async def test_registry_rereads_do_not_block_the_event_loop(
    tmp_path: Path, big_registry: tuple[Path, list[DIDDocument]]
) -> None:
    """A 20,000-document file appears under a running server (every entry new: all of
    them verified), then the attack: register a DID, handshake from an unknown one, again.
    No turn of the loop runs 50 ms. Before, each miss re-parsed the file on the loop."""
    source, documents = big_registry
    path = tmp_path / "registry.json"
    registry = JsonFileRegistry(path)
    async with LoopLag() as lag:
        os.link(source, path)
        assert await registry.lookup(AgentIdentity.generate(Chain.SOLANA).did) is None
    lag.check("a cold re-read of 20,000 documents")
    assert await registry.lookup(documents[-1].did) == documents[-1]
    assert registry.refused == 0

    async with LoopLag() as lag:
        for _ in range(2):
            newcomer = AgentIdentity.generate(Chain.SOLANA)
            document = DIDDocument.for_identity(newcomer)
            await registry.register(document, sign_registration(newcomer, document))
            started = time.perf_counter()
            assert await registry.lookup(AgentIdentity.generate(Chain.SOLANA).did) is None
            assert time.perf_counter() - started < 1.5  # at most one re-read a second
            assert await registry.lookup(newcomer.did) == document
    lag.check("re-reads of 20,000 documents as DIDs register")


async def test_concurrent_misses_share_one_reread(tmp_path: Path) -> None:
    """Many lookups that miss while the file changed cause one re-read, not one each."""
    path = tmp_path / "registry.json"
    registry = JsonFileRegistry(path, **supported(JsonFileRegistry, reread_interval=0.2))
    identity = AgentIdentity.generate(Chain.SOLANA)
    (document,) = await _registered(path, identity)
    reads = 0
    original = registry._read_file

    def counting_read():
        nonlocal reads
        reads += 1
        return original()

    registry._read_file = counting_read  # type: ignore[method-assign]
    strangers = [AgentIdentity.generate(Chain.SOLANA).did for _ in range(50)]
    results = await asyncio.gather(*(registry.lookup(did) for did in strangers))
    assert results == [None] * 50
    assert reads == 1
    assert await registry.lookup(identity.did) == document


# --- configuration ------------------------------------------------------------------------


def test_admission_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_otel.server import AdmissionLimits, admission_limits

    for name in ("", "_PER_ADDRESS"):
        monkeypatch.delenv(f"SAGE_OTEL_HANDSHAKE_RATE{name}", raising=False)
    monkeypatch.delenv("SAGE_OTEL_SESSIONS_PER_ADDRESS", raising=False)
    monkeypatch.delenv("SAGE_OTEL_NEW_PEER_SHARE", raising=False)
    assert admission_limits() == AdmissionLimits("200/second", "100/second", 4096, 0.5)
    monkeypatch.setenv("SAGE_OTEL_HANDSHAKE_RATE", "500/minute")
    monkeypatch.setenv("SAGE_OTEL_HANDSHAKE_RATE_PER_ADDRESS", "0")
    monkeypatch.setenv("SAGE_OTEL_SESSIONS_PER_ADDRESS", "0")
    monkeypatch.setenv("SAGE_OTEL_NEW_PEER_SHARE", "0.25")
    assert admission_limits() == AdmissionLimits("500/minute", None, 0, 0.25)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAGE_OTEL_HANDSHAKE_RATE", "fast"),
        ("SAGE_OTEL_HANDSHAKE_RATE", "-5/second"),
        ("SAGE_OTEL_HANDSHAKE_RATE_PER_ADDRESS", "10/day"),
        ("SAGE_OTEL_SESSIONS_PER_ADDRESS", "-1"),
        ("SAGE_OTEL_SESSIONS_PER_ADDRESS", "many"),
        ("SAGE_OTEL_NEW_PEER_SHARE", "0"),
        ("SAGE_OTEL_NEW_PEER_SHARE", "1.5"),
        ("SAGE_OTEL_NEW_PEER_SHARE", "nan"),
    ],
)
def test_a_bad_admission_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from sage_otel.server import admission_limits

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        admission_limits()
