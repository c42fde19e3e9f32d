"""A SAGE server agent as a deployable ASGI app: ``sage-otel serve``, uvicorn, gunicorn.

Every worker builds the same agent from the environment:

* ``SAGE_OTEL_IDENTITY``: the identity key file, created on first run with mode 0600 and
  refused when group or others can read it;
* ``SAGE_OTEL_REGISTRY``: a JSON-file DID registry shared by all workers and clients
  (without it, an in-memory registry that only suits a single process);
* ``SAGE_OTEL_CHAIN``: the chain of a new identity (``solana`` or ``ethereum``);
* ``SAGE_OTEL_SESSION_MAX_MESSAGES``, ``SAGE_OTEL_SESSION_MAX_AGE``,
  ``SAGE_OTEL_SESSION_IDLE_TIMEOUT`` (seconds): the session limits, the reference's
  (1000 messages, 1 h, 10 min) by default;
* ``SAGE_OTEL_HANDSHAKE_RATE`` (200/second), ``SAGE_OTEL_HANDSHAKE_RATE_PER_ADDRESS``
  (100/second), ``SAGE_OTEL_SESSIONS_PER_ADDRESS`` (4096), ``SAGE_OTEL_NEW_PEER_SHARE``
  (0.5): admission that many identities cannot beat (:func:`admission_limits`);
* ``SAGE_OTEL_HEADER_TIMEOUT``, ``_REQUEST_TIMEOUT``, ``_KEEPALIVE_TIMEOUT`` (seconds),
  ``SAGE_OTEL_MAX_HEADER_BYTES``, ``_MAX_HEADERS``, ``_MAX_CONNECTIONS``: the HTTP edge limits
  (:class:`~.agent.edge.EdgeLimits`, applied by ``sage-otel serve``);
* ``SAGE_OTEL_OUTBOUND_ALLOW``, ``SAGE_OTEL_OUTBOUND_DENY`` (comma-separated CIDRs) and
  ``SAGE_OTEL_OUTBOUND_MAX_ANSWER`` (bytes), ``_TIMEOUT`` (s), ``_PER_PEER``, ``_TOTAL``: where
  and how the agent POSTs to peers' endpoints (:class:`~.agent.outbound.OutboundPolicy`);
* telemetry: the standard ``OTEL_*`` variables, and ``PROMETHEUS_MULTIPROC_DIR`` for several
  workers (:mod:`sage_otel.telemetry.multiprocess`): then ``GET /metrics`` on any worker
  reports all of them. ``sage-otel serve --workers 1`` needs no shared files: it serves
  /metrics from the one process's own store, exemplars included.

``uvicorn --factory sage_otel.server:create_app --workers N`` and
``gunicorn -k uvicorn.workers.UvicornWorker -w N "sage_otel.server:create_app()"`` both work;
``sage-otel serve`` does the set-up (identity, registration, the shared directory, one
metrics port for all workers) and runs uvicorn.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import ssl
import stat
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .agent.did import (
    DIDDocument,
    DIDResolver,
    InMemoryRegistry,
    JsonFileRegistry,
    Registry,
    RegistryFileError,
)
from .agent.edge import EdgeLimits, SageHttpProtocol
from .agent.errors import SageError
from .agent.identity import AgentIdentity, parse_chain
from .agent.session import SessionManager
from .agent.transport import ServerAgent
from .limits import (  # noqa: F401 (AdmissionLimits: part of this module's interface)
    AdmissionLimits,
    admission_limits,
    edge_limits,
    outbound_policy,
    session_limits,
)
from .limits import validate as validate_limits

IDENTITY_ENV = "SAGE_OTEL_IDENTITY"
REGISTRY_ENV = "SAGE_OTEL_REGISTRY"
CHAIN_ENV = "SAGE_OTEL_CHAIN"


class ServeHttpProtocol(SageHttpProtocol):
    """The HTTP protocol ``sage-otel serve`` names to uvicorn by import path, so that every
    worker process builds it, with the edge limits of its own environment."""

    @property
    def limits(self) -> EdgeLimits:  # type: ignore[override]
        return _process_edge_limits()


_process_edge_limits = functools.cache(edge_limits)


class IdentityFileError(Exception):
    """The identity file is unusable (readable by others, malformed)."""


def load_identity(path: str | os.PathLike[str], chain: str = "solana") -> AgentIdentity:
    """The agent's identity from ``path``, created there (mode 0600) if the file is absent."""
    path = Path(path)
    new_chain = parse_chain(chain)  # a bad chain fails before the file exists
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_identity(path)
    identity = AgentIdentity.generate(new_chain)
    secret = {
        "chain": identity.did.chain.value,
        "signing_key": identity.signing_key.private_bytes().hex(),
        "kem_key": identity.kem.private.hex(),
    }
    with os.fdopen(fd, "w") as handle:
        json.dump(secret, handle)
    return _read_identity(path)


def _read_identity(path: Path) -> AgentIdentity:
    """The identity in ``path``; whether it is one is told before whether its mode is safe
    (a file that is no identity needs another path, not a chmod)."""
    try:
        data = json.loads(path.read_text())
        identity = AgentIdentity.from_secrets(
            parse_chain(data["chain"]),
            bytes.fromhex(data["signing_key"]),
            bytes.fromhex(data["kem_key"]),
        )
    except (ValueError, KeyError, TypeError, SageError) as exc:
        raise IdentityFileError(f"{path} is not a sage-otel identity file") from exc
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityFileError(
            f"{path} is accessible to group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    return identity


def _registry() -> Registry:
    path = os.environ.get(REGISTRY_ENV)
    return JsonFileRegistry(path) if path else InMemoryRegistry()


def auto_instrumented() -> bool:
    """Whether this process's OpenTelemetry was set up before sage-otel set up any: by
    ``opentelemetry-instrument`` (the ``sage`` instrumentor already instrumented, an SDK
    provider already global), or by the application. Its providers and exporters are then
    the ones to use; a second set would only fight them for the global API."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from .instrumentation import SageInstrumentor
    from .telemetry.setup import current

    if current() is not None:
        return False
    return (
        SageInstrumentor().is_instrumented_by_opentelemetry
        or isinstance(trace.get_tracer_provider(), TracerProvider)
        or isinstance(metrics.get_meter_provider(), MeterProvider)
    )


def _telemetry(**metrics: Any) -> Any:
    """This process's telemetry; a second call returns the first one's. None when the
    process is auto-instrumented (:func:`auto_instrumented`): instrumented, never configured
    as well.

    Spans only when something exports them: an exemplar must lead to a stored trace, and an
    unexported span is pure cost on every message."""
    import sage_otel

    from .telemetry.setup import otlp_configured

    if auto_instrumented():
        return None
    return sage_otel.configure(
        service_name=os.environ.get("OTEL_SERVICE_NAME"),
        traces=otlp_configured("TRACES"),
        **metrics,
    )


METRICS_ROUTE_ENV = "SAGE_OTEL_METRICS_ROUTE"


def _metrics_route_wanted() -> bool:
    """``GET /metrics`` on the agent's own port: for several workers under a plain ASGI
    server, which has no metrics port of its own. Never when a web config asks for TLS or
    basic auth (they hold on the metrics port only), nor under ``sage-otel serve`` (which has
    its metrics port, and sets ``SAGE_OTEL_METRICS_ROUTE=off``)."""
    from .telemetry.web import WEB_CONFIG_ENV

    if os.environ.get(WEB_CONFIG_ENV):
        return False
    return os.environ.get(METRICS_ROUTE_ENV, "on").strip().lower() != "off"


def create_app() -> Any:
    """The ASGI app of one worker: the SAGE server agent, its telemetry, ``GET /metrics``."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    validate_limits()  # under a plain ASGI server too: refuse to start rather than serve badly
    identity = _served_identity or load_identity(
        os.environ.get(IDENTITY_ENV) or "sage-identity.json", os.environ.get(CHAIN_ENV, "solana")
    )
    telemetry = _telemetry()  # under `sage-otel serve --workers 1`: the one it set up
    if telemetry is not None:
        atexit.register(telemetry.shutdown)
    admission = admission_limits()
    agent = ServerAgent(
        identity,
        DIDResolver(_registry()),
        sessions=SessionManager(
            session_limits(),
            max_sessions_per_address=admission.sessions_per_address,
            new_peer_share=admission.new_peer_share,
        ),
        global_handshake_rate=admission.handshake_rate,
        address_handshake_rate=admission.handshake_rate_per_address,
        outbound=outbound_policy(),
    )

    from .telemetry.multiprocess import multiprocess_dir, multiprocess_registry

    if multiprocess_dir() is not None and _metrics_route_wanted():
        from prometheus_client.exposition import choose_encoder

        registry = multiprocess_registry()

        async def metrics(request: Request) -> Response:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(registry), media_type=content_type)

        agent.app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))
    return agent.app


def _announce_when_ready(line: str, url: str, timeout: float = 60.0) -> None:
    """Print the first stdout line once the agent accepts connections."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(url + "/healthz", timeout=1.0):
                print(line, flush=True)
                return
        except OSError:
            time.sleep(0.05)


async def _register(identity: AgentIdentity, url: str) -> None:
    registry = _registry()
    if await registry.lookup(identity.did) is None:
        from .agent.did import sign_registration

        document = DIDDocument.for_identity(identity, name="sage-otel-serve", endpoint=url)
        await registry.register(document, sign_registration(identity, document))


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


# Set by ``sage-otel demo`` for the one-worker server it starts and owns. Its identity is
# throwaway: the file is removed as soon as it is loaded, so the key is never left on disk
# whatever ends the demo. The demo holds the child's stdin open, so the demo's end (SIGKILL
# included) reaches the child as end of file, and the child shuts down as on SIGTERM.
DEMO_CHILD_ENV = "SAGE_OTEL_DEMO_CHILD"
_served_identity: AgentIdentity | None = None  # a demo child's, for its in-process app


def _stop_at_end_of_stdin() -> None:
    """Shut down as on SIGTERM once stdin ends: the parent that held it open is gone."""
    import signal

    with contextlib.suppress(OSError, ValueError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def _event_loop() -> str:
    """uvloop: several times the requests per second of asyncio's loop (performance.md)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:  # not built for this platform (Windows)
        return "asyncio"
    return "uvloop"


def serve(
    *,
    host: str,
    port: int,
    workers: int,
    metrics_host: str,
    metrics_port: int,
    identity_path: str,
    registry_path: str | None,
    chain: str = "solana",
) -> int:
    """Run the server agent with ``workers`` processes; 0 on SIGTERM, 2 when it cannot start.

    The command line has checked every flag and variable first (``cli._prepare_serve``:
    limits, web config, ports, files); what can still fail here (a port taken meanwhile, an
    identity file that cannot be written) is one line and 2."""
    import asyncio

    from .telemetry.web import WEB_CONFIG_ENV

    web_config = os.environ.get(WEB_CONFIG_ENV) or None
    created = not Path(identity_path).exists()
    try:
        identity = load_identity(identity_path, chain)
    except (IdentityFileError, OSError, ValueError, SageError) as error:
        print(f"sage-otel serve: cannot start: {error}", file=sys.stderr)
        return 2
    demo_child = os.environ.pop(DEMO_CHILD_ENV, None) == "1" and workers == 1
    if demo_child:  # the key stays in this process only; the app below takes it from here
        global _served_identity
        _served_identity = identity
        Path(identity_path).unlink(missing_ok=True)
    elif created:  # never silently: the file holds the agent's private keys
        print(f"sage-otel serve: created identity {identity_path} (mode 0600)", file=sys.stderr)
    url = f"http://{host}:{port}"
    os.environ[IDENTITY_ENV] = str(Path(identity_path).resolve())
    os.environ[CHAIN_ENV] = chain
    if registry_path:
        os.environ[REGISTRY_ENV] = str(Path(registry_path).resolve())
        try:
            asyncio.run(_register(identity, url))
        except RegistryFileError as error:  # an older unsigned file: says what to do
            print(f"sage-otel serve: cannot start: {error}", file=sys.stderr)
            return 2
    os.environ.pop("OTEL_EXPORTER_PROMETHEUS_PORT", None)  # workers never bind a metrics port
    os.environ[METRICS_ROUTE_ENV] = "off"  # /metrics is on the metrics port, with its config
    from .telemetry.multiprocess import multiprocess_registry
    from .telemetry.setup import sdk_disabled
    from .telemetry.web import WebConfigError, start_metrics_server

    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # No /metrics port when nothing of its own would record into it: the SDK disabled, or
    # the process auto-instrumented (its exporters are then the user's choice).
    own_telemetry = not sdk_disabled() and not auto_instrumented()
    metrics_server = None
    own_dir: str | None = None
    try:
        if own_telemetry and workers == 1 and not shared:
            # One process: /metrics straight from its in-process store (exemplars included,
            # no per-value file writes); uvicorn runs the app here and create_app() finds
            # this telemetry already set up.
            telemetry = _telemetry(
                metrics_host=metrics_host, metrics_port=metrics_port, metrics_web_config=web_config
            )
            metrics_server = telemetry._server
        elif own_telemetry:
            if not shared:  # ours: removed on every exit below
                shared = own_dir = tempfile.mkdtemp(prefix="sage-otel-metrics-")
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
            metrics_server, _thread = start_metrics_server(
                metrics_port, metrics_host, multiprocess_registry(shared), web_config
            )
    except (OSError, WebConfigError) as error:
        print(f"sage-otel serve: cannot start: metrics: {error}", file=sys.stderr)
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        return 2
    metrics_url = "off"
    if metrics_server is not None:
        scheme = "https" if isinstance(metrics_server.socket, ssl.SSLSocket) else "http"
        metrics_url = f"{scheme}://{metrics_host}:{metrics_server.server_address[1]}/metrics"
    line = f"did={identity.did} url={url} metrics={metrics_url}"
    threading.Thread(target=_announce_when_ready, args=(line, url), daemon=True).start()

    import signal

    import uvicorn

    # uvicorn shuts down gracefully, then re-raises the signal to the previous handler:
    # make that handler a clean exit, the contract for SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    if demo_child:
        threading.Thread(target=_stop_at_end_of_stdin, daemon=True).start()
    try:
        uvicorn.run(
            "sage_otel.server:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop=_event_loop(),
            http=ServeHttpProtocol,  # httptools with the edge limits (by reference to workers)
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
        )
    finally:  # also on the SystemExit a signal ends it with
        if metrics_server is not None:
            metrics_server.shutdown()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0
