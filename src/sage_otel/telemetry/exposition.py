"""/metrics: a PrometheusMetricReader that keeps exemplars, and the HTTP endpoint.

The upstream reader translates OTel data to Prometheus families but drops exemplars,
although the SDK (and sage-otel's store) collect them. This reader does its own, small
translation that carries each exemplar's trace_id/span_id onto counter samples and
histogram buckets. prometheus_client then serves OpenMetrics (exemplars included) when the
scraper asks for ``application/openmetrics-text``, and the plain text format otherwise.

Scope labels (``otel_scope_*``) are not added, so every series has exactly the label set
the monitoring plan names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from itertools import chain
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricsData, Sum
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.samples import Exemplar

_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}


def prometheus_name(name: str) -> str:
    cleaned = _INVALID.sub("_", name)
    return "_" + cleaned if cleaned[:1].isdigit() else cleaned


def prometheus_unit(unit: str | None) -> str:
    """UCUM to Prometheus: annotations like ``{session}`` vanish, ``s`` becomes ``seconds``."""
    if not unit or unit.startswith("{"):
        return ""
    return _UNITS.get(unit, prometheus_name(unit))


def _exemplar(exemplars: Any) -> Exemplar | None:
    for item in reversed(list(exemplars or ())):
        if item.trace_id:
            labels = {"trace_id": f"{item.trace_id:032x}", "span_id": f"{item.span_id:016x}"}
            return Exemplar(labels, item.value, item.time_unix_nano / 1e9)
    return None


def _bucket_exemplars(point: Any) -> list[Exemplar | None]:
    """The newest sampled exemplar that falls in each bucket."""
    slots: list[Exemplar | None] = [None] * (len(point.explicit_bounds) + 1)
    for item in point.exemplars or ():
        if not item.trace_id:
            continue
        index = next(
            (i for i, b in enumerate(point.explicit_bounds) if item.value <= b), len(slots) - 1
        )
        current = slots[index]
        if current is None or (current.timestamp or 0) <= item.time_unix_nano / 1e9:
            slots[index] = _exemplar([item])
    return slots


def _label_value(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def families(data: MetricsData) -> Iterator[Any]:
    """Translate OTel metric data into prometheus_client families, exemplars included."""
    if not data.resource_metrics:
        return
    attributes = {
        prometheus_name(k): _label_value(v)
        for k, v in data.resource_metrics[0].resource.attributes.items()
    }
    info = InfoMetricFamily("target", "Target metadata")
    info.add_metric([], attributes)
    yield info
    for metric in chain.from_iterable(
        sm.metrics for rm in data.resource_metrics for sm in rm.scope_metrics
    ):
        points = list(metric.data.data_points)
        keys = sorted({prometheus_name(k) for p in points for k in p.attributes})
        name, unit, doc = (
            prometheus_name(metric.name),
            prometheus_unit(metric.unit),
            metric.description or "",
        )

        def labels_of(point: Any, keys: list[str] = keys) -> list[str]:
            given = {prometheus_name(k): _label_value(v) for k, v in point.attributes.items()}
            return [given.get(k, "") for k in keys]

        if isinstance(metric.data, Sum) and metric.data.is_monotonic:
            family = CounterMetricFamily(name, doc, labels=keys, unit=unit)
            for point in points:
                family.add_metric(
                    labels_of(point), point.value, exemplar=_exemplar(point.exemplars)
                )
        elif isinstance(metric.data, (Sum, Gauge)):
            family = GaugeMetricFamily(name, doc, labels=keys, unit=unit)
            for point in points:
                family.add_metric(labels_of(point), point.value)
        elif isinstance(metric.data, Histogram):
            family = HistogramMetricFamily(name, doc, labels=keys, unit=unit)
            for point in points:
                cumulative, buckets = 0, []
                bounds = [*(repr(float(b)) for b in point.explicit_bounds), "+Inf"]
                for bound, count, exemplar in zip(
                    bounds, point.bucket_counts, _bucket_exemplars(point)
                ):
                    cumulative += count
                    buckets.append(
                        (bound, cumulative, exemplar) if exemplar else (bound, cumulative)
                    )
                family.add_metric(labels_of(point), buckets, point.sum)
        else:
            continue
        yield family


class _Collector:
    def __init__(self, reader: ExemplarPrometheusMetricReader) -> None:
        self._reader = reader

    def describe(self) -> list[Any]:
        # Nothing to describe before the MeterProvider registers the reader.
        return []

    def collect(self) -> Iterator[Any]:
        self._reader.collect()
        data, self._reader.latest = self._reader.latest, None
        if data is not None:
            yield from families(data)


class ExemplarPrometheusMetricReader(PrometheusMetricReader):
    """A PrometheusMetricReader whose exposition keeps exemplars and omits scope labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # The upstream collector is parked in a private registry; ours serves ``registry``.
        super().__init__(registry=CollectorRegistry(auto_describe=False))
        self.latest: MetricsData | None = None
        self._target = registry
        self._exemplar_collector = _Collector(self)
        registry.register(self._exemplar_collector)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self.latest = metrics_data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with contextlib.suppress(KeyError):
            self._target.unregister(self._exemplar_collector)
        super().shutdown(timeout_millis=timeout_millis, **kwargs)
