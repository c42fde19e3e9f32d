"""Every SAGE instrument, defined once.

Names, units, labels and buckets follow the monitoring plan (§2.1). The exposed Prometheus
names are derived here the way the Prometheus exporter derives them (dots to underscores,
unit suffix, ``_total`` for counters), and a test checks them against a real scrape. Docs,
dashboards, alert checks and tests read this module instead of retyping names.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from ..agent.errors import ErrorCategory

OTHER = "other"


class Kind(str, Enum):
    COUNTER = "counter"
    UP_DOWN_COUNTER = "updowncounter"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Label:
    """A label and its closed set of values; anything else is recorded as ``other``."""

    key: str
    values: tuple[str, ...]

    def normalize(self, value: object) -> str:
        return value if value in self.values else OTHER  # type: ignore[return-value]


def exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Prometheus' ExponentialBuckets, rounded so the exposed ``le`` values read cleanly."""
    return tuple(float(f"{start * factor**i:.10g}") for i in range(count))


_UNIT_SUFFIX = {"s": "seconds", "By": "bytes"}


@dataclass(frozen=True)
class Instrument:
    key: str
    name: str
    kind: Kind
    unit: str
    description: str
    labels: tuple[Label, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(label.key for label in self.labels)

    @property
    def prometheus_name(self) -> str:
        """The metric family name as exposed (counters with their ``_total``)."""
        base = self.name.replace(".", "_")
        suffix = _UNIT_SUFFIX.get(self.unit)
        if suffix and not base.endswith("_" + suffix):
            base += "_" + suffix
        return base + "_total" if self.kind is Kind.COUNTER else base

    @property
    def prometheus_type(self) -> str:
        return {Kind.COUNTER: "counter", Kind.UP_DOWN_COUNTER: "gauge"}.get(self.kind, "histogram")

    def label_sets(self) -> Iterator[dict[str, str]]:
        """Every enumerated combination: these series exist, at zero, from startup."""
        for values in itertools.product(*(label.values for label in self.labels)):
            yield dict(zip(self.label_keys, values))

    def normalize(self, labels: dict[str, object]) -> tuple[str, ...]:
        """Label values in declaration order, each mapped into its closed set."""
        return tuple(label.normalize(labels.get(label.key)) for label in self.labels)


SUCCESS_FAILURE = ("success", "failure")
CHAINS = ("ethereum", "solana")
CRYPTO_OPERATIONS = ("sign", "verify", "encrypt", "decrypt")
ALGORITHMS = ("ed25519", "secp256k1", "p256", "chacha20")
HANDSHAKE_ERROR_TYPES = (
    "timeout",
    "invalid",
    "network",
    "signature",
    "unknown_did",
    "replay",
    "crypto",
    "overload",
)

# Categories of the typed errors a server answers: exactly the agent's own closed set.
REFUSAL_CATEGORIES = tuple(category.value for category in ErrorCategory)

# What a server agent is asked to do (its task ids; an unknown task counts as "other").
SERVER_OPERATIONS = ("handshake", "message", "close")

SESSION_DURATION_BUCKETS = exponential(0.0001, 2, 15)  # 0.1 ms .. 1.6 s
HANDSHAKE_BUCKETS = exponential(0.001, 2, 12)  # 1 ms .. 2 s
MESSAGE_SIZE_BUCKETS = exponential(64, 4, 10)  # 64 B .. 16 MiB
CRYPTO_BUCKETS = exponential(0.000001, 2, 14)  # 1 us .. 8 ms: one primitive on small inputs
DID_RESOLUTION_BUCKETS = exponential(0.00001, 4, 11)  # 10 us (cache) .. 10 s (a slow chain)
PROCESSING_BUCKETS = exponential(0.00001, 2, 16)  # 10 us .. 0.33 s

INSTRUMENTS: tuple[Instrument, ...] = (
    # Sessions
    Instrument(
        "sessions_created",
        "sage.sessions.created",
        Kind.COUNTER,
        "{session}",
        "Sessions created, by outcome.",
        (Label("status", SUCCESS_FAILURE),),
    ),
    Instrument(
        "sessions_expired",
        "sage.sessions.expired",
        Kind.COUNTER,
        "{session}",
        "Sessions ended by a limit (max age, idle timeout, max messages).",
    ),
    Instrument(
        "sessions_closed",
        "sage.sessions.closed",
        Kind.COUNTER,
        "{session}",
        "Sessions closed explicitly.",
    ),
    Instrument(
        "sessions_active",
        "sage.sessions.active",
        Kind.UP_DOWN_COUNTER,
        "{session}",
        "Sessions currently live.",
    ),
    Instrument(
        "session_duration",
        "sage.session.duration",
        Kind.HISTOGRAM,
        "s",
        "Duration of session operations: create, and sealing or opening one message.",
        (Label("operation", ("create", "encrypt", "decrypt")),),
        SESSION_DURATION_BUCKETS,
    ),
    Instrument(
        "session_message_size",
        "sage.session.message_size",
        Kind.HISTOGRAM,
        "By",
        "Plaintext size of messages sealed (outbound) or opened (inbound) by sessions.",
        (Label("direction", ("inbound", "outbound")),),
        MESSAGE_SIZE_BUCKETS,
    ),
    # Handshakes
    Instrument(
        "handshakes_initiated",
        "sage.handshakes.initiated",
        Kind.COUNTER,
        "{handshake}",
        "Handshakes started, by role.",
        (Label("role", ("client", "server")),),
    ),
    Instrument(
        "handshakes_completed",
        "sage.handshakes.completed",
        Kind.COUNTER,
        "{handshake}",
        "Handshakes finished, by outcome.",
        (Label("status", SUCCESS_FAILURE),),
    ),
    Instrument(
        "handshakes_failed",
        "sage.handshakes.failed",
        Kind.COUNTER,
        "{handshake}",
        "Failed handshakes, by error category.",
        (Label("error_type", HANDSHAKE_ERROR_TYPES),),
    ),
    Instrument(
        "handshake_duration",
        "sage.handshake.duration",
        Kind.HISTOGRAM,
        "s",
        "Duration of each handshake stage.",
        (Label("stage", ("init", "process", "finalize")),),
        HANDSHAKE_BUCKETS,
    ),
    # Crypto
    Instrument(
        "crypto_operations",
        "sage.crypto.operations",
        Kind.COUNTER,
        "{operation}",
        "Cryptographic operations, by operation and algorithm.",
        (Label("operation", CRYPTO_OPERATIONS), Label("algorithm", ALGORITHMS)),
    ),
    Instrument(
        "crypto_errors",
        "sage.crypto.errors",
        Kind.COUNTER,
        "{error}",
        "Failed cryptographic operations (bad signature, failed authentication).",
        (Label("operation", CRYPTO_OPERATIONS),),
    ),
    Instrument(
        "crypto_operation_duration",
        "sage.crypto.operation.duration",
        Kind.HISTOGRAM,
        "s",
        "Duration of one cryptographic operation.",
        (Label("operation", CRYPTO_OPERATIONS),),
        CRYPTO_BUCKETS,
    ),
    # DIDs
    Instrument(
        "did_resolutions",
        "sage.did.resolutions",
        Kind.COUNTER,
        "{resolution}",
        "DID resolutions, by chain and outcome.",
        (Label("chain", CHAINS), Label("status", SUCCESS_FAILURE)),
    ),
    Instrument(
        "did_registrations",
        "sage.did.registrations",
        Kind.COUNTER,
        "{registration}",
        "DID registrations, by chain and outcome.",
        (Label("chain", CHAINS), Label("status", SUCCESS_FAILURE)),
    ),
    Instrument(
        "did_resolution_duration",
        "sage.did.resolution.duration",
        Kind.HISTOGRAM,
        "s",
        "Duration of a DID resolution, cache hits included.",
        (Label("chain", CHAINS),),
        DID_RESOLUTION_BUCKETS,
    ),
    # Messages
    Instrument(
        "messages_processed",
        "sage.messages.processed",
        Kind.COUNTER,
        "{message}",
        "Inbound session messages validated and opened, by type and outcome.",
        (Label("type", ("text", "binary")), Label("status", SUCCESS_FAILURE)),
    ),
    Instrument(
        "replay_attacks_detected",
        "sage.replay_attacks.detected",
        Kind.COUNTER,
        "{attack}",
        "Messages or handshakes refused because their nonce was already seen.",
    ),
    Instrument(
        "nonce_validations",
        "sage.nonce.validations",
        Kind.COUNTER,
        "{validation}",
        "Nonce checks: valid, invalid (seen before) or expired (outside the window).",
        (Label("status", ("valid", "invalid", "expired")),),
    ),
    Instrument(
        "message_processing_duration",
        "sage.message.processing.duration",
        Kind.HISTOGRAM,
        "s",
        "Time to validate and open one inbound message.",
        (),
        PROCESSING_BUCKETS,
    ),
    Instrument(
        "message_size",
        "sage.message.size",
        Kind.HISTOGRAM,
        "By",
        "Wire size of inbound messages (nonce, ciphertext and tag).",
        (),
        MESSAGE_SIZE_BUCKETS,
    ),
    # Requests
    Instrument(
        "requests_refused",
        "sage.requests.refused",
        Kind.COUNTER,
        "{request}",
        "Requests a server agent refused with a typed error, by category (limits: overload).",
        (Label("category", REFUSAL_CATEGORIES),),
    ),
    Instrument(
        "server_requests",
        "sage.server.requests",
        Kind.COUNTER,
        "{request}",
        "SAGE requests a server agent finished, by operation and outcome: served, refused"
        " (the request's own doing: malformed, unauthenticated, unknown, replayed, expired, over"
        " its peer's limits) or failed (the server's: its capacity, an internal error, a"
        " timeout). What the SLOs count: a peer cannot make the server look broken.",
        (
            Label("operation", SERVER_OPERATIONS),
            Label("outcome", ("served", "refused", "failed")),
        ),
    ),
)

BY_KEY: dict[str, Instrument] = {instrument.key: instrument for instrument in INSTRUMENTS}
BY_PROMETHEUS_NAME: dict[str, Instrument] = {i.prometheus_name: i for i in INSTRUMENTS}
