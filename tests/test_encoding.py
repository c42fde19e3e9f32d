from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sage_otel.agent.encoding import (
    b64std,
    b64url,
    format_rfc3339,
    from_b64std,
    from_b64url,
    parse_rfc3339,
)
from sage_otel.agent.errors import InvalidMessageError

MAX_NS = 253402300799 * 1_000_000_000 + 999_999_999  # 9999-12-31T23:59:59.999999999Z
B64_NOISE = st.text(alphabet=string.ascii_letters + string.digits + "+/-_=\n .:", max_size=40)


@given(st.binary(max_size=200))
def test_b64url_round_trip_is_unpadded_and_url_safe(data: bytes) -> None:
    text = b64url(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert from_b64url(text) == data


@given(st.binary(max_size=200))
def test_b64std_round_trip_matches_stdlib(data: bytes) -> None:
    text = b64std(data)
    assert text == base64.b64encode(data).decode()
    assert from_b64std(text) == data


@pytest.mark.parametrize(
    "value",
    [None, 5, b"AAAA", "AA==", "AB+/", "A", "AAAAA", "AAA\n", "AAAAAA\n", " AAAA", "AA AA"],
)
def test_from_b64url_rejects(value: object) -> None:
    with pytest.raises(InvalidMessageError) as info:
        from_b64url(value, "field")
    assert info.value.code == "bad_base64"
    assert "field" in str(info.value)


@pytest.mark.parametrize(
    "value", [None, 7, b"AAAA", "AAA", "AB-_", "A===", "AAAA\n", "AAA\n", "=AAA", "AA=A"]
)
def test_from_b64std_rejects(value: object) -> None:
    with pytest.raises(InvalidMessageError) as info:
        from_b64std(value)
    assert info.value.code == "bad_base64"


@given(B64_NOISE)
def test_base64_decoders_only_raise_invalid_message(text: str) -> None:
    for decode in (from_b64url, from_b64std):
        try:
            assert isinstance(decode(text), bytes)
        except InvalidMessageError as exc:
            assert exc.code == "bad_base64"


def test_format_rfc3339_known_values() -> None:
    # Go's time.RFC3339Nano: trailing zeros of the fraction dropped, then the fraction
    assert format_rfc3339(0) == "1970-01-01T00:00:00Z"
    assert format_rfc3339(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert format_rfc3339(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"


def test_format_rfc3339_defaults_to_now() -> None:
    import time

    before = time.time_ns()
    stamp = parse_rfc3339(format_rfc3339())
    assert before <= stamp <= time.time_ns()


@given(st.integers(min_value=0, max_value=MAX_NS))
def test_rfc3339_round_trip_keeps_nanoseconds(ns: int) -> None:
    assert parse_rfc3339(format_rfc3339(ns)) == ns


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00Z", 1_704_067_200_000_000_000),
        ("2024-01-01t00:00:00z", 1_704_067_200_000_000_000),
        ("2024-01-01T01:00:00+01:00", 1_704_067_200_000_000_000),
        ("2023-12-31T23:30:00-00:30", 1_704_067_200_000_000_000),
        ("2024-01-01T00:00:00.5Z", 1_704_067_200_500_000_000),
        ("2024-01-01T00:00:00.000000001Z", 1_704_067_200_000_000_001),
    ],
)
def test_parse_rfc3339_accepts_offsets_and_fractions(text: str, expected: int) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        1704067200,
        "",
        "2024-01-01",
        "2024-01-01T00:00:00",
        "2024-01-01 00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:00:00+25:00",
        "2024-01-01T00:00:00.1234567890Z",
        "2024-01-01T00:00:00Z\n",
        " 2024-01-01T00:00:00Z",
    ],
)
def test_parse_rfc3339_rejects(text: object) -> None:
    with pytest.raises(InvalidMessageError) as info:
        parse_rfc3339(text, "ts")
    assert info.value.code == "bad_timestamp"
    assert "ts" in str(info.value)


@given(st.text(alphabet="0123456789-:TZtz+.\n ", max_size=40) | st.text(max_size=40))
def test_parse_rfc3339_on_arbitrary_text_returns_int_or_invalid(text: str) -> None:
    try:
        assert isinstance(parse_rfc3339(text), int)
    except InvalidMessageError as exc:
        assert exc.code == "bad_timestamp"
