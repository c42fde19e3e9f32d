"""Build-time generators, not part of the installed package.

``python -m tools.metrics_docs`` writes docs/metrics.md and ``python -m tools.dashboards`` the
Grafana dashboards, both from the metric catalog (:mod:`sage_otel.telemetry.catalog`);
``tools.queries`` holds the monitoring plan's PromQL that the dashboards, alert tests and
end-to-end tests share. Run them from the repository root (``make metrics-docs``,
``make dashboards``).
"""
