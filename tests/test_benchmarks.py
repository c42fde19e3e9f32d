"""The benchmark workloads still run against the current API (make bench is not in CI)."""

from __future__ import annotations

from benchmarks.workloads import Handshake, MessageRoundTrip


def test_the_message_workload_runs() -> None:
    assert MessageRoundTrip().run(20) > 0


def test_the_handshake_workload_runs_past_the_per_peer_rate_limit() -> None:
    workload = Handshake()
    try:
        assert workload.run(60) > 0  # more than one burst of the default limiter
    finally:
        workload.close()
