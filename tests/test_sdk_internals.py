"""The private OpenTelemetry SDK internals sage-otel relies on are still there and still work.

``MetricStore.attach`` (telemetry/store.py) reads ``MetricReader._collect`` (the callback a
MeterProvider installs when it registers the reader), calls it as
``_collect(reader, timeout_millis=...)``, and replaces it with
``MetricReader._set_collect_callback(func)``; ``MetricReader.collect()`` must then call the
replacement and hand what it returns to ``_receive_metrics``. ``_Delta.of`` reads the
reader's preferred temporality from ``MetricReader._instrument_class_temporality``, keyed by
the SDK's instrument classes (matched by name). None of this is public API, so
pyproject.toml caps opentelemetry-sdk below the next minor release; before raising that cap,
these tests say whether the new release still has what the store needs.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricReader, MetricsData
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
HINT = (
    "telemetry/store.py (MetricStore.attach) relies on it: adapt the store to this "
    "opentelemetry-sdk release, or keep the upper bound in pyproject.toml"
)


class _Reader(MetricReader):
    """A pull reader that keeps what collect() hands to _receive_metrics."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.received: list[MetricsData] = []

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self.received.append(metrics_data)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@pytest.fixture
def registered() -> Any:
    reader = _Reader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("sdk-internals").create_counter("probe").add(1)
    yield reader
    provider.shutdown()


def test_set_collect_callback_exists_with_one_argument() -> None:
    method = getattr(MetricReader, "_set_collect_callback", None)
    assert callable(method), f"MetricReader._set_collect_callback is gone: {HINT}"
    params = list(inspect.signature(method).parameters.values())[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    assert len(positional) >= 1 and len(required) <= 1, (
        f"MetricReader._set_collect_callback{inspect.signature(method)} no longer takes "
        f"the callback as its one argument: {HINT}"
    )


def test_unregistered_reader_has_no_collect_callback() -> None:
    reader = _Reader()
    assert hasattr(reader, "_collect"), f"MetricReader._collect is gone: {HINT}"
    assert reader._collect is None, (
        f"MetricReader._collect is {reader._collect!r} before registration, not None: {HINT}"
    )


def test_registration_sets_a_collect_callback_the_store_can_call(registered: _Reader) -> None:
    sdk_collect = getattr(registered, "_collect", None)
    assert callable(sdk_collect), (
        f"MetricReader._collect is not set by MeterProvider registration: {HINT}"
    )
    try:
        inspect.signature(sdk_collect).bind(registered, timeout_millis=1_000)
    except TypeError as exc:
        raise AssertionError(
            f"MetricReader._collect{inspect.signature(sdk_collect)} no longer accepts "
            f"(reader, timeout_millis=...): {HINT}"
        ) from exc
    data = sdk_collect(registered, timeout_millis=1_000)
    assert isinstance(data, MetricsData), f"MetricReader._collect returned {data!r}: {HINT}"
    names = [m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    assert "probe" in names, names


def test_collect_calls_the_replaced_callback(registered: _Reader) -> None:
    """The store's exact pattern: keep the SDK's callback, install a wrapper around it."""
    sdk_collect = registered._collect
    calls: list[tuple[Any, float]] = []
    returned: list[MetricsData] = []

    def wrapper(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData:
        calls.append((reader, timeout_millis))
        data = sdk_collect(reader, timeout_millis=timeout_millis)
        returned.append(MetricsData(list(data.resource_metrics)))
        return returned[-1]

    registered._set_collect_callback(wrapper)
    assert registered._collect is wrapper, (
        f"MetricReader._set_collect_callback no longer sets MetricReader._collect: {HINT}"
    )
    registered.collect(timeout_millis=1_234)
    assert calls == [(registered, 1_234)], (
        f"MetricReader.collect() no longer calls _collect(reader, timeout_millis=...): {HINT}"
    )
    assert [id(d) for d in registered.received] == [id(d) for d in returned], (
        f"MetricReader.collect() no longer hands _collect's result to _receive_metrics: {HINT}"
    )


def test_preferred_temporality_is_keyed_by_instrument_class_name() -> None:
    delta, cumulative = AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE
    reader = _Reader(preferred_temporality={Counter: delta, Histogram: delta})
    table = getattr(reader, "_instrument_class_temporality", None)
    assert isinstance(table, dict), (
        f"MetricReader._instrument_class_temporality is gone (delta temporality would be "
        f"silently ignored for SAGE series): {HINT}"
    )
    by_name = {cls.__name__.lstrip("_"): temporality for cls, temporality in table.items()}
    expected = {"Counter": delta, "Histogram": delta, "UpDownCounter": cumulative}
    assert {name: by_name.get(name) for name in expected} == expected, (
        f"MetricReader._instrument_class_temporality no longer maps the instrument classes "
        f"(by name: Counter, UpDownCounter, Histogram) to the preferred temporality: "
        f"{by_name}: {HINT}"
    )


def test_the_store_attaches_through_these_internals(registered: _Reader) -> None:
    from sage_otel.telemetry.store import MetricStore

    store = MetricStore()
    store.attach(registered, MeterProvider()._sdk_config.resource)
    registered.collect()
    (data,) = registered.received
    scopes = [sm.scope.name for rm in data.resource_metrics for sm in rm.scope_metrics]
    assert "sdk-internals" in scopes and len(scopes) >= 2, scopes


def test_the_sdk_has_an_upper_bound() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python >= 3.11")
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        deps = [Requirement(line) for line in tomllib.load(f)["project"]["dependencies"]]
    (sdk,) = [req for req in deps if req.name == "opentelemetry-sdk"]
    assert any(spec.operator == "<" for spec in sdk.specifier), (
        "opentelemetry-sdk needs an upper bound: telemetry/store.py uses private SDK internals"
    )


def test_the_cheaper_suppression_check_agrees_with_the_library() -> None:
    """instrumentation._enabled() reads the keys of is_instrumentation_enabled() directly."""
    from opentelemetry import context
    from opentelemetry.instrumentation.utils import (
        is_instrumentation_enabled,
        suppress_instrumentation,
    )

    from sage_otel import instrumentation

    assert len(instrumentation._SUPPRESS_KEYS) == 2, HINT
    assert instrumentation._enabled() is is_instrumentation_enabled() is True
    with suppress_instrumentation():
        assert instrumentation._enabled() is is_instrumentation_enabled() is False
    for key in instrumentation._SUPPRESS_KEYS:  # either key alone suppresses
        token = context.attach(context.set_value(key, True))
        try:
            assert instrumentation._enabled() is is_instrumentation_enabled() is False
        finally:
            context.detach(token)
    token = context.attach(context.set_value("unrelated", 1))  # a non-empty context
    try:
        assert instrumentation._enabled() is is_instrumentation_enabled() is True
    finally:
        context.detach(token)
