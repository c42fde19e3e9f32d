"""Handshakes against their crypto floor, in process and over HTTP, in one run.

    python -m benchmarks.handshakes [--rounds 3] [--handshakes 300] [--seconds 4]

For each identity type (both agents Ed25519, or both secp256k1), in interleaved rounds:

* the floor: the sum of the public-key operations a handshake must do, each with the fastest
  well-kept implementation installed (``benchmarks.crypto_floor``);
* in process: init, process and finalize back to back, uninstrumented (a) and with sage-otel
  metrics (b), as ``benchmarks.run`` measures them;
* over HTTP: ``sage-otel serve --chain <type>`` (telemetry on) in its own process, 16
  concurrent aiohttp clients in this one, each handshaking with fresh client identities in
  turn so that neither the per-DID handshake rate nor the per-peer session cap is what is
  measured.

The ratio to the floor is floor time / handshake time (1.0 = nothing but the floor's crypto).
Over HTTP the two sides run on two cores at once, so it can exceed what one core allows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .crypto_floor import fastest, floor_us, primitives
from .http_path import start_sage, stop, summary, use_uvloop
from .run import SETUPS
from .workloads import Handshake

CHAINS = {"solana": "Ed25519", "ethereum": "secp256k1"}
CONCURRENCY = 16
IDENTITIES_PER_CLIENT = 16


def in_process(chain: str, variant: str, n: int) -> float:
    """Handshakes per second for one variant of benchmarks.run (a: plain, b: metrics)."""
    with SETUPS[variant]():  # type: ignore[attr-defined]
        shake = Handshake(chain, chain)
        try:
            shake.run(max(1, n // 10))
            return n / shake.run(n)
        finally:
            shake.close()


async def over_http(url: str, did: str, registry: Path, chain: str, seconds: float) -> list[float]:
    from sage_otel.agent.did import DIDDocument, DIDResolver, JsonFileRegistry, sign_registration
    from sage_otel.agent.identity import AgentIdentity
    from sage_otel.agent.transport import AiohttpSession, ClientAgent

    store = JsonFileRegistry(registry)
    http = AiohttpSession(limit=CONCURRENCY * 2)
    clients: list[list[ClientAgent]] = []
    for _ in range(CONCURRENCY):
        agents = []
        for _ in range(IDENTITIES_PER_CLIENT):
            identity = AgentIdentity.generate(chain)
            document = DIDDocument.for_identity(identity)
            await store.register(document, sign_registration(identity, document))
            agents.append(ClientAgent(identity, DIDResolver(store), http=http))
        clients.append(agents)
    for agents in clients:  # warm the resolvers: the server's document is fetched once each
        for agent in agents:
            await agent.resolver.resolve(did)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(agents: list[ClientAgent]) -> None:
        turn = 0
        while time.perf_counter() < deadline:
            agent = agents[turn % len(agents)]
            turn += 1
            started = time.perf_counter()
            await agent.connect(url, did)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(agents) for agents in clients))
    for agents in clients:
        for agent in agents:
            agent.sessions.close_all()
    await http.aclose()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    use_uvloop()
    floors: dict[str, list[float]] = {c: [] for c in CHAINS}
    rates: dict[str, dict[str, list[float]]] = {c: {"a": [], "b": [], "http": []} for c in CHAINS}
    http_latency: dict[str, list[dict[str, float]]] = {c: [] for c in CHAINS}
    timings = primitives()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_index in range(args.rounds):
            timings = primitives()
            for chain in CHAINS:
                floors[chain].append(floor_us(timings, chain, chain))
                for variant in ("a", "b"):
                    rates[chain][variant].append(in_process(chain, variant, args.handshakes))
                server, url, did = start_sage(workdir, telemetry=True, chain=chain)
                try:
                    latencies = asyncio.run(
                        over_http(url, did, workdir / "registry.json", chain, args.seconds)
                    )
                finally:
                    stop(server)
                result = summary(latencies, args.seconds)
                rates[chain]["http"].append(result["per_s"])
                http_latency[chain].append(result)
            print(
                f"round {round_index + 1}: "
                + ", ".join(
                    f"{c}: floor {floors[c][-1]:.0f} us, "
                    + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates[c].items())
                    for c in CHAINS
                ),
                flush=True,
            )
    print()
    print("Fastest implementation of each primitive (last round):")
    print()
    print("| operation | fastest | us per call | others |")
    print("| --- | --- | ---: | --- |")
    for op, (impl, us) in fastest(timings).items():
        others = ", ".join(f"{k} {v:.1f}" for k, v in timings[op].items() if k != impl)
        print(f"| {op} | {impl} | {us:.1f} | {others or '-'} |")
    print()
    print(
        "| identity type | crypto floor | (a) in process | (a) / floor | (b) metrics | "
        "(b) / floor | over HTTP (p50, p99) | HTTP / floor |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for chain, label in CHAINS.items():
        floor = statistics.median(floors[chain])
        a, b, http = (statistics.median(rates[chain][k]) for k in ("a", "b", "http"))
        p50 = statistics.median(r["p50_ms"] for r in http_latency[chain])
        p99 = statistics.median(r["p99_ms"] for r in http_latency[chain])
        print(
            f"| {label} | {floor:.0f} us | {a:,.0f}/s ({1e6 / a:.0f} us) | {floor * a / 1e6:.2f} "
            f"| {b:,.0f}/s | {floor * b / 1e6:.2f} | {http:,.0f}/s ({p50:.2f}, {p99:.2f} ms) "
            f"| {floor * http / 1e6:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
