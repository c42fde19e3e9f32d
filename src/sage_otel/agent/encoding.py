"""Wire encodings shared by the agent: base64 flavours and RFC 3339 timestamps."""

from __future__ import annotations

import base64
import binascii
import re
import time
from datetime import datetime, timedelta, timezone

from .errors import InvalidMessageError

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_B64STD = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def from_b64url(text: object, field: str = "value") -> bytes:
    """Decode unpadded base64url; anything else is an :class:`InvalidMessageError`."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidMessageError(f"{field}: not base64url", code="bad_base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64std(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_b64std(text: object, field: str = "value") -> bytes:
    if not isinstance(text, str) or len(text) % 4 or not _B64STD.fullmatch(text):
        raise InvalidMessageError(f"{field}: not base64", code="bad_base64")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:  # pragma: no cover - the regex already screens
        raise InvalidMessageError(f"{field}: not base64", code="bad_base64") from exc


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$"
)


def format_rfc3339(ns: int | None = None) -> str:
    """UTC RFC 3339 as Go's ``time.RFC3339Nano`` writes it: trailing zeros of the fraction
    dropped, and the fraction with them when it is zero."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def parse_rfc3339(text: object, field: str = "timestamp") -> int:
    """Parse RFC 3339 (up to nanoseconds) to Unix nanoseconds."""
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise InvalidMessageError(f"{field}: not an RFC 3339 timestamp", code="bad_timestamp")
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        tz = timezone.utc
        if offset not in ("Z", "z"):
            sign = 1 if offset[0] == "+" else -1
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        )
    except ValueError as exc:
        raise InvalidMessageError(f"{field}: out of range", code="bad_timestamp") from exc
    nanos = int((frac or "0").ljust(9, "0"))
    return int(moment.timestamp()) * 1_000_000_000 + nanos
