"""sage-otel: OpenTelemetry observability for SAGE agents.

``sage_otel.configure()`` sets up traces, metrics, /metrics and OTLP export and instruments
the agent core (its arguments: docs/api.md); ``sage_otel.instrumentation.SageInstrumentor``
instruments it alone. Importing ``sage_otel`` or ``sage_otel.agent`` loads no OpenTelemetry
code: ``sage_otel.configure`` is :func:`sage_otel.telemetry.setup.configure` itself, imported
on first access, so ``inspect.signature``, ``help()`` and type checkers see its real
arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .telemetry.setup import Telemetry as Telemetry
    from .telemetry.setup import configure as configure

__all__ = ["Telemetry", "__version__", "configure"]
_LAZY = {"configure", "Telemetry"}


def __getattr__(name: str) -> Any:
    """``configure`` and ``Telemetry`` from :mod:`sage_otel.telemetry.setup`, on first use."""
    if name in _LAZY:
        from .telemetry import setup

        value = getattr(setup, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
