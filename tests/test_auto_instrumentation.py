"""Zero-code instrumentation: ``opentelemetry-instrument sage-otel demo --no-telemetry``.

The ``sage`` entry point in the ``opentelemetry_instrumentor`` group is picked up by the
OpenTelemetry distro; the demo sets up no telemetry of its own, yet SAGE spans and metrics
come out of the console exporters.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from sage_otel.instrumentation import SageInstrumentor
from sage_otel.telemetry.catalog import INSTRUMENTS
from support import running

BIN = Path(sys.executable).parent
EXPECTED_SPANS = {
    "sage.handshake",
    "sage.handshake.init",
    "sage.handshake.process",
    "sage.handshake.finalize",
    "sage.message.send",
    "sage.message.receive",
    "sage.message.process",
    "sage.did.resolve",
    "sage.session.create",
}
SUMMARY_KEYS = {"handshakes_ok", "messages_ok", "replays_rejected", "unexpected_errors"}


def test_entry_point_resolves_to_the_instrumentor() -> None:
    found = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "sage"]
    assert len(found) == 1, found
    assert found[0].value == "sage_otel.instrumentation:SageInstrumentor"
    assert found[0].load() is SageInstrumentor


def json_objects(text: str) -> Iterator[Any]:
    """Every top-level JSON object in ``text`` (console exporters print indented JSON)."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        position = text.find("{", position)
        if position < 0:
            return
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            position += 1
            continue
        yield value
        position = end


@pytest.fixture(scope="module")
def auto_run() -> tuple[int, str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="console",
        OTEL_LOGS_EXPORTER="none",
        OTEL_METRIC_EXPORT_INTERVAL="1000",
        OTEL_SERVICE_NAME="sage-auto",
    )
    argv = [
        str(BIN / "opentelemetry-instrument"),
        str(BIN / "sage-otel"),
        "demo",
        "--in-process",  # the agents this process instruments
        "--no-telemetry",
        "--duration",
        "3",
        "--json",
    ]
    with running(argv, env) as proc:
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"opentelemetry-instrument did not finish:\n{err[-4000:]}")
    return proc.returncode, out, err


def test_exits_zero(auto_run: tuple[int, str, str]) -> None:
    returncode, _, err = auto_run
    assert returncode == 0, err[-4000:]


def test_demo_summary_present(auto_run: tuple[int, str, str]) -> None:
    _, out, _ = auto_run
    summaries = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict) and set(value) >= SUMMARY_KEYS:
                summaries.append(value)
    assert len(summaries) == 1, out[-2000:]
    assert summaries[0]["handshakes_ok"] > 0
    assert summaries[0]["messages_ok"] > 0
    assert summaries[0]["unexpected_errors"] == {}


def _spans(out: str) -> list[dict[str, Any]]:
    return [o for o in json_objects(out) if "context" in o and "name" in o and "kind" in o]


def test_sage_spans_exported(auto_run: tuple[int, str, str]) -> None:
    _, out, _ = auto_run
    spans = _spans(out)
    names = {span["name"] for span in spans}
    assert names >= EXPECTED_SPANS, EXPECTED_SPANS - names
    sage_spans = [s for s in spans if s["name"].startswith("sage.")]
    assert sage_spans
    for span in sage_spans:
        assert span["resource"]["attributes"]["service.name"] == "sage-auto"


def test_spans_follow_a_message_across_agents(auto_run: tuple[int, str, str]) -> None:
    _, out, _ = auto_run
    spans = _spans(out)
    by_id = {span["context"]["span_id"]: span for span in spans}
    send_traces = {s["context"]["trace_id"] for s in spans if s["name"] == "sage.message.send"}
    receives = [s for s in spans if s["name"] == "sage.message.receive"]
    assert receives
    # The server's receive span links the client's send (W3C trace context from a request
    # not yet authenticated is a link by default, docs/tracing.md).
    linked = {link["context"]["trace_id"] for s in receives for link in s.get("links", [])}
    assert linked & send_traces
    assert all(s["context"]["trace_id"] not in send_traces for s in receives)
    # Handshake stages are children of their handshake span.
    for stage in ("sage.handshake.init", "sage.handshake.finalize"):
        children = [s for s in spans if s["name"] == stage]
        assert children
        parents = {by_id[s["parent_id"]]["name"] for s in children if s["parent_id"] in by_id}
        assert parents == {"sage.handshake"}, (stage, parents)


def test_sage_metrics_exported(auto_run: tuple[int, str, str]) -> None:
    _, out, _ = auto_run
    names = set()
    for obj in json_objects(out):
        for rm in obj.get("resource_metrics", ()):
            assert rm["resource"]["attributes"]["service.name"] == "sage-auto"
            for sm in rm["scope_metrics"]:
                names.update(metric["name"] for metric in sm["metrics"])
    sage_names = {name for name in names if name.startswith("sage.")}
    assert sage_names, sorted(names)
    expected = {instrument.name for instrument in INSTRUMENTS}
    assert sage_names >= expected, expected - sage_names
