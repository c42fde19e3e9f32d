from __future__ import annotations

import base64
import dataclasses
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_otel.agent.encoding import b64url, format_rfc3339
from sage_otel.agent.envelope import CLOSE_TASK, MESSAGE_TASK
from sage_otel.agent.errors import (
    CryptoError,
    InvalidMessageError,
    ReplayError,
    SageError,
    SequenceError,
    SessionExpiredError,
    SignatureError,
    TimestampSkewError,
)
from sage_otel.agent.keyschedule import session_id
from sage_otel.agent.message import (
    NONCE_TTL,
    TIMESTAMP_TOLERANCE,
    MessageType,
    MessageValidator,
    NonceCache,
    NonceStatus,
    SecureMessage,
    seal,
    signature_base,
)
from sage_otel.agent.session import Role, Session, SessionLimits

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)


class Link:
    """Both ends of one session, with a validator for each side on the shared clock."""

    def __init__(self, clock, b_limits: SessionLimits | None = None) -> None:
        seed = os.urandom(32)
        sid = session_id(seed)
        limits = SessionLimits(max_age=1e9, idle_timeout=1e9, max_messages=10_000)
        self.clock = clock
        self.a = Session(sid, Role.INITIATOR, seed, peer_did="b", kid="k", limits=limits)
        self.b = Session(
            sid, Role.RESPONDER, seed, peer_did="a", kid="k", limits=b_limits or limits
        )
        self.a_validator = MessageValidator(clock=clock)
        self.b_validator = MessageValidator(clock=clock)

    def send(self, data: str | bytes, **kwargs) -> SecureMessage:
        kwargs.setdefault("now_ns", self.clock.ns)
        return seal(self.a, data, **kwargs)

    def receive(self, message: SecureMessage, **kwargs) -> str | bytes:
        return self.b_validator.open(self.b, message, **kwargs)


@pytest.fixture
def link(clock) -> Link:
    return Link(clock)


def resign(session: Session, message: SecureMessage, method="POST", path="/messages"):
    return dataclasses.replace(
        message, signature=session.sign(signature_base(message, method, path))
    )


@pytest.mark.parametrize("text", ["hello", "", "héllo wörld ✓", "x" * 10_000])
def test_text_round_trip(link: Link, text: str) -> None:
    message = link.send(text)
    assert message.type is MessageType.TEXT
    assert text.encode() not in message.ciphertext or text == ""
    opened = link.receive(message)
    assert opened == text and isinstance(opened, str)


@pytest.mark.parametrize("data", [b"", bytes(range(256)), os.urandom(5000), "ü".encode()])
def test_binary_round_trip(link: Link, data: bytes) -> None:
    message = link.send(data)
    assert message.type is MessageType.BINARY
    opened = link.receive(message)
    assert opened == data and isinstance(opened, bytes)


def test_wire_form_round_trip_and_metadata(link: Link) -> None:
    message = link.send("wire")
    wire = message.to_wire()
    meta = wire["metadata"]
    assert base64.b64decode(wire["payload"]) == message.ciphertext
    digest = base64.b64encode(hashlib.sha256(message.ciphertext).digest()).decode()
    assert meta["content-digest"] == f"sha-256=:{digest}:"
    assert meta["seq"] == "1" and meta["type"] == "text"
    assert all(isinstance(value, str) for value in meta.values())  # as the reference requires
    assert meta["nonce"] == b64url(message.nonce) and len(message.nonce) == 16
    assert meta["timestamp"] == format_rfc3339(link.clock.ns)
    assert f"created={int(link.clock.now)}" in meta["signature-input"]
    assert 'alg="hmac-sha256"' in meta["signature-input"]
    assert meta["signature"] == f"sig1=:{base64.b64encode(message.signature).decode()}:"
    parsed = SecureMessage.from_wire(message.session_id, wire["payload"], meta)
    assert parsed == message
    assert link.receive(parsed) == "wire"


def test_sequence_numbers_increase_and_nonces_are_fresh(link: Link) -> None:
    messages = [link.send("m") for _ in range(5)]
    assert [m.seq for m in messages] == [1, 2, 3, 4, 5]
    assert len({m.nonce for m in messages}) == 5
    for m in messages:
        assert link.receive(m) == "m"
    assert link.b.last_recv_seq == 5


def test_reply_direction_and_method_binding(link: Link) -> None:
    reply = seal(link.b, "answer", method="RESPONSE", now_ns=link.clock.ns)
    assert link.a_validator.open(link.a, reply, method="RESPONSE") == "answer"
    other = seal(link.b, "answer", method="RESPONSE", now_ns=link.clock.ns)
    with pytest.raises(SignatureError):
        link.a_validator.open(link.a, other, method="POST")
    with pytest.raises(SignatureError):
        link.a_validator.open(link.a, other, method="RESPONSE", path="/other")
    # A message cannot be reflected back to its sender.
    with pytest.raises(SignatureError):
        link.a_validator.open(link.a, link.send("mine"))


def test_signature_base_covers_every_field_that_selects_an_action() -> None:
    """The native profile's signature base, pinned: task id included (issue 16)."""
    message = SecureMessage(
        session_id="sid-1",
        seq=7,
        nonce=bytes(range(16)),
        timestamp_ns=1_700_000_000_123_456_789,
        type=MessageType.TEXT,
        ciphertext=b"\x00" * 28,
        signature=b"",
    )
    assert signature_base(message, "POST", "/messages", CLOSE_TASK).decode() == (
        '"@method": POST\n'
        '"@path": /messages\n'
        '"x-sage-context-id": sid-1\n'
        '"x-sage-task-id": sage/close@v1\n'
        '"content-digest": sha-256=:Ot37FBzXycTGVDqCGRo3B6wpx6BBIXeC5h1NkcaRrug=:\n'
        '"sage-seq": 7\n'
        '"sage-nonce": AAECAwQFBgcICQoLDA0ODw\n'
        '"sage-type": text\n'
        '"sage-timestamp": 1700000000123456789\n'
        '"@signature-params": ("@method" "@path" "x-sage-context-id" "x-sage-task-id" '
        '"content-digest" "sage-seq" "sage-nonce" "sage-type" "sage-timestamp")'
        ';created=1700000000;alg="hmac-sha256"'
    )
    assert signature_base(message, "POST", "/messages") == signature_base(
        message, "POST", "/messages", MESSAGE_TASK
    )


@pytest.mark.parametrize(
    ("sent", "relabelled"), [(MESSAGE_TASK, CLOSE_TASK), (CLOSE_TASK, MESSAGE_TASK)]
)
def test_a_relabelled_task_fails_the_signature_and_spends_nothing(
    link: Link, sent: str, relabelled: str
) -> None:
    message = link.send("act on me", task_id=sent)
    with pytest.raises(SignatureError):
        link.receive(message, task_id=relabelled)
    assert link.b.last_recv_seq == 0 and len(link.b_validator.nonces(link.b)) == 0
    assert link.receive(message, task_id=sent) == "act on me"


def test_a_copy_that_fails_to_open_does_not_spend_the_genuine_messages_nonce(link: Link) -> None:
    """Replay state is committed only once the payload opened. Natively a copy that passes
    the MAC but not the AEAD needs the key (the MAC covers the ciphertext's digest), so this
    is defence in depth; the go profile's unkeyed payload makes it an attack there."""
    message = link.send("genuine")
    flipped = message.ciphertext[:-1] + bytes([message.ciphertext[-1] ^ 1])
    with pytest.raises(CryptoError):
        link.receive(resign(link.a, dataclasses.replace(message, ciphertext=flipped)))
    assert link.b.message_count == 0 and link.b.last_recv_seq == 0
    assert link.receive(message) == "genuine"
    with pytest.raises(ReplayError):
        link.receive(message)


def test_replay_is_refused(link: Link) -> None:
    message = link.send("once")
    assert link.receive(message) == "once"
    with pytest.raises(ReplayError) as info:
        link.receive(message)
    assert info.value.code == "replay_detected" and info.value.http_status == 409
    later = link.send("later")
    assert link.receive(later) == "later"
    with pytest.raises(ReplayError):
        link.receive(message)


@pytest.mark.parametrize("offset", [TIMESTAMP_TOLERANCE + 1, -(TIMESTAMP_TOLERANCE + 1), 3600])
def test_skewed_timestamp_is_refused(link: Link, offset: float) -> None:
    message = link.send("skewed", now_ns=link.clock.ns + int(offset * 1e9))
    with pytest.raises(TimestampSkewError) as info:
        link.receive(message)
    assert info.value.code == "timestamp_skew"
    # The refusal does not consume the nonce or the sequence number.
    assert link.b.last_recv_seq == 0 and len(link.b_validator.nonces(link.b)) == 0


@pytest.mark.parametrize("offset", [TIMESTAMP_TOLERANCE - 1, -(TIMESTAMP_TOLERANCE - 1)])
def test_timestamp_within_tolerance_is_accepted(link: Link, offset: float) -> None:
    assert link.receive(link.send("ok", now_ns=link.clock.ns + int(offset * 1e9))) == "ok"


def test_message_received_late_is_refused(link: Link) -> None:
    message = link.send("slow")
    link.clock.advance(TIMESTAMP_TOLERANCE + 0.5)
    with pytest.raises(TimestampSkewError):
        link.receive(message)


def test_out_of_order_sequence_is_refused(link: Link) -> None:
    first, second = link.send("1"), link.send("2")
    assert link.receive(second) == "2"
    with pytest.raises(SequenceError) as info:
        link.receive(first)
    assert info.value.code == "out_of_order" and info.value.http_status == 409
    assert link.receive(link.send("3")) == "3"


def test_tampered_ciphertext_with_valid_digest_and_signature_fails_decryption(link: Link) -> None:
    message = link.send("secret")
    flipped = bytearray(message.ciphertext)
    flipped[-1] ^= 0x01
    forged = resign(link.a, dataclasses.replace(message, ciphertext=bytes(flipped)))
    # The forged message passes the wire checks (digest recomputed, signature valid) ...
    wire = forged.to_wire()
    parsed = SecureMessage.from_wire(forged.session_id, wire["payload"], wire["metadata"])
    # ... and is refused only by the AEAD.
    with pytest.raises(CryptoError) as info:
        link.receive(parsed)
    assert info.value.code == "decrypt_failed"


def test_truncated_ciphertext_with_valid_signature(link: Link) -> None:
    message = link.send("secret")
    forged = resign(link.a, dataclasses.replace(message, ciphertext=message.ciphertext[:20]))
    with pytest.raises(CryptoError) as info:
        link.receive(forged)
    assert info.value.code == "truncated_ciphertext"


def test_tampered_payload_on_the_wire_fails_digest(link: Link) -> None:
    wire = link.send("secret").to_wire()
    payload = bytearray(base64.b64decode(wire["payload"]))
    payload[0] ^= 0x01
    with pytest.raises(SignatureError) as info:
        SecureMessage.from_wire("sid", base64.b64encode(bytes(payload)).decode(), wire["metadata"])
    assert info.value.code == "digest_mismatch"


@pytest.mark.parametrize(
    "change",
    [
        lambda m: {"ciphertext": m.ciphertext[:-1] + bytes([m.ciphertext[-1] ^ 1])},
        lambda m: {"seq": m.seq + 1},
        lambda m: {"nonce": os.urandom(16)},
        lambda m: {"type": MessageType.BINARY},
        lambda m: {"timestamp_ns": m.timestamp_ns + 5 * 10**9},
        lambda m: {"timestamp_ns": m.timestamp_ns + 1},  # sub-second changes are signed too
        lambda m: {"session_id": "another-session"},
        lambda m: {"signature": bytes(32)},
        lambda m: {"signature": m.signature[:-1]},
    ],
)
def test_tampered_without_resigning_fails_signature(link: Link, change) -> None:
    message = link.send("secret")
    with pytest.raises(SignatureError) as info:
        link.receive(dataclasses.replace(message, **change(message)))
    assert info.value.code == "bad_signature"
    assert link.b.last_recv_seq == 0
    assert link.receive(message) == "secret"


def test_message_from_another_session_is_refused(clock) -> None:
    one, two = Link(clock), Link(clock)
    message = one.send("for one")
    with pytest.raises(SignatureError):
        two.receive(dataclasses.replace(message, session_id=two.a.id))


def test_session_limit_applies_to_received_messages(clock) -> None:
    link = Link(clock, b_limits=SessionLimits(max_messages=2))
    for _ in range(2):
        assert link.receive(link.send("x")) == "x"
    assert link.b.message_count == 2
    with pytest.raises(SessionExpiredError):
        link.receive(link.send("x"))


@pytest.mark.parametrize(
    ("payload", "metadata", "code"),
    [
        ("", None, "bad_metadata"),
        ("", [], "bad_metadata"),
        ("", {"seq": 0}, "bad_metadata"),
        ("", {"seq": -1}, "bad_metadata"),
        ("", {"seq": True}, "bad_metadata"),
        ("", {"seq": 1}, "bad_metadata"),
        ("", {"seq": "0"}, "bad_metadata"),
        ("", {"seq": "01"}, "bad_metadata"),
        ("", {"seq": "-1"}, "bad_metadata"),
        ("", {"seq": "1.0"}, "bad_metadata"),
        ("", {"seq": "9" * 19}, "bad_metadata"),
        ("", {"seq": "1", "nonce": b64url(bytes(15))}, "bad_metadata"),
        ("", {"seq": "1", "nonce": "!!!"}, "bad_base64"),
        ("", {"seq": "1", "nonce": b64url(bytes(16)) + "\n"}, "bad_base64"),
        ("", {"seq": "1", "nonce": b64url(bytes(16)), "type": "video"}, "bad_metadata"),
        ("", {"seq": "1", "nonce": b64url(bytes(16)), "type": ["text"]}, "bad_metadata"),
    ],
)
def test_from_wire_rejects_malformed_metadata(payload, metadata, code: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        SecureMessage.from_wire("sid", payload, metadata)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("field", "value", "error", "code"),
    [
        ("signature", "sig2=:AAAA:", InvalidMessageError, "bad_signature_field"),
        ("signature", "AAAA", InvalidMessageError, "bad_signature_field"),
        ("signature", 7, InvalidMessageError, "bad_signature_field"),
        ("signature", "sig1=:***:", InvalidMessageError, "bad_base64"),
        ("timestamp", "now", InvalidMessageError, "bad_timestamp"),
        ("timestamp", None, InvalidMessageError, "bad_timestamp"),
        ("content-digest", "sha-256=:AAAA:", SignatureError, "digest_mismatch"),
        ("content-digest", None, SignatureError, "digest_mismatch"),
        ("payload", "***", InvalidMessageError, "bad_base64"),
        ("payload", None, InvalidMessageError, "bad_base64"),
    ],
)
def test_from_wire_rejects_bad_fields(link: Link, field, value, error, code) -> None:
    wire = link.send("x").to_wire()
    payload, metadata = wire["payload"], dict(wire["metadata"])
    if field == "payload":
        payload = value
    else:
        metadata[field] = value
    with pytest.raises(error) as info:
        SecureMessage.from_wire("sid", payload, metadata)
    assert info.value.code == code


def _sample_wire() -> dict:
    seed = bytes(range(32))
    sender = Session(
        session_id(seed), Role.INITIATOR, seed, peer_did="b", kid="k", limits=SessionLimits()
    )
    return seal(sender, "x", now_ns=1_700_000_000 * 10**9).to_wire()


_GOOD = _sample_wire()
METADATA_LIKE = st.fixed_dictionaries(
    {},
    optional={
        key: st.one_of(st.just(value), JSON, st.text(max_size=30))
        for key, value in _GOOD["metadata"].items()
    },
)


@settings(max_examples=300)
@given(st.one_of(st.just(_GOOD["payload"]), JSON), st.one_of(METADATA_LIKE, JSON))
def test_from_wire_on_arbitrary_input_parses_or_raises_sage_error(payload, metadata) -> None:
    try:
        message = SecureMessage.from_wire("sid", payload, metadata)
    except SageError as exc:
        assert isinstance(exc, (InvalidMessageError, SignatureError))
        return
    assert isinstance(message, SecureMessage)
    assert message.content_digest == metadata["content-digest"]


# -- NonceCache ---------------------------------------------------------------------------


def test_nonce_cache_detects_replays_until_ttl(clock) -> None:
    cache = NonceCache(ttl=NONCE_TTL, clock=clock)
    now = clock.now
    assert cache.check(b"n1", now) is NonceStatus.VALID
    cache.mark(b"n1")
    assert cache.check(b"n1", now) is NonceStatus.INVALID
    assert cache.check(b"n2", now) is NonceStatus.VALID
    clock.advance(NONCE_TTL - 1)
    assert cache.check(b"n1", now) is NonceStatus.INVALID
    clock.advance(1)
    # Past the TTL the entry is pruned, and its timestamp is too old to vouch for.
    assert cache.check(b"n1", now) is NonceStatus.EXPIRED
    assert len(cache) == 0


def test_nonce_cache_refuses_stale_timestamps(clock) -> None:
    cache = NonceCache(ttl=60.0, clock=clock)
    assert cache.check(b"x", clock.now - 60.0) is NonceStatus.EXPIRED
    assert cache.check(b"x", clock.now - 59.0) is NonceStatus.VALID


def test_nonce_cache_hard_bound_evicts_oldest_and_raises_floor(clock) -> None:
    cache = NonceCache(ttl=NONCE_TTL, max_size=3, clock=clock)
    stamps = {}
    for i in range(5):
        key = b"k%d" % i
        stamps[key] = clock.now
        assert cache.check(key, clock.now) is NonceStatus.VALID
        cache.mark(key)
        clock.advance(1.0)
        assert len(cache) <= 3
    assert len(cache) == 3
    assert cache.floor == stamps[b"k1"]
    for key in (b"k0", b"k1"):
        assert cache.check(key, stamps[key]) is NonceStatus.EXPIRED
    for key in (b"k2", b"k3", b"k4"):
        assert cache.check(key, stamps[key]) is NonceStatus.INVALID
    assert cache.check(b"new", clock.now) is NonceStatus.VALID


def test_nonce_cache_eviction_covers_timestamps_ahead_of_the_clock(clock) -> None:
    cache = NonceCache(ttl=NONCE_TTL, max_size=2, clock=clock)
    ahead = clock.now + 10.0  # a sender whose clock runs ahead, within tolerance
    cache.mark(b"ahead", ahead)
    for key in (b"b", b"c"):
        clock.advance(1.0)
        cache.mark(key, clock.now)
    assert b"ahead" not in cache._seen
    assert cache.check(b"ahead", ahead) is NonceStatus.EXPIRED


def test_nonce_cache_keeps_entries_for_timestamps_ahead_of_the_clock(clock) -> None:
    cache = NonceCache(ttl=100.0, clock=clock)
    ahead = clock.now + 20.0
    cache.mark(b"ahead", ahead)
    clock.advance(100.0)
    # Received 100 s ago, but its own timestamp is only 80 s old: still a replay.
    assert cache.check(b"ahead", ahead) is NonceStatus.INVALID


@settings(max_examples=200)
@given(
    st.integers(min_value=1, max_value=6),
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.floats(min_value=-30, max_value=30)),
        min_size=1,
        max_size=25,
    ),
)
def test_nonce_cache_never_revalidates_a_marked_nonce(max_size: int, steps) -> None:
    now = [1_000_000.0]
    ttl = 60.0
    cache = NonceCache(ttl=ttl, max_size=max_size, clock=lambda: now[0])
    marked: list[tuple[bytes, float]] = []
    for index, (delay, skew) in enumerate(steps):
        now[0] += delay
        key, stamp = b"n%d" % index, now[0] + skew
        if cache.check(key, stamp) is NonceStatus.VALID:
            cache.mark(key, stamp)
            marked.append((key, stamp))
        assert len(cache) <= max_size
        for old_key, old_stamp in marked:
            assert cache.check(old_key, old_stamp) is not NonceStatus.VALID


def test_replay_state_is_the_sessions_own_and_bounded_by_its_message_limit(clock) -> None:
    link = Link(clock, b_limits=SessionLimits(max_messages=4))
    messages = [link.send(f"m{i}", now_ns=link.clock.ns + i * 10**6) for i in range(3)]
    for index, message in enumerate(messages):
        assert link.receive(message) == f"m{index}"
    cache = link.b_validator.nonces(link.b)
    assert cache is link.b.replays.nonces and cache.max_size == 4 and len(cache) == 3
    assert link.b_validator.validate_nonce(link.b, messages[0]) is NonceStatus.INVALID
    with pytest.raises(ReplayError):
        link.receive(messages[2])
    link.b.close()
    assert link.b.replays is None  # dropped with the session


def test_one_sessions_flood_cannot_refuse_another_sessions_messages(clock) -> None:
    """The attack on a shared, bounded cache: a peer fills it with messages stamped ahead
    of the clock, raising its floor into the future. With per-session state it raises only
    its own session's floor."""
    roomy = SessionLimits(max_messages=200_000)
    attacker, victim = Link(clock, b_limits=roomy), Link(clock, b_limits=roomy)
    victim.b_validator = attacker.b_validator  # one server: one validator for both
    ahead = clock.ns + int((TIMESTAMP_TOLERANCE - 1) * 1e9)
    for i in range(2_000):
        attacker.receive(attacker.send("flood", now_ns=ahead + i))
    attacker.b.replays.nonces.max_size = 1_000  # and even if its own cache had to evict
    for i in range(1_500):
        attacker.receive(attacker.send("flood", now_ns=ahead + 10_000 + i))
    assert attacker.b.replays.nonces.floor * 1e9 > clock.ns  # its floor moved into the future
    assert victim.receive(victim.send("fresh", now_ns=clock.ns)) == "fresh"
