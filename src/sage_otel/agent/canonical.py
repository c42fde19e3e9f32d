"""Protocol bytes: every JSON document that is signed or compared comes from here.

Two canonical forms exist in SAGE, and neither is ``json.dumps``' default:

* :func:`go_json` writes what Go's ``encoding/json`` writes: compact, HTML-safe escaping
  (``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\uXXXX``), members in the order given (a Go
  struct) or sorted (a Go map). The handshake payload, the signed handshake answer and the
  HTTP envelopes are these bytes on the reference's side, so they must be ours too.
* :func:`jcs` is RFC 8785 (JSON Canonicalization Scheme), used for A2A agent-card proofs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import rfc8785

from .errors import InvalidMessageError

__all__ = ["go_json", "jcs", "loads", "loads_ieee"]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_RAW_SURROGATE = re.compile("[\ud800-\udfff]")

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_SPECIAL = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def _go_escape(match: re.Match[str]) -> str:
    # A lone surrogate is not UTF-8; Go replaces any invalid sequence with U+FFFD.
    return _GO_ESCAPES.get(match.group(), "\\ufffd")


def go_json(value: object, *, sort_keys: bool = False) -> bytes:
    """``json.Marshal(value)`` as Go writes it.

    Objects keep their insertion order (build them in the Go struct's field order, leaving
    out ``omitempty`` fields yourself), or are sorted with ``sort_keys`` (a Go map). The
    replacement is safe on the whole text: outside strings, compact JSON has none of
    those characters.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
    return _GO_SPECIAL.sub(_go_escape, text).encode()


def loads(data: str | bytes, **options: object) -> object:
    """``json.loads`` for untrusted input: strict UTF-8, and no lone surrogate anywhere.

    Python's parser would accept both a raw surrogate (bytes ``ED A0 80``, decoded with
    ``surrogatepass``) and an escaped one (``"\\ud800"``); neither is a string UTF-8 or Go
    can hold, and the first ``.encode()`` downstream would fail. Raises ``ValueError`` (or
    ``RecursionError`` for absurd nesting) like ``json.loads``.
    """
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if _RAW_SURROGATE.search(text):
        raise ValueError("JSON text holds a lone surrogate")
    value = json.loads(text, **options)
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("JSON string holds a lone surrogate") from exc
    return value


def loads_ieee(text: str | bytes) -> object:
    """JSON as RFC 8785 reads it: every number an IEEE 754 double (so 1e21 and 10**21 agree)."""
    return loads(text, parse_int=float)


def jcs(value: Mapping[str, object] | list[object] | object) -> bytes:
    """RFC 8785 canonical JSON; what has no canonical form is an InvalidMessageError."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, UnicodeEncodeError) as exc:
        raise InvalidMessageError("no RFC 8785 form", code="not_canonicalizable") from exc
