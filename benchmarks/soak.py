"""Soak test: legitimate SAGE traffic against a server agent, first alone, then under attack.

    python -m benchmarks.soak --minutes M [--baseline-minutes B] [--clients N] [--rate R]
                              [--attack-rate A] [--reconnect-every K] --out FILE.json

Three processes (this machine has two cores):

* the server (``benchmarks.soak_server``): one default-configured ServerAgent on 127.0.0.1,
  its identity and every DID document shared through a JsonFileRegistry in a temp dir;
* the legitimate clients (this process): N ClientAgents, each with its own registered DID,
  each sending R messages/s (paced, one in flight), reconnecting every K messages, and
  recording every message's outcome and latency (send to verified, decrypted reply);
* the attacker (``benchmarks.soak_attacker``), started after the baseline phase: replay-floor
  messages, session-table fill and hostile input, all at once, at a bounded total rate A.

Phases: a short warm-up (not counted), the baseline (B minutes, legit clients only), a
transition while the attacker sets up (not counted), and the attack (M minutes). The report
(stdout and ``--out``) has per phase: messages, success rate, latency percentiles; the
attack/baseline p99 ratio; the attacker's achieved rate and answers by status and code;
the server's RSS and CPU; the machine's load from other processes; whether the server
stayed up. Targets: legit success >= 99.9 %, p99 ratio <= 2.0, no 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import secrets as _secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_SUCCESS = 0.999
TARGET_P99_RATIO = 2.0
SESSION_GONE = {"session_expired", "unknown_session"}
QUIET_CORES = 0.25  # "quiet" 10 s windows: other processes used less than this many cores


# -- helpers shared with the server and attacker processes ---------------------------------


def new_secret_entry(chain: str) -> dict[str, str]:
    return {"chain": chain, "sign": _secrets.token_hex(32), "kem": _secrets.token_hex(32)}


def load_identity(entry: dict[str, str]):  # -> AgentIdentity
    from sage_otel.agent.identity import AgentIdentity

    return AgentIdentity.from_secrets(
        entry["chain"], bytes.fromhex(entry["sign"]), bytes.fromhex(entry["kem"])
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def proc_cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def proc_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def system_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- the legitimate clients -----------------------------------------------------------------


@dataclass
class Record:
    phase: str
    t: float  # seconds since the run began, at send
    latency: float
    code: str  # "ok" or the error code
    lag: float = 0.0  # how late the send was against its schedule


@dataclass
class Legit:
    base: str
    server_did: str
    rate: float
    reconnect_every: int
    phase: str = "warmup"
    t0: float = field(default_factory=time.monotonic)
    messages: list[Record] = field(default_factory=list)
    handshakes: list[Record] = field(default_factory=list)
    closes: collections.Counter = field(default_factory=collections.Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self, agent) -> Any:
        started = time.perf_counter()
        phase, t = self.phase, time.monotonic() - self.t0
        while True:
            try:
                conn = await agent.connect(self.base, self.server_did)
                self.handshakes.append(Record(phase, t, time.perf_counter() - started, "ok"))
                return conn
            except Exception as exc:
                code = getattr(exc, "code", type(exc).__name__)
                self.handshakes.append(Record(phase, t, time.perf_counter() - started, code))
                if self.stop.is_set():
                    raise
                await asyncio.sleep(0.2)
                started, phase, t = time.perf_counter(), self.phase, time.monotonic() - self.t0

    async def client_loop(self, index: int, agent) -> None:
        from sage_otel.agent.errors import SageError

        conn = await self.connect(agent)
        interval = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval * index / 4  # spread the clients over one interval
        sent = 0
        while not self.stop.is_set():
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(0.0, loop.time() - next_at)
            next_at += interval
            if loop.time() - next_at > 1.0:  # far behind: do not burst to catch up
                next_at = loop.time()
            if sent and sent % self.reconnect_every == 0:
                try:
                    await agent.close(conn)
                    self.closes["ok"] += 1
                except SageError as exc:
                    self.closes[exc.code] += 1
                conn = await self.connect(agent)
            sent += 1
            data = f"client-{index}-msg-{sent}-{_secrets.token_hex(8)}"
            phase, t = self.phase, time.monotonic() - self.t0
            started = time.perf_counter()
            try:
                reply = await agent.send(conn, data)
                code = "ok" if reply == data else "wrong_reply"
            except SageError as exc:
                code = exc.code
            except Exception as exc:
                code = type(exc).__name__
            self.messages.append(Record(phase, t, time.perf_counter() - started, code, lag))
            if code in SESSION_GONE:
                conn = await self.connect(agent)
        with contextlib.suppress(Exception):
            await agent.close(conn)


def summarize(records: list[Record], phase: str) -> dict[str, Any]:
    rows = [r for r in records if r.phase == phase]
    ok = sorted(r.latency for r in rows if r.code == "ok")
    lags = sorted(r.lag for r in rows)
    codes = collections.Counter(r.code for r in rows if r.code != "ok")
    span = (max(r.t for r in rows) - min(r.t for r in rows)) if len(rows) > 1 else 0.0
    return {
        "sent": len(rows),
        "ok": len(ok),
        "success_rate": (len(ok) / len(rows)) if rows else None,
        "errors": dict(codes),
        "rate_per_s": round(len(rows) / span, 2) if span else None,
        "p50_ms": round(percentile(ok, 50) * 1e3, 3),
        "p95_ms": round(percentile(ok, 95) * 1e3, 3),
        "p99_ms": round(percentile(ok, 99) * 1e3, 3),
        "p999_ms": round(percentile(ok, 99.9) * 1e3, 3),
        "max_ms": round(ok[-1] * 1e3, 3) if ok else None,
        "mean_ms": round(sum(ok) / len(ok) * 1e3, 3) if ok else None,
        "schedule_lag_p99_ms": round(percentile(lags, 99) * 1e3, 3),
    }


def timeline(records: list[Record], width: float = 10.0, snaps=None) -> list[dict[str, Any]]:
    buckets: dict[int, list[Record]] = collections.defaultdict(list)
    for r in records:
        buckets[int(r.t // width)].append(r)
    out = []
    for key in sorted(buckets):
        rows = buckets[key]
        ok = sorted(r.latency for r in rows if r.code == "ok")
        out.append(
            {
                "t": key * width,
                "phase": collections.Counter(r.phase for r in rows).most_common(1)[0][0],
                "n": len(rows),
                "errors": len(rows) - len(ok),
                "p50_ms": round(percentile(ok, 50) * 1e3, 2),
                "p99_ms": round(percentile(ok, 99) * 1e3, 2),
                "max_ms": round(ok[-1] * 1e3, 2) if ok else None,
                "other_cores": snaps.window_other_cores(key * width, width) if snaps else None,
            }
        )
    return out


# -- the run ------------------------------------------------------------------------------


class Snapshots:
    """CPU counters at phase boundaries, and periodic RSS samples of the server."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.marks: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.server_pid = 0
        self.attacker_pid = 0

    def mark(self, phase: str) -> None:
        busy, total = system_busy_ticks()
        self.marks.append(
            {
                "phase": phase,
                "t": time.monotonic() - self.t0,
                "server": proc_cpu_ticks(self.server_pid) if self.server_pid else None,
                "attacker": proc_cpu_ticks(self.attacker_pid) if self.attacker_pid else None,
                "clients": proc_cpu_ticks(os.getpid()),
                "busy": busy,
                "total": total,
            }
        )

    def cpu_by_phase(self) -> dict[str, Any]:
        """Cores used per phase: each process, and everything else on the machine."""
        out = {}
        for start, end in zip(self.marks, self.marks[1:]):
            wall = end["t"] - start["t"]
            if wall <= 0:
                continue

            def cores(key: str, start=start, end=end, wall=wall) -> float | None:
                a, b = start.get(key), end.get(key)
                if a is None or b is None:
                    return None
                return round((b - a) / CLK_TCK / wall, 3)

            entry = {
                "seconds": round(wall, 1),
                "server_cores": cores("server"),
                "clients_cores": cores("clients"),
                "attacker_cores": cores("attacker"),
                "machine_busy_cores": cores("busy"),
            }
            ours = sum(
                v
                for k, v in entry.items()
                if k.endswith("_cores") and v and k != "machine_busy_cores"
            )
            entry["other_processes_cores"] = round((entry["machine_busy_cores"] or 0) - ours, 3)
            out[start["phase"]] = entry
        return out

    def ours(self) -> int:
        pids = [p for p in (self.server_pid, self.attacker_pid, os.getpid()) if p]
        return sum(proc_cpu_ticks(p) or 0 for p in pids)

    async def sample_forever(self, every: float, legit: Legit) -> None:
        """RSS, and how many cores processes other than ours used since the last sample."""
        last_t, last_busy, last_ours = time.monotonic(), system_busy_ticks()[0], self.ours()
        last_attacker = self.attacker_pid
        while True:
            now, busy, ours = time.monotonic(), system_busy_ticks()[0], self.ours()
            if self.attacker_pid != last_attacker:  # the attacker just started: no baseline
                last_ours, last_attacker = (
                    ours - (proc_cpu_ticks(self.attacker_pid) or 0),
                    self.attacker_pid,
                )
            wall = now - last_t
            other = (
                ((busy - last_busy) - (ours - last_ours)) / CLK_TCK / wall if wall > 0.5 else None
            )
            self.samples.append(
                {
                    "t": round(now - self.t0, 1),
                    "phase": legit.phase,
                    "server_rss_kb": proc_rss_kb(self.server_pid),
                    "loadavg1": float(Path("/proc/loadavg").read_text().split()[0]),
                    "other_cores": None if other is None else round(max(0.0, other), 3),
                }
            )
            last_t, last_busy, last_ours = now, busy, ours
            await asyncio.sleep(every)

    def window_other_cores(self, start: float, width: float) -> float | None:
        """Mean other-process cores of the samples covering the window [start, start + width)."""
        values = [
            s["other_cores"]
            for s in self.samples
            if start < s["t"] <= start + width + 1.0 and s["other_cores"] is not None
        ]
        return round(sum(values) / len(values), 3) if values else None


def make_secrets(clients: int) -> dict[str, Any]:
    chains = ["solana", "ethereum"]
    return {
        "server": new_secret_entry("solana"),
        "clients": [new_secret_entry(chains[i % 2]) for i in range(clients)],
        "attacker": {
            "replay": new_secret_entry("solana"),
            "flood": new_secret_entry("solana"),
            "hostile": new_secret_entry("ethereum"),
        },
    }


async def register_all(registry_path: Path, secrets: dict[str, Any]) -> None:
    from sage_otel.agent.did import DIDDocument, JsonFileRegistry, sign_registration

    registry = JsonFileRegistry(registry_path)
    entries = [secrets["server"], *secrets["clients"], *secrets["attacker"].values()]
    for entry in entries:
        identity = load_identity(entry)
        document = DIDDocument.for_identity(identity)
        await registry.register(document, sign_registration(identity, document))


@dataclass
class Setup:
    tmp: Path
    secrets_path: Path
    registry_path: Path
    secrets: dict[str, Any]
    server: Any  # asyncio.subprocess.Process
    server_err: Any
    base: str
    server_did: str
    server_pid: int


async def start_server(args: argparse.Namespace) -> Setup:
    tmp = Path(tempfile.mkdtemp(prefix="sage-soak-"))
    secrets_path, registry_path = tmp / "secrets.json", tmp / "registry.json"
    secrets = make_secrets(args.clients)
    secrets_path.write_text(json.dumps(secrets))
    await register_all(registry_path, secrets)
    print(f"soak: temp dir {tmp}", flush=True)
    server_cmd = [
        sys.executable,
        "-m",
        "benchmarks.soak_server",
        "--secrets",
        str(secrets_path),
        "--registry",
        str(registry_path),
    ]
    if args.profile_server:
        server_cmd += ["--profile", args.profile_server]
    server_err = open(tmp / "server.stderr", "wb")  # noqa: SIM115 - closed in stop_server
    server = await asyncio.create_subprocess_exec(
        *server_cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=server_err
    )
    info = json.loads(await asyncio.wait_for(server.stdout.readline(), 60))
    base = f"http://127.0.0.1:{info['port']}"
    print(f"soak: server pid {info['pid']} at {base}", flush=True)
    return Setup(
        tmp,
        secrets_path,
        registry_path,
        secrets,
        server,
        server_err,
        base,
        info["did"],
        info["pid"],
    )


async def stop_server(setup: Setup) -> None:
    server = setup.server
    if server.returncode is None:
        server.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.wait(), 30)
        except asyncio.TimeoutError:
            server.kill()
            await server.wait()
    setup.server_err.close()


async def start_attacker(
    setup: Setup, args: argparse.Namespace, out: Path, seconds: float, only: str, wait: bool
):
    """The attacker process, once it printed READY (it then waits for GO unless not ``wait``)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.soak_attacker",
        "--base",
        setup.base,
        "--server-did",
        setup.server_did,
        "--secrets",
        str(setup.secrets_path),
        "--registry",
        str(setup.registry_path),
        "--rate",
        str(args.attack_rate),
        "--seconds",
        str(seconds),
        "--out",
        str(out),
    ]
    if only:
        cmd += ["--only", only]
    if not wait:
        cmd += ["--no-wait"]
    err = open(out.with_suffix(".stderr"), "wb")  # noqa: SIM115 - the child has its copy
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=err,
    )
    err.close()
    ready = await asyncio.wait_for(proc.stdout.readline(), 120)
    if ready.strip() != b"READY":
        raise RuntimeError(f"attacker not ready: {ready!r}, see {out.with_suffix('.stderr')}")
    return proc


async def sleep_minutes(what: str, minutes: float) -> None:
    """Sleep ``minutes``, saying once a minute how far along ``what`` is: a soak runs long."""
    start = time.monotonic()
    end = start + minutes * 60
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(60.0, left))
        if time.monotonic() < end:
            done = (time.monotonic() - start) / 60
            print(f"soak: {what} {done:.0f}/{minutes:g} min", flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from sage_otel.agent.did import DIDResolver, JsonFileRegistry
    from sage_otel.agent.transport import ClientAgent

    facts = machine_facts()
    setup = await start_server(args)
    tmp, registry_path, secrets = setup.tmp, setup.registry_path, setup.secrets
    server, base, server_did, server_pid = (
        setup.server,
        setup.base,
        setup.server_did,
        setup.server_pid,
    )

    t0 = time.monotonic()
    snaps = Snapshots(t0)
    snaps.server_pid = server_pid
    rss_start = proc_rss_kb(server_pid)
    legit = Legit(base, server_did, args.rate, args.reconnect_every, t0=t0)
    sampler = asyncio.create_task(snaps.sample_forever(5.0, legit))
    agents = [
        ClientAgent(
            load_identity(entry),
            DIDResolver(JsonFileRegistry(registry_path)),
            http=httpx.AsyncClient(timeout=10.0, trust_env=False),
        )
        for entry in secrets["clients"]
    ]
    client_tasks = [
        asyncio.create_task(legit.client_loop(i, agent)) for i, agent in enumerate(agents)
    ]

    await asyncio.sleep(args.warmup)
    rss_baseline_start = proc_rss_kb(server_pid)
    legit.phase = "baseline"
    snaps.mark("baseline")
    print(f"soak: baseline for {args.baseline_minutes} min", flush=True)
    await sleep_minutes("baseline", args.baseline_minutes)

    legit.phase = "transition"
    snaps.mark("transition")
    attack_out = tmp / "attacker.json"
    attacker = await start_attacker(
        setup, args, attack_out, args.minutes * 60, args.attack_only, wait=True
    )
    snaps.attacker_pid = attacker.pid
    attacker.stdin.write(b"GO\n")
    await attacker.stdin.drain()
    legit.phase = "attack"
    snaps.mark("attack")
    print(f"soak: attack for {args.minutes} min at {args.attack_rate} req/s", flush=True)
    await sleep_minutes("attack", args.minutes)

    legit.phase = "drain"
    snaps.mark("drain")
    done = await asyncio.wait_for(attacker.stdout.readline(), 120)
    await asyncio.wait_for(attacker.wait(), 60)
    attack_result = json.loads(attack_out.read_text()) if done.strip() == b"DONE" else {}
    legit.stop.set()
    await asyncio.wait(client_tasks, timeout=30)
    for agent in agents:
        await agent.aclose()
    snaps.mark("end")
    sampler.cancel()

    rss_end = proc_rss_kb(server_pid)
    alive = server.returncode is None
    health = None
    with contextlib.suppress(Exception):
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            health = (await http.get(base + "/healthz")).status_code
    await stop_server(setup)
    stderr_text = (tmp / "server.stderr").read_text(errors="replace")
    attacker_stderr = attack_out.with_suffix(".stderr").read_text(errors="replace")

    phases = {p: summarize(legit.messages, p) for p in ("baseline", "attack")}
    hs = {
        p: {
            "count": sum(1 for r in legit.handshakes if r.phase == p),
            "failed": dict(
                collections.Counter(
                    r.code for r in legit.handshakes if r.phase == p and r.code != "ok"
                )
            ),
            "p50_ms": round(
                percentile(
                    sorted(r.latency for r in legit.handshakes if r.phase == p and r.code == "ok"),
                    50,
                )
                * 1e3,
                2,
            ),
            "p99_ms": round(
                percentile(
                    sorted(r.latency for r in legit.handshakes if r.phase == p and r.code == "ok"),
                    99,
                )
                * 1e3,
                2,
            ),
        }
        for p in ("baseline", "attack")
    }
    base_p99, attack_p99 = phases["baseline"]["p99_ms"], phases["attack"]["p99_ms"]
    ratio = round(attack_p99 / base_p99, 3) if base_p99 else None
    rss_samples = [s["server_rss_kb"] for s in snaps.samples if s["server_rss_kb"]]
    # The same figures over the 10 s windows in which other processes on this machine used
    # less than QUIET_CORES: the ratio there is not the neighbours' doing.
    quiet_windows = {
        int(row["t"] // 10)
        for row in timeline(legit.messages, snaps=snaps)
        if row["other_cores"] is not None and row["other_cores"] < QUIET_CORES
    }
    quiet_records = [r for r in legit.messages if int(r.t // 10) in quiet_windows]
    quiet_phases = {p: summarize(quiet_records, p) for p in ("baseline", "attack")}
    qb, qa = quiet_phases["baseline"]["p99_ms"], quiet_phases["attack"]["p99_ms"]
    quiet = {
        "threshold_other_cores": QUIET_CORES,
        "windows": {
            p: sum(
                1
                for w in quiet_windows
                if any(r.phase == p and int(r.t // 10) == w for r in quiet_records)
            )
            for p in ("baseline", "attack")
        },
        "legit": quiet_phases,
        "p99_ratio_attack_over_baseline": round(qa / qb, 3) if qb and qa else None,
    }
    five_xx = attack_result.get("status_5xx", 0)
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.soak", *sys.argv[1:]]),
        "machine": facts,
        "config": {
            "clients": args.clients,
            "rate_per_client": args.rate,
            "reconnect_every": args.reconnect_every,
            "baseline_minutes": args.baseline_minutes,
            "attack_minutes": args.minutes,
            "attack_rate": args.attack_rate,
            "attack_only": args.attack_only or "all",
            "warmup_seconds": args.warmup,
        },
        "legit": phases,
        "legit_handshakes": hs,
        "legit_closes": dict(legit.closes),
        "legit_other_phases": {
            p: summarize(legit.messages, p)["sent"] for p in ("warmup", "transition", "drain")
        },
        "p99_ratio_attack_over_baseline": ratio,
        "attacker": attack_result,
        "server": {
            "pid": server_pid,
            "rss_kb_start": rss_start,
            "rss_kb_baseline_start": rss_baseline_start,
            "rss_kb_end": rss_end,
            "rss_kb_max_sampled": max(rss_samples, default=None),
            "stayed_up": alive and health == 200,
            "healthz_at_end": health,
            "exit_code_after_sigterm": server.returncode,
            "stderr": stderr_text[-4000:],
        },
        "attacker_stderr": attacker_stderr[-4000:],
        "cpu_cores_by_phase": snaps.cpu_by_phase(),
        "targets": {
            "legit_success_ge_99.9%": all(
                (phases[p]["success_rate"] or 0) >= TARGET_SUCCESS for p in phases
            ),
            "p99_ratio_le_2.0": ratio is not None and ratio <= TARGET_P99_RATIO,
            "no_5xx": five_xx == 0,
            "no_attacker_findings": attack_result.get("findings_total", 1) == 0,
            "server_stayed_up": alive and health == 200,
        },
        "timeline_10s": timeline(legit.messages, snaps=snaps),
        "quiet": quiet,
        "server_samples": snaps.samples,
        "temp_dir": str(tmp),
    }
    return report


PROBES = [
    "future",
    "replay",
    "hs_flood",
    "hs_unknown",
    "h_oversized_length",
    "h_oversized_chunked",
    "h_deep_array",
    "h_deep_metadata",
    "h_hs_70k_nonce",
    "h_hs_bad_signature",
    "h_msg_bad_signature",
    "hostile",
]


async def cost_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Each attack kind alone against an idle server: server CPU per request, and its rate.

    No legitimate traffic runs. Server CPU is read from /proc between the attacker's READY
    (its setup handshakes excluded) and its exit.
    """
    facts = machine_facts()
    setup = await start_server(args)
    rows = []
    try:
        for kinds in args.probe_kinds.split(",") if args.probe_kinds else PROBES:
            out = setup.tmp / f"probe-{kinds}.json"
            proc = await start_attacker(setup, args, out, args.cost_probe, kinds, wait=False)
            cpu0, busy0 = proc_cpu_ticks(setup.server_pid), system_busy_ticks()[0]
            attacker0 = proc_cpu_ticks(proc.pid)
            started = time.monotonic()
            await asyncio.wait_for(proc.stdout.readline(), args.cost_probe + 120)
            attacker1 = proc_cpu_ticks(proc.pid) or attacker0
            cpu1, busy1 = proc_cpu_ticks(setup.server_pid), system_busy_ticks()[0]
            wall = time.monotonic() - started
            await proc.wait()
            result = json.loads(out.read_text())
            server_s = (cpu1 - cpu0) / CLK_TCK
            row = {
                "kinds": kinds,
                "requests": result["requests"],
                "achieved_rate": result["achieved_rate"],
                "server_cpu_s": round(server_s, 2),
                "server_cores": round(server_s / wall, 3),
                "server_cpu_ms_per_request": round(server_s * 1e3 / max(1, result["requests"]), 3),
                "attacker_cores": round((attacker1 - attacker0) / CLK_TCK / wall, 3),
                "machine_busy_cores": round((busy1 - busy0) / CLK_TCK / wall, 3),
                "answers": result["by_status_code"],
                "findings": result["findings_total"],
                "server_rss_kb": proc_rss_kb(setup.server_pid),
            }
            rows.append(row)
            print(
                f"probe {kinds:<22} {row['achieved_rate']:>7}/s  server "
                f"{row['server_cpu_ms_per_request']:>7} ms cpu/req ({row['server_cores']} cores)  "
                f"{row['answers']}",
                flush=True,
            )
    finally:
        await stop_server(setup)
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.soak", *sys.argv[1:]]),
        "machine": facts,
        "seconds_per_probe": args.cost_probe,
        "attack_rate": args.attack_rate,
        "probes": rows,
        "server_stderr": (setup.tmp / "server.stderr").read_text(errors="replace")[-4000:],
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"command: {report['command']}"]
    m = report["machine"]
    lines.append(f"machine: nproc={m['nproc']} python={m['python']} cpu={m['cpu_model']}")
    lines.append(
        f"{'phase':<9} {'sent':>7} {'success':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'p99.9':>8} {'max ms':>8}  errors"
    )
    for phase, s in report["legit"].items():
        rate = f"{s['success_rate'] * 100:.3f}%" if s["success_rate"] is not None else "-"
        lines.append(
            f"{phase:<9} {s['sent']:>7} {rate:>9} {s['p50_ms']:>8} {s['p95_ms']:>8} "
            f"{s['p99_ms']:>8} {s['p999_ms']:>8} {s['max_ms'] or '-':>8}  {s['errors'] or ''}"
        )
    lines.append(f"p99 ratio attack/baseline: {report['p99_ratio_attack_over_baseline']}")
    q = report.get("quiet")
    if q:
        lines.append(
            f"quiet windows only (other processes < {q['threshold_other_cores']} cores): "
            f"windows {q['windows']}, "
            + ", ".join(
                f"{p} n={s['sent']} p50 {s['p50_ms']} p95 {s['p95_ms']} p99 {s['p99_ms']}"
                for p, s in q["legit"].items()
            )
            + f", p99 ratio {q['p99_ratio_attack_over_baseline']}"
        )
    hs = report["legit_handshakes"]
    lines.append(
        "legit handshakes: "
        + ", ".join(
            f"{p} {h['count']} (p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, failed {h['failed']})"
            for p, h in hs.items()
        )
    )
    a = report["attacker"]
    if a:
        lines.append(
            f"attacker: {a['requests']} requests in {a['seconds']} s = {a['achieved_rate']} req/s "
            f"(target {a['target_rate']}), blocked on in-flight cap "
            f"{a['seconds_blocked_on_inflight_cap']} s, attacker cpu {a['cpu_seconds']} s"
        )
        lines.append(f"attacker answers: {a['by_status_code']}")
        lines.append(
            f"5xx: {a['status_5xx']}, findings: {a['findings_total']} {a['findings_by_kind']}"
        )
        for kind, k in a["by_kind"].items():
            flag = f"  UNEXPECTED {k['unexpected']}" if k["unexpected"] else ""
            lines.append(
                f"  {kind:<22} {k['sent']:>7} ({k['rate']:>6}/s, p50 {k['p50_ms']} ms, "
                f"p99 {k['p99_ms']} ms) {k['answers']}{flag}"
            )
    else:
        lines.append("attacker: no result (see attacker_stderr)")
    s = report["server"]
    lines.append(
        f"server RSS: start {s['rss_kb_start']} kB, "
        f"baseline start {s['rss_kb_baseline_start']} kB, end {s['rss_kb_end']} kB, "
        f"max sampled {s['rss_kb_max_sampled']} kB; stayed up: {s['stayed_up']}"
    )
    for phase, c in report["cpu_cores_by_phase"].items():
        lines.append(f"cpu cores {phase:<10}: {c}")
    lines.append(f"targets: {report['targets']}")
    if s["stderr"].strip():
        lines.append("server stderr (tail):\n" + s["stderr"][-1500:])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, help="attack phase length (required)")
    parser.add_argument("--baseline-minutes", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s per client")
    parser.add_argument("--attack-rate", type=float, default=200.0, help="attacker requests/s")
    parser.add_argument("--reconnect-every", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds, not counted")
    parser.add_argument(
        "--attack-only", default="", help="restrict the attacker to some kinds (investigation)"
    )
    parser.add_argument(
        "--profile-server", default="", help="cProfile the server to this file (investigation)"
    )
    parser.add_argument(
        "--cost-probe",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="instead of the soak: run each attack kind alone this long, report server CPU/request",
    )
    parser.add_argument("--probe-kinds", default="", help="comma-separated probes (default all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cost_probe:
        report = asyncio.run(cost_probe(args))
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"soak: cost probe written to {args.out}", flush=True)
        return
    if args.minutes is None:
        parser.error("--minutes is required")
    report = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(render(report), flush=True)
    print(f"soak: report written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
