"""One SAGE agent feeding every ingestion path of tests/e2e/test_ingestion_paths.py at once.

The in-process demo (server and clients in this process, as ``sage-otel demo
--in-process``) records its traffic once; the same measurements then leave by /metrics
(scraped) and by one OTLP metric exporter of the SDK per ``--otlp`` URL (the collectors'
receivers, or Prometheus 3's /api/v1/otlp/v1/metrics). After the traffic it idles with its
telemetry still up until SIGTERM, so every path converges on the same final values.
Before the traffic it prints ``ready`` and waits for a line on stdin: the caller lets it go
once every path holds every series at zero, so that no path's first sample of a counter
is taken after some of the traffic (rate() measures from the first sample in its window).
Run as ``python tests/e2e/ingestion_agent.py --duration S --metrics-port P --otlp URL ...``;
the last stdout line of the traffic phase is the demo's JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from sage_otel.demo import DemoConfig, run_demo
from sage_otel.telemetry.setup import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ingestion_agent")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--otlp", action="append", default=[], help="an OTLP/HTTP metrics URL")
    parser.add_argument("--export-interval-ms", type=int, default=1000)
    parser.add_argument("--environment", default="e2e")
    args = parser.parse_args(argv)

    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    readers = [
        PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=url, timeout=10),
            export_interval_millis=args.export_interval_ms,
        )
        for url in args.otlp
    ]
    telemetry = configure(
        # service.name's default, "sage-agent", is also the scrape job's name.
        resource_attributes={"deployment.environment": args.environment},
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        otlp=False,  # only the readers above: nothing from the caller's OTEL_* settings
        metric_readers=readers,
    )
    try:
        print("ready", flush=True)
        sys.stdin.readline()
        config = DemoConfig(duration=args.duration, clients=args.clients, telemetry=False)
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
