"""sage-otel telemetry: the metric catalog, fast aggregation, SDK setup and exposition."""
