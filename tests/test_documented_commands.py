"""Every shell command in README.md and docs/*.md runs as written.

The commands come from the fenced ``sh``/``bash``/``shell``/``console`` blocks (``$ ``
prompts in console blocks, ``\\`` continuations joined, comments kept as notes). Each
document's commands run in order in one shell-like session: ``export`` carries over, ``make``
runs in this clone (where the Makefile is), everything else in a scratch directory with a
fresh venv from the built wheel first on ``PATH``, as a user who installed it would have.

Nothing is edited in a command but what the explicit tables below say: system paths and
hosts (``REWRITES``), the documented ports (``PORTS`` map to free loopback ports;
``DEFAULT_PORTS`` stay as written), and placeholders (``PLACEHOLDERS``, filled from an
earlier command's output). A command that runs until stopped is started, checked against its
entry in ``UNTIL_STOPPED`` and stopped with SIGTERM (the next such command stops it first,
as a user would); every other command must exit 0 and do what its ``FINISHED`` entries say.
After each, no process it started may survive. Only the commands in ``SKIPPED`` are not
run, each a marked skip with its reason. A new documented command that runs until stopped
without an entry, a new port, placeholder or unlabelled fence, or a table entry that no
longer matches a documented command fails ``test_every_documented_command_has_a_plan``; any
other new command is simply run. So the docs cannot drift from the code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import LOOPBACK, fetch, free_port

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"sh", "bash", "shell", "console", "shell-session"}
# Words that start a command: an unlabelled fence beginning with one must be labelled ```sh.
COMMAND_WORDS = (
    "$ ",
    "sage-otel ",
    "make ",
    "pip ",
    "python ",
    "export ",
    "docker ",
    "uvicorn ",
    "gunicorn ",
    "opentelemetry-instrument ",
)

# Documented commands that are not run, and why. Matched exactly (whitespace collapsed).
SKIPPED: dict[str, str] = {
    "docker compose -f collector/docker-compose.yaml up": (
        "needs a container engine and the Grafana, Tempo, Prometheus and Alertmanager images; "
        "tests/test_stack_config.py validates the compose file and every config it mounts"
    ),
    "make test": "the suite this test belongs to: running it here would run this test again",
}

# (documented text, what stands in for it, why). ``{scratch}`` is the document's scratch
# directory; a rewritten directory is created there, as an operator's would exist.
REWRITES: list[tuple[str, str, str]] = [
    ("/var/lib/sage/", "{scratch}/var/lib/sage/", "the agent's data directory"),
    ("/run/sage-metrics", "{scratch}/run/sage-metrics", "the multiprocess metrics directory"),
    ("0.0.0.0", LOOPBACK, "listen on loopback only: no test traffic leaves the machine"),
    ("//collector:", f"//{LOOPBACK}:", "the collector's host name in a deployment"),
    ("//localhost:", f"//{LOOPBACK}:", "one loopback address for the receiver below"),
]
# Ports the docs write. Each maps to a free loopback port per document (the same one for
# every command of the document); 4318 (OTLP/HTTP) to a receiver that records what arrives.
PORTS = (8080, 9095, 4317, 4318)
# The /metrics ports sage-otel serve (9090) and the demo (9464) bind when a command names
# none: kept as they are, written or not, so that two documented commands that collide on
# one collide here as they would for the user. Each must be free before a document's
# command starts (unless the document's own running command holds it); the test waits.
DEFAULT_PORTS = (9090, 9464)
# A port written in a command: after ``:``, ``port `` or ``PORT=``.
WRITTEN_PORT = re.compile(r"(?:\b[\w-]*port[= ]|:)(\d{2,5})\b", re.IGNORECASE)
OTLP_HTTP_PORT = 4318

# Placeholder in a command -> the named group of an earlier UNTIL_STOPPED output it takes.
PLACEHOLDERS = {"<DID>": "DID"}
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")

# Commands that look like they run until stopped: each needs an UNTIL_STOPPED entry.
RUNS_UNTIL_STOPPED = [
    r"\bsage-otel serve\b",
    r"\bsage-otel demo\b(?!.*--duration)",
    r"^make demo\b(?!.*--duration)",
    r"^(uvicorn|gunicorn)\b",
    r"\bdocker compose\b.*\bup\b(?!.*(\s-d\b|--detach))",
]
# Note under a command whose rest is the exact first line it prints on stdout.
FIRST_LINE_NOTE = "first stdout line:"


@dataclass(frozen=True)
class UntilStopped:
    """What a command that runs until stopped must show before it is sent SIGTERM."""

    command: str  # regex searched in the documented command
    why: str
    output: str | None = None  # regex a line of its output must match; groups are kept
    first_stdout_line: bool = False  # ``output`` must match the first stdout line itself
    get: str | None = None  # URL (formatted with the groups) answering 200 with "sage_"
    otlp: bool = False  # the OTLP/HTTP receiver on the documented port gets spans
    exit_codes: tuple[int, ...] = (0,)


UNTIL_STOPPED = [
    UntilStopped(
        r"^make demo$",
        "the demo and its server agent, until Ctrl-C; the demo's /metrics serves SAGE series",
        output=r"metrics on (?P<metrics>http://\S+/metrics)$",
        get="{metrics}",
        # make passes SIGTERM to the demo, then ends by the signal it got.
        exit_codes=(0, -signal.SIGTERM),
    ),
    UntilStopped(
        r"^sage-otel serve\b",
        "the first stdout line names the DID and both URLs once the agent accepts connections",
        output=r"^did=(?P<DID>did:sage:\S+) url=(?P<url>http://\S+) "
        r"metrics=(?P<metrics>http://\S+/metrics)$",
        first_stdout_line=True,
        get="{metrics}",
    ),
    UntilStopped(
        r"^uvicorn --factory sage_otel\.server:create_app\b",
        "the agent as an ASGI app: with PROMETHEUS_MULTIPROC_DIR its port answers /metrics",
        output=r"Uvicorn running on (?P<url>http://\S+)",
        get="{url}/metrics",
    ),
    UntilStopped(
        r"^gunicorn -k uvicorn\.workers\.UvicornWorker\b.*sage_otel\.server:create_app",
        "the agent under gunicorn: with PROMETHEUS_MULTIPROC_DIR its port answers /metrics",
        output=r"Listening at: (?P<url>http://\S+)",
        get="{url}/metrics",
    ),
]


@dataclass(frozen=True)
class Finished:
    """What a command that ends by itself must have done, besides exit 0."""

    command: str  # regex searched in the documented command, environment prefix included
    why: str
    stdout: str | None = None  # regex searched (multi-line) in its stdout
    otlp: bool = False  # the OTLP/HTTP receiver on the documented port got spans


FINISHED = [
    Finished(
        r"OTEL_EXPORTER_OTLP_ENDPOINT=\S+ .*opentelemetry-instrument\b.* sage-otel demo\b",
        "the auto-instrumented demo exports spans to the collector the command names",
        stdout=r"^messages_ok: [1-9]",
        otlp=True,
    ),
    Finished(
        r"^opentelemetry-instrument --traces_exporter console\b.* sage-otel demo\b",
        "the auto-instrumented demo prints sage. spans, then its summary",
        stdout=r'"name": "sage\.(?s:.*)^messages_ok: [1-9]',
    ),
    Finished(
        r"\bsage-otel demo\b.*--json",
        "--json: the last stdout line is the JSON summary",
        stdout=r'^\{.*"messages_ok": [1-9].*\}\Z',
    ),
]

# What the fresh venv gets besides the wheel: the extra opentelemetry-instrument needs
# (README: `pip install '.[auto]'`) and programs the docs use that sage-otel does not ship.
EXTRAS = "auto"
PREREQUISITES = ["gunicorn"]

MARKER = "SAGE_DOCS_RUN_MARKER"  # in every command's environment: finds its processes
FINISH_TIMEOUT = 180.0  # a command that does not end by itself
READY_TIMEOUT = 60.0  # until an UNTIL_STOPPED command shows what its entry expects
STOP_TIMEOUT = 10.0  # SIGTERM to exit: "exit 0 within a few seconds" (docs/deploy.md)


# ----------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, the shell text as written, its note lines."""

    document: str
    line: int
    source: str  # the lines as written, continuations and comments included
    text: str  # continuations joined, trailing comment removed
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return " ".join(self.text.split())

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes, after a blank)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fences(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line number of the first content line, lines) of each fenced block."""
    lines = text.splitlines()
    opener = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
    i = 0
    while i < len(lines):
        match = opener.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        yield lang, start + 1, lines[start:end]
        i = end + 1


def commands_in(document: str, text: str) -> list[Command]:
    """The shell commands of ``text``'s shell fences, in order."""
    found: list[Command] = []
    for lang, first, lines in fences(text):
        if lang not in SHELL_FENCES:
            continue
        prompted = lang in ("console", "shell-session")
        block_start = len(found)
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            number = first + i
            i += 1
            if prompted:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line:
                continue
            if line.startswith("#"):
                if len(found) > block_start and not prompted:
                    last = found[-1]
                    note = line.lstrip("#").strip()
                    found[-1] = Command(
                        last.document, last.line, last.source, last.text, (*last.notes, note)
                    )
                continue
            source, pieces = [line], [line]
            while pieces[-1].endswith("\\") and i < len(lines):
                pieces[-1] = pieces[-1][:-1].rstrip()
                source.append(lines[i])
                pieces.append(lines[i].strip())
                i += 1
            text_ = strip_comment(" ".join(pieces))
            found.append(Command(document, number, "\n".join(source), text_))
    return found


def documented_commands() -> list[Command]:
    commands: list[Command] = []
    for path in DOCUMENTS:
        commands += commands_in(str(path.relative_to(REPO)), path.read_text(encoding="utf-8"))
    return commands


def unlabelled_commands() -> list[str]:
    """Places where a fence without a language starts with what looks like a command."""
    places = []
    for path in DOCUMENTS:
        for lang, first, lines in fences(path.read_text(encoding="utf-8")):
            body = [line.strip() for line in lines if line.strip()]
            if not lang and body and body[0].startswith(COMMAND_WORDS):
                places.append(f"{path.relative_to(REPO)}:{first}: {body[0]}")
    return places


def watch_for(command: Command) -> UntilStopped | None:
    matches = [w for w in UNTIL_STOPPED if re.search(w.command, without_assignments(command))]
    assert len(matches) <= 1, f"{command.where}: several UNTIL_STOPPED entries match"
    return matches[0] if matches else None


def finished_for(command: Command) -> list[Finished]:
    return [f for f in FINISHED if re.search(f.command, command.key)]


def without_assignments(command: Command) -> str:
    """The command after its leading ``NAME=value`` words (an environment prefix)."""
    return re.sub(r"^(\s*[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+", "", command.key)


def looks_until_stopped(command: Command) -> bool:
    return any(re.search(p, without_assignments(command)) for p in RUNS_UNTIL_STOPPED)


def runs_in_clone(command: Command) -> bool:
    """``make`` targets are the clone's: they run where the Makefile is."""
    return without_assignments(command).startswith("make ")


# ----------------------------------------------------------------------------- the plan


def plan_problems(commands: list[Command]) -> list[str]:
    """Why some documented command could not be run by this test (empty when all can)."""
    problems = []
    provided: dict[str, set[str]] = {}
    for command in commands:
        if command.key in SKIPPED:
            continue
        watch = watch_for(command)
        problems += [
            f"{command.where}: `{command.key}`: port {port}: add it to PORTS (mapped to a "
            "free port) or, if a command binds it by default, to DEFAULT_PORTS"
            for port in WRITTEN_PORT.findall(command.text)
            if int(port) not in PORTS + DEFAULT_PORTS
        ]
        if looks_until_stopped(command) and watch is None:
            problems.append(
                f"{command.where}: `{command.key}` runs until stopped: add an UNTIL_STOPPED "
                "entry saying what it must show, or a SKIPPED entry saying why it cannot run"
            )
        for placeholder in PLACEHOLDER.findall(command.text):
            group = PLACEHOLDERS.get(placeholder)
            if group is None:
                problems.append(
                    f"{command.where}: `{command.key}`: no PLACEHOLDERS entry for {placeholder}"
                )
            elif group not in provided.get(command.document, set()):
                problems.append(
                    f"{command.where}: `{command.key}`: no earlier command in "
                    f"{command.document} prints {placeholder} (group {group!r})"
                )
        if watch is not None and watch.output:
            provided.setdefault(command.document, set()).update(re.compile(watch.output).groupindex)
    keys = {command.key for command in commands}
    problems += [
        f"SKIPPED entry matches no documented command: {key!r}"
        for key in SKIPPED
        if key not in keys
    ]
    for watch in UNTIL_STOPPED:
        if not any(re.search(watch.command, without_assignments(c)) for c in commands):
            problems.append(f"UNTIL_STOPPED entry matches no documented command: {watch.command}")
    for expect in FINISHED:
        if not any(re.search(expect.command, c.key) for c in commands):
            problems.append(f"FINISHED entry matches no documented command: {expect.command}")
    problems += [
        f"{place}: a command in a fence without a language: label it ```sh"
        for place in unlabelled_commands()
    ]
    return problems


COMMANDS = documented_commands()
RUN_DOCUMENTS = sorted({c.document for c in COMMANDS if c.key not in SKIPPED})


def test_every_documented_command_has_a_plan() -> None:
    assert COMMANDS, "no shell commands found in README.md and docs/*.md"
    problems = plan_problems(COMMANDS)
    assert not problems, "\n".join(problems)


def test_extraction_joins_continuations_and_reads_prompts() -> None:
    text = "\n".join(
        [
            "```sh",
            "A=1 prog --x 1 \\",
            "    --y 'a # b'   # why",
            "# first stdout line: ok",
            "```",
            "```console",
            "$ other --z",
            "output line",
            "```",
            "```python",
            "not_a_command()",
            "```",
        ]
    )
    commands = commands_in("doc.md", text)
    assert [(c.line, c.key, c.notes) for c in commands] == [
        (2, "A=1 prog --x 1 --y 'a # b'", ("first stdout line: ok",)),
        (7, "other --z", ()),
    ]
    assert without_assignments(commands[0]) == "prog --x 1 --y 'a # b'"


def test_a_new_command_without_a_plan_fails_the_plan() -> None:
    new = [
        Command("docs/new.md", 3, "docker compose -f x.yaml up", "docker compose -f x.yaml up"),
        Command("docs/new.md", 4, "x <PEER>", "x <PEER>"),
        Command("docs/new.md", 5, "x --metrics-port 9091", "x --metrics-port 9091"),
    ]
    problems = plan_problems(COMMANDS + new)
    assert any("docs/new.md:3" in p and "UNTIL_STOPPED" in p for p in problems), problems
    assert any("docs/new.md:4" in p and "<PEER>" in p for p in problems), problems
    assert any("docs/new.md:5" in p and "port 9091" in p for p in problems), problems


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, id=c.where, marks=pytest.mark.skip(reason=f"{c.key}: {SKIPPED[c.key]}"))
        for c in COMMANDS
        if c.key in SKIPPED
    ],
)
def test_skipped_command(command: Command) -> None:
    """Never runs: one marked skip per documented command in SKIPPED, with its reason."""


# ----------------------------------------------------------------------------- running


class OtlpReceiver:
    """An OTLP/HTTP endpoint on loopback that records the paths of what it is sent."""

    def __init__(self) -> None:
        received: list[str] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def survivors(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries ``marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry.name), cmdline.strip()))
    return found


def all_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process this user can see."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry.name), cmdline.strip()))
    return found


def reap(marker: str, what: str) -> None:
    """Fail (after killing them) if processes started by one command outlive it."""
    deadline = time.monotonic() + 5
    left = survivors(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = survivors(marker)
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while left and survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"{what}: processes left running after it ended: {left}"


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the servers bind: a closed listener's connections in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def wait_for_default_ports(command: Command, timeout: float = 30.0) -> None:
    """DEFAULT_PORTS free (a clash must be the docs' own, not this machine's)."""
    deadline = time.monotonic() + timeout
    while busy := [port for port in DEFAULT_PORTS if not port_free(port)]:
        assert time.monotonic() < deadline, (
            f"{command.where}: `{command.key}`: port(s) {busy}, which documented commands bind "
            "by default, are held by another process on this machine"
        )
        time.sleep(0.5)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(nothing)"


@dataclass
class Running:
    """A command that runs until stopped, its output read as it comes."""

    command: Command
    ran: str
    watch: UntilStopped
    process: subprocess.Popen[str]
    marker: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, into in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            threading.Thread(target=self._read, args=(stream, into), daemon=True).start()

    @staticmethod
    def _read(stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))

    def report(self) -> str:
        return (
            f"{self.command.where}: `{self.command.key}` (ran as `{self.ran}`)\n"
            f"--- stdout\n{tail(chr(10).join(self.stdout))}\n"
            f"--- stderr\n{tail(chr(10).join(self.stderr))}"
        )

    def stop(self) -> None:
        """SIGTERM, then it must exit with a documented status and leave nothing running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            with contextlib.suppress(AssertionError):
                reap(self.marker, self.command.key)  # killed; the hang is what to report
            raise AssertionError(
                f"still running {STOP_TIMEOUT:.0f} s after SIGTERM:\n{self.report()}"
            ) from None
        time.sleep(0.2)  # the readers take the last lines
        reap(self.marker, f"{self.command.where}: `{self.command.key}`")
        assert code in self.watch.exit_codes, (
            f"exited {code} after SIGTERM (expected {self.watch.exit_codes}):\n{self.report()}"
        )


class Session:
    """One document's commands, run in order like one shell, with its own scratch dir."""

    def __init__(self, document: str, scratch: Path, venv: Path, receiver: OtlpReceiver) -> None:
        self.document = document
        self.scratch = scratch
        self.receiver = receiver
        self.ports = {port: free_port() for port in PORTS}
        self.ports[OTLP_HTTP_PORT] = receiver.port
        self.captures: dict[str, str] = {}
        self.background: Running | None = None
        self.waiting = ""  # what the running command has not shown yet
        (scratch / "tmp").mkdir()
        dev_bin = str(REPO / ".venv" / "bin")
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("OTEL_", "SAGE_OTEL_", "PROMETHEUS_"))
            # A user's shell has none of these; the make variables would tie a documented
            # `make` to the jobserver of the `make test` that runs this test.
            and key
            not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST", "MAKEFLAGS", "MFLAGS")
            and not key.startswith("MAKE")
        }
        self.env.update(
            PATH=os.pathsep.join([str(venv / "bin"), *path]),
            VIRTUAL_ENV=str(venv),
            TMPDIR=str(scratch / "tmp"),
        )

    def rewrite(self, text: str) -> str:
        """The command with REWRITES, PORTS and PLACEHOLDERS applied."""
        for written, instead, _why in REWRITES:
            if written in text and "{scratch}" in instead:
                (self.scratch / instead.format(scratch="")[1:]).mkdir(parents=True, exist_ok=True)
            text = text.replace(written, instead.format(scratch=self.scratch))
        for port, mapped in self.ports.items():
            text = re.sub(rf"\b{port}\b", str(mapped), text)
        for placeholder, group in PLACEHOLDERS.items():
            if placeholder in text:
                text = text.replace(placeholder, self.captures[group])
        return text

    def cwd(self, command: Command) -> Path:
        return REPO if runs_in_clone(command) else self.scratch

    def check_clone_venv(self, command: Command) -> None:
        """A make target would reinstall a stale dev venv: say so rather than do it."""
        if runs_in_clone(command):
            stamp = subprocess.run(
                ["make", "-q", ".venv/.installed"], cwd=REPO, capture_output=True, check=False
            )
            assert stamp.returncode == 0, (
                f"{command.where}: `{command.key}` would reinstall .venv (older than "
                "pyproject.toml): run `make install` (make test does) first"
            )

    def run(self, command: Command) -> None:
        watch = watch_for(command)
        if watch is not None:
            self.start(command, watch)
        else:
            self.finish(command)

    def finish(self, command: Command) -> None:
        """A command that ends by itself: exit 0, the environment it exports kept."""
        self.check_clone_venv(command)
        ran = self.rewrite(command.text)
        if self.background is None:
            wait_for_default_ports(command)
        marker = uuid.uuid4().hex
        before = len(self.receiver.received)
        env_out, out, err = (self.scratch / name for name in ("env.out", "stdout", "stderr"))
        script = f'{ran}\n__rc=$?\nenv -0 > "{env_out}"\nexit $__rc\n'
        # Output into files, not pipes: a process the command leaves behind cannot hold it.
        with open(out, "w") as stdout, open(err, "w") as stderr:
            try:
                code = subprocess.run(
                    ["bash", "-c", script],
                    cwd=self.cwd(command),
                    env={**self.env, MARKER: marker},
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    timeout=FINISH_TIMEOUT,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        result = subprocess.CompletedProcess(
            ran, code, out.read_text(errors="replace"), err.read_text(errors="replace")
        )
        if code is None:
            with contextlib.suppress(AssertionError):
                reap(marker, command.key)  # killed; the timeout is the failure to report
            raise AssertionError(
                f"{command.where}: `{command.key}` (ran as `{ran}`) did not end within "
                f"{FINISH_TIMEOUT:.0f} s: if it runs until stopped, give it an UNTIL_STOPPED "
                f"entry\n--- stdout\n{tail(result.stdout)}\n--- stderr\n{tail(result.stderr)}"
            )
        report = (
            f"{command.where}: `{command.key}` (ran as `{ran}` in {self.cwd(command)}) exited "
            f"{result.returncode}\n--- stdout\n{tail(result.stdout)}\n"
            f"--- stderr\n{tail(result.stderr)}"
        )
        assert result.returncode == 0, report
        reap(marker, f"{command.where}: `{command.key}`")
        for expect in finished_for(command):
            if expect.stdout:
                assert re.search(expect.stdout, result.stdout.strip(), re.MULTILINE), (
                    f"stdout does not match {expect.stdout} ({expect.why}):\n{report}"
                )
            if expect.otlp:
                assert "/v1/traces" in self.receiver.received[before:], (
                    f"no OTLP/HTTP trace export reached 127.0.0.1:{self.receiver.port}, the "
                    f"documented port {OTLP_HTTP_PORT} ({expect.why}):\n{report}"
                )
        exported = dict(
            item.split("=", 1) for item in env_out.read_text().split("\0") if "=" in item
        )
        for name in (MARKER, "_", "SHLVL", "PWD", "OLDPWD"):
            exported.pop(name, None)
        self.env = exported

    def start(self, command: Command, watch: UntilStopped) -> None:
        """Start it (stopping the one before), wait for what its entry expects, keep it."""
        self.stop()
        self.check_clone_venv(command)
        ran = self.rewrite(command.text)
        wait_for_default_ports(command)
        marker = uuid.uuid4().hex
        before = len(self.receiver.received)
        process = subprocess.Popen(
            ["bash", "-c", ran],
            cwd=self.cwd(command),
            env={**self.env, MARKER: marker},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running = self.background = Running(command, ran, watch, process, marker)
        expected = self.first_line(command)
        deadline = time.monotonic() + READY_TIMEOUT
        groups = self.ready(running, before, expected)
        while groups is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            groups = self.ready(running, before, expected)
        if groups is None:
            state = "ended" if process.poll() is not None else "still running"
            raise AssertionError(
                f"did not show what the docs say within {READY_TIMEOUT:.0f} s ({state}, "
                f"exit {process.returncode}; {self.waiting}): {watch.why}\n{running.report()}"
            )
        self.captures.update(groups)

    def first_line(self, command: Command) -> re.Pattern[str] | None:
        """The note under the command that quotes its first stdout line, as a pattern."""
        for note in command.notes:
            if note.startswith(FIRST_LINE_NOTE):
                line = self.rewrite(note[len(FIRST_LINE_NOTE) :].strip().replace("<DID>", "\0"))
                return re.compile(re.escape(line).replace("\0", r"(?P<DID>\S+)") + "$")
        return None

    def ready(
        self, running: Running, before: int, expected: re.Pattern[str] | None
    ) -> dict[str, str] | None:
        """The captured groups once everything ``running``'s entry expects is there."""
        watch, groups = running.watch, {}
        lines = list(running.stdout) + list(running.stderr)
        if watch.first_stdout_line or expected is not None:
            if not running.stdout:
                self.waiting = "nothing on stdout yet"
                return None
            first = running.stdout[0]
            if expected is not None:
                assert expected.match(first), (
                    f"first stdout line is not the documented one ({expected.pattern}):\n"
                    f"{running.report()}"
                )
            lines = [first]
        if watch.output:
            match = next(
                (m for m in map(re.compile(watch.output).search, lines) if m is not None), None
            )
            if match is None:
                assert not watch.first_stdout_line, (
                    f"first stdout line does not match {watch.output}:\n{running.report()}"
                )
                self.waiting = f"no output line matching {watch.output}"
                return None
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
        if watch.otlp and "/v1/traces" not in self.receiver.received[before:]:
            self.waiting = (
                f"no OTLP/HTTP trace export reached 127.0.0.1:{self.receiver.port}, the "
                f"documented port {OTLP_HTTP_PORT}"
            )
            return None
        if watch.get:
            url = watch.get.format(**groups)
            try:
                _type, body = fetch(url, timeout=5)
            except OSError as error:
                self.waiting = f"GET {url}: {error}"
                return None
            if "sage_" not in body:
                self.waiting = f"GET {url}: no sage_ series"
                return None
        return groups

    def stop(self) -> None:
        if self.background is not None:
            running, self.background = self.background, None
            running.stop()


@pytest.fixture(scope="session")
def docs_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout (once per session), its
    EXTRAS and the PREREQUISITES, as a user following the README would have."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(argv: list[str]) -> None:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=600, env=env, check=False
        )
        assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stderr}"

    dist = tmp_path_factory.mktemp("docs-wheel")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)])
    (wheel,) = dist.glob("sage_otel-*.whl")
    venv = tmp_path_factory.mktemp("docs-venv") / "venv"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run([*pip, f"{wheel}[{EXTRAS}]", *PREREQUISITES])
    return venv


@pytest.mark.packaging
@pytest.mark.timeout(900)
@pytest.mark.parametrize("document", RUN_DOCUMENTS)
def test_documented_commands_run(document: str, docs_venv: Path, tmp_path: Path) -> None:
    """Each of the document's commands, in order, does what the docs say."""
    receiver = OtlpReceiver()
    session = Session(document, tmp_path, docs_venv, receiver)
    try:
        for command in (c for c in COMMANDS if c.document == document):
            if command.key not in SKIPPED:
                session.run(command)
        session.stop()
    finally:
        if session.background is not None:
            with contextlib.suppress(AssertionError):
                session.background.stop()
        receiver.close()


# ----------------------------------------------------------------------------- the runner


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A session with no venv of its own: for commands that need none."""
    receiver = OtlpReceiver()
    session = Session("doc.md", tmp_path, tmp_path / "no-venv", receiver)
    try:
        yield session
    finally:
        with contextlib.suppress(AssertionError):
            session.stop()
        receiver.close()


def command(text: str) -> Command:
    return Command("doc.md", 9, text, text)


def test_rewrites_ports_paths_and_hosts(session: Session) -> None:
    ran = session.rewrite("serve --host 0.0.0.0 --port 8080 --identity /var/lib/sage/id.json")
    assert ran == (
        f"serve --host {LOOPBACK} --port {session.ports[8080]} "
        f"--identity {session.scratch}/var/lib/sage/id.json"
    )
    assert (session.scratch / "var" / "lib" / "sage").is_dir()


def test_exports_carry_over_to_the_next_command(session: Session) -> None:
    session.finish(command("export DOCS_A=1 DOCS_B=two"))
    session.finish(command('test "$DOCS_A $DOCS_B" = "1 two"'))


def test_a_failing_command_reports_itself_and_its_output(session: Session) -> None:
    with pytest.raises(AssertionError) as failure:
        session.finish(command("echo to-stdout; echo to-stderr >&2; exit 3"))
    report = str(failure.value)
    assert "doc.md:9" in report and "exited 3" in report
    assert "to-stdout" in report and "to-stderr" in report


def test_a_process_left_running_fails_and_is_killed(session: Session) -> None:
    with pytest.raises(AssertionError, match="left running"):
        session.finish(command("sleep 117 & echo started"))
    deadline = time.monotonic() + 5
    while [cmd for _pid, cmd in all_processes() if cmd == "sleep 117"]:
        assert time.monotonic() < deadline, "the process left running was not killed"
        time.sleep(0.1)


def test_until_stopped_checks_its_first_line_keeps_its_groups_and_stops_it(
    session: Session,
) -> None:
    line = "did=did:sage:solana:abc url=http://127.0.0.1:1 metrics=http://127.0.0.1:2/metrics"
    script = f"import time; print({line!r}, flush=True); time.sleep(120)"
    watch = dataclasses.replace(UNTIL_STOPPED[1], get=None, exit_codes=(-signal.SIGTERM,))
    session.start(command(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"), watch)
    assert session.captures["DID"] == "did:sage:solana:abc"
    marker = session.background.marker if session.background else ""
    assert survivors(marker)
    session.stop()
    assert not survivors(marker)


def test_until_stopped_that_never_shows_what_it_should_fails(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "READY_TIMEOUT", 1.0)
    watch = dataclasses.replace(UNTIL_STOPPED[1], get=None, exit_codes=(-signal.SIGTERM,))
    with pytest.raises(AssertionError, match="did not show what the docs say"):
        session.start(command("sleep 120"), watch)
