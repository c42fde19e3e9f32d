"""Typed SAGE errors.

Every failure carries a machine-readable ``code`` (sent to peers in 4xx answers), an HTTP
status, and a ``category`` from a small closed set, so that telemetry can use it as a
bounded label without ever looking at the message text.
"""

from __future__ import annotations

from enum import Enum


class ErrorCategory(str, Enum):
    TIMEOUT = "timeout"
    INVALID = "invalid"
    NETWORK = "network"
    REPLAY = "replay"
    EXPIRED = "expired"
    UNKNOWN_DID = "unknown_did"
    SIGNATURE = "signature"
    CRYPTO = "crypto"
    OVERLOAD = "overload"
    INTERNAL = "internal"


class SageError(Exception):
    code = "sage_error"
    category = ErrorCategory.INTERNAL
    http_status = 500

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.code)
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "category": self.category.value, "message": str(self)}


class InvalidMessageError(SageError):
    """Malformed input: bad JSON, wrong types, bad base64, missing fields."""

    code = "invalid_message"
    category = ErrorCategory.INVALID
    http_status = 400


class PayloadTooLargeError(InvalidMessageError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaTypeError(InvalidMessageError):
    code = "unsupported_media_type"
    http_status = 415


class HeadersTooLargeError(InvalidMessageError):
    """Over the HTTP edge's header byte or count cap (:mod:`.edge`)."""

    code = "headers_too_large"
    http_status = 431


class RequestTimeoutError(SageError):
    """The header block (``header_timeout``) or the body (``body_timeout``) came too late."""

    code = "header_timeout"
    category = ErrorCategory.TIMEOUT
    http_status = 408


class MalformedHttpError(InvalidMessageError):
    """What the HTTP parser refuses before the app runs (:mod:`.edge`)."""

    code = "malformed_http"


class TimestampSkewError(InvalidMessageError):
    code = "timestamp_skew"


class SequenceError(InvalidMessageError):
    code = "out_of_order"
    http_status = 409


class SignatureError(SageError):
    code = "bad_signature"
    category = ErrorCategory.SIGNATURE
    http_status = 401


class CryptoError(SageError):
    """A cryptographic operation failed (AEAD open, low-order point, bad key)."""

    code = "crypto_failure"
    category = ErrorCategory.CRYPTO
    http_status = 400


class ReplayError(SageError):
    code = "replay_detected"
    category = ErrorCategory.REPLAY
    http_status = 409


class UnknownDIDError(SageError):
    code = "unknown_did"
    category = ErrorCategory.UNKNOWN_DID
    http_status = 403


class InactiveAgentError(UnknownDIDError):
    code = "inactive_agent"


class RegistrationError(SageError):
    code = "registration_rejected"
    category = ErrorCategory.INVALID
    http_status = 400


class SessionNotFoundError(SageError):
    code = "unknown_session"
    category = ErrorCategory.EXPIRED
    http_status = 404


class SessionExpiredError(SageError):
    """The session passed its max age, idle timeout or message limit, or was closed."""

    code = "session_expired"
    category = ErrorCategory.EXPIRED
    http_status = 410


class OverloadError(SageError):
    """A limit was reached: try again after ``retry_after`` seconds (sent as Retry-After)."""

    code = "overloaded"
    category = ErrorCategory.OVERLOAD
    http_status = 503

    def __init__(self, message: str = "", *, code: str | None = None, retry_after: float = 1.0):
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after + 0.999))


class RateLimitedError(OverloadError):
    """This peer's own limit was reached; other peers are unaffected."""

    code = "rate_limited"
    http_status = 429


class InternalError(SageError):
    """An unexpected failure inside the agent: logged and counted, answered without detail."""

    code = "internal_error"


class HandshakeTimeoutError(SageError):
    code = "handshake_timeout"
    category = ErrorCategory.TIMEOUT
    http_status = 504


class NetworkError(SageError):
    code = "network_error"
    category = ErrorCategory.NETWORK
    http_status = 502


class PeerError(SageError):
    """The peer answered with a typed error; ``code`` and ``category`` are the peer's."""

    def __init__(self, message: str, *, code: str, category: str, http_status: int) -> None:
        super().__init__(message, code=code)
        try:
            self.category = ErrorCategory(category)
        except ValueError:
            self.category = ErrorCategory.INTERNAL
        self.http_status = http_status


_SERVER_CATEGORIES = (ErrorCategory.INTERNAL, ErrorCategory.TIMEOUT, ErrorCategory.NETWORK)


def server_fault(exc: BaseException) -> bool:
    """Whether a server's failure to serve a request is its own (and counts against its
    objectives) rather than the request's: malformed, unauthenticated, unknown, replayed,
    expired, or over its own peer's limits. A peer cannot make the server look broken."""
    if isinstance(exc, OverloadError):  # 503: the server is full for whoever asks; 429
        return not isinstance(exc, RateLimitedError)  # (rate limited): the asker's share
    if isinstance(exc, RequestTimeoutError):  # a client too slow to send its request
        return False
    if isinstance(exc, SageError):
        return exc.category in _SERVER_CATEGORIES
    return True  # a defect


def category_of(exc: BaseException) -> ErrorCategory:
    """Bounded category for any exception; foreign exceptions are ``internal``."""
    if isinstance(exc, SageError):
        return exc.category
    if isinstance(exc, TimeoutError):
        return ErrorCategory.TIMEOUT
    if isinstance(exc, (ConnectionError, OSError)):
        return ErrorCategory.NETWORK
    return ErrorCategory.INTERNAL


# The SAGE Go reference answers every failure with free text and no code. These prefixes
# are its handshake server's and transport's texts (v1.5.2); anything else is ``peer_error``.
_GO_ERROR_TEXTS = (
    ("signature verification failed", "bad_signature", ErrorCategory.SIGNATURE),
    ("authentication failed", "did_mismatch", ErrorCategory.SIGNATURE),
    ("cannot resolve sender pubkey", "unknown_did", ErrorCategory.UNKNOWN_DID),
    ("replay detected", "handshake_replay", ErrorCategory.REPLAY),
    ("ts out of window", "timestamp_skew", ErrorCategory.INVALID),
    ("info mismatch", "bad_handshake", ErrorCategory.INVALID),
    ("exportCtx mismatch", "bad_handshake", ErrorCategory.INVALID),
    ("parse payload", "bad_handshake", ErrorCategory.INVALID),
    ("hpke open", "crypto_failure", ErrorCategory.CRYPTO),
    ("invalid ECDH", "crypto_failure", ErrorCategory.CRYPTO),
    ("unsupported task", "unknown_task", ErrorCategory.INVALID),
    ("payload is required", "missing_field", ErrorCategory.INVALID),
    ("invalid JSON", "malformed_json", ErrorCategory.INVALID),
)


def peer_error_from_text(text: str, http_status: int) -> PeerError:
    """A typed error for a peer that answered only with text (the Go reference's shape)."""
    for prefix, code, category in _GO_ERROR_TEXTS:
        if text.startswith(prefix):
            return PeerError(
                text[:200], code=code, category=category.value, http_status=http_status
            )
    return PeerError(text[:200], code="peer_error", category="internal", http_status=http_status)
