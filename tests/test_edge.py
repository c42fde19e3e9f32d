"""The HTTP edge with no proxy in front: deadlines, header caps, a fair connection cap, and
typed answers for what the HTTP parser refuses (issue 16, Deliver 1 and 6)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sage_otel.agent.did import DIDDocument, DIDResolver, JsonFileRegistry, sign_registration
from sage_otel.agent.edge import EdgeLimits, default_max_connections
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.transport import ClientAgent, ServerAgent
from sage_otel.server import edge_limits
from support import LOOPBACK, free_port

BIN = Path(sys.executable).parent / "sage-otel"
SMALL = EdgeLimits(
    header_timeout=0.5,
    request_timeout=1.5,
    keepalive_timeout=0.5,
    max_header_bytes=4096,
    max_headers=20,
    max_connections=8,
)
POST = b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

Server = Callable[..., Awaitable[tuple[ServerAgent, str]]]


@pytest.fixture
async def edge_port(start_server: Server) -> int:
    server, _url = await start_server(edge=SMALL)
    return server.port


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; what it answered, and after how long."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    started = time.monotonic()
    try:
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    return answer, time.monotonic() - started


async def trickle(port: int, head: bytes, drip: bytes, limit: float = 6.0) -> tuple[bytes, float]:
    """Send ``head``, then ``drip`` every 0.1 s until the server answers and closes."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    started = time.monotonic()
    writer.write(head)
    answer = asyncio.ensure_future(reader.read())
    while time.monotonic() - started < limit:
        await asyncio.wait([answer], timeout=0.1)
        if answer.done():
            break
        writer.write(drip)
    try:
        return await asyncio.wait_for(answer, 5), time.monotonic() - started
    finally:
        writer.close()


def typed(answer: bytes) -> tuple[int, dict]:
    """The status and the typed error of one answer, which must ask for a close."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    assert b"content-type: application/json" in head.lower()
    document = json.loads(body)
    assert document["success"] is False and document["message_id"] == ""
    assert set(document["error"]) == {"code", "category", "message"}
    return status, document["error"]


# -- defaults and settings -------------------------------------------------------------


def test_defaults_are_at_least_as_strict_as_the_go_reference() -> None:
    limits = EdgeLimits()
    assert limits.header_timeout <= 10  # Go's ReadHeaderTimeout in the reference
    assert limits.request_timeout <= 30  # ReadTimeout
    assert limits.keepalive_timeout <= 60  # IdleTimeout
    assert limits.max_header_bytes <= 64 * 1024  # nginx/Envoy range; Go allows 1 MB
    assert limits.max_headers <= 100
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits.max_connections == default_max_connections() <= min(soft - 64, 10_000)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_OTEL_HEADER_TIMEOUT", "2.5")
    monkeypatch.setenv("SAGE_OTEL_MAX_CONNECTIONS", "50")
    assert edge_limits() == EdgeLimits(header_timeout=2.5, max_connections=50)
    for bad in ("ten", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("SAGE_OTEL_MAX_HEADERS", bad)
        with pytest.raises(ValueError, match="SAGE_OTEL_MAX_HEADERS"):
            edge_limits()


def test_serve_refuses_a_bad_limit_before_it_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port()), "--identity", str(tmp_path / "id")],
        env={**os.environ, "SAGE_OTEL_REQUEST_TIMEOUT": "soon"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "SAGE_OTEL_REQUEST_TIMEOUT" in done.stderr
    assert not (tmp_path / "id").exists()


# -- deadlines -------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(
    edge_port: int,
) -> None:
    answer, elapsed = await exchange(edge_port, b"")
    assert answer == b"" and elapsed < SMALL.header_timeout + 1.0


async def test_a_header_that_never_ends_is_answered_408_at_the_header_deadline(
    edge_port: int,
) -> None:
    answer, elapsed = await exchange(edge_port, POST + b"X-Slow: 1\r\n")
    assert typed(answer) == (
        408,
        {
            "code": "header_timeout",
            "category": "timeout",
            "message": "request headers not received in time",
        },
    )
    assert SMALL.header_timeout - 0.1 < elapsed < SMALL.header_timeout + 1.0


async def test_a_header_trickle_does_not_extend_the_deadline(edge_port: int) -> None:
    answer, elapsed = await trickle(edge_port, POST, b"X-Drip: 1\r\n")
    assert typed(answer)[1]["code"] == "header_timeout"
    assert SMALL.header_timeout - 0.1 < elapsed < SMALL.header_timeout + 1.0


async def test_a_slow_body_is_cut_at_the_request_deadline(edge_port: int) -> None:
    """Headers in time, then a byte of body every 0.1 s: the body's deadline still holds."""
    answer, elapsed = await trickle(edge_port, POST + b"Content-Length: 100\r\n\r\n{", b" ")
    assert typed(answer)[1] == {
        "code": "body_timeout",
        "category": "timeout",
        "message": "request body not received in time",
    }
    assert SMALL.request_timeout - 0.1 < elapsed < SMALL.request_timeout + 1.0


async def test_an_idle_keep_alive_connection_is_closed(edge_port: int) -> None:
    answer, elapsed = await exchange(edge_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert elapsed < SMALL.keepalive_timeout + 1.0


# -- header caps -----------------------------------------------------------------------


async def test_too_many_headers_are_refused_431(edge_port: int) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(SMALL.max_headers + 1))
    answer, _ = await exchange(edge_port, POST + headers + b"Content-Length: 2\r\n\r\n{}")
    status, error = typed(answer)
    assert (status, error["code"], error["category"]) == (431, "headers_too_large", "invalid")


async def test_a_complete_header_block_over_the_byte_cap_is_refused_431(edge_port: int) -> None:
    big = b"X-Big: " + b"a" * SMALL.max_header_bytes + b"\r\n"
    answer, _ = await exchange(edge_port, POST + big + b"Content-Length: 2\r\n\r\n{}")
    assert typed(answer)[:1] == (431,)


async def test_headers_just_under_the_caps_are_served(edge_port: int) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(SMALL.max_headers - 4))
    answer, _ = await exchange(
        edge_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_streamed_header_is_cut_as_it_arrives(edge_port: int) -> None:
    _reader, writer = await asyncio.open_connection(LOOPBACK, edge_port)
    writer.write(POST + b"X-Long: ")
    sent = 0
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while sent < 64 << 20:
            writer.write(b"a" * 1024)
            await writer.drain()
            sent += 1024
    writer.close()
    assert sent < 16 << 20  # cut long before 64 MB; the kernel buffers hold the rest


# -- malformed HTTP --------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(POST + b"Content-Length: 1x\r\n\r\n{}", id="bad-content-length"),
        pytest.param(
            POST + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", id="cl-and-te"
        ),
        pytest.param(POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", id="chunk"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", id="header-name"),
    ],
)
async def test_malformed_http_gets_the_typed_400(edge_port: int, request_bytes: bytes) -> None:
    answer, _ = await exchange(edge_port, request_bytes)
    status, error = typed(answer)
    assert (status, error["code"], error["category"]) == (400, "malformed_http", "invalid")


# -- the connection cap ----------------------------------------------------------------


async def legit_traffic(url: str, did: str, client: ClientAgent) -> int:
    """Two handshakes and three messages each; how many of the five calls succeeded."""
    done = 0
    for _ in range(2):
        conn = await client.connect(url, did)
        done += 1
        for index in range(3):
            assert await client.send(conn, f"hello {index}") == f"hello {index}"
            done += 1
    return done


async def test_idle_connections_at_the_cap_make_room_for_a_legit_client(
    start_server: Server, make_client: Callable[..., Awaitable[ClientAgent]]
) -> None:
    patient = EdgeLimits(header_timeout=30, request_timeout=30, max_connections=8)
    server, url = await start_server(edge=patient)
    squatters = [await asyncio.open_connection(LOOPBACK, server.port) for _ in range(20)]
    for index, (_reader, writer) in enumerate(squatters):
        if index % 2:
            writer.write(POST)  # half of them a partial header
    await asyncio.sleep(0.2)
    client = await make_client(chain=Chain.ETHEREUM)
    assert await asyncio.wait_for(legit_traffic(url, str(server.identity.did), client), 10) == 8
    # long before any deadline: the longest idle were evicted, the newest are still open
    assert await asyncio.wait_for(squatters[0][0].read(), 1) == b""
    await asyncio.sleep(0.2)
    assert not squatters[-1][0].at_eof()
    for _reader, writer in squatters:
        writer.close()


async def test_bodies_still_arriving_are_evicted_and_whole_requests_in_flight_are_not(
    start_server: Server, make_client: Callable[..., Awaitable[ClientAgent]]
) -> None:
    """A peer trickling bodies cannot hold the cap (it could, when a head alone made a
    connection busy); a whole request the app is serving is never cut for room."""

    async def slow_echo(_session: object, data: str | bytes) -> str | bytes:
        await asyncio.sleep(1.0)
        return data

    patient = EdgeLimits(header_timeout=30, request_timeout=30, max_connections=6)
    server, url = await start_server(edge=patient, handler=slow_echo)
    client = await make_client(chain=Chain.ETHEREUM)
    conn = await client.connect(url, str(server.identity.did))
    in_flight = asyncio.create_task(client.send(conn, "served whole"))
    await asyncio.sleep(0.3)  # its body has all come: the handler is sleeping on it
    trickling = []
    for _ in range(20):  # far more than the cap: each one's body is still on its way
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(POST + b"Content-Length: 1000\r\n\r\n{")
        trickling.append((reader, writer))
    await asyncio.sleep(0.2)
    answer, _elapsed = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")  # room was made
    assert await asyncio.wait_for(trickling[0][0].read(), 1) == b""  # the oldest went first
    assert await asyncio.wait_for(in_flight, 5) == "served whole"
    for _reader, writer in trickling:
        writer.close()


# -- `sage-otel serve` with its default settings -----------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str, Path]]:
    """``sage-otel serve`` as documented, no edge setting, with 256 file descriptors."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    env.update(NO_PROXY="127.0.0.1,localhost", OTEL_SDK_DISABLED="true")
    env = {k: v for k, v in env.items() if not k.startswith("SAGE_OTEL_")}
    registry = tmp_path / "registry.json"
    process = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--identity",
            str(tmp_path / "id.json"),
            "--registry",
            str(registry),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    try:
        line = process.stdout.readline().split()
        assert line, process.stderr.read() if process.poll() is not None else "no first line"
        did, url = line[0].removeprefix("did="), line[1].removeprefix("url=")
        yield process, did, url, registry
    finally:
        process.terminate()
        process.wait(timeout=15)


async def test_default_serve_holds_memory_while_header_lines_stream(served) -> None:
    process, _did, url, _registry = served
    port = int(url.rsplit(":", 1)[1])
    before = _rss_kib(process.pid)
    line = b"X-Flood: " + b"f" * 1014 + b"\r\n"
    sent = connections = 0
    while sent < 64 << 20:  # 64 MB of header lines, on as many connections as it takes
        connections += 1
        with socket.create_connection((LOOPBACK, int(port))) as flood:
            flood.settimeout(10)
            try:
                flood.sendall(POST)
                while sent < 64 << 20:
                    flood.sendall(line * 64)
                    sent += len(line) * 64
            except (ConnectionResetError, BrokenPipeError):
                pass
    grown = (_rss_kib(process.pid) - before) / 1024
    assert connections > 1 and grown < 8, (connections, grown)  # old code: +64 MB in one


async def test_default_serve_answers_oversized_headers_and_bad_http_typed(served) -> None:
    _process, _did, url, _registry = served
    port = int(url.rsplit(":", 1)[1])
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 400) for i in range(90))  # 36 KB, 90 headers
    answer, _ = await exchange(port, POST + big + b"\r\n")
    assert typed(answer)[:1] == (431,)
    answer, _ = await exchange(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert typed(answer)[1]["code"] == "malformed_http"


async def test_default_serve_keeps_legit_clients_past_idle_connection_floods(served) -> None:
    """The issue's flood scaled to 256 descriptors: more idle and partial-header
    connections than the server can hold; a legit client still gets every call through."""
    _process, did, url, registry = served
    port = int(url.rsplit(":", 1)[1])
    flood = []
    for index in range(300):
        try:
            _reader, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            break
        if index % 2:
            writer.write(POST)
        flood.append(writer)
    await asyncio.sleep(0.5)
    store = JsonFileRegistry(registry)
    identity = AgentIdentity.generate(Chain.ETHEREUM)
    document = DIDDocument.for_identity(identity)
    await store.register(document, sign_registration(identity, document))
    client = ClientAgent(identity, DIDResolver(store))
    try:  # well inside the 10 s header deadline: room was made by evicting, not by waiting
        done = await asyncio.wait_for(legit_traffic(url, did, client), 8)
    finally:
        await client.aclose()
        for writer in flood:
            writer.close()
    assert done == 8


def test_serve_workers_take_the_limits_from_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    env.update(NO_PROXY="127.0.0.1,localhost", SAGE_OTEL_MAX_HEADERS="5")
    port = free_port()
    argv = [str(BIN), "serve", "--workers", "2", "--port", str(port)]
    argv += ["--metrics-port", str(free_port()), "--identity", str(tmp_path / "id.json")]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert process.stdout.readline().startswith(b"did=")
        for count, status in ((5, b"200"), (6, b"431")):
            headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(count - 2))
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers
            with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
                sock.sendall(request + b"\r\n")
                assert sock.recv(64).split(b" ")[1] == status
    finally:
        process.terminate()
        process.wait(timeout=15)


async def test_upgrade_requests_are_logged_once_not_once_each(
    start_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    server, _url = await start_server(edge=EdgeLimits(keepalive_timeout=0.1))
    upgrade = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    for _ in range(10):
        answer, _elapsed = await exchange(server.port, upgrade)
        assert answer.startswith(b"HTTP/1.1 200 ")
    assert sum("upgrade" in r.getMessage().lower() for r in caplog.records) <= 1
