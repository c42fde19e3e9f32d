"""Conformance with the SAGE Go reference v1.5.2, from what it put on the wire
(tests/data/sage-go-vectors, recorded by running it; README there).

Each vector is replayed through the public API with the recorded randomness and a frozen
clock: the Python initiator must write the Go request byte for byte and accept the Go
answer; the Python responder must answer the Go request byte for byte; both must produce
and open the session messages. Where the reference has a defect (session messages MACed
under 32 zero bytes), the Python side uses the directional key and refuses the defect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage_otel.agent import hpke
from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.encoding import parse_rfc3339
from sage_otel.agent.entropy import Entropy
from sage_otel.agent.errors import InvalidMessageError, NetworkError, PeerError
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.keyschedule import (
    build_export_ctx,
    combine_seed,
    directional_keys,
    session_id,
    x25519_e2e,
)
from sage_otel.agent.message import MessageValidator, go_signature_base
from sage_otel.agent.session import PeerProfile, Role, Session
from sage_otel.agent.transport import ClientAgent, Connection, ServerAgent

DATA = Path(__file__).parent / "data" / "sage-go-vectors"
HANDSHAKE = json.loads((DATA / "handshake.json").read_text())
HTTP = json.loads((DATA / "http.json").read_text())
VECTORS = {v["name"]: v for v in HANDSHAKE["vectors"]}
CHAIN = {"ed25519": "solana", "secp256k1": "ethereum"}
SAGE_HEADERS = ("x-sage-did", "x-sage-message-id", "x-sage-context-id", "x-sage-task-id")


def label_key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


class Script:
    """Replays recorded reads: each call must ask for exactly the recorded size."""

    def __init__(self, reads: list[tuple[int, bytes]]) -> None:
        self.reads = list(reads)

    def __call__(self, size: int) -> bytes:
        expected, value = self.reads.pop(0)
        assert size == expected
        return value


def entropy(reads: list[dict], times_ns: list[int]) -> Entropy:
    """An Entropy that replays ``reads`` per stream, in order, and the given clock readings."""
    streams: dict[str, list[tuple[int, bytes]]] = {"crypto/rand.Reader": [], "uuid reader": []}
    for read in reads:
        streams[read["stream"]].append((read["bytes"], bytes.fromhex(read["value"])))
    clock = iter(times_ns)
    return Entropy(
        random=Script(streams["crypto/rand.Reader"]),
        uuid_bytes=Script(streams["uuid reader"]),
        time_ns=lambda: next(clock),
    )


def reads_of(v: dict, who: str) -> list[dict]:
    return [r for r in v["input"]["random_reads"] if r["purpose"].startswith(who + ":")]


def message(v: dict, direction: str) -> dict:
    return next(m for m in v["messages"] if m["direction"] == direction)


class Agents:
    """The vector's two identities, registered, from their labels."""

    def __init__(self, v: dict) -> None:
        self.v = v
        i, key_type = v["input"], v["input"]["key_type"]
        self.initiator = AgentIdentity.from_secrets(
            CHAIN[key_type],
            label_key(i["initiator"]["signing_key_label"]),
            label_key(i["initiator"]["signing_key_label"] + "/unused-kem"),
        )
        self.responder = AgentIdentity.from_secrets(
            CHAIN[key_type],
            label_key(i["responder"]["signing_key_label"]),
            label_key(i["responder"]["kem_key_label"]),
        )
        self.registry = InMemoryRegistry()
        self.init_ns = parse_rfc3339(v["init"]["timestamp"])
        self.resp_ns = parse_rfc3339(v["response"]["timestamp"])

    async def register(self) -> DIDResolver:
        urls = self.v["input"]["base_urls"]
        for identity, url in (
            (self.initiator, urls["initiator"]),
            (self.responder, urls["responder"]),
        ):
            doc = DIDDocument.for_identity(identity, endpoint=url)
            await self.registry.register(doc, sign_registration(identity, doc))
        return DIDResolver(self.registry)

    def created_ns(self, direction: str) -> int:
        return message(self.v, direction)["signature_created"] * 1_000_000_000


def answering(status: int, body: str, sink: list[httpx.Request]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        sink.append(request)
        return httpx.Response(
            status, content=body.encode(), headers={"content-type": "application/json"}
        )

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def with_signature(body: str, mac: bytes) -> bytes:
    """The recorded body with the reference's zero-key MAC replaced by ``mac``."""
    wire = json.loads(body)
    old = '"signature":' + json.dumps(wire["signature"])
    assert body.count(old) == 1
    return body.replace(old, '"signature":' + json.dumps(base64.b64encode(mac).decode())).encode()


def contrast(m: dict) -> bytes:
    key = (
        "hmac_under_c2s_sign_key_for_contrast"
        if m["direction"] == "c2s"
        else ("hmac_under_s2c_sign_key_for_contrast")
    )
    return bytes.fromhex(m[key])


async def asgi_post(
    agent: ServerAgent, request: dict, content: bytes | None = None
) -> httpx.Response:
    headers = {k: v for k, v in request["headers"] if k.lower() not in ("host", "content-length")}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=agent.app), base_url="http://sage.test"
    ) as http:
        body = request["body"].encode() if content is None else content
        return await http.request(
            request["method"], request["target"], content=body, headers=headers
        )


async def python_initiator(
    agents: Agents, resolver: DIDResolver, answer: dict
) -> tuple[ClientAgent, list[httpx.Request], Connection]:
    v = agents.v
    m = message(v, "c2s")
    sink: list[httpx.Request] = []
    client = ClientAgent(
        agents.initiator,
        resolver,
        http=answering(answer["status"], answer["body"], sink),
        entropy=entropy(
            reads_of(v, "initiator") + m["random_reads"], [agents.init_ns, agents.created_ns("c2s")]
        ),
    )
    conn = await client.connect(
        v["input"]["base_urls"]["responder"],
        v["input"]["responder"]["did"],
        profile=PeerProfile.GO,
        ctx_id=v["input"]["context_id"],
    )
    return client, sink, conn


def python_responder(agents: Agents, resolver: DIDResolver, seen: list) -> ServerAgent:
    v = agents.v
    clock = lambda: agents.init_ns / 1e9  # noqa: E731 - the clock the request was stamped with
    return ServerAgent(
        agents.responder,
        resolver,
        validator=MessageValidator(clock=lambda: agents.created_ns("c2s") / 1e9),
        handler=lambda _session, data: seen.append(data),
        entropy=entropy(reads_of(v, "responder"), [agents.resp_ns]),
        clock=clock,
    )


@pytest.fixture(params=sorted(VECTORS))
def agents(request: pytest.FixtureRequest) -> Agents:
    return Agents(VECTORS[request.param])


def test_identities_from_labels_are_the_vectors(agents: Agents) -> None:
    i = agents.v["input"]
    assert str(agents.initiator.did) == i["initiator"]["did"]
    assert str(agents.responder.did) == i["responder"]["did"]
    assert agents.initiator.signing_key.public_bytes().hex() == i["initiator"]["signing_public_key"]
    assert agents.responder.signing_key.public_bytes().hex() == i["responder"]["signing_public_key"]
    assert agents.responder.kem.public.hex() == i["responder"]["kem_public_key"]


def test_session_secrets_follow_the_key_schedule(agents: Agents) -> None:
    v, s = agents.v, agents.v["session"]
    payload = json.loads(v["init"]["payload"])
    receiver = hpke.setup_base_receiver(
        base64.urlsafe_b64decode(payload["enc"] + "="),
        agents.responder.kem.private,
        payload["info"].encode(),
    )
    export_ctx = build_export_ctx(v["input"]["context_id"])
    assert receiver.export(export_ctx, 32).hex() == s["exporter"]
    eph_c = label_key(v["input"]["initiator_secrets"]["eph_c_label"])
    eph_s_public = base64.urlsafe_b64decode(json.loads(v["response"]["data"])["ephS"] + "=")
    assert x25519_e2e(eph_c, eph_s_public).hex() == s["ss_e2e"]
    seed = combine_seed(bytes.fromhex(s["exporter"]), bytes.fromhex(s["ss_e2e"]), export_ctx)
    assert seed.hex() == s["seed"] and session_id(seed) == s["session_id"]
    keys = directional_keys(seed, s["session_id"])
    for name in ("c2s_encrypt", "c2s_sign", "s2c_encrypt", "s2c_sign"):
        assert getattr(keys, name).hex() == s[name]


async def test_python_initiator_writes_the_go_request_and_accepts_the_go_answer(
    agents: Agents,
) -> None:
    v = agents.v
    client, sink, conn = await python_initiator(
        agents, await agents.register(), v["response"]["http_response"]
    )
    request, recorded = sink[0], v["init"]["http_request"]
    assert request.method == recorded["method"] and request.url.path == recorded["target"]
    assert request.content == recorded["body"].encode()  # payload and signature included
    wire = json.loads(request.content)
    assert base64.b64decode(wire["payload"]).decode() == v["init"]["payload"]
    assert base64.b64decode(wire["signature"]).hex() == v["init"]["signature"]
    headers = {k.lower(): value for k, value in recorded["headers"]}
    for name in (*SAGE_HEADERS, "content-type"):
        assert request.headers[name] == headers[name], name
    assert conn.session.id == v["session"]["session_id"]
    assert conn.session.kid == v["session"]["kid"] and conn.session.profile is PeerProfile.GO
    await client.aclose()


async def test_python_responder_answers_the_go_request_byte_for_byte(agents: Agents) -> None:
    v = agents.v
    server = python_responder(agents, await agents.register(), [])
    answer = await asgi_post(server, v["init"]["http_request"])
    recorded = v["response"]["http_response"]
    assert answer.status_code == recorded["status"] == 200
    assert answer.content == recorded["body"].encode()
    assert answer.headers["content-type"] == "application/json"
    data = base64.b64decode(answer.json()["data"])
    assert data.decode() == v["response"]["data"]
    session = server.sessions.get(v["session"]["session_id"])
    assert session.role is Role.RESPONDER and session.profile is PeerProfile.GO
    # The replayed request is refused, typed, and the session stays.
    again = await asgi_post(server, v["init"]["http_request"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "handshake_replay"
    assert server.sessions.active_count == 1


async def test_python_initiator_sends_the_c2s_message_with_the_directional_mac(
    agents: Agents,
) -> None:
    v, m = agents.v, message(agents.v, "c2s")
    client, sink, conn = await python_initiator(
        agents, await agents.register(), v["response"]["http_response"]
    )
    client.http = answering(200, m["http_response"]["body"], sink)
    assert await client.send(conn, m["plaintext"]) is None  # the reference answers bare
    request = sink[-1]
    assert (
        json.loads(request.content)["payload"]
        == base64.b64encode(bytes.fromhex(m["sealed"])).decode()
    )
    assert request.content == with_signature(m["http_request"]["body"], contrast(m))
    # The covered bytes are the reference canonicalizer's: its zero-key MAC over them is
    # the one recorded; ours is keyed with c2s_sign instead.
    covered = go_signature_base(
        _fields(m), m["secure_message"]["metadata"]["kid"], m["signature_created"]
    )
    assert covered.decode() == m["covered"]
    zero_mac = hmac.digest(bytes(32), covered, "sha256")
    assert zero_mac.hex() == m["covered_signature"] and zero_mac != contrast(m)
    await client.aclose()


async def test_python_responder_sends_the_s2c_message_to_the_initiator(agents: Agents) -> None:
    v, m = agents.v, message(agents.v, "s2c")
    resolver = await agents.register()
    server = python_responder(agents, resolver, [])
    await asgi_post(server, v["init"]["http_request"])
    session = server.sessions.get(v["session"]["session_id"])
    sink: list[httpx.Request] = []
    sender = ClientAgent(
        agents.responder,
        resolver,
        sessions=server.sessions,
        http=answering(200, m["http_response"]["body"], sink),
        entropy=entropy(m["random_reads"], [agents.created_ns("s2c")]),
    )
    peer_url = v["input"]["base_urls"]["initiator"]
    await sender.send(Connection(peer_url, str(agents.initiator.did), session), m["plaintext"])
    assert str(sink[0].url) == peer_url + "/messages"
    assert sink[0].content == with_signature(m["http_request"]["body"], contrast(m))


def _fields(m: dict) -> Any:
    class Fields:
        id = m["secure_message"]["id"]
        did = m["secure_message"]["did"]
        context_id = m["secure_message"]["context_id"]
        task_id = m["secure_message"]["task_id"]

    return Fields


async def _receive(agent: ServerAgent, m: dict, expect_answer: bytes) -> None:
    """The Go-sent request is refused for its zero-key MAC; keyed properly it is accepted."""
    refused = await asgi_post(agent, m["http_request"])
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "bad_signature"
    keyed = with_signature(m["http_request"]["body"], contrast(m))
    accepted = await asgi_post(agent, m["http_request"], keyed)
    assert accepted.status_code == 200 and accepted.content == expect_answer
    replayed = await asgi_post(agent, m["http_request"], keyed)
    assert replayed.status_code == 409 and replayed.json()["error"]["code"] == "replay_detected"


async def test_python_responder_opens_the_go_c2s_message(agents: Agents) -> None:
    v, m = agents.v, message(agents.v, "c2s")
    seen: list[bytes] = []
    server = python_responder(agents, await agents.register(), seen)
    await asgi_post(server, v["init"]["http_request"])
    await _receive(server, m, m["http_response"]["body"].encode())
    assert seen == [m["plaintext"].encode()]


async def test_python_initiator_opens_the_go_s2c_message(agents: Agents) -> None:
    v, m = agents.v, message(agents.v, "s2c")
    client, _sink, conn = await python_initiator(
        agents, await agents.register(), v["response"]["http_response"]
    )
    listener = ServerAgent(
        agents.initiator,
        client.resolver,
        sessions=client.sessions,
        validator=MessageValidator(clock=lambda: m["signature_created"]),
    )
    await _receive(listener, m, m["http_response"]["body"].encode())
    assert await listener.next_message(conn.session.id, timeout=1) == m["plaintext"].encode()
    await client.aclose()


# -- http.json: the reference's answer shapes, read by the Python client --------------------

CLIENT_OUTCOMES: dict[str, Callable[[Any], None]] = {
    "go-shaped-success": lambda r: r == json.loads(VECTORS["ed25519"]["response"]["data"]),
    "object-data-success": lambda r: isinstance(r, NetworkError) and r.code == "bad_answer",
    "http-401-error-object": lambda r: (r.code, r.category.value) == ("bad_signature", "signature"),
    "http-200-error-string": lambda r: (r.code, r.category.value) == ("handshake_replay", "replay"),
    "success-without-data": lambda r: r is None,
}


@pytest.mark.parametrize("case", HTTP["client_expects"]["cases"], ids=lambda c: c["name"])
async def test_client_reads_each_answer_shape_into_a_typed_result(case: dict) -> None:
    answer = case["answer"]
    client = ClientAgent(
        AgentIdentity.generate("solana"),
        DIDResolver(InMemoryRegistry()),
        http=answering(answer["status"], answer["body"], []),
    )
    try:
        result: Any = await client.post("http://peer.test", b"{}")
    except (PeerError, NetworkError) as exc:
        result = exc
    assert CLIENT_OUTCOMES[case["name"]](result), result
    await client.aclose()


GO_ANSWER_CODES = {
    "bad-signature": ("bad_signature", "signature"),
    "replay": ("handshake_replay", "replay"),
    "stale-timestamp": ("timestamp_skew", "invalid"),
    "unknown-did": ("unknown_did", "unknown_did"),
    "unknown-session": ("unknown_task", "invalid"),
    "metadata-not-string": ("malformed_json", "invalid"),
    "missing-payload": ("missing_field", "invalid"),
    "method-not-allowed": ("peer_error", "invalid"),
}
# What the Python server answers to the same requests: typed, 4xx, never 200 or 5xx.
PY_ANSWER_CODES = {
    "bad-signature": (401, "bad_signature"),
    "replay": (409, "handshake_replay"),
    "stale-timestamp": (400, "timestamp_skew"),
    "unknown-did": (400, "did_mismatch"),  # payload names another sender: refused before lookup
    "unknown-session": (404, "unknown_session"),
    "metadata-not-string": (400, "wrong_type"),
    "missing-payload": (400, "missing_field"),
    "method-not-allowed": (405, "method_not_allowed"),
}
ERROR_ANSWERS = [a for a in HTTP["answers"] if a["name"] in GO_ANSWER_CODES]


@pytest.mark.parametrize("answer", ERROR_ANSWERS, ids=lambda a: a["name"])
async def test_client_maps_each_go_error_answer_to_a_typed_error(answer: dict) -> None:
    response = answer["response"]
    body = response["raw"].split("\r\n\r\n", 1)[1]
    client = ClientAgent(
        AgentIdentity.generate("solana"),
        DIDResolver(InMemoryRegistry()),
        http=answering(response["status"], body, []),
    )
    with pytest.raises(PeerError) as info:
        await client.post("http://peer.test", b"{}")
    assert (info.value.code, info.value.category.value) == GO_ANSWER_CODES[answer["name"]]
    await client.aclose()


def _raw_request(answer: dict) -> dict:
    """The recorded raw request as method, target, headers and body."""
    head, body = answer["request"]["raw"].split("\r\n\r\n", 1)
    lines = head.split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    return {"method": method, "target": target, "headers": headers, "body": body}


@pytest.mark.parametrize("answer", ERROR_ANSWERS, ids=lambda a: a["name"])
async def test_python_server_answers_each_go_error_request_typed(answer: dict) -> None:
    agents = Agents(VECTORS["ed25519"])
    server = python_responder(agents, await agents.register(), [])
    if answer["name"] == "replay":
        assert (await asgi_post(server, _raw_request(answer))).status_code == 200
    reply = await asgi_post(server, _raw_request(answer))
    status, code = PY_ANSWER_CODES[answer["name"]]
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["success"] is False and body["error"]["code"] == code
    assert reply.content.endswith(b"\n") and "data" not in body


async def test_nil_signature_and_metadata_parse_like_the_reference() -> None:
    """A null signature and absent metadata are well formed; this session is unknown here."""
    agents = Agents(VECTORS["ed25519"])
    server = python_responder(agents, await agents.register(), [])
    reply = await asgi_post(server, HTTP["request_format"]["nil_fields_example"]["request"])
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "unknown_session"


async def test_a_go_session_refuses_a_native_envelope_and_the_reverse(agents: Agents) -> None:
    """The profile fixed at the handshake decides the envelope: no switching mid-session."""
    v = agents.v
    client, _sink, conn = await python_initiator(
        agents, await agents.register(), v["response"]["http_response"]
    )
    native = Session(
        "s", Role.INITIATOR, bytes(32), peer_did="p", kid="k", limits=conn.session.limits
    )
    with pytest.raises(InvalidMessageError):
        client.validator.open_wire(conn.session, "AAAA", {"seq": "1"}, envelope=None)
    with pytest.raises(InvalidMessageError):
        client.validator.open_wire(native, "AAAA", {"kid": "k", "signature-input": "x"})
    await client.aclose()
