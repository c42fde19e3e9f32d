"""Limits on the requests an agent makes to addresses a peer chose.

A go-profile peer names the endpoint the server POSTs its replies to (in its own DID
document), so every outbound request is bounded as if the far end were hostile: how much
of the answer is read, for how long, how many at once, and which addresses may be reached.
The addresses are checked after name resolution (see :class:`.http.BoundedSession`), so a
name that resolves to a refused address, now or after a DNS change, is refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from .errors import OverloadError, RateLimitedError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_ANSWER_BYTES = 64 * 1024  # answers are small JSON envelopes
TOTAL_TIMEOUT = 10.0  # seconds for the whole request, answer included
PER_PEER = 4  # concurrent pushes to one peer endpoint
TOTAL = 64  # concurrent pushes in all
ALLOWED_SCHEMES = frozenset({"http", "https"})

# Never reachable whatever the operator allows: link-local (cloud metadata services live
# at 169.254.169.254), unspecified, multicast and broadcast addresses.
ALWAYS_DENIED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "169.254.0.0/16",
        "fe80::/10",
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",
        "ff00::/8",
        "255.255.255.255/32",
    )
)


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is one host); ValueError on the first bad one."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR such as 10.0.0.0/8") from None
    return tuple(networks)


def parse_address(text: str) -> Address | None:
    """The IP address ``text`` names (IPv4-mapped IPv6 as IPv4), None for a host name."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class OutboundPolicy:
    """What an agent's own HTTP client may fetch, and the server's pushes in flight.

    ``allow`` empty means every address not denied; ``deny`` adds to :data:`ALWAYS_DENIED`.
    A denial wins over an allowance.
    """

    max_answer_bytes: int = MAX_ANSWER_BYTES
    timeout: float = TOTAL_TIMEOUT
    per_peer: int = PER_PEER
    total: int = TOTAL
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("max_answer_bytes", "timeout", "per_peer", "total"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    def permits(self, address: str) -> bool:
        """Whether a resolved address (text, as a resolver returns it) may be connected to."""
        ip = parse_address(address)
        if ip is None:
            return False  # not an address: nothing to check it against
        if any(ip in network for network in ALWAYS_DENIED + self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)


def endpoint_key(url: str) -> str:
    """One key per peer endpoint (scheme, host, port) for the per-peer limit."""
    try:
        parsed = URL(url)
        return f"{parsed.scheme}://{parsed.host}:{parsed.port}"
    except (ValueError, TypeError):
        return url


class PushSlot:
    """A reservation of one concurrent push; releasing twice is harmless.

    The task doing the push is :meth:`attach`-ed so that :class:`PushSlots` can cancel it
    when it evicts the slot to make room for a smaller holder.
    """

    def __init__(self, slots: PushSlots, key: str, order: int) -> None:
        self._slots = slots
        self._key: str | None = key
        self.order = order  # lower is older: the eviction order within an endpoint
        self.evicted = False
        self._task: asyncio.Future[Any] | None = None

    def attach(self, task: asyncio.Future[Any]) -> None:
        """The task doing this push: cancelled on eviction (at once if already evicted)."""
        if self.evicted:
            task.cancel()
        elif self._key is not None:
            self._task = task

    def release(self) -> None:
        if self._key is not None:
            self._slots._release(self, self._key)
            self._key = None
            self._task = None

    def _evict(self) -> None:
        """Free the slot now and cancel its push, if it has a task; a later release is a no-op."""
        task = self._task
        self.release()
        self.evicted = True
        if task is not None:
            task.cancel()


class PushSlots:
    """Pushes in flight, at most ``per_peer`` per endpoint and ``total`` in all.

    Taking a slot never waits: without one the caller is refused at once (429), so no
    push queues without bound behind an endpoint that never answers. When only the total
    is full, the oldest push of the endpoint holding the most slots is cancelled to make
    room, provided that endpoint holds at least two more than the requester (so the two
    cannot take turns evicting each other): a few endpoints that never answer cannot
    starve the others, as the session table evicts from its biggest holder.
    """

    def __init__(self, per_peer: int = PER_PEER, total: int = TOTAL) -> None:
        self.per_peer = per_peer
        self.total = total
        self.in_flight = 0
        self._by_endpoint: dict[str, dict[PushSlot, None]] = {}  # insertion order: oldest first
        self._orders = itertools.count()

    def acquire(self, endpoint: str) -> PushSlot:
        key = endpoint_key(endpoint)
        held = len(self._by_endpoint.get(key, ()))
        if held >= self.per_peer:  # this endpoint's own share: the peer's doing (429)
            raise RateLimitedError("too many replies in flight: retry later", code="push_backlog")
        if self.in_flight >= self.total and not self._evict_for(held):  # the server is full
            raise OverloadError("too many replies in flight: retry later", code="push_backlog")
        slot = PushSlot(self, key, next(self._orders))
        self._by_endpoint.setdefault(key, {})[slot] = None
        self.in_flight += 1
        return slot

    def held(self, endpoint: str) -> int:
        """Slots the endpoint of ``endpoint`` holds now."""
        return len(self._by_endpoint.get(endpoint_key(endpoint), ()))

    def _evict_for(self, held: int) -> bool:
        """Evict the oldest slot of the biggest holder if it holds ``held + 2`` or more.

        Among equally big holders, the one with the oldest push goes first. At most
        ``total`` endpoints hold slots, so the scan is short.
        """
        biggest = max(
            self._by_endpoint.values(),
            key=lambda slots: (len(slots), -next(iter(slots)).order),
            default=None,
        )
        if biggest is None or len(biggest) < held + 2:
            return False
        next(iter(biggest))._evict()
        return True

    def _release(self, slot: PushSlot, key: str) -> None:
        slots = self._by_endpoint[key]
        del slots[slot]
        if not slots:
            del self._by_endpoint[key]
        self.in_flight -= 1
