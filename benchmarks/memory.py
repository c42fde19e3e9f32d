"""Memory under load: RSS of an unthrottled ``sage-otel demo`` and its server process.

    python -m benchmarks.memory --minutes 10 --warmup 2 [--out FILE.json] [-- DEMO ARGS...]

Runs ``sage-otel demo --rate 0 --json`` (plus DEMO ARGS) for warm-up + minutes, samples the
resident set of the demo and every process it started every few seconds from /proc, and
reports the growth from the end of the warm-up to the end of the run, per process and in
total, beside the messages the demo processed. Target (docs/performance.md): total growth
after warm-up <= 20 MB over 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET_MB = 20.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            found.extend(int(child) for child in text.split())
    except OSError:
        pass
    return found


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(_children(current))
    return pids


def _rss_mb(pid: int) -> float | None:
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident * PAGE / 1e6


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "demo"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    return "serve" if b"serve" in cmdline else str(pid)


def run(minutes: float, warmup: float, interval: float, demo_args: list[str]) -> dict:
    duration = (minutes + warmup) * 60
    command = [
        sys.executable,
        "-m",
        "sage_otel.cli",
        "demo",
        "--rate",
        "0",
        "--json",
        "--metrics-port",
        "0",
        "--duration",
        str(duration),
        *demo_args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    samples: list[dict] = []
    start = time.monotonic()
    while process.poll() is None:
        time.sleep(interval)
        elapsed = time.monotonic() - start
        by_role: dict[str, float] = {}
        for pid in _tree(process.pid):
            rss = _rss_mb(pid)
            if rss is not None:
                by_role[_role(pid, process.pid)] = rss
        if by_role and elapsed < duration:
            samples.append({"t": round(elapsed, 1), "rss_mb": by_role})
    out, _ = process.communicate()
    lines = out.decode().strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    after = [s for s in samples if s["t"] >= warmup * 60]
    if len(after) < 2:
        raise SystemExit("too few samples after the warm-up")
    first, last = after[0]["rss_mb"], after[-1]["rss_mb"]
    growth = {role: round(last.get(role, 0.0) - first.get(role, 0.0), 1) for role in first}
    total = round(sum(growth.values()), 1)
    return {
        "command": " ".join(["sage-otel", *command[3:]]),
        "warmup_minutes": warmup,
        "minutes": minutes,
        "rss_after_warmup_mb": {k: round(v, 1) for k, v in first.items()},
        "rss_at_end_mb": {k: round(v, 1) for k, v in last.items()},
        "growth_mb": growth,
        "growth_total_mb": total,
        "target_mb": TARGET_MB,
        "met": total <= TARGET_MB,
        "messages": summary.get("messages_ok"),
        "messages_per_second": summary.get("messages_per_s"),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, demo_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes not counted")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = run(args.minutes, args.warmup, args.interval, demo_args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    brief = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(brief, indent=2))
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
