"""Fuzzing in the test suite: a short atheris run of every target, and hypothesis against the
live ASGI app.

The rule (see ``fuzz/harnesses.py``): every input is accepted or refused with a typed
``SageError``; over HTTP every answer is JSON in the typed shape with a 4xx status (or 200
with ``success: true``); every label of every ``sage.*`` metric stays in the catalog's
closed sets. The long campaign is ``python -m fuzz.run --runs 500000`` (``fuzz/README.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sage_otel.agent.canonical import go_json
from sage_otel.agent.did import DIDResolver
from sage_otel.agent.encoding import b64std
from sage_otel.agent.errors import PeerError
from sage_otel.agent.handshake import TASK as HANDSHAKE_TASK
from sage_otel.agent.handshake import Initiator
from sage_otel.agent.session import PeerProfile, SessionManager
from sage_otel.agent.transport import (
    MESSAGES_PATH,
    ClientAgent,
    Connection,
    ServerAgent,
    read_answer,
)

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the fuzz package lives next to tests/
    sys.path.insert(0, str(ROOT))

from fuzz import harnesses  # noqa: E402
from fuzz import run as fuzz_run  # noqa: E402

CI_RUNS = int(os.environ.get("SAGE_FUZZ_CI_RUNS", "5000"))  # executions per atheris target
BASE_URL = "http://sage.test"


# --- (a) every atheris target, a fixed budget ------------------------------------------------


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fuzz")
    results = fuzz_run.run_targets(fuzz_run.TARGET_NAMES, runs=CI_RUNS, seed=1, out=out)
    return {result["target"]: result for result in results}


def _describe(result: dict[str, Any]) -> str:
    lines = [f"{result['target']}: {len(result['findings'])} finding(s)"]
    for finding in result["findings"]:
        lines += [
            f"- {finding['signature']} (x{finding['count']}), input {finding['input']}",
            f"  {(finding.get('minimized_call') or finding.get('call') or '')[:400]}",
            "  " + (finding.get("minimized_traceback") or finding["traceback"])[-1200:],
        ]
    return "\n".join(lines)


@pytest.mark.parametrize("target", fuzz_run.TARGET_NAMES)
def test_atheris_target_finds_nothing(campaign: dict[str, dict[str, Any]], target: str) -> None:
    result = campaign[target]
    assert result["executions"] >= CI_RUNS, result
    if result["findings"]:
        pytest.fail(_describe(result), pytrace=False)


# --- (b) hypothesis against the live app -------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
ENVELOPE_KEYS = harnesses.ENVELOPE_KEYS
METADATA_KEYS = (*harnesses.NATIVE_METADATA_KEYS, *harnesses.GO_METADATA_KEYS)
HEADER_NAMES = ("content-type", "x-sage-did", "x-sage-message-id", "x-sage-context-id",
                "x-sage-task-id", "content-length", "traceparent")  # fmt: skip


def _world() -> harnesses.Base:
    return harnesses.base()  # deterministic identities, registered once per process


class LiveApp(RuleBasedStateMachine):
    """Real clients (in process, through httpx.ASGITransport) against one ServerAgent with
    its default limits: valid handshakes and messages, replays, and arbitrary mutations.
    After every step every live session must still work."""

    steps: Counter[str] = Counter()  # what ran, over all examples (the test checks it)

    def __init__(self) -> None:
        super().__init__()
        world = _world()
        self.loop = asyncio.new_event_loop()
        self.server = ServerAgent(world.bob, DIDResolver(world.registry))
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.server.app), base_url=BASE_URL
        )
        self.clients = {
            name: ClientAgent(ident, DIDResolver(world.registry), http=self.http)
            for name, ident in (("alice", world.alice), ("dave", world.dave))
        }
        self.conns: list[tuple[ClientAgent, Connection]] = []
        self.accepted: list[tuple[Connection, bytes]] = []  # raw bodies, to replay

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        headers = {"content-type": "application/json", **(headers or {})}
        answer = self.run(self.http.post(MESSAGES_PATH, content=body, headers=headers))
        harnesses.check_answer(
            "POST", MESSAGES_PATH, answer.status_code, dict(answer.headers), answer.content
        )
        return answer

    def pick(self, index: int) -> tuple[ClientAgent, Connection]:
        return self.conns[index % len(self.conns)]

    def live(self, conn: Connection) -> bool:
        return not conn.session.closed

    # valid traffic

    @rule(name=st.sampled_from(["alice", "dave"]), go=st.booleans())
    def handshake(self, name: str, go: bool) -> None:
        self.steps["handshake"] += 1
        if len(self.conns) >= 5:
            return
        client = self.clients[name]
        profile = PeerProfile.GO if go else PeerProfile.NATIVE
        conn = self.run(client.connect(BASE_URL, str(self.server.identity.did), profile=profile))
        assert conn.session.profile is profile
        self.conns.append((client, conn))

    @precondition(lambda self: self.conns)
    @rule(index=st.integers(0, 9), data=st.one_of(st.text(max_size=60), st.binary(max_size=60)))
    def send(self, index: int, data: str | bytes) -> None:
        self.steps["send"] += 1
        client, conn = self.pick(index)
        if not self.live(conn):
            return
        body = go_json(client.message_envelope(conn, data))
        answer = self.post(body)
        assert answer.status_code == 200, answer.text
        if conn.session.profile is PeerProfile.NATIVE:
            assert client.open_reply(conn, read_answer(answer)) == data
        self.accepted.append((conn, body))

    @precondition(lambda self: self.accepted)
    @rule(index=st.integers(0, 99))
    def replay(self, index: int) -> None:
        self.steps["replay"] += 1
        conn, body = self.accepted[index % len(self.accepted)]
        if not self.live(conn):
            return
        answer = self.post(body)
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "replay_detected"

    @precondition(lambda self: self.conns)
    @rule(index=st.integers(0, 9))
    def close(self, index: int) -> None:
        self.steps["close"] += 1
        client, conn = self.pick(index)
        if self.live(conn):
            self.run(client.close(conn))
        self.conns.remove((client, conn))

    # hostile traffic

    @precondition(lambda self: self.conns)
    @rule(
        index=st.integers(0, 9),
        key=st.sampled_from(ENVELOPE_KEYS) | TEXT,
        value=JSON_VALUES,
        meta_key=st.none() | st.sampled_from(METADATA_KEYS) | TEXT,
        meta_value=JSON_VALUES,
        json_dumps=st.booleans(),
    )
    def mutated_message(
        self, index: int, key: str, value: Any, meta_key: Any, meta_value: Any, json_dumps: bool
    ) -> None:
        self.steps["mutated_message"] += 1
        client, conn = self.pick(index)
        if not self.live(conn):
            return
        envelope = client.message_envelope(conn, "mutated")
        if meta_key is not None and isinstance(envelope.get("metadata"), dict):
            envelope["metadata"] = {**envelope["metadata"], meta_key: meta_value}
        envelope[key] = value
        body = json.dumps(envelope).encode() if json_dumps else go_json(envelope)
        self.post(body)

    @precondition(lambda self: self.conns)
    @rule(
        index=st.integers(0, 9),
        headers=st.dictionaries(st.sampled_from(HEADER_NAMES), st.text(max_size=40), max_size=3),
        flip=st.integers(0, 10_000),
    )
    def mutated_bytes_or_headers(self, index: int, headers: dict[str, str], flip: int) -> None:
        self.steps["mutated_bytes_or_headers"] += 1
        client, conn = self.pick(index)
        if not self.live(conn):
            return
        body = bytearray(go_json(client.message_envelope(conn, "flipped")))
        if flip % 2:
            body[flip % len(body)] ^= 1 << (flip % 8)
        headers = {k: v for k, v in headers.items() if v.isprintable() and v.isascii()}
        with contextlib.suppress(httpx.LocalProtocolError):  # a header httpx refuses to send
            self.post(bytes(body), headers)

    @rule(name=st.sampled_from(["alice", "dave"]), key=st.sampled_from(harnesses.REQUEST_KEYS),
          value=JSON_VALUES, ctx=st.none() | TEXT)  # fmt: skip
    def mutated_handshake(self, name: str, key: str, value: Any, ctx: str | None) -> None:
        self.steps["mutated_handshake"] += 1
        client = self.clients[name]
        world = _world()
        pending = Initiator(client.identity, SessionManager()).init(world.doc(world.bob))
        fields = {**pending.fields, key: value}
        payload = go_json(fields, sort_keys=True)
        signature = client.identity.signing_key.sign(payload)  # re-signed: past the signature
        envelope = client.envelope(
            HANDSHAKE_TASK,
            pending.request.ctx_id if ctx is None else ctx,
            b64std(payload),
            b64std(signature),
        )
        self.post(json.dumps(envelope).encode())

    @rule(body=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
    def garbage(self, body: bytes) -> None:
        self.steps["garbage"] += 1
        self.post(body)

    @invariant()
    def sessions_keep_working(self) -> None:
        self.steps["sessions_keep_working"] += 1
        for client, conn in self.conns:
            if not self.live(conn):
                continue
            try:
                reply = self.run(client.send(conn, "still there?"))
            except PeerError as error:  # only a limit of the session itself may end it
                assert error.code in ("session_expired", "unknown_session"), error
                continue
            if conn.session.profile is PeerProfile.NATIVE:
                assert reply == "still there?"

    def teardown(self) -> None:
        try:
            for client in self.clients.values():
                self.run(client.aclose())
            self.run(self.server.stop())  # cancels the pushes to go-profile peers
        finally:
            self.loop.close()


@pytest.fixture
def telemetry():
    """Instrumented with private providers for the test; the labels are checked at the end."""
    tel = harnesses.Telemetry()
    trap = harnesses.DefectTrap().install()
    try:
        yield tel, trap
    finally:
        trap.uninstall()
        tel.close()


def test_live_app_state_machine(telemetry: Any) -> None:
    tel, trap = telemetry
    run_state_machine_as_test(
        LiveApp,
        settings=settings(
            max_examples=int(os.environ.get("SAGE_FUZZ_HYPOTHESIS_EXAMPLES", "60")),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    trap.raise_caught()
    assert tel.check() > 0
    steps = LiveApp.steps
    assert steps["handshake"] and steps["send"] and steps["replay"], steps
    assert steps["mutated_message"] and steps["mutated_handshake"] and steps["garbage"], steps


class _Raw:
    """One ServerAgent (default config) for the stateless HTTP property, made once."""

    app: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.app is None:
            world = _world()
            cls.app = ServerAgent(world.bob, DIDResolver(world.registry)).app
        return cls.app


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(harnesses.METHODS),
    path=st.sampled_from(harnesses.PATHS) | st.text(max_size=20).map(lambda t: "/" + t),
    headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.binary(max_size=40)), max_size=4),
    body=st.binary(max_size=400)
    | st.dictionaries(st.sampled_from(ENVELOPE_KEYS), JSON_VALUES).map(
        lambda d: json.dumps(d).encode()
    ),
)
def test_any_request_gets_a_typed_answer(
    method: str, path: str, headers: list[tuple[str, bytes]], body: bytes
) -> None:
    raw = [(name.encode(), value.translate(None, b"\r\n\x00")) for name, value in headers]
    trap = harnesses.DefectTrap().install()
    try:
        status, answer_headers, answer = asyncio.run(
            harnesses.asgi_request(_Raw.get(), method, path, raw, [body])
        )
        trap.raise_caught()
    finally:
        trap.uninstall()
    harnesses.check_answer(method, path, status, answer_headers, answer)


def test_rule_checks_catch_violations() -> None:
    """The checks themselves: a 5xx, a non-JSON answer and an unknown label are caught."""
    with pytest.raises(harnesses.RuleViolation):
        harnesses.check_answer(
            "POST", "/messages", 500, {"content-type": "application/json"}, b"{}"
        )
    with pytest.raises(harnesses.RuleViolation):
        harnesses.check_answer("POST", "/messages", 400, {"content-type": "text/plain"}, b"no")
    ok = b'{"success":false,"message_id":"","error":{"code":"x","category":"invalid","message":""}}'
    harnesses.check_answer("POST", "/messages", 400, {"content-type": "application/json"}, ok)

    @dataclasses.dataclass
    class Point:
        attributes: dict[str, str]

    @dataclasses.dataclass
    class Data:
        data_points: list[Point]

    @dataclasses.dataclass
    class Metric:
        name: str
        data: Data

    bad = Metric("sage.sessions.created", Data([Point({"status": "did:sage:eth:0x1"})]))
    scope = type("Scope", (), {"metrics": [bad]})
    resource = type("Resource", (), {"scope_metrics": [scope]})
    data = type("MetricsData", (), {"resource_metrics": [resource]})
    with pytest.raises(harnesses.RuleViolation, match="unbounded label"):
        harnesses.check_metric_labels(data)
