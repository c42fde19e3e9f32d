from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sage_otel.agent.did as did_module
from sage_otel.agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    JsonFileRegistry,
    registration_entry,
    registry_file_bytes,
    sign_registration,
)
from sage_otel.agent.encoding import b64url
from sage_otel.agent.errors import (
    InactiveAgentError,
    InvalidMessageError,
    RegistrationError,
    SignatureError,
    UnknownDIDError,
)
from sage_otel.agent.identity import DID, AgentIdentity, Chain, KeyType

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


class CountingRegistry(InMemoryRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def lookup(self, did: DID) -> DIDDocument | None:
        self.lookups += 1
        return await super().lookup(did)


def document(identity: AgentIdentity, **extra: object) -> DIDDocument:
    return DIDDocument.for_identity(identity, **extra)


async def register(registry, identity: AgentIdentity, **extra: object) -> DIDDocument:
    doc = document(identity, **extra)
    await registry.register(doc, sign_registration(identity, doc))
    return doc


async def deactivate(registry, identity: AgentIdentity) -> None:
    doc = dataclasses.replace(document(identity), active=False)
    await registry.deactivate(doc, sign_registration(identity, doc))


@pytest.mark.parametrize("chain", [Chain.ETHEREUM, Chain.SOLANA])
def test_document_json_round_trip(chain: Chain) -> None:
    identity = AgentIdentity.generate(chain)
    doc = document(
        identity,
        name="agent",
        endpoint="http://127.0.0.1:1",
        capabilities=("chat", "files"),
        active=False,
    )
    data = doc.to_json()
    assert data["did"] == str(identity.did)
    assert data["keyType"] == identity.signing_key.key_type.value
    assert data["capabilities"] == ["chat", "files"] and data["active"] is False
    assert DIDDocument.from_json(json.loads(json.dumps(data))) == doc


def test_document_defaults_when_optional_fields_missing() -> None:
    identity = AgentIdentity.generate(Chain.SOLANA)
    data = document(identity).to_json()
    for key in ("name", "endpoint", "capabilities", "active"):
        del data[key]
    doc = DIDDocument.from_json(data)
    assert doc.active is True and doc.capabilities == () and doc.name == ""


def test_canonical_bytes_are_sorted_compact_json() -> None:
    doc = document(AgentIdentity.generate(Chain.SOLANA), name="x")
    raw = doc.canonical_bytes()
    assert json.loads(raw) == doc.to_json()
    assert raw == json.dumps(doc.to_json(), sort_keys=True, separators=(",", ":")).encode()
    assert doc.canonical_bytes() != dataclasses.replace(doc, name="y").canonical_bytes()


def _valid_json() -> dict[str, object]:
    return document(AgentIdentity.generate(Chain.ETHEREUM), name="n").to_json()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("did"),
        lambda d: d.pop("keyType"),
        lambda d: d.pop("publicKey"),
        lambda d: d.pop("kemPublicKey"),
        lambda d: d.update(did="did:web:example.com"),
        lambda d: d.update(did=17),
        lambda d: d.update(keyType="rsa"),
        lambda d: d.update(keyType=["ed25519"]),
        lambda d: d.update(publicKey="not base64!"),
        lambda d: d.update(publicKey=None),
        lambda d: d.update(kemPublicKey=b64url(bytes(31))),
        lambda d: d.update(capabilities="chat"),
        lambda d: d.update(capabilities=["chat", 1]),
        lambda d: d.update(name=5),
        lambda d: d.update(endpoint=None),
        lambda d: d.update(active="yes"),
        lambda d: d.update(active=1),
    ],
)
def test_document_from_json_rejects(mutate) -> None:
    data = _valid_json()
    mutate(data)
    with pytest.raises(InvalidMessageError):
        DIDDocument.from_json(data)


@pytest.mark.parametrize("value", [None, [], "doc", 3, 1.5, True])
def test_document_from_json_rejects_non_objects(value: object) -> None:
    with pytest.raises(InvalidMessageError) as info:
        DIDDocument.from_json(value)
    assert info.value.code == "bad_document"


_VALID_FIELDS = _valid_json()
DOC_LIKE = st.fixed_dictionaries(
    {},
    optional={
        key: st.one_of(st.just(value), JSON, st.text(max_size=50))
        for key, value in _VALID_FIELDS.items()
    },
)


@settings(max_examples=300)
@given(JSON | DOC_LIKE)
def test_document_from_json_on_arbitrary_json(value: object) -> None:
    try:
        doc = DIDDocument.from_json(value)
    except InvalidMessageError:
        return
    assert isinstance(doc, DIDDocument)
    assert DIDDocument.from_json(doc.to_json()) == doc


@pytest.mark.parametrize("chain", [Chain.ETHEREUM, Chain.SOLANA])
async def test_register_and_lookup(chain: Chain) -> None:
    registry = InMemoryRegistry()
    identity = AgentIdentity.generate(chain)
    doc = await register(registry, identity, endpoint="http://a")
    assert await registry.lookup(identity.did) == doc
    assert await registry.lookup(AgentIdentity.generate(chain).did) is None


async def test_registration_with_someone_elses_key_is_rejected() -> None:
    registry = InMemoryRegistry()
    victim, attacker = AgentIdentity.generate(Chain.SOLANA), AgentIdentity.generate(Chain.SOLANA)
    # The victim's DID with the attacker's own keys: the DID is not derived from that key.
    forged = DIDDocument(
        victim.did,
        KeyType.ED25519,
        attacker.signing_key.public_bytes(),
        attacker.kem.public,
        endpoint="http://evil",
    )
    with pytest.raises(RegistrationError) as info:
        await registry.register(forged, attacker.signing_key.sign(forged.canonical_bytes()))
    assert info.value.code == "did_key_mismatch"
    # The victim's DID and public key, but signed by the attacker.
    copied = DIDDocument(
        victim.did,
        KeyType.ED25519,
        victim.signing_key.public_bytes(),
        attacker.kem.public,
        endpoint="http://evil",
    )
    with pytest.raises(SignatureError):
        await registry.register(copied, attacker.signing_key.sign(copied.canonical_bytes()))
    assert await registry.lookup(victim.did) is None


@pytest.mark.parametrize("chain", [Chain.ETHEREUM, Chain.SOLANA])
async def test_registered_document_cannot_be_hijacked_or_tampered(chain: Chain) -> None:
    registry = InMemoryRegistry()
    victim, attacker = AgentIdentity.generate(chain), AgentIdentity.generate(chain)
    original = await register(registry, victim, endpoint="http://good")
    hijack = dataclasses.replace(original, endpoint="http://evil")
    with pytest.raises(SignatureError):
        await registry.register(hijack, attacker.signing_key.sign(hijack.canonical_bytes()))
    # A genuine signature over the original does not cover a changed document.
    with pytest.raises(SignatureError):
        await registry.register(hijack, sign_registration(victim, original))
    assert await registry.lookup(victim.did) == original
    # The owner can update their own document.
    updated = await register(registry, victim, endpoint="http://new")
    assert await registry.lookup(victim.did) == updated


async def test_deactivation_rules() -> None:
    registry = InMemoryRegistry()
    identity, other = AgentIdentity.generate(Chain.SOLANA), AgentIdentity.generate(Chain.SOLANA)
    doc = await register(registry, identity)
    with pytest.raises(RegistrationError):
        await registry.deactivate(doc, sign_registration(identity, doc))
    inactive = dataclasses.replace(doc, active=False)
    with pytest.raises(SignatureError):
        await registry.deactivate(inactive, sign_registration(other, inactive))
    assert (await registry.lookup(identity.did)).active is True
    await registry.deactivate(inactive, sign_registration(identity, inactive))
    assert (await registry.lookup(identity.did)).active is False


async def test_json_file_registry_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "registry.json"
    first = JsonFileRegistry(path)
    eth = await register(
        first, AgentIdentity.generate(Chain.ETHEREUM), name="e", capabilities=("a",)
    )
    sol = await register(first, AgentIdentity.generate(Chain.SOLANA), endpoint="http://s")
    assert path.exists()
    second = JsonFileRegistry(path)
    assert await second.lookup(eth.did) == eth
    assert await second.lookup(sol.did) == sol
    stored = json.loads(path.read_text())
    assert sorted(d["did"] for d in stored["documents"]) == sorted([str(eth.did), str(sol.did)])


async def test_json_file_registry_loads_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text("")
    registry = JsonFileRegistry(path)
    assert await registry.lookup(AgentIdentity.generate(Chain.SOLANA).did) is None


async def test_json_file_registry_refuses_forged_registration(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = JsonFileRegistry(path)
    victim, attacker = (
        AgentIdentity.generate(Chain.ETHEREUM),
        AgentIdentity.generate(Chain.ETHEREUM),
    )
    forged = document(victim)
    with pytest.raises(SignatureError):
        await registry.register(forged, sign_registration(attacker, forged))
    assert not path.exists()


async def test_json_file_registry_survives_concurrent_registrations(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = JsonFileRegistry(path)
    identities = [AgentIdentity.generate(c) for c in [Chain.ETHEREUM, Chain.SOLANA] * 15]
    docs = await asyncio.gather(
        *(register(registry, i, name=f"a{n}") for n, i in enumerate(identities))
    )
    reloaded = JsonFileRegistry(path)
    for doc in docs:
        assert await reloaded.lookup(doc.did) == doc
    assert len(json.loads(path.read_text())["documents"]) == len(identities)
    # Atomic replacement leaves no temporary file behind (the lock file stays, empty).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "registry.json.lock"]


async def test_registrations_interleaved_with_rereads_keep_every_entry(tmp_path: Path) -> None:
    """A re-read applied on the loop while a registration runs in its thread must not make
    the write start from an empty file (which dropped every other DID: a demo's clients and
    its server then answered each other unknown_did for the whole run)."""
    path = tmp_path / "registry.json"
    registry = JsonFileRegistry(path, reread_interval=0.0)
    identities = [AgentIdentity.generate(c) for c in [Chain.ETHEREUM, Chain.SOLANA] * 100]
    stop = asyncio.Event()

    async def look_up() -> None:
        while not stop.is_set():
            await registry.lookup(identities[0].did)
            await asyncio.sleep(0)

    lookers = [asyncio.create_task(look_up()) for _ in range(3)]
    try:
        for identity in identities:
            await register(registry, identity)
    finally:
        stop.set()
        await asyncio.gather(*lookers)
    reloaded = JsonFileRegistry(path)
    assert [await reloaded.lookup(i.did) is not None for i in identities] == [True] * 200
    assert [await registry.lookup(i.did) is not None for i in identities] == [True] * 200


async def test_a_reread_that_fails_is_tried_again_without_a_new_change(tmp_path: Path) -> None:
    """A read error must not mark the file as read: the DIDs it holds are found once it
    reads again, though nobody writes it afterwards."""
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    server = JsonFileRegistry(path, reread_interval=0.05, failed_retry=0.05)
    newcomer = AgentIdentity.generate(Chain.SOLANA)
    read_file = server._read_file
    calls = 0

    def failing_once(**kwargs: bool) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PermissionError("registry.json")
        return read_file(**kwargs)

    server._read_file = failing_once  # type: ignore[method-assign]
    doc = await register(writer, newcomer)
    assert await server.lookup(newcomer.did) is None  # the read failed: not known yet
    await asyncio.sleep(0.06)
    assert await server.lookup(newcomer.did) == doc
    assert calls == 2


async def test_resolver_caches_within_ttl(clock) -> None:
    registry = CountingRegistry()
    identity = AgentIdentity.generate(Chain.SOLANA)
    doc = await register(registry, identity)
    resolver = DIDResolver(registry, ttl=60.0, clock=clock)
    assert await resolver.resolve(identity.did) == doc
    assert registry.lookups == 1
    clock.advance(59.9)
    assert await resolver.resolve(str(identity.did)) == doc
    assert registry.lookups == 1
    clock.advance(0.1)
    assert await resolver.resolve(identity.did) == doc
    assert registry.lookups == 2
    resolver.invalidate(identity.did)
    await resolver.resolve(identity.did)
    assert registry.lookups == 3
    resolver.invalidate()
    await resolver.resolve(identity.did)
    assert registry.lookups == 4


async def test_resolver_accepts_aliases_and_rejects_garbage(clock) -> None:
    registry = CountingRegistry()
    identity = AgentIdentity.generate(Chain.SOLANA)
    doc = await register(registry, identity)
    resolver = DIDResolver(registry, clock=clock)
    alias = f"did:sage:sol:{identity.did.identifier}"
    assert await resolver.resolve(alias) == doc
    with pytest.raises(InvalidMessageError):
        await resolver.resolve("did:example:123")
    assert registry.lookups == 1


async def test_resolver_remembers_unknown_dids_briefly(clock) -> None:
    """A flood from unregistered DIDs costs one registry lookup per DID per negative TTL."""
    registry = CountingRegistry()
    identity = AgentIdentity.generate(Chain.ETHEREUM)
    resolver = DIDResolver(registry, clock=clock, negative_ttl=5.0)
    for _ in range(100):
        with pytest.raises(UnknownDIDError) as info:
            await resolver.resolve(identity.did)
        assert info.value.code == "unknown_did" and info.value.http_status == 403
    assert registry.lookups == 1
    doc = await register(registry, identity)
    with pytest.raises(UnknownDIDError):  # still remembered as unknown
        await resolver.resolve(identity.did)
    clock.advance(5.0)
    assert await resolver.resolve(identity.did) == doc  # a refusal is never cached long
    assert registry.lookups == 2


async def test_resolver_negative_cache_is_bounded(clock) -> None:
    registry = CountingRegistry()
    resolver = DIDResolver(registry, clock=clock, max_entries=10)
    for _ in range(50):
        with pytest.raises(UnknownDIDError):
            await resolver.resolve(AgentIdentity.generate(Chain.SOLANA).did)
    assert len(resolver._misses) == 10


@pytest.mark.parametrize("refresh", ["invalidate_one", "invalidate_all", "ttl"])
async def test_resolver_refuses_deactivated_agent_once_cache_refreshes(clock, refresh: str) -> None:
    registry = CountingRegistry()
    identity = AgentIdentity.generate(Chain.SOLANA)
    await register(registry, identity)
    resolver = DIDResolver(registry, ttl=30.0, clock=clock)
    await resolver.resolve(identity.did)
    await deactivate(registry, identity)
    if refresh == "invalidate_one":
        resolver.invalidate(identity.did)
    elif refresh == "invalidate_all":
        resolver.invalidate()
    else:
        clock.advance(30.0)
    for _ in range(2):
        with pytest.raises(InactiveAgentError) as info:
            await resolver.resolve(identity.did)
        assert info.value.code == "inactive_agent"
        assert isinstance(info.value, UnknownDIDError)
    # The refusal is remembered for the negative TTL, as a refusal.
    assert registry.lookups == 2


async def test_resolver_refuses_document_registered_inactive(clock) -> None:
    registry = InMemoryRegistry()
    identity = AgentIdentity.generate(Chain.ETHEREUM)
    await register(registry, identity, active=False)
    with pytest.raises(InactiveAgentError):
        await DIDResolver(registry, clock=clock).resolve(identity.did)


async def test_file_registry_is_shared_between_processes(tmp_path) -> None:
    """Two registries on one file (as two processes hold them): neither loses the other's
    registration, and each sees what the other registered."""
    path = tmp_path / "registry.json"
    first, second = JsonFileRegistry(path), JsonFileRegistry(path)
    a, b = AgentIdentity.generate(Chain.SOLANA), AgentIdentity.generate(Chain.ETHEREUM)
    doc_a = await register(first, a)
    doc_b = await register(second, b)  # second never saw a: it must re-read, not overwrite
    assert await second.lookup(a.did) == doc_a
    assert await first.lookup(b.did) == doc_b
    assert await JsonFileRegistry(path).lookup(a.did) == doc_a


async def test_json_file_registry_keeps_signatures_and_reverifies_only_new_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sage_otel.agent import did as did_module

    checks: list[DID] = []
    original = did_module.check_registration

    def counting(document: DIDDocument, signature: bytes) -> None:
        checks.append(document.did)
        original(document, signature)

    monkeypatch.setattr(did_module, "check_registration", counting)
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    docs = [await register(writer, AgentIdentity.generate(c)) for c in (Chain.SOLANA,) * 3]
    stored = json.loads(path.read_text())
    assert stored["version"] == 2 and all(entry["signature"] for entry in stored["documents"])

    checks.clear()
    reader = JsonFileRegistry(path)
    assert sorted(map(str, checks)) == sorted(str(d.did) for d in docs)  # each verified on load
    checks.clear()
    late = await register(writer, AgentIdentity.generate(Chain.ETHEREUM))
    checks.clear()
    assert await reader.lookup(late.did) == late
    assert checks == [late.did]  # the re-read verified only the new entry


async def test_json_file_registry_refuses_an_older_unsigned_file(tmp_path: Path) -> None:
    from sage_otel.agent.did import RegistryFileError

    path = tmp_path / "registry.json"
    path.write_text(
        json.dumps({"documents": [document(AgentIdentity.generate(Chain.SOLANA)).to_json()]})
    )
    with pytest.raises(RegistryFileError, match="move it aside and let every agent register again"):
        JsonFileRegistry(path)
    path.write_text(json.dumps({"documents": []}))  # nothing to verify: usable
    assert await JsonFileRegistry(path).lookup(AgentIdentity.generate(Chain.SOLANA).did) is None


async def test_json_file_registry_skips_entries_that_do_not_verify(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    good = await register(JsonFileRegistry(path), AgentIdentity.generate(Chain.SOLANA))
    lines = path.read_bytes().split(b"\n")
    lines.insert(1, b'{"did": "junk"},')
    lines.insert(1, b"not json at all,")
    unsigned = document(AgentIdentity.generate(Chain.ETHEREUM)).to_json()
    lines.insert(1, json.dumps(unsigned).encode() + b",")
    path.write_bytes(b"\n".join(lines))
    registry = JsonFileRegistry(path)
    assert registry.refused == 3
    assert await registry.lookup(good.did) == good
    assert await registry.lookup(DIDDocument.from_json(unsigned).did) is None


# --- deactivations and rollbacks written by another process -------------------------------


async def test_a_deactivation_by_another_process_is_refused_on_a_quiet_server(
    tmp_path: Path,
) -> None:
    """Another process deactivates a DID while this server has no traffic: the first
    handshake after the resolver's TTL is refused. Before, only a lookup that missed
    re-read the file, so the found (active) document was cached again, TTL after TTL."""
    path = tmp_path / "registry.json"
    victim = AgentIdentity.generate(Chain.SOLANA)
    await register(JsonFileRegistry(path), victim)
    server = JsonFileRegistry(path, reread_interval=0.2)
    resolver = DIDResolver(server, ttl=0.5)
    assert (await resolver.resolve(victim.did)).active
    await deactivate(JsonFileRegistry(path), victim)  # another process
    assert (await resolver.resolve(victim.did)).active  # cached: the TTL is the window
    await asyncio.sleep(0.5 + 0.2)  # quiet: no lookup meanwhile
    for _ in range(2):
        with pytest.raises(InactiveAgentError):
            await resolver.resolve(victim.did)


async def test_a_found_did_is_answered_at_once_and_refreshed_behind(tmp_path: Path) -> None:
    """Right after a re-read, a lookup that finds its DID in a changed file does not wait
    for the next one: it answers from the table, the resolver does not cache that answer,
    and the re-read still happens with no further lookup."""
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    victim = AgentIdentity.generate(Chain.SOLANA)
    await register(writer, victim)
    server = JsonFileRegistry(path, reread_interval=0.5)
    resolver = DIDResolver(server, ttl=60.0)
    await register(writer, AgentIdentity.generate(Chain.ETHEREUM))
    assert await server.lookup(AgentIdentity.generate(Chain.SOLANA).did) is None  # re-read
    await deactivate(writer, victim)
    started = time.monotonic()
    assert (await resolver.resolve(victim.did)).active  # the table as it is
    assert time.monotonic() - started < 0.25  # not held for the next re-read
    await asyncio.sleep(0.8)  # the re-read runs in the background
    assert not server._docs[victim.did].active
    with pytest.raises(InactiveAgentError):  # the stale answer was not cached for 60 s
        await resolver.resolve(victim.did)


async def test_a_failing_background_reread_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    victim = AgentIdentity.generate(Chain.SOLANA)
    doc = await register(writer, victim)
    server = JsonFileRegistry(path, reread_interval=0.05, failed_retry=0.05)
    read_file = server._read_file

    def broken() -> None:
        raise RuntimeError("unforeseen")

    server._read_file = broken  # type: ignore[method-assign]
    await deactivate(writer, victim)
    for _ in range(4):
        assert await server.lookup(victim.did) == doc  # what is known, never an error
        await asyncio.sleep(0.06)
    failures = [r for r in caplog.records if "re-read failed" in r.getMessage()]
    assert len(failures) == 1
    server._read_file = read_file  # type: ignore[method-assign]
    await asyncio.sleep(0.1)
    assert not (await server.lookup(victim.did)).active


@pytest.mark.parametrize("replaced", ["deactivation", "kem_key"])
async def test_restoring_an_older_signed_entry_does_not_roll_back_a_running_registry(
    tmp_path: Path, replaced: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer of the file puts back the victim's older line (genuinely signed, so it
    verifies): a process that saw the deactivation or the KEM key rotation keeps the newer
    document. Before, the next re-read took the older one back."""
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    victim = AgentIdentity.generate(Chain.ETHEREUM)
    original = await register(writer, victim)
    older_file = path.read_bytes()
    server = JsonFileRegistry(path, reread_interval=0.05)
    resolver = DIDResolver(server, ttl=0.0)
    if replaced == "deactivation":
        await deactivate(writer, victim)
        newer = dataclasses.replace(original, active=False)
    else:
        newer = dataclasses.replace(
            original, kem_public_key=AgentIdentity.generate(Chain.SOLANA).kem.public
        )
        await writer.register(newer, sign_registration(victim, newer))
    await asyncio.sleep(0.06)
    assert await server.lookup(AgentIdentity.generate(Chain.SOLANA).did) is None  # re-read
    assert await server.lookup(victim.did) == newer

    path.write_bytes(older_file)  # the rollback
    await asyncio.sleep(0.06)
    assert await server.lookup(AgentIdentity.generate(Chain.SOLANA).did) is None  # re-read
    assert await server.lookup(victim.did) == newer
    assert server.refused == 0 and server.rolled_back == 1
    if replaced == "deactivation":
        with pytest.raises(InactiveAgentError):
            await resolver.resolve(victim.did)
    else:
        assert await resolver.resolve(victim.did) == newer
    assert sum("would bring back" in r.getMessage() for r in caplog.records) == 1
    # Nor can the older document be registered again through a process that saw it go.
    for registry in (server, writer):
        with pytest.raises(RegistrationError) as refused:
            await registry.register(original, sign_registration(victim, original))
        assert refused.value.code == "registration_rollback"
    # The limit: a process started now trusts the file as it finds it.
    assert await JsonFileRegistry(path).lookup(victim.did) == original


@pytest.mark.parametrize("swap", ["fifo", "device", "oversized", "oversized_hand_edited"])
async def test_a_file_swapped_for_what_cannot_be_read_safely_keeps_the_table(
    tmp_path: Path, swap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer of the file replaces it by a symlink to a FIFO (a read would block for ever,
    and SIGTERM with it), to /dev/zero (a read would fill memory), or by a file too large to
    read (or to parse whole) in bounded time: each is refused at once, what was known stays,
    and once the file is restored a DID registered meanwhile is found."""
    monkeypatch.setattr(did_module, "MAX_FILE_BYTES", 64 * 1024)
    monkeypatch.setattr(did_module, "MAX_PARSED_BYTES", 8 * 1024)
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    known = await register(writer, AgentIdentity.generate(Chain.SOLANA))
    server = JsonFileRegistry(path, reread_interval=0.0)
    saved = path.read_bytes()
    path.unlink()
    if swap == "fifo":
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    elif swap == "device":
        path.symlink_to("/dev/zero")
    elif swap == "oversized":
        path.write_bytes(saved.replace(b"\n]}", b"\n" + b" " * 70_000 + b"]}"))
    else:  # valid JSON in another layout, parsed whole: a tighter bound
        path.write_text(json.dumps(json.loads(saved), indent=8) + " " * 9_000)
    stranger = AgentIdentity.generate(Chain.ETHEREUM)
    assert await asyncio.wait_for(server.lookup(stranger.did), 5) is None
    assert await asyncio.wait_for(server.lookup(known.did), 5) == known
    path.unlink()
    path.write_bytes(saved)
    newcomer = await register(writer, AgentIdentity.generate(Chain.SOLANA))
    assert await asyncio.wait_for(server.lookup(newcomer.did), 5) == newcomer
    assert await asyncio.wait_for(server.lookup(known.did), 5) == known


async def test_a_line_repeated_in_the_file_is_verified_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.json"
    identity = AgentIdentity.generate(Chain.SOLANA)
    doc = document(identity)
    entry = registration_entry(doc, sign_registration(identity, doc))
    path.write_bytes(registry_file_bytes([entry] * 500))
    verified = did_module._verified_entry
    calls = 0

    def counting(entry: bytes) -> DIDDocument | None:
        nonlocal calls
        calls += 1
        return verified(entry)

    monkeypatch.setattr(did_module, "_verified_entry", counting)
    registry = JsonFileRegistry(path)
    assert await registry.lookup(doc.did) == doc
    assert calls == 1


async def test_a_known_did_does_not_wait_behind_a_slow_reread(tmp_path: Path) -> None:
    """A re-read that takes long (a big file, a slow disk) holds up lookups that miss, not
    those of DIDs already in the table: they are answered from it at once."""
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    known = await register(writer, AgentIdentity.generate(Chain.SOLANA))
    server = JsonFileRegistry(path, reread_interval=0.05)
    read_file = server._read_file

    def slow(**kwargs: bool) -> object:
        time.sleep(1.5)
        return read_file(**kwargs)

    server._read_file = slow  # type: ignore[method-assign]
    await register(writer, AgentIdentity.generate(Chain.SOLANA))  # the file changed
    stranger = asyncio.create_task(server.lookup(AgentIdentity.generate(Chain.SOLANA).did))
    await asyncio.sleep(0.2)  # the slow re-read is running; later ones queue behind it
    for _ in range(3):
        started = time.monotonic()
        assert await server.lookup(known.did) == known
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.1)
    assert await stranger is None


async def test_a_version_of_the_file_that_failed_is_not_read_at_every_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that is costly to refuse (here: more entries than the bound) is refused once,
    then left alone for ``failed_retry`` seconds however many lookups miss; a newer version
    of the file is read at once."""
    monkeypatch.setattr(did_module, "MAX_ENTRIES", 10)
    path = tmp_path / "registry.json"
    writer = JsonFileRegistry(path)
    known = await register(writer, AgentIdentity.generate(Chain.SOLANA))
    server = JsonFileRegistry(path, reread_interval=0.01)
    good = path.read_bytes()
    path.write_bytes(good.replace(b"\n]}", b"\n" * 20 + b"]}"))
    read_file, reads = server._read_file, 0

    def counting(**kwargs: bool) -> object:
        nonlocal reads
        reads += 1
        return read_file(**kwargs)

    server._read_file = counting  # type: ignore[method-assign]
    for _ in range(10):
        assert await server.lookup(AgentIdentity.generate(Chain.ETHEREUM).did) is None
        await asyncio.sleep(0.02)
    assert reads == 1
    assert await server.lookup(known.did) == known
    path.unlink()
    path.write_bytes(good)  # a newer version: read at once
    newcomer = await register(writer, AgentIdentity.generate(Chain.SOLANA))
    assert await server.lookup(newcomer.did) == newcomer
    assert reads == 2
