"""sage-otel: observability for SAGE agents."""

__version__ = "0.1.0"
