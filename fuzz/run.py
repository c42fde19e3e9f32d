"""Run the fuzz campaign: every target of :mod:`fuzz.harnesses` under atheris, with a budget.

    python -m fuzz.run [--target NAME|all] [--runs N] [--seconds S] [--jobs J] [--seed N]

Each target runs in its own process (atheris' ``Fuzz()`` never returns): the child imports
the harnesses inside ``atheris.instrument_imports`` (so ``sage_otel``, ``rfc8785`` and
``base58`` give coverage feedback), writes a seed corpus made in code, and fuzzes until
``--runs`` executions or ``--seconds``, whichever comes first. Any exception other than a
``SageError`` (and any broken answer or metric label, see the harnesses) is a finding: the
child records it (input, exception, traceback, the API call in progress), de-duplicates it
by exception type and innermost ``sage_otel`` frame, keeps fuzzing, and at the end shrinks
each distinct finding's input. Findings go to ``--out`` (default ``/tmp/fuzz-findings``).

The parent prints one line per target (executions, distinct findings, untyped failures,
exec/s) and exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("/tmp/fuzz-findings")
INSTRUMENTED = ("sage_otel", "rfc8785", "base58")
TARGET_NAMES = (
    "envelope",
    "message_from_wire",
    "message_open",
    "handshake_process",
    "handshake_finalize",
    "did_document",
    "parse_did",
    "verify_signature",
    "agent_card",
    "jcs",
    "read_answer",
    "http",
)
MAX_FINDINGS = 50  # distinct findings recorded per target
MINIMIZE_SECONDS = 10.0


def signature(exc: BaseException) -> str:
    """Type and innermost ``sage_otel`` frame: one signature per distinct defect."""
    kind = getattr(exc, "kind", None)
    if kind:
        return f"{type(exc).__name__}: {kind}"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/sage_otel/" in f.filename] or frames
    if not ours:
        return type(exc).__name__
    frame = ours[-1]
    where = (
        frame.filename.split("/sage_otel/")[-1]
        if "/sage_otel/" in frame.filename
        else frame.filename
    )
    return f"{type(exc).__name__} at {where}:{frame.lineno} ({frame.name})"


def _fails_alike(fn: Callable[[bytes], None], data: bytes, wanted: str) -> bool:
    try:
        fn(data)
    except Exception as exc:
        return signature(exc) == wanted
    return False


def minimize(fn: Callable[[bytes], None], data: bytes, wanted: str, seconds: float) -> bytes:
    """Greedy delta debugging: drop ever smaller chunks while the same finding reproduces."""
    if not _fails_alike(fn, data, wanted):
        return data
    best, chunk = data, max(1, len(data) // 2)
    deadline = time.monotonic() + seconds
    while chunk >= 1 and time.monotonic() < deadline:
        shrunk, i = False, 0
        while i < len(best) and time.monotonic() < deadline:
            candidate = best[:i] + best[i + chunk :]
            if _fails_alike(fn, candidate, wanted):
                best, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return best


# --- the child: one target under atheris ---------------------------------------------------


class Campaign:
    """Bookkeeping of one target's run inside the child."""

    def __init__(self, name: str, harnesses: Any, args: argparse.Namespace) -> None:
        self.name = name
        self.harnesses = harnesses
        self.target = harnesses.TARGETS[name]
        self.runs = args.runs
        self.seconds = args.seconds or float("inf")
        self.out = Path(args.out) / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.stats_path = Path(args.stats)
        self.stop_on_first = args.stop_on_first
        self.execs = 0
        self.untyped = 0
        self.findings: dict[str, dict[str, Any]] = {}
        self.started = 0.0
        self.last_write = 0.0

    def record(self, data: bytes, exc: BaseException) -> None:
        self.untyped += 1
        sig = signature(exc)
        finding = self.findings.get(sig)
        if finding is not None:
            finding["count"] += 1
            return
        if len(self.findings) >= MAX_FINDINGS:
            return
        tag = hashlib.sha256(sig.encode()).hexdigest()[:12]
        path = self.out / f"finding-{tag}.bin"
        path.write_bytes(data)
        self.findings[sig] = {
            "signature": sig,
            "count": 1,
            "exception": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": "".join(traceback.format_exception(exc))[-6000:],
            "call": self.harnesses.last_call()[:4000],
            "input": str(path),
            "input_len": len(data),
            "first_at": self.execs,
        }
        self.write(done=False)

    def write(self, done: bool, extra: dict[str, Any] | None = None) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9) if self.started else 0.0
        stats = {
            "target": self.name,
            "executions": self.execs,
            "seconds": round(elapsed, 2),
            "exec_per_s": round(self.execs / elapsed) if elapsed else 0,
            "untyped": self.untyped,
            "findings": list(self.findings.values()),
            "outcomes": dict(self.harnesses.OUTCOMES.most_common(25)),
            "extra": extra or {},
            "done": done,
        }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=1, default=str))
        os.replace(tmp, self.stats_path)
        self.last_write = time.monotonic()

    def one(self, data: bytes) -> None:
        if not self.started:
            self.started = time.monotonic()
        self.execs += 1
        try:
            self.target.fn(data)
        except Exception as exc:
            self.record(data, exc)
            if self.stop_on_first:
                self.write(done=False)
                raise
        if self.execs >= self.runs:
            self.finish()
        if self.execs & 255 == 0:
            now = time.monotonic()
            if now - self.started >= self.seconds:
                self.finish()
            if now - self.last_write > 2.0:
                self.write(done=False)

    def finish(self) -> None:
        extra: dict[str, Any] = {}
        if self.target.finish is not None:
            try:
                extra = self.target.finish()
            except Exception as exc:  # e.g. a metric label outside the catalog
                self.record(b"", exc)
        elapsed_fuzz = time.monotonic() - self.started
        for finding in self.findings.values():
            data = Path(finding["input"]).read_bytes()
            if not data:
                continue
            small = minimize(self.target.fn, data, finding["signature"], MINIMIZE_SECONDS)
            path = Path(finding["input"]).with_suffix(".min.bin")
            path.write_bytes(small)
            finding["minimized"] = str(path)
            finding["minimized_hex"] = small.hex()[:2000]
            try:
                self.target.fn(small)
            except Exception as exc:
                finding["minimized_call"] = self.harnesses.last_call()[:4000]
                finding["minimized_traceback"] = "".join(traceback.format_exception(exc))[-6000:]
        self.started = time.monotonic() - elapsed_fuzz  # minimizing is not fuzzing time
        self.write(done=True, extra=extra)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def child(args: argparse.Namespace) -> None:
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        from fuzz import harnesses

    name = args.child
    campaign = Campaign(name, harnesses, args)
    corpus = Path(args.corpus) if args.corpus else Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(harnesses.seeds(name)):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    flags = [
        f"-runs={args.runs * 4 + 10_000}",  # the campaign stops itself at --runs
        f"-max_len={campaign.target.max_len}",
        "-timeout=60",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={campaign.out}/",
        "-print_final_stats=0",
        "-print_pcs=0",
        "-len_control=0",  # structured inputs: the provider wants room from the start
    ]
    if args.seed is not None:
        flags.append(f"-seed={args.seed}")
    campaign.write(done=False)
    atheris.Setup([sys.argv[0], *flags, str(corpus)], campaign.one)
    atheris.Fuzz()


# --- the parent: one child per target, a table ----------------------------------------------


def run_targets(
    names: Sequence[str],
    *,
    runs: int,
    seconds: float = 0.0,
    jobs: int | None = None,
    seed: int | None = None,
    out: Path = DEFAULT_OUT,
    corpus: Path | None = None,
    stop_on_first: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Fuzz ``names`` (at most ``jobs`` at a time); one stats dict per target, in order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, jobs or os.cpu_count() or 1)
    queue = list(names)
    running: dict[str, tuple[subprocess.Popen[bytes], Path, Path, float]] = {}
    results: dict[str, dict[str, Any]] = {}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    while queue or running:
        while queue and len(running) < jobs:
            name = queue.pop(0)
            stats, log = out / f"{name}.stats.json", out / f"{name}.log"
            stats.unlink(missing_ok=True)
            argv = [
                sys.executable,
                "-m",
                "fuzz.run",
                "--child",
                name,
                "--runs",
                str(runs),
                "--seconds",
                str(seconds),
                "--out",
                str(out),
                "--stats",
                str(stats),
            ]
            if seed is not None:
                argv += ["--seed", str(seed)]
            if corpus is not None:
                argv += ["--corpus", str(Path(corpus) / name)]
            if stop_on_first:
                argv.append("--stop-on-first")
            with open(log, "wb") as sink:
                proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=sink)
            running[name] = (proc, stats, log, time.monotonic())
        time.sleep(0.1)
        for name, (proc, stats, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            result = _collect(name, proc.returncode, stats, log, time.monotonic() - started)
            results[name] = result
            if echo is not None:
                echo(_row(result))
    return [results[name] for name in names]


def _collect(name: str, code: int, stats: Path, log: Path, wall: float) -> dict[str, Any]:
    try:
        result = json.loads(stats.read_text())
    except (OSError, ValueError):
        result = {"target": name, "executions": 0, "seconds": 0, "exec_per_s": 0, "untyped": 0}
        result["findings"] = []
    result["wall_seconds"] = round(wall, 1)
    result["returncode"] = code
    if not result.get("done"):  # the child died: a crash libFuzzer caught (timeout, OOM...)
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        result.setdefault("findings", []).append(
            {
                "signature": f"child exited {code} before its budget",
                "count": 1,
                "exception": "see log",
                "traceback": tail,
                "input": str(log),
            }
        )
        result["untyped"] = result.get("untyped", 0) + 1
    return result


HEADER = (
    f"{'target':<20} {'executions':>11} {'findings':>9} {'untyped':>8} {'exec/s':>8} {'seconds':>8}"
)


def _row(result: dict[str, Any]) -> str:
    return (
        f"{result['target']:<20} {result['executions']:>11,} {len(result['findings']):>9} "
        f"{result['untyped']:>8,} {result['exec_per_s']:>8,} {result['seconds']:>8}"
    )


def table(results: Sequence[dict[str, Any]]) -> str:
    total = sum(r["executions"] for r in results)
    findings = sum(len(r["findings"]) for r in results)
    untyped = sum(r["untyped"] for r in results)
    lines = [HEADER, "-" * len(HEADER), *(_row(r) for r in results), "-" * len(HEADER)]
    lines.append(f"{'total':<20} {total:>11,} {findings:>9} {untyped:>8,}")
    return "\n".join(lines)


def markdown(results: Sequence[dict[str, Any]], command: str, wall: float) -> str:
    total = sum(r["executions"] for r in results)
    lines = [
        "# Fuzz campaign",
        "",
        f"Command: `{command}`  ",
        f"Total executions: {total:,}; wall time {wall:.0f} s.",
        "",
        "| target | executions | distinct findings | untyped failures | exec/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['target']} | {r['executions']:,} | {len(r['findings'])} | {r['untyped']:,} "
            f"| {r['exec_per_s']:,} |"
        )
    for r in results:
        for f in r["findings"]:
            lines += [
                "",
                f"## {r['target']}: {f['signature']}",
                "",
                f"- hits: {f['count']}; input: `{f.get('minimized', f['input'])}`",
                f"- exception: `{f['exception'][:300]}`",
                f"- call: `{(f.get('minimized_call') or f.get('call', ''))[:600]}`",
                "",
                "```",
                (f.get("minimized_traceback") or f["traceback"])[-2500:].rstrip(),
                "```",
            ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", help="a target name, or all (repeatable)")
    parser.add_argument("--runs", type=int, default=10_000, help="executions per target")
    parser.add_argument("--seconds", type=float, default=0.0, help="time cap per target")
    parser.add_argument("--jobs", type=int, default=None, help="targets at once (CPUs)")
    parser.add_argument("--seed", type=int, default=None, help="libFuzzer seed")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="findings and logs")
    parser.add_argument("--corpus", default=None, help="keep corpora under this directory")
    parser.add_argument("--stop-on-first", action="store_true")
    parser.add_argument("--report", default=None, help="write a markdown report here")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0  # not reached: the campaign exits the process
    if args.list:
        print("\n".join(TARGET_NAMES))
        return 0
    names: list[str] = []
    for item in args.target or ["all"]:
        for name in item.split(","):
            names += list(TARGET_NAMES) if name == "all" else [name]
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGET_NAMES)}")
    started = time.monotonic()
    finished = iter(range(1, len(names) + 1))

    def echo(row: str) -> None:
        print(row, flush=True)
        elapsed = time.monotonic() - started
        print(f"fuzz: {next(finished)}/{len(names)} targets done, {elapsed:.0f} s", file=sys.stderr)

    print(HEADER, flush=True)
    results = run_targets(
        names,
        runs=args.runs,
        seconds=args.seconds,
        jobs=args.jobs,
        seed=args.seed,
        out=Path(args.out),
        corpus=Path(args.corpus) if args.corpus else None,
        stop_on_first=args.stop_on_first,
        echo=echo,
    )
    wall = time.monotonic() - started
    print()
    print(table(results))
    print(f"wall time {wall:.1f} s; findings and logs in {args.out}")
    for r in results:
        for f in r["findings"]:
            print(f"FINDING {r['target']}: {f['signature']} x{f['count']} -> {f['input']}")
    command = "python -m fuzz.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report:
        Path(args.report).write_text(markdown(results, command, wall))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
