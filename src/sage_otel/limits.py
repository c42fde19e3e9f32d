"""The server agent's limits from the environment, each variable named once.

Every parser raises ``ValueError`` naming the bad variable, so that ``sage-otel serve`` can
refuse it in one line before any side effect; an unset or empty variable keeps the agent's
own default. The tables are what docs/deploy.md and docs/security.md list.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .agent.edge import EdgeLimits
from .agent.handshake import ADDRESS_HANDSHAKE_RATE, GLOBAL_HANDSHAKE_RATE, parse_rate
from .agent.outbound import OutboundPolicy, parse_networks
from .agent.session import SessionLimits

SESSION_LIMIT_ENV = {
    "max_messages": ("SAGE_OTEL_SESSION_MAX_MESSAGES", int),
    "max_age": ("SAGE_OTEL_SESSION_MAX_AGE", float),
    "idle_timeout": ("SAGE_OTEL_SESSION_IDLE_TIMEOUT", float),
}
EDGE_LIMIT_ENV = {
    "header_timeout": ("SAGE_OTEL_HEADER_TIMEOUT", float),
    "request_timeout": ("SAGE_OTEL_REQUEST_TIMEOUT", float),
    "keepalive_timeout": ("SAGE_OTEL_KEEPALIVE_TIMEOUT", float),
    "max_header_bytes": ("SAGE_OTEL_MAX_HEADER_BYTES", int),
    "max_headers": ("SAGE_OTEL_MAX_HEADERS", int),
    "max_connections": ("SAGE_OTEL_MAX_CONNECTIONS", int),
}
OUTBOUND_LIMIT_ENV = {
    "max_answer_bytes": ("SAGE_OTEL_OUTBOUND_MAX_ANSWER", int),
    "timeout": ("SAGE_OTEL_OUTBOUND_TIMEOUT", float),
    "per_peer": ("SAGE_OTEL_OUTBOUND_PER_PEER", int),
    "total": ("SAGE_OTEL_OUTBOUND_TOTAL", int),
}
OUTBOUND_NETWORK_ENV = {"allow": "SAGE_OTEL_OUTBOUND_ALLOW", "deny": "SAGE_OTEL_OUTBOUND_DENY"}


def positive_numbers(
    table: Mapping[str, tuple[str, type]],
    environ: Mapping[str, str] = os.environ,
    error: type[ValueError] = ValueError,
) -> dict[str, Any]:
    """The variables of ``table`` (field: (variable, int or float)) that are set, as finite
    numbers > 0 by field name; ``error`` names the first bad one."""
    values: dict[str, Any] = {}
    for field_name, (variable, kind) in table.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            raise error(f"{variable}={text!r}: not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise error(f"{variable}={text!r}: must be a finite number > 0")
        values[field_name] = value
    return values


def session_limits() -> SessionLimits:
    """The session limits (the reference's: 1000 messages, 1 h, 10 min idle)."""
    return SessionLimits(**positive_numbers(SESSION_LIMIT_ENV))


def edge_limits() -> EdgeLimits:
    """The HTTP edge limits (:class:`~.agent.edge.EdgeLimits`); a connection cap the process's
    file-descriptor limit cannot reach is refused (it would never apply)."""
    limits = positive_numbers(EDGE_LIMIT_ENV)
    wanted, most = limits.get("max_connections"), _open_files_limit()
    if wanted is not None and most is not None and wanted >= most:
        variable = EDGE_LIMIT_ENV["max_connections"][0]
        raise ValueError(
            f"{variable}={wanted}: not below this process's file-descriptor limit ({most}); "
            "raise it first (ulimit -n)"
        )
    return EdgeLimits(**limits)


def _open_files_limit() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def outbound_policy() -> OutboundPolicy:
    """Where and how the agent POSTs to peers (:class:`~.agent.outbound.OutboundPolicy`)."""
    settings = positive_numbers(OUTBOUND_LIMIT_ENV)
    for field_name, variable in OUTBOUND_NETWORK_ENV.items():
        try:
            settings[field_name] = parse_networks(os.environ.get(variable, ""))
        except ValueError as error:
            raise ValueError(f"{variable}: {error}") from None
    return OutboundPolicy(**settings)


@dataclass(frozen=True)
class AdmissionLimits:
    """What many identities together may take: handshake rates (``"<n>/second"``,
    ``/minute``, ``/hour``, None for off) and session-table shares, as the agent's own
    defaults."""

    handshake_rate: str | None = GLOBAL_HANDSHAKE_RATE
    handshake_rate_per_address: str | None = ADDRESS_HANDSHAKE_RATE
    sessions_per_address: int = 4096
    new_peer_share: float = 0.5


def admission_limits() -> AdmissionLimits:
    """The admission limits from the environment; ValueError names a bad variable.

    ``SAGE_OTEL_HANDSHAKE_RATE`` (all handshakes of a worker) and
    ``SAGE_OTEL_HANDSHAKE_RATE_PER_ADDRESS`` take a rate or ``0`` (off);
    ``SAGE_OTEL_SESSIONS_PER_ADDRESS`` a count (``0``: off); ``SAGE_OTEL_NEW_PEER_SHARE``
    a fraction in (0, 1].
    """
    limits: dict[str, Any] = {}
    for field_name in ("handshake_rate", "handshake_rate_per_address"):
        variable = f"SAGE_OTEL_{field_name.upper()}"
        text = os.environ.get(variable, "").strip()
        if not text:
            continue
        if text == "0":
            limits[field_name] = None
            continue
        try:
            parse_rate(text)
        except ValueError:
            raise ValueError(
                f"{variable}={text!r}: not '<n>/second', '/minute', '/hour' or 0 (off)"
            ) from None
        limits[field_name] = text
    text = os.environ.get("SAGE_OTEL_SESSIONS_PER_ADDRESS", "").strip()
    if text:
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"SAGE_OTEL_SESSIONS_PER_ADDRESS={text!r}: not a count >= 0")
        limits["sessions_per_address"] = int(text)
    text = os.environ.get("SAGE_OTEL_NEW_PEER_SHARE", "").strip()
    if text:
        try:
            share = float(text)
        except ValueError:
            share = math.nan
        if not 0.0 < share <= 1.0:
            raise ValueError(f"SAGE_OTEL_NEW_PEER_SHARE={text!r}: must be in (0, 1]")
        limits["new_peer_share"] = share
    return AdmissionLimits(**limits)


def validate() -> None:
    """Parse every limit variable and the instrumentation's choices; the first bad one raises
    ValueError naming it (the instrumentation alone only warns: it must not stop a program
    it was attached to)."""
    from .instrumentation import (
        CRYPTO_DETAIL_ENV,
        CRYPTO_DETAILS,
        INBOUND_TRACE_CONTEXT_ENV,
        INBOUND_TRACE_CONTEXTS,
    )
    from .telemetry.web import metrics_server_limits

    session_limits()
    admission_limits()
    edge_limits()
    outbound_policy()
    metrics_server_limits()
    for variable, choices in (
        (INBOUND_TRACE_CONTEXT_ENV, INBOUND_TRACE_CONTEXTS),
        (CRYPTO_DETAIL_ENV, CRYPTO_DETAILS),
    ):
        text = os.environ.get(variable, "").strip()
        if text and text not in choices:
            raise ValueError(f"{variable}={text!r}: not one of {', '.join(choices)}")
