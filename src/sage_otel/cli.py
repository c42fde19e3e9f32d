"""The ``sage-otel`` command line: ``demo`` and ``serve``.

Every flag and environment variable is checked (:mod:`sage_otel.preflight`) before a command
has any side effect, so a mistake is one line on stderr and exit 2 with nothing created,
bound or started.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from . import __version__
from .preflight import (
    BadInput,
    check_bindable,
    check_environment,
    check_host,
    check_identity_file,
    check_registry_file,
    check_server,
    metrics_address,
    parse_port,
)

DESCRIPTION = (
    "OpenTelemetry traces and metrics for SAGE agents. 'sage-otel demo' runs a server agent "
    "and client agents doing real and deliberately failing SAGE traffic; 'sage-otel serve' "
    "serves a server agent for others to use."
)
EPILOG = "Run 'sage-otel demo --help' or 'sage-otel serve --help' for every option's default."
SERVE_METRICS_PORT = 9090  # the monitoring plan's agent metrics port
# The OpenTelemetry Prometheus exporter's port: a demo next to a default `serve` must not
# collide with the server's 9090 (docs/deploy.md runs exactly that).
DEMO_METRICS_PORT = 9464


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (no usage block): the contract for bad input."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _type(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a check raising BadInput, its line kept as the error."""

    def convert(text: str) -> object:
        try:
            return check(text)
        except BadInput as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = check.__name__
    return convert


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BadInput(f"{text!r} is not a whole number >= 1")
    return value


def _seconds_or_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise BadInput(f"{text!r} is not a finite number >= 0")
    return value


def _chain(text: str) -> str:
    from .agent.errors import SageError
    from .agent.identity import parse_chain

    try:
        return parse_chain(text).value
    except SageError:
        raise BadInput(f"{text!r} is not a chain: solana or ethereum (or sol, eth)") from None


def _host(text: str) -> str:
    check_host(text)
    return text.strip()


_positive_int = _type(_whole)
_non_negative = _type(_seconds_or_rate)
_port = _type(parse_port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sage-otel", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument(
        "--version",
        action="version",
        version=f"sage-otel {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_serve(commands)
    return parser


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a server agent and client agents on loopback",
        description="Run a server agent and client agents doing real SAGE work on loopback, "
        "with injected failures, and print a summary.",
    )
    demo.add_argument(
        "--duration",
        type=_non_negative,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    demo.add_argument(
        "--clients",
        type=_positive_int,
        default=4,
        metavar="N",
        help="client agents to run (default: %(default)s)",
    )
    demo.add_argument(
        "--rate",
        type=_non_negative,
        default=20.0,
        metavar="R",
        help="messages per second per client; 0 = as fast as possible (default: %(default)g)",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print a JSON summary as the last line of stdout (default: off, a table)",
    )
    demo.add_argument(
        "--host",
        type=_type(_host),
        default="127.0.0.1",
        help="address of the server agent the demo starts (default: %(default)s)",
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=0,
        metavar="P",
        help="port of the server agent the demo starts (default: 0, any free port)",
    )
    demo.add_argument(
        "--registry",
        metavar="PATH",
        help="JSON-file DID registry, created if absent (default: in memory, or a temporary "
        "file shared with the --fast server agent)",
    )
    demo.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="P",
        help="port of the demo's own /metrics (default: OTEL_EXPORTER_PROMETHEUS_PORT, else "
        f"{DEMO_METRICS_PORT}, the OpenTelemetry Prometheus exporter's, apart from serve's "
        f"{SERVE_METRICS_PORT}; 0 = any free port)",
    )
    demo.add_argument(
        "--metrics-host",
        type=_type(_host),
        default=None,
        metavar="H",
        help="address of the demo's own /metrics (default: OTEL_EXPORTER_PROMETHEUS_HOST, "
        "else 127.0.0.1)",
    )
    demo.add_argument(
        "--no-telemetry",
        action="store_true",
        help="set up no telemetry of its own, for opentelemetry-instrument (default: off)",
    )
    demo.add_argument(
        "--server",
        metavar="URL",
        help="drive the server agent at URL instead of starting one; needs --server-did and "
        "--registry (default: start one)",
    )
    demo.add_argument(
        "--server-did",
        metavar="DID",
        help="the DID of the --server agent (default: none)",
    )
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--fast",
        dest="fast",
        action="store_true",
        default=True,
        help="the server agent in its own process (sage-otel serve), aiohttp clients (default: on)",
    )
    where.add_argument(
        "--in-process",
        dest="fast",
        action="store_false",
        help="the server agent and the clients in this process, on one event loop: one "
        "/metrics with every series and exemplar (default: off)",
    )


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a SAGE server agent (several worker processes with --workers)",
        description="Serve a SAGE server agent. The first stdout line, once it accepts "
        "connections, is: did=DID url=URL metrics=URL. SIGTERM or Ctrl-C stops it.",
    )
    serve.add_argument(
        "--host",
        type=_type(_host),
        default="127.0.0.1",
        help="address to serve the agent on (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8080,
        metavar="P",
        help="port of the agent (default: %(default)s)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the port (default: %(default)s)",
    )
    serve.add_argument(
        "--metrics-host",
        type=_type(_host),
        default=None,
        metavar="H",
        help="address of /metrics (default: OTEL_EXPORTER_PROMETHEUS_HOST, else 127.0.0.1)",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="M",
        help="port of /metrics, reporting every worker (default: "
        f"OTEL_EXPORTER_PROMETHEUS_PORT, else {SERVE_METRICS_PORT}; 0 = any free port)",
    )
    serve.add_argument(
        "--identity",
        default="sage-identity.json",
        metavar="FILE",
        help="identity key file; created with mode 0600 if absent, and said so on stderr "
        "(default: sage-identity.json in the current directory)",
    )
    serve.add_argument(
        "--registry",
        metavar="FILE",
        help="JSON-file DID registry shared with clients, created if absent (default: in "
        "memory, for one process only)",
    )
    serve.add_argument(
        "--chain",
        type=_type(_chain),
        default="solana",
        help="chain of a new identity: solana or ethereum (default: %(default)s)",
    )


def _prepare_serve(args: argparse.Namespace) -> Callable[[], int]:
    """Every check of ``serve``; what runs it once they all pass."""
    from .server import auto_instrumented
    from .telemetry.setup import sdk_disabled

    check_environment()
    if args.port == 0:
        raise BadInput("--port 0: serve announces its URL, so it needs a fixed port (1-65535)")
    metrics_host, metrics_port, port_flag, host_flag = metrics_address(
        args.metrics_host, args.metrics_port, SERVE_METRICS_PORT
    )
    if metrics_port == args.port:
        raise BadInput(f"{port_flag}: {metrics_port} is the agent's port (--port) too")
    check_bindable("agent", args.host, args.port, "--port", "--host")
    if not sdk_disabled() and not auto_instrumented():  # else serve opens no /metrics port
        check_bindable("metrics", metrics_host, metrics_port, port_flag, host_flag, ipv4_only=True)
    check_identity_file(args.identity)
    if args.registry:
        check_registry_file(args.registry)

    def run() -> int:
        from .server import serve

        return serve(
            host=args.host,
            port=args.port,
            workers=args.workers,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            identity_path=args.identity,
            registry_path=args.registry,
            chain=args.chain,
        )

    return run


def _prepare_demo(args: argparse.Namespace) -> Callable[[], int]:
    """Every check of ``demo``; what runs it once they all pass."""
    from .telemetry.setup import sdk_disabled

    if bool(args.server) != bool(args.server_did) or (args.server and not args.registry):
        raise BadInput("--server needs --server-did and --registry")
    check_environment()
    if args.registry:
        check_registry_file(args.registry)
    if args.server:
        check_server(args.server, args.server_did)
    else:
        check_bindable("server agent", args.host, args.port, "--port", "--host")
    metrics_host, metrics_port = None, None
    if not args.no_telemetry and not sdk_disabled():  # else the demo opens no /metrics port
        metrics_host, metrics_port, port_flag, host_flag = metrics_address(
            args.metrics_host, args.metrics_port, DEMO_METRICS_PORT
        )
        if metrics_port and metrics_port == args.port and not args.server:
            raise BadInput(f"{port_flag}: {metrics_port} is the server agent's port (--port) too")
        check_bindable("metrics", metrics_host, metrics_port, port_flag, host_flag, ipv4_only=True)

    def run() -> int:
        from .demo import DemoConfig
        from .demo import main as demo_main

        config = DemoConfig(
            duration=args.duration,
            clients=args.clients,
            rate=args.rate,
            host=args.host,
            port=args.port,
            registry_path=args.registry,
            telemetry=not args.no_telemetry,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            server_url=args.server,
            server_did=args.server_did,
            fast=args.fast,
        )
        return demo_main(config, as_json=args.json)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, whose --help lists what it takes
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    prepare = _prepare_serve if args.command == "serve" else _prepare_demo
    try:
        run = prepare(args)
        return run()
    except BadInput as error:
        print(f"sage-otel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the command's own signal handling is in place
        print(f"sage-otel {args.command}: stopped by SIGINT", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
