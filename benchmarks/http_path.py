"""SAGE over HTTP against a bare HTTP echo on the same stacks, in one run.

The server runs in its own process (uvicorn, with httptools and uvloop when installed), the
clients in this one (aiohttp, 16 concurrent), so each side has a core of its own. Three
servers take turns, in interleaved rounds: a bare Starlette JSON echo with a body of a SAGE
message's size, `sage-otel serve` with telemetry, and the same with OTEL_SDK_DISABLED=true.

    python -m benchmarks.http_path --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BIN = Path(sys.executable).parent / "sage-otel"
CONCURRENCY = 16


async def _echo(request: Request) -> Response:
    body = await request.body()
    return Response(
        b'{"success":true,"data":"' + body[:400] + b'"}\n', media_type="application/json"
    )


async def _health(_request: Request) -> Response:
    return Response(b'{"status":"ok"}')


app = Starlette(routes=[Route("/messages", _echo, methods=["POST"]), Route("/healthz", _health)])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    # Throughput, not admission control: the server's global handshake rate (200/s by
    # default, docs/security.md) would cap the handshake benchmark, so it is off here.
    env.update(NO_PROXY="127.0.0.1,localhost", SAGE_OTEL_HANDSHAKE_RATE="0", **extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(300):
        try:
            with opener.open(url + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} never became healthy")


def start_echo() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.http_path:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    return process, url


def start_sage(
    workdir: Path, telemetry: bool, chain: str = "solana"
) -> tuple[subprocess.Popen, str, str]:
    port, metrics = _free_port(), _free_port()
    env = _env() if telemetry else _env(OTEL_SDK_DISABLED="true")
    process = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics),
            "--identity",
            str(workdir / f"server-{telemetry}-{chain}.json"),
            "--registry",
            str(workdir / "registry.json"),
            "--chain",
            chain,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline()
    did = line.split()[0].removeprefix("did=")
    return process, f"http://127.0.0.1:{port}", did


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


async def bare_load(url: str, seconds: float, size: int) -> list[float]:
    import aiohttp

    body = json.dumps({"payload": "A" * size}).encode()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(trust_env=False) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(
                    url + "/messages", data=body, headers={"content-type": "application/json"}
                ) as answer:
                    await answer.read()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return latencies


async def sage_load(url: str, did: str, registry: Path, seconds: float) -> list[float]:
    from sage_otel.agent.did import DIDDocument, DIDResolver, JsonFileRegistry, sign_registration
    from sage_otel.agent.errors import PeerError
    from sage_otel.agent.identity import AgentIdentity
    from sage_otel.agent.session import SessionLimits, SessionManager
    from sage_otel.agent.transport import SESSION_GONE, AiohttpSession, ClientAgent

    store = JsonFileRegistry(registry)
    http = AiohttpSession(limit=CONCURRENCY * 2)
    agents = []
    for index in range(CONCURRENCY):
        identity = AgentIdentity.generate(("solana", "ethereum")[index % 2])
        document = DIDDocument.for_identity(identity)
        await store.register(document, sign_registration(identity, document))
        agents.append(
            ClientAgent(
                identity,
                DIDResolver(store),
                http=http,
                sessions=SessionManager(SessionLimits(max_messages=10**9)),
            )
        )
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(agent: ClientAgent) -> None:
        conn = await agent.connect(url, did)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await agent.send(conn, "x" * 200)
            except PeerError as error:  # the server's 1000-message limit: a new session
                if error.code not in SESSION_GONE:
                    raise
                conn = await agent.connect(url, did)
                continue
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(a) for a in agents))
    await http.aclose()
    return latencies


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "per_s": len(ordered) / seconds,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)],
    }


def use_uvloop() -> None:
    """The clients' event loop: uvloop where it is installed, as for the server."""
    try:
        import uvloop
    except ImportError:  # not built for this platform
        return
    uvloop.install()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    use_uvloop()
    results: dict[str, list[dict[str, float]]] = {"bare": [], "sage": [], "sage-off": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_index in range(args.rounds):
            echo, echo_url = start_echo()
            try:
                results["bare"].append(
                    summary(asyncio.run(bare_load(echo_url, args.seconds, 400)), args.seconds)
                )
            finally:
                stop(echo)
            for name, telemetry in (("sage", True), ("sage-off", False)):
                server, url, did = start_sage(workdir, telemetry)
                try:
                    latencies = asyncio.run(
                        sage_load(url, did, workdir / "registry.json", args.seconds)
                    )
                    results[name].append(summary(latencies, args.seconds))
                finally:
                    stop(server)
            print(
                f"round {round_index + 1}: "
                + json.dumps({k: round(v[-1]["per_s"]) for k, v in results.items()}),
                flush=True,
            )
    med = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    bare = med["bare"]["per_s"]
    print("| server | per second | ratio to bare echo | p50 | p99 |")
    print("| --- | --- | --- | --- | --- |")
    for name, label in (
        ("bare", "bare Starlette echo"),
        ("sage", "SAGE, telemetry on"),
        ("sage-off", "SAGE, OTEL_SDK_DISABLED"),
    ):
        row = med[name]
        print(
            f"| {label} | {row['per_s']:.0f} | {row['per_s'] / bare:.2f} | "
            f"{row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms |"
        )
    print(f"telemetry on/off: {med['sage']['per_s'] / med['sage-off']['per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
