"""Overhead benchmark: SAGE message round trips/s and handshakes/s under five setups.

    python -m benchmarks.run [--rounds 7] [--messages 3000] [--handshakes 100]
                             [--write docs/performance.md]

Variants, interleaved round by round in one process (instrument, measure, uninstrument) so
that every ratio compares numbers taken under the same machine conditions:

  a  uninstrumented
  b  sage-otel, metrics only (the store path; no tracer, no span is ever started)
  c  sage-otel, metrics + traces sampled at 100% (BatchSpanProcessor to a no-op exporter)
  d  hand-written prometheus_client instrumentation of the same operations
  e  naive OpenTelemetry instrumentation written from the plan's snippets (SDK instruments)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from sage_otel.instrumentation import SageInstrumentor
from sage_otel.telemetry.exposition import ExemplarPrometheusMetricReader
from sage_otel.telemetry.meters import StoreMeters
from sage_otel.telemetry.store import MetricStore

from .handwritten import NaiveOtelBackend, PrometheusBackend, handwritten
from .workloads import Handshake, MessageRoundTrip

VARIANTS = {
    "a": "uninstrumented",
    "b": "sage-otel metrics only",
    "c": "sage-otel metrics + traces (100% sampled)",
    "d": "hand-written prometheus_client",
    "e": "naive OpenTelemetry (plan snippets)",
    "f": "sage-otel metrics + traces (parentbased_traceidratio 0.1)",
}


class _DropSpans(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS


@contextmanager
def sage(
    traces: bool, ratio: float = 1.0, exporter: SpanExporter | None = None
) -> Iterator[TracerProvider | None]:
    """sage-otel's store path instrumented; spans (if ``traces``) batched to ``exporter``,
    a no-op one by default. Yields the tracer provider, if any."""
    resource = Resource.create({"service.name": "bench"})
    reader = ExemplarPrometheusMetricReader(CollectorRegistry())
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    store = MetricStore()
    store.attach(reader, resource)
    tracer_provider: trace.TracerProvider = trace.NoOpTracerProvider()
    if traces:
        sampler = ALWAYS_ON if ratio >= 1.0 else ParentBased(TraceIdRatioBased(ratio))
        tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter or _DropSpans()))
    instrumentor = SageInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meters=StoreMeters(store))
    try:
        yield tracer_provider if isinstance(tracer_provider, TracerProvider) else None
    finally:
        instrumentor.uninstrument()
        reader.collect()  # the data is really there: one scrape's worth of work, untimed
        provider.shutdown()
        if isinstance(tracer_provider, TracerProvider):
            tracer_provider.shutdown()


@contextmanager
def plain() -> Iterator[None]:
    yield


SETUPS: dict[str, Callable[[], object]] = {
    "a": plain,
    "b": lambda: sage(traces=False),
    "c": lambda: sage(traces=True),
    "d": lambda: handwritten(PrometheusBackend()),
    "e": lambda: handwritten(NaiveOtelBackend()),
    "f": lambda: sage(traces=True, ratio=0.1),
}


def measure(
    rounds: int, messages: int, handshakes: int, seed: int = 1
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        v: {"messages": [], "handshakes": []} for v in VARIANTS
    }
    order = list(VARIANTS)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for variant in order:
            with SETUPS[variant]():  # type: ignore[attr-defined]
                trip = MessageRoundTrip()
                trip.run(messages // 10)  # warm-up
                results[variant]["messages"].append(messages / trip.run(messages))
                shake = Handshake()
                shake.run(max(1, handshakes // 10))
                results[variant]["handshakes"].append(handshakes / shake.run(handshakes))
                shake.close()
    return results


def summarize(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for variant, series in results.items():
        summary[variant] = {kind: statistics.median(values) for kind, values in series.items()}
    for variant in summary:
        for kind in ("messages", "handshakes"):
            summary[variant][f"{kind}_ratio"] = summary[variant][kind] / summary["a"][kind]
    return summary


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "opentelemetry-sdk": version("opentelemetry-sdk"),
        "prometheus-client": version("prometheus-client"),
        "cryptography": version("cryptography"),
    }


def targets(summary: dict[str, dict[str, float]]) -> list[tuple[str, bool, str]]:
    b, c, d = summary["b"], summary["c"], summary["d"]
    return [
        ("(b) messages >= 0.75 x (a)", b["messages_ratio"] >= 0.75, f"{b['messages_ratio']:.2f}"),
        (
            "(b) handshakes >= 0.75 x (a)",
            b["handshakes_ratio"] >= 0.75,
            f"{b['handshakes_ratio']:.2f}",
        ),
        (
            "(b) messages no slower than (d)",
            b["messages"] >= d["messages"],
            f"{b['messages'] / d['messages']:.2f} x (d)",
        ),
        (
            "(b) handshakes no slower than (d)",
            b["handshakes"] >= d["handshakes"],
            f"{b['handshakes'] / d['handshakes']:.2f} x (d)",
        ),
        ("(c) messages >= 0.5 x (a)", c["messages_ratio"] >= 0.5, f"{c['messages_ratio']:.2f}"),
        (
            "(c) handshakes >= 0.5 x (a)",
            c["handshakes_ratio"] >= 0.5,
            f"{c['handshakes_ratio']:.2f}",
        ),
    ]


def variant_table(summary: dict[str, dict[str, float]], labels: dict[str, str]) -> list[str]:
    """Markdown rows: each variant's rates and their ratios to (a)."""
    lines = [
        "| variant | messages/s | ratio to (a) | handshakes/s | ratio to (a) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for variant, label in labels.items():
        s = summary[variant]
        lines.append(
            f"| ({variant}) {label} | {s['messages']:,.0f} | {s['messages_ratio']:.2f} | "
            f"{s['handshakes']:,.0f} | {s['handshakes_ratio']:.2f} |"
        )
    return lines


def render(
    summary: dict[str, dict[str, float]], args: argparse.Namespace, info: dict[str, str]
) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = variant_table(summary, VARIANTS)
    checks = "\n".join(
        f"| {name} | {'met' if ok else 'NOT met'} | {value} |"
        for name, ok, value in targets(summary)
    )
    machine_rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    return RESULTS_TEMPLATE.format(
        when=when,
        rounds=args.rounds,
        messages=args.messages,
        handshakes=args.handshakes,
        table="\n".join(lines),
        checks=checks,
        machine=machine_rows,
    )


RESULTS_TEMPLATE = """## Latest run

Measured {when} with
`python -m benchmarks.run --rounds {rounds} --messages {messages} --handshakes {handshakes}`
(medians over {rounds} interleaved rounds; ratios are to (a) in the same run).

{table}

| target | result | measured |
| --- | --- | --- |
{checks}

Machine:

| | |
| --- | --- |
{machine}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--handshakes", type=int, default=100)
    parser.add_argument(
        "--write", metavar="PATH", help="replace the 'Latest run' section of this Markdown file"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = summarize(measure(args.rounds, args.messages, args.handshakes))
    info = machine()
    if args.json:
        print(json.dumps({"summary": summary, "machine": info}, indent=2))
    text = render(summary, args, info)
    print(text)
    if args.write:
        path = Path(args.write)
        current = path.read_text() if path.exists() else ""
        head = current.split("## Latest run")[0] if "## Latest run" in current else current
        path.write_text(head.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
