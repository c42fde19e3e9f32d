"""`sage-otel serve` with real uvicorn worker processes: exact metrics, restarts, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from support import fetch, free_port

BIN = Path(sys.executable).parent / "sage-otel"
FIRST_LINE = re.compile(r"^did=(\S+) url=(\S+) metrics=(\S+)$")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _start(tmp_path: Path, workers: int, **env: str) -> tuple[subprocess.Popen[str], str, str, str]:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--workers",
            str(workers),
            "--identity",
            str(tmp_path / "id.json"),
            "--registry",
            str(tmp_path / "registry.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_clean_env(), **env},
    )
    line = process.stdout.readline().strip()
    match = FIRST_LINE.match(line)
    assert match, (line, process.stderr.read() if process.poll() is not None else "")
    did, url, metrics = match.groups()
    return process, did, url, metrics


def _demo(tmp_path: Path, did: str, url: str, seconds: float = 3.0) -> dict:
    done = subprocess.run(
        [
            str(BIN),
            "demo",
            "--server",
            url,
            "--server-did",
            did,
            "--registry",
            str(tmp_path / "registry.json"),
            "--duration",
            str(seconds),
            "--json",
            "--clients",
            "3",
            "--no-telemetry",
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ", 1)[0]))
            if series == labels:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in the scrape")


def _workers(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _stop(process: subprocess.Popen[str]) -> float:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    return time.monotonic() - started


def test_counts_are_exact_across_workers_and_survive_a_killed_worker(tmp_path: Path) -> None:
    # The demo's session limit, as the demo gives the server it starts itself: sessions the
    # clients stop using end on the server too, instead of filling the per-peer cap.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()  # where serve makes the workers' shared metrics directory
    process, did, url, metrics = _start(
        tmp_path, workers=2, SAGE_OTEL_SESSION_MAX_MESSAGES="100", TMPDIR=str(private_tmp)
    )
    assert [p.name[:18] for p in private_tmp.iterdir()] == ["sage-otel-metrics-"]
    try:
        first = _demo(tmp_path, did, url)
        victims = _workers(process.pid)
        assert len(victims) >= 2, victims
        os.kill(victims[0], signal.SIGKILL)  # its counts must stay in the sum
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(set(_workers(process.pid)) - {victims[0]}) < 2:
            time.sleep(0.2)
        second = _demo(tmp_path, did, url)
        _type, text = fetch(metrics)
        runs = (first, second)
        ok = sum(r["handshakes_ok"] for r in runs)
        failed = sum(r["handshakes_failed"] for r in runs)
        assert _metric(text, "sage_handshakes_completed_total", status="success") == ok
        assert _metric(text, "sage_handshakes_completed_total", status="failure") == failed
        delivered = sum(r["messages_ok"] + r["sessions_closed"] for r in runs)
        processed = sum(
            _metric(text, "sage_messages_processed_total", status="success", type=t)
            for t in ("text", "binary")
        )
        assert processed == delivered
        replays = sum(r["replays_rejected"] for r in runs)
        assert _metric(text, "sage_replay_attacks_detected_total") == replays
        # /metrics is the metrics port's (with its web config, when there is one): the
        # agent's own port, which faces peers, does not serve it.
        with pytest.raises(urllib.error.HTTPError) as refused:
            fetch(url + "/metrics")
        assert refused.value.code == 404
    finally:
        elapsed = _stop(process)
    assert elapsed < 8.0
    assert list(private_tmp.iterdir()) == []  # its own metrics directory went with it


def test_any_worker_reports_all_of_them_under_plain_uvicorn(tmp_path: Path) -> None:
    """uvicorn --factory with PROMETHEUS_MULTIPROC_DIR: GET /metrics on the agent port."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = _clean_env() | {
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        "SAGE_OTEL_IDENTITY": str(tmp_path / "id.json"),
        "SAGE_OTEL_REGISTRY": str(tmp_path / "registry.json"),
    }
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "sage_otel.server:create_app",
            "--workers",
            "2",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                _type, health = fetch(url + "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        did = json.loads(health)["did"]
        import asyncio

        from sage_otel.server import _register, load_identity

        os.environ["SAGE_OTEL_REGISTRY"] = env["SAGE_OTEL_REGISTRY"]
        try:
            asyncio.run(_register(load_identity(env["SAGE_OTEL_IDENTITY"]), url))
        finally:
            del os.environ["SAGE_OTEL_REGISTRY"]
        run = _demo(tmp_path, did, url, seconds=2.0)
        scrapes = {fetch(url + "/metrics")[1] for _ in range(6)}  # whichever worker answers
        for text in scrapes:
            assert (
                _metric(text, "sage_handshakes_completed_total", status="success")
                == (run["handshakes_ok"])
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


def test_an_identity_file_others_can_read_is_refused(tmp_path: Path) -> None:
    identity = tmp_path / "id.json"
    process, *_ = _start(tmp_path, workers=1)
    _stop(process)
    assert identity.stat().st_mode & 0o777 == 0o600
    identity.chmod(0o644)
    done = subprocess.run(
        [
            str(BIN),
            "serve",
            "--port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--identity",
            str(identity),
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "chmod 600" in done.stderr


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, which: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        ports = {"--port": str(free_port()), "--metrics-port": str(free_port()), which: busy}
        done = subprocess.run(
            [
                str(BIN),
                "serve",
                "--identity",
                str(tmp_path / "id.json"),
                *[x for pair in ports.items() for x in pair],
            ],
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=30,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and busy in done.stderr


def test_the_demo_drives_its_server_in_its_own_process_with_fast(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN), "demo", "--fast", "--rate", "0", "--duration", "3", "--json",
         "--metrics-port", "0", "--registry", str(tmp_path / "registry.json")],
        capture_output=True, text=True, env=_clean_env(), timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["messages_ok"] > 100 and not summary["unexpected_errors"]
    assert summary["replays_rejected"] > 0 and summary["handshakes_failed"] > 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT", "PARENT"),
        ("OTEL_PYTHON_SAGE_CRYPTO_DETAIL", "verbose"),
        ("SAGE_OTEL_MAX_CONNECTIONS", "99999999"),
        ("SAGE_OTEL_METRICS_WORKERS", "0"),
        ("SAGE_OTEL_METRICS_WEB_CONFIG", "BAD_YAML"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2_before_any_side_effect(
    tmp_path: Path, variable: str, value: str
) -> None:
    if value == "BAD_YAML":
        value = str(tmp_path / "web.yml")
        Path(value).write_text("tls_server_config: [\n")
    done = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port()), "--metrics-port", str(free_port()),
         "--identity", str(tmp_path / "id.json")],
        capture_output=True, text=True, timeout=30, env={**_clean_env(), variable: value},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "id.json").exists()  # nothing created


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("many", "not a number"),
        ("0", "must be a finite number > 0"),
        ("-5", "must be a finite number > 0"),
    ],
)
def test_a_bad_session_limit_is_one_line_and_exit_2(
    tmp_path: Path, value: str, reason: str
) -> None:
    done = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port()), "--metrics-port", str(free_port()),
         "--identity", str(tmp_path / "id.json")],
        capture_output=True, text=True, timeout=30,
        env={**_clean_env(), "SAGE_OTEL_SESSION_MAX_MESSAGES": value},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "SAGE_OTEL_SESSION_MAX_MESSAGES" in done.stderr and reason in done.stderr


async def test_the_server_ends_sessions_at_the_configured_message_limit(tmp_path: Path) -> None:
    from sage_otel.agent.did import DIDDocument, DIDResolver, JsonFileRegistry, sign_registration
    from sage_otel.agent.errors import PeerError
    from sage_otel.agent.identity import AgentIdentity
    from sage_otel.agent.session import SessionLimits, SessionManager
    from sage_otel.agent.transport import ClientAgent

    process, did, url, _ = _start(tmp_path, workers=1, SAGE_OTEL_SESSION_MAX_MESSAGES="6")
    try:
        registry = JsonFileRegistry(tmp_path / "registry.json")
        identity = AgentIdentity.generate("solana")
        document = DIDDocument.for_identity(identity)
        await registry.register(document, sign_registration(identity, document))
        # The client's own limit is far away: only the server's can end the session.
        agent = ClientAgent(
            identity, DIDResolver(registry), sessions=SessionManager(SessionLimits())
        )
        conn = await agent.connect(url, did)
        sent = 0
        with pytest.raises(PeerError) as ended:
            while sent < 10:
                await agent.send(conn, "hello")
                sent += 1
        assert ended.value.code == "session_expired"
        assert sent == 3  # six messages: three requests and their three replies
        await agent.aclose()
    finally:
        _stop(process)


def test_one_worker_serves_its_own_store_with_exemplars(tmp_path: Path) -> None:
    """--workers 1: /metrics from the process's own store, exact, with exemplars that link
    to the spans it exports (here to a port nothing listens on: traces are on)."""
    process, did, url, metrics = _start(
        tmp_path,
        workers=1,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{free_port()}/v1/traces",
        SAGE_OTEL_SESSION_MAX_MESSAGES="100",
    )
    try:
        run = _demo(tmp_path, did, url, seconds=2.0)
        _type, text = fetch(metrics)
        processed = sum(
            _metric(text, "sage_messages_processed_total", status="success", type=t)
            for t in ("text", "binary")
        )
        assert processed == run["messages_ok"] + run["sessions_closed"]
        # The demo's clients end their sessions when the run ends: none is left active.
        assert _metric(text, "sage_sessions_active") == 0
        content_type, open_metrics = fetch(metrics, accept="application/openmetrics-text")
        assert content_type.startswith("application/openmetrics-text")
        exemplars = [line for line in open_metrics.splitlines() if " # {" in line]
        assert any(line.startswith("sage_") and "trace_id=" in line for line in exemplars)
    finally:
        _stop(process)
