"""Limits on the requests an agent makes to addresses a peer chose.

A go-profile peer names the endpoint the server POSTs its replies to (in its own DID
document), so every outbound request is bounded as if the far end were hostile: how much
of the answer is read, for how long, how many at once, and which addresses may be reached.
The addresses are checked after name resolution (see :class:`.http.BoundedSession`), so a
name that resolves to a refused address, now or after a DNS change, is refused too.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from yarl import URL

from .errors import RateLimitedError

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
    """A reservation of one concurrent push; releasing twice is harmless."""

    def __init__(self, slots: PushSlots, key: str) -> None:
        self._slots = slots
        self._key: str | None = key

    def release(self) -> None:
        if self._key is not None:
            self._slots._release(self._key)
            self._key = None


class PushSlots:
    """Pushes in flight, at most ``per_peer`` per endpoint and ``total`` in all.

    Taking a slot never waits: without one the caller is refused at once (429), so no
    push queues without bound behind an endpoint that never answers.
    """

    def __init__(self, per_peer: int = PER_PEER, total: int = TOTAL) -> None:
        self.per_peer = per_peer
        self.total = total
        self.in_flight = 0
        self._by_endpoint: dict[str, int] = {}

    def acquire(self, endpoint: str) -> PushSlot:
        key = endpoint_key(endpoint)
        held = self._by_endpoint.get(key, 0)
        if held >= self.per_peer or self.in_flight >= self.total:
            raise RateLimitedError("too many replies in flight: retry later", code="push_backlog")
        self._by_endpoint[key] = held + 1
        self.in_flight += 1
        return PushSlot(self, key)

    def _release(self, key: str) -> None:
        self.in_flight -= 1
        held = self._by_endpoint.pop(key) - 1
        if held:
            self._by_endpoint[key] = held
