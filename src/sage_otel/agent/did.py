"""DID documents, registries and the caching resolver.

A registry stores documents; registration must be signed by the key the DID is derived
from, so nobody can register someone else's DID. The resolver is what agents call: it
caches positive answers for a TTL and refuses unknown and inactive agents.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import identity as _identity
from .encoding import b64url, from_b64url
from .errors import InactiveAgentError, InvalidMessageError, RegistrationError, UnknownDIDError
from .identity import DID, AgentIdentity, KeyType, key_matches_did, parse_did


@dataclass(frozen=True)
class DIDDocument:
    did: DID
    key_type: KeyType
    public_key: bytes
    kem_public_key: bytes
    name: str = ""
    endpoint: str = ""
    capabilities: tuple[str, ...] = ()
    active: bool = True

    def to_json(self) -> dict[str, object]:
        return {
            "did": str(self.did),
            "keyType": self.key_type.value,
            "publicKey": b64url(self.public_key),
            "kemPublicKey": b64url(self.kem_public_key),
            "name": self.name,
            "endpoint": self.endpoint,
            "capabilities": list(self.capabilities),
            "active": self.active,
        }

    @classmethod
    def from_json(cls, data: object) -> DIDDocument:
        if not isinstance(data, dict):
            raise InvalidMessageError("DID document must be an object", code="bad_document")
        try:
            caps = data.get("capabilities", [])
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise InvalidMessageError("capabilities must be strings", code="bad_document")
            for key in ("name", "endpoint"):
                if not isinstance(data.get(key, ""), str):
                    raise InvalidMessageError(f"{key} must be a string", code="bad_document")
            if not isinstance(data.get("active", True), bool):
                raise InvalidMessageError("active must be a boolean", code="bad_document")
            kem = from_b64url(data["kemPublicKey"], "kemPublicKey")
            if len(kem) != 32:
                raise InvalidMessageError("kemPublicKey must be 32 bytes", code="bad_document")
            return cls(
                did=parse_did(data["did"]),
                key_type=KeyType(data["keyType"]),
                public_key=from_b64url(data["publicKey"], "publicKey"),
                kem_public_key=kem,
                name=data.get("name", ""),
                endpoint=data.get("endpoint", ""),
                capabilities=tuple(caps),
                active=data.get("active", True),
            )
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, InvalidMessageError):
                raise
            raise InvalidMessageError("malformed DID document", code="bad_document") from exc

    def verify(self, data: bytes, signature: bytes) -> None:
        """Raise SignatureError unless this agent's identity key signed ``data``."""
        # Looked up on the module at call time, so instrumentation sees every verification.
        _identity.verify_signature(self.key_type, self.public_key, data, signature)

    def canonical_bytes(self) -> bytes:
        """The bytes a registration signature covers."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def for_identity(cls, identity: AgentIdentity, **extra: object) -> DIDDocument:
        key = identity.signing_key
        return cls(identity.did, key.key_type, key.public_bytes(), identity.kem.public, **extra)


def sign_registration(identity: AgentIdentity, document: DIDDocument) -> bytes:
    return identity.signing_key.sign(document.canonical_bytes())


class Registry(ABC):
    """Where DID documents live: in memory, a JSON file, or (elsewhere) a chain."""

    @abstractmethod
    async def lookup(self, did: DID) -> DIDDocument | None: ...

    @abstractmethod
    async def _store(self, document: DIDDocument) -> None: ...

    async def register(self, document: DIDDocument, signature: bytes) -> None:
        """Store ``document`` if signed by the key its DID is derived from."""
        if not key_matches_did(document.did, document.key_type, document.public_key):
            raise RegistrationError(
                "DID is not derived from the document's key", code="did_key_mismatch"
            )
        document.verify(document.canonical_bytes(), signature)
        await self._store(document)

    async def deactivate(self, document: DIDDocument, signature: bytes) -> None:
        """Mark an agent inactive; ``document`` must have ``active=False`` and be signed."""
        if document.active:
            raise RegistrationError("deactivation document must be inactive")
        await self.register(document, signature)


class InMemoryRegistry(Registry):
    def __init__(self) -> None:
        self._docs: dict[DID, DIDDocument] = {}

    async def lookup(self, did: DID) -> DIDDocument | None:
        return self._docs.get(did)

    async def _store(self, document: DIDDocument) -> None:
        self._docs[document.did] = document


class JsonFileRegistry(Registry):
    """A registry persisted as one JSON file, shared by processes.

    Writes take an exclusive ``flock`` on ``<file>.lock``, re-read the file and replace it
    atomically, so registrations from several processes are never lost; a lookup that
    misses re-reads the file when it changed, so a DID another process registered is seen.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()
        self._docs: dict[DID, DIDDocument] = {}
        self._stamp: tuple[int, int] | None = None
        self._reload()

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        raw = json.loads(self.path.read_text() or "{}")
        docs = {}
        for entry in raw.get("documents", []):
            doc = DIDDocument.from_json(entry)
            docs[doc.did] = doc
        self._docs, self._stamp = docs, stamp

    async def lookup(self, did: DID) -> DIDDocument | None:
        document = self._docs.get(did)
        if document is None:
            self._reload()
            document = self._docs.get(did)
        return document

    async def _store(self, document: DIDDocument) -> None:
        async with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._stamp = None
                self._reload()
                self._docs[document.did] = document
                payload = json.dumps(
                    {"documents": [d.to_json() for d in self._docs.values()]}, indent=2
                )
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-")
                with os.fdopen(fd, "w") as handle:
                    handle.write(payload)
                os.replace(tmp, self.path)
                self._stamp = None


@dataclass
class DIDResolver:
    """Resolve DIDs through a registry, caching active documents for ``ttl`` seconds.

    Unknown and inactive DIDs are remembered too, for ``negative_ttl`` seconds, so a flood
    of requests from DIDs nobody registered costs the registry one lookup per DID per
    ``negative_ttl``. Both caches are bounded (``max_entries`` each, oldest dropped).
    """

    registry: Registry
    ttl: float = 60.0
    clock: Callable[[], float] = time.monotonic
    negative_ttl: float = 5.0
    max_entries: int = 100_000
    _cache: dict[DID, tuple[float, DIDDocument]] = field(default_factory=dict, repr=False)
    _misses: dict[DID, tuple[float, bool]] = field(default_factory=dict, repr=False)

    async def resolve(self, did: DID | str) -> DIDDocument:
        did = parse_did(did) if isinstance(did, str) else did
        now = self.clock()
        hit = self._cache.get(did)
        if hit is not None and hit[0] > now:
            return hit[1]
        miss = self._misses.get(did)
        if miss is not None and miss[0] > now:
            _raise_miss(miss[1])
        document = await self.registry.lookup(did)
        if document is None or not document.active:
            self._cache.pop(did, None)
            inactive = document is not None
            _bounded_put(self._misses, did, (now + self.negative_ttl, inactive), self.max_entries)
            _raise_miss(inactive)
        self._misses.pop(did, None)
        _bounded_put(self._cache, did, (now + self.ttl, document), self.max_entries)
        return document

    def invalidate(self, did: DID | None = None) -> None:
        if did is None:
            self._cache.clear()
            self._misses.clear()
        else:
            self._cache.pop(did, None)
            self._misses.pop(did, None)


def _raise_miss(inactive: bool) -> None:
    if inactive:
        raise InactiveAgentError("agent is inactive")
    raise UnknownDIDError("DID is not registered")


def _bounded_put(cache: dict, key: object, value: object, bound: int) -> None:
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > bound:
        del cache[next(iter(cache))]
