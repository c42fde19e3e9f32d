"""``sage-otel demo``: a server agent and N client agents on loopback, doing real SAGE work.

Clients register DIDs on both chains, run handshakes, exchange text and binary messages,
close some sessions and drive others past their message limit, and deliberately inject
failure traffic (replays, tampered and truncated ciphertexts, stale timestamps, handshakes
from unregistered and inactive DIDs, a forged registration) so that every code path runs.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
            # A request to a server that stopped answering must not hold the exit for its
            # whole timeout: what has not finished within WIND_DOWN is cancelled.
            _, late = await asyncio.wait(workers, timeout=WIND_DOWN)
            for worker in late:
                worker.cancel()
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
        # The run is over: end the session on the server too, as an agent that leaves does
        # (a server the demo did not start would otherwise count it active until it idles out).
        with contextlib.suppress(SageError):
            await agent.close(conn)
            self.stats.sessions_closed += 1

    async def _inject(self, agent: ClientAgent, conn: Connection, kind: str) -> None:
        """Send one deliberately bad message; the server must refuse it with the expected code.
        It counts as injected once answered (a run that ends meanwhile does not count it)."""
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
            self.stats.injected[kind] += 1
            self.stats.messages_failed += 1
            if kind == "replay":
                self.stats.replays_rejected += 1
            return
        self.stats.injected[kind] += 1
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


# Seconds. A status line this often when no live table is shown (CI logs, systemd).
PROGRESS_INTERVAL = 5.0
# `sage-otel serve` waits as long for its own port before it gives up.
START_TIMEOUT = 60.0
# After the run: in-flight requests may finish within WIND_DOWN, then they are cancelled;
# the server child gets STOP_GRACE from SIGTERM to SIGKILL; the child and the demo's own
# telemetry stop within STOP_BUDGET in all, so that SIGTERM ends the demo within 6 s even
# when the collector never answers.
WIND_DOWN = 1.0
STOP_GRACE = 2.0
STOP_BUDGET = 4.0
WATCH_INTERVAL = 0.25
_EARLY_LINES = 200  # what the child wrote to stderr while starting, kept to say why it failed


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM before the run started, or a second one: stop now.

    A KeyboardInterrupt, so that asyncio lets it out of the event loop as it does Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT, SIGTERM and SIGHUP over the demo's whole life, not just its event loop.

    During the run the first one ends it as ``--duration`` does (the summary, the usual exit
    status); before the run, or a second time, it raises :class:`Interrupted`. While the demo
    cleans up they are ignored: the clean-up is bounded (``STOP_BUDGET``) and must finish, or
    the server child and its key would be left behind.
    """

    WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal closed

    def __init__(self, *, ignore_after: bool = False) -> None:
        self._ignore_after = ignore_after  # on leaving, ignore them instead of restoring
        self._previous: dict[int, Any] = {}
        self._on_stop: Callable[[], None] | None = None
        self._stopping = False
        self._held = False
        self._deferring = False
        self._deferred: int | None = None

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.WATCHED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self._ignore_after else handler)

    def on_stop(self, callback: Callable[[], None] | None) -> None:
        """What the first signal does while the run is on (None: the run is over)."""
        self._on_stop = callback

    def hold(self) -> None:
        """Ignore both signals from now on (the clean-up has begun)."""
        self._held = True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal arriving inside the block is acted on when it ends, so that a child
        process being started is always known to the clean-up."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        pending, self._deferred = self._deferred, None
        if pending is not None:
            self._handle(pending, None)

    def _handle(self, signum: int, _frame: object) -> None:
        if self._held:
            return
        if self._deferring:
            self._deferred = self._deferred or signum
            return
        if self._on_stop is not None and not self._stopping:
            self._stopping = True
            self._on_stop()
            return
        # Stopping at once: the tasks and connections left behind are no news (asyncio would
        # log each one as it is collected); the one line is main()'s.
        logging.getLogger("asyncio").disabled = True
        raise Interrupted(signum)


class ServerStartError(Exception):
    """``sage-otel serve`` did not come up; ``str()`` says why, in one line."""


class ServerChild:
    """``sage-otel serve`` for the default (``--fast``) demo, in its own process group.

    It creates its identity in a private temporary directory and removes the file as soon
    as it has loaded it (``DEMO_CHILD_ENV``: the key never outlives the child on disk); the
    registry, unless ``--registry`` names one, lives there too, and :meth:`stop` removes the
    directory. After its first line, the child's output
    is read by two threads so that it never blocks on a full pipe: stdout goes on to the
    demo's stdout (the console exporters' spans under ``opentelemetry-instrument``), a whole
    top-level block at a time so that the two processes' JSON never interleaves; stderr goes
    to the demo's stderr until the child is being stopped. What the child wrote to stderr
    while starting is shown only when it fails to start, as the reason.

    Under ``opentelemetry-instrument`` the child inherits the auto-instrumentation environment
    and is instrumented as the demo is; ``sage-otel serve`` then sets up no telemetry of its
    own (:func:`sage_otel.server.auto_instrumented`).
    """

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.workdir: Path | None = None
        self.process: subprocess.Popen[str] | None = None
        self.metrics_url: str | None = None
        self.exit_status: int | None = None  # when it exited while the run was on
        self._announced: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._started = False
        self._quiet = False
        self._early: collections.deque[str] = collections.deque(maxlen=_EARLY_LINES)
        self._pumps: list[threading.Thread] = []

    def start(self, signals: Signals) -> None:
        """Start the child and wait for its first line; raises :class:`ServerStartError`."""
        from .server import DEMO_CHILD_ENV

        config = self.config
        # The server ends a session where the clients do (as in one process), so sessions a
        # client stops using are not kept on the server until they go idle.
        # The demo's clients are its own: the server continues their traces (one trace per
        # exchange across both processes) unless the user chose otherwise.
        env = {
            "OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT": "parent",
            **os.environ,
            "SAGE_OTEL_SESSION_MAX_MESSAGES": str(config.session_max_messages),
            DEMO_CHILD_ENV: "1",  # a throwaway key; its stdin, held open here, ends with us
        }
        with signals.deferred():  # the directory and the child, both known to stop()
            self.workdir = Path(tempfile.mkdtemp(prefix="sage-otel-demo-"))
            registry = config.registry_path or str(self.workdir / "registry.json")
            argv = [
                sys.executable, "-m", "sage_otel.cli", "serve", "--host", config.host,
                "--port", str(config.port or _free_port(config.host)),
                "--metrics-port", str(_free_port(config.host)),
                "--identity", str(self.workdir / "server-identity.json"), "--registry", registry,
            ]  # fmt: skip
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                encoding="utf-8",
                errors="replace",
                start_new_session=True,  # a terminal's Ctrl-C reaches the demo alone
            )
        for pump, stream in (
            (self._pump_stdout, self.process.stdout),
            (self._pump_stderr, self.process.stderr),
        ):
            thread = threading.Thread(target=pump, args=(stream,), daemon=True)
            thread.start()
            self._pumps.append(thread)
        try:
            line = self._announced.get(timeout=START_TIMEOUT)
        except queue.Empty:
            raise ServerStartError(
                f"sage-otel serve did not answer within {START_TIMEOUT:g} s"
            ) from None
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if not {"did", "url"} <= set(fields):
            raise ServerStartError(self._failure())
        with self._lock:
            self._started = True
            self._early.clear()
        config.server_url, config.server_did = fields["url"], fields["did"]
        config.registry_path = registry
        metrics = fields.get("metrics", "off")
        self.metrics_url = None if metrics == "off" else metrics

    def _failure(self) -> str:
        """Why the child did not start: the last line it wrote to stderr (``serve``'s own
        one-line reason), else its exit status."""
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._pumps[1].join(timeout=1)
        with self._lock:
            lines = [line.strip() for line in self._early if line.strip()]
        if lines:
            reason = lines[-1].removeprefix("sage-otel serve: ")
            return reason.removeprefix("cannot start: ").removeprefix("error: ")
        status = self.process.poll()
        if status is None:
            return "sage-otel serve closed its output"
        return f"sage-otel serve exited with status {status}"

    def _pump_stdout(self, stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._announced.put(stream.readline())
            block: list[str] = []
            for line in stream:
                block.append(line)
                # A console exporter's object ends with a line at column 0 that opens nothing.
                if line[:1].isspace() or line.rstrip().endswith(("{", "[")):
                    continue
                _write(sys.stdout, "".join(block))
                block.clear()
            if block:
                _write(sys.stdout, "".join(block))
        self._announced.put("")  # EOF before the first line: start() learns at once

    def _pump_stderr(self, stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                with self._lock:
                    if self._quiet:
                        continue
                    if not self._started:
                        self._early.append(line)
                        continue
                _write(sys.stderr, line)

    async def watch(self, stop: asyncio.Event) -> None:
        """End the run when the child exits under it; its status is then the demo's news."""
        assert self.process is not None
        while not stop.is_set():
            status = self.process.poll()
            if status is not None:
                self.exit_status = status
                stop.set()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM to its process group, SIGKILL after ``grace`` s; then its directory goes."""
        with self._lock:
            self._quiet = True  # a child being stopped has nothing more to tell
        process = self.process
        if process is not None:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal_group(process, signal.SIGKILL)
                    process.wait()
            for pump in self._pumps:
                pump.join(timeout=1)
            for stream in (process.stdin, process.stdout, process.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _signal_group(process: subprocess.Popen[str], signum: int) -> None:
    """``signum`` to the child's process group (it leads it), while it is not yet reaped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _write(stream: Any, text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


def status_line(stats: DemoStats) -> str:
    """The progress line: what the summary will say, so far."""
    return (
        f"sage-otel demo: {stats.duration_s:.0f}s handshakes_ok={stats.handshakes_ok} "
        f"handshakes_failed={stats.handshakes_failed} messages_ok={stats.messages_ok} "
        f"messages_failed={stats.messages_failed} "
        f"unexpected_errors={sum(stats.unexpected.values())}"
    )


async def _progress(demo: Demo, interval: float) -> None:
    while not demo.stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(demo.stop.wait(), interval)
            return
        print(status_line(demo.stats), file=sys.stderr, flush=True)


async def run_demo(
    config: DemoConfig,
    *,
    live: bool = False,
    signals: Signals | None = None,
    child: ServerChild | None = None,
    progress: float | None = None,
) -> DemoStats:
    """Run the demo until ``config.duration`` or a signal.

    ``progress``: seconds between status lines on stderr (None: none). ``child``: the
    server process, whose exit ends the run. Without ``signals`` SIGINT and SIGTERM end the
    run through the event loop."""
    demo = Demo(config)
    loop = asyncio.get_running_loop()
    if signals is None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, demo.stop.set)
    else:
        signals.on_stop(lambda: loop.call_soon_threadsafe(demo.stop.set))
    helpers = []
    if progress:
        helpers.append(asyncio.create_task(_progress(demo, progress)))
    if child is not None:
        helpers.append(asyncio.create_task(child.watch(demo.stop)))
    try:
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
    finally:
        if signals is not None:
            signals.on_stop(None)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)


def _auto_instrumented() -> bool:
    from .server import auto_instrumented

    return auto_instrumented()


def _start_telemetry(config: DemoConfig) -> Any:
    """Telemetry of the demo's own: /metrics, OTLP if configured. None under
    ``--no-telemetry``, and under ``opentelemetry-instrument`` (its providers are this
    process's; a second set would only fight them)."""
    if not config.telemetry or _auto_instrumented():
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


def _shut_down(child: ServerChild | None, telemetry: Any) -> None:
    """The server child first (its ports and key go at once), then the demo's telemetry (its
    own, or ``opentelemetry-instrument``'s), all within ``STOP_BUDGET``: a collector that
    never answers cannot hold the exit."""
    deadline = time.monotonic() + STOP_BUDGET
    if child is not None:
        child.stop(STOP_GRACE)
    remaining = max(0.5, deadline - time.monotonic())
    if telemetry is None:
        _stop_global_providers(remaining)
        return
    telemetry.shutdown(timeout=remaining)
    # Stopped (or given up on): not again at exit, where a stuck one would only complain.
    for provider in (telemetry.tracer_provider, telemetry.meter_provider):
        atexit.unregister(provider.shutdown)


def _stop_global_providers(timeout: float) -> None:
    """Under ``opentelemetry-instrument``: its SDK providers flushed and stopped now, not at
    interpreter exit, so that the summary comes after every span (the last line of stdout
    under a console exporter) and a collector that never answers costs at most ``timeout``.
    """
    if "opentelemetry.sdk.trace" not in sys.modules:
        return  # nothing set up an SDK here
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    providers = [
        provider
        for provider in (trace.get_tracer_provider(), metrics.get_meter_provider())
        if isinstance(provider, (TracerProvider, MeterProvider))
    ]

    def stop(provider: Any) -> None:
        if isinstance(provider, MeterProvider):
            provider.shutdown(timeout_millis=timeout * 1000)
        else:
            provider.shutdown()

    stops = [threading.Thread(target=stop, args=(p,), daemon=True) for p in providers]
    deadline = time.monotonic() + timeout
    for thread in stops:
        thread.start()
    for thread in stops:
        thread.join(max(0.0, deadline - time.monotonic()))
    # Stopped (or given up on): not again at exit, where a stuck one would only complain.
    for provider in providers:
        atexit.unregister(provider.shutdown)


def main(config: DemoConfig, *, as_json: bool) -> int:
    """The demo from the command line: 0 on a clean run (also when SIGINT or SIGTERM ended
    it), 1 if anything unexpected failed, 2 when it cannot start, 128 + the signal's number
    when one arrived before the run or a second one arrived.

    Every exit path stops the server child (SIGTERM to its process group, SIGKILL after
    ``STOP_GRACE``) and removes its temporary directory."""
    live = not as_json and sys.stdout.isatty()
    telemetry = child = None
    # The process ends with main(): a signal after the clean-up must not turn the status it
    # has decided (and the line it printed) into a death by that signal.
    with Signals(ignore_after=True) as signals:
        try:
            try:
                telemetry = _start_telemetry(config)
            except OSError as error:
                reason = error.strerror or error
                print(f"sage-otel demo: cannot start: /metrics: {reason}", file=sys.stderr)
                return 2
            # Also under --json: stderr, so the last stdout line stays the summary.
            if telemetry is not None and telemetry.metrics_address:
                host, port = telemetry.metrics_address
                print(f"sage-otel demo: metrics on http://{host}:{port}/metrics", file=sys.stderr)
            if config.fast and not config.server_url:
                child = ServerChild(config)
                child.start(signals)
                if child.metrics_url:
                    print(
                        f"sage-otel demo: server agent metrics on {child.metrics_url}",
                        file=sys.stderr,
                    )
            stats = asyncio.run(
                run_demo(
                    config,
                    live=live,
                    signals=signals,
                    child=child,
                    progress=None if live else PROGRESS_INTERVAL,
                )
            )
        except ServerStartError as error:
            print(f"sage-otel demo: cannot start: server agent: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            reason = error.strerror or error
            print(
                f"sage-otel demo: cannot start: {reason} ({config.host}:{config.port})",
                file=sys.stderr,
            )
            return 2
        except Interrupted as stop:
            print(f"sage-otel demo: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
            return 128 + stop.signum
        finally:
            signals.hold()
            _shut_down(child, telemetry)
    summary = stats.summary()
    if as_json:
        print(json.dumps(summary))
    elif not live:
        for key, value in summary.items():
            print(f"{key}: {value}")
    if child is not None and child.exit_status is not None:
        print(
            f"sage-otel demo: the server agent exited with status {child.exit_status}",
            file=sys.stderr,
        )
        return 1
    if stats.unexpected:
        print(f"sage-otel demo: unexpected errors: {stats.unexpected}", file=sys.stderr)
        return 1
    return 0


__all__ = ["DemoConfig", "DemoStats", "main", "run_demo", "status_line"]
