"""Real services for the end-to-end tests: Prometheus, the sage-otelcol collector, Jaeger v2.

They are started by :mod:`tools.services`, which ``make pictures`` uses too. Here a missing
binary skips the test, or fails it when ``CI=true`` (it must have been built there).
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest

from tools import services as _services
from tools.services import (  # noqa: F401  (the helpers the e2e tests use through this module)
    COLLECTOR_CONFIG,
    JAEGER_CONFIG,
    LOOPBACK,
    REPO,
    SCRIPTS,
    Collector,
    Jaeger,
    Prometheus,
    PrometheusError,
    collector_env,
    free_port,
    get_json,
    http_get,
    log_tail,
    loopback,
    port_open,
    wait_for,
)


def missing(reason: str) -> NoReturn:
    """A prerequisite is absent: fail under CI (it must have been built), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def binary(name: str) -> str:
    """Path of a prerequisite binary; skips (or fails under CI) when it is missing."""
    try:
        return _services.binary(name)
    except _services.Unavailable as exc:
        missing(str(exc))


def prometheus(*args: Any, **kwargs: Any) -> Any:
    """:func:`tools.services.prometheus`, once its binary is known to be there."""
    binary("prometheus")
    return _services.prometheus(*args, **kwargs)


def collector(*args: Any, **kwargs: Any) -> Any:
    """:func:`tools.services.collector`, once its binary is known to be there."""
    binary("sage-otelcol")
    return _services.collector(*args, **kwargs)


def jaeger(*args: Any, **kwargs: Any) -> Any:
    """:func:`tools.services.jaeger`, once its binary is known to be there."""
    binary("jaeger")
    return _services.jaeger(*args, **kwargs)
