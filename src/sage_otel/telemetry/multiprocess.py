"""Exact SAGE metrics across worker processes, through prometheus_client's multiprocess mode.

Several workers (``uvicorn --workers N``, gunicorn, ``sage-otel serve --workers N``) each
count only their own traffic. With ``PROMETHEUS_MULTIPROC_DIR`` set in the environment
*before the workers start*, every worker writes its SAGE counts to its own memory-mapped
files in that directory, and one scrape sums them all:

* counters and histograms: the sum over every worker that ever ran, so a killed or restarted
  worker's counts are not lost;
* ``sage_sessions_active``: summed over live workers only (``livesum``); files of workers
  that died are pruned at each scrape;
* exemplars: none (the mode cannot store them); traces reach metrics through OTLP, which
  each worker exports itself, under its own ``service.instance.id``.

A forked child (gunicorn ``--preload``) starts its own files: prometheus_client notices the
new pid and does not inherit the parent's counts.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .catalog import BY_KEY, INSTRUMENTS, OTHER, Kind
from .meters import CounterHandle, Exemplar, HistogramHandle

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The shared directory when multiprocess mode is on, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


class _Add:
    __slots__ = ("_inc",)

    def __init__(self, child: Any) -> None:
        self._inc = child.inc

    def add(self, amount: int = 1, exemplar: Exemplar | None = None) -> None:
        self._inc(amount)


class _Observe:
    __slots__ = ("_observe",)

    def __init__(self, child: Any) -> None:
        self._observe = child.observe

    def record(self, value: float, exemplar: Exemplar | None = None) -> None:
        self._observe(value)


class MultiprocessMeters:
    """The catalog as prometheus_client metrics whose values live in the shared directory.

    Every enumerated series (and its ``other`` form) is created at zero, as in the store.
    """

    def __init__(self) -> None:
        if multiprocess_dir() is None:
            raise RuntimeError(f"{MULTIPROC_ENV} is not set")
        self._metrics: dict[str, Any] = {}
        for spec in INSTRUMENTS:
            name = spec.prometheus_name
            labels = spec.label_keys
            if spec.kind is Kind.HISTOGRAM:
                metric = Histogram(
                    name, spec.description, labels, registry=None, buckets=spec.buckets
                )
            elif spec.kind is Kind.COUNTER:
                metric = Counter(
                    name.removesuffix("_total"), spec.description, labels, registry=None
                )
            else:
                metric = Gauge(
                    name, spec.description, labels, registry=None, multiprocess_mode="livesum"
                )
            self._metrics[spec.key] = metric
            if labels:
                for label_set in spec.label_sets():
                    metric.labels(**label_set)
                metric.labels(**dict.fromkeys(labels, OTHER))

    def _child(self, key: str, labels: dict[str, str]) -> Any:
        spec = BY_KEY[key]
        metric = self._metrics[key]
        values = spec.normalize(labels)
        return metric.labels(*values) if values else metric

    def counter(self, key: str, **labels: str) -> CounterHandle:
        return _Add(self._child(key, labels))

    def histogram(self, key: str, **labels: str) -> HistogramHandle:
        return _Observe(self._child(key, labels))


class _Both:
    __slots__ = ("_a", "_b")

    def __init__(self, a: Any, b: Any) -> None:
        self._a, self._b = a, b

    def add(self, amount: int = 1, exemplar: Exemplar | None = None) -> None:
        self._a.add(amount, exemplar)
        self._b.add(amount, exemplar)

    def record(self, value: float, exemplar: Exemplar | None = None) -> None:
        self._a.record(value, exemplar)
        self._b.record(value, exemplar)


class BothMeters:
    """Record into two implementations: the shared files and the OTLP store of a worker."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def counter(self, key: str, **labels: str) -> CounterHandle:
        return _Both(self.first.counter(key, **labels), self.second.counter(key, **labels))

    def histogram(self, key: str, **labels: str) -> HistogramHandle:
        return _Both(self.first.histogram(key, **labels), self.second.histogram(key, **labels))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveMultiProcessCollector(MultiProcessCollector):
    """MultiProcessCollector that first forgets the live gauges of workers that died."""

    def collect(self):  # type: ignore[override]
        for path in glob.glob(os.path.join(self._path, "gauge_live*_*.db")):
            pid = os.path.basename(path).rsplit("_", 1)[-1].removesuffix(".db")
            if pid.isdigit() and not _alive(int(pid)):
                mark_process_dead(int(pid), self._path)
        return super().collect()


def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """A registry that reports every worker's SAGE metrics from the shared directory."""
    registry = CollectorRegistry(auto_describe=True)
    LiveMultiProcessCollector(registry, path or multiprocess_dir())
    return registry
