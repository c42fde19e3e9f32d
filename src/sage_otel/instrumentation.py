"""OpenTelemetry instrumentation for the SAGE agent core.

Usage::

    from sage_otel.instrumentation import SageInstrumentor

    SageInstrumentor().instrument(tracer_provider=..., meter_provider=...)

or, without code changes, ``opentelemetry-instrument sage-otel demo --no-telemetry`` (the
``sage`` entry point in the ``opentelemetry_instrumentor`` group).

What it patches: signing and verification (handshakes, registrations, key proofs, agent
cards), session encrypt/decrypt/create/close/expire, DID
resolution and registration, the three handshake stages, message validation and the nonce
check, and the HTTP client and server agents (spans, and W3C trace context propagation
between agents). Every metric of the catalog is recorded at those code paths; spans are
named ``sage.*`` and carry no key material, plaintext, nonce or session secret.

Options for ``instrument()``:

* ``tracer_provider`` / ``meter_provider``: default to the global ones;
* ``meters``: bound-instrument factory (:mod:`sage_otel.telemetry.meters`); by default the
  fast store when ``sage_otel.configure`` owns the meter provider, otherwise the plain API;
* ``crypto_detail``: ``"handshake"`` (default: a span event on the current span for each
  identity-key signature and verification, nothing per message), ``"events"`` (an event
  for every crypto operation, per-message sealing and opening included: each costs
  microseconds), ``"spans"`` (a child span per crypto operation) or ``"none"``; under
  ``opentelemetry-instrument`` set ``OTEL_PYTHON_SAGE_CRYPTO_DETAIL``;
* ``inbound_trace_context``: what the server agent does with the trace context of a request
  it has not authenticated yet (every request, when its span starts): ``"link"`` (default:
  the SERVER span starts a trace of its own, sampled by this process's sampler, with a link
  to the caller's span; baggage and ``tracestate`` are ignored), ``"parent"`` (continue the
  caller's trace with its sampling decision and baggage: for agents that trust their
  callers, such as the demo's own) or ``"ignore"``; under ``opentelemetry-instrument`` set
  ``OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT``;
* ``span_hook``: ``hook(span, operation)`` called on each span this library starts; its
  exceptions are logged and swallowed.

Suppression (``suppress_instrumentation()``) is honoured: nothing is recorded inside it.
Telemetry never breaks a SAGE call: any error inside the instrumentation is logged once and
the SAGE operation continues untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Collection
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

import wrapt
from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation import utils as _instrumentation_utils
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .agent import (
    client_agent,
    did,
    edge,
    envelope,
    handshake,
    identity,
    message,
    server_agent,
    session,
)
from .agent.errors import (
    CryptoError,
    PeerError,
    SageError,
    SignatureError,
    category_of,
    server_fault,
)
from .agent.identity import CHAIN_ALIASES, DID
from .telemetry.catalog import (
    ALGORITHMS,
    CHAINS,
    HANDSHAKE_ERROR_TYPES,
    OTHER,
    REFUSAL_CATEGORIES,
    SERVER_OPERATIONS,
)
from .telemetry.meters import Meters

_logger = logging.getLogger(__name__)
_logged: set[str] = set()

SpanHook = Callable[[trace.Span, str], None]


def _log_once(where: str) -> None:
    if where not in _logged:
        _logged.add(where)
        _logger.exception("sage-otel: telemetry error in %s (logged once; SAGE continues)", where)


def error_type(exc: BaseException) -> str:
    """A bounded identifier: our typed error code, a peer's error category, or the class name.

    A peer's own error code is not used: it is whatever the peer chose to send.
    """
    if isinstance(exc, PeerError):
        return f"peer_{exc.category.value}"
    return exc.code if isinstance(exc, SageError) else type(exc).__qualname__


def _chain_of(value: object) -> str:
    if isinstance(value, DID):
        return value.chain.value
    if isinstance(value, str):
        parts = value.split(":", 3)
        if len(parts) == 4:
            chain = CHAIN_ALIASES.get(parts[2].lower())
            if chain is not None:
                return chain.value
    return "other"


class _Kit:
    """What every patch shares: tracer, bound meters, options."""

    def __init__(
        self,
        tracer: trace.Tracer,
        meters: Meters,
        crypto_detail: str,
        hook: SpanHook | None,
        inbound_trace_context: str = "link",
    ):
        self.tracer = tracer
        self.meters = meters
        self.crypto_detail = crypto_detail
        self.hook = hook
        self.inbound_trace_context = inbound_trace_context
        # With tracing off, no span is started at all: not even a non-recording one.
        self.tracing = not isinstance(tracer, trace.NoOpTracer)
        self.crypto_spans = self.tracing and crypto_detail == "spans"

    def start(
        self,
        name: str,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict | None = None,
        parent: context.Context | None = None,
        links: list[Link] | None = None,
    ) -> _SpanScope | contextlib.nullcontext:
        """Start a span and make it current until the ``with`` block ends.

        Failures are recorded as ``error.type`` and status only (see ``_fail``): exception
        messages and stack traces are never exported.
        """
        if not self.tracing:
            return _NO_SPAN
        try:
            span = self.tracer.start_span(
                name,
                parent,
                kind,
                attributes,
                links,
                record_exception=False,
                set_status_on_exception=False,
            )
            # In the parent's context, so that what it carries (baggage) is current too.
            scope = _SpanScope(span, context.attach(trace.set_span_in_context(span, parent)))
        except Exception:  # a broken tracer costs the span, never the SAGE call
            _log_once(f"start {name}")
            return _NO_SPAN
        if self.hook is not None and span.is_recording():
            try:
                self.hook(span, name)
            except Exception:
                _log_once("span_hook")
        return scope

    def current_span(self) -> trace.Span:
        return trace.get_current_span() if self.tracing else trace.INVALID_SPAN


class _SpanScope:
    """Cheaper than ``start_as_current_span``: this sits on every message's path."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span, token: object) -> None:
        self.span, self.token = span, token

    def __enter__(self) -> trace.Span:
        return self.span

    def __exit__(self, *exc: object) -> None:
        try:
            context.detach(self.token)
            self.span.end()
        except Exception:
            _log_once("span end")


# The keys is_instrumentation_enabled() reads; it makes four calls per key on every patched
# call (a few percent of a traced message round trip), this reads the context once.
_SUPPRESS_KEYS = tuple(
    getattr(_instrumentation_utils, name)
    for name in ("_SUPPRESS_INSTRUMENTATION_KEY", "_SUPPRESS_INSTRUMENTATION_KEY_PLAIN")
    if hasattr(_instrumentation_utils, name)
)


def _enabled() -> bool:
    """``is_instrumentation_enabled()``, cheaper (tests/test_sdk_internals.py checks that the
    two agree)."""
    if len(_SUPPRESS_KEYS) != 2:  # a release that moved the keys: ask the library
        return _instrumentation_utils.is_instrumentation_enabled()
    current = context.get_current()
    return not (current and (current.get(_SUPPRESS_KEYS[0]) or current.get(_SUPPRESS_KEYS[1])))


_INVALID_SPAN = trace.INVALID_SPAN
_NO_SPAN = contextlib.nullcontext(_INVALID_SPAN)


def _exemplar(span: trace.Span) -> tuple[int, int] | None:
    """(trace_id, span_id) when ``span`` is sampled: exemplars link only to stored traces."""
    if span is _INVALID_SPAN:  # tracing off, or no span: the common metrics-only case
        return None
    span_context = span.get_span_context()
    if span_context.trace_flags & 1:
        return span_context.trace_id, span_context.span_id
    return None


def _fail(span: trace.Span, exc: BaseException) -> None:
    if span.is_recording():
        kind = error_type(exc)
        span.set_attribute("error.type", kind)
        span.set_status(Status(StatusCode.ERROR, kind))


# --- crypto -------------------------------------------------------------------------------


def _crypto_recorder(kit: _Kit, operation: str):
    ops = {
        alg: kit.meters.counter("crypto_operations", operation=operation, algorithm=alg)
        for alg in (*ALGORITHMS, OTHER)
    }
    duration = kit.meters.histogram("crypto_operation_duration", operation=operation)
    errors = kit.meters.counter("crypto_errors", operation=operation)
    event = f"sage.crypto.{operation}"
    # "handshake": events for identity-key operations only, never per message.
    per_message = operation in ("encrypt", "decrypt")
    events = kit.tracing and (
        kit.crypto_detail == "events" or (kit.crypto_detail == "handshake" and not per_message)
    )

    def record(algorithm: str, elapsed: float, failed: bool, span: trace.Span, exemplar) -> None:
        ops[algorithm if algorithm in ops else OTHER].add(1, exemplar)
        duration.record(elapsed, exemplar)
        if failed:
            errors.add(1, exemplar)
        if events and span.is_recording():
            span.add_event(
                event, {"sage.crypto.algorithm": algorithm, "sage.crypto.ok": not failed}
            )

    return record


def _wrap_crypto(kit: _Kit, operation: str, algorithm_of: Callable[..., str], on_success=None):
    """One crypto operation: counted, timed and (optionally) a span or event.

    Only cryptographic failures (bad signature, failed authentication) count as crypto
    errors; a call refused for another reason (e.g. a closed session) did no crypto.
    """
    record = _crypto_recorder(kit, operation)
    span_name = f"sage.crypto.{operation}"

    def observed(wrapped, args, kwargs, algorithm: str):
        start = perf_counter()
        try:
            result = wrapped(*args, **kwargs)
        except (CryptoError, SignatureError):
            try:
                span = kit.current_span()
                record(algorithm, perf_counter() - start, True, span, _exemplar(span))
            except Exception:
                _log_once(span_name)
            raise
        elapsed = perf_counter() - start
        try:
            span = kit.current_span()
            exemplar = _exemplar(span)  # once: it feeds every value this call records
            record(algorithm, elapsed, False, span, exemplar)
            if on_success is not None:
                on_success(elapsed, args, result, exemplar)
        except Exception:
            _log_once(span_name)
        return result

    def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return wrapped(*args, **kwargs)
        algorithm = algorithm_of(instance, args, kwargs)
        if not kit.crypto_spans:
            return observed(wrapped, args, kwargs, algorithm)
        with kit.start(span_name, attributes={"sage.crypto.algorithm": algorithm}) as span:
            try:
                return observed(wrapped, args, kwargs, algorithm)
            except Exception as exc:
                _fail(span, exc)
                raise

    return wrapper


def _wrap_sign(kit: _Kit):
    return _wrap_crypto(kit, "sign", lambda instance, args, kwargs: instance.key_type.value)


def _wrap_verify(kit: _Kit):
    def algorithm_of(instance, args, kwargs) -> str:
        key_type = args[0] if args else kwargs.get("key_type")
        return getattr(key_type, "value", "other")

    return _wrap_crypto(kit, "verify", algorithm_of)


def _safely(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        _log_once(getattr(fn, "__qualname__", "recorder"))


# --- sessions -----------------------------------------------------------------------------


def _wrap_cipher(kit: _Kit, operation: str):
    """Session.encrypt / Session.decrypt: one timing feeds the session and crypto histograms."""
    encrypt = operation == "encrypt"
    session_duration = kit.meters.histogram("session_duration", operation=operation)
    size = kit.meters.histogram(
        "session_message_size", direction="outbound" if encrypt else "inbound"
    )

    def on_success(elapsed: float, args: tuple, result: bytes, exemplar) -> None:
        session_duration.record(elapsed, exemplar)
        size.record(len(args[0]) if encrypt else len(result), exemplar)

    return _wrap_crypto(kit, operation, lambda instance, args, kwargs: "chacha20", on_success)


def _wrap_session_create(kit: _Kit):
    duration = kit.meters.histogram("session_duration", operation="create")
    created = {s: kit.meters.counter("sessions_created", status=s) for s in ("success", "failure")}
    active = kit.meters.counter("sessions_active")

    def record(elapsed: float, ok: bool, span: trace.Span) -> None:
        exemplar = _exemplar(span)
        duration.record(elapsed, exemplar)
        created["success" if ok else "failure"].add(1, exemplar)
        if ok:
            active.add(1)

    def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return wrapped(*args, **kwargs)
        role = getattr(args[1] if len(args) > 1 else kwargs.get("role"), "value", "")
        attributes = {"sage.session.role": role}
        with kit.start("sage.session.create", attributes=attributes) as span:
            start = perf_counter()
            try:
                result = wrapped(*args, **kwargs)
            except Exception as exc:
                _safely(record, perf_counter() - start, False, span)
                _fail(span, exc)
                raise
            _safely(record, perf_counter() - start, True, span)
            if span.is_recording():
                span.set_attribute("sage.session.id", result.id)
            return result

    return wrapper


def _wrap_session_end(kit: _Kit, how: str):
    """SessionManager.close / expire: counted only when a live session really ended."""
    ended = kit.meters.counter("sessions_closed" if how == "close" else "sessions_expired")
    active = kit.meters.counter("sessions_active")

    def record(args: tuple, kwargs: dict) -> None:
        if how == "expire":
            attributes = {"sage.session.id": args[0].id, "sage.session.end_reason": args[1].value}
        else:
            attributes = {"sage.session.id": args[0] if args else kwargs["session_id"]}
        with kit.start(f"sage.session.{how}", attributes=attributes) as span:
            ended.add(1, _exemplar(span))
            active.add(-1)

    def wrapper(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        if result and _enabled():
            _safely(record, args, kwargs)
        return result

    return wrapper


# --- DIDs ---------------------------------------------------------------------------------


def _by_chain_and_status(kit: _Kit, key: str) -> dict[tuple[str, str], Any]:
    chains, statuses = (*CHAINS, "other"), ("success", "failure")
    return {(c, s): kit.meters.counter(key, chain=c, status=s) for c in chains for s in statuses}


def _wrap_resolve(kit: _Kit):
    results = _by_chain_and_status(kit, "did_resolutions")
    durations = {
        c: kit.meters.histogram("did_resolution_duration", chain=c) for c in (*CHAINS, "other")
    }

    def record(chain: str, ok: bool, elapsed: float, span: trace.Span) -> None:
        exemplar = _exemplar(span)
        results[chain, "success" if ok else "failure"].add(1, exemplar)
        durations[chain].record(elapsed, exemplar)

    async def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return await wrapped(*args, **kwargs)
        target = args[0] if args else kwargs.get("did")
        chain = _chain_of(target)
        attributes = {"sage.did.chain": chain, "sage.did": str(target)[:200]}
        with kit.start("sage.did.resolve", attributes=attributes) as span:
            start = perf_counter()
            try:
                result = await wrapped(*args, **kwargs)
            except Exception as exc:
                _safely(record, chain, False, perf_counter() - start, span)
                _fail(span, exc)
                raise
            _safely(record, chain, True, perf_counter() - start, span)
            return result

    return wrapper


def _wrap_register(kit: _Kit):
    results = _by_chain_and_status(kit, "did_registrations")

    def record(chain: str, ok: bool, span: trace.Span) -> None:
        results[chain, "success" if ok else "failure"].add(1, _exemplar(span))

    async def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return await wrapped(*args, **kwargs)
        did_value = getattr(args[0] if args else kwargs.get("document"), "did", None)
        chain = _chain_of(did_value)
        attributes = {"sage.did.chain": chain, "sage.did": str(did_value)}
        with kit.start("sage.did.register", attributes=attributes) as span:
            try:
                result = await wrapped(*args, **kwargs)
            except Exception as exc:
                _safely(record, chain, False, span)
                _fail(span, exc)
                raise
            _safely(record, chain, True, span)
            return result

    return wrapper


# --- handshake ----------------------------------------------------------------------------


def _outcome_recorder(kit: _Kit):
    """handshakes_completed{status} and handshakes_failed{error_type} for one side."""
    completed = {
        s: kit.meters.counter("handshakes_completed", status=s) for s in ("success", "failure")
    }
    failed = {
        t: kit.meters.counter("handshakes_failed", error_type=t)
        for t in (*HANDSHAKE_ERROR_TYPES, "other")
    }

    def record(exc: BaseException | None, span: trace.Span) -> None:
        exemplar = _exemplar(span)
        if exc is None:
            completed["success"].add(1, exemplar)
            return
        completed["failure"].add(1, exemplar)
        category = category_of(exc).value
        failed[category if category in failed else "other"].add(1, exemplar)

    return record


def _wrap_stage(kit: _Kit, stage: str, role: str | None):
    """Initiator.init / Initiator.finalize: a child span and the stage histogram."""
    duration = kit.meters.histogram("handshake_duration", stage=stage)
    initiated = kit.meters.counter("handshakes_initiated", role=role) if role else None

    def record(elapsed: float, span: trace.Span) -> None:
        exemplar = _exemplar(span)
        duration.record(elapsed, exemplar)
        if initiated is not None:
            initiated.add(1, exemplar)

    def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return wrapped(*args, **kwargs)
        with kit.start(f"sage.handshake.{stage}") as span:
            start = perf_counter()
            try:
                return wrapped(*args, **kwargs)
            except Exception as exc:
                _fail(span, exc)
                raise
            finally:
                _safely(record, perf_counter() - start, span)

    return wrapper


def _wrap_process(kit: _Kit):
    """Responder.process: the server's stage, and the server side's handshake outcome."""
    duration = kit.meters.histogram("handshake_duration", stage="process")
    initiated = kit.meters.counter("handshakes_initiated", role="server")
    outcome = _outcome_recorder(kit)

    def record(elapsed: float, exc: BaseException | None, span: trace.Span) -> None:
        exemplar = _exemplar(span)
        initiated.add(1, exemplar)
        duration.record(elapsed, exemplar)
        outcome(exc, span)

    async def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return await wrapped(*args, **kwargs)
        with kit.start("sage.handshake.process") as span:
            start = perf_counter()
            try:
                result = await wrapped(*args, **kwargs)
            except Exception as exc:
                _safely(record, perf_counter() - start, exc, span)
                _fail(span, exc)
                raise
            _safely(record, perf_counter() - start, None, span)
            if span.is_recording():
                span.set_attribute("sage.session.id", result[1].id)
                span.set_attribute("sage.peer.profile", result[1].profile.value)
            return result

    return wrapper


def _server_attributes(base_url: str) -> dict[str, Any]:
    """``server.*`` from a URL; a URL the core will refuse yields no attributes, not an error."""
    try:
        parts = urlsplit(base_url)
        default_port = 443 if parts.scheme == "https" else 80
        return {"server.address": parts.hostname or "", "server.port": parts.port or default_port}
    except (ValueError, TypeError, AttributeError):
        return {}


def _wrap_connect(kit: _Kit):
    """ClientAgent.connect: the client's handshake span and the client side's outcome."""
    outcome = _outcome_recorder(kit)

    async def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return await wrapped(*args, **kwargs)
        try:
            base_url = args[0] if args else kwargs.get("base_url", "")
            peer = args[1] if len(args) > 1 else kwargs.get("peer_did", "")
            profile = kwargs.get("profile", session.PeerProfile.NATIVE)
            attributes = {
                "sage.handshake.role": "client",
                "sage.peer.did": str(peer)[:200],
                "sage.peer.profile": getattr(profile, "value", OTHER),
                **_server_attributes(base_url),
            }
        except Exception:
            _log_once("connect attributes")
            attributes = {"sage.handshake.role": "client"}
        with kit.start("sage.handshake", SpanKind.CLIENT, attributes) as span:
            try:
                result = await wrapped(*args, **kwargs)
            except Exception as exc:
                _safely(outcome, exc, span)
                _fail(span, exc)
                raise
            _safely(outcome, None, span)
            if span.is_recording():
                span.set_attribute("sage.session.id", result.session.id)
            return result

    return wrapper


# --- messages -----------------------------------------------------------------------------


def _processed_counters(kit: _Kit) -> dict[tuple[str, str], Any]:
    types, statuses = ("text", "binary", OTHER), ("success", "failure")
    return {
        (t, s): kit.meters.counter("messages_processed", type=t, status=s)
        for t in types
        for s in statuses
    }


def _wrap_open(kit: _Kit):
    """MessageValidator.open_wire: parse, verify, replay-check and open one inbound message."""
    processed = _processed_counters(kit)
    duration = kit.meters.histogram("message_processing_duration")
    size = kit.meters.histogram("message_size")

    def record(kind: str, status: str, elapsed: float, wire_size: int, span: trace.Span) -> None:
        exemplar = _exemplar(span)
        processed[kind, status].add(1, exemplar)
        duration.record(elapsed, exemplar)
        size.record(wire_size, exemplar)

    def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return wrapped(*args, **kwargs)
        payload = args[1] if len(args) > 1 else kwargs.get("payload")
        metadata = args[2] if len(args) > 2 else kwargs.get("metadata")
        kind = metadata.get("type") if isinstance(metadata, dict) else None
        if kind != "text" and kind != "binary":
            # A go-profile message has no type on the wire: it opens to bytes.
            go = getattr(args[0] if args else None, "profile", None) is session.PeerProfile.GO
            kind = "binary" if go else OTHER
        # No attributes: on the per-message path each one costs microseconds, and the
        # enclosing receive/send span already names the session.
        with kit.start("sage.message.process") as span:
            start = perf_counter()
            try:
                result = wrapped(*args, **kwargs)
            except Exception as exc:
                _safely(record, kind, "failure", perf_counter() - start, _wire_size(payload), span)
                _fail(span, exc)
                raise
            _safely(record, kind, "success", perf_counter() - start, _wire_size(payload), span)
            return result

    return wrapper


def _wire_size(payload: object) -> int:
    """Bytes carried by a standard-base64 payload, without decoding it again."""
    if not isinstance(payload, str):
        return 0
    return len(payload) * 3 // 4 - (2 if payload.endswith("==") else payload.endswith("="))


def _wrap_nonce_check(kit: _Kit):
    statuses = {
        s: kit.meters.counter("nonce_validations", status=s)
        for s in ("valid", "invalid", "expired")
    }
    replays = kit.meters.counter("replay_attacks_detected")

    def record(status: str) -> None:
        if status != "invalid":
            statuses[status].add(1)
            return
        span = kit.current_span()
        exemplar = _exemplar(span)
        statuses[status].add(1, exemplar)
        replays.add(1, exemplar)
        if span.is_recording():
            span.add_event("sage.replay_detected")

    def wrapper(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        if _enabled():
            _safely(record, result.value)
        return result

    return wrapper


# -> span name, attributes, parent context (None: the current one), links
Describe = Callable[[tuple, dict], tuple[str, dict | None, Any, list[Link]]]


def _span_around(kit: _Kit, kind: SpanKind, describe: Describe):
    """One span around an async exchange with the peer; ``describe`` names it from the call."""

    async def wrapper(wrapped, instance, args, kwargs):
        if not kit.tracing or not _enabled():  # no span to name: skip describing it
            return await wrapped(*args, **kwargs)
        try:
            name, attributes, parent, links = describe(args, kwargs)
        except Exception:
            _log_once(f"describe {kind.name} span")
            return await wrapped(*args, **kwargs)
        with kit.start(name, kind, attributes, parent, links or None) as span:
            try:
                return await wrapped(*args, **kwargs)
            except Exception as exc:
                _fail(span, exc)
                raise

    return wrapper


def _wrap_send(kit: _Kit):
    """ClientAgent.send: one message out and its reply back (CLIENT)."""

    def describe(args: tuple, kwargs: dict):
        conn, data = args[0], args[1]
        attributes = {
            "sage.session.id": conn.session.id,
            "sage.message.type": "text" if isinstance(data, str) else "binary",
            **_server_attributes(conn.base_url),
        }
        return "sage.message.send", attributes, None, []

    return _span_around(kit, SpanKind.CLIENT, describe)


def _wrap_post(kit: _Kit):
    """ClientAgent.post: W3C trace context into the request headers."""

    async def wrapper(wrapped, instance, args, kwargs):
        # An empty context (no span, no baggage: tracing off) has nothing to inject.
        if context.get_current() and _enabled():
            try:
                headers = dict(kwargs.get("headers") or {})
                propagate.inject(headers)
                kwargs["headers"] = headers
            except Exception:
                _log_once("propagation.inject")
        return await wrapped(*args, **kwargs)

    return wrapper


def _wrap_close(kit: _Kit):
    """ClientAgent.close: the client side of a close request, so both sides share a trace."""

    def describe(args: tuple, kwargs: dict):
        conn = args[0] if args else kwargs["conn"]
        attributes = {"sage.session.id": conn.session.id, **_server_attributes(conn.base_url)}
        return "sage.session.close_request", attributes, None, []

    return _span_around(kit, SpanKind.CLIENT, describe)


_SERVER_SPANS = {
    handshake.TASK: "sage.handshake",
    envelope.MESSAGE_TASK: "sage.message.receive",
    envelope.CLOSE_TASK: "sage.session.close_request",
}


_SERVER_OPERATION = {
    handshake.TASK: "handshake",
    envelope.MESSAGE_TASK: "message",
    envelope.CLOSE_TASK: "close",
}

_TRACEPARENT = TraceContextTextMapPropagator()
_NO_PARENT = context.Context()  # a root span, whatever context the server task runs in


def _inbound_parent(kit: _Kit, headers: Any) -> tuple[context.Context | None, list[Link]]:
    """The SERVER span's parent and links from a request nobody has authenticated yet.

    ``link``: a trace of this process's own, its sampler deciding as for any root span; the
    caller's span, when its ``traceparent`` is valid, is a link (no baggage, no tracestate).
    ``parent``: the caller's trace, sampling decision and baggage, as the propagators give.
    """
    policy = kit.inbound_trace_context
    if policy == "parent":
        return propagate.extract(headers), []
    if policy == "ignore":
        return _NO_PARENT, []
    remote = trace.get_current_span(_TRACEPARENT.extract(headers)).get_span_context()
    return _NO_PARENT, [Link(remote)] if remote.is_valid else []


def _wrap_dispatch(kit: _Kit):
    """ServerAgent.dispatch: the SERVER span, linked to (or continuing) the caller's trace."""

    def describe(args: tuple, kwargs: dict):
        envelope = args[0] if args else kwargs["envelope"]
        try:
            parent, links = _inbound_parent(kit, envelope.headers)
        except Exception:
            _log_once("propagation.extract")
            parent, links = _NO_PARENT, []
        known = envelope.task_id in _SERVER_SPANS
        attributes = {"sage.task": envelope.task_id if known else OTHER}
        if envelope.task_id == handshake.TASK:
            attributes["sage.handshake.role"] = "server"
        elif envelope.context_id:
            attributes["sage.session.id"] = envelope.context_id[:64]
        return _SERVER_SPANS.get(envelope.task_id, "sage.receive"), attributes, parent, links

    spanned = _span_around(kit, SpanKind.SERVER, describe)
    finished = {
        (operation, outcome): kit.meters.counter(
            "server_requests", operation=operation, outcome=outcome
        )
        for operation in (*SERVER_OPERATIONS, OTHER)
        for outcome in ("served", "refused", "failed")
    }

    def record(task_id: str, error: BaseException | None) -> None:
        operation = _SERVER_OPERATION.get(task_id, OTHER)
        outcome = "served" if error is None else "failed" if server_fault(error) else "refused"
        finished[operation, outcome].add(1, _exemplar(kit.current_span()))

    async def wrapper(wrapped, instance, args, kwargs):
        if not _enabled():
            return await wrapped(*args, **kwargs)
        task_id = getattr(args[0] if args else kwargs.get("envelope"), "task_id", "")

        async def counted(*args, **kwargs):
            try:
                result = await wrapped(*args, **kwargs)
            except Exception as exc:  # cancellation (the caller left) is no outcome
                _safely(record, task_id, exc)
                raise
            _safely(record, task_id, None)
            return result

        return await spanned(counted, instance, args, kwargs)

    return wrapper


def _wrap_refuse(kit: _Kit):
    """ServerAgent.refuse and the HTTP edge's: every typed refusal, by its (closed) category."""
    refused = {c: kit.meters.counter("requests_refused", category=c) for c in REFUSAL_CATEGORIES}
    other = kit.meters.counter("requests_refused", category=OTHER)

    def record(error: object) -> None:
        category = category_of(error).value if isinstance(error, BaseException) else OTHER
        refused.get(category, other).add(1, _exemplar(kit.current_span()))

    def wrapper(wrapped, instance, args, kwargs):
        if _enabled():
            _safely(record, args[0] if args else kwargs.get("error"))
        return wrapped(*args, **kwargs)

    return wrapper


# --- the instrumentor ---------------------------------------------------------------------

_PATCHES: tuple[tuple[object, str, Callable[[_Kit], Callable]], ...] = (
    (identity.SigningKey, "sign", _wrap_sign),
    (identity.SigningKey, "sign_digest", _wrap_sign),
    (identity, "verify_signature", _wrap_verify),
    (identity, "verify_digest", _wrap_verify),
    (session.Session, "encrypt", lambda kit: _wrap_cipher(kit, "encrypt")),
    (session.Session, "decrypt", lambda kit: _wrap_cipher(kit, "decrypt")),
    (session.SessionManager, "create", _wrap_session_create),
    (session.SessionManager, "close", lambda kit: _wrap_session_end(kit, "close")),
    (session.SessionManager, "expire", lambda kit: _wrap_session_end(kit, "expire")),
    (did.DIDResolver, "resolve", _wrap_resolve),
    (did.Registry, "register", _wrap_register),
    (handshake.Initiator, "init", lambda kit: _wrap_stage(kit, "init", "client")),
    (handshake.Initiator, "finalize", lambda kit: _wrap_stage(kit, "finalize", None)),
    (handshake.Responder, "process", _wrap_process),
    (message.MessageValidator, "open_wire", _wrap_open),
    (message.NonceCache, "check", _wrap_nonce_check),
    (client_agent.ClientAgent, "connect", _wrap_connect),
    (client_agent.ClientAgent, "send", _wrap_send),
    (client_agent.ClientAgent, "close", _wrap_close),
    (client_agent.ClientAgent, "post", _wrap_post),
    (server_agent.ServerAgent, "dispatch", _wrap_dispatch),
    (server_agent.ServerAgent, "refuse", _wrap_refuse),
    (edge.SageHttpProtocol, "refuse", _wrap_refuse),  # refused before the app: HTTP itself
)

CRYPTO_DETAILS = ("handshake", "events", "spans", "none")
CRYPTO_DETAIL_ENV = "OTEL_PYTHON_SAGE_CRYPTO_DETAIL"  # for opentelemetry-instrument
INBOUND_TRACE_CONTEXTS = ("link", "parent", "ignore")
INBOUND_TRACE_CONTEXT_ENV = "OTEL_PYTHON_SAGE_INBOUND_TRACE_CONTEXT"


class SageInstrumentor(BaseInstrumentor):
    """Instruments the SAGE agent core; see the module docstring for options."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        tracer = trace.get_tracer(
            __name__, __version__, tracer_provider=kwargs.get("tracer_provider")
        )
        meters = kwargs.get("meters")
        if meters is None:
            from .telemetry.setup import meters_for

            meters = meters_for(kwargs.get("meter_provider"))
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            _logger.info("sage-otel: OTEL_SDK_DISABLED=true, the agent is not instrumented")
            return
        crypto_detail = _choice(kwargs, "crypto_detail", CRYPTO_DETAIL_ENV, CRYPTO_DETAILS)
        inbound = _choice(
            kwargs, "inbound_trace_context", INBOUND_TRACE_CONTEXT_ENV, INBOUND_TRACE_CONTEXTS
        )
        kit = _Kit(tracer, meters, crypto_detail, kwargs.get("span_hook"), inbound)
        for owner, name, factory in _PATCHES:
            wrapt.wrap_function_wrapper(owner, name, factory(kit))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, name, _factory in _PATCHES:
            _unwrap(owner, name)


def _choice(kwargs: dict[str, Any], name: str, variable: str, choices: tuple[str, ...]) -> str:
    """An option from ``instrument()`` or else its variable; the first choice is the default.

    A typo logs a warning and means the default: it must not stop auto-instrumentation
    (and every instrumentor after it)."""
    value = kwargs.get(name) or os.environ.get(variable, choices[0])
    if value not in choices:
        _logger.warning(
            "sage-otel: %s %r is not one of %s; using %r", name, value, choices, choices[0]
        )
        value = choices[0]
    return value


def _unwrap(owner: object, name: str) -> None:
    """Put back exactly what the owner held, read from its own namespace (not a bound form)."""
    patched = vars(owner).get(name)
    if patched is not None and hasattr(patched, "__wrapped__"):
        setattr(owner, name, patched.__wrapped__)


__all__ = ["SageInstrumentor", "error_type"]
