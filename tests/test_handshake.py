from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from sage_otel.agent import hpke
from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry
from sage_otel.agent.encoding import b64url, format_rfc3339, from_b64url, parse_rfc3339
from sage_otel.agent.errors import (
    CryptoError,
    InactiveAgentError,
    InvalidMessageError,
    ReplayError,
    SageError,
    SignatureError,
    TimestampSkewError,
    UnknownDIDError,
)
from sage_otel.agent.handshake import (
    TASK,
    VERSION,
    Initiator,
    PendingHandshake,
    Responder,
    answer_signed_bytes,
)
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.keyschedule import (
    ack_tag,
    build_export_ctx,
    build_info,
    combine_seed,
    session_id,
    transcript_hash,
    x25519_e2e,
)
from sage_otel.agent.message import MessageValidator, seal
from sage_otel.agent.replay import ScopedNonceCaches
from sage_otel.agent.session import Role, SessionManager

NewAgent = Callable[..., Awaitable[AgentIdentity]]


def sha256_b64(data: str) -> str:
    return b64url(hashlib.sha256(data.encode()).digest())


class Peers:
    """An initiator (alice) and a responder (bob), both registered, plus helpers."""

    def __init__(
        self,
        alice: AgentIdentity,
        bob: AgentIdentity,
        registry: InMemoryRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.alice, self.bob, self.registry = alice, bob, registry
        self.alice_sessions, self.bob_sessions = SessionManager(), SessionManager()
        self.initiator = Initiator(alice, self.alice_sessions)
        self.responder = Responder(bob, DIDResolver(registry), self.bob_sessions, clock=clock)

    def bob_doc(self) -> DIDDocument:
        return DIDDocument.for_identity(self.bob)

    def init(self) -> PendingHandshake:
        return self.initiator.init(self.bob_doc())

    async def process(self, pending: PendingHandshake, **override: object):
        request = pending.request
        args = {
            "sender_did": request.init_did,
            "payload": request.payload,
            "signature": request.signature,
        }
        args.update(override)
        return await self.responder.process(**args)

    def resign_request(self, fields: dict[str, str]) -> tuple[bytes, bytes]:
        payload = json.dumps(fields, separators=(",", ":")).encode()
        return payload, self.alice.signing_key.sign(payload)

    def resign_response(self, response: dict[str, str], signer: AgentIdentity | None = None):
        body = {k: v for k, v in response.items() if k != "sigB64"}
        signed = answer_signed_bytes(body)
        body["sigB64"] = b64url((signer or self.bob).signing_key.sign(signed))
        return body


@pytest.fixture
async def peers(registry: InMemoryRegistry, new_agent: NewAgent) -> Peers:
    return Peers(await new_agent(Chain.ETHEREUM), await new_agent(Chain.SOLANA), registry)


@pytest.mark.parametrize("alice_chain", [Chain.ETHEREUM, Chain.SOLANA])
@pytest.mark.parametrize("bob_chain", [Chain.ETHEREUM, Chain.SOLANA])
async def test_full_handshake_gives_matching_sessions(
    registry: InMemoryRegistry, new_agent: NewAgent, alice_chain: Chain, bob_chain: Chain
) -> None:
    p = Peers(await new_agent(alice_chain), await new_agent(bob_chain), registry)
    pending = p.init()
    response, bob_session = await p.process(pending)
    alice_session = p.initiator.finalize(pending, response)

    assert alice_session.id == bob_session.id
    assert len(alice_session.id) == 22
    assert alice_session.role is Role.INITIATOR and bob_session.role is Role.RESPONDER
    assert alice_session.kid == bob_session.kid == response["kid"]
    assert alice_session.peer_did == str(p.bob.did)
    assert bob_session.peer_did == str(p.alice.did)
    assert p.alice_sessions.get(alice_session.id) is alice_session
    assert p.bob_sessions.get(bob_session.id) is bob_session

    # The keys agree in both directions.
    assert bob_session.decrypt(alice_session.encrypt(b"ping")) == b"ping"
    assert alice_session.decrypt(bob_session.encrypt(b"pong")) == b"pong"
    message = seal(alice_session, "hello bob")
    assert MessageValidator().open(bob_session, message) == "hello bob"
    # The initiator's ephemeral secrets are wiped after finalize.
    assert pending.exporter == b"" and pending.eph_c_private is None


async def test_two_handshakes_give_distinct_sessions(peers: Peers) -> None:
    ids = set()
    for _ in range(2):
        pending = peers.init()
        response, _ = await peers.process(pending)
        ids.add(peers.initiator.finalize(pending, response).id)
    assert len(ids) == 2
    assert peers.alice_sessions.active_count == peers.bob_sessions.active_count == 2


async def test_request_fields_and_session_id_follow_the_key_schedule(peers: Peers) -> None:
    pending = peers.initiator.init(peers.bob_doc(), "ctx-fixed")
    fields = json.loads(pending.request.payload)
    alice, bob = str(peers.alice.did), str(peers.bob.did)
    assert set(fields) == {
        "initDid",
        "respDid",
        "info",
        "exportCtx",
        "nonce",
        "ts",
        "enc",
        "ephC",
        "profile",
    }
    assert fields["profile"] == "native"  # announced inside the signature
    assert list(fields) == sorted(fields)  # the reference marshals a map: keys sorted
    assert fields["initDid"] == alice and fields["respDid"] == bob
    assert fields["info"].encode() == build_info("ctx-fixed", alice, bob)
    assert fields["exportCtx"].encode() == build_export_ctx("ctx-fixed")
    assert uuid.UUID(fields["nonce"]).version == 4  # the reference's nonce is a UUIDv4
    assert abs(parse_rfc3339(fields["ts"]) / 1e9 - time.time()) < 5
    peers.alice.signing_key.verify(pending.request.payload, pending.request.signature)

    enc, eph_c = from_b64url(fields["enc"]), from_b64url(fields["ephC"])
    # The responder's side of HPKE yields the same exporter the initiator kept.
    receiver = hpke.setup_base_receiver(enc, peers.bob.kem.private, fields["info"].encode())
    assert receiver.export(fields["exportCtx"].encode(), 32) == pending.exporter
    exporter, eph_c_private = pending.exporter, pending.eph_c_private

    response, bob_session = await peers.process(pending)
    eph_s = from_b64url(response["ephS"])
    seed = combine_seed(exporter, x25519_e2e(eph_c_private, eph_s), fields["exportCtx"].encode())
    assert bob_session.id == session_id(seed)
    th = transcript_hash(
        fields["info"].encode(), fields["exportCtx"].encode(), enc, eph_c, eph_s, alice, bob
    )
    expected_tag = ack_tag(seed, "ctx-fixed", fields["nonce"], response["kid"], th)
    assert from_b64url(response["ackTagB64"]) == expected_tag

    assert response["v"] == VERSION and response["task"] == TASK
    assert response["ctx"] == "ctx-fixed" and response["did"] == bob
    assert response["enc"] == fields["enc"] and response["ephC"] == fields["ephC"]
    assert response["infoHash"] == sha256_b64(fields["info"])
    assert response["exportCtxHash"] == sha256_b64(fields["exportCtx"])
    body = {k: v for k, v in response.items() if k != "sigB64"}
    # Signed over the reference's struct order, written out here independently.
    order = [
        "v",
        "task",
        "ctx",
        "kid",
        "ephS",
        "ackTagB64",
        "ts",
        "did",
        "infoHash",
        "exportCtxHash",
        "enc",
        "ephC",
    ]
    signed = json.dumps({k: body[k] for k in order}, separators=(",", ":")).encode()
    peers.bob.signing_key.verify(signed, from_b64url(response["sigB64"]))

    assert peers.initiator.finalize(pending, response).id == session_id(seed)


async def test_tampered_payload_is_refused(peers: Peers) -> None:
    pending = peers.init()
    tampered = pending.request.payload.replace(b'"nonce":"', b'"nonce":"A')
    assert tampered != pending.request.payload
    with pytest.raises(SignatureError):
        await peers.process(pending, payload=tampered)
    assert peers.bob_sessions.active_count == 0
    # The untouched request still goes through: the refusal did not burn its nonce.
    await peers.process(pending)
    assert peers.bob_sessions.active_count == 1


async def test_wrong_signature_is_refused(peers: Peers, new_agent: NewAgent) -> None:
    pending = peers.init()
    mallory = await new_agent(Chain.ETHEREUM)
    for signature in (mallory.signing_key.sign(pending.request.payload), bytes(64), b""):
        with pytest.raises(SignatureError):
            await peers.process(pending, signature=signature)
    assert peers.bob_sessions.active_count == 0


async def test_request_signed_by_alice_but_claimed_by_someone_else(
    peers: Peers, new_agent: NewAgent
) -> None:
    carol = await new_agent(Chain.ETHEREUM)
    with pytest.raises(InvalidMessageError) as info:  # refused before any key is resolved
        await peers.process(peers.init(), sender_did=str(carol.did))
    assert info.value.code == "did_mismatch"


async def test_initiator_did_must_match_sender(peers: Peers, new_agent: NewAgent) -> None:
    carol = await new_agent(Chain.ETHEREUM)
    pending = peers.init()
    fields = dict(pending.fields, initDid=str(carol.did))
    payload, signature = peers.resign_request(fields)
    with pytest.raises(InvalidMessageError) as info:
        await peers.process(pending, payload=payload, signature=signature)
    assert info.value.code == "did_mismatch"


async def test_mismatched_resp_did_is_refused(peers: Peers, new_agent: NewAgent) -> None:
    carol = await new_agent(Chain.SOLANA)
    # Alice built the request for carol but it reaches bob.
    pending = peers.initiator.init(DIDDocument.for_identity(carol))
    with pytest.raises(InvalidMessageError) as info:
        await peers.process(pending)
    assert info.value.code == "did_mismatch"
    assert peers.bob_sessions.active_count == 0


@pytest.mark.parametrize("skew", [121.0, -121.0, 3600.0])
async def test_skewed_timestamp_is_refused(
    registry: InMemoryRegistry, new_agent: NewAgent, skew: float
) -> None:
    p = Peers(
        await new_agent(Chain.ETHEREUM),
        await new_agent(Chain.SOLANA),
        registry,
        clock=lambda: time.time() + skew,
    )
    with pytest.raises(TimestampSkewError) as info:
        await p.process(p.init())
    assert info.value.code == "timestamp_skew"


@pytest.mark.parametrize("skew", [100.0, -100.0])
async def test_timestamp_within_two_minutes_is_accepted(
    registry: InMemoryRegistry, new_agent: NewAgent, skew: float
) -> None:
    p = Peers(
        await new_agent(Chain.ETHEREUM),
        await new_agent(Chain.SOLANA),
        registry,
        clock=lambda: time.time() + skew,
    )
    pending = p.init()
    response, _ = await p.process(pending)
    p.initiator.finalize(pending, response)


async def test_skew_checked_on_the_signed_ts(peers: Peers) -> None:
    pending = peers.init()
    fields = dict(pending.fields, ts=format_rfc3339(time.time_ns() - 10 * 60 * 10**9))
    payload, signature = peers.resign_request(fields)
    with pytest.raises(TimestampSkewError):
        await peers.process(pending, payload=payload, signature=signature)


async def test_replayed_request_is_refused(peers: Peers) -> None:
    pending = peers.init()
    response, _ = await peers.process(pending)
    with pytest.raises(ReplayError) as info:
        await peers.process(pending)
    assert info.value.code == "handshake_replay"
    assert peers.bob_sessions.active_count == 1
    # The original exchange is unaffected by the refused replay.
    peers.initiator.finalize(pending, response)


async def test_replay_with_fresh_ephemeral_but_same_ctx_and_nonce_is_refused(
    peers: Peers,
) -> None:
    first = peers.initiator.init(peers.bob_doc(), "ctx-same")
    await peers.process(first)
    second = peers.initiator.init(peers.bob_doc(), "ctx-same")
    fields = dict(second.fields, nonce=first.fields["nonce"])
    payload, signature = peers.resign_request(fields)
    with pytest.raises(ReplayError):
        await peers.process(second, payload=payload, signature=signature)


async def test_unregistered_initiator_is_refused(
    registry: InMemoryRegistry, new_agent: NewAgent
) -> None:
    p = Peers(await new_agent(Chain.ETHEREUM, registered=False), await new_agent(), registry)
    with pytest.raises(UnknownDIDError) as info:
        await p.process(p.init())
    assert info.value.code == "unknown_did" and info.value.http_status == 403
    assert p.bob_sessions.active_count == 0


async def test_inactive_initiator_is_refused(registry: InMemoryRegistry, new_agent: NewAgent):
    alice = await new_agent(Chain.SOLANA)
    doc = DIDDocument.for_identity(alice, active=False)
    await registry.deactivate(doc, alice.signing_key.sign(doc.canonical_bytes()))
    p = Peers(alice, await new_agent(), registry)
    with pytest.raises(InactiveAgentError):
        await p.process(p.init())


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda f: f.pop("ephC"), "bad_handshake"),
        (lambda f: f.pop("nonce"), "bad_handshake"),
        (lambda f: f.update(enc=""), "bad_handshake"),
        (lambda f: f.update(info=f["info"] + "x"), "bad_handshake"),
        (lambda f: f.update(exportCtx=f["exportCtx"] + "x"), "bad_handshake"),
        (lambda f: f.update(exportCtx="no context here"), "bad_handshake"),
        (lambda f: f.update(ts="yesterday"), "bad_timestamp"),
        (lambda f: f.update(enc="***"), "bad_base64"),
        (lambda f: f.update(ephC="***"), "bad_base64"),
    ],
)
async def test_malformed_but_signed_payload_is_refused(peers: Peers, mutate, code: str) -> None:
    pending = peers.init()
    fields = dict(pending.fields)
    mutate(fields)
    payload, signature = peers.resign_request(fields)
    with pytest.raises(InvalidMessageError) as info:
        await peers.process(pending, payload=payload, signature=signature)
    assert info.value.code == code
    assert peers.bob_sessions.active_count == 0


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2]", b'{"initDid": 5}', b"\xff\xfe", b"[" * 50_000, b'"text"'],
)
async def test_non_object_payload_is_refused(peers: Peers, payload: bytes) -> None:
    pending = peers.init()
    with pytest.raises(InvalidMessageError) as info:
        await peers.process(
            pending, payload=payload, signature=peers.alice.signing_key.sign(payload)
        )
    assert info.value.code == "bad_handshake"


@pytest.mark.parametrize("field", ["enc", "ephC"])
@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (bytes(32), CryptoError),
        (b"\x01" + bytes(31), CryptoError),
        (bytes(31), InvalidMessageError),
    ],
)
async def test_low_order_or_short_keys_are_refused(
    peers: Peers, field: str, bad: bytes, error: type[Exception]
) -> None:
    pending = peers.init()
    fields = dict(pending.fields, **{field: b64url(bad)})
    payload, signature = peers.resign_request(fields)
    with pytest.raises(error):
        await peers.process(pending, payload=payload, signature=signature)
    assert peers.bob_sessions.active_count == 0


async def _answered(peers: Peers) -> tuple[PendingHandshake, dict[str, str]]:
    pending = peers.init()
    response, _ = await peers.process(pending)
    return pending, response


@pytest.mark.parametrize("field", ["ackTagB64", "ephS", "kid", "ts", "ctx", "did"])
async def test_tampered_response_without_resigning_is_refused(peers: Peers, field: str) -> None:
    pending, response = await _answered(peers)
    value = response[field]
    response[field] = value[:-2] + ("AA" if value[-2:] != "AA" else "BB")
    with pytest.raises(SageError) as info:
        peers.initiator.finalize(pending, response)
    assert isinstance(info.value, (SignatureError, InvalidMessageError))
    if field in ("ackTagB64", "ephS", "kid", "ts"):
        assert isinstance(info.value, SignatureError)
        assert info.value.code == "bad_signature"
    assert peers.alice_sessions.active_count == 0
    assert pending.exporter == b"" and pending.eph_c_private is None


async def test_tampered_signature_is_refused(peers: Peers) -> None:
    pending, response = await _answered(peers)
    signature = bytearray(from_b64url(response["sigB64"]))
    signature[5] ^= 0x80
    response["sigB64"] = b64url(bytes(signature))
    with pytest.raises(SignatureError) as info:
        peers.initiator.finalize(pending, response)
    assert info.value.code == "bad_signature"
    assert peers.alice_sessions.active_count == 0


async def test_response_signed_by_another_agent_is_refused(
    peers: Peers, new_agent: NewAgent
) -> None:
    mallory = await new_agent(Chain.SOLANA)
    pending, response = await _answered(peers)
    with pytest.raises(SignatureError):
        peers.initiator.finalize(pending, peers.resign_response(response, mallory))


async def test_missing_signature_is_refused(peers: Peers) -> None:
    pending, response = await _answered(peers)
    del response["sigB64"]
    with pytest.raises(InvalidMessageError) as info:
        peers.initiator.finalize(pending, response)
    assert info.value.code == "bad_base64"


async def test_resigned_wrong_ack_tag_is_refused(peers: Peers) -> None:
    pending, response = await _answered(peers)
    response["ackTagB64"] = b64url(bytes(32))
    with pytest.raises(SignatureError) as info:
        peers.initiator.finalize(pending, peers.resign_response(response))
    assert info.value.code == "bad_ack_tag"
    assert peers.alice_sessions.active_count == 0


async def test_resigned_substituted_eph_s_is_refused(peers: Peers) -> None:
    pending, response = await _answered(peers)
    _, other_public = hpke.generate_key_pair()
    response["ephS"] = b64url(other_public)
    with pytest.raises(SignatureError) as info:
        peers.initiator.finalize(pending, peers.resign_response(response))
    assert info.value.code == "bad_ack_tag"


async def test_resigned_different_kid_is_refused(peers: Peers) -> None:
    pending, response = await _answered(peers)
    response["kid"] = "kid-other"
    with pytest.raises(SignatureError) as info:
        peers.initiator.finalize(pending, peers.resign_response(response))
    assert info.value.code == "bad_ack_tag"


async def test_resigned_low_order_eph_s_is_refused(peers: Peers) -> None:
    pending, response = await _answered(peers)
    response["ephS"] = b64url(bytes(32))
    with pytest.raises(CryptoError):
        peers.initiator.finalize(pending, peers.resign_response(response))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", "v2"),
        ("task", "other/task@v1"),
        ("ctx", "ctx-other"),
        ("did", "did:sage:sol:11111111111111111111111111111111"),
        ("enc", b64url(bytes(32))),
        ("ephC", b64url(bytes(32))),
        ("infoHash", b64url(bytes(32))),
        ("exportCtxHash", b64url(bytes(32))),
        ("kid", ""),
    ],
)
async def test_resigned_response_with_wrong_echo_is_refused(
    peers: Peers, field: str, value: str
) -> None:
    pending, response = await _answered(peers)
    response[field] = value
    with pytest.raises(InvalidMessageError) as info:
        peers.initiator.finalize(pending, peers.resign_response(response))
    assert info.value.code == "bad_handshake"
    assert peers.alice_sessions.active_count == 0


@pytest.mark.parametrize("response", [None, [], "ok", {"v": 1}, {"v": "v1", "sigB64": 5}])
async def test_malformed_response_is_refused(peers: Peers, response: object) -> None:
    pending = peers.init()
    with pytest.raises(InvalidMessageError):
        peers.initiator.finalize(pending, response)
    assert pending.exporter == b""


async def test_handshake_replay_state_is_scoped_to_the_sender(
    peers: Peers, new_agent: NewAgent
) -> None:
    replays = ScopedNonceCaches(ttl=600.0, per_scope=1)
    responder = Responder(peers.bob, DIDResolver(peers.registry), SessionManager(), replays)
    request = peers.init().request
    await responder.process(request.init_did, request.payload, request.signature)
    assert len(replays) == 1 and len(replays.scope(peers.alice.did)) == 1
    with pytest.raises(ReplayError):
        await responder.process(request.init_did, request.payload, request.signature)
    # Alice's scope is full (bound 1): her next handshake evicts and raises her floor only.
    await responder.process(*_args(peers.init().request))
    carol = await new_agent(Chain.SOLANA)
    other = Initiator(carol, SessionManager()).init(peers.bob_doc()).request
    await responder.process(*_args(other))
    assert len(replays) == 2


def _args(request) -> tuple[str, bytes, bytes]:
    return request.init_did, request.payload, request.signature


def test_the_global_limiter_keeps_a_reserve_for_established_peers() -> None:
    from sage_otel.agent.errors import OverloadError, RateLimitedError
    from sage_otel.agent.handshake import GlobalHandshakeLimiter

    now = [0.0]
    limiter = GlobalHandshakeLimiter("10/second", new_peer_share=0.5, clock=lambda: now[0])
    for _ in range(5):
        limiter.hit(newcomer=True)
    with pytest.raises(RateLimitedError) as info:
        limiter.hit(newcomer=True)
    assert info.value.code == "global_handshake_rate" and info.value.http_status == 429
    assert info.value.retry_after == 1
    for _ in range(5):
        limiter.hit(newcomer=False)  # the reserve
    with pytest.raises(OverloadError) as full:  # out of handshakes for everyone: 503
        limiter.hit(newcomer=False)
    assert not isinstance(full.value, RateLimitedError) and full.value.http_status == 503
    now[0] += 0.1  # one token: established peers first
    with pytest.raises(RateLimitedError):
        limiter.hit(newcomer=True)
    limiter.hit(newcomer=False)


def test_the_address_limiter_counts_addresses_not_loopback() -> None:
    from sage_otel.agent.errors import RateLimitedError
    from sage_otel.agent.handshake import AddressLimiter

    limiter = AddressLimiter("2/minute")
    limiter.hit("2001:db8::1")
    limiter.hit("2001:db8::2")
    with pytest.raises(RateLimitedError) as info:
        limiter.hit("2001:db8::3")  # one /64
    assert info.value.code == "address_rate_limited"
    limiter.hit("198.51.100.4")
    for _ in range(5):
        limiter.hit("127.0.0.1")
        limiter.hit("")
