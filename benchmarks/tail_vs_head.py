"""What tail sampling costs the agent: every span exported, against head sampling at the same share.

    python -m benchmarks.tail_vs_head [--rounds 5] [--messages 3000] [--handshakes 100]
                                      [--share 0.1] [--json]

Tail sampling (collector/tiers/gateway.yaml) decides in the gateway, after the trace is
complete, so the agents must record and export every span (always_on). Head sampling
(parentbased_traceidratio) decides at the root and records and exports only the kept share.
Both variants here export for real: OTLP/HTTP protobuf (the SDK's exporter, as
``sage_otel.configure()`` sets it up) to a sink in another process that decodes and counts
what arrives, so encoding and sending are paid in the agent process as in production.

Variants, interleaved round by round in one process exactly as benchmarks/run.py does
(its workloads, its summary and machine description):

  a  uninstrumented
  b  sage-otel, metrics only
  h  sage-otel, metrics + traces, head sampling parentbased_traceidratio SHARE, exported
  t  sage-otel, metrics + traces, always_on (what tail sampling needs), every span exported

Besides throughput it reports the spans and OTLP bytes that reached the sink per message
and per handshake for h and t: what the agent-to-collector hop carries in each design.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from .run import machine, plain, sage, summarize, variant_table
from .workloads import Handshake, MessageRoundTrip

VARIANTS = {
    "a": "uninstrumented",
    "b": "sage-otel metrics only",
    "h": "head sampling (parentbased_traceidratio {share}), sampled spans exported",
    "t": "tail-ready (always_on), every span exported",
}

# The sink: an OTLP/HTTP trace receiver in its own process that counts spans and bytes.
SINK = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
counts = {"spans": 0, "bytes": 0, "requests": 0}
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = ExportTraceServiceRequest.FromString(body)
        counts["spans"] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        counts["bytes"] += len(body)
        counts["requests"] += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        data = json.dumps(counts).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Sink:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.process.stdout.readline())}"

    def counts(self) -> dict[str, int]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.url + "/", timeout=10) as answer:
            return json.loads(answer.read())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _sage(sink: Sink | None, ratio: float):
    """sage-otel as benchmarks/run.py sets it up, with a real OTLP/HTTP exporter."""
    if sink is None:
        return sage(traces=False)
    exporter = OTLPSpanExporter(endpoint=sink.url + "/v1/traces", timeout=10)
    return sage(traces=True, ratio=ratio, exporter=exporter)


def measure(rounds: int, messages: int, handshakes: int, share: float, seed: int = 1):
    results = {v: {"messages": [], "handshakes": []} for v in VARIANTS}
    exported = {v: {"messages": [0, 0], "handshakes": [0, 0]} for v in ("h", "t")}
    sink = Sink()
    setups = {
        "a": plain,
        "b": lambda: _sage(None, 0.0),
        "h": lambda: _sage(sink, share),
        "t": lambda: _sage(sink, 1.0),
    }
    order = list(VARIANTS)
    rng = random.Random(seed)
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for variant in order:
                for kind, n in (("messages", messages), ("handshakes", handshakes)):
                    with setups[variant]() as tracer_provider:
                        workload = MessageRoundTrip() if kind == "messages" else Handshake()
                        workload.run(max(1, n // 10))  # warm-up
                        if tracer_provider is not None:
                            tracer_provider.force_flush()
                        before = sink.counts()
                        results[variant][kind].append(n / workload.run(n))
                        if tracer_provider is not None:
                            tracer_provider.force_flush()  # untimed: what the run exported
                            after = sink.counts()
                            exported[variant][kind][0] += after["spans"] - before["spans"]
                            exported[variant][kind][1] += after["bytes"] - before["bytes"]
                        if kind == "handshakes":
                            workload.close()
    finally:
        sink.close()
    per_unit = {
        variant: {
            kind: {
                "spans": exported[variant][kind][0] / (n * rounds),
                "bytes": exported[variant][kind][1] / (n * rounds),
            }
            for kind, n in (("messages", messages), ("handshakes", handshakes))
        }
        for variant in exported
    }
    return results, per_unit


def render(summary, per_unit, args, info) -> str:
    labels = {v: label.format(share=args.share) for v, label in VARIANTS.items()}
    lines = variant_table(summary, labels)
    h, t = summary["h"], summary["t"]
    lines += [
        "",
        f"(t) against (h): messages {t['messages'] / h['messages']:.2f}, "
        f"handshakes {t['handshakes'] / h['handshakes']:.2f}.",
        "",
        "| exported per operation | (h) spans | (h) OTLP bytes | (t) spans | (t) OTLP bytes |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, name in (("messages", "message round trip"), ("handshakes", "handshake")):
        hh, tt = per_unit["h"][kind], per_unit["t"][kind]
        lines.append(
            f"| {name} | {hh['spans']:.2f} | {hh['bytes']:,.0f} | "
            f"{tt['spans']:.2f} | {tt['bytes']:,.0f} |"
        )
    lines += [
        "",
        f"`python -m benchmarks.tail_vs_head --rounds {args.rounds} "
        f"--messages {args.messages} --handshakes {args.handshakes} --share {args.share}`",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--handshakes", type=int, default=100)
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.pop("OTEL_SDK_DISABLED", None)
    started = time.monotonic()
    results, per_unit = measure(args.rounds, args.messages, args.handshakes, args.share)
    summary = summarize(results)
    info = machine()
    if args.json:
        print(json.dumps({"summary": summary, "exported": per_unit, "machine": info}, indent=2))
    print(render(summary, per_unit, args, info))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
