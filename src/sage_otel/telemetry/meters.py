"""Bound instruments: what instrumentation records into.

``meters.counter("sessions_created", status="success")`` returns a handle with ``add``;
``meters.histogram(...)`` one with ``record``. Label values are normalized into the
catalog's closed sets once, when the handle is bound, never on the hot path.

Two implementations, one behaviour:

* :class:`StoreMeters` records into a :class:`~sage_otel.telemetry.store.MetricStore`
  (the fast path, used when ``sage_otel.configure`` owns the MeterProvider);
* :class:`ApiMeters` records through the plain OpenTelemetry metrics API, for applications
  that bring their own SDK (``opentelemetry-instrument``, an existing MeterProvider).
"""

from __future__ import annotations

from typing import Any, Protocol

from opentelemetry.metrics import Meter, MeterProvider, get_meter_provider

from .. import __version__
from .catalog import BY_KEY, INSTRUMENTS, Kind
from .store import MetricStore

Exemplar = tuple[int, int]  # (trace_id, span_id) of the sampled span a value belongs to


class CounterHandle(Protocol):
    def add(self, amount: int = 1, exemplar: Exemplar | None = None) -> None: ...


class HistogramHandle(Protocol):
    def record(self, value: float, exemplar: Exemplar | None = None) -> None: ...


class Meters(Protocol):
    def counter(self, key: str, **labels: str) -> CounterHandle: ...

    def histogram(self, key: str, **labels: str) -> HistogramHandle: ...


class StoreMeters:
    def __init__(self, store: MetricStore) -> None:
        self.store = store

    def counter(self, key: str, **labels: str) -> CounterHandle:
        instrument = BY_KEY[key]
        if instrument.kind is Kind.HISTOGRAM:
            raise TypeError(f"{key} is a histogram")
        return self.store.cell(instrument, instrument.normalize(labels))  # type: ignore[return-value]

    def histogram(self, key: str, **labels: str) -> HistogramHandle:
        instrument = BY_KEY[key]
        if instrument.kind is not Kind.HISTOGRAM:
            raise TypeError(f"{key} is not a histogram")
        return self.store.cell(instrument, instrument.normalize(labels))  # type: ignore[return-value]


class _ApiCounter:
    __slots__ = ("_add", "_attributes")

    def __init__(self, instrument, attributes: dict[str, str]) -> None:
        self._add = instrument.add
        self._attributes = attributes

    def add(self, amount: int = 1, exemplar: Exemplar | None = None) -> None:
        # The SDK takes exemplars from the current context itself.
        self._add(amount, self._attributes)


class _ApiHistogram:
    __slots__ = ("_attributes", "_record")

    def __init__(self, instrument, attributes: dict[str, str]) -> None:
        self._record = instrument.record
        self._attributes = attributes

    def record(self, value: float, exemplar: Exemplar | None = None) -> None:
        self._record(value, self._attributes)


def create_instruments(meter: Meter) -> dict[str, Any]:
    """Every catalog instrument on ``meter`` (explicit buckets, never the SDK's defaults)."""
    instruments: dict[str, Any] = {}
    for spec in INSTRUMENTS:
        if spec.kind is Kind.HISTOGRAM:
            instruments[spec.key] = meter.create_histogram(
                spec.name,
                spec.unit,
                spec.description,
                explicit_bucket_boundaries_advisory=list(spec.buckets),
            )
        elif spec.kind is Kind.COUNTER:
            instruments[spec.key] = meter.create_counter(spec.name, spec.unit, spec.description)
        else:
            instruments[spec.key] = meter.create_up_down_counter(
                spec.name, spec.unit, spec.description
            )
    return instruments


class ApiMeters:
    """Catalog instruments created on an OpenTelemetry Meter, counters pre-seeded at zero."""

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        meter = (meter_provider or get_meter_provider()).get_meter("sage_otel", __version__)
        self._instruments = create_instruments(meter)
        for spec in INSTRUMENTS:
            if spec.kind is not Kind.HISTOGRAM:
                # Adding zero creates the series, so rate() and ratios work from the first
                # scrape. The API has no way to pre-create an empty histogram series.
                for labels in spec.label_sets():
                    self._instruments[spec.key].add(0, labels)

    def _attributes(self, key: str, labels: dict[str, str]) -> dict[str, str]:
        spec = BY_KEY[key]
        return dict(zip(spec.label_keys, spec.normalize(labels)))

    def counter(self, key: str, **labels: str) -> CounterHandle:
        handle = _ApiCounter(self._instruments[key], self._attributes(key, labels))
        handle.add(0)  # a bound series exists from binding on, as in the store
        return handle

    def histogram(self, key: str, **labels: str) -> HistogramHandle:
        return _ApiHistogram(self._instruments[key], self._attributes(key, labels))
