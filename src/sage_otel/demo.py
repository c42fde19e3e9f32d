"""``sage-otel demo``: a server agent and N client agents on loopback, doing real SAGE work.

Clients register DIDs on both chains, run handshakes, exchange text and binary messages,
close some sessions and drive others past their message limit, and deliberately inject
failure traffic (replays, tampered and truncated ciphertexts, stale timestamps, handshakes
from unregistered and inactive DIDs, a forged registration) so that every code path runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from .agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    JsonFileRegistry,
    Registry,
    sign_registration,
)
from .agent.errors import PeerError, SageError
from .agent.identity import AgentIdentity, Chain
from .agent.message import seal, signature_base
from .agent.session import SessionLimits, SessionManager
from .agent.transport import MESSAGE_TASK, SESSION_GONE, ClientAgent, Connection, ServerAgent

INJECTIONS = ("replay", "tamper", "corrupt", "truncate", "stale")


@dataclass
class DemoConfig:
    duration: float | None = None
    clients: int = 4
    rate: float = 20.0
    host: str = "127.0.0.1"
    port: int = 0
    registry_path: str | None = None
    session_max_messages: int = 100
    close_after: int = 20
    inject_every: int = 7
    telemetry: bool = True
    metrics_port: int | None = None
    metrics_host: str | None = None
    server_url: str | None = None  # drive this server agent instead of starting one
    server_did: str | None = None
    fast: bool = False  # the server in its own process (sage-otel serve), aiohttp clients


@dataclass
class DemoStats:
    handshakes_ok: int = 0
    handshakes_failed: int = 0
    messages_ok: int = 0
    messages_failed: int = 0
    replays_rejected: int = 0
    sessions_expired: int = 0
    sessions_closed: int = 0
    injected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INJECTIONS, 0))
    unexpected: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def summary(self) -> dict[str, Any]:
        duration = self.duration_s
        return {
            "handshakes_ok": self.handshakes_ok,
            "handshakes_failed": self.handshakes_failed,
            "messages_ok": self.messages_ok,
            "messages_failed": self.messages_failed,
            "replays_rejected": self.replays_rejected,
            "sessions_expired": self.sessions_expired,
            "duration_s": round(duration, 3),
            "messages_per_s": round(self.messages_ok / duration, 1) if duration > 0 else 0.0,
            "sessions_closed": self.sessions_closed,
            "injected": dict(self.injected),
            "unexpected_errors": dict(self.unexpected),
        }

    def unexpected_error(self, error: BaseException) -> None:
        code = getattr(error, "code", type(error).__name__)
        self.unexpected[code] = self.unexpected.get(code, 0) + 1


EXPECTED_CODES = {
    "replay": {"replay_detected"},
    "tamper": {"digest_mismatch", "bad_signature"},
    "corrupt": {"decrypt_failed"},
    "truncate": {"truncated_ciphertext"},
    "stale": {"timestamp_skew"},
}


class Demo:
    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.stats = DemoStats()
        self.registry: Registry = (
            JsonFileRegistry(config.registry_path) if config.registry_path else InMemoryRegistry()
        )
        self.stop = asyncio.Event()
        self.server_identity = AgentIdentity.generate(Chain.SOLANA)
        self.server = ServerAgent(
            self.server_identity,
            DIDResolver(self.registry),
            sessions=SessionManager(SessionLimits(max_messages=config.session_max_messages)),
        )
        self.base_url = ""
        self.agents: list[ClientAgent] = []

    def live_sessions(self) -> tuple[int, int]:
        """Sessions live on the server and on all clients (what the gauge must equal)."""
        return self.server.sessions.active_count, sum(a.sessions.active_count for a in self.agents)

    async def _register(self, identity: AgentIdentity, **extra: Any) -> DIDDocument:
        document = DIDDocument.for_identity(identity, **extra)
        await self.registry.register(document, sign_registration(identity, document))
        return document

    @property
    def server_did(self) -> str:
        return self.config.server_did or str(self.server_identity.did)

    async def setup(self) -> None:
        if self.config.server_url:
            self.base_url = self.config.server_url.rstrip("/")
        else:
            port = await self.server.start(self.config.host, self.config.port)
            self.base_url = f"http://{self.config.host}:{port}"
            await self._register(self.server_identity, name="demo-server", endpoint=self.base_url)
        # A forged registration (signed by the wrong key) must be refused by the registry.
        victim, forger = (
            AgentIdentity.generate(Chain.ETHEREUM),
            AgentIdentity.generate(Chain.ETHEREUM),
        )
        with contextlib.suppress(SageError):
            document = DIDDocument.for_identity(victim)
            await self.registry.register(document, sign_registration(forger, document))

    async def run(self) -> DemoStats:
        await self.setup()
        # One HTTP client per agent, as separate agents have: each keeps its connection, so
        # a server with several workers sees each agent's session on the worker that made it.
        https = [self._http() for _ in range(self.config.clients + 1)]
        workers = [asyncio.create_task(self._client(i, http)) for i, http in enumerate(https[:-1])]
        workers.append(asyncio.create_task(self._rogues(https[-1])))
        try:
            if self.config.duration is None:
                await self.stop.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.config.duration)
        finally:
            self.stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            self.stats.finished = time.monotonic()
            for http in https:
                await http.aclose()
            if not self.config.server_url:
                await self.server.stop()
        return self.stats

    def _http(self) -> Any:
        if self.config.fast:
            from .agent.transport import AiohttpSession

            return AiohttpSession(limit=1)
        return httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=1))

    async def _pace(self, deadline: float) -> float:
        if self.config.rate <= 0:
            await asyncio.sleep(0)
            return time.monotonic()
        deadline += 1.0 / self.config.rate
        delay = deadline - time.monotonic()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        return max(deadline, time.monotonic() - 1.0)

    async def _client(self, index: int, http: httpx.AsyncClient) -> None:
        chain = (Chain.ETHEREUM, Chain.SOLANA)[index % 2]
        identity = AgentIdentity.generate(chain)
        await self._register(identity, name=f"demo-client-{index}")
        agent = ClientAgent(identity, DIDResolver(self.registry), http=http)
        self.agents.append(agent)
        injections = itertools.cycle(
            INJECTIONS[index % len(INJECTIONS) :] + INJECTIONS[: index % len(INJECTIONS)]
        )
        deadline = time.monotonic()
        sessions = 0
        try:
            while not self.stop.is_set():
                conn = await self._connect(agent)
                if conn is None:
                    deadline = await self._pace(deadline)
                    continue
                sessions += 1
                # Odd sessions are closed explicitly; even ones run until the server expires them.
                limit = self.config.close_after if sessions % 2 else None
                await self._converse(agent, conn, limit, injections, index, deadline)
                deadline = time.monotonic()
        finally:
            agent.sessions.close_all()

    async def _connect(self, agent: ClientAgent) -> Connection | None:
        try:
            conn = await agent.connect(self.base_url, self.server_did)
        except SageError as error:
            self.stats.handshakes_failed += 1
            self.stats.unexpected_error(error)
            return None
        self.stats.handshakes_ok += 1
        return conn

    async def _converse(self, agent, conn, limit, injections, index, deadline) -> None:
        sent = 0
        while not self.stop.is_set():
            if limit is not None and sent >= limit:
                with contextlib.suppress(SageError):
                    await agent.close(conn)
                    self.stats.sessions_closed += 1
                return
            sent += 1
            payload: str | bytes = (
                f"hello #{sent} from client {index}" if sent % 2 else os.urandom(64 + sent)
            )
            try:
                if sent % self.config.inject_every == 0:
                    await self._inject(agent, conn, next(injections))
                else:
                    await agent.send(conn, payload)
                    self.stats.messages_ok += 1
            except SageError as error:
                # Ended by a limit, on the server (a PeerError) or here first (the client
                # counts both directions against the same limit): the agent expired it.
                if error.code in SESSION_GONE:
                    self.stats.sessions_expired += 1
                    return
                self.stats.messages_failed += 1
                self.stats.unexpected_error(error)
            deadline = await self._pace(deadline)

    async def _inject(self, agent: ClientAgent, conn: Connection, kind: str) -> None:
        """Send one deliberately bad message; the server must refuse it with the expected code."""
        self.stats.injected[kind] += 1
        if kind == "replay":
            body = agent.message_envelope(conn, "replay me")
            agent.open_reply(conn, await agent.post(conn.base_url, body))
            self.stats.messages_ok += 1
        else:
            body = self._bad_envelope(agent, conn, kind)
        try:
            await agent.post(conn.base_url, body)
        except PeerError as error:
            if error.code not in EXPECTED_CODES[kind]:
                raise
            self.stats.messages_failed += 1
            if kind == "replay":
                self.stats.replays_rejected += 1
            return
        raise SageError(f"server accepted an injected {kind} message", code=f"accepted_{kind}")

    @staticmethod
    def _bad_envelope(agent: ClientAgent, conn: Connection, kind: str) -> dict[str, Any]:
        session = conn.session
        if kind == "stale":
            message = seal(session, "from the past", now_ns=time.time_ns() - 300 * 10**9)
        else:
            message = seal(session, b"x" * 48)
        wire = message.to_wire()
        if kind == "tamper":  # changed in transit: the signed digest no longer matches
            wire["payload"] = base64.b64encode(_flip_last(message.ciphertext)).decode()
        elif kind in ("corrupt", "truncate"):  # a peer holding the keys re-signs bad ciphertext
            bad = _flip_last(message.ciphertext) if kind == "corrupt" else message.ciphertext[:20]
            message = replace(message, ciphertext=bad)
            message = replace(
                message, signature=session.sign(signature_base(message, "POST", "/messages"))
            )
            wire = message.to_wire()
        return agent.envelope(MESSAGE_TASK, session.id, wire["payload"], metadata=wire["metadata"])

    async def _rogues(self, http: httpx.AsyncClient) -> None:
        """Handshakes that must fail: an unregistered DID and a deactivated one."""
        stranger = AgentIdentity.generate(Chain.ETHEREUM)
        retired = AgentIdentity.generate(Chain.SOLANA)
        await self._register(retired, name="retired")
        retired_doc = DIDDocument.for_identity(retired, name="retired", active=False)
        await self.registry.deactivate(retired_doc, sign_registration(retired, retired_doc))
        server_did = self.server_did
        server_doc = await DIDResolver(self.registry).resolve(server_did)
        while not self.stop.is_set():
            for identity in (stranger, retired):
                agent = ClientAgent(identity, _StaticResolver(server_doc), http=http)
                try:
                    await agent.connect(self.base_url, server_did)
                    self.stats.unexpected_error(
                        SageError("rogue handshake accepted", code="accepted_rogue")
                    )
                except PeerError as error:
                    self.stats.handshakes_failed += 1
                    if error.code not in ("unknown_did", "inactive_agent"):
                        self.stats.unexpected_error(error)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


class _StaticResolver(DIDResolver):
    """Lets a rogue client know the server's document without being registered itself."""

    def __init__(self, document: DIDDocument) -> None:
        super().__init__(InMemoryRegistry())
        self._document = document

    async def resolve(self, did: Any) -> DIDDocument:
        return self._document


def _render(stats: DemoStats):
    from rich.table import Table

    table = Table(title="sage-otel demo", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in stats.summary().items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(key, str(value))
    return table


async def run_demo(config: DemoConfig, *, live: bool = False) -> DemoStats:
    demo = Demo(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, demo.stop.set)
    if not live:
        return await demo.run()
    from rich.live import Live

    with Live(_render(demo.stats), refresh_per_second=4, transient=False) as view:
        task = asyncio.create_task(demo.run())
        while not task.done():
            view.update(_render(demo.stats))
            await asyncio.wait({task}, timeout=0.25)
        view.update(_render(demo.stats))
        return task.result()


def _start_telemetry(config: DemoConfig):
    """Telemetry of the demo's own (not under --no-telemetry): /metrics, OTLP if configured."""
    if not config.telemetry:
        return None
    from .instrumentation import INBOUND_TRACE_CONTEXT_ENV
    from .telemetry.setup import configure, otlp_configured

    return configure(
        service_name=None if os.environ.get("OTEL_SERVICE_NAME") else "sage-otel-demo",
        metrics_port=config.metrics_port,
        metrics_host=config.metrics_host,
        # On the fast path, spans only when something exports them (as `sage-otel serve`):
        # an exemplar must lead to a stored trace, and an unexported span is pure cost on
        # every message. In one process, spans always: its /metrics shows every exemplar.
        traces=not config.fast or otlp_configured("TRACES"),
        inbound_trace_context=os.environ.get(INBOUND_TRACE_CONTEXT_ENV) or "parent",
    )


def _start_server_process(config: DemoConfig) -> tuple[Any, str]:
    """``sage-otel serve`` in its own process, so clients and server each have a core."""
    import socket
    import subprocess
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="sage-otel-demo-"))
    registry = config.registry_path or str(workdir / "registry.json")
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind((config.host, 0))
            ports.append(probe.getsockname()[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "sage_otel.cli", "serve", "--host", config.host,
         "--port", str(config.port or ports[0]), "--metrics-port", str(ports[1]),
         "--identity", str(workdir / "server-identity.json"), "--registry", registry],
        stdout=subprocess.PIPE, text=True,
        # The server ends a session where the clients do (as in one process), so sessions a
        # client stops using are not kept on the server until they go idle.
        # The demo's clients are its own: the server continues their traces (one trace per
        # exchange across both processes) unless the user chose otherwise.
        env={
            "OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT": "parent",
            **os.environ,
            "SAGE_OTEL_SESSION_MAX_MESSAGES": str(config.session_max_messages),
        },
    )  # fmt: skip
    line = process.stdout.readline().split()
    fields = dict(part.split("=", 1) for part in line)
    if "did" not in fields:
        process.terminate()
        raise OSError(f"sage-otel serve did not start ({config.host}:{config.port})")
    config.server_url, config.server_did, config.registry_path = (
        fields["url"],
        fields["did"],
        registry,
    )
    return process, fields["metrics"]


def main(config: DemoConfig, *, as_json: bool) -> int:
    live = not as_json and sys.stdout.isatty()
    server_process = None
    if config.fast and not config.server_url:
        try:
            server_process, server_metrics = _start_server_process(config)
        except OSError as error:
            print(f"sage-otel demo: cannot start: {error}", file=sys.stderr)
            return 2
        if not as_json:
            print(f"sage-otel demo: server agent metrics on {server_metrics}", file=sys.stderr)
    try:
        telemetry = _start_telemetry(config)
    except OSError as error:
        print(f"sage-otel demo: cannot start: /metrics: {error.strerror or error}", file=sys.stderr)
        return 2
    if telemetry is not None and telemetry.metrics_address and not as_json:
        host, port = telemetry.metrics_address
        print(f"sage-otel demo: metrics on http://{host}:{port}/metrics", file=sys.stderr)
    try:
        stats = asyncio.run(run_demo(config, live=live))
    except OSError as error:
        reason = error.strerror or error
        print(
            f"sage-otel demo: cannot start: {reason} ({config.host}:{config.port})", file=sys.stderr
        )
        return 2
    finally:
        if telemetry is not None:
            telemetry.shutdown()
        if server_process is not None:
            server_process.terminate()
            server_process.wait(timeout=15)
    summary = stats.summary()
    if as_json:
        print(json.dumps(summary))
    elif not live:
        for key, value in summary.items():
            print(f"{key}: {value}")
    if stats.unexpected:
        print(f"sage-otel demo: unexpected errors: {stats.unexpected}", file=sys.stderr)
        return 1
    return 0


__all__ = ["DemoConfig", "DemoStats", "main", "run_demo"]
