"""Replay state: nonces seen, bounded, and scoped so that no peer can disturb another.

A :class:`NonceCache` remembers keys for a TTL up to a size bound. When full it evicts the
oldest entry and stops vouching for anything timestamped before it (its *floor*): such
input is refused as expired, never accepted, so a bounded cache cannot reopen a replay
window. Caches are scoped (one per session for messages, one per sender DID for
handshakes): a peer that fills its own cache raises only its own floor.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum


class NonceStatus(str, Enum):
    VALID = "valid"
    INVALID = "invalid"  # seen before: a replay
    EXPIRED = "expired"  # outside the time window the cache can vouch for


class NonceCache:
    """Nonces seen within ``ttl``, bounded to ``max_size`` entries.

    When full, the oldest entry is evicted and the cache stops vouching for anything
    timestamped before it (``floor``): such messages are refused as expired, never
    accepted, so a bounded cache cannot reopen a replay window.
    """

    def __init__(
        self,
        ttl: float = 300.0,
        max_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.floor = 0.0

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, stamp = next(iter(seen.items()))
            if stamp + self.ttl > now:
                break
            del seen[key]

    def empty_at(self, now: float) -> bool:
        """Whether every entry has expired by ``now`` (the floor is then moot too)."""
        self._prune(now)
        return not self._seen and self.floor + self.ttl <= now

    def check(self, key: bytes, timestamp: float) -> NonceStatus:
        now = self.clock()
        self._prune(now)
        if timestamp <= self.floor or timestamp + self.ttl <= now:
            return NonceStatus.EXPIRED
        if key in self._seen:
            return NonceStatus.INVALID
        return NonceStatus.VALID

    def mark_new(self, key: bytes, timestamp: float) -> bool:
        """Mark ``key`` unless it is already there (a twin checked in the meantime)."""
        if key in self._seen:
            return False
        self.mark(key, timestamp)
        return True

    def mark(self, key: bytes, timestamp: float | None = None) -> None:
        """Remember ``key``; ``timestamp`` is the message's own, which may run ahead of the clock.

        An entry is kept (and, once evicted, raises the floor) to the later of the two, so
        neither pruning nor eviction can let a replay of it through as fresh.
        """
        now = self.clock()
        self._seen[key] = now if timestamp is None else max(now, timestamp)
        while len(self._seen) > self.max_size:
            _, stamp = self._seen.popitem(last=False)
            self.floor = max(self.floor, stamp)


class ScopedNonceCaches:
    """One :class:`NonceCache` per scope (e.g. per sender DID), each with its own bound.

    Scopes whose entries have all expired are dropped on the next sweep, so memory is
    bounded by the scopes active within one TTL times ``per_scope``.
    """

    def __init__(
        self,
        ttl: float,
        per_scope: int,
        clock: Callable[[], float] = time.time,
        sweep_every: int = 1024,
    ) -> None:
        self.ttl = ttl
        self.per_scope = per_scope
        self.clock = clock
        self.sweep_every = sweep_every
        self._caches: dict[Hashable, NonceCache] = {}
        self._touches = 0

    def __len__(self) -> int:
        return len(self._caches)

    def scope(self, key: Hashable) -> NonceCache:
        self._touches += 1
        if self._touches % self.sweep_every == 0:
            self.sweep()
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = NonceCache(self.ttl, self.per_scope, self.clock)
        return cache

    def sweep(self) -> None:
        now = self.clock()
        for key in [k for k, c in self._caches.items() if c.empty_at(now)]:
            del self._caches[key]


@dataclass
class SessionReplays:
    """One session's inbound replay state, dropped with the session.

    ``nonces``: message nonces (native) or message ids (go), within the TTL. ``sealed``: the
    AEAD nonces of go-profile ciphertexts accepted, for the session's whole life (a swapped-in
    old ciphertext comes under a fresh envelope, so no TTL may forget it). Both grow by one
    per accepted message only, so the session's message limit bounds them.
    """

    nonces: NonceCache
    sealed: set[bytes] = field(default_factory=set)
