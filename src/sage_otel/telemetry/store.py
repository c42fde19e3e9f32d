"""Lock-cheap aggregation for the SAGE hot path, handed to OpenTelemetry readers as ordinary data.

Recording through the OTel SDK costs several microseconds per call here, as much as sealing
a message. So sage-otel aggregates its own instruments in plain cells (one small lock each,
no attribute hashing: a cell *is* a label combination, bound once at instrumentation time;
exemplars are passed in by the caller, who already knows the span)
and, whenever an SDK ``MetricReader`` collects, adds the cells to the reader's data as one
more ``ScopeMetrics`` — cumulative sums and explicit-bucket histograms with exemplars. The
PrometheusMetricReader, the OTLP exporter and any other reader see ordinary OTel metric data.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .. import __version__
from .catalog import INSTRUMENTS, Instrument, Kind

_logger = logging.getLogger(__name__)
SCOPE = InstrumentationScope("sage_otel", __version__)
_CUMULATIVE = AggregationTemporality.CUMULATIVE
_DELTA = AggregationTemporality.DELTA


class CounterCell:
    """One series of a counter or up-down counter."""

    __slots__ = ("_lock", "exemplar", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0
        self.exemplar: tuple[float, int, int, int] | None = None

    def add(self, amount: int = 1, exemplar: tuple[int, int] | None = None) -> None:
        with self._lock:
            self.value += amount
        if exemplar is not None and amount > 0:
            self.exemplar = (amount, time.time_ns(), *exemplar)


class HistogramCell:
    """One series of an explicit-bucket histogram; the latest sampled exemplar per bucket."""

    __slots__ = ("_lock", "bounds", "counts", "exemplars", "max", "min", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.exemplars: list[tuple[float, int, int, int] | None] = [None] * (len(bounds) + 1)
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def record(self, value: float, exemplar: tuple[int, int] | None = None) -> None:
        index = bisect_left(self.bounds, value)  # buckets are upper-inclusive, as in OTel
        with self._lock:
            self.counts[index] += 1
            self.sum += value
            if value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
        if exemplar is not None:
            self.exemplars[index] = (value, time.time_ns(), *exemplar)


def _exemplar(raw: tuple[float, int, int, int]) -> Exemplar:
    value, when, trace_id, span_id = raw
    return Exemplar({}, value, when, span_id, trace_id)


class MetricStore:
    """All SAGE series, pre-created for every enumerated label combination."""

    def __init__(self, instruments: Iterable[Instrument] = INSTRUMENTS) -> None:
        self.instruments = tuple(instruments)
        self.start_time = time.time_ns()
        self._cells: dict[str, dict[tuple[str, ...], CounterCell | HistogramCell]] = {}
        self._create_lock = threading.Lock()
        for instrument in self.instruments:
            self._cells[instrument.key] = {}
            for labels in instrument.label_sets():
                self.cell(instrument, instrument.normalize(labels))

    def cell(self, instrument: Instrument, values: tuple[str, ...]) -> CounterCell | HistogramCell:
        """The cell for normalized label values, created on first use (``other`` combinations)."""
        cells = self._cells[instrument.key]
        found = cells.get(values)
        if found is None:
            with self._create_lock:
                found = cells.get(values)
                if found is None:
                    if instrument.kind is Kind.HISTOGRAM:
                        found = HistogramCell(instrument.buckets)
                    else:
                        found = CounterCell()
                    cells[values] = found
        return found

    def metrics(self, delta: _Delta | None = None) -> list[Metric]:
        """Every series, cumulative; with ``delta``, the kinds it names since its last call."""
        now = time.time_ns()
        out = []
        for instrument in self.instruments:
            keys = instrument.label_keys
            cells = list(self._cells[instrument.key].items())
            is_delta = delta is not None and instrument.kind in delta.kinds
            start = delta.since if is_delta else self.start_time
            temporality = _DELTA if is_delta else _CUMULATIVE
            if instrument.kind is Kind.HISTOGRAM:
                points = [
                    self._histogram_point(
                        dict(zip(keys, v)), c, start, now, delta if is_delta else None
                    )
                    for v, c in cells
                ]
                data = Histogram(points, temporality)
            else:
                points = []
                for values, cell in cells:
                    value = cell.value
                    if is_delta:
                        key = (instrument.key, values)
                        value, delta.last[key] = value - delta.last.get(key, 0), value
                    points.append(
                        NumberDataPoint(
                            dict(zip(keys, values)),
                            start,
                            now,
                            value,
                            [_exemplar(cell.exemplar)] if cell.exemplar else [],
                        )
                    )
                data = Sum(points, temporality, instrument.kind is Kind.COUNTER)
            out.append(Metric(instrument.name, instrument.description, instrument.unit, data))
        if delta is not None:
            delta.since = now
        return out

    def _histogram_point(
        self,
        attributes: dict[str, str],
        cell: HistogramCell,
        start: int,
        now: int,
        delta: _Delta | None = None,
    ):
        with cell._lock:
            counts, total = list(cell.counts), cell.sum
            low, high = cell.min, cell.max
        if delta is not None:
            key = id(cell)  # cells live as long as the store
            last_counts, last_total = delta.last.get(key, ([0] * len(counts), 0.0))
            delta.last[key] = (counts, total)
            counts = [a - b for a, b in zip(counts, last_counts)]
            total -= last_total
        count = sum(counts)
        if not count:
            low, high = 0.0, 0.0  # min and max are the process lifetime's (documented)
        return HistogramDataPoint(
            attributes,
            start,
            now,
            count,
            total,
            counts,
            cell.bounds,
            low,
            high,
            [_exemplar(e) for e in cell.exemplars if e is not None],
        )

    def scope_metrics(self, delta: _Delta | None = None) -> ScopeMetrics:
        return ScopeMetrics(SCOPE, self.metrics(delta), "")

    def attach(self, reader: MetricReader, resource: Resource) -> None:
        """Add this store's data to everything ``reader`` collects.

        The reader must already be registered with a MeterProvider; the provider's own
        instruments are still collected and the store's scope is appended to them.
        """
        sdk_collect = reader._collect  # set by MeterProvider registration
        delta = _Delta.of(reader, self.start_time)

        def collect(the_reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData:
            data = sdk_collect(the_reader, timeout_millis=timeout_millis) if sdk_collect else None
            try:
                ours = self.scope_metrics(delta)
            except Exception:  # telemetry must never take the reader down
                _logger.exception("sage-otel: collecting SAGE metrics failed")
                return data
            return _merge(data, ours, resource)

        reader._set_collect_callback(collect)


class _Delta:
    """One reader's delta state: which kinds it wants as deltas, and what it last saw."""

    def __init__(self, kinds: frozenset[Kind], since: int) -> None:
        self.kinds = kinds
        self.since = since
        self.last: dict[object, object] = {}

    @classmethod
    def of(cls, reader: MetricReader, since: int) -> _Delta | None:
        """From the reader's preferred temporality (``OTEL_EXPORTER_OTLP_METRICS_
        TEMPORALITY_PREFERENCE`` reaches OTLP readers this way); None if all cumulative."""
        # Keyed by the SDK's private instrument classes (_Counter, ...): matched by name.
        preferred = {
            cls.__name__.lstrip("_"): temporality
            for cls, temporality in getattr(reader, "_instrument_class_temporality", {}).items()
        }
        names = {
            Kind.COUNTER: "Counter",
            Kind.UP_DOWN_COUNTER: "UpDownCounter",
            Kind.HISTOGRAM: "Histogram",
        }
        kinds = frozenset(k for k, name in names.items() if preferred.get(name) is _DELTA)
        return cls(kinds, since) if kinds else None


def _merge(data: MetricsData | None, scope: ScopeMetrics, resource: Resource) -> MetricsData:
    if data is None or not data.resource_metrics:
        return MetricsData([ResourceMetrics(resource, [scope], "")])
    first, *rest = data.resource_metrics
    merged = ResourceMetrics(first.resource, [*first.scope_metrics, scope], first.schema_url)
    return MetricsData([merged, *rest])
