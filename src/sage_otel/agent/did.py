"""DID documents, registries and the caching resolver.

A registry stores documents; registration must be signed by the key the DID is derived
from, so nobody can register someone else's DID. The shared JSON file keeps each
registration's signature with its document and checks both again whenever it reads the
file, so whoever can write the file still cannot change a DID's keys. The resolver is what
agents call: it caches positive answers for a TTL and refuses unknown and inactive agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import identity as _identity
from .encoding import b64url, from_b64url
from .errors import (
    InactiveAgentError,
    InvalidMessageError,
    RegistrationError,
    SageError,
    UnknownDIDError,
)
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


def check_registration(document: DIDDocument, signature: bytes) -> None:
    """Raise unless ``document`` is signed by the key its DID is derived from."""
    if not key_matches_did(document.did, document.key_type, document.public_key):
        raise RegistrationError(
            "DID is not derived from the document's key", code="did_key_mismatch"
        )
    document.verify(document.canonical_bytes(), signature)


class Registry(ABC):
    """Where DID documents live: in memory, a JSON file, or (elsewhere) a chain."""

    @abstractmethod
    async def lookup(self, did: DID) -> DIDDocument | None: ...

    @abstractmethod
    async def _store(self, document: DIDDocument, signature: bytes) -> None: ...

    async def register(self, document: DIDDocument, signature: bytes) -> None:
        """Store ``document`` if signed by the key its DID is derived from."""
        check_registration(document, signature)
        await self._store(document, signature)

    async def deactivate(self, document: DIDDocument, signature: bytes) -> None:
        """Mark an agent inactive; ``document`` must have ``active=False`` and be signed."""
        if document.active:
            raise RegistrationError("deactivation document must be inactive")
        await self.register(document, signature)

    @property
    def refreshing(self) -> bool:
        """Whether a re-read that may change lookup answers is under way: the resolver
        does not cache an answer given meanwhile, which may be stale."""
        return False


class InMemoryRegistry(Registry):
    def __init__(self) -> None:
        self._docs: dict[DID, DIDDocument] = {}

    async def lookup(self, did: DID) -> DIDDocument | None:
        return self._docs.get(did)

    async def _store(self, document: DIDDocument, signature: bytes) -> None:
        self._docs[document.did] = document


FORMAT_VERSION = 2
# One registration per line between these two, so the file is JSON and a re-read can tell
# unchanged entries from new ones without parsing them.
_HEADER = b'{"version": 2, "documents": ['
_FOOTER = b"]}"
_logger = logging.getLogger(__name__)


class RegistryFileError(ValueError):
    """The registry file cannot be read as one (not JSON, or an older unsigned format)."""


@dataclass
class _Snapshot:
    """One reading of the file: its verified documents and what it took to get them."""

    stamp: tuple[int, int, int]
    documents: dict[DID, DIDDocument]
    entries: dict[DID, bytes]  # each DID's verified entry as written, for the next write
    verified: dict[bytes, DIDDocument | None]  # entry digest -> document, None if refused
    refused: int
    newly_refused: int  # refused entries not seen in the previous reading


VERIFY_SLICE = 0.002  # seconds of verification between two turns of the event loop
# The largest registry file read (about 170,000 entries), and the largest in another JSON
# layout (edited by hand), which is parsed whole while holding the interpreter: a writer of
# the file must not be able to exhaust memory or stall the event loop through it.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PARSED_BYTES = 4 * 1024 * 1024
MAX_ENTRIES = 200_000  # lines, however short: each costs a digest and a table entry


class JsonFileRegistry(Registry):
    """A registry persisted as one JSON file, shared by processes.

    Each entry is a document with its registration ``signature``; every entry read from
    the file is verified as a registration is (the DID derived from the key, the key's
    signature over the document), and one that fails is skipped (counted in
    :attr:`refused`, logged once), so a writer of the file cannot swap a DID's keys without
    the DID's private key. Verified entries are remembered by content hash, so a re-read
    verifies only what changed. A file of the older unsigned format is refused whole
    (:class:`RegistryFileError`): its documents cannot be checked.

    Writes take an exclusive ``flock`` on ``<file>.lock``, re-read the file and replace it
    atomically (in a worker thread), so registrations from several processes are never
    lost. A lookup re-reads the file if it changed (its mtime, size or inode), so a DID
    another process registered, deactivated or updated is seen. That re-read never stalls
    the event loop: the file is read in a worker thread and its new entries verified on the
    loop in slices of 2 ms; one re-read runs at a time, at most one per ``reread_interval``
    seconds. A lookup that misses waits for the next one. A lookup that finds its DID waits
    only for a re-read that can start now (none ran in the last ``reread_interval``: a quiet
    server, where the stale answer would admit a deactivated DID's next handshake);
    otherwise it answers from the table at once and the re-read runs in the background
    (:attr:`refreshing` meanwhile, so the resolver does not cache that answer). So a
    deactivation written by another process is refused within the resolver's TTL plus
    ``reread_interval`` (plus one re-read).

    Registry signatures carry no version, so a writer of the file could restore an older
    signed entry of a DID. In memory, a registry refuses the rollbacks it can tell: once it
    has seen a DID inactive it never takes it back as active, and once it has seen a DID's
    keys replaced it never takes the old keys back (entries that would, are ignored and
    counted in :attr:`rolled_back`; :meth:`register` refuses them). The limit: a process
    started afterwards trusts the file as it finds it, and a DID deactivated (or a key
    replaced) cannot be brought back in a process that saw it go, only under a new DID or
    a new key, or after that process restarts. (A file in another JSON layout, edited by
    hand, is parsed whole in the thread, which holds the interpreter for that long; the
    next registration writes it back one entry a line.)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reread_interval: float = 1.0,
        failed_retry: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.reread_interval = reread_interval
        self.failed_retry = failed_retry  # seconds before a version that failed is read again
        self.refused = 0  # entries of the file as last read that failed verification
        self.rolled_back = 0  # entries of the file as last read refused as rollbacks
        self._lock = asyncio.Lock()
        # What a lookup reads (the table, its stamp, the rollback memory) is changed only
        # under _state, by the loop (a re-read) or a writer's thread; _writes counts the
        # writes begun and ended, so a re-read that overlapped one is discarded.
        self._state = threading.Lock()
        self._writes = 0
        self._docs: dict[DID, DIDDocument] = {}
        self._verified: dict[bytes, DIDDocument | None] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next: asyncio.Task[None] | None = None  # the re-read that lookups join
        self._running: asyncio.Task[None] | None = None
        self._last_reread = -math.inf
        # The version of the file whose re-read failed (reported once), and when to retry it.
        self._failed_stamp: tuple[int, int, int] | None = None
        self._retry_at = -math.inf
        # What this process has seen, to refuse rollbacks: each deactivated DID's last
        # inactive document, and the keys each DID has replaced.
        self._deactivated: dict[DID, DIDDocument] = {}
        self._retired_keys: dict[DID, set[tuple[KeyType, bytes, bytes]]] = {}
        self._rollbacks_reported: set[DIDDocument] = set()
        snapshot = self._read()
        if snapshot is not None:
            self._apply(snapshot)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _stamp_now(self) -> tuple[int, int, int] | None:
        """The file's stamp, or None if it is absent or cannot be looked at (what is known
        is kept meanwhile)."""
        try:
            return self._file_stamp()
        except OSError:
            return None

    def _read_file(
        self, *, changed_only: bool = True
    ) -> tuple[tuple[int, int, int], list[bytes]] | None:
        """The file's stamp and entries, or None if it is absent (or, ``changed_only``,
        unchanged since the table was read)."""
        stamp = self._file_stamp()
        if stamp is None or (changed_only and stamp == self._stamp):
            return None
        stamp, data = _read_regular_file(self.path)
        return stamp, _file_entries(data, self.path)

    def _verify(
        self, stamp: tuple[int, int, int], entries: list[bytes]
    ) -> Generator[None, None, _Snapshot]:
        """Verify the entries not verified before, pausing (a ``yield``) every
        :data:`VERIFY_SLICE` so that a caller on the event loop can let it serve."""
        known = self._verified
        documents: dict[DID, DIDDocument] = {}
        by_did: dict[DID, bytes] = {}
        verified: dict[bytes, DIDDocument | None] = {}
        refused = newly_refused = 0
        deadline = time.perf_counter() + VERIFY_SLICE
        for entry in entries:
            digest = hashlib.sha256(entry).digest()
            if digest in verified:  # a line repeated in this reading
                document = verified[digest]
            elif digest in known:
                document = known[digest]
            else:
                document = _verified_entry(entry)
                newly_refused += document is None
            if time.perf_counter() >= deadline:
                yield
                deadline = time.perf_counter() + VERIFY_SLICE
            verified[digest] = document
            if document is None:
                refused += 1
            else:
                documents[document.did] = document
                by_did[document.did] = entry
        return _Snapshot(stamp, documents, by_did, verified, refused, newly_refused)

    def _read(self) -> _Snapshot | None:
        """The file's verified content, read here and now (at start, and to write: whatever
        the table's stamp says, a write must start from every entry the file holds)."""
        read = self._read_file(changed_only=False)
        if read is None:
            return None
        steps = self._verify(*read)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _apply(self, snapshot: _Snapshot) -> None:
        if snapshot.newly_refused:
            _logger.warning(
                "registry %s: %d entries failed verification and are ignored",
                self.path,
                snapshot.refused,
            )
        documents: dict[DID, DIDDocument] = {}
        rollbacks = set()
        previous, deactivated, retired = self._docs, self._deactivated, self._retired_keys
        for did, document in snapshot.documents.items():
            current = previous.get(did)
            if current is document:  # an unchanged entry (verified before)
                documents[did] = document
                continue
            if current is None and did not in deactivated and did not in retired:
                documents[did] = document  # a DID first seen: nothing to roll back
                if not document.active:
                    deactivated[did] = document
                continue
            kept = self._admit(document)
            if kept is not document:
                rollbacks.add(document)
            if kept is not None:
                documents[did] = kept
        if rollbacks - self._rollbacks_reported:
            _logger.warning(
                "registry %s: %d entries would bring back a deactivated DID or a replaced "
                "key this process saw go; ignored",
                self.path,
                len(rollbacks),
            )
            self._rollbacks_reported |= rollbacks
        self._docs, self._verified = documents, snapshot.verified
        self._stamp, self.refused = snapshot.stamp, snapshot.refused
        self.rolled_back = len(rollbacks)

    def _rolls_back(self, document: DIDDocument) -> bool:
        """Whether ``document`` would re-activate a DID this process saw deactivated, or
        give it keys it saw replaced (the file's signatures carry no version to tell)."""
        return (document.active and document.did in self._deactivated) or _keys(
            document
        ) in self._retired_keys.get(document.did, ())

    def _admit(self, document: DIDDocument) -> DIDDocument | None:
        """What to hold for ``document``'s DID: ``document``, remembering what it replaces,
        or, if it is a rollback, what this process holds instead (None: nothing)."""
        did = document.did
        current = self._docs.get(did)
        if self._rolls_back(document):
            return self._deactivated.get(did, current)
        if current is not None and _keys(current) != _keys(document):
            self._retired_keys.setdefault(did, set()).add(_keys(current))
        if not document.active:
            self._deactivated[did] = document
        return document

    async def _reread(self) -> None:
        """Read in a worker thread, verify on the loop in slices. A reading that overlapped
        a write of this registry is discarded: the write applied a newer one, and left the
        stamp for the next lookup to read the file again."""
        writes = self._writes
        read = await asyncio.to_thread(self._read_file)
        if read is None:
            return
        steps = self._verify(*read)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                with self._state:
                    if self._writes == writes:
                        self._apply(done.value)
                return
            await asyncio.sleep(0)

    async def lookup(self, did: DID) -> DIDDocument | None:
        document = self._docs.get(did)
        stamp = self._stamp_now()
        if stamp is None or stamp == self._stamp:
            return document
        if stamp == self._failed_stamp and time.monotonic() < self._retry_at:
            return document  # this version of the file failed moments ago
        running = self._running is not None and not self._running.done()
        if document is None or (
            not running and time.monotonic() >= self._last_reread + self.reread_interval
        ):
            await self._refresh()
            return self._docs.get(did)
        self._schedule_reread()  # a re-read ran moments ago: answer now, refresh behind
        return document

    @property
    def refreshing(self) -> bool:
        return any(task is not None and not task.done() for task in (self._next, self._running))

    def _schedule_reread(self) -> asyncio.Task[None]:
        """The next re-read, scheduled if none is: one runs at a time, each at least
        ``reread_interval`` after the previous one started. The task is held in
        ``_next`` then ``_running`` until it ends, and never raises but when cancelled."""
        loop = asyncio.get_running_loop()
        pending = self._next
        if pending is None or pending.done() or pending.get_loop() is not loop:
            pending = self._next = loop.create_task(self._reread_after(self._running))
        return pending

    async def _refresh(self) -> None:
        """Join the next re-read."""
        await asyncio.shield(self._schedule_reread())

    async def _reread_after(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and previous.get_loop() is asyncio.get_running_loop():
            await asyncio.wait([previous])
        delay = self._last_reread + self.reread_interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # From here on, lookups that miss schedule the following re-read: this one may
        # already have read the file past what they are looking for.
        self._next, self._running = None, asyncio.current_task()
        self._last_reread = time.monotonic()
        # The version read, or older: a failure is never charged to a newer one.
        stamp = self._stamp_now()
        try:
            await self._reread()
        except Exception as error:  # keep serving what is known
            self._failed(stamp, error)
        finally:
            if self._running is asyncio.current_task():
                self._running = None

    def _failed(self, stamp: tuple[int, int, int] | None, error: Exception) -> None:
        """A re-read failed: reported once per version of the file, which lookups read again
        only after ``failed_retry`` seconds (a newer version at once), so a file that is
        costly to refuse is not refused at every lookup that misses."""
        if stamp is None or stamp != self._failed_stamp:
            if isinstance(error, (OSError, RegistryFileError)):
                _logger.warning("registry %s: not re-read: %s", self.path, error)
            else:
                _logger.error("registry %s: re-read failed", self.path, exc_info=error)
        self._failed_stamp, self._retry_at = stamp, time.monotonic() + self.failed_retry

    async def _store(self, document: DIDDocument, signature: bytes) -> None:
        async with self._lock:
            await asyncio.to_thread(self._write, document, signature)

    def _write(self, document: DIDDocument, signature: bytes) -> None:
        """Add one verified registration under the file lock (in a worker thread)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            snapshot = self._read()
            with self._state:
                self._writes += 1
                if snapshot is not None:
                    self._apply(snapshot)
                if self._rolls_back(document):
                    raise RegistrationError(
                        "this registry saw the DID deactivated or these keys replaced",
                        code="registration_rollback",
                    )
            entries = dict(snapshot.entries) if snapshot is not None else {}
            entries[document.did] = registration_entry(document, signature)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(registry_file_bytes(entries.values()))
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with self._state:
                self._writes += 1
                self._docs = {**self._docs, document.did: self._admit(document) or document}
                self._stamp = None  # the next lookup reads what this write made


def _keys(document: DIDDocument) -> tuple[KeyType, bytes, bytes]:
    return (document.key_type, document.public_key, document.kem_public_key)


def registration_entry(document: DIDDocument, signature: bytes) -> bytes:
    """One registration as the file holds it: the document's fields and ``signature``."""
    entry = {**document.to_json(), "signature": b64url(signature)}
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def registry_file_bytes(entries: Iterable[bytes]) -> bytes:
    """A registry file as :class:`JsonFileRegistry` writes it: JSON, one entry a line."""
    return b"%s\n%s\n%s\n" % (_HEADER, b",\n".join(entries), _FOOTER)


def _read_regular_file(path: Path) -> tuple[tuple[int, int, int], bytes]:
    """The file's stamp and bytes, both from the one file opened: never blocking on what is
    not a regular file (a FIFO, a device), and at most :data:`MAX_FILE_BYTES` of it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RegistryFileError(f"{path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise RegistryFileError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise RegistryFileError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return (info.st_mtime_ns, info.st_size, info.st_ino), b"".join(chunks)


def _file_entries(data: bytes, path: Path) -> list[bytes]:
    """The registrations in a registry file, each as bytes to hash and verify.

    A file as :class:`JsonFileRegistry` writes it is split by lines, without parsing;
    anything else that is JSON (edited by hand, re-indented) is parsed whole.
    """
    if data.count(b"\n") > MAX_ENTRIES + 2:  # before splitting: a line costs memory
        raise RegistryFileError(f"{path}: more than {MAX_ENTRIES} entries")
    lines = data.rstrip(b"\n").split(b"\n")
    if len(lines) >= 2 and lines[0] == _HEADER and lines[-1] == _FOOTER:
        return [line.removesuffix(b",") for line in lines[1:-1] if line]
    if not data.strip():
        return []
    if len(data) > MAX_PARSED_BYTES:
        raise RegistryFileError(
            f"{path}: larger than {MAX_PARSED_BYTES >> 20} MiB and not one entry a line, as "
            "sage-otel writes it"
        )
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RegistryFileError(f"{path}: not a JSON registry file") from exc
    documents = raw.get("documents", []) if isinstance(raw, dict) else None
    if not isinstance(documents, list):
        raise RegistryFileError(f"{path}: not a JSON registry file")
    if len(documents) > MAX_ENTRIES:
        raise RegistryFileError(f"{path}: more than {MAX_ENTRIES} entries")
    if documents and raw.get("version") != FORMAT_VERSION:
        raise RegistryFileError(
            f"{path} holds DID documents without registration signatures (written before "
            "sage-otel verified them): move it aside and let every agent register again"
        )
    return [
        json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() for entry in documents
    ]


def _verified_entry(entry: bytes) -> DIDDocument | None:
    """The document of one entry if its registration signature holds, else None."""
    try:
        data = json.loads(entry)
        if not isinstance(data, dict):
            return None
        document = DIDDocument.from_json(data)
        check_registration(document, from_b64url(data.get("signature"), "signature"))
    except (SageError, ValueError, TypeError, RecursionError):
        return None
    return document


@dataclass
class DIDResolver:
    """Resolve DIDs through a registry, caching active documents for ``ttl`` seconds
    (not while the registry is :attr:`~Registry.refreshing`: that answer may be stale).
    So a deactivation is refused within ``ttl`` plus what the registry takes to see it
    (:class:`JsonFileRegistry`: ``reread_interval`` and one re-read).

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
        if not self.registry.refreshing:  # else the answer may predate a deactivation
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
