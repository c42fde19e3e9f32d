"""Zero-code instrumentation: ``opentelemetry-instrument sage-otel demo --no-telemetry``.

The ``sage`` entry point in the ``opentelemetry_instrumentor`` group is picked up by the
OpenTelemetry distro; the demo sets up no telemetry of its own, yet SAGE spans and metrics
come out of the console exporters.

README.md's ``opentelemetry-instrument`` commands are run as written (only the collector's
port is the test's), on the default demo, whose server agent is a ``sage-otel serve`` child
process: against a real collector (OTLP/HTTP as written, and gRPC), with the collector down,
and with the console exporter. Both processes' spans must come out and the demo must exit 0
with its summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from e2e import services
from sage_otel.instrumentation import SageInstrumentor
from sage_otel.telemetry.catalog import INSTRUMENTS
from support import free_port, running

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[1] / "README.md"
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


# ------------------------------------------------------------------ README.md, default demo

# The spans only each side of an exchange starts: the demo's clients (this process) and its
# server agent (the `sage-otel serve` child).
CLIENT_SPANS = {"sage.handshake", "sage.handshake.init", "sage.message.send"}
SERVER_SPANS = {"sage.handshake.process", "sage.message.receive", "sage.message.process"}
OTLP_PORTS = {"http/protobuf": 4318, "grpc": 4317}
DISTRO_PROTOCOL = "grpc"  # what opentelemetry-distro sends when no protocol is named


def readme_commands() -> list[tuple[dict[str, str], list[str]]]:
    """README.md's ``opentelemetry-instrument`` commands: (variables set, argv), as written."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "opentelemetry-instrument" not in words:
                continue
            variables = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                variables[name] = value
            commands.append((variables, words))
    return commands


def readme_command(kind: str) -> tuple[dict[str, str], list[str]]:
    """The README's OTLP command (``otlp``) or its console-exporter one (``console``)."""
    for variables, argv in readme_commands():
        otlp = "OTEL_EXPORTER_OTLP_ENDPOINT" in variables
        if (kind == "otlp" and otlp) or (kind == "console" and not otlp and "console" in argv):
            assert argv[0] == "opentelemetry-instrument" and "demo" in argv, argv
            assert "--in-process" not in argv  # the default demo, with its server child
            return variables, argv
    pytest.fail(f"README.md has no opentelemetry-instrument command for {kind}")


def demo_seconds(argv: list[str]) -> float:
    return float(argv[argv.index("--duration") + 1])


@dataclass
class Ran:
    status: int
    out: str
    err: str
    seconds: float
    left: list[str]  # what it left in its private TMPDIR


def run_readme(variables: dict[str, str], argv: list[str], tmp: Path) -> Ran:
    """Run a README command as a shell would, in a clean environment with a private TMPDIR.
    Nothing of the caller's OTEL_* leaks in; proxies are off for loopback."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    private = tmp / "tmpdir"
    private.mkdir()
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TMPDIR=str(private),
        **variables,
    )
    started = time.monotonic()
    with running(argv, env) as proc:
        try:
            out, err = proc.communicate(timeout=demo_seconds(argv) + 90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"{shlex.join(argv)} did not finish:\n{err[-4000:]}")
    elapsed = time.monotonic() - started
    return Ran(proc.returncode, out, err, elapsed, [p.name for p in private.iterdir()])


def summary_lines(out: str) -> dict[str, str]:
    """The demo's summary (``key: value`` lines off a terminal); it must end stdout."""
    lines = out.rstrip("\n").splitlines()[-11:]
    summary = dict(line.split(": ", 1) for line in lines if ": " in line and line[0] != " ")
    assert set(summary) >= SUMMARY_KEYS, out[-3000:]
    assert int(summary["handshakes_ok"]) > 0 and int(summary["messages_ok"]) > 0
    assert summary["unexpected_errors"] == "{}", summary
    return summary


def assert_clean_exit(ran: Ran) -> None:
    assert ran.status == 0, ran.err[-4000:]
    summary_lines(ran.out)
    assert "Traceback" not in ran.err, ran.err[-4000:]
    # The server child is instrumented or configured, never both.
    assert "Overriding of current" not in ran.err, ran.err[-4000:]
    assert ran.left == []  # the server child's key went with it


def otlp_variables(protocol: str, endpoint: str) -> dict[str, str]:
    """The README's OTLP variables with the collector's receiver for ``protocol``: as
    written for the README's own protocol, which must match the port it names."""
    variables, _ = readme_command("otlp")
    written = variables.get("OTEL_EXPORTER_OTLP_PROTOCOL", DISTRO_PROTOCOL)
    assert written in OTLP_PORTS, written
    # The README sends what its port speaks (4318 OTLP/HTTP, 4317 gRPC).
    assert urlsplit(variables["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == OTLP_PORTS[written]
    return {
        **variables,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
    }


README_PROTOCOL = readme_command("otlp")[0].get("OTEL_EXPORTER_OTLP_PROTOCOL", DISTRO_PROTOCOL)


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", sorted({README_PROTOCOL, "grpc", "http/protobuf"}))
def test_readme_command_through_a_collector(tmp_path: Path, protocol: str) -> None:
    """The README's command against the collector distribution (traces on to Jaeger): both
    processes' spans arrive, in shared traces, and the demo exits 0 with its summary."""
    with services.jaeger(tmp_path) as jaeger:
        env = services.collector_env(TEMPO_ENDPOINT=jaeger.otlp_grpc)
        with services.collector(services.COLLECTOR_CONFIG, env, log_dir=tmp_path) as collector:
            receiver = (
                collector.otlp_http if protocol != "grpc" else f"http://{collector.otlp_grpc}"
            )
            variables = otlp_variables(protocol, receiver)
            _, argv = readme_command("otlp")
            assert_clean_exit(run_readme(variables, argv, tmp_path))
            service = variables["OTEL_SERVICE_NAME"]
            wanted = CLIENT_SPANS | SERVER_SPANS
            services.wait_for(
                lambda: set(jaeger.operations(service)) >= wanted,
                timeout=30,
                what=f"both processes' sage.* spans of {service} in Jaeger",
            )
            # The server child continues the clients' traces: one trace, two processes.
            services.wait_for(
                lambda: shared_traces(jaeger, service),
                timeout=30,
                what="a trace with the send (demo) and the receive (server child)",
            )


def shared_traces(jaeger: services.Jaeger, service: str) -> list[dict[str, Any]]:
    """Traces of ``service`` holding a message's send and its receive, from two processes."""
    traces = jaeger.traces(service, operation="sage.message.receive", limit=50)
    return [
        trace
        for trace in traces
        if len(trace["processes"]) >= 2
        and {span["operationName"] for span in trace["spans"]}
        >= {"sage.message.send", "sage.message.receive"}
    ]


@pytest.mark.parametrize("protocol", sorted({README_PROTOCOL, "grpc", "http/protobuf"}))
def test_readme_command_with_the_collector_down(tmp_path: Path, protocol: str) -> None:
    """Nothing listens where the README's command sends: exit 0 with the summary, on time."""
    variables = otlp_variables(protocol, f"http://127.0.0.1:{free_port()}")
    _, argv = readme_command("otlp")
    ran = run_readme(variables, argv, tmp_path)
    assert_clean_exit(ran)
    # Start-up, the run, then at most the demo's stop budget (4 s) and the interpreter's exit.
    assert ran.seconds < demo_seconds(argv) + 15, f"{ran.seconds:.1f} s"


def test_readme_console_command(tmp_path: Path) -> None:
    """The README's console-exporter command: both processes' spans on stdout, each whole,
    then the summary; a message's receive (child) is in the trace of its send (demo)."""
    variables, argv = readme_command("console")
    ran = run_readme(variables, argv, tmp_path)
    assert_clean_exit(ran)
    out = ran.out
    objects = [o for o in json_objects(out) if o]
    # Every object the console exporter began is whole: the child's output never cut in.
    assert len(objects) == out.count("\n{\n") + out.startswith("{\n")
    spans = _spans(out)
    names = {span["name"] for span in spans}
    assert names >= CLIENT_SPANS | SERVER_SPANS, (CLIENT_SPANS | SERVER_SPANS) - names

    def instance(span: dict[str, Any]) -> str:
        return span["resource"]["attributes"]["service.instance.id"]

    sends = {
        s["context"]["trace_id"]: instance(s) for s in spans if s["name"] == "sage.message.send"
    }
    receives = [s for s in spans if s["name"] == "sage.message.receive"]
    assert any(
        s["context"]["trace_id"] in sends and sends[s["context"]["trace_id"]] != instance(s)
        for s in receives
    )
