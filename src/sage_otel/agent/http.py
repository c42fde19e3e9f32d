"""The client side of HTTP: the sessions that fetch answers, and the answers' typed errors.

:class:`BoundedSession` is the agents' default: the far end is a peer's choice, so it reads
a bounded answer under a total deadline, follows no redirects and connects only where the
:class:`~.outbound.OutboundPolicy` permits. Answers in the reference's own error shape
(HTTP 200, ``success: false``, free text) are read too, and mapped to typed errors.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from yarl import URL

from .canonical import loads
from .encoding import from_b64std
from .errors import NetworkError, PeerError, peer_error_from_text
from .outbound import ALLOWED_SCHEMES, OutboundPolicy, parse_address


@dataclass(frozen=True)
class RawAnswer:
    """An HTTP answer as the client reads it, whatever library fetched it."""

    status_code: int
    content: bytes
    headers: Mapping[str, str] = field(default_factory=dict)  # case-insensitive when read

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


class AiohttpSession:
    """An aiohttp-based HTTP client for :class:`ClientAgent` (``http=AiohttpSession()``).

    Several times faster per request than httpx on this path; used where throughput
    matters (the HTTP benchmark). Connection errors become :class:`NetworkError`.
    """

    def __init__(self, timeout: float = 10.0, limit: int = 64) -> None:
        self.timeout = timeout
        self.limit = limit
        self._session = None

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> RawAnswer:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.limit),
                trust_env=False,
            )
        try:
            async with self._session.post(url, data=content, headers=headers) as answer:
                return RawAnswer(answer.status, await answer.read())
        except asyncio.TimeoutError as exc:
            raise NetworkError("request timed out", code="request_timeout") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise NetworkError("peer unreachable") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class DestinationRefused(OSError):
    """Every address a name resolved to is refused by the outbound policy."""


def _refused_by_policy(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # aiohttp wraps the resolver's error once or twice
        if seen is None:
            return False
        if isinstance(seen, DestinationRefused):
            return True
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    return False


def _policy_resolver(policy: OutboundPolicy) -> Any:
    """An aiohttp resolver that keeps only the addresses ``policy`` permits.

    The check runs on the addresses the connection will use, so a name that resolves (or
    re-resolves, after a DNS change) to a refused address cannot reach it."""
    from aiohttp.abc import AbstractResolver
    from aiohttp.resolver import ThreadedResolver

    class PolicyResolver(AbstractResolver):
        def __init__(self) -> None:
            self._inner = ThreadedResolver()

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[Any]:
            permitted = [
                result
                for result in await self._inner.resolve(host, port, family)
                if policy.permits(result["host"])
            ]
            if not permitted:
                raise DestinationRefused("destination refused by the outbound policy")
            return permitted

        async def close(self) -> None:
            await self._inner.close()

    return PolicyResolver()


class BoundedSession:
    """The agents' default HTTP client: every answer bounded as if the far end were hostile.

    At most ``policy.max_answer_bytes`` of an answer are read (beyond that the connection is
    closed: ``answer_too_large``), the whole request must end within ``policy.timeout``
    seconds (``request_timeout``), a redirect is an error (``redirect_refused``), only
    http(s) URLs are fetched (``scheme_refused``, before any connection) and only addresses
    the policy permits are connected to (``destination_refused``). The errors never name
    the address.
    """

    def __init__(self, policy: OutboundPolicy | None = None) -> None:
        self.policy = policy or OutboundPolicy()
        self._session: Any = None

    def _open_session(self) -> Any:
        import aiohttp

        return aiohttp.ClientSession(
            # total: connection, request and the whole answer, not each read; not rounded up
            # to the next second as aiohttp does for timeouts past ceil_threshold.
            timeout=aiohttp.ClientTimeout(
                total=self.policy.timeout, ceil_threshold=self.policy.timeout + 1
            ),
            connector=aiohttp.TCPConnector(
                limit=self.policy.total,
                resolver=_policy_resolver(self.policy),
                use_dns_cache=False,  # every connection checks what the name resolves to now
                # Below the idle timeout of the servers it talks to (ours: 5 s), so a pooled
                # connection is not reused at the instant the server closes it.
                keepalive_timeout=4,
            ),
            auto_decompress=False,  # a small compressed answer must not inflate past the cap
            trust_env=False,  # no proxy from the environment: the policy sees the real peer
        )

    def _check_url(self, url: str) -> None:
        """Refuse, before any connection, what is not an http(s) URL to a permitted host."""
        try:
            parsed = URL(url)
            host = parsed.host
        except (ValueError, TypeError):
            raise NetworkError("peer unreachable") from None
        if parsed.scheme not in ALLOWED_SCHEMES or not host:
            raise NetworkError("only http and https endpoints are fetched", code="scheme_refused")
        if parse_address(host) is not None and not self.policy.permits(host):
            # aiohttp connects to an address literal without resolving it: check it here.
            raise NetworkError(
                "destination refused by the outbound policy", code="destination_refused"
            )

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> RawAnswer:
        import aiohttp

        self._check_url(url)
        if self._session is None:
            self._session = self._open_session()
        headers = {**headers, "accept-encoding": "identity"}
        try:
            async with self._session.post(
                url, data=content, headers=headers, allow_redirects=False
            ) as answer:
                if 300 <= answer.status < 400:
                    answer.close()
                    raise NetworkError("peer answered with a redirect", code="redirect_refused")
                body = await self._read_bounded(answer)
                return RawAnswer(answer.status, body, answer.headers)
        except asyncio.TimeoutError as exc:
            raise NetworkError("request timed out", code="request_timeout") from exc
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            if _refused_by_policy(exc):
                raise NetworkError(
                    "destination refused by the outbound policy", code="destination_refused"
                ) from None
            raise NetworkError("peer unreachable") from exc

    async def _read_bounded(self, answer: Any) -> bytes:
        """The answer's body, or ``answer_too_large`` (and the connection closed) past the cap."""
        limit = self.policy.max_answer_bytes
        declared = answer.content_length
        if declared is not None and declared > limit:
            answer.close()
            raise NetworkError("peer answer too large", code="answer_too_large")
        chunks: list[bytes] = []
        size = 0
        while chunk := await answer.content.read(limit + 1 - size):
            size += len(chunk)
            if size > limit:
                answer.close()
                raise NetworkError("peer answer too large", code="answer_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def read_answer(answer: httpx.Response | RawAnswer) -> Any:
    """The JSON inside an answer's ``data``, None without data; failures raise typed errors."""
    try:
        body = loads(answer.content)
    except (ValueError, RecursionError):
        body = None
    if not answer.is_success:
        error = body.get("error") if isinstance(body, dict) else None
        raise peer_error(error, answer.status_code)
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise NetworkError("peer sent an answer of unknown shape", code="bad_answer")
    if not body["success"] or body.get("error"):
        raise peer_error(body.get("error"), answer.status_code)
    raw = body.get("data")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise NetworkError("answer data must be base64", code="bad_answer")
    try:
        return loads(from_b64std(raw, "data"))
    except (ValueError, RecursionError) as exc:
        raise NetworkError("answer data is not JSON", code="bad_answer") from exc


def peer_error(error: object, status: int) -> PeerError:
    if isinstance(error, dict):
        return PeerError(
            str(error.get("message", "peer refused")),
            code=str(error.get("code", "peer_error")),
            category=str(error.get("category", "internal")),
            http_status=status,
        )
    if isinstance(error, str) and error:
        return peer_error_from_text(error, status)
    category = "invalid" if 400 <= status < 500 else "internal"
    return PeerError("peer refused", code="peer_error", category=category, http_status=status)
