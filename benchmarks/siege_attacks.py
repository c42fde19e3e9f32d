"""The siege's attacker: one network-edge attack against a SAGE server, in its own process.

    python -m benchmarks.siege_attacks ATTACK --base URL --server-did DID --registry R.json
                                       --seconds S --out FILE.json [--scale F] [--no-wait]

Its own process, so that hundreds of raw sockets do not starve the legitimate clients' event
loop (benchmarks.siege). It sets itself up (identities, registrations, listening endpoints),
prints READY, waits for a line on stdin (unless ``--no-wait``), attacks for S seconds,
closes everything, writes its figures to FILE.json and prints DONE. ``--scale`` multiplies
the connection counts (the tests run a tiny siege).

Every attack counts what it did (connections opened and held, bytes sent, requests) and
every answer it got by status, with the answers that were not the agent's typed JSON and
the 5xx apart: those are findings whatever the limits are.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sage_otel.agent.envelope import MESSAGES_PATH, SESSION_GONE

from .soak import percentile

CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 5.0
REOPEN_PAUSE = 0.2  # after the server closed a connection: no reconnect storm
HEAD_LIMIT = 64 * 1024  # bytes of an answer read to classify it
SESSIONS_PER_DID = 2  # fresh_dids: with 100 DIDs/s, 200 handshakes/s
CHURN_WORKERS = 8  # registry_churn loops: a miss may wait for the server's next re-read


# -- counting ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one attack did and what it got back."""

    started: float = field(default_factory=time.monotonic)
    opened: int = 0
    open_now: int = 0
    held_max: int = 0
    connect_errors: int = 0
    closed_by_server: int = 0
    write_errors: int = 0
    bytes_sent: int = 0
    requests: int = 0
    answers: collections.Counter = field(default_factory=collections.Counter)
    codes: collections.Counter = field(default_factory=collections.Counter)
    untyped: int = 0  # answers that were not the agent's JSON shape
    status_5xx: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def opened_one(self) -> None:
        self.opened += 1
        self.open_now += 1
        self.held_max = max(self.held_max, self.open_now)

    def closed_one(self, by_server: bool) -> None:
        self.open_now -= 1
        if by_server:
            self.closed_by_server += 1

    def answer(self, status: int, typed: bool, code: str = "") -> None:
        self.answers[str(status)] += 1
        if code:
            self.codes[f"{status} {code}"] += 1
        if not typed:
            self.untyped += 1
        if status >= 500:
            self.status_5xx += 1

    async def sample_forever(self) -> None:
        while True:
            self.samples.append((round(time.monotonic() - self.started, 1), self.open_now))
            await asyncio.sleep(1.0)

    def report(self, name: str, seconds: float, phase_seconds: float) -> dict[str, Any]:
        # Not while opening (t = 0) nor while closing (the last half second of the phase).
        held = [n for t, n in self.samples if 0 < t < phase_seconds - 0.5]
        return {
            "attack": name,
            "seconds": round(seconds, 2),
            "connections_opened": self.opened,
            "connections_held_max": self.held_max,
            "connections_held_median": sorted(held)[len(held) // 2] if held else 0,
            "connections_held_at_end": self.open_now,
            "connect_errors": self.connect_errors,
            "closed_by_server": self.closed_by_server,
            "write_errors": self.write_errors,
            "bytes_sent": self.bytes_sent,
            "requests": self.requests,
            "answers_by_status": dict(sorted(self.answers.items())),
            "answers_by_code": dict(sorted(self.codes.items())),
            "untyped_answers": self.untyped,
            "status_5xx": self.status_5xx,
            "held_timeline": self.samples,
            **self.extra,
        }


def classify(head_and_body: bytes) -> tuple[int, bool, str]:
    """(status, is the agent's typed JSON answer, its error code) of a raw HTTP answer."""
    head, _, body = head_and_body.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return -1, False, "not_http"
    try:
        data = json.loads(body)
    except ValueError:
        return status, False, ""
    if not isinstance(data, dict) or not isinstance(data.get("success"), bool):
        return status, False, ""
    error = data.get("error")
    if data["success"]:
        return status, True, "ok"
    if isinstance(error, dict) and {"code", "category", "message"} <= error.keys():
        return status, True, str(error["code"])
    return status, False, ""


async def read_raw_answer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """One answer: its head and as much of its body as Content-Length says (or up to EOF)."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and len(data) < HEAD_LIMIT:
        chunk = await asyncio.wait_for(reader.read(4096), max(0.01, deadline - time.monotonic()))
        if not chunk:
            return data
        data += chunk
    head = data.partition(b"\r\n\r\n")[0].lower()
    length = None
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            with contextlib.suppress(ValueError):
                length = int(line.split(b":", 1)[1])
    body_len = len(data) - len(head) - 4
    while (length is None or body_len < length) and len(data) < HEAD_LIMIT:
        try:
            chunk = await asyncio.wait_for(
                reader.read(4096), max(0.01, deadline - time.monotonic())
            )
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        body_len += len(chunk)
    return data


class Target:
    """The server's address and the raw request lines aimed at it."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.authority = f"{self.host}:{self.port}"

    def head(self, method: str = "POST", *lines: str) -> bytes:
        extra = "".join(f"{line}\r\n" for line in lines)
        return f"{method} {MESSAGES_PATH} HTTP/1.1\r\nHost: {self.authority}\r\n{extra}".encode()

    async def open(self, tally: Tally) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            tally.connect_errors += 1
            raise
        tally.opened_one()
        return reader, writer


def close_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


def note_answer(tally: Tally, data: bytes) -> None:
    if data:
        status, typed, code = classify(data)
        tally.answer(status, typed, code)


async def hold(
    target: Target,
    tally: Tally,
    deadline: float,
    opening: bytes,
    trickle: bytes = b"",
    every: float = 1.0,
) -> None:
    """Keep one connection open until ``deadline``: send ``opening``, then one byte of
    ``trickle`` every ``every`` seconds (nothing if empty); reopen whenever the server closes."""
    while time.monotonic() < deadline:
        try:
            reader, writer = await target.open(tally)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(REOPEN_PAUSE)
            continue
        by_server = False
        try:
            if opening:
                writer.write(opening)
                tally.bytes_sent += len(opening)
            position = 0
            while time.monotonic() < deadline:
                wait = (
                    min(every, deadline - time.monotonic())
                    if trickle
                    else (deadline - time.monotonic())
                )
                try:
                    data = await asyncio.wait_for(reader.read(HEAD_LIMIT), max(0.01, wait))
                except asyncio.TimeoutError:
                    if trickle:
                        writer.write(trickle[position % len(trickle) : position % len(trickle) + 1])
                        tally.bytes_sent += 1
                        position += 1
                    continue
                note_answer(tally, data)  # an answer, then a close, or just a close
                by_server = True
                break
        except (ConnectionError, OSError):
            tally.write_errors += 1
            by_server = True
        finally:
            close_quietly(writer)
            tally.closed_one(by_server)
        if by_server:
            await asyncio.sleep(REOPEN_PAUSE)


async def run_for(seconds: float, tasks: list[Awaitable[None]], tally: Tally) -> None:
    sampler = asyncio.create_task(tally.sample_forever())
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 15)
    except asyncio.TimeoutError:
        tally.extra["overran"] = True
    finally:
        sampler.cancel()


# -- 1-4: connections and headers ---------------------------------------------------------------


async def idle_connections(ctx: Context) -> None:
    """1,100 connections: half send nothing, half a partial request head, all held."""
    count = ctx.scaled(1100)
    partial = ctx.target.head("POST", "Content-Type: application/json") + b"Content-Le"
    tasks = [
        hold(ctx.target, ctx.tally, ctx.deadline, b"" if i % 2 == 0 else partial)
        for i in range(count)
    ]
    ctx.tally.extra["connections_wanted"] = count
    await run_for(ctx.seconds, tasks, ctx.tally)


async def slow_headers(ctx: Context) -> None:
    """200 connections, each trickling one header byte a second, never ending the headers."""
    count = ctx.scaled(200)
    opening = ctx.target.head("POST", "Content-Type: application/json") + b"X-Slow: "
    tasks = [
        hold(ctx.target, ctx.tally, ctx.deadline, opening, trickle=b"abcdefghij")
        for _ in range(count)
    ]
    ctx.tally.extra["connections_wanted"] = count
    await run_for(ctx.seconds, tasks, ctx.tally)


async def slow_body(ctx: Context) -> None:
    """100 connections: a valid head announcing 1 MB of body, then one byte a second."""
    count = ctx.scaled(100)
    opening = ctx.target.head(
        "POST", "Content-Type: application/json", f"Content-Length: {1 << 20}", ""
    )
    tasks = [
        hold(ctx.target, ctx.tally, ctx.deadline, opening, trickle=b'{"a":"aaaaaaaaaa')
        for _ in range(count)
    ]
    ctx.tally.extra["connections_wanted"] = count
    await run_for(ctx.seconds, tasks, ctx.tally)


async def stream_header_lines(ctx: Context, stream: dict[str, int]) -> None:
    """One connection writing header lines as fast as the server reads them, never ending
    the block; reconnect when closed."""
    line = b"X-a: " + b"a" * 1000 + b"\r\n"
    chunk = line * 64
    tally = ctx.tally
    while time.monotonic() < ctx.deadline:
        try:
            reader, writer = await ctx.target.open(tally)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(REOPEN_PAUSE)
            continue
        by_server = True
        try:
            writer.write(ctx.target.head("POST"))
            while time.monotonic() < ctx.deadline:
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)
                except asyncio.TimeoutError:
                    stream["stalled"] += 1  # the server stopped reading: fine, start over
                    break
                tally.bytes_sent += len(chunk)
                stream["bytes"] += len(chunk)
            else:
                by_server = False
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
                note_answer(tally, await read_raw_answer(reader, 1.0))
        except (ConnectionError, OSError):
            tally.write_errors += 1
        finally:
            close_quietly(writer)
            tally.closed_one(by_server)
        await asyncio.sleep(REOPEN_PAUSE if by_server else 0)


async def one_big_request(ctx: Context, head: bytes, kind: str) -> None:
    """Send the same oversized request head (then a tiny body) again and again."""
    body = b"{}"
    request = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    tally = ctx.tally
    while time.monotonic() < ctx.deadline:
        try:
            reader, writer = await ctx.target.open(tally)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(REOPEN_PAUSE)
            continue
        try:
            writer.write(request)
            tally.requests += 1
            tally.extra[f"{kind}_sent"] = tally.extra.get(f"{kind}_sent", 0) + 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)
                tally.bytes_sent += len(request)
            answer = await read_raw_answer(reader, ANSWER_TIMEOUT)
            note_answer(tally, answer)
            status = classify(answer)[0] if answer else "closed"
            key = f"{kind}_answers"
            tally.extra.setdefault(key, collections.Counter())[str(status)] += 1
        except (ConnectionError, OSError, asyncio.TimeoutError):
            tally.write_errors += 1
        finally:
            close_quietly(writer)
            tally.closed_one(True)
        await asyncio.sleep(REOPEN_PAUSE)


async def header_flood(ctx: Context) -> None:
    """4 connections streaming header lines; one request of 20,000 headers; one 1 MB header."""
    streams = [collections.Counter() for _ in range(4)]
    many = ctx.target.head("POST", "Content-Type: application/json") + b"".join(
        b"X-h%d: v\r\n" % i for i in range(20_000)
    )
    big = ctx.target.head("POST", "Content-Type: application/json", "X-Big: " + "b" * (1 << 20))
    tasks = [stream_header_lines(ctx, stream) for stream in streams]
    tasks += [one_big_request(ctx, many, "many_headers"), one_big_request(ctx, big, "big_header")]
    await run_for(ctx.seconds, tasks, ctx.tally)
    ctx.tally.extra["stream_bytes"] = [s["bytes"] for s in streams]
    ctx.tally.extra["stream_stalls"] = sum(s["stalled"] for s in streams)
    for key in ("many_headers_answers", "big_header_answers"):
        ctx.tally.extra[key] = dict(ctx.tally.extra.get(key, {}))


# -- 5: malformed HTTP ------------------------------------------------------------------------


def malformed_requests(target: Target) -> dict[str, bytes]:
    json_type = "Content-Type: application/json"
    return {
        "bad_content_length": target.head("POST", json_type, "Content-Length: abc", "") + b"{}",
        "negative_content_length": target.head("POST", json_type, "Content-Length: -1", "") + b"{}",
        "cl_and_te": target.head(
            "POST", json_type, "Content-Length: 5", "Transfer-Encoding: chunked", ""
        )
        + b"2\r\n{}\r\n0\r\n\r\n",
        "bad_chunk_size": target.head("POST", json_type, "Transfer-Encoding: chunked", "")
        + b"zz\r\n{}\r\n0\r\n\r\n",
        "huge_chunk_size": target.head("POST", json_type, "Transfer-Encoding: chunked", "")
        + b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
        "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage \x00\xff\r\n\r\n",
        "bad_request_line": b"POST\r\n\r\n",
        "bad_version": f"POST {MESSAGES_PATH} HTTP/9.9\r\n\r\n".encode(),
        "space_in_header_name": target.head("POST", "Bad Header: x", "Content-Length: 2", "")
        + b"{}",
    }


async def malformed_http(ctx: Context) -> None:
    """Raw malformed requests, each on a new connection, at a paced rate; count what comes back
    that is not the agent's typed JSON, and any 5xx."""
    requests = malformed_requests(ctx.target)
    by_kind: dict[str, collections.Counter] = {k: collections.Counter() for k in requests}
    tally = ctx.tally

    async def one(kind: str) -> None:
        try:
            reader, writer = await ctx.target.open(tally)
        except (OSError, asyncio.TimeoutError):
            return
        try:
            writer.write(requests[kind])
            tally.requests += 1
            tally.bytes_sent += len(requests[kind])
            answer = await read_raw_answer(reader, ANSWER_TIMEOUT)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            answer = b""
        finally:
            close_quietly(writer)
            tally.closed_one(True)
        if answer:
            status, typed, code = classify(answer)
            tally.answer(status, typed, code)
            by_kind[kind][f"{status} {code or 'untyped'}"] += 1
        else:
            by_kind[kind]["no_answer"] += 1

    kinds = list(requests)
    await paced(ctx, lambda i: one(kinds[i % len(kinds)]), ctx.rate or 200.0)
    tally.extra["by_kind"] = {k: dict(v) for k, v in by_kind.items()}


async def paced(
    ctx: Context, job: Callable[[int], Awaitable[None]], rate: float, inflight: int = 32
) -> None:
    """Run ``job(i)`` ``rate`` times a second until the deadline, at most ``inflight`` at once."""
    slots = asyncio.Semaphore(inflight)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    sampler = asyncio.create_task(ctx.tally.sample_forever())
    next_at, i = loop.time(), 0
    while time.monotonic() < ctx.deadline:
        await slots.acquire()

        async def run(index: int = i) -> None:
            try:
                await job(index)
            except Exception as exc:  # a harness defect: counted, never silent
                ctx.errors[type(exc).__name__] += 1
            finally:
                slots.release()

        task = asyncio.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        next_at += 1.0 / rate
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:
            next_at = loop.time()
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    sampler.cancel()


# -- 6-8: identities -----------------------------------------------------------------------------


def agent_http(ctx: Context):
    import httpx

    async def count(response: httpx.Response) -> None:
        ctx.tally.requests += 1
        if response.status_code >= 500:
            ctx.tally.status_5xx += 1
        ctx.tally.answers[str(response.status_code)] += 1

    return httpx.AsyncClient(
        timeout=10.0,
        trust_env=False,
        limits=httpx.Limits(max_connections=64),
        event_hooks={"response": [count]},
    )


async def register(ctx: Context, identity, **extra: Any) -> float:
    """Register ``identity`` in the shared registry file; the seconds it took."""
    from sage_otel.agent.did import DIDDocument, sign_registration

    started = time.perf_counter()
    document = DIDDocument.for_identity(identity, **extra)
    await ctx.registry.register(document, sign_registration(identity, document))
    return time.perf_counter() - started


class HostileEndpoint:
    """An HTTP server a peer names as its endpoint, answering every request 200 with a body
    that never ends: as fast as the reader takes it (``flood``) or one byte a second."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.bytes_served = 0
        self.open_now = 0
        self.open_max = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            self.requests += 1
            del head  # whatever it asked, the answer is the same
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"a" * 65536
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            while True:
                if self.mode == "flood":
                    writer.write(framed)
                    self.bytes_served += len(chunk)
                else:
                    writer.write(b"1\r\na\r\n")
                    self.bytes_served += 1
                    await asyncio.sleep(1.0)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            self.open_now -= 1
            close_quietly(writer)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def hostile_endpoint(ctx: Context) -> None:
    """Go-profile peers whose DID documents name endpoints that answer endlessly (one floods,
    one trickles); each sends messages as fast as the server accepts them, so the server
    POSTs its replies there."""
    from sage_otel.agent.did import DIDResolver
    from sage_otel.agent.errors import SageError
    from sage_otel.agent.identity import AgentIdentity
    from sage_otel.agent.session import PeerProfile
    from sage_otel.agent.transport import ClientAgent

    endpoints = {mode: HostileEndpoint(mode) for mode in ("flood", "trickle")}
    http = agent_http(ctx)
    agents = {}
    for mode, endpoint in endpoints.items():
        port = await endpoint.start()
        identity = AgentIdentity.generate("ethereum")
        await register(ctx, identity, endpoint=f"http://127.0.0.1:{port}")
        agents[mode] = ClientAgent(identity, DIDResolver(ctx.registry), http=http)
    sent: collections.Counter = collections.Counter()
    codes: collections.Counter = collections.Counter()
    await ctx.ready()

    async def sender(mode: str) -> None:
        agent = agents[mode]
        conn = None
        while time.monotonic() < ctx.deadline:
            try:
                if conn is None:
                    conn = await agent.connect(ctx.base, ctx.server_did, profile=PeerProfile.GO)
                    codes["handshake ok"] += 1
                await agent.send(conn, f"go {sent[mode]}")
                sent[mode] += 1
                codes["message ok"] += 1
            except SageError as exc:
                codes[exc.code] += 1
                if exc.code in SESSION_GONE or conn is None:
                    conn = None
                await asyncio.sleep(0.01)  # refused: as fast as allowed, not a busy loop

    senders = [sender(mode) for mode in endpoints for _ in range(4)]
    await run_for(ctx.seconds, senders, ctx.tally)
    for endpoint in endpoints.values():
        await endpoint.stop()
    for agent in agents.values():
        agent.http = _Unclosed()
        await agent.aclose()
    await http.aclose()
    ctx.tally.extra.update(
        {
            "messages_accepted": dict(sent),
            "outcomes": dict(codes),
            "pushes_received": {m: e.requests for m, e in endpoints.items()},
            # Written into the socket: includes what the kernel buffered before the close.
            "bytes_written_by_endpoint": {m: e.bytes_served for m, e in endpoints.items()},
            "push_connections_max": {m: e.open_max for m, e in endpoints.items()},
            "push_connections_at_end": {m: e.open_now for m, e in endpoints.items()},
        }
    )


class _Unclosed:
    """Stands in for an HTTP client shared by several agents, which one agent must not close."""

    async def aclose(self) -> None:
        return None


def new_registrations(count: int) -> list[tuple[Any, bytes]]:
    """``count`` fresh self-signed DID registrations: (document, its registration entry)."""
    from sage_otel.agent.did import DIDDocument, sign_registration
    from sage_otel.agent.encoding import b64url
    from sage_otel.agent.identity import AgentIdentity

    out = []
    for _ in range(count):
        identity = AgentIdentity.generate("solana")
        document = DIDDocument.for_identity(identity)
        entry = {**document.to_json(), "signature": b64url(sign_registration(identity, document))}
        out.append((identity, json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()))
    return out


def append_registrations(path: Path, entries: list[bytes]) -> None:
    """Add signed registrations to the registry file in one write, as JsonFileRegistry writes
    it (under the flock of ``<file>.lock``, one entry per line, replaced atomically): what
    anyone who may register can do, many at a time."""
    import fcntl
    import os
    import tempfile

    from sage_otel.agent.did import FORMAT_VERSION

    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(path.read_bytes() or b"{}").get("documents", [])
        except FileNotFoundError:
            known = []
        lines = [json.dumps(e, sort_keys=True, separators=(",", ":")).encode() for e in known]
        lines += entries
        header = b'{"version": %d, "documents": [' % FORMAT_VERSION
        payload = b"%s\n%s\n]}\n" % (header, b",\n".join(lines))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registry-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)


async def fresh_dids(ctx: Context) -> None:
    """Fresh DIDs, ``--rate`` a second (100 by default), registered in batches of a tenth of
    a second's worth (one file write each), and ``SESSIONS_PER_DID`` sessions opened by each
    as soon as it is registered: many identities against the session table."""
    from sage_otel.agent.did import DIDResolver
    from sage_otel.agent.errors import SageError
    from sage_otel.agent.transport import ClientAgent

    http = agent_http(ctx)
    resolver = DIDResolver(ctx.registry)
    rate = ctx.rate or 100.0
    batch = max(1, round(rate / 10))
    codes: collections.Counter = collections.Counter()
    agents: list[ClientAgent] = []
    write_seconds: list[float] = []
    registered = 0
    await ctx.ready()

    async def handshake(agent: ClientAgent) -> None:
        try:
            await agent.connect(ctx.base, ctx.server_did)
            codes["ok"] += 1
        except SageError as exc:
            codes[exc.code] += 1

    async def one_batch(_index: int) -> None:
        nonlocal registered
        fresh = new_registrations(batch)
        started = time.perf_counter()
        await asyncio.to_thread(
            append_registrations, Path(ctx.registry_path), [entry for _i, entry in fresh]
        )
        write_seconds.append(time.perf_counter() - started)
        registered += len(fresh)
        new = [ClientAgent(identity, resolver, http=http) for identity, _entry in fresh]
        agents.extend(new)
        await asyncio.gather(*(handshake(a) for a in new for _ in range(SESSIONS_PER_DID)))

    await paced(ctx, one_batch, rate / batch, inflight=32)
    for agent in agents:
        agent.http = _Unclosed()
        await agent.aclose()
    await http.aclose()
    ordered = sorted(write_seconds)
    ctx.tally.extra.update(
        {
            "dids_registered": registered,
            "dids_per_s": round(registered / ctx.seconds, 1),
            "sessions_per_did": SESSIONS_PER_DID,
            "handshakes": dict(codes),
            "sessions_opened": codes["ok"],
            "batch_write_p50_ms": round(percentile(ordered, 50) * 1e3, 1),
            "batch_write_p99_ms": round(percentile(ordered, 99) * 1e3, 1),
        }
    )


async def registry_churn(ctx: Context) -> None:
    """Alternate "register a new DID" with "handshake from an unknown DID", back to back in
    ``CHURN_WORKERS`` loops: each miss after the file changed makes the server look at the
    registry again."""
    from sage_otel.agent.did import DIDResolver
    from sage_otel.agent.errors import SageError
    from sage_otel.agent.identity import AgentIdentity
    from sage_otel.agent.transport import ClientAgent

    http = agent_http(ctx)
    done: collections.Counter = collections.Counter()
    codes: collections.Counter = collections.Counter()
    resolver = DIDResolver(ctx.registry)  # the client side only resolves the server's DID
    await ctx.ready()

    async def churn() -> None:
        while time.monotonic() < ctx.deadline:
            await register(ctx, AgentIdentity.generate("solana"))
            done["registered"] += 1
            # An identity nobody registered: the server cannot resolve it.
            agent = ClientAgent(AgentIdentity.generate("solana"), resolver, http=http)
            try:
                await agent.connect(ctx.base, ctx.server_did)
                codes["ok"] += 1
            except SageError as exc:
                codes[exc.code] += 1
            done["unknown"] += 1
            agent.http = _Unclosed()
            await agent.aclose()

    await run_for(ctx.seconds, [churn() for _ in range(CHURN_WORKERS)], ctx.tally)
    await http.aclose()
    ctx.tally.extra.update(
        {
            "workers": CHURN_WORKERS,
            "dids_registered": done["registered"],
            "unknown_handshakes": done["unknown"],
            "handshakes": dict(codes),
        }
    )


ATTACKS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "idle_connections": idle_connections,
    "slow_headers": slow_headers,
    "header_flood": header_flood,
    "slow_body": slow_body,
    "malformed_http": malformed_http,
    "hostile_endpoint": hostile_endpoint,
    "fresh_dids": fresh_dids,
    "registry_churn": registry_churn,
}
SELF_TIMED = {"hostile_endpoint", "fresh_dids", "registry_churn"}  # they call ctx.ready()


# -- the process ------------------------------------------------------------------------------


@dataclass
class Context:
    name: str
    base: str
    server_did: str
    registry_path: str
    seconds: float
    scale: float
    rate: float
    wait: bool
    target: Target = field(init=False)
    tally: Tally = field(default_factory=Tally)
    deadline: float = 0.0
    errors: collections.Counter = field(default_factory=collections.Counter)
    _registry: Any = None

    def __post_init__(self) -> None:
        self.target = Target(self.base)

    @property
    def registry(self):
        if self._registry is None:
            from sage_otel.agent.did import JsonFileRegistry

            self._registry = JsonFileRegistry(self.registry_path)
        return self._registry

    def scaled(self, count: int) -> int:
        return max(1, round(count * self.scale))

    async def ready(self) -> None:
        """Set-up done: say READY, wait for GO, start the clock."""
        print("READY", flush=True)
        if self.wait:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        self.tally = Tally()
        self.deadline = time.monotonic() + self.seconds


def raise_nofile(wanted: int) -> None:
    """This process's soft file-descriptor limit up to ``wanted`` (never the server's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


async def amain(args: argparse.Namespace) -> None:
    ctx = Context(
        args.attack,
        args.base,
        args.server_did,
        args.registry,
        args.seconds,
        args.scale,
        args.rate,
        not args.no_wait,
    )
    if args.attack not in SELF_TIMED:
        await ctx.ready()
    await ATTACKS[args.attack](ctx)
    result = ctx.tally.report(args.attack, time.monotonic() - ctx.tally.started, ctx.seconds)
    result["attacker_errors"] = dict(ctx.errors)
    result["attacker_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(args.out).write_text(json.dumps(result, indent=2, default=dict))
    print("DONE", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--base", required=True)
    parser.add_argument("--server-did", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scale", type=float, default=1.0, help="times the connection counts")
    parser.add_argument("--rate", type=float, default=0.0, help="paced attacks: per second")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-wait", action="store_true", help="start without the GO line")
    args = parser.parse_args(argv)
    raise_nofile(8192)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
