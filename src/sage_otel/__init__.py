"""sage-otel: OpenTelemetry observability for SAGE agents.

``sage_otel.configure()`` sets up traces, metrics, /metrics and OTLP export and instruments
the agent core; ``sage_otel.instrumentation.SageInstrumentor`` instruments it alone.
Importing ``sage_otel.agent`` loads no OpenTelemetry code.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def configure(**kwargs: Any) -> Any:
    """Set up telemetry for this process: see :func:`sage_otel.telemetry.setup.configure`."""
    from .telemetry.setup import configure as _configure

    return _configure(**kwargs)
