"""The HTTP edge: deadlines, header caps and a connection cap that hold with no proxy in front.

uvicorn's httptools protocol has no deadline for a connection that sends nothing or a header
that never ends, no cap on header bytes, and no connection limit short of answering 503.
:class:`SageHttpProtocol` is that protocol with those limits (:class:`EdgeLimits`), given to
uvicorn as its ``http`` class. What it refuses before the app runs gets the same typed JSON
answer as the app's own refusals, then a close:

* malformed HTTP (bad Content-Length, Content-Length with Transfer-Encoding, a bad chunk
  size, an HTTP/2 preface): 400 ``malformed_http``;
* a header block over ``max_header_bytes`` or ``max_headers``: 431 ``headers_too_large``,
  checked as the bytes arrive, so memory never grows with what a peer sends;
* a header block not complete ``header_timeout`` seconds after the first byte (or the
  accept), a request (headers and body) not complete after ``request_timeout``: 408
  ``header_timeout`` or ``body_timeout`` (a connection that sent nothing is just closed).

At ``max_connections`` a new connection evicts the connection that has been without a
request in flight the longest; connections whose request the app is serving are never
evicted, and when every connection is busy the new one is closed at once.
"""

from __future__ import annotations

import asyncio
import http
import math
import weakref
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .envelope import answer_body
from .errors import HeadersTooLargeError, MalformedHttpError, RequestTimeoutError, SageError

NOFILE_CAP = 10_000


def default_max_connections() -> int:
    """Connections one process may hold: below its file-descriptor limit, with room to spare
    for the registry, outbound requests and logs (an eighth, at least 64), at most 10,000."""
    try:
        import resource
    except ImportError:  # Windows: no RLIMIT_NOFILE
        return NOFILE_CAP
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return NOFILE_CAP
    return max(1, min(soft - max(64, soft // 8), NOFILE_CAP))


@dataclass(frozen=True)
class EdgeLimits:
    """What one HTTP connection may cost; the defaults are stricter than the SAGE Go
    reference's servers (ReadHeaderTimeout 10 s, ReadTimeout 30 s, IdleTimeout 60 s, 1 MB of
    headers)."""

    header_timeout: float = 10.0  # seconds from the accept or first byte to the end of headers
    request_timeout: float = 30.0  # seconds from the accept or first byte to the end of the body
    keepalive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_header_bytes: int = 32 * 1024  # request line and header block
    max_headers: int = 100
    max_connections: int = field(default_factory=default_max_connections)  # per process

    def __post_init__(self) -> None:
        for limit in fields(self):
            value = getattr(self, limit.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{limit.name}={value!r}: must be a finite number > 0")


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal is on the protocol."""


def refusal_bytes(error: SageError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 answer carrying ``error`` in the agent's typed shape, then a close."""
    body = answer_body(success=False, message_id="", error=error)
    status = error.http_status
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines.append(
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)
    )
    return b"".join(lines) + body


class _Idle:
    """One server's connections with no whole request in flight (idle, or still sending
    one), the longest-waiting first."""

    def __init__(self) -> None:
        self.order: dict[SageHttpProtocol, None] = {}

    def evict_oldest(self) -> bool:
        """Abort the longest-idle connection; False if every connection is busy."""
        while self.order:
            victim = next(iter(self.order))
            del self.order[victim]
            if not victim.transport.is_closing():
                victim.transport.abort()  # abort: its unsent bytes must not hold the descriptor
                return True
        return False


_upgrade_warned = False
_idle_by_server: weakref.WeakKeyDictionary[Any, _Idle] = weakref.WeakKeyDictionary()


class SageHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol held to :attr:`limits` (a subclass sets its own)."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    @classmethod
    def with_limits(cls, limits: EdgeLimits) -> type[SageHttpProtocol]:
        """This protocol with other limits, for a server built in this process."""
        return type(cls.__name__, (cls,), {"limits": limits, "__module__": cls.__module__})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.limits
        self.timeout_keep_alive = limits.keepalive_timeout
        self._header_timeout = min(limits.header_timeout, limits.request_timeout)
        self._request_timeout = limits.request_timeout
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        idle = _idle_by_server.get(self.server_state)
        if idle is None:
            idle = _idle_by_server[self.server_state] = _Idle()
        self._idle = idle
        self._deadline: asyncio.TimerHandle | None = None
        self._request_due = 0.0
        self._in_headers = True  # reading a header block, or waiting for the next request
        self._header_bytes = 0  # raw bytes received while in_headers: bounds a partial block
        self._received_any = False
        self._refusal: SageError | None = None
        self._refused = False

    # -- connections -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        full = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        if full and not self._idle.evict_oldest():
            self._refused = True
            transport.abort()  # every connection is serving a request: this one waits its turn
            return
        self._idle.order[self] = None
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._idle.order.pop(self, None)
        self._disarm_deadline()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        self._request_due = self.loop.time() + self._request_timeout
        self._deadline = self.loop.call_later(self._header_timeout, self._deadline_passed)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if not self._in_headers:  # headers arrived in time; the body has until request_due
            remaining = self._request_due - self.loop.time()
            if remaining > 0:
                self._deadline = self.loop.call_later(remaining, self._deadline_passed)
                return
        if not self._received_any:
            self.transport.close()  # nothing was said: nothing to answer
            return
        if self._in_headers:
            self.refuse(RequestTimeoutError("request headers not received in time"))
        else:
            late = RequestTimeoutError("request body not received in time", code="body_timeout")
            self.refuse(late)

    # -- bytes in ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        self._received_any = True
        if self._in_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self.refuse(self._refusal or MalformedHttpError("malformed HTTP request"))
            return
        if self._in_headers and self._header_bytes > self._max_header_bytes:
            self.refuse(HeadersTooLargeError("request headers too large"))

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn warns on every ``Upgrade`` request: anyone could fill the log. Once."""
        global _upgrade_warned
        if not _upgrade_warned:
            _upgrade_warned = True
            self.logger.warning("Unsupported upgrade request (logged once; answered as HTTP/1.1)")

    def refuse(self, error: SageError) -> None:
        """Answer ``error`` if no answer has begun, and close: nothing more is read."""
        self._refused = True
        self._disarm_deadline()
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's answer, if it comes, is not written
            cycle.message_event.set()
        if not answering and not self.transport.is_closing():
            self.transport.write(refusal_bytes(error, self.server_state.default_headers))
        self.transport.close()

    # -- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm_deadline()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        # The raw count bounds a block still arriving; a whole block that came in one read
        # is measured here, before the app sees it (memory: one read at most).
        headers = self.headers
        size = len(self.url) + 4 * len(headers) + sum(map(len, chain.from_iterable(headers)))
        if len(headers) > self._max_headers or size > self._max_header_bytes:
            self._refusal = HeadersTooLargeError("request headers too large")
            raise _Refused
        self._in_headers = False
        self._header_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # A whole request in flight: never evicted. Until its body has all come, it stays
        # evictable like any connection that has not sent a request yet: a peer trickling
        # bodies cannot hold the cap any more than one trickling headers.
        self._idle.order.pop(self, None)
        self._disarm_deadline()
        self._in_headers = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline  # else the next pipelined request starts now
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self._idle.order[self] = None  # idle from now: the newest of them
