"""A demo client agent for tests/e2e/test_scale.py: ``sage-otel demo --server``'s workload,
then idle with its telemetry still up until SIGTERM.

The demo command exits when its traffic ends, so a Prometheus scraping it would never see
its final counts, while its last OTLP export carries them. Idling keeps ``/metrics``
served and the periodic OTLP export running on the same, final values: a scrape and a
push can then be compared value for value. Run as
``python tests/e2e/scale_agent.py --server URL --server-did DID --registry FILE ...``;
the last stdout line of the traffic phase is the demo's JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from sage_otel.demo import DemoConfig, run_demo
from sage_otel.telemetry.setup import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scale_agent")
    parser.add_argument("--server", required=True)
    parser.add_argument("--server-did", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args(argv)

    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    telemetry = configure(metrics_host=args.metrics_host, metrics_port=args.metrics_port)
    try:
        config = DemoConfig(
            duration=args.duration,
            clients=args.clients,
            rate=args.rate,
            registry_path=args.registry,
            server_url=args.server,
            server_did=args.server_did,
            telemetry=False,  # configured above, kept beyond the traffic
        )
        stats = asyncio.run(run_demo(config))
        # The demo's event loop handled SIGTERM while it ran and reset it when it closed.
        signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
        print(json.dumps(stats.summary()), flush=True)
        while not received:
            signal.pause()
    finally:
        telemetry.shutdown()
    return 1 if stats.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
