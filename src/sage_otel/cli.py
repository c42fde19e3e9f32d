"""The ``sage-otel`` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-otel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sage-otel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a server agent and client agents on loopback")
    demo.add_argument(
        "--duration",
        type=_non_negative,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    demo.add_argument("--clients", type=_positive_int, default=4, metavar="N")
    demo.add_argument(
        "--rate",
        type=_non_negative,
        default=20.0,
        metavar="R",
        help="messages per second per client; 0 = as fast as possible",
    )
    demo.add_argument(
        "--json", action="store_true", help="print a JSON summary as the last line of stdout"
    )
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=0, help="server agent port (default: any free)")
    demo.add_argument(
        "--registry", metavar="PATH", help="JSON-file DID registry (default: in memory)"
    )
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help="port for /metrics (default: OTEL_EXPORTER_PROMETHEUS_PORT or 9090)",
    )
    demo.add_argument(
        "--metrics-host",
        default=None,
        help="address for /metrics (default: OTEL_EXPORTER_PROMETHEUS_HOST or 127.0.0.1)",
    )
    demo.add_argument(
        "--no-telemetry",
        action="store_true",
        help="set up no telemetry of its own (for opentelemetry-instrument)",
    )
    demo.add_argument(
        "--server", metavar="URL", help="drive this server agent instead of starting one"
    )
    demo.add_argument("--server-did", metavar="DID", help="the DID of the --server agent")
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--fast",
        dest="fast",
        action="store_true",
        default=True,
        help="the server agent in its own process (sage-otel serve), aiohttp clients (the default)",
    )
    where.add_argument(
        "--in-process",
        dest="fast",
        action="store_false",
        help="the server agent and the clients in this process, on one event loop: one "
        "/metrics with every series and exemplar",
    )

    serve = commands.add_parser(
        "serve", help="serve a SAGE server agent (several worker processes with --workers)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=_positive_int, default=1, metavar="N")
    serve.add_argument("--metrics-host", default="127.0.0.1")
    serve.add_argument("--metrics-port", type=int, default=9090, metavar="M")
    serve.add_argument(
        "--identity",
        default="sage-identity.json",
        metavar="FILE",
        help="identity key file; created with mode 0600 if absent",
    )
    serve.add_argument(
        "--registry", metavar="FILE", help="JSON-file DID registry (default: in memory)"
    )
    serve.add_argument(
        "--chain", default="solana", help="chain of a new identity: solana or ethereum"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .server import serve

        return serve(
            host=args.host,
            port=args.port,
            workers=args.workers,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            identity_path=args.identity,
            registry_path=args.registry,
            chain=args.chain,
        )
    if args.command == "demo":
        if bool(args.server) != bool(args.server_did) or (args.server and not args.registry):
            parser.error("--server needs --server-did and --registry")
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
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            server_url=args.server,
            server_did=args.server_did,
            fast=args.fast,
        )
        return demo_main(config, as_json=args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
