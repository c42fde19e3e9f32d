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


def category_of(exc: BaseException) -> ErrorCategory:
    """Bounded category for any exception; foreign exceptions are ``internal``."""
    if isinstance(exc, SageError):
        return exc.category
    if isinstance(exc, TimeoutError):
        return ErrorCategory.TIMEOUT
    if isinstance(exc, (ConnectionError, OSError)):
        return ErrorCategory.NETWORK
    return ErrorCategory.INTERNAL
