"""The siege harness (make siege) still runs, in a tiny configuration, and every attack in it
really happens: the targets themselves are the benchmark's verdict, not this test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.siege import verdict
from benchmarks.siege_attacks import ATTACKS, classify

ROOT = Path(__file__).resolve().parent.parent
SCALE = 0.05  # 55 idle connections, 10 slow-header ones, 5 slow-body ones
ATTACKS_FULL = {"idle_connections": 1100, "slow_headers": 200, "slow_body": 100}


@pytest.fixture(scope="module")
def siege(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("siege") / "siege.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.siege",
            "--seconds-per-phase",
            "2",
            "--warmup",
            "1",
            "--gap",
            "0.5",
            "--scale",
            str(SCALE),
            "--registry-size",
            "200",
            "--clients",
            "2",
            "--rate",
            "10",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_phase_has_its_figures(siege: tuple[dict, str]) -> None:
    report, stdout = siege
    assert list(report["phases"]) == ["baseline", *ATTACKS]
    for name, phase in report["phases"].items():
        assert phase["handshakes"]["count"] > 0, name
        assert phase["messages"]["sent"] > 0, name
        assert phase["server_rss_mb"]["max"] > 0, name
        assert "total" in phase["status_5xx"], name
        if name != "baseline":
            assert set(phase["verdict"]["checks"]) >= {"no_5xx", "rss_growth_ok", "messages_ok"}
            assert isinstance(report["summary"][name], bool)
    assert report["config"]["registry_size"] == 200
    assert report["server"]["alive_at_end"] is True
    assert "| idle_connections |" in stdout and "| phase |" in stdout


def test_the_connection_attacks_held_their_connections(siege: tuple[dict, str]) -> None:
    attacks = siege[0]["attacks"]
    for name in ("idle_connections", "slow_headers", "slow_body"):
        attack = attacks[name]
        assert attack["connections_wanted"] == max(1, round(ATTACKS_FULL[name] * SCALE))
        assert attack["connections_held_max"] >= 0.9 * attack["connections_wanted"], attack
        assert attack["connections_held_median"] > 0, attack  # held through the phase
    # The trickles trickled: one byte a second per connection after their opening.
    assert attacks["slow_headers"]["bytes_sent"] > attacks["slow_headers"]["connections_opened"]


def test_the_header_flood_sent_its_headers(siege: tuple[dict, str]) -> None:
    flood = siege[0]["attacks"]["header_flood"]
    assert all(sent > 1_000_000 for sent in flood["stream_bytes"]), flood["stream_bytes"]
    assert flood["many_headers_sent"] >= 1 and flood["big_header_sent"] >= 1
    assert flood["bytes_sent"] > 1 << 20


def test_the_malformed_requests_were_all_sent_and_answered_or_closed(
    siege: tuple[dict, str],
) -> None:
    malformed = siege[0]["attacks"]["malformed_http"]
    assert malformed["requests"] > 20
    assert all(sum(answers.values()) >= 1 for answers in malformed["by_kind"].values())


def test_the_identity_attacks_made_the_server_work(siege: tuple[dict, str]) -> None:
    attacks = siege[0]["attacks"]
    hostile = attacks["hostile_endpoint"]
    assert hostile["pushes_received"]["flood"] > 0  # the server POSTed to the peer's endpoint
    assert hostile["pushes_received"]["trickle"] > 0
    assert attacks["fresh_dids"]["dids_registered"] > 0
    assert sum(attacks["fresh_dids"]["handshakes"].values()) > 0
    churn = attacks["registry_churn"]
    assert churn["dids_registered"] > 0 and churn["unknown_handshakes"] > 0


def test_a_5xx_or_a_lost_message_fails_the_phase() -> None:
    def figures(pct: float, p99: float, five_xx: int) -> dict:
        return {
            "handshakes": {"success_pct": 100.0, "p99_ms": 10.0},
            "messages": {"success_pct": pct, "p99_ms": p99},
            "server_rss_mb": {"start": 60.0, "max": 70.0, "end": 65.0},
            "status_5xx": {"total": five_xx},
        }

    baseline = figures(100.0, 10.0, 0)
    assert verdict(figures(99.5, 19.0, 0), baseline)["meets_targets"]
    assert not verdict(figures(99.5, 19.0, 1), baseline)["meets_targets"]
    assert not verdict(figures(98.0, 19.0, 0), baseline)["meets_targets"]
    assert not verdict(figures(100.0, 25.0, 0), baseline)["meets_targets"]


def test_raw_answers_are_classified_by_shape() -> None:
    typed = b'{"success": false, "error": {"code": "x", "category": "invalid", "message": "m"}}'
    assert classify(b"HTTP/1.1 431 Too Large\r\ncontent-length: 5\r\n\r\n" + typed) == (
        431,
        True,
        "x",
    )
    assert classify(b"HTTP/1.1 400 Bad Request\r\n\r\nInvalid HTTP request") == (400, False, "")
    assert classify(b"garbage") == (-1, False, "not_http")
