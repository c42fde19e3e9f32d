"""Every way the default demo ends leaves nothing behind.

The default (``--fast``) demo starts ``sage-otel serve`` as a child process whose identity
key lives in a temporary directory. For each exit path (a clean run, bad input, Ctrl-C,
SIGTERM with a collector that never answers, a child that fails to start, hangs, or dies)
the test checks the process table (no process of the run survives: each run has a private
TMPDIR, found in the environment of every process it started) and that the private TMPDIR
is empty afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import free_port

BIN = Path(sys.executable).parent
QUICK = ("--duration", "30", "--json", "--metrics-port", "0")
SUMMARY_KEYS = {"handshakes_ok", "messages_ok", "replays_rejected", "unexpected_errors"}
# A sitecustomize that stands in for a broken or hung `sage-otel serve`: it acts only in the
# serve child (the demo's own argv has "demo"), as Python starts.
BROKEN_SERVE = """
import os, sys, time
if sys.argv[1:2] == ["serve"]:
    if "{mode}" == "fail":
        print("sage-otel serve: cannot start: simulated failure", file=sys.stderr, flush=True)
        os._exit(2)
    time.sleep(3600)
"""


def processes_of(marker: str) -> list[str]:
    """Live processes whose environment or command line holds ``marker``: "pid cmdline"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, its parent not yet told: nothing runs
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name} {command}")
    return found


def listening_sockets(pid: int) -> int:
    """How many TCP sockets process ``pid`` holds in LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    count += 1
    return count


@dataclass
class Run:
    """One demo process: its private TMPDIR, and its output as it arrives."""

    tmp: Path
    process: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def child(self, timeout: float = 60) -> int:
        """The pid of the server child (its command line names the run's TMPDIR)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in processes_of(str(self.tmp)):
                pid, cmdline = line.split(" ", 1)
                if " serve " in cmdline and int(pid) != self.process.pid:
                    return int(pid)
            time.sleep(0.05)
        pytest.fail("the server child did not start")

    def wait_running(self, timeout: float = 60) -> int:
        """Wait until the server child listens and the run is on; returns the child's pid."""
        child = self.child(timeout)
        deadline = time.monotonic() + timeout
        while listening_sockets(child) == 0:
            if time.monotonic() > deadline:
                pytest.fail("the server child never listened")
            time.sleep(0.05)
        time.sleep(1)
        return child

    def finish(self, timeout: float = 60) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit within {timeout:g} s")
        for reader in self.readers:
            reader.join(timeout=10)
        return self.process.returncode

    def summary(self) -> dict:
        assert self.stdout, "".join(self.stderr)[-3000:]
        value = json.loads(self.stdout[-1])
        assert set(value) >= SUMMARY_KEYS
        return value


def _read(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator:
    """Start demos with a private TMPDIR; afterwards nothing of theirs may be left."""
    runs: list[Run] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Run:
        private = tmp_path / f"tmp{len(runs)}"
        private.mkdir()
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "SAGE_OTEL_")) and k.lower() not in ("http_proxy",)
        }
        base.update(TMPDIR=str(private), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        for key, value in (env or {}).items():
            if key == "PYTHONPATH" and base.get(key):
                value = os.pathsep.join([value, base[key]])
            base[key] = value
        process = subprocess.Popen(
            [str(BIN / "sage-otel"), "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=base,
            cwd=private,
            start_new_session=True,  # its own group, as a shell's foreground job
        )
        run = Run(private, process)
        for stream, into in ((process.stdout, run.stdout), (process.stderr, run.stderr)):
            reader = threading.Thread(target=_read, args=(stream, into), daemon=True)
            reader.start()
            run.readers.append(reader)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
    survivors = [p for run in runs for p in processes_of(str(run.tmp))]
    for line in survivors:  # the test has failed; leave nothing running either way
        with contextlib.suppress(OSError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not survivors, survivors


def own_lines(run: Run) -> list[str]:
    """Its stderr but the line announcing its own /metrics."""
    return [line for line in run.stderr if not line.startswith("sage-otel demo: metrics on ")]


def assert_clean(run: Run) -> None:
    """No process of the run alive, nothing left in its TMPDIR (the child's key included)."""
    assert not processes_of(str(run.tmp)), processes_of(str(run.tmp))
    assert sorted(p.name for p in run.tmp.iterdir()) == []


def test_clean_run(demo) -> None:
    """Success: summary on stdout, the metrics URLs and progress on stderr, nothing left."""
    run = demo("--duration", "6", "--json", "--metrics-port", str(free_port()))
    assert run.finish() == 0, "".join(run.stderr)
    assert run.summary()["handshakes_ok"] > 0
    assert len(run.stdout) == 1  # --json: the summary is stdout's only line
    err = "".join(run.stderr)
    assert "sage-otel demo: metrics on http://" in err
    assert "sage-otel demo: server agent metrics on http://" in err
    progress = [line for line in run.stderr if " handshakes_ok=" in line]
    assert progress, err  # off a terminal: a status line every 5 s
    assert "messages_ok=" in progress[0] and "unexpected_errors=0" in progress[0]
    assert_clean(run)


def test_bad_input(demo) -> None:
    """A taken --metrics-port: one line, exit 2, no child left running, no key left."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = demo("--duration", "3", "--json", "--metrics-port", str(taken.getsockname()[1]))
        assert run.finish() == 2
    assert len(run.stderr) == 1, run.stderr
    assert "Traceback" not in run.stderr[0]
    assert_clean(run)


def test_child_fails_to_start(demo, tmp_path: Path) -> None:
    """`sage-otel serve` exits at once: its one-line reason, exit 2, nothing left."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_SERVE.replace("{mode}", "fail"))
    run = demo(*QUICK, env={"PYTHONPATH": str(site)})
    assert run.finish() == 2
    assert own_lines(run) == ["sage-otel demo: cannot start: server agent: simulated failure\n"]
    assert_clean(run)


def test_agent_port_taken(demo) -> None:
    """--port taken (by whichever check finds it): one line naming it, exit 2, nothing left."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = demo("--duration", "3", "--json", "--port", str(port))
        assert run.finish() == 2
    assert len(run.stderr) == 1 and str(port) in run.stderr[0], run.stderr
    assert_clean(run)


@pytest.mark.parametrize("where", ["--fast", "--in-process"])
def test_ctrl_c_ends_quietly(demo, where: str) -> None:
    """Ctrl-C (SIGINT to the foreground process group) ends the run as --duration does:
    the summary, exit 0, at most two more lines on stderr and no traceback. In one process
    too, where the server agent's uvicorn must not take the signal as its own and close
    under requests still in flight (they would count as unexpected errors)."""
    run = demo(where, "--json", "--metrics-port", str(free_port()))
    if where == "--fast":
        run.wait_running()
    else:  # no child to wait for: let the run get going
        time.sleep(4)
    before = len(run.stderr)
    os.killpg(run.process.pid, signal.SIGINT)
    assert run.finish(timeout=15) == 0, "".join(run.stderr)
    assert run.summary()["handshakes_ok"] > 0
    assert run.summary()["unexpected_errors"] == {}
    assert len(run.stdout) == 1
    assert len(run.stderr) - before <= 2, run.stderr[before:]
    assert "Traceback" not in "".join(run.stderr)
    assert_clean(run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_child_hangs_starting(demo, tmp_path: Path, signum: int) -> None:
    """A child that never answers, then Ctrl-C or SIGTERM: one line, 128 + N, nothing left."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_SERVE.replace("{mode}", "hang"))
    run = demo(*QUICK, env={"PYTHONPATH": str(site)})
    run.child()
    time.sleep(0.5)
    started = time.monotonic()
    os.killpg(run.process.pid, signum)
    assert run.finish(timeout=15) == 128 + signum
    assert time.monotonic() - started < 6
    assert own_lines(run) == [f"sage-otel demo: stopped by {signal.Signals(signum).name}\n"]
    assert run.stdout == []
    assert_clean(run)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A TCP listener that accepts connections and never answers: a collector gone silent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_sigterm_with_the_collector_black_holed(demo) -> None:
    """SIGTERM ends the run within 6 s although every export hangs; summary, exit 0."""
    with black_hole() as port:
        run = demo(
            "--json",
            "--metrics-port",
            str(free_port()),
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"},
        )
        run.wait_running()
        time.sleep(2)  # spans and metrics queued for the silent collector
        started = time.monotonic()
        run.process.terminate()
        code = run.finish(timeout=30)
        elapsed = time.monotonic() - started
    assert elapsed < 6, f"{elapsed:.1f} s"
    assert code == 0, "".join(run.stderr)
    assert run.summary()["handshakes_ok"] > 0
    assert "Traceback" not in "".join(run.stderr)
    assert_clean(run)


def test_child_hangs_during_the_run(demo) -> None:
    """A server child that stops answering (SIGSTOP) cannot hold the demo: it ends on time,
    the child is killed and its key removed."""
    run = demo("--duration", "4", "--json", "--metrics-port", str(free_port()))
    child = run.wait_running()
    os.kill(child, signal.SIGSTOP)
    started = time.monotonic()
    assert run.finish(timeout=30) in (0, 1)
    # The rest of the run (under 3 s), in-flight requests (1 s), then SIGTERM to SIGKILL (2 s).
    assert time.monotonic() - started < 8
    assert run.summary()
    assert_clean(run)


def test_child_dies_during_the_run(demo) -> None:
    """A server child that dies ends the run at once: the reason in one line, exit 1."""
    run = demo("--duration", "30", "--json", "--metrics-port", str(free_port()))
    child = run.wait_running()
    os.kill(child, signal.SIGKILL)
    started = time.monotonic()
    assert run.finish(timeout=30) == 1
    assert time.monotonic() - started < 5
    assert "sage-otel demo: the server agent exited with status -9\n" in run.stderr
    assert run.summary()
    assert_clean(run)


def test_sdk_disabled_child_opens_no_metrics_port(demo) -> None:
    """OTEL_SDK_DISABLED=true: the child listens on its agent port only."""
    run = demo("--duration", "30", "--json", env={"OTEL_SDK_DISABLED": "true"})
    child = run.wait_running()  # a metrics port would be open by the time the agent's is
    assert listening_sockets(child) == 1
    assert not any("metrics on" in line for line in run.stderr), run.stderr
    run.process.terminate()
    assert run.finish(timeout=15) == 0
    assert_clean(run)


@pytest.mark.parametrize("when", ["starting", "running"])
def test_demo_killed_leaves_no_child_and_no_key(demo, when: str) -> None:
    """SIGKILL gives the demo no chance to stop its child or remove its directory: the child
    ends by itself (its stdin, held by the demo, ends), and its key was never left on disk
    (it removes the file once loaded), whether the demo dies while the child starts or runs."""
    run = demo(*QUICK)
    if when == "starting":
        child = run.child()
        time.sleep(0.2)
    else:
        child = run.wait_running()
    os.kill(run.process.pid, signal.SIGKILL)
    run.finish()
    deadline = time.monotonic() + 20
    while processes_of(str(run.tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_of(str(run.tmp)), f"server child {child} outlived the demo"
    left = sorted(p.name for p in run.tmp.rglob("*") if p.is_file())
    assert "server-identity.json" not in left
    assert set(left) <= {"registry.json", "registry.json.lock"}  # public documents only


@pytest.mark.parametrize("delay", [0.2, 0.5])
def test_ctrl_c_while_loading_is_one_line(demo, delay: float) -> None:
    run = demo(*QUICK)
    time.sleep(delay)
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 130
    assert own_lines(run) == ["sage-otel demo: stopped by SIGINT\n"]
    assert_clean(run)


def test_second_signal_while_winding_down_is_one_line(demo) -> None:
    """Many clients at full speed take a while to wind down: a second Ctrl-C then stops the
    demo at once, with one line and none of the tasks and connections it abandons."""
    run = demo(*QUICK, "--clients", "40", "--rate", "0")
    run.wait_running()
    run.process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    run.process.send_signal(signal.SIGINT)
    status = run.finish()
    said = [line for line in own_lines(run) if " server agent metrics on " not in line]
    text = "".join(said)
    for noise in ("Traceback", "Task", "Unclosed", "Error"):
        assert noise not in text, text
    if status == 130:
        assert said == ["sage-otel demo: stopped by SIGINT\n"]
    else:  # the second signal came once the clean-up had begun: ignored, as documented
        assert status == 0, text
        run.summary()
    assert_clean(run)


def test_signals_after_the_summary_change_nothing(demo) -> None:
    """Once the summary is out the status is decided: Ctrl-C pressed again and again while
    the process exits neither kills it by the signal nor adds a line."""
    run = demo("--duration", "2", "--json", "--metrics-port", "0")
    deadline = time.monotonic() + 60
    while not any(line.startswith("{") for line in run.stdout):
        assert time.monotonic() < deadline and run.process.poll() is None, run.stderr
        time.sleep(0.001)
    sent = 0
    while run.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            run.process.send_signal(signal.SIGINT)
            sent += 1
        time.sleep(0.002)
    assert run.finish() == 0, (sent, run.stderr)
    said = [line for line in own_lines(run) if " server agent metrics on " not in line]
    assert not [line for line in said if "SIGINT" in line or "Traceback" in line], said
    run.summary()
    assert_clean(run)
