"""Two hand-written instrumentations of the same operations, for comparison only.

(d) prometheus_client, the way the monitoring plan's Go snippets use client_golang:
labels looked up at each call, ``observe``/``inc`` inline. (e) "naive" OpenTelemetry,
written straight from those snippets: SDK instruments, an attribute dict built per call.
Both patch the agent core with plain functions (cheaper than wrapt) and record no spans.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sage_otel.agent import did, handshake, identity, message, session
from sage_otel.telemetry.catalog import INSTRUMENTS, Kind
from sage_otel.telemetry.meters import create_instruments

Observe = Callable[[str, dict[str, str], float], None]


class PrometheusBackend:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        for spec in INSTRUMENTS:
            name = spec.prometheus_name.removesuffix("_total")
            if spec.kind is Kind.HISTOGRAM:
                metric = Histogram(
                    name,
                    spec.description,
                    spec.label_keys,
                    registry=self.registry,
                    buckets=spec.buckets,
                )
            elif spec.kind is Kind.COUNTER:
                metric = Counter(name, spec.description, spec.label_keys, registry=self.registry)
            else:
                metric = Gauge(name, spec.description, spec.label_keys, registry=self.registry)
            self.metrics[spec.key] = metric

    def observe(self, key: str, labels: dict[str, str], value: float) -> None:
        metric = self.metrics[key]
        (metric.labels(**labels) if labels else metric).observe(value)

    def inc(self, key: str, labels: dict[str, str], amount: float = 1) -> None:
        metric = self.metrics[key]
        (metric.labels(**labels) if labels else metric).inc(amount)


class NaiveOtelBackend:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.metrics = create_instruments(self.provider.get_meter("naive"))

    def observe(self, key: str, labels: dict[str, str], value: float) -> None:
        self.metrics[key].record(value, labels)

    def inc(self, key: str, labels: dict[str, str], amount: float = 1) -> None:
        self.metrics[key].add(amount, labels)


def _patches(b: Any) -> Iterator[tuple[object, str, Callable]]:
    def cipher(original, operation: str, direction: str):
        def patched(self, data, aad=b""):
            start = perf_counter()
            result = original(self, data, aad)
            elapsed = perf_counter() - start
            b.observe("session_duration", {"operation": operation}, elapsed)
            b.observe(
                "session_message_size",
                {"direction": direction},
                len(data if operation == "encrypt" else result),
            )
            b.inc("crypto_operations", {"operation": operation, "algorithm": "chacha20"})
            b.observe("crypto_operation_duration", {"operation": operation}, elapsed)
            return result

        return patched

    yield session.Session, "encrypt", lambda o: cipher(o, "encrypt", "outbound")
    yield session.Session, "decrypt", lambda o: cipher(o, "decrypt", "inbound")

    def opened(original):
        def patched(self, sess, payload, metadata, **kwargs):
            start = perf_counter()
            kind = metadata.get("type", "other")
            try:
                result = original(self, sess, payload, metadata, **kwargs)
            except Exception:
                b.inc("messages_processed", {"type": kind, "status": "failure"})
                raise
            b.inc("messages_processed", {"type": kind, "status": "success"})
            b.observe("message_processing_duration", {}, perf_counter() - start)
            b.observe("message_size", {}, len(payload) * 3 // 4)
            return result

        return patched

    yield message.MessageValidator, "open_wire", opened

    def checked(original):
        def patched(self, key, timestamp):
            status = original(self, key, timestamp)
            b.inc("nonce_validations", {"status": status.value})
            if status.value == "invalid":
                b.inc("replay_attacks_detected", {})
            return status

        return patched

    yield message.NonceCache, "check", checked

    def timed_crypto(original, operation: str, algorithm_of):
        def patched(*args, **kwargs):
            start = perf_counter()
            result = original(*args, **kwargs)
            b.inc("crypto_operations", {"operation": operation, "algorithm": algorithm_of(args)})
            b.observe("crypto_operation_duration", {"operation": operation}, perf_counter() - start)
            return result

        return patched

    yield (
        identity.SigningKey,
        "sign",
        lambda o: timed_crypto(o, "sign", lambda a: a[0].key_type.value),
    )
    yield identity, "verify_signature", lambda o: timed_crypto(o, "verify", lambda a: a[0].value)

    def stage(original, name: str, role: str | None):
        def patched(*args, **kwargs):
            if role:
                b.inc("handshakes_initiated", {"role": role})
            start = perf_counter()
            result = original(*args, **kwargs)
            b.observe("handshake_duration", {"stage": name}, perf_counter() - start)
            return result

        return patched

    yield handshake.Initiator, "init", lambda o: stage(o, "init", "client")
    yield handshake.Initiator, "finalize", lambda o: stage(o, "finalize", None)

    def processed(original):
        async def patched(*args, **kwargs):
            b.inc("handshakes_initiated", {"role": "server"})
            start = perf_counter()
            result = await original(*args, **kwargs)
            b.observe("handshake_duration", {"stage": "process"}, perf_counter() - start)
            b.inc("handshakes_completed", {"status": "success"})
            return result

        return patched

    yield handshake.Responder, "process", processed

    def created(original):
        def patched(*args, **kwargs):
            start = perf_counter()
            result = original(*args, **kwargs)
            b.observe("session_duration", {"operation": "create"}, perf_counter() - start)
            b.inc("sessions_created", {"status": "success"})
            b.inc("sessions_active", {})
            return result

        return patched

    yield session.SessionManager, "create", created

    def closed(original):
        def patched(*args, **kwargs):
            result = original(*args, **kwargs)
            if result:
                b.inc("sessions_closed", {})
                b.inc("sessions_active", {}, -1)
            return result

        return patched

    yield session.SessionManager, "close", closed

    def resolved(original):
        async def patched(self, target):
            start = perf_counter()
            result = await original(self, target)
            chain = result.did.chain.value
            b.inc("did_resolutions", {"chain": chain, "status": "success"})
            b.observe("did_resolution_duration", {"chain": chain}, perf_counter() - start)
            return result

        return patched

    yield did.DIDResolver, "resolve", resolved


@contextmanager
def handwritten(backend: Any) -> Iterator[Any]:
    """Patch the agent core with ``backend`` recording; restore the originals after."""
    saved = []
    for owner, name, factory in _patches(backend):
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, functools.wraps(original)(factory(original)))
    try:
        yield backend
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
