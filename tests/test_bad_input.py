"""Hostile and malformed requests against a live server: typed 4xx answers, no damage done."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.encoding import b64std, b64url
from sage_otel.agent.errors import ErrorCategory, InvalidMessageError
from sage_otel.agent.handshake import TASK as HANDSHAKE_TASK
from sage_otel.agent.identity import AgentIdentity, Chain
from sage_otel.agent.keyschedule import build_info
from sage_otel.agent.message import SecureMessage, seal, signature_base
from sage_otel.agent.session import SessionLimits, SessionManager
from sage_otel.agent.transport import (
    CLOSE_TASK,
    MESSAGE_TASK,
    MESSAGES_PATH,
    ClientAgent,
    Connection,
    Envelope,
    ServerAgent,
    parse_envelope,
)

MAX_BODY = 64 * 1024
CATEGORIES = {c.value for c in ErrorCategory}


@dataclass
class Ctx:
    http: httpx.AsyncClient
    base: str
    server: ServerAgent
    client: ClientAgent
    conn: Connection
    bystander: ClientAgent
    bystander_conn: Connection
    stranger: AgentIdentity

    @property
    def url(self) -> str:
        return self.base + MESSAGES_PATH

    async def raw(self, body: bytes, **headers: str) -> httpx.Response:
        return await self.http.post(
            self.url, content=body, headers={"content-type": "application/json", **headers}
        )

    async def send(self, envelope: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.raw(json.dumps(envelope).encode(), **headers)

    def message(self, text: str = "probe", **override: Any) -> dict[str, Any]:
        envelope = self.client.message_envelope(self.conn, text)
        envelope.update(override)
        return envelope

    def with_metadata(self, **changes: Any) -> dict[str, Any]:
        envelope = self.message()
        envelope["metadata"] = {**envelope["metadata"], **changes}
        return envelope

    def forged(self, change: Callable[[SecureMessage], dict[str, Any]]) -> dict[str, Any]:
        """A message altered after sealing and then signed again with the sender's key."""
        session = self.conn.session
        message = seal(session, "forged")
        message = dataclasses.replace(message, **change(message))
        message = dataclasses.replace(
            message, signature=session.sign(signature_base(message, "POST", MESSAGES_PATH))
        )
        wire = message.to_wire()
        return self.client.envelope(
            MESSAGE_TASK, session.id, wire["payload"], metadata=wire["metadata"]
        )

    def handshake(
        self,
        fields_change: Callable[[dict[str, str]], None] | None = None,
        *,
        payload: bytes | None = None,
        identity: AgentIdentity | None = None,
        did: str | None = None,
    ) -> dict[str, Any]:
        identity = identity or self.client.identity
        pending = self.client.initiator.init(DIDDocument.for_identity(self.server.identity))
        pending.wipe()
        if payload is None:
            fields = dict(pending.fields, initDid=str(identity.did))
            fields["info"] = build_info(
                pending.request.ctx_id, str(identity.did), str(self.server.identity.did)
            ).decode()
            if fields_change:
                fields_change(fields)
            payload = json.dumps(fields, separators=(",", ":")).encode()
        envelope = self.client.envelope(
            HANDSHAKE_TASK,
            pending.request.ctx_id,
            b64std(payload),
            b64std(identity.signing_key.sign(payload)),
        )
        envelope["did"] = did if did is not None else str(identity.did)
        return envelope


async def _replay(ctx: Ctx) -> httpx.Response:
    envelope = ctx.message("replay me")
    first = await ctx.send(envelope)
    assert first.status_code == 200, first.text
    return await ctx.send(envelope)


async def _out_of_order(ctx: Ctx) -> httpx.Response:
    earlier, later = ctx.message("1"), ctx.message("2")
    assert (await ctx.send(later)).status_code == 200
    return await ctx.send(earlier)


async def _handshake_replay(ctx: Ctx) -> httpx.Response:
    envelope = ctx.handshake()
    first = await ctx.send(envelope)
    assert first.status_code == 200, first.text
    return await ctx.send(envelope)


async def _chunked(ctx: Ctx) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"task_id": "sage/message@v1", "payload": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"A" * 1024
        yield b'"}'

    answer = await ctx.http.post(
        ctx.url, content=body(), headers={"content-type": "application/json"}
    )
    assert answer.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in answer.request.headers
    return answer


async def _oversized(ctx: Ctx) -> httpx.Response:
    padded = json.dumps(ctx.message("x" * 100)) + " " * MAX_BODY
    answer = await ctx.raw(padded.encode())
    assert int(answer.request.headers["content-length"]) > MAX_BODY
    return answer


def _skewed(seconds: float) -> Callable[[Ctx], dict[str, Any]]:
    def build(ctx: Ctx) -> dict[str, Any]:
        now_ns = time.time_ns() + int(seconds * 1e9)
        wire = seal(ctx.conn.session, "skewed", now_ns=now_ns).to_wire()
        return ctx.client.envelope(
            MESSAGE_TASK, ctx.conn.session.id, wire["payload"], metadata=wire["metadata"]
        )

    return build


def _tampered_payload(ctx: Ctx) -> dict[str, Any]:
    envelope = ctx.message()
    data = bytearray(base64.b64decode(envelope["payload"]))
    data[-1] ^= 0x01
    envelope["payload"] = base64.b64encode(bytes(data)).decode()
    return envelope


def _deep(depth: int) -> bytes:
    return b'{"task_id": "sage/message@v1", "metadata": ' + b"[" * depth + b"]" * depth + b"}"


def _flip(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 1])


Builder = Callable[[Ctx], Awaitable[httpx.Response] | dict[str, Any] | bytes]

CASES: list[tuple[str, Builder, int, str]] = [
    ("malformed json", lambda c: b'{"task_id": "sage/message@v1", ', 400, "malformed_json"),
    ("not utf-8", lambda c: b"\xff\xfe\xfd{}", 400, "malformed_json"),
    ("empty body", lambda c: b"", 400, "malformed_json"),
    ("deep nesting", lambda c: b"[" * 30_000 + b"]" * 30_000, 400, "malformed_json"),
    ("json array", lambda c: b"[]", 400, "malformed_json"),
    ("json string", lambda c: b'"envelope"', 400, "malformed_json"),
    ("json number", lambda c: b"42", 400, "malformed_json"),
    ("json null", lambda c: b"null", 400, "malformed_json"),
    ("id not string", lambda c: c.message(id=17), 400, "wrong_type"),
    ("context_id not string", lambda c: c.message(context_id=[]), 400, "wrong_type"),
    ("task_id not string", lambda c: c.message(task_id=5), 400, "wrong_type"),
    ("did not string", lambda c: c.message(did={"did": "x"}), 400, "wrong_type"),
    ("role not string", lambda c: c.message(role=True), 400, "wrong_type"),
    ("id null", lambda c: c.message(id=None), 400, "wrong_type"),
    ("context_id too long", lambda c: c.message(context_id="c" * 600), 400, "wrong_type"),
    ("metadata list", lambda c: c.message(metadata=[1, 2]), 400, "wrong_type"),
    ("metadata string", lambda c: c.message(metadata="seq=1"), 400, "wrong_type"),
    ("payload not string", lambda c: c.message(payload=12345), 400, "bad_base64"),
    ("signature not string", lambda c: c.message(signature=[]), 400, "wrong_type"),
    ("signature too long", lambda c: c.message(signature="A" * 2048), 400, "wrong_type"),
    ("metadata key upper case", lambda c: c.with_metadata(Seq="1"), 400, "bad_metadata"),
    ("metadata key too long", lambda c: c.with_metadata(**{"k" * 33: "v"}), 400, "bad_metadata"),
    ("metadata value too long", lambda c: c.with_metadata(note="v" * 1025), 400, "bad_metadata"),
    (
        "metadata too many keys",
        lambda c: c.with_metadata(**{f"k{i}": "v" for i in range(40)}),
        400,
        "wrong_type",
    ),
    ("id too long", lambda c: c.message(id="i" * 257), 400, "wrong_type"),
    ("task_id missing", lambda c: {"id": "x", "payload": ""}, 400, "missing_field"),
    ("task_id empty", lambda c: c.message(task_id=""), 400, "missing_field"),
    ("unknown task_id", lambda c: c.message(task_id="sage/unknown@v9"), 400, "unknown_task"),
    ("oversized, content-length", _oversized, 413, "payload_too_large"),
    ("oversized, chunked", _chunked, 413, "payload_too_large"),
    ("bad base64 payload", lambda c: c.message(payload="!!!!"), 400, "bad_base64"),
    ("url-safe base64 payload", lambda c: c.message(payload="ab-_"), 400, "bad_base64"),
    ("unknown session", lambda c: c.message(context_id="no-such-session"), 404, "unknown_session"),
    (
        "close unknown session",
        lambda c: c.message(task_id=CLOSE_TASK, context_id="nope"),
        404,
        "unknown_session",
    ),
    (
        "wrong signature",
        lambda c: c.with_metadata(signature=f"sig1=:{b64std(os.urandom(32))}:"),
        401,
        "bad_signature",
    ),
    (
        "close with wrong signature",
        lambda c: {
            **c.with_metadata(signature=f"sig1=:{b64std(bytes(32))}:"),
            "task_id": CLOSE_TASK,
        },
        401,
        "bad_signature",
    ),
    ("tampered payload", _tampered_payload, 401, "digest_mismatch"),
    ("seq changed", lambda c: c.with_metadata(seq=str(10**6)), 401, "bad_signature"),
    ("timestamp five minutes old", _skewed(-300), 400, "timestamp_skew"),
    ("timestamp five minutes ahead", _skewed(300), 400, "timestamp_skew"),
    (
        "truncated ciphertext",
        lambda c: c.forged(lambda m: {"ciphertext": m.ciphertext[:20]}),
        400,
        "truncated_ciphertext",
    ),
    (
        "empty ciphertext",
        lambda c: c.forged(lambda m: {"ciphertext": b""}),
        400,
        "missing_field",  # an empty payload, refused before any session work (as Go does)
    ),
    (
        "tampered ciphertext",
        lambda c: c.forged(lambda m: {"ciphertext": _flip(m.ciphertext)}),
        400,
        "decrypt_failed",
    ),
    ("seq missing", lambda c: {**c.message(), "metadata": {}}, 400, "bad_metadata"),
    ("seq zero", lambda c: c.with_metadata(seq="0"), 400, "bad_metadata"),
    ("seq as number", lambda c: c.with_metadata(seq=1), 400, "wrong_type"),
    ("nonce short", lambda c: c.with_metadata(nonce=b64url(bytes(8))), 400, "bad_metadata"),
    (
        "nonce with newline",
        lambda c: c.with_metadata(nonce=b64url(bytes(16)) + "\n"),
        400,
        "bad_base64",
    ),
    ("type unknown", lambda c: c.with_metadata(type="video"), 400, "bad_metadata"),
    ("timestamp garbage", lambda c: c.with_metadata(timestamp="yesterday"), 400, "bad_timestamp"),
    (
        "signature field malformed",
        lambda c: c.with_metadata(signature="hmac abc"),
        400,
        "bad_signature_field",
    ),
    ("nested metadata", lambda c: _deep(20_000), 400, "malformed_json"),
    ("replayed message", _replay, 409, "replay_detected"),
    ("out of order", _out_of_order, 409, "out_of_order"),
    (
        "header did mismatch",
        lambda c: c.send(c.message(), **{"x-sage-did": "did:sage:sol:x"}),
        400,
        "header_mismatch",
    ),
    ("handshake bad did", lambda c: c.handshake(did="not-a-did"), 400, "bad_did"),
    ("handshake unregistered", lambda c: c.handshake(identity=c.stranger), 403, "unknown_did"),
    (
        "handshake claimed by someone else",  # refused before any key is resolved
        lambda c: {**c.handshake(), "did": str(c.bystander.identity.did)},
        400,
        "did_mismatch",
    ),
    (
        "handshake signed by someone else",
        lambda c: {
            **c.handshake(identity=c.bystander.identity),
            "signature": b64std(c.client.identity.signing_key.sign(b"other bytes")),
        },
        401,
        "bad_signature",
    ),
    (
        "handshake bad signature base64",
        lambda c: {**c.handshake(), "signature": "@@@@"},
        400,
        "bad_base64",
    ),
    ("handshake empty payload", lambda c: {**c.handshake(), "payload": ""}, 400, "missing_field"),
    ("handshake payload not json", lambda c: c.handshake(payload=b"hello"), 400, "bad_handshake"),
    ("handshake payload array", lambda c: c.handshake(payload=b"[1]"), 400, "bad_handshake"),
    ("handshake payload deep", lambda c: c.handshake(payload=b"[" * 20_000), 400, "bad_handshake"),
    (
        "handshake missing ephC",
        lambda c: c.handshake(lambda f: f.pop("ephC")),
        400,
        "bad_handshake",
    ),
    (
        "handshake old ts",
        lambda c: c.handshake(lambda f: f.update(ts="2020-01-01T00:00:00Z")),
        400,
        "timestamp_skew",
    ),
    (
        "handshake wrong responder",
        lambda c: c.handshake(lambda f: f.update(respDid=str(c.bystander.identity.did))),
        400,
        "did_mismatch",
    ),
    (
        "handshake low-order enc",
        lambda c: c.handshake(lambda f: f.update(enc=b64url(bytes(32)))),
        400,
        "crypto_failure",
    ),
    (
        "handshake short ephC",
        lambda c: c.handshake(lambda f: f.update(ephC=b64url(bytes(5)))),
        400,
        "bad_handshake",
    ),
    (
        "handshake enc newline",
        lambda c: c.handshake(lambda f: f.update(enc=b64url(bytes(32)) + "\n")),
        400,
        "bad_base64",
    ),
    ("handshake replay", _handshake_replay, 409, "handshake_replay"),
]


async def run_case(ctx: Ctx, builder: Builder) -> httpx.Response:
    made = builder(ctx)
    if isinstance(made, Awaitable):
        return await made
    if isinstance(made, bytes):
        return await ctx.raw(made)
    return await ctx.send(made)


def assert_typed_refusal(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["success"] is False and "data" not in body
    assert body["error"]["code"] == code
    assert body["error"]["category"] in CATEGORIES
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def assert_unharmed(ctx: Ctx) -> None:
    assert await ctx.client.send(ctx.conn, "still working") == "still working"
    assert await ctx.bystander.send(ctx.bystander_conn, b"me too") == b"me too"
    assert ctx.server.sessions.get(ctx.conn.session.id) is not None
    newcomer = await ctx.bystander.connect(ctx.base, str(ctx.server.identity.did))
    assert await ctx.bystander.send(newcomer, "fresh") == "fresh"
    await ctx.bystander.close(newcomer)


async def _registered(registry: InMemoryRegistry, chain: Chain) -> AgentIdentity:
    identity = AgentIdentity.generate(chain)
    document = DIDDocument.for_identity(identity)
    await registry.register(document, sign_registration(identity, document))
    return identity


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ctx() -> AsyncIterator[Ctx]:
    """One server for the whole module: every case runs against the state all earlier left."""
    registry = InMemoryRegistry()
    roomy = SessionLimits(max_messages=1_000_000)
    server = ServerAgent(
        await _registered(registry, Chain.SOLANA),
        DIDResolver(registry),
        sessions=SessionManager(roomy, max_sessions_per_peer=10_000),
        max_body=MAX_BODY,
        handshake_rate="100000/second",  # this module tests input checks, not rate limits
    )
    base = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
    clients = [
        ClientAgent(
            await _registered(registry, chain),
            DIDResolver(registry),
            sessions=SessionManager(roomy),
        )
        for chain in (Chain.ETHEREUM, Chain.SOLANA)
    ]
    try:
        conns = [await c.connect(base, str(server.identity.did)) for c in clients]
        stranger = AgentIdentity.generate(Chain.SOLANA)
        async with httpx.AsyncClient(timeout=10.0) as http:
            yield Ctx(http, base, server, clients[0], conns[0], clients[1], conns[1], stranger)
    finally:
        for client in clients:
            await client.aclose()
        await server.stop()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("builder", "status", "code"),
    [pytest.param(b, s, c, id=name) for name, b, s, c in CASES],
)
async def test_bad_input_is_refused_with_typed_error(
    ctx: Ctx, builder: Builder, status: int, code: str
) -> None:
    answer = await run_case(ctx, builder)
    assert_typed_refusal(answer, status, code)
    await assert_unharmed(ctx)


@pytest.mark.asyncio(loop_scope="module")
async def test_sessions_survive_every_bad_input_in_a_row(ctx: Ctx) -> None:
    sessions_before = {ctx.conn.session.id, ctx.bystander_conn.session.id}
    for name, builder, status, code in CASES:
        answer = await run_case(ctx, builder)
        assert answer.status_code == status, (name, answer.text)
        assert answer.json()["error"]["code"] == code, name
    assert sessions_before <= set(ctx.server.sessions._sessions)
    await assert_unharmed(ctx)


@pytest.mark.asyncio(loop_scope="module")
async def test_wrong_http_method_and_path(ctx: Ctx) -> None:
    for answer, status, code in (
        (await ctx.http.get(ctx.url), 405, "method_not_allowed"),
        (await ctx.http.delete(ctx.url), 405, "method_not_allowed"),
        (await ctx.http.post(ctx.base + "/other", content=b"{}"), 404, "not_found"),
        (await ctx.http.get(ctx.base + "/"), 404, "not_found"),
    ):
        assert_typed_refusal(answer, status, code)
    await assert_unharmed(ctx)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_huge_signed_nonce_is_refused_before_anything_is_stored(ctx: Ctx) -> None:
    """Long nonces used to reach the ackTag's 16-bit length prefix (over 65,535 bytes: a
    500), after the nonce was stored in the replay cache for 10 minutes."""
    replays_before = len(ctx.server.responder.replays)
    sessions_before = ctx.server.sessions.active_count
    for _ in range(20):
        answer = await ctx.send(ctx.handshake(lambda f: f.update(nonce="n" * 5_000)))
        assert_typed_refusal(answer, 400, "bad_handshake")
    assert len(ctx.server.responder.replays) == replays_before
    assert ctx.server.sessions.active_count == sessions_before
    await assert_unharmed(ctx)


@pytest.mark.asyncio(loop_scope="module")
async def test_fuzzed_envelopes_never_cause_server_errors(ctx: Ctx) -> None:
    rng = random.Random(20240611)
    statuses: set[int] = set()
    for _ in range(150):
        body = bytearray(json.dumps(ctx.message("fuzz")).encode())
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            index = rng.randrange(len(body))
            if action < 0.5:
                body[index] = rng.randrange(256)
            elif action < 0.75:
                del body[index]
            else:
                body[index:index] = bytes([rng.choice(b'{}[]":,0A\\ ')])
        answer = await ctx.raw(bytes(body))
        statuses.add(answer.status_code)
        assert answer.status_code < 500, answer.text
        data = answer.json()
        if answer.status_code != 200:
            assert 400 <= answer.status_code < 500
            assert isinstance(data["error"]["code"], str) and data["error"]["code"]
    assert any(400 <= s < 500 for s in statuses)
    await assert_unharmed(ctx)


# -- parse_envelope properties ------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
_B64ISH = st.text(alphabet="ABCDabcd0123+/=-_ \n", max_size=24)
ENVELOPE_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=600) | JSON,
        "context_id": st.text(max_size=40) | JSON,
        "task_id": st.sampled_from([HANDSHAKE_TASK, MESSAGE_TASK, CLOSE_TASK, ""]) | JSON,
        "payload": _B64ISH | JSON,
        "did": st.text(max_size=40) | JSON,
        "signature": _B64ISH | JSON,
        "metadata": st.dictionaries(st.text(max_size=10), JSON, max_size=4) | JSON,
        "role": st.sampled_from(["user", "agent"]) | JSON,
    },
)


def _check_parsed(envelope: Envelope) -> None:
    for field in ("id", "context_id", "task_id", "did", "role", "raw_payload"):
        assert isinstance(getattr(envelope, field), str)
    assert envelope.task_id and envelope.id
    assert isinstance(envelope.payload, bytes) and isinstance(envelope.signature, bytes)
    assert isinstance(envelope.metadata, dict)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_envelope_on_arbitrary_bytes(body: bytes) -> None:
    try:
        envelope = parse_envelope(body)
    except InvalidMessageError:
        return
    _check_parsed(envelope)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=12), JSON, max_size=6) | ENVELOPE_LIKE)
def test_parse_envelope_on_arbitrary_json_objects(obj: dict[str, Any]) -> None:
    try:
        envelope = parse_envelope(json.dumps(obj).encode())
    except InvalidMessageError as exc:
        assert exc.http_status == 400
        return
    _check_parsed(envelope)
    assert envelope.task_id == obj["task_id"]
    assert base64.b64decode(obj.get("payload", "")) == envelope.payload


def test_parse_envelope_valid_example() -> None:
    envelope = parse_envelope(
        json.dumps(
            {"task_id": MESSAGE_TASK, "payload": b64std(b"abc"), "metadata": {"seq": "1"}}
        ).encode()
    )
    assert envelope.payload == b"abc" and envelope.raw_payload == b64std(b"abc")
    assert envelope.metadata == {"seq": "1"} and envelope.did == "" and envelope.id
