"""Requests to addresses a peer chose are bounded: answer size, total time, redirects,
schemes, destinations, and how many pushes are in flight. Hostile endpoints are raw asyncio
servers on loopback that answer exactly as badly as each test needs."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from conftest import register_identity
from sage_otel.agent.errors import NetworkError, OverloadError, PeerError, RateLimitedError
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.outbound import OutboundPolicy, PushSlots
from sage_otel.agent.session import PeerProfile
from sage_otel.server import outbound_policy
from support import free_port

MB = 1024 * 1024
OK_ANSWER = b'{"success":true}'
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Endpoint:
    """A raw HTTP endpoint on loopback that counts its connections and bytes sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.sent = 0
        self.server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> Endpoint:
        self.host = host
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # the client went away: what these endpoints expect
        except asyncio.CancelledError:
            return  # stopped at teardown; asyncio's stream callback would log a cancel
        writer.close()

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.sent += len(data)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            if hasattr(self.server, "close_clients"):  # Python 3.13+: also the held ones
                self.server.close_clients()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return await reader.readexactly(length)


def answer(body: bytes = OK_ANSWER, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


@pytest.fixture
async def endpoint() -> AsyncIterator[Callable[..., Awaitable[Endpoint]]]:
    started: list[Endpoint] = []

    async def start(handler: Handler, host: str = "127.0.0.1") -> Endpoint:
        started.append(await Endpoint(handler).start(host))
        return started[-1]

    yield start
    for each in started:
        await each.stop()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def refused(post: Awaitable[object]) -> NetworkError:
    with pytest.raises(NetworkError) as info:
        await asyncio.wait_for(post, 30)
    return info.value


# -- answer size, deadline, redirects, schemes ----------------------------------------------


async def test_an_endless_chunked_answer_is_cut_at_the_cap_and_memory_stays_flat(
    endpoint, make_client
) -> None:
    async def endless(reader, writer) -> None:
        await read_request(reader)
        await hostile.write(writer, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"x" * (64 * 1024)
        while hostile.sent < 200 * MB:
            await hostile.write(writer, b"%x\r\n%s\r\n" % (len(chunk), chunk))

    hostile = await endpoint(endless)
    client = await make_client()
    assert await client.post((await _served(endpoint)).url, b"{}") is None  # warm the client
    peak, start = 0, rss_bytes()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    error = await refused(client.post(hostile.url, b"{}"))
    await asyncio.sleep(0.2)  # let the endpoint notice the closed connection
    sampler.cancel()
    assert error.code == "answer_too_large"
    assert hostile.sent < 16 * MB  # the client stopped reading and closed
    assert peak - start < 4 * MB  # 200 MB were on offer


async def test_a_declared_length_over_the_cap_is_refused_without_reading(
    endpoint, make_client
) -> None:
    async def big(reader, writer) -> None:
        await read_request(reader)
        await hostile.write(writer, answer(b"{" + b" " * (MB - 2) + b"}"))

    hostile = await endpoint(big)
    client = await make_client()
    assert (await refused(client.post(hostile.url, b"{}"))).code == "answer_too_large"


@pytest.mark.parametrize("where", ["body", "headers"])
async def test_a_trickling_answer_ends_at_the_total_deadline(endpoint, make_client, where) -> None:
    """One byte every 0.25 s: no single read waits long, the whole request still ends."""

    async def trickle(reader, writer) -> None:
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
        await hostile.write(writer, head + (b"\r\n" if where == "body" else b""))
        for index in range(10_000):
            await asyncio.sleep(0.25)
            piece = b"1\r\nx\r\n" if where == "body" else b"x-slow: %d\r\n" % index
            await hostile.write(writer, piece)

    hostile = await endpoint(trickle)
    client = await make_client(outbound=OutboundPolicy(timeout=1.5))
    began = time.monotonic()
    error = await refused(client.post(hostile.url, b"{}"))
    assert error.code == "request_timeout"
    assert 1.4 < time.monotonic() - began < 3.0


async def test_a_redirect_is_not_followed(endpoint, make_client) -> None:
    async def elsewhere_handler(reader, writer) -> None:
        await read_request(reader)
        await elsewhere.write(writer, answer())

    elsewhere = await endpoint(elsewhere_handler)

    async def redirect(reader, writer) -> None:
        await read_request(reader)
        location = f"location: {elsewhere.url}/messages\r\n".encode()
        await hostile.write(writer, answer(b"", "302 Found", location))

    hostile = await endpoint(redirect)
    client = await make_client()
    assert (await refused(client.post(hostile.url, b"{}"))).code == "redirect_refused"
    assert hostile.connections == 1 and elsewhere.connections == 0


@pytest.mark.parametrize(
    "template",
    ["ftp://127.0.0.1:{port}", "file:///etc/passwd#{port}", "unix:///tmp/sage-{port}.sock",
     "http+unix://%2Ftmp%2Fsage-{port}.sock", "ws://127.0.0.1:{port}", "//127.0.0.1:{port}"],
)  # fmt: skip
async def test_only_http_and_https_are_fetched_and_nothing_else_connects(
    endpoint, make_client, template
) -> None:
    async def record(reader, writer) -> None:
        await reader.read(1)

    listener = await endpoint(record)
    client = await make_client()
    error = await refused(client.post(template.format(port=listener.port), b"{}"))
    assert error.code == "scheme_refused"
    await asyncio.sleep(0.05)
    assert listener.connections == 0


# -- destinations ---------------------------------------------------------------------------


def _served(endpoint, host: str = "127.0.0.1") -> Awaitable[Endpoint]:
    """An endpoint that answers every request with a plain success."""

    async def ok(reader, writer) -> None:
        await read_request(reader)
        writer.write(answer())
        await writer.drain()

    return endpoint(ok, host)


def _networks(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


async def test_a_denied_address_is_refused_without_connecting_or_naming_it(
    endpoint, make_client
) -> None:
    target = await _served(endpoint)
    target_denied = await _served(endpoint, "127.0.0.2")
    client = await make_client(outbound=OutboundPolicy(deny=_networks("127.0.0.2/32")))
    error = await refused(client.post(target_denied.url, b"{}"))
    assert error.code == "destination_refused" and "127.0.0.2" not in str(error)
    assert target_denied.connections == 0
    assert await client.post(target.url, b"{}") is None  # 127.0.0.1 is not denied


async def test_a_name_is_checked_by_the_addresses_it_resolves_to(endpoint, make_client) -> None:
    target = await _served(endpoint)
    policy = OutboundPolicy(deny=_networks("127.0.0.0/8", "::1/128"))
    client = await make_client(outbound=policy)
    error = await refused(client.post(f"http://localhost:{target.port}", b"{}"))
    assert error.code == "destination_refused" and "127.0.0.1" not in str(error)
    assert target.connections == 0


async def test_the_unspecified_address_is_refused_by_default(endpoint, make_client) -> None:
    """0.0.0.0 reaches this host on Linux: a classic way around a loopback filter."""
    target = await _served(endpoint)
    client = await make_client()
    error = await refused(client.post(f"http://0.0.0.0:{target.port}", b"{}"))
    assert error.code == "destination_refused"
    assert target.connections == 0


async def test_an_allow_list_excludes_every_other_address(endpoint, make_client) -> None:
    target = await _served(endpoint)
    allowed = await _served(endpoint, "127.0.0.2")
    client = await make_client(outbound=OutboundPolicy(allow=_networks("127.0.0.2/32")))
    assert await client.post(allowed.url, b"{}") is None
    for url in (target.url, f"http://localhost:{target.port}"):
        assert (await refused(client.post(url, b"{}"))).code == "destination_refused"
    assert target.connections == 0


@pytest.mark.parametrize(
    ("address", "permitted"),
    [
        ("169.254.169.254", False),  # cloud metadata
        ("::ffff:169.254.169.254", False),  # the same, IPv4-mapped
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("::", False),
        ("224.0.0.1", False),
        ("ff02::1", False),
        ("255.255.255.255", False),
        ("not-an-address", False),
        ("127.0.0.1", True),  # loopback and private ranges stay usable by default
        ("::1", True),
        ("10.1.2.3", True),
        ("192.168.1.1", True),
        ("93.184.216.34", True),
    ],
)
def test_the_default_policy(address: str, permitted: bool) -> None:
    assert OutboundPolicy().permits(address) is permitted


def test_a_denial_wins_over_an_allowance_and_link_local_stays_denied() -> None:
    policy = OutboundPolicy(
        allow=_networks("10.0.0.0/8", "169.254.0.0/16"), deny=_networks("10.9.0.0/16")
    )
    assert policy.permits("10.1.0.1") and not policy.permits("10.9.0.1")
    assert not policy.permits("169.254.169.254") and not policy.permits("192.168.0.1")


# -- the server's pushes --------------------------------------------------------------------


async def _go_session(start_server, make_client, registry, endpoint_url: str, **server_kwargs):
    """A go-profile session whose peer publishes ``endpoint_url`` as its endpoint."""
    identity = AgentIdentity.generate(Chain.SOLANA)
    await register_identity(registry, identity, endpoint=endpoint_url)
    client = await make_client(identity, registered=False)
    server, url = await start_server(AgentIdentity.generate(Chain.ETHEREUM), **server_kwargs)
    await register_identity(registry, server.identity)
    conn = await client.connect(url, str(server.identity.did), profile=PeerProfile.GO)
    return server, client, conn


async def test_pushes_to_an_endpoint_that_never_answers_are_bounded_and_refused_429(
    start_server, make_client, registry, endpoint
) -> None:
    release = asyncio.Event()

    async def stall(reader, writer) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(answer())
        await writer.drain()

    hostile = await endpoint(stall)
    server, client, conn = await _go_session(start_server, make_client, registry, hostile.url)
    per_peer = server.outbound.per_peer
    envelopes = [client.message_envelope(conn, f"m{i}") for i in range(50)]
    outcomes = await asyncio.gather(
        *(client.post(conn.base_url, envelope) for envelope in envelopes), return_exceptions=True
    )
    accepted = [e for e, outcome in zip(envelopes, outcomes) if outcome is None]
    backlog = [e for e, outcome in zip(envelopes, outcomes) if isinstance(outcome, PeerError)]
    assert len(accepted) == per_peer and len(backlog) == 50 - per_peer
    assert all(
        o.code == "push_backlog" and o.http_status == 429
        for o in outcomes
        if isinstance(o, PeerError)
    )
    await asyncio.sleep(0.2)
    assert hostile.connections == per_peer and len(server._pushes) == per_peer
    assert server.push_slots.in_flight == per_peer

    # The answer says when to come back; the refused message was not consumed.
    async with httpx.AsyncClient(trust_env=False) as http:
        raw = await http.post(
            conn.base_url + "/messages",
            content=json.dumps(backlog[0]).encode(),
            headers={"content-type": "application/json"},
        )
    assert raw.status_code == 429 and int(raw.headers["retry-after"]) >= 1
    release.set()
    for _ in range(200):
        if server.push_slots.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert server.push_slots.in_flight == 0 and not server._pushes
    assert await client.post(conn.base_url, backlog[0]) is None  # same message, now accepted


def test_push_slots_hold_per_endpoint_and_in_total() -> None:
    slots = PushSlots(per_peer=2, total=3)
    first = slots.acquire("http://a.example:80/x")
    slots.acquire("HTTP://A.example/y")  # the same endpoint: scheme, host and port
    with pytest.raises(RateLimitedError) as info:
        slots.acquire("http://a.example:80")
    assert info.value.code == "push_backlog" and info.value.http_status == 429
    first.release()
    first.release()  # twice is harmless
    assert slots.in_flight == 1
    slots.acquire("http://b.example")
    slots.acquire("http://c.example")
    with pytest.raises(OverloadError):
        slots.acquire("http://d.example")  # the total is reached, nobody holds 2 more than d
    assert slots.in_flight == 3


class FakeTask:
    """Stands for a push task: records that it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_a_full_total_evicts_the_oldest_push_of_the_biggest_holder() -> None:
    slots = PushSlots(per_peer=4, total=6)
    a1, a2, a3 = (slots.acquire("http://a.example") for _ in range(3))
    b1, b2 = (slots.acquire("http://b.example") for _ in range(2))
    c1 = slots.acquire("http://c.example")
    tasks = {slot: FakeTask() for slot in (a1, a3, b1, b2, c1)}  # a2: a direct push(), no task
    for slot, task in tasks.items():
        slot.attach(task)

    d1 = slots.acquire("http://d.example")  # a holds 3 >= 0 + 2: its oldest goes
    assert a1.evicted and tasks[a1].cancelled and slots.in_flight == 6
    assert (slots.held("http://a.example"), slots.held("http://d.example")) == (2, 1)
    a1.release()  # the cancelled task's done-callback: harmless
    assert slots.in_flight == 6

    for requester in ("http://d.example", "http://c.example"):  # they hold 1; a and b hold 2
        with pytest.raises(OverloadError) as info:  # full for everyone, nothing to evict: 503
            slots.acquire(requester)
        assert info.value.code == "push_backlog" and info.value.http_status == 503

    e1 = slots.acquire("http://e.example")  # a and b hold 2: a's push is the older
    assert a2.evicted and not b1.evicted and slots.held("http://a.example") == 1
    late = FakeTask()
    a2.attach(late)  # a task attached after its slot was evicted is cancelled at once
    assert late.cancelled
    with pytest.raises(OverloadError):
        slots.acquire("http://e.example")  # b holds 2 < 1 + 2
    f1 = slots.acquire("http://f.example")
    assert b1.evicted and tasks[b1].cancelled and not tasks[b2].cancelled
    with pytest.raises(OverloadError):
        slots.acquire("http://g.example")  # everyone holds 1: nothing to evict
    assert not any(tasks[slot].cancelled for slot in (a3, b2, c1))

    live = (a3, b2, c1, d1, e1, f1)
    assert slots.in_flight == len(live)
    for slot in (a1, a2, b1, *live, *live):
        slot.release()
        assert slots.in_flight >= 0
    assert slots.in_flight == 0 and not slots._by_endpoint
    assert not any(slot.evicted for slot in live)


async def test_endpoints_that_never_answer_cannot_starve_a_legit_go_peer(
    start_server, make_client, registry, endpoint, caplog
) -> None:
    """Two hostile peers keep the total full of pushes that hang; a legit peer's replies
    still go out, because each of its pushes evicts the oldest of a much bigger holder."""
    policy = OutboundPolicy(total=8, per_peer=4)
    server, url = await start_server(AgentIdentity.generate(Chain.ETHEREUM), outbound=policy)
    await register_identity(registry, server.identity)
    hang = asyncio.Event()  # never set: the hostile endpoints read and never answer

    async def stall(reader, writer) -> None:
        await read_request(reader)
        await hang.wait()

    async def go_peer(endpoint_url: str | None):
        identity = AgentIdentity.generate(Chain.SOLANA)
        client = await make_client(identity, registered=False)
        if endpoint_url is None:  # legit: it listens for the server's pushes
            endpoint_url = f"http://127.0.0.1:{await client.listen()}"
        await register_identity(registry, identity, endpoint=endpoint_url)
        conn = await client.connect(url, str(server.identity.did), profile=PeerProfile.GO)
        return client, conn

    hostile = [await endpoint(stall, host) for host in ("127.0.0.2", "127.0.0.3")]
    attackers = [await go_peer(each.url) for each in hostile]

    async def keep_full(client, conn) -> None:
        while True:
            with contextlib.suppress(PeerError):
                await client.send(conn, "hog")
            await asyncio.sleep(0.005)

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(2000):  # generous: a loaded machine refills the total slowly
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not in 20 s")

    def full() -> bool:
        return server.push_slots.in_flight == policy.total

    def hostile_connections() -> int:
        return sum(each.connections for each in hostile)

    flooding = [asyncio.create_task(keep_full(*attacker)) for attacker in attackers]
    rounds = 10
    try:
        client, conn = await go_peer(None)
        for index in range(rounds):
            await until(full)  # the attackers refilled what the last message evicted
            assert await client.send(conn, f"legit {index}") is None
            assert await client.receive(conn, timeout=5) == f"legit {index}".encode()
            assert server.push_slots.in_flight <= policy.total
        assert all(server.push_slots.held(each.url) <= policy.per_peer for each in hostile)
        # Each legit message evicted one hanging push, which the attackers then replaced.
        await until(lambda: hostile_connections() >= policy.total + rounds)
        assert hostile_connections() == policy.total + rounds
        assert len(server._pushes) <= policy.total  # evicted push tasks are gone
    finally:
        for task in flooding:
            task.cancel()
        await asyncio.gather(*flooding, return_exceptions=True)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_push_to_a_denied_endpoint_never_leaves_and_the_sender_still_gets_its_answer(
    start_server, make_client, registry, endpoint
) -> None:
    listener = await _served(endpoint)
    policy = OutboundPolicy(deny=_networks("127.0.0.0/8"))
    server, client, conn = await _go_session(
        start_server, make_client, registry, listener.url, outbound=policy
    )
    assert await client.send(conn, "hello") is None
    await asyncio.sleep(0.3)
    assert listener.connections == 0 and server.push_slots.in_flight == 0


async def test_a_legit_go_exchange_works_under_an_allow_list(
    start_server, make_client, registry
) -> None:
    identity = AgentIdentity.generate(Chain.SOLANA)
    client = await make_client(identity, registered=False)
    port = await client.listen()
    await register_identity(registry, identity, endpoint=f"http://127.0.0.1:{port}")
    policy = OutboundPolicy(allow=_networks("127.0.0.1/32"))
    server, url = await start_server(outbound=policy)
    conn = await client.connect(url, str(server.identity.did), profile=PeerProfile.GO)
    for text in ("one", "two", "three"):
        assert await client.send(conn, text) is None
    assert [await client.receive(conn, timeout=5) for _ in range(3)] == [b"one", b"two", b"three"]
    await server.push(server.sessions.get(conn.session.id), b"unprompted")
    assert await client.receive(conn, timeout=5) == b"unprompted"
    assert server.push_slots.in_flight == 0


# -- configuration --------------------------------------------------------------------------


def test_the_policy_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SAGE_OTEL_OUTBOUND_ALLOW", "10.0.0.0/8, 192.168.1.7")
    monkeypatch.setenv("SAGE_OTEL_OUTBOUND_DENY", "10.9.0.0/16")
    monkeypatch.setenv("SAGE_OTEL_OUTBOUND_MAX_ANSWER", "1000")
    monkeypatch.setenv("SAGE_OTEL_OUTBOUND_TIMEOUT", "2.5")
    monkeypatch.setenv("SAGE_OTEL_OUTBOUND_PER_PEER", "2")
    monkeypatch.setenv("SAGE_OTEL_OUTBOUND_TOTAL", "9")
    policy = outbound_policy()
    assert policy.allow == _networks("10.0.0.0/8", "192.168.1.7/32")
    assert policy.deny == _networks("10.9.0.0/16")
    assert (policy.max_answer_bytes, policy.timeout, policy.per_peer, policy.total) == (
        1000,
        2.5,
        2,
        9,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAGE_OTEL_OUTBOUND_ALLOW", "10.0.0.0/33"),
        ("SAGE_OTEL_OUTBOUND_DENY", "localhost"),
        ("SAGE_OTEL_OUTBOUND_ALLOW", "10.0.0.1/8"),  # host bits set: a typo, not a network
        ("SAGE_OTEL_OUTBOUND_PER_PEER", "0"),
        ("SAGE_OTEL_OUTBOUND_TIMEOUT", "soon"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        outbound_policy()


def test_serve_with_a_bad_allow_list_is_one_line_and_exit_2_before_any_side_effect(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    identity = tmp_path / "id.json"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "sage-otel"), "serve", "--port", str(free_port()),
         "--metrics-port", str(free_port()), "--identity", str(identity),
         "--registry", str(tmp_path / "registry.json")],
        capture_output=True, text=True, timeout=60,
        env={**env, "SAGE_OTEL_OUTBOUND_ALLOW": "10.0.0.0/8,not-a-network"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "SAGE_OTEL_OUTBOUND_ALLOW" in done.stderr
    assert not identity.exists() and not (tmp_path / "registry.json").exists()
