"""Every flag and environment variable of ``sage-otel demo`` and ``sage-otel serve``, checked
before the command has any side effect.

A mistake must cost the user one line naming the flag or variable and exit 2, never a
traceback, a half-written key file, a bound port or a started child process. Each check
raises :class:`BadInput` with that line; nothing here writes a file or keeps a socket open.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

OTLP_PROTOCOLS = ("grpc", "http/protobuf", "http/json")
OTLP_SIGNALS = ("", "TRACES_", "METRICS_")
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
BUILTIN_SAMPLERS = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    *RATIO_SAMPLERS,
)
PROMETHEUS_PORT_ENV = "OTEL_EXPORTER_PROMETHEUS_PORT"
PROMETHEUS_HOST_ENV = "OTEL_EXPORTER_PROMETHEUS_HOST"
DEFAULT_METRICS_HOST = "127.0.0.1"
REACH_TIMEOUT = 3.0  # seconds for the --server reachability check

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")  # fmt: skip
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")


class BadInput(ValueError):
    """A flag or variable the command cannot use; ``str()`` is the one line to print."""


# --- values -----------------------------------------------------------------------------------


def parse_port(text: str) -> int:
    """A TCP port number, 0-65535 (0: any free port)."""
    try:
        port = int(text.strip())
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise BadInput(f"{text!r} is not a port number (0-65535)")
    return port


def check_host(host: str, name: str = "") -> None:
    """``host`` is an IP address or a host name that resolves (for a server to bind);
    ``name`` (the flag or variable) starts the error line."""
    text = host.strip()
    said = f"{name} {host!r}" if name else repr(host)
    if not text:
        raise BadInput(f"{said}: empty, give an address such as 127.0.0.1")
    try:
        ipaddress.ip_address(text)
        return
    except ValueError:
        pass
    if _DOTTED_NUMBERS.fullmatch(text):  # never sent to DNS: 999.1.1.1 is a typo, not a name
        try:
            socket.getaddrinfo(text, None, flags=socket.AI_NUMERICHOST)
            return
        except socket.gaierror:
            raise BadInput(f"{said} is not an IP address") from None
    if not _HOSTNAME.fullmatch(text):
        raise BadInput(f"{said} is not a host name or IP address")
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise BadInput(f"{said} does not resolve to an address") from None


def _number(
    environ: Mapping[str, str],
    variable: str,
    kind: Callable[[str], float],
    low: float,
    *,
    above: bool,
    high: float = math.inf,
) -> float | None:
    """The variable as a finite number > ``low`` (``above``) or >= ``low``, <= ``high``."""
    text = environ.get(variable, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise BadInput(f"{variable}={text!r}: not {what}") from None
    in_range = (value > low if above else value >= low) and value <= high
    if not (math.isfinite(value) and in_range):
        bound = f"> {low:g}" if above else f">= {low:g}"
        if high != math.inf:
            bound = f"in [{low:g}, {high:g}]"
        raise BadInput(f"{variable}={text!r}: must be a finite number {bound}")
    return value


def _choice(environ: Mapping[str, str], variable: str, choices: tuple[str, ...]) -> None:
    text = environ.get(variable, "").strip()
    if text and text not in choices:
        raise BadInput(f"{variable}={text!r}: not one of {', '.join(choices)}")


# --- the environment --------------------------------------------------------------------------


def _samplers() -> tuple[str, ...]:
    """The sampler names the SDK takes: its own and those installed as entry points."""
    from importlib.metadata import entry_points

    names = {e.name.lower() for e in entry_points(group="opentelemetry_traces_sampler")}
    return tuple(sorted(names | set(BUILTIN_SAMPLERS)))


def _check_otlp(environ: Mapping[str, str]) -> None:
    for signal in OTLP_SIGNALS:
        _choice(environ, f"OTEL_EXPORTER_OTLP_{signal}PROTOCOL", OTLP_PROTOCOLS)
        _number(environ, f"OTEL_EXPORTER_OTLP_{signal}TIMEOUT", float, 0, above=False)
        variable = f"OTEL_EXPORTER_OTLP_{signal}ENDPOINT"
        text = environ.get(variable, "").strip()
        if not text:
            continue
        protocol = (
            environ.get(f"OTEL_EXPORTER_OTLP_{signal}PROTOCOL", "").strip()
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
            or "http/protobuf"  # sage-otel's default, as the specification's
        )
        # gRPC also takes a bare host:port (TLS unless OTEL_EXPORTER_OTLP_INSECURE=true).
        bare = protocol == "grpc" and "://" not in text
        try:
            url = urlsplit(f"//{text}" if bare else text)
            url.port  # noqa: B018 (raises ValueError when out of range)
        except ValueError:
            url = None
        if url is None or not url.hostname or not (bare or url.scheme in ("http", "https")):
            wanted = (
                "a host:port or an http(s):// URL" if protocol == "grpc" else "an http(s):// URL"
            )
            raise BadInput(f"{variable}={text!r}: not {wanted} (protocol {protocol})")


def _check_sdk(environ: Mapping[str, str]) -> None:
    text = environ.get("OTEL_SDK_DISABLED", "").strip()
    if text and text.lower() not in ("true", "false"):
        raise BadInput(f"OTEL_SDK_DISABLED={text!r}: not true or false")
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler:
        known = _samplers()
        if sampler not in known:
            raise BadInput(
                f"OTEL_TRACES_SAMPLER={environ['OTEL_TRACES_SAMPLER']!r}: "
                f"not one of {', '.join(known)}"
            )
        if sampler in RATIO_SAMPLERS:
            _number(environ, "OTEL_TRACES_SAMPLER_ARG", float, 0, above=False, high=1)
    _number(environ, "OTEL_METRIC_EXPORT_INTERVAL", float, 0, above=True)
    _number(environ, "OTEL_METRIC_EXPORT_TIMEOUT", float, 0, above=False)
    _number(environ, "OTEL_BSP_SCHEDULE_DELAY", int, 0, above=True)
    _number(environ, "OTEL_BSP_EXPORT_TIMEOUT", int, 0, above=False)
    queue = _number(environ, "OTEL_BSP_MAX_QUEUE_SIZE", int, 0, above=True)
    batch = _number(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", int, 0, above=True)
    if (batch or 512) > (queue or 2048):  # the SDK's defaults
        if batch is None:
            raise BadInput(
                f"OTEL_BSP_MAX_QUEUE_SIZE={queue:g}: smaller than the export batch "
                "(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, 512 by default)"
            )
        raise BadInput(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch:g}: larger than the queue "
            f"(OTEL_BSP_MAX_QUEUE_SIZE, {queue or 2048:g})"
        )


def check_environment() -> None:
    """Every variable sage-otel, the OpenTelemetry SDK it sets up and ``sage-otel serve``'s
    workers read; empty means unset, as the SDK takes it."""
    from .limits import validate as validate_limits
    from .telemetry.web import WEB_CONFIG_ENV, check_web_config

    environ = os.environ
    _check_sdk(environ)
    _check_otlp(environ)
    text = environ.get(PROMETHEUS_PORT_ENV, "").strip()
    if text:
        try:
            parse_port(text)
        except BadInput:
            raise BadInput(f"{PROMETHEUS_PORT_ENV}={text!r}: not a port number (0-65535)") from None
    text = environ.get(PROMETHEUS_HOST_ENV, "").strip()
    if text:
        check_host(text, PROMETHEUS_HOST_ENV)
    _number(environ, "SAGE_OTEL_SHUTDOWN_TIMEOUT", float, 0, above=True)
    text = environ.get("SAGE_OTEL_METRICS_ROUTE", "").strip()
    if text and text.lower() not in ("on", "off"):
        raise BadInput(f"SAGE_OTEL_METRICS_ROUTE={text!r}: not on or off")
    shared = environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if shared and not (os.path.isdir(shared) and os.access(shared, os.W_OK | os.X_OK)):
        raise BadInput(f"PROMETHEUS_MULTIPROC_DIR={shared!r}: not a writable directory")
    try:
        validate_limits()  # the limits and the instrumentation's choices, each error named
    except ValueError as error:
        raise BadInput(str(error)) from None
    web_config = environ.get(WEB_CONFIG_ENV)
    if web_config:
        try:
            check_web_config(web_config)
        except OSError as error:
            raise BadInput(f"{WEB_CONFIG_ENV}={web_config!r}: {error.strerror or error}") from None
        except ValueError as error:
            raise BadInput(f"{WEB_CONFIG_ENV}: {error}") from None


def metrics_address(
    host: str | None, port: int | None, default_port: int, environ: Mapping[str, str] = os.environ
) -> tuple[str, int, str, str]:
    """Where /metrics goes: the flags, else ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``,
    else the command's defaults; with the flags that move the port and the address, as a
    user should read them (naming the variable a value came from)."""
    port_flag, host_flag = "--metrics-port", "--metrics-host"
    if port is None:
        text = environ.get(PROMETHEUS_PORT_ENV, "").strip()
        if text:
            port = parse_port(text)
            port_flag = f"--metrics-port (now {PROMETHEUS_PORT_ENV}={text})"
        else:
            port = default_port
    if not host:
        text = environ.get(PROMETHEUS_HOST_ENV, "").strip()
        if text:
            host_flag = f"--metrics-host (now {PROMETHEUS_HOST_ENV}={text})"
        host = text or DEFAULT_METRICS_HOST
    return host, port, port_flag, host_flag


# --- ports ------------------------------------------------------------------------------------


def check_bindable(
    what: str, host: str, port: int, port_flag: str, host_flag: str, *, ipv4_only: bool = False
) -> None:
    """``host:port`` can be bound now (the probe is closed again at once); otherwise one line
    naming the port and the flag that moves it."""
    try:
        family = socket.AF_INET if ipv4_only else socket.AF_UNSPEC
        addresses = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror:
        only = " (IPv4 only)" if ipv4_only else ""
        raise BadInput(f"{host_flag} {host!r}: {what} cannot listen there{only}") from None
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                raise BadInput(
                    _bind_failure(what, host, port, port_flag, host_flag, error)
                ) from None


def _bind_failure(
    what: str, host: str, port: int, port_flag: str, host_flag: str, error: OSError
) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"{what} port {where} is in use: choose another with {port_flag}"
    if error.errno == errno.EACCES:
        return f"{what} port {where}: permission denied: choose another with {port_flag}"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{what} address {host} is not on this machine: choose another with {host_flag}"
    return f"{what} port {where}: {error.strerror or error}: check {host_flag} and {port_flag}"


# --- files ------------------------------------------------------------------------------------


def _creatable(path: Path) -> str | None:
    """None if a file can be created at ``path`` (its directories too), else why not."""
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create files in {parent} (permission denied)"
    return None


def check_identity_file(path: str, flag: str = "--identity") -> bool:
    """True if ``path`` holds a usable identity, False if it is absent and can be created
    there. Whether it is an identity at all is told before whether its mode is safe: a file
    that is no identity needs another path, not a chmod."""
    from .server import IdentityFileError, _read_identity

    file = Path(path)
    if not file.exists() and not file.is_symlink():
        if file.parent != Path() and not file.parent.is_dir():
            raise BadInput(f"{flag} {path}: directory {file.parent} does not exist")
        why = _creatable(file)
        if why is not None:
            raise BadInput(f"{flag} {path}: {why}")
        return False
    if not file.is_file():
        raise BadInput(f"{flag} {path} is not a sage-otel identity file (not a regular file)")
    try:
        _read_identity(file)
    except IdentityFileError as error:
        raise BadInput(f"{flag} {error}") from None
    except OSError as error:
        raise BadInput(f"{flag} {path}: cannot read it: {error.strerror or error}") from None
    return True


def check_registry_file(path: str, flag: str = "--registry") -> None:
    """An absent file is created on first registration; a present one must be a registry
    file as :class:`~.agent.did.JsonFileRegistry` reads it (one line naming the file and,
    for broken JSON, the line)."""
    from .agent.did import JsonFileRegistry, RegistryFileError

    file = Path(path)
    if not file.exists():
        why = _creatable(file)
        if why is not None:
            raise BadInput(f"{flag} {path}: {why}")
        return
    if not file.is_file():
        raise BadInput(f"{flag} {path} is not a registry file (not a regular file)")
    try:
        JsonFileRegistry(file)  # reads at most what a running registry would
    except RegistryFileError as error:
        raise BadInput(f"{flag} {_json_error(file) or error}") from None
    except OSError as error:
        raise BadInput(f"{flag} {path}: cannot read it: {error.strerror or error}") from None


def _json_error(file: Path) -> str | None:
    """Where a registry file stops being JSON (its line), if that is what is wrong with it
    and it is small enough to read here."""
    from .agent.did import MAX_FILE_BYTES

    try:
        if file.stat().st_size <= MAX_FILE_BYTES:
            json.loads(file.read_bytes())
    except json.JSONDecodeError as error:
        return f"{file}, line {error.lineno}: not JSON ({error.msg})"
    except (OSError, ValueError, RecursionError):
        pass
    return None


# --- a server to drive ------------------------------------------------------------------------


def check_server(url: str, did: str, timeout: float = REACH_TIMEOUT) -> None:
    """``url`` answers ``/healthz`` as a sage-otel server agent whose DID is ``did``: said
    once, up front, rather than as a failed handshake per client for the whole run."""
    from .agent.errors import SageError
    from .agent.identity import parse_did

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError when out of range)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"--server {url!r} is not an http:// or https:// URL")
    try:
        wanted = parse_did(did)
    except SageError:
        raise BadInput(f"--server-did {did!r} is not a did:sage DID") from None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    health = url.rstrip("/") + "/healthz"
    try:
        with opener.open(health, timeout=timeout) as answer:
            body = json.loads(answer.read(65536) or b"null")
    except urllib.error.HTTPError as error:
        raise BadInput(
            f"--server {url}: /healthz answered HTTP {error.code}: not a sage-otel server agent"
        ) from None
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        reason = getattr(reason, "strerror", None) or reason
        raise BadInput(f"--server {url} is not reachable: {reason}") from None
    served = body.get("did") if isinstance(body, dict) else None
    try:
        same = served is not None and parse_did(served) == wanted
    except SageError:
        same = False
    if not same:
        raise BadInput(f"--server-did {did}: the agent at {url} is {served or 'no SAGE agent'}")
