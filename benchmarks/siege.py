"""Siege: legitimate SAGE clients against `sage-otel serve` under each network-edge attack.

    python -m benchmarks.siege --seconds-per-phase S --out FILE.json
                               [--attacks a,b,...] [--clients N] [--rate R] [--scale F]

Measures issue 16's "Done when": under each attack, run against ``sage-otel serve`` with its
default settings, legitimate clients keep at least 99 % of their handshakes and messages and
their p99 latency within 2x of baseline, the server's RSS grows by at most 50 MB, and no
answer is a 5xx.

Three kinds of process (this machine has two cores):

* the server: ``sage-otel serve --workers 1`` as a user starts it, no ``SAGE_OTEL_*``
  variable, the default soft limit of 1,024 file descriptors, its identity and the shared
  JSON registry in a temp dir (pre-filled with ``--registry-size`` documents, 20,000 by
  default, before the baseline, so that every phase has the same registry);
* the legitimate clients (this process, :class:`benchmarks.soak.Legit`): N ClientAgents
  with registered DIDs, each doing a handshake, K paced messages, a close, in a loop, every
  handshake's and message's outcome and latency recorded;
* the attacker (:mod:`benchmarks.siege_attacks`), one process per attack, which runs alone
  for S seconds after the baseline, then a recovery gap.

Per phase: legit handshake and message success, p50/p99 and the p99 ratio to baseline, the
server's RSS (start, max, end) and open file descriptors, the 5xx answers anybody saw, the
attack's own figures, and whether the targets are met. Markdown on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .siege_attacks import ATTACKS, append_registrations, new_registrations
from .soak import (
    Legit,
    load_identity,
    machine_facts,
    make_secrets,
    percentile,
    proc_cpu_ticks,
    proc_rss_kb,
    register_all,
    summarize,
    system_busy_ticks,
)

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_NOFILE = 1024  # the usual default soft limit: the server keeps it
TARGET_SUCCESS = 99.0  # percent
TARGET_P99_RATIO = 2.0
TARGET_RSS_GROWTH_MB = 50.0
FIRST_LINE = re.compile(r"^did=(\S+) url=(\S+) metrics=(\S+)$")
DEFAULT_ATTACKS = list(ATTACKS)


# -- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def user_env() -> dict[str, str]:
    """The environment of a user who set nothing: no SAGE_OTEL_*, OTEL_* or PROMETHEUS_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SAGE_OTEL_", "OTEL_", "PROMETHEUS_"))
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def server_nofile() -> None:
    """In the server's child process: the 1,024 soft limit it would have from a login shell."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = SERVER_NOFILE if hard == resource.RLIM_INFINITY else min(SERVER_NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def cpu_split(pin: bool) -> tuple[set[int], set[int]] | None:
    """With ``--pin-attacker`` on 2+ CPUs: (the server's and clients' CPUs, the attacker's
    last one), so the attacker's own CPU use is not taken from the server, as with a remote
    attacker. Without it they share every CPU (the strictest setting on a small machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None
    return set(cpus[:-1]), {cpus[-1]}


@dataclass
class Server:
    process: asyncio.subprocess.Process
    stderr_path: Path
    did: str
    base: str
    metrics: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def open_fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None


async def start_server(tmp: Path, cpus: set[int] | None = None) -> Server:
    port, metrics_port = free_port(), free_port()
    stderr_path = tmp / "server.stderr"
    with open(stderr_path, "wb") as err:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "sage-otel"),
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--workers",
            "1",
            "--identity",
            str(tmp / "identity.json"),
            "--registry",
            str(tmp / "registry.json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env=user_env(),
            cwd=tmp,
            preexec_fn=lambda: (server_nofile(), cpus and os.sched_setaffinity(0, cpus)),
        )
    line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode().strip()
    match = FIRST_LINE.match(line)
    if not match:
        raise RuntimeError(f"sage-otel serve did not start: {line!r}, see {stderr_path}")
    did, base, metrics = match.groups()
    return Server(process, stderr_path, did, base, metrics)


async def stop_server(server: Server) -> int | None:
    if server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.process.wait(), 30)
        except asyncio.TimeoutError:
            server.process.kill()
            await server.process.wait()
    return server.process.returncode


# -- the registry -----------------------------------------------------------------------------


async def prefill_registry(path: Path, count: int) -> float:
    """``count`` self-signed DID registrations in the registry file, written at once
    (registering them one by one rewrites the whole file each time); the seconds it took.
    The file is read back through JsonFileRegistry, which verifies every entry, so a change
    of its format fails here, not silently."""
    from sage_otel.agent.did import JsonFileRegistry

    started = time.perf_counter()
    fresh = new_registrations(count)
    append_registrations(path, [entry for _identity, entry in fresh])
    if fresh:
        check = JsonFileRegistry(path)
        ends = [identity.did for identity, _entry in (fresh[0], fresh[-1])]
        found = [await check.lookup(did) for did in ends]
        if check.refused or None in found:
            raise RuntimeError(f"{path}: the pre-filled registry does not read back")
    return time.perf_counter() - started


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class Monitor:
    """The server's RSS and open descriptors every half second, the 5xx answers the legit
    clients saw, and CPU counters at phase boundaries."""

    server: Server
    legit: Legit
    samples: list[dict[str, Any]] = field(default_factory=list)
    legit_5xx: collections.Counter = field(default_factory=collections.Counter)
    legit_status: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    marks: dict[str, dict[str, Any]] = field(default_factory=dict)
    attacker_pid: int = 0

    async def on_response(self, response: Any) -> None:
        self.legit_status[self.legit.phase][str(response.status_code)] += 1
        if response.status_code >= 500:
            self.legit_5xx[self.legit.phase] += 1

    async def sample_forever(self) -> None:
        while True:
            self.samples.append(
                {
                    "t": round(time.monotonic() - self.legit.t0, 2),
                    "phase": self.legit.phase,
                    "rss_kb": proc_rss_kb(self.server.pid),
                    "fds": self.server.open_fds(),
                }
            )
            await asyncio.sleep(0.5)

    def mark(self, key: str) -> None:
        busy, total = system_busy_ticks()
        self.marks[key] = {
            "t": time.monotonic(),
            "server": proc_cpu_ticks(self.server.pid),
            "clients": proc_cpu_ticks(os.getpid()),
            "attacker": proc_cpu_ticks(self.attacker_pid) if self.attacker_pid else None,
            "busy": busy,
            "total": total,
            "rss_kb": proc_rss_kb(self.server.pid),
        }

    def cpu(self, phase: str) -> dict[str, float | None]:
        start, end = self.marks.get(f"{phase}:start"), self.marks.get(f"{phase}:end")
        if not start or not end or end["t"] <= start["t"]:
            return {}
        wall = end["t"] - start["t"]

        def cores(key: str) -> float | None:
            if start[key] is None or end[key] is None:
                return None
            return round((end[key] - start[key]) / CLK_TCK / wall, 2)

        figures = {
            "server_cores": cores("server"),
            "clients_cores": cores("clients"),
            "attacker_cores": cores("attacker"),
            "machine_busy_cores": cores("busy"),
        }
        ours = sum(v or 0 for k, v in figures.items() if k != "machine_busy_cores")
        # Other processes on the machine (builds, other tests): noise in every latency here.
        figures["other_processes_cores"] = round((figures["machine_busy_cores"] or 0) - ours, 2)
        return figures


# -- figures ----------------------------------------------------------------------------------


def handshake_figures(legit: Legit, phase: str) -> dict[str, Any]:
    rows = [r for r in legit.handshakes if r.phase == phase]
    ok = sorted(r.latency for r in rows if r.code == "ok")
    return {
        "count": len(rows),
        "ok": len(ok),
        "success_pct": round(100.0 * len(ok) / len(rows), 2) if rows else None,
        "errors": dict(collections.Counter(r.code for r in rows if r.code != "ok")),
        "p50_ms": round(percentile(ok, 50) * 1e3, 2),
        "p99_ms": round(percentile(ok, 99) * 1e3, 2),
    }


def phase_figures(monitor: Monitor, phase: str, attack: dict[str, Any] | None) -> dict[str, Any]:
    legit = monitor.legit
    messages = summarize(legit.messages, phase)
    rows = [s for s in monitor.samples if s["phase"] == phase and s["rss_kb"]]
    start_kb = (monitor.marks.get(f"{phase}:start") or {}).get("rss_kb") or (
        rows[0]["rss_kb"] if rows else None
    )
    rss = [s["rss_kb"] for s in rows] + ([start_kb] if start_kb else [])
    fds = [s["fds"] for s in rows if s["fds"] is not None]
    legit_5xx = monitor.legit_5xx.get(phase, 0)
    attack_5xx = (attack or {}).get("status_5xx", 0)
    return {
        "handshakes": handshake_figures(legit, phase),
        "messages": {
            **messages,
            "success_pct": (
                round(100.0 * messages["success_rate"], 2)
                if messages["success_rate"] is not None
                else None
            ),
        },
        "legit_answers_by_status": dict(monitor.legit_status.get(phase, {})),
        "server_rss_mb": {
            "start": round(start_kb / 1024, 1) if start_kb else None,
            "max": round(max(rss) / 1024, 1) if rss else None,
            "end": round(rows[-1]["rss_kb"] / 1024, 1) if rows else None,
        },
        "server_fds_max": max(fds) if fds else None,
        "cpu": monitor.cpu(phase),
        "status_5xx": {"legit": legit_5xx, "attacker": attack_5xx, "total": legit_5xx + attack_5xx},
    }


def rss_overall(monitor: Monitor) -> dict[str, float | None]:
    """The server's RSS from the baseline's start to the end of the last attack: what all the
    attacks left behind together (sessions live on for their idle timeout)."""
    start = (monitor.marks.get("baseline:start") or {}).get("rss_kb")
    rows = [s["rss_kb"] for s in monitor.samples if s["rss_kb"]]
    if not start or not rows:
        return {}
    return {
        "baseline_start": round(start / 1024, 1),
        "max": round(max(rows) / 1024, 1),
        "end": round(rows[-1] / 1024, 1),
        "growth_to_max": round((max(rows) - start) / 1024, 1),
    }


def verdict(figures: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for one phase, each with its figure."""
    hs, msg = figures["handshakes"], figures["messages"]

    def ratio(now: float, base: float) -> float | None:
        return round(now / base, 2) if base and now else None

    msg_ratio = ratio(msg["p99_ms"], baseline["messages"]["p99_ms"])
    hs_ratio = ratio(hs["p99_ms"], baseline["handshakes"]["p99_ms"])
    rss = figures["server_rss_mb"]
    growth = round(rss["max"] - rss["start"], 1) if rss["max"] and rss["start"] else None
    checks = {
        "handshakes_ok": (hs["success_pct"] or 0) >= TARGET_SUCCESS,
        "messages_ok": (msg["success_pct"] or 0) >= TARGET_SUCCESS,
        "message_p99_ratio_ok": msg_ratio is not None and msg_ratio <= TARGET_P99_RATIO,
        "rss_growth_ok": growth is not None and growth <= TARGET_RSS_GROWTH_MB,
        "no_5xx": figures["status_5xx"]["total"] == 0,
    }
    return {
        "message_p99_ratio": msg_ratio,
        # Informative only: with 4 handshakes/s a phase has ~80, whose p99 is their maximum.
        "handshake_p99_ratio": hs_ratio,
        "rss_growth_mb": growth,
        "checks": checks,
        "meets_targets": all(checks.values()),
    }


def size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"


def attack_brief(attack: dict[str, Any]) -> str:
    """The attack's own figures in one table cell."""
    if not attack:
        return ""
    parts = []
    if attack.get("connections_wanted"):
        parts.append(
            f"held {attack['connections_held_median']}/{attack['connections_wanted']} "
            f"(max {attack['connections_held_max']})"
        )
    if attack.get("bytes_sent"):
        parts.append(f"{size(attack['bytes_sent'])} sent")
    if attack.get("requests"):
        parts.append(f"{attack['requests']} req")
    for key in ("pushes_received", "dids_registered", "sessions_opened", "unknown_handshakes"):
        if key in attack:
            value = attack[key]
            parts.append(f"{key} {sum(value.values()) if isinstance(value, dict) else value}")
    if attack.get("bytes_written_by_endpoint"):
        parts.append(f"endpoint wrote {size(sum(attack['bytes_written_by_endpoint'].values()))}")
    answers = attack.get("answers_by_status") or {}
    if answers:
        parts.append("answers " + " ".join(f"{k}:{v}" for k, v in answers.items()))
    if attack.get("untyped_answers"):
        parts.append(f"untyped {attack['untyped_answers']}")
    return "; ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    head = (
        "| phase | handshakes ok | messages ok | p50 ms | p99 ms | p99 x | hs p99 x (info) "
        "| RSS MB start/max/end | fds max | 5xx | attack | meets |"
    )
    lines = [head, "|" + "---|" * 12]
    for name, phase in report["phases"].items():
        hs, msg, rss = phase["handshakes"], phase["messages"], phase["server_rss_mb"]
        v = phase.get("verdict") or {}
        meets = "" if name == "baseline" else ("yes" if v.get("meets_targets") else "**no**")
        lines.append(
            f"| {name} | {hs['success_pct']}% ({hs['ok']}/{hs['count']}) "
            f"| {msg['success_pct']}% ({msg['ok']}/{msg['sent']}) "
            f"| {msg['p50_ms']} | {msg['p99_ms']} | {v.get('message_p99_ratio', '')} "
            f"| {v.get('handshake_p99_ratio', '')} "
            f"| {rss['start']}/{rss['max']}/{rss['end']} | {phase['server_fds_max']} "
            f"| {phase['status_5xx']['total']} "
            f"| {attack_brief(report['attacks'].get(name, {}))} | {meets} |"
        )
    others = [
        p["cpu"].get("other_processes_cores")
        for p in report["phases"].values()
        if p["cpu"].get("other_processes_cores") is not None
    ]
    if others:
        lines.append(
            f"\nOther processes on this {report['machine']['nproc']}-core machine used "
            f"{min(others)}-{max(others)} cores per phase. Server RSS over the whole run: "
            f"{report['server']['rss_mb']}."
        )
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------


def _attacker_process(cpus: set[int] | None, nice: int) -> None:
    """In the attacker's child before exec: its CPUs and its priority."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    if nice:
        os.nice(nice)


async def run_attack(
    args: argparse.Namespace,
    name: str,
    server: Server,
    tmp: Path,
    monitor: Monitor,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """One attack alone for the phase: set up (not counted), run, let it finish."""
    legit = monitor.legit
    out = tmp / f"attack-{name}.json"
    with open(out.with_suffix(".stderr"), "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.siege_attacks",
            name,
            "--base",
            server.base,
            "--server-did",
            server.did,
            "--registry",
            str(tmp / "registry.json"),
            "--seconds",
            str(args.seconds_per_phase),
            "--scale",
            str(args.scale),
            "--out",
            str(out),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env=user_env(),
            preexec_fn=lambda: _attacker_process(cpus, args.attacker_nice),
        )
    legit.phase = f"setup:{name}"
    ready = await asyncio.wait_for(proc.stdout.readline(), 300)
    if ready.strip() != b"READY":
        raise RuntimeError(
            f"attacker {name} not ready: {ready!r}; see {out.with_suffix('.stderr')}"
        )
    proc.stdin.write(b"GO\n")
    await proc.stdin.drain()
    legit.phase = name
    monitor.attacker_pid = proc.pid
    monitor.mark(f"{name}:start")
    print(f"siege: {name} for {args.seconds_per_phase} s", flush=True)
    await asyncio.sleep(args.seconds_per_phase)
    monitor.mark(f"{name}:end")
    legit.phase = f"recovery:{name}"
    done = await asyncio.wait_for(proc.stdout.readline(), args.seconds_per_phase + 120)
    await asyncio.wait_for(proc.wait(), 60)
    if done.strip() != b"DONE":
        raise RuntimeError(f"attacker {name} failed; see {out.with_suffix('.stderr')}")
    await asyncio.sleep(args.gap)
    return json.loads(out.read_text())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from sage_otel.agent.did import DIDResolver, JsonFileRegistry
    from sage_otel.agent.transport import ClientAgent

    attacks = [a for a in args.attacks.split(",") if a] if args.attacks else DEFAULT_ATTACKS
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise SystemExit(f"unknown attacks: {sorted(unknown)}")
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="sage-siege-"))
    print(f"siege: temp dir {tmp}", flush=True)
    prefill_seconds = await prefill_registry(tmp / "registry.json", args.registry_size)
    secrets = make_secrets(args.clients)
    await register_all(tmp / "registry.json", secrets)
    split = cpu_split(args.pin_attacker)
    if split:
        os.sched_setaffinity(0, split[0])
    server = await start_server(tmp, split[0] if split else None)
    print(f"siege: sage-otel serve pid {server.pid} at {server.base}", flush=True)

    legit = Legit(server.base, server.did, args.rate, args.messages_per_session)
    monitor = Monitor(server, legit)
    sampler = asyncio.create_task(monitor.sample_forever())
    agents = [
        ClientAgent(
            load_identity(entry),
            DIDResolver(JsonFileRegistry(tmp / "registry.json")),
            http=httpx.AsyncClient(
                timeout=10.0, trust_env=False, event_hooks={"response": [monitor.on_response]}
            ),
        )
        for entry in secrets["clients"]
    ]
    clients = [asyncio.create_task(legit.client_loop(i, a)) for i, a in enumerate(agents)]
    results: dict[str, dict[str, Any]] = {}
    try:
        await asyncio.sleep(args.warmup)
        legit.phase = "baseline"
        monitor.mark("baseline:start")
        steps = len(attacks) + 1
        print(f"siege: [1/{steps}] baseline for {args.seconds_per_phase} s", flush=True)
        await asyncio.sleep(args.seconds_per_phase)
        monitor.mark("baseline:end")
        legit.phase = "recovery:baseline"
        for number, name in enumerate(attacks, 2):
            print(f"siege: [{number}/{steps}] {name}", flush=True)
            attacker_cpus = split[1] if split else None
            results[name] = await run_attack(args, name, server, tmp, monitor, attacker_cpus)
    finally:
        legit.stop.set()
        await asyncio.wait(clients, timeout=30)
        for agent in agents:
            await agent.aclose()
        sampler.cancel()
        health = None
        with contextlib.suppress(Exception):
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
                health = (await http.get(server.base + "/healthz")).status_code
        alive = server.process.returncode is None
        exit_code = await stop_server(server)

    phases: dict[str, dict[str, Any]] = {}
    phases["baseline"] = phase_figures(monitor, "baseline", None)
    for name in attacks:
        figures = phase_figures(monitor, name, results[name])
        figures["verdict"] = verdict(figures, phases["baseline"])
        phases[name] = figures
    stderr_text = server.stderr_path.read_text(errors="replace")
    report = {
        "command": " ".join(["python", "-m", "benchmarks.siege", *sys.argv[1:]]),
        "machine": facts,
        "config": {
            "seconds_per_phase": args.seconds_per_phase,
            "warmup_seconds": args.warmup,
            "gap_seconds": args.gap,
            "clients": args.clients,
            "rate_per_client": args.rate,
            "messages_per_session": args.messages_per_session,
            "registry_size": args.registry_size,
            "registry_prefill_seconds": round(prefill_seconds, 1),
            "scale": args.scale,
            "server": "sage-otel serve --workers 1, default settings, RLIMIT_NOFILE soft 1024",
            "cpus": {"server_and_clients": sorted(split[0]), "attacker": sorted(split[1])}
            if split
            else "shared",
        },
        "targets": {
            "handshakes_pct": TARGET_SUCCESS,
            "messages_pct": TARGET_SUCCESS,
            "p99_ratio": TARGET_P99_RATIO,
            "rss_growth_mb": TARGET_RSS_GROWTH_MB,
            "status_5xx": 0,
        },
        "phases": phases,
        "attacks": results,
        "summary": {
            name: phases[name]["verdict"]["meets_targets"] for name in attacks if name in phases
        },
        "server": {
            "alive_at_end": alive,
            "healthz_at_end": health,
            "exit_code": exit_code,
            "stderr_tracebacks": stderr_text.count("Traceback"),
            "stderr_tail": stderr_text[-2000:],
            "rss_mb": rss_overall(monitor),
            "rss_timeline": [(s["t"], s["phase"], s["rss_kb"], s["fds"]) for s in monitor.samples],
        },
        "legit_closes": dict(legit.closes),
        "temp_dir": str(tmp),
    }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds-per-phase", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--gap", type=float, default=3.0, help="recovery after each attack")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s per client")
    parser.add_argument("--messages-per-session", type=int, default=20)
    parser.add_argument("--registry-size", type=int, default=20_000)
    parser.add_argument("--scale", type=float, default=1.0, help="times the attack connections")
    parser.add_argument("--attacks", default="", help="comma-separated (default: all, in order)")
    parser.add_argument(
        "--pin-attacker", action="store_true", help="the attacker on its own CPU (see cpu_split)"
    )
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacker at this nice value (19: it gets the CPU the server and the "
        "legitimate clients leave, as an attacker on another machine would)",
    )
    parser.add_argument("--out", default="/tmp/siege-result.json")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(report, indent=2, default=dict))
    print(markdown(report))
    print(f"siege: JSON in {args.out}")


if __name__ == "__main__":
    main()
