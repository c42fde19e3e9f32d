"""Every bad flag and environment variable of ``sage-otel demo`` and ``serve``, run as a user
runs the installed command: one line on stderr naming what is wrong, exit 2, and nothing
created, bound or started (the working directory and TMPDIR stay empty, no process of the
run is left, the ports it was given are free)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.cli import DEMO_METRICS_PORT, SERVE_METRICS_PORT, build_parser
from sage_otel.preflight import metrics_address
from support import fetch, free_port

BIN = Path(sys.executable).parent / "sage-otel"
MARK = "SAGE_CLI_INPUTS_RUN"  # in the environment of every process a run starts
SOME_DID = str(AgentIdentity.generate(Chain.SOLANA).did)
REGISTRY = ("--registry", "{inputs}/absent.json")  # absent: must stay so
UNSIGNED_REGISTRY = '{"documents": [{"id": "did:sage:solana:abc"}]}\n'


@dataclass(frozen=True)
class Case:
    """A bad input: ``args`` after the command's base flags, ``env`` added to a clean
    environment; the error line must contain every string of ``names``."""

    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = ()


FLAGS: dict[str, dict[str, Case]] = {
    "serve": {
        "port-too-big": Case(("--port", "99999"), names=("--port",)),
        "port-negative": Case(("--port", "-1"), names=("--port",)),
        "port-word": Case(("--port", "http"), names=("--port",)),
        "port-zero": Case(("--port", "0"), names=("--port",)),
        "port-busy": Case(("--port", "{busy}"), names=("--port", "in use", "{busy}")),
        "metrics-port-too-big": Case(("--metrics-port", "70000"), names=("--metrics-port",)),
        "metrics-port-busy": Case(
            ("--metrics-port", "{busy}"), names=("--metrics-port", "in use", "{busy}")
        ),
        "metrics-port-is-port": Case(("--metrics-port", "{port}"), names=("--metrics-port",)),
        "host-bad-ip": Case(("--host", "999.1.1.1"), names=("--host",)),
        "host-bad-name": Case(("--host", "no such host!"), names=("--host",)),
        "host-not-here": Case(("--host", "192.0.2.1"), names=("--host",)),
        "metrics-host-bad-ip": Case(("--metrics-host", "999.1.1.1"), names=("--metrics-host",)),
        "metrics-host-not-here": Case(("--metrics-host", "192.0.2.1"), names=("--metrics-host",)),
        "workers-zero": Case(("--workers", "0"), names=("--workers",)),
        "workers-word": Case(("--workers", "many"), names=("--workers",)),
        "chain-unknown": Case(
            ("--identity", "{inputs}/new.json", "--chain", "bitcoin"), names=("--chain",)
        ),
        "identity-not-one": Case(
            ("--identity", "{inputs}/hostname"),
            names=("--identity", "not a sage-otel identity file"),
        ),
        "identity-directory": Case(("--identity", "{inputs}"), names=("--identity",)),
        "identity-no-directory": Case(
            ("--identity", "{inputs}/missing/id.json"), names=("--identity", "does not exist")
        ),
        "registry-bad-json": Case(
            ("--registry", "{inputs}/broken.json"), names=("--registry", "broken.json", "line 3")
        ),
        "registry-not-registry": Case(
            ("--registry", "{inputs}/list.json"), names=("--registry", "list.json")
        ),
        "registry-unsigned": Case(
            ("--registry", "{inputs}/unsigned.json"), names=("--registry", "unsigned.json")
        ),
        "registry-directory": Case(("--registry", "{inputs}"), names=("--registry",)),
        "registry-fifo": Case(
            ("--registry", "{inputs}/fifo.json"), names=("--registry", "not a regular file")
        ),
        "registry-huge": Case(
            ("--registry", "{inputs}/huge.json"), names=("--registry", "huge.json", "MiB")
        ),
        "unknown-flag": Case(("--bogus",), names=("--bogus", "sage-otel serve --help")),
        "prometheus-port-busy": Case(
            env={"OTEL_EXPORTER_PROMETHEUS_PORT": "{busy}"},
            names=("--metrics-port", "OTEL_EXPORTER_PROMETHEUS_PORT", "in use"),
        ),
    },
    "demo": {
        "duration-word": Case(("--duration", "long"), names=("--duration",)),
        "duration-negative": Case(("--duration", "-1"), names=("--duration",)),
        "duration-nan": Case(("--duration", "nan"), names=("--duration",)),
        "clients-zero": Case(("--clients", "0"), names=("--clients",)),
        "clients-word": Case(("--clients", "some"), names=("--clients",)),
        "rate-negative": Case(("--rate", "-1"), names=("--rate",)),
        "rate-infinite": Case(("--rate", "inf"), names=("--rate",)),
        "port-too-big": Case(("--port", "99999"), names=("--port",)),
        "port-busy": Case(("--port", "{busy}"), names=("--port", "in use", "{busy}")),
        "metrics-port-too-big": Case(("--metrics-port", "99999"), names=("--metrics-port",)),
        "metrics-port-busy": Case(
            ("--metrics-port", "{busy}"), names=("--metrics-port", "in use", "{busy}")
        ),
        "host-bad-ip": Case(("--host", "999.1.1.1"), names=("--host",)),
        "metrics-host-bad-ip": Case(("--metrics-host", "999.1.1.1"), names=("--metrics-host",)),
        "metrics-host-not-here": Case(("--metrics-host", "192.0.2.1"), names=("--metrics-host",)),
        "registry-bad-json": Case(
            ("--registry", "{inputs}/broken.json"), names=("--registry", "line 3")
        ),
        "fast-and-in-process": Case(("--fast", "--in-process"), names=("--in-process",)),
        "server-alone": Case(("--server", "http://127.0.0.1:{free}"), names=("--server",)),
        "server-not-url": Case(
            ("--server", "127.0.0.1:{free}", "--server-did", SOME_DID, *REGISTRY),
            names=("--server",),
        ),
        "server-did-bad": Case(
            ("--server", "http://127.0.0.1:{free}", "--server-did", "did:example:1", *REGISTRY),
            names=("--server-did",),
        ),
        "server-unreachable": Case(
            ("--server", "http://127.0.0.1:{free}", "--server-did", SOME_DID, *REGISTRY),
            names=("--server", "not reachable"),
        ),
        "prometheus-port-busy": Case(
            env={"OTEL_EXPORTER_PROMETHEUS_PORT": "{busy}"},
            names=("--metrics-port", "OTEL_EXPORTER_PROMETHEUS_PORT", "in use"),
        ),
    },
}

# Each is run under both commands: the demo's server child and its own telemetry read them.
VARIABLES: dict[str, dict[str, str]] = {
    "otlp-protocol": {"OTEL_EXPORTER_OTLP_PROTOCOL": "foo"},
    "otlp-traces-protocol": {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpcs"},
    "otlp-metrics-protocol": {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http"},
    "otlp-endpoint": {"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"},
    "otlp-traces-endpoint": {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://127.0.0.1:1"},
    "otlp-timeout": {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"},
    "prometheus-port-word": {"OTEL_EXPORTER_PROMETHEUS_PORT": "abc"},
    "prometheus-port-too-big": {"OTEL_EXPORTER_PROMETHEUS_PORT": "70000"},
    "prometheus-host": {"OTEL_EXPORTER_PROMETHEUS_HOST": "999.1.1.1"},
    "sampler": {"OTEL_TRACES_SAMPLER": "sometimes"},
    "sampler-arg-range": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
    "sampler-arg-word": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "half",
    },
    "metric-interval-zero": {"OTEL_METRIC_EXPORT_INTERVAL": "0"},
    "metric-interval-word": {"OTEL_METRIC_EXPORT_INTERVAL": "soon"},
    "metric-timeout": {"OTEL_METRIC_EXPORT_TIMEOUT": "-1"},
    "bsp-delay": {"OTEL_BSP_SCHEDULE_DELAY": "0"},
    "bsp-timeout": {"OTEL_BSP_EXPORT_TIMEOUT": "x"},
    "bsp-queue": {"OTEL_BSP_MAX_QUEUE_SIZE": "0"},
    "bsp-batch": {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "-1"},
    "bsp-batch-over-queue": {
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "200",
    },
    "sdk-disabled": {"OTEL_SDK_DISABLED": "yes"},
    "crypto-detail": {"OTEL_PYTHON_SAGE_CRYPTO_DETAIL": "verbose"},
    "inbound-trace-context": {"OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT": "PARENT"},
    "session-max-messages": {"SAGE_OTEL_SESSION_MAX_MESSAGES": "many"},
    "handshake-rate": {"SAGE_OTEL_HANDSHAKE_RATE": "fast"},
    "new-peer-share": {"SAGE_OTEL_NEW_PEER_SHARE": "2"},
    "outbound-allow": {"SAGE_OTEL_OUTBOUND_ALLOW": "not-a-cidr"},
    "max-connections": {"SAGE_OTEL_MAX_CONNECTIONS": "0"},
    "metrics-workers": {"SAGE_OTEL_METRICS_WORKERS": "0"},
    "metrics-web-config": {"SAGE_OTEL_METRICS_WEB_CONFIG": "{inputs}/web.yml"},
    "metrics-route": {"SAGE_OTEL_METRICS_ROUTE": "sometimes"},
    "shutdown-timeout": {"SAGE_OTEL_SHUTDOWN_TIMEOUT": "never"},
    "multiproc-dir": {"PROMETHEUS_MULTIPROC_DIR": "{inputs}/missing"},
}

# The variable named in the line: the last one of the case, but for the pairs.
NAMED = {
    "sampler-arg-range": "OTEL_TRACES_SAMPLER_ARG",
    "sampler-arg-word": "OTEL_TRACES_SAMPLER_ARG",
    "bsp-batch-over-queue": "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
}

CASES = [
    pytest.param(command, case, id=f"{command}-{name}")
    for command, cases in FLAGS.items()
    for name, case in cases.items()
] + [
    pytest.param(
        command,
        Case(env=env, names=(NAMED.get(name, next(reversed(env))),)),
        id=f"{command}-env-{name}",
    )
    for name, env in VARIABLES.items()
    for command in ("serve", "demo")
]


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "PROMETHEUS_", "SAGE_OTEL_"))
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@pytest.fixture(scope="module")
def busy() -> Iterator[int]:
    """A port something listens on for the whole module."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Bad files a user might name, outside the run's own directories."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "hostname").write_text("build-host-7\n")
    (folder / "hostname").chmod(0o644)  # what a user's ordinary file looks like
    (folder / "broken.json").write_text('{"version": 2,\n "documents": [\n  {oops}\n]}\n')
    (folder / "list.json").write_text("[1, 2]\n")
    os.mkfifo(folder / "fifo.json")  # reading it would block for ever
    with open(folder / "huge.json", "wb") as huge:  # sparse: 65 MiB that take no disk
        huge.truncate(65 * 1024 * 1024)
    (folder / "unsigned.json").write_text(UNSIGNED_REGISTRY)
    (folder / "web.yml").write_text("tls_server_config: [\n")
    return folder


def _processes_marked(mark: str) -> list[int]:
    """Processes whose environment holds ``MARK=mark``: whatever the run started."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run in its own process group; one that outlives the timeout is killed, group and all."""
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += "\n(still running after 30 s: killed)"
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.mark.parametrize(("command", "case"), CASES)
def test_a_bad_input_is_one_line_and_exit_2_with_nothing_left(
    command: str, case: Case, tmp_path: Path, inputs: Path, busy: int
) -> None:
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    port, metrics_port, free = free_port(), free_port(), free_port()
    values = {"busy": str(busy), "port": str(port), "free": str(free), "inputs": str(inputs)}

    def fill(text: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], text)

    env = {k: fill(v) for k, v in case.env.items()}
    base = [command, "--port", str(port)]
    if "OTEL_EXPORTER_PROMETHEUS_PORT" not in env:
        base += ["--metrics-port", str(metrics_port)]
    if command == "demo":
        base += ["--duration", "2", "--json"]
    mark = uuid.uuid4().hex
    inputs_before = sorted(p.name for p in inputs.iterdir())
    done = _run(
        [str(BIN), *base, *(fill(a) for a in case.args)],
        {**_clean_env(), **env, "TMPDIR": str(tmpdir), MARK: mark},
        cwd,
    )
    left = _processes_marked(mark)
    for pid in left:  # never leave them to the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.strip(), done.stderr
    assert "Traceback" not in done.stderr
    for name in case.names:
        assert fill(name) in done.stderr, (name, done.stderr)
    assert not left, f"processes of the run still alive: {left}"
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())
    assert list(tmpdir.iterdir()) == [], list(tmpdir.iterdir())
    assert sorted(p.name for p in inputs.iterdir()) == inputs_before  # e.g. no 0-byte new.json
    assert _bindable(port) and _bindable(metrics_port)


def _option_blocks(text: str) -> dict[str, str]:
    """Each option's help text in ``--help`` output, by every one of its option strings."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^  (-[^\s,]+(?:, -[^\s,]+)*)", line)
        if match:
            current = [s.strip() for s in match.group(1).split(",")]
            for option in current:
                blocks[option] = line
        elif line.startswith("   ") and current:
            for option in current:
                blocks[option] += " " + line.strip()
        else:
            current = []
    return blocks


@pytest.mark.parametrize("command", ["demo", "serve"])
def test_help_shows_every_option_with_its_default(command: str) -> None:
    done = subprocess.run(
        [str(BIN), command, "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    blocks = _option_blocks(done.stdout)
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    options = [
        action.option_strings[-1]
        for action in subparser._actions
        if action.option_strings and action.dest != "help"
    ]
    assert options
    for option in options:
        assert option in blocks, (option, done.stdout)
        assert "(default:" in blocks[option], blocks[option]
    if command == "demo":
        assert f"else {DEMO_METRICS_PORT}" in blocks["--metrics-port"]
    else:
        assert f"else {SERVE_METRICS_PORT}" in blocks["--metrics-port"]
        assert "sage-identity.json" in blocks["--identity"]


def test_top_level_help_is_plain_text() -> None:
    done = subprocess.run(
        [str(BIN), "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    assert "``" not in done.stdout and ":mod:" not in done.stdout
    assert "demo" in done.stdout and "serve" in done.stdout


def test_the_demo_metrics_port_does_not_collide_with_serve() -> None:
    assert metrics_address(None, None, DEMO_METRICS_PORT, {})[1] == 9464
    assert metrics_address(None, None, SERVE_METRICS_PORT, {})[1] == 9090
    env = {"OTEL_EXPORTER_PROMETHEUS_PORT": "9555"}
    assert metrics_address(None, None, DEMO_METRICS_PORT, env)[1] == 9555
    assert metrics_address(None, 7000, DEMO_METRICS_PORT, env)[1] == 7000


def test_serve_takes_its_metrics_address_from_the_environment(tmp_path: Path) -> None:
    """``OTEL_EXPORTER_PROMETHEUS_PORT`` / ``_HOST`` are serve's defaults, as the demo's; the
    identity it creates is said on stderr; a demo given the wrong DID is told in one line."""
    port, metrics_port = free_port(), free_port()
    identity = tmp_path / "id.json"
    env = {
        **_clean_env(),
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(metrics_port),
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
    }
    process = subprocess.Popen(
        [str(BIN), "serve", "--port", str(port), "--identity", str(identity),
         "--registry", str(tmp_path / "registry.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = process.stdout.readline().strip()
        assert line.endswith(f"metrics=http://127.0.0.1:{metrics_port}/metrics"), line
        _content_type, body = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
        assert "sage_" in body
        url = line.split()[1].removeprefix("url=")
        wrong = subprocess.run(
            [str(BIN), "demo", "--server", url, "--server-did", SOME_DID,
             "--registry", str(tmp_path / "registry.json"), "--duration", "2", "--json"],
            capture_output=True, text=True, timeout=30, env=_clean_env(),
        )  # fmt: skip
        assert wrong.returncode == 2, wrong.stderr
        assert wrong.stderr.count("\n") == 1 and "--server-did" in wrong.stderr, wrong.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = process.stderr.read()
    assert process.returncode == 0, stderr
    assert f"created identity {identity}" in stderr
    assert identity.stat().st_mode & 0o777 == 0o600
    assert _bindable(port) and _bindable(metrics_port)
