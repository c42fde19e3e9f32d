"""What a /metrics scrape costs, and whether it grows with sessions and messages.

    python -m benchmarks.scrape [--sessions 10000] [--messages 1000000] [--scrapes 30]

One process with the telemetry ``sage-otel demo`` sets up (``configure()``: /metrics with
exemplars, traces on) does real SAGE work through the instrumented agent core: handshakes
between a server identity and enough client identities to hold ``--sessions`` live sessions
(the per-peer cap is 64), then ``--messages`` 1 KiB round trips spread over them. At each
checkpoint it scrapes /metrics over HTTP ``--scrapes`` times in each format and reports the
median and 90th percentile time, the size and the number of lines. The last checkpoint is
also scraped while a thread keeps sending messages, and a running unthrottled
``sage-otel demo --in-process`` is scraped too (its event loop busy, as in a loaded agent).
Target (docs/performance.md): median <= 5 ms, and time and size flat across checkpoints
(the label sets are closed enums, so the series count must not grow with sessions or
messages).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import urllib.request

from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.handshake import HandshakeLimiter, Initiator, Responder
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.message import MessageValidator, seal
from sage_otel.agent.session import Session, SessionLimits, SessionManager
from sage_otel.telemetry.setup import configure

FORMATS = {
    "text": "text/plain;version=0.0.4",
    "OpenMetrics": "application/openmetrics-text;version=1.0.0",
}
TARGET_MS = 5.0
PER_PEER = 60
_LIVE = SessionLimits(max_age=1e9, idle_timeout=1e9, max_messages=10**12)


async def open_sessions(count: int) -> list[tuple[Session, Session]]:
    """``count`` live (client, server) session pairs from real handshakes."""
    registry = InMemoryRegistry()
    server = AgentIdentity.generate("solana")
    clients = [AgentIdentity.generate("ethereum") for _ in range(-(-count // PER_PEER))]
    for identity in (server, *clients):
        document = DIDDocument.for_identity(identity)
        await registry.register(document, sign_registration(identity, document))
    resolver = DIDResolver(registry, ttl=1e9)
    server_sessions = SessionManager(_LIVE, max_sessions=count + 1)
    responder = Responder(
        server, resolver, server_sessions, limiter=HandshakeLimiter("1000000000/second")
    )
    peer = await resolver.resolve(server.did)
    pairs = []
    for index in range(count):
        initiator = Initiator(clients[index // PER_PEER], SessionManager(_LIVE))
        pending = initiator.init(peer)
        request = pending.request
        answer, server_session = await responder.process(
            request.init_did, request.payload, request.signature
        )
        pairs.append((initiator.finalize(pending, answer), server_session))
    return pairs


def send(pairs: list[tuple[Session, Session]], n: int, stop: threading.Event | None = None) -> int:
    validator, payload, done = MessageValidator(), b"x" * 1024, 0
    while done < n and not (stop and stop.is_set()):
        client, server = pairs[done % len(pairs)]
        wire = seal(client, payload).to_wire()
        validator.open_wire(server, wire["payload"], wire["metadata"])
        done += 1
    return done


def scrape(url: str, accept: str, times: int) -> dict[str, float]:
    durations, size, lines = [], 0, 0
    for _ in range(times):
        request = urllib.request.Request(url, headers={"Accept": accept})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = answer.read()
        durations.append(time.perf_counter() - started)
        size, lines = len(body), body.count(b"\n")
    durations.sort()
    return {
        "median_ms": 1000 * statistics.median(durations),
        "p90_ms": 1000 * durations[int(len(durations) * 0.9)],
        "kb": size / 1000,
        "lines": lines,
    }


def demo_scrape(times: int) -> dict[str, dict[str, float]]:
    """/metrics of an unthrottled demo: the event loop busy, as in a loaded agent."""
    import os
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    demo = subprocess.Popen(
        [sys.executable, "-m", "sage_otel.cli", "demo", "--in-process", "--rate", "0",
         "--clients", "8", "--metrics-port", str(port), "--duration", "120"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(10)
        url = f"http://127.0.0.1:{port}/metrics"
        return {f: scrape(url, a, times) for f, a in FORMATS.items()}
    finally:
        demo.terminate()
        demo.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args(argv)
    telemetry = configure(service_name="scrape-bench", metrics_port=0, otlp=False)
    host, port = telemetry.metrics_address
    url = f"http://{host}:{port}/metrics"
    rows: list[tuple[str, dict[str, dict[str, float]]]] = []

    def checkpoint(name: str) -> None:
        rows.append((name, {f: scrape(url, a, args.scrapes) for f, a in FORMATS.items()}))
        print(
            f"{name}: "
            + ", ".join(
                f"{f} {r['median_ms']:.2f} ms {r['kb']:.1f} KB" for f, r in rows[-1][1].items()
            ),
            flush=True,
        )

    pairs = asyncio.run(open_sessions(10))
    send(pairs, 1000)
    checkpoint("warm: 10 sessions, 1,000 messages")
    started = time.perf_counter()
    pairs += asyncio.run(open_sessions(args.sessions - len(pairs)))
    print(f"{len(pairs):,} sessions in {time.perf_counter() - started:.0f} s", flush=True)
    checkpoint(f"{len(pairs):,} live sessions")
    started = time.perf_counter()
    sent = send(pairs, args.messages)
    print(f"{sent:,} messages in {time.perf_counter() - started:.0f} s", flush=True)
    checkpoint(f"{len(pairs):,} live sessions, {sent + 1000:,} messages")
    stop = threading.Event()
    load = threading.Thread(target=send, args=(pairs, 10**12, stop), daemon=True)
    load.start()
    checkpoint("the same, scraped while messages are sent")
    stop.set()
    load.join()
    rows.append(("`sage-otel demo --in-process --rate 0`, 8 clients", demo_scrape(args.scrapes)))

    print()
    print("| checkpoint | format | median | p90 | size | lines |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, result in rows:
        for fmt, r in result.items():
            print(
                f"| {name} | {fmt} | {r['median_ms']:.2f} ms | {r['p90_ms']:.2f} ms | "
                f"{r['kb']:.1f} KB | {r['lines']} |"
            )
    idle = [r for name, result in rows[:3] for r in result.values()]
    worst = max(r["median_ms"] for r in idle)
    growth = max(rows[2][1][f]["median_ms"] / rows[0][1][f]["median_ms"] for f in FORMATS)
    print()
    sizes = ", ".join(f"{rows[0][1][f]['kb']:.1f} -> {rows[2][1][f]['kb']:.1f} KB" for f in FORMATS)
    print(
        f"worst median {worst:.2f} ms (target <= {TARGET_MS} ms); "
        f"time at the last checkpoint / the first: {growth:.2f}; sizes {sizes}"
    )
    telemetry.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
