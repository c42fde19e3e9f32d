"""The ``sage-otel demo`` command, run as a user runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from sage_otel.cli import build_parser


def _demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sage_otel.cli", "demo", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_json_summary_counts_real_traffic() -> None:
    result = _demo("--duration", "4", "--clients", "3", "--rate", "0", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "handshakes_ok",
        "handshakes_failed",
        "messages_ok",
        "messages_failed",
        "replays_rejected",
        "sessions_expired",
        "duration_s",
        "messages_per_s",
    ):
        assert key in summary
    assert summary["handshakes_ok"] > 0
    assert summary["messages_ok"] > 0
    assert summary["replays_rejected"] > 0
    # The rogue handshakes (unregistered and inactive DIDs) are refused.
    assert summary["handshakes_failed"] >= 2
    assert summary["unexpected_errors"] == {}
    assert all(count > 0 for count in summary["injected"].values())
    assert 3.5 < summary["duration_s"] < 10


def test_demo_reports_a_taken_port_and_exits_non_zero() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = _demo("--duration", "1", "--port", str(port), timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{port} is in use" in result.stderr and "--port" in result.stderr  # the flag
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv", [["demo", "--clients", "0"], ["demo", "--rate", "-1"], ["demo", "--duration", "x"]]
)
def test_demo_rejects_bad_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
