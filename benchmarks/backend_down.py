"""What a telemetry backend that is down costs SAGE: throughput, shutdown time, memory.

For each OTLP protocol (http/protobuf, grpc) the demo runs unthrottled with 100% tracing
against a healthy receiver, a refused port and a black hole (accepts, never answers), in
interleaved rounds; the figure is the median messages/s of each, as a ratio to the healthy
run of the same protocol in the same round, plus the time from SIGTERM to exit.

    python -m benchmarks.backend_down --rounds 3 --seconds 8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BIN = Path(sys.executable).parent / "sage-otel"


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def healthy_http() -> tuple[int, object]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server


def healthy_grpc() -> tuple[int, object]:
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2,
        metrics_service_pb2_grpc,
    )
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return port, server


def black_hole() -> tuple[int, object]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1], (sock, held)


def refused() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(seconds: float, port: int | None, protocol: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    if port is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    argv = [str(BIN), "demo", "--rate", "0", "--json", "--metrics-port", "0"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    time.sleep(seconds)
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    exit_s = time.monotonic() - stopped
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return {"messages_per_s": summary["messages_per_s"], "exit_s": exit_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    http_port, _http = healthy_http()
    grpc_port, _grpc = healthy_grpc()
    hole_port, _hole = black_hole()
    scenarios = {
        ("http/protobuf", "healthy"): http_port,
        ("http/protobuf", "refused"): refused(),
        ("http/protobuf", "black hole"): hole_port,
        ("grpc", "healthy"): grpc_port,
        ("grpc", "refused"): refused(),
        ("grpc", "black hole"): hole_port,
    }
    results: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in scenarios}
    for round_index in range(args.rounds):
        for (protocol, backend), port in scenarios.items():
            result = run_demo(args.seconds, port, protocol)
            results[protocol, backend].append(result)
            print(f"round {round_index + 1} {protocol:13} {backend:10} {result}", flush=True)
    rows = []
    for (protocol, backend), runs in results.items():
        rate = statistics.median(r["messages_per_s"] for r in runs)
        healthy = statistics.median(r["messages_per_s"] for r in results[protocol, "healthy"])
        rows.append(
            {
                "protocol": protocol,
                "backend": backend,
                "messages_per_s": rate,
                "ratio_to_healthy": round(rate / healthy, 3),
                "max_exit_s": round(max(r["exit_s"] for r in runs), 2),
            }
        )
    print(
        "| protocol | backend | messages/s (median) | ratio to healthy | exit after SIGTERM (max) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['protocol']} | {row['backend']} | {row['messages_per_s']:.0f} | "
            f"{row['ratio_to_healthy']:.3f} | {row['max_exit_s']:.2f} s |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
