"""The soak test's server: one default-configured SAGE ServerAgent in its own process.

    python -m benchmarks.soak_server --secrets S.json --registry R.json [--profile OUT.prof]

Prints one JSON line ``{"port", "pid", "did"}`` on stdout once it serves, then runs until
SIGTERM/SIGINT. Nothing but the identity and the registry is configured: the limits under
test (handshake rate, sessions per peer, body size, tolerances) are the agent's defaults.
With ``--profile`` the whole run is recorded with cProfile (for investigation only: it
slows the server down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from sage_otel.agent.did import DIDResolver, JsonFileRegistry
from sage_otel.agent.transport import ServerAgent

from .soak import load_identity


async def serve(args: argparse.Namespace) -> None:
    secrets = json.loads(Path(args.secrets).read_text())
    identity = load_identity(secrets["server"])
    server = ServerAgent(identity, DIDResolver(JsonFileRegistry(args.registry)))
    port = await server.start("127.0.0.1", 0)
    print(json.dumps({"port": port, "pid": os.getpid(), "did": str(identity.did)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secrets", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--profile", default="")
    args = parser.parse_args(argv)
    # The agent logs its first unexpected error (a defect) here: stderr goes to a file.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            asyncio.run(serve(args))
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
