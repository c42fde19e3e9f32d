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
"""

from __future__ import annotations

import base64
import binascii
import ssl
import threading
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

WEB_CONFIG_ENV = "SAGE_OTEL_METRICS_WEB_CONFIG"


class WebConfigError(ValueError):
    """The web config file cannot be used; the message says why."""


def load_web_config(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError as exc:  # JSON is YAML too, but say what to install
        raise WebConfigError(
            "a web config needs the 'web' extra: pip install sage-otel[web]"
        ) from exc
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict) or set(config) - {"tls_server_config", "basic_auth_users"}:
        raise WebConfigError(f"{path}: only tls_server_config and basic_auth_users are known")
    return config


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _basic_auth(app: Any, users: dict[str, str]) -> Any:
    import bcrypt

    hashes = {name: hashed.encode() for name, hashed in users.items()}

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            hashed = hashes.get(user)
            if hashed is not None and bcrypt.checkpw(password.encode(), hashed):
                return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="metrics"'), ("Content-Type", "text/plain")],
        )
        return [b"Unauthorized\n"]

    return guarded


def _tls_context(tls: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls["cert_file"], tls["key_file"])
    except KeyError as exc:
        raise WebConfigError("tls_server_config needs cert_file and key_file") from exc
    if tls.get("client_ca_file"):
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls["client_ca_file"])
    return context


def start_metrics_server(
    port: int, addr: str, registry: CollectorRegistry, web_config: str | Path | None = None
) -> tuple[Any, threading.Thread]:
    """Serve ``registry`` on ``addr:port`` (plain HTTP without a config); raises OSError if
    the port is taken, WebConfigError if the config is unusable."""
    app = make_wsgi_app(registry)
    context = None
    if web_config is not None:
        config = load_web_config(web_config)
        if config.get("basic_auth_users"):
            app = _basic_auth(app, dict(config["basic_auth_users"]))
        if config.get("tls_server_config"):
            context = _tls_context(config["tls_server_config"])
    server = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
