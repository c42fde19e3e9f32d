"""/metrics over HTTPS and with basic auth, configured like Prometheus' exporter-toolkit.

A web config file (YAML or JSON), as Prometheus exporters take with ``--web.config.file``::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_ca_file: ca.crt        # optional: then clients must present a certificate
    basic_auth_users:
      prometheus: $2b$12$...        # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

Point ``SAGE_OTEL_METRICS_WEB_CONFIG`` (or ``configure(metrics_web_config=...)``) at it.
Needs the ``web`` extra (``bcrypt``, ``pyyaml``), imported only when a config is given.

The endpoint faces the network, so the server holds at its edge with or without a config:
one selector thread accepts connections, runs each TLS handshake without blocking and
collects the request head; only a complete head, within a deadline and a byte cap, reaches
one of a fixed number of worker threads. An idle, slow or half-open connection costs a file
descriptor and at most ``max_header_bytes``, never a thread, and never delays a scrape.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import io
import logging
import os
import queue
import re
import secrets
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

WEB_CONFIG_ENV = "SAGE_OTEL_METRICS_WEB_CONFIG"
TIMEOUT_ENV = "SAGE_OTEL_METRICS_TIMEOUT"
WORKERS_ENV = "SAGE_OTEL_METRICS_WORKERS"
MAX_CONNECTIONS_ENV = "SAGE_OTEL_METRICS_MAX_CONNECTIONS"
MAX_HEADER_BYTES_ENV = "SAGE_OTEL_METRICS_MAX_HEADER_BYTES"

_log = logging.getLogger(__name__)


class WebConfigError(ValueError):
    """The web config file (or a metrics limit variable) cannot be used; the message says why."""


@dataclass(frozen=True)
class MetricsServerLimits:
    """The metrics server's limits, so that no client holds more than its share of it.

    ``timeout``: seconds from accept to a complete request head (TLS handshake included),
    and for each socket write after it. ``workers``: threads answering complete requests.
    ``max_connections``: connections held at once; beyond it the longest-waiting one that
    has not sent a complete head is dropped. ``max_header_bytes``: request line and headers.
    """

    timeout: float = 10.0
    workers: int = 8
    max_connections: int = 256
    max_header_bytes: int = 16384


_LIMIT_ENV = {
    "timeout": (TIMEOUT_ENV, float),
    "workers": (WORKERS_ENV, int),
    "max_connections": (MAX_CONNECTIONS_ENV, int),
    "max_header_bytes": (MAX_HEADER_BYTES_ENV, int),
}


def metrics_server_limits(environ: Mapping[str, str] = os.environ) -> MetricsServerLimits:
    """The limits from ``SAGE_OTEL_METRICS_*``; WebConfigError (a ValueError) names a bad one."""
    from ..limits import positive_numbers

    return MetricsServerLimits(**positive_numbers(_LIMIT_ENV, environ, WebConfigError))


def load_web_config(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError as exc:  # JSON is YAML too, but say what to install
        raise WebConfigError(
            "a web config needs the 'web' extra: pip install 'sage-otel[web]'"
        ) from exc
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise WebConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(config, dict) or set(config) - {"tls_server_config", "basic_auth_users"}:
        raise WebConfigError(f"{path}: only tls_server_config and basic_auth_users are known")
    return config


# --- basic auth -------------------------------------------------------------------------------

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_MAX_PASSWORD = 72  # bcrypt reads no further; Go's CompareHashAndPassword truncates too
_CACHE_SIZE = 100  # exporter-toolkit's


class _BasicAuth:
    """Checks ``Authorization: Basic`` as exporter-toolkit does, so that nothing a client
    sends answers anything but 200 or 401, and every failed check costs one bcrypt.

    An unknown user is checked against a configured hash of the highest cost (the result
    thrown away): it costs what a known user costs, so timing does not tell users apart.
    Checks run one at a time (bcrypt is CPU-bound; exporter-toolkit holds a mutex too).
    Successful checks are cached under an HMAC of user and password with a per-process
    key, so a scraper pays bcrypt once and no plaintext password stays in memory."""

    def __init__(self, app: Any, users: Mapping[str, str]) -> None:
        import bcrypt

        self._checkpw = bcrypt.checkpw
        self._app = app
        self._hashes: dict[bytes, bytes] = {}
        costs: dict[bytes, int] = {}
        for name, hashed in users.items():
            match = _BCRYPT_HASH.fullmatch(str(hashed))
            if match is None or not 4 <= int(match.group(1)) <= 31:
                raise WebConfigError(f"basic_auth_users: {name!r} has no bcrypt hash")
            self._hashes[str(name).encode()] = str(hashed).encode()
            costs[str(name).encode()] = int(match.group(1))
        self._decoy = self._hashes[max(costs, key=costs.__getitem__)]
        self._bcrypt_lock = threading.Lock()
        self._cache_key = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        credentials = _basic_credentials(environ.get("HTTP_AUTHORIZATION", ""))
        if credentials is not None and self._valid(*credentials):
            return self._app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("WWW-Authenticate", 'Basic realm="metrics", charset="UTF-8"'),
                ("Content-Type", "text/plain"),
            ],
        )
        return [b"Unauthorized\n"]

    def _valid(self, user: bytes, password: bytes) -> bool:
        digest = hmac.new(
            self._cache_key, len(user).to_bytes(4, "big") + user + password, hashlib.sha256
        ).digest()
        with self._cache_lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return True
        known = self._hashes.get(user)
        with self._bcrypt_lock:
            matches = self._checkpw(password[:_BCRYPT_MAX_PASSWORD], known or self._decoy)
        if not (known is not None and matches):
            return False
        with self._cache_lock:
            self._cache[digest] = None
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return True


def _basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) from an ``Authorization`` value; None unless it is well-formed Basic.
    The scheme is case-insensitive (RFC 9110 11.1); user and password stay bytes, as Go's
    ``Request.BasicAuth`` leaves them, so no encoding can fail."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII text in the header
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


# --- the server -------------------------------------------------------------------------------


def _tls_context(tls: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls["cert_file"], tls["key_file"])
    except KeyError as exc:
        raise WebConfigError("tls_server_config needs cert_file and key_file") from exc
    except OSError as exc:  # a missing file, or a certificate and key that do not match
        names = f"{tls['cert_file']}, {tls['key_file']}"
        raise WebConfigError(f"tls_server_config ({names}): {exc.strerror or exc}") from None
    if tls.get("client_ca_file"):
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(tls["client_ca_file"])
        except OSError as exc:
            raise WebConfigError(f"{tls['client_ca_file']}: {exc.strerror or exc}") from None
    return context


_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


@dataclass(eq=False)
class _Pending:
    """A connection the selector thread holds until its request head is complete."""

    sock: socket.socket
    address: Any
    deadline: float
    head: bytearray = field(default_factory=bytearray)
    handshaken: bool = False


class _ServerHandler(ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        """A socket error (a client that stopped reading) is no server fault: no traceback."""
        if not issubclass(exc_info[0], OSError):
            _log.error("metrics app failed", exc_info=exc_info)


class _Handler(WSGIRequestHandler):
    """wsgiref's one-request handler, reading the head the selector thread collected."""

    def handle(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)  # the head is at most a few KiB
        if not self.parse_request():  # a 4xx has been sent
            return
        handler = _ServerHandler(
            self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=True
        )
        handler.request_handler = self  # wsgiref logs through it
        handler.run(self.server.get_app())

    def setup(self) -> None:
        pending: _Pending = self.request
        self.connection = pending.sock
        self.rfile = io.BytesIO(bytes(pending.head))  # the app reads no body from /metrics
        self.wfile = pending.sock.makefile("wb")  # buffered: every write is written whole

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Only an unparsable request gets here: the client's fault, so never a 5xx (the 505
        for an unknown HTTP version, an HTTP/2 preface included, becomes a 400)."""
        super().send_error(400 if code >= 500 else code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(WSGIServer):
    """A WSGI server whose threads only ever answer complete requests (see module doc).

    ``socket`` is the listening socket, TLS-wrapped with the handshake deferred when a TLS
    context is given; ``shutdown()`` stops ``serve_forever`` and the workers (one run only).
    """

    request_queue_size = 128  # the kernel's accept backlog: a burst must not drop SYNs

    def __init__(
        self,
        address: tuple[str, int],
        app: Any,
        limits: MetricsServerLimits,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(address, _Handler)
        self.set_app(app)
        self.limits = limits
        if tls is not None:
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
        self.socket.setblocking(False)
        self._pending: dict[int, _Pending] = {}  # by fd, in accept order
        self._in_flight = 0  # handed to a worker and not yet closed
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._workers = [
            threading.Thread(target=self._work, name=f"sage-metrics-{n}", daemon=True)
            for n in range(limits.workers)
        ]
        for worker in self._workers:
            worker.start()

    # the selector thread ---------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        self._stopped.clear()  # one run: a shutdown() that came first ends it at once
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                try:
                    for key, _events in self._selector.select(poll_interval):
                        if key.fileobj is self.socket:
                            self._accept()
                        elif key.fd in self._pending:
                            self._advance(self._pending[key.fd])
                    self._expire()
                except Exception:  # a bug here must not end the endpoint: log it, go on
                    _log.exception("metrics server loop")
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending)
            self._selector.close()
            for _ in self._workers:  # each ends after the requests queued before it
                self._ready.put(None)
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def _accept(self) -> None:
        for _ in range(64):  # then let the held connections move too
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED, EMFILE: the loop goes on, without spinning
                self._stop.wait(0.05)
                return
            with self._lock:
                held = len(self._pending) + self._in_flight
            if held >= self.limits.max_connections:
                if not self._pending:  # every slot is a complete request: refuse this one
                    sock.close()
                    continue
                self._drop(next(iter(self._pending.values())))  # the longest waiting
            sock.setblocking(False)
            pending = _Pending(sock, address, time.monotonic() + self.limits.timeout)
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ)

    def _advance(self, pending: _Pending) -> None:
        """One non-blocking step: the TLS handshake, then reading the head."""
        sock = pending.sock
        try:
            if not pending.handshaken and isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            pending.handshaken = True
            cap = self.limits.max_header_bytes
            while True:
                if len(pending.head) >= cap:  # and still no end of head: refuse
                    with contextlib.suppress(OSError):
                        sock.send(_TOO_LARGE)
                    self._drop(pending)
                    return
                chunk = sock.recv(min(4096, cap - len(pending.head)))
                if not chunk:  # the client closed before finishing its head
                    self._drop(pending)
                    return
                searched = max(0, len(pending.head) - 3)
                pending.head += chunk
                if any(pending.head.find(end, searched) >= 0 for end in _HEAD_ENDS):
                    self._dispatch(pending)
                    return
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            self._selector.modify(sock, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE)
        except OSError:  # handshake refused, reset, client certificate rejected: just close
            self._drop(pending)

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in list(self._pending.values()):
            if pending.deadline > now:
                return  # accept order is deadline order
            self._drop(pending)

    def _dispatch(self, pending: _Pending) -> None:
        self._forget(pending)
        with self._lock:
            self._in_flight += 1
        self._ready.put(pending)

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        self._selector.unregister(pending.sock)

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()

    # the workers -----------------------------------------------------------------------------

    def _work(self) -> None:
        while (pending := self._ready.get()) is not None:
            try:
                pending.sock.settimeout(self.limits.timeout)
                self.finish_request(pending, pending.address)
            except OSError:  # the client went away or stopped reading
                pass
            except Exception:  # a bug here: log it, keep the worker
                _log.exception("metrics request failed")
            finally:
                pending.sock.close()
                with self._lock:
                    self._in_flight -= 1


def _apply_web_config(app: Any, web_config: str | Path | None) -> tuple[Any, ssl.SSLContext | None]:
    """``app`` behind the config's basic auth, and its TLS context; WebConfigError if unusable."""
    if web_config is None:
        return app, None
    config = load_web_config(web_config)
    if config.get("basic_auth_users"):
        app = _BasicAuth(app, dict(config["basic_auth_users"]))
    tls = config.get("tls_server_config")
    return app, _tls_context(tls) if tls else None


def check_web_config(web_config: str | Path) -> None:
    """Read and check a web config as the server would, without opening anything: so that a
    command can refuse a bad one before any side effect."""
    _apply_web_config(lambda environ, start_response: [], web_config)


def start_metrics_server(
    port: int,
    addr: str,
    registry: CollectorRegistry,
    web_config: str | Path | None = None,
    *,
    limits: MetricsServerLimits | None = None,
) -> tuple[MetricsServer, threading.Thread]:
    """Serve ``registry`` on ``addr:port`` (plain HTTP without a config); raises OSError if
    the port is taken, WebConfigError if the config or a limit variable is unusable.
    ``limits`` default to ``metrics_server_limits()``, read from the environment."""
    limits = limits if limits is not None else metrics_server_limits()
    app, context = _apply_web_config(make_wsgi_app(registry), web_config)
    server = MetricsServer((addr, port), app, limits, context)
    thread = threading.Thread(target=server.serve_forever, name="sage-metrics", daemon=True)
    thread.start()
    return server, thread
