"""The soak test's attacker: every attack at once, at a bounded total request rate.

    python -m benchmarks.soak_attacker --base URL --server-did DID --secrets S.json
        --registry R.json --rate 200 --seconds 600 --out RESULT.json [--only KIND,...]

It sets up (its sessions, prebuilt hostile bodies), prints ``READY``, waits for a line on
stdin, attacks for ``--seconds``, writes its counts to ``--out`` and prints ``DONE``.

Request kinds (weights share the total rate; ``--only`` restricts to some of them):

a. replay floor: ``future`` (valid session messages stamped 29 s ahead, from a peer with its
   own session; the session is re-opened when the server ends it) and ``replay`` (one of the
   last accepted ``future`` bodies sent again).
b. session-table fill: ``hs_flood`` (fresh, validly signed handshakes from ONE registered
   DID, as fast as its share allows) and ``hs_unknown`` (validly signed handshakes from a
   pool of unregistered DIDs, each reused so that the negative cache answers).
c. hostile input: the ``h_*`` kinds (malformed bodies, wrong content types, oversized and
   nested bodies, 70 000-byte handshake nonces, bad signatures, skewed timestamps, wrong
   methods and paths).

Every answer is counted by (kind, status, error code). A 5xx, a transport failure (reset,
timeout) or an answer that is not JSON of the agent's shape is a *finding*, kept with the
request kind that triggered it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sage_otel.agent.canonical import go_json
from sage_otel.agent.did import DIDResolver, JsonFileRegistry
from sage_otel.agent.encoding import b64std, b64url, format_rfc3339
from sage_otel.agent.handshake import TASK as HANDSHAKE_TASK
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.keyschedule import build_export_ctx, build_info
from sage_otel.agent.message import seal
from sage_otel.agent.session import SessionManager
from sage_otel.agent.transport import (
    MESSAGE_TASK,
    MESSAGES_PATH,
    SESSION_GONE,
    ClientAgent,
    Connection,
    envelope_body,
)

from .soak import load_identity, percentile

MAX_BODY = 1 << 20  # the server's default limit
UNKNOWN_POOL = 256  # unregistered DIDs the hs_unknown kind cycles through
REPLAY_KEEP = 64
MAX_FINDINGS_KEPT = 200
LOCAL_RENEW = 900  # messages sealed on one session before the attacker renews it

# Category weights of the total rate; the h_* kinds share HOSTILE_WEIGHT equally.
# hs_flood's share (60/s at the default 200/s) is above the server's default per-DID
# handshake rate (50/s), so the flood meets the rate limiter as well as the session limit.
WEIGHTS = {"future": 0.15, "replay": 0.10, "hs_flood": 0.30, "hs_unknown": 0.15}
HOSTILE_WEIGHT = 0.30

# What each kind is expected to get; anything else is counted as "unexpected".
EXPECTED: dict[str, set[tuple[int, str]]] = {
    # The session ends after 500 accepted messages (1000 counted, replies included): the
    # next message gets 410, or 404 once the server's sweeper has removed the session.
    "future": {(200, "ok"), (410, "session_expired"), (404, "unknown_session")},
    "replay": {(409, "replay_detected"), (410, "session_expired"), (404, "unknown_session")},
    "hs_flood": {
        (200, "ok"),
        (429, "handshake_rate_limited"),
        (429, "peer_session_limit"),
    },
    "hs_unknown": {(403, "unknown_did")},
    "reconnect": {(200, "ok")},
    "h_malformed_json": {(400, "malformed_json")},
    "h_not_utf8": {(400, "malformed_json")},
    "h_json_array": {(400, "malformed_json")},
    "h_wrong_content_type": {(415, "unsupported_media_type")},
    "h_no_content_type": {(415, "unsupported_media_type")},
    "h_oversized_length": {(413, "payload_too_large")},
    "h_oversized_chunked": {(413, "payload_too_large")},
    "h_deep_array": {(400, "malformed_json")},
    "h_deep_metadata": {(400, "malformed_json")},
    "h_hs_70k_nonce": {(400, "bad_handshake")},
    "h_hs_bad_signature": {(401, "bad_signature")},
    "h_hs_old_ts": {(400, "timestamp_skew")},
    "h_hs_future_ts": {(400, "timestamp_skew")},
    "h_hs_bad_did": {(400, "bad_did")},
    "h_msg_bad_signature": {(401, "bad_signature")},
    "h_msg_ts_past": {(400, "timestamp_skew")},
    "h_msg_ts_future": {(400, "timestamp_skew")},
    "h_msg_tampered": {(401, "digest_mismatch")},
    "h_msg_unknown_session": {(404, "unknown_session")},
    "h_header_mismatch": {(400, "header_mismatch")},
    "h_get_messages": {(405, "method_not_allowed")},
    "h_put_messages": {(405, "method_not_allowed")},
    "h_delete_messages": {(405, "method_not_allowed")},
    "h_post_other_path": {(404, "not_found")},
    "h_get_root": {(404, "not_found")},
}
HOSTILE = [k for k in EXPECTED if k.startswith("h_")]


@dataclass
class Req:
    method: str
    path: str
    content: bytes | Callable[[], AsyncIterator[bytes]] | None
    headers: dict[str, str]


def encode_envelope(env: dict[str, Any], content_type: str | None = "application/json") -> Req:
    """An envelope dict as ClientAgent.post sends it: Go-ordered body plus X-SAGE headers."""
    body = envelope_body(
        message_id=env.get("id", ""),
        context_id=env.get("context_id", ""),
        task_id=env.get("task_id", ""),
        payload=base64.b64decode(env.get("payload", "")),
        did=env.get("did", ""),
        signature=base64.b64decode(env.get("signature") or ""),
        metadata=env.get("metadata"),
        role=env.get("role", ""),
    )
    headers = {"x-sage-did": env.get("did", ""), "x-sage-message-id": env.get("id", "")}
    if content_type:
        headers["content-type"] = content_type
    if env.get("context_id"):
        headers["x-sage-context-id"] = env["context_id"]
    if env.get("task_id"):
        headers["x-sage-task-id"] = env["task_id"]
    return Req("POST", MESSAGES_PATH, body, headers)


def raw(body: bytes, content_type: str | None = "application/json") -> Req:
    return Req("POST", MESSAGES_PATH, body, {"content-type": content_type} if content_type else {})


def handshake_env(
    identity: AgentIdentity,
    server_did: str,
    *,
    nonce: str | None = None,
    ts_ns: int | None = None,
    signature: bytes | None = None,
    did: str | None = None,
) -> dict[str, Any]:
    """A handshake request as Initiator.init writes it, with random (valid) enc and ephC.

    The random X25519 points cost the attacker nothing; the server still runs the full
    HPKE work on them once a request passes its checks.
    """
    ctx = f"ctx-{uuid.uuid4()}"
    init = str(identity.did)
    fields = {
        "initDid": init,
        "respDid": server_did,
        "info": build_info(ctx, init, server_did).decode(),
        "exportCtx": build_export_ctx(ctx).decode(),
        "nonce": nonce or str(uuid.uuid4()),
        "ts": format_rfc3339(ts_ns),
        "enc": b64url(os.urandom(32)),
        "ephC": b64url(os.urandom(32)),
        "profile": "native",
    }
    payload = go_json(fields, sort_keys=True)
    sig = identity.signing_key.sign(payload) if signature is None else signature
    return {
        "id": str(uuid.uuid4()),
        "context_id": ctx,
        "task_id": HANDSHAKE_TASK,
        "payload": b64std(payload),
        "did": did if did is not None else init,
        "signature": b64std(sig),
        "metadata": {},
        "role": "user",
    }


class Peer:
    """A registered attacker DID with one live session, re-opened when the server ends it."""

    def __init__(self, attacker: Attacker, identity: AgentIdentity) -> None:
        self.attacker = attacker
        self.agent = ClientAgent(
            identity,
            attacker.resolver,
            sessions=SessionManager(),
            http=httpx.AsyncClient(timeout=10.0, trust_env=False),
        )
        self.conn: Connection | None = None
        self.lock = asyncio.Lock()

    async def ensure(self) -> Connection:
        """The live session, re-opened before this side's own sweeper would end it.

        The client side counts every message it seals against the session's 1000-message
        limit, accepted by the server or not (the hostile peer's never are).
        """
        conn = self.conn
        if conn is None or conn.session.closed or conn.session.message_count >= LOCAL_RENEW:
            conn = await self.reconnect()
        return conn

    async def reconnect(self) -> Connection:
        if self.conn is not None:
            if not self.conn.session.closed:
                with contextlib.suppress(Exception):  # the server may have ended it already
                    await self.agent.close(self.conn)
            self.agent.sessions.close(self.conn.session.id)
        started = time.perf_counter()
        try:
            self.conn = await self.agent.connect(self.attacker.base, self.attacker.server_did)
            self.attacker.count("reconnect", 200, "ok", time.perf_counter() - started)
        except Exception as exc:
            code = getattr(exc, "code", type(exc).__name__)
            status = getattr(exc, "http_status", 0)
            self.attacker.count("reconnect", status, code, time.perf_counter() - started)
            if status >= 500 or status == 0:
                self.attacker.finding("reconnect", status, code, repr(exc)[:200])
            raise
        return self.conn

    def message(self, text: str, skew: float = 0.0) -> tuple[dict[str, Any], Connection]:
        assert self.conn is not None
        session = self.conn.session
        wire = seal(session, text, now_ns=time.time_ns() + int(skew * 1e9)).to_wire()
        env = self.agent.envelope(
            MESSAGE_TASK, session.id, wire["payload"], metadata=wire["metadata"]
        )
        return env, self.conn

    async def aclose(self) -> None:
        await self.agent.aclose()


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.base = args.base
        self.server_did = args.server_did
        self.rate = args.rate
        self.seconds = args.seconds
        self.max_inflight = args.max_inflight
        secrets = json.loads(Path(args.secrets).read_text())["attacker"]
        self.identities = {name: load_identity(entry) for name, entry in secrets.items()}
        self.resolver = DIDResolver(JsonFileRegistry(args.registry))
        self.http = httpx.AsyncClient(
            base_url=self.base,
            timeout=10.0,
            trust_env=False,
            limits=httpx.Limits(
                max_connections=self.max_inflight, max_keepalive_connections=self.max_inflight
            ),
        )
        self.counts: collections.Counter[tuple[str, int, str]] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.findings: list[dict[str, Any]] = []
        self.finding_counts: collections.Counter[tuple[str, int, str]] = collections.Counter()
        self.timeline: collections.Counter[int] = collections.Counter()
        self.replayable: collections.deque[Req] = collections.deque(maxlen=REPLAY_KEEP)
        self.t0 = time.monotonic()  # reset when the attack starts
        self.seq = 0
        weights = dict(WEIGHTS)
        for kind in HOSTILE:
            weights[kind] = HOSTILE_WEIGHT / len(HOSTILE)
        if args.only:
            wanted = set(args.only.split(","))
            if "hostile" in wanted:
                wanted |= set(HOSTILE)
            weights = {k: w for k, w in weights.items() if k in wanted}
            if not weights:
                raise SystemExit(f"--only matches no kind: {args.only}")
        total = sum(weights.values())
        self.weights = {k: w / total for k, w in weights.items()}

    # -- bookkeeping ---------------------------------------------------------------------

    def count(self, kind: str, status: int, code: str, latency: float) -> None:
        self.counts[(kind, status, code)] += 1
        self.latency[kind].append(latency)
        self.timeline[max(0, int((time.monotonic() - self.t0) // 10))] += 1

    def finding(self, kind: str, status: int, code: str, detail: str) -> None:
        self.finding_counts[(kind, status, code)] += 1
        if len(self.findings) < MAX_FINDINGS_KEPT:
            self.findings.append(
                {
                    "t": round(time.monotonic() - self.t0, 3),
                    "kind": kind,
                    "status": status,
                    "code": code,
                    "detail": detail,
                }
            )

    async def send(self, kind: str, req: Req) -> tuple[int, str]:
        """Send one request, classify and count its answer."""
        content = req.content() if callable(req.content) else req.content
        started = time.perf_counter()
        try:
            answer = await self.http.request(
                req.method, req.path, content=content, headers=req.headers
            )
        except httpx.TimeoutException as exc:
            self.count(kind, 0, "timeout", time.perf_counter() - started)
            self.finding(kind, 0, "timeout", repr(exc)[:200])
            return 0, "timeout"
        except httpx.HTTPError as exc:
            code = f"transport:{type(exc).__name__}"
            self.count(kind, 0, code, time.perf_counter() - started)
            self.finding(kind, 0, code, repr(exc)[:200])
            return 0, code
        latency = time.perf_counter() - started
        status = answer.status_code
        try:
            body = json.loads(answer.content)
            if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
                raise ValueError("not the agent's answer shape")
            code = "ok" if body["success"] else str(body["error"]["code"])
        except (ValueError, KeyError, TypeError):
            code = "non_json"
        self.count(kind, status, code, latency)
        if status >= 500 or code == "non_json":
            self.finding(kind, status, code, answer.text[:200])
        return status, code

    # -- setup -----------------------------------------------------------------------------

    async def setup(self) -> None:
        self.replay_peer = Peer(self, self.identities["replay"])
        self.hostile_peer = Peer(self, self.identities["hostile"])
        self.flood = self.identities["flood"]
        self.unknown = [AgentIdentity.generate("solana") for _ in range(UNKNOWN_POOL)]
        await self.replay_peer.reconnect()
        await self.hostile_peer.reconnect()
        # Bodies that do not depend on time or session, built once.
        message_like, _ = self.hostile_peer.message("content-type probe")
        valid_body = encode_envelope(message_like).content
        assert isinstance(valid_body, bytes)
        filler = b"A" * (MAX_BODY + 4096)
        oversized = b'{"task_id": "sage/message@v1", "payload": "' + filler + b'"}'

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"task_id": "sage/message@v1", "payload": "'
            for _ in range(MAX_BODY // 65536 + 2):
                yield b"A" * 65536
            yield b'"}'

        hostile_did = self.hostile_peer.agent.identity
        big_nonce = encode_envelope(handshake_env(hostile_did, self.server_did, nonce="n" * 70_000))
        self.static: dict[str, Req] = {
            "h_malformed_json": raw(b'{"task_id": "sage/message@v1", '),
            "h_not_utf8": raw(b"\xff\xfe\xfd{}"),
            "h_json_array": raw(b"[]"),
            "h_wrong_content_type": raw(valid_body, "text/plain"),
            "h_no_content_type": raw(valid_body, None),
            "h_oversized_length": raw(oversized),
            "h_oversized_chunked": Req(
                "POST", MESSAGES_PATH, chunked, {"content-type": "application/json"}
            ),
            "h_deep_array": raw(b"[" * 30_000 + b"]" * 30_000),
            "h_deep_metadata": raw(
                b'{"task_id": "sage/message@v1", "metadata": '
                + b"[" * 20_000
                + b"]" * 20_000
                + b"}"
            ),
            "h_hs_70k_nonce": big_nonce,
            "h_get_messages": Req("GET", MESSAGES_PATH, None, {}),
            "h_put_messages": Req("PUT", MESSAGES_PATH, valid_body, {}),
            "h_delete_messages": Req("DELETE", MESSAGES_PATH, None, {}),
            "h_post_other_path": Req(
                "POST", "/other", valid_body, {"content-type": "application/json"}
            ),
            "h_get_root": Req("GET", "/", None, {}),
        }

    # -- request builders --------------------------------------------------------------------

    async def k_future(self) -> None:
        peer = self.replay_peer
        async with peer.lock:  # one in flight: the session's sequence numbers stay in order
            await peer.ensure()
            self.seq += 1
            env, _ = peer.message(f"future-{self.seq}", skew=29.0)
            req = encode_envelope(env)
            status, code = await self.send("future", req)
            if status == 200:
                self.replayable.append(req)
            elif code in SESSION_GONE:
                await peer.reconnect()

    async def k_replay(self) -> None:
        if not self.replayable:
            return await self.k_future()
        await self.send("replay", random.choice(self.replayable))

    async def k_hs_flood(self) -> None:
        await self.send("hs_flood", encode_envelope(handshake_env(self.flood, self.server_did)))

    async def k_hs_unknown(self) -> None:
        who = random.choice(self.unknown)
        await self.send("hs_unknown", encode_envelope(handshake_env(who, self.server_did)))

    async def k_hostile(self, kind: str) -> None:
        req = self.static.get(kind)
        if req is None:
            req = await self.build_session_hostile(kind)
        _status, code = await self.send(kind, req)
        if code in SESSION_GONE and kind.startswith("h_msg") and kind != "h_msg_unknown_session":
            async with self.hostile_peer.lock:
                await self.hostile_peer.reconnect()

    async def build_session_hostile(self, kind: str) -> Req:
        peer, sd = self.hostile_peer, self.server_did
        who = peer.agent.identity
        if kind == "h_hs_bad_signature":
            return encode_envelope(
                handshake_env(who, sd, signature=who.signing_key.sign(b"other bytes"))
            )
        if kind == "h_hs_old_ts":
            return encode_envelope(handshake_env(who, sd, ts_ns=1_577_836_800 * 10**9))
        if kind == "h_hs_future_ts":
            return encode_envelope(handshake_env(who, sd, ts_ns=time.time_ns() + 300 * 10**9))
        if kind == "h_hs_bad_did":
            return encode_envelope(handshake_env(who, sd, did="not-a-did"))
        async with peer.lock:
            await peer.ensure()
            skew = {"h_msg_ts_past": -300.0, "h_msg_ts_future": 300.0}.get(kind, 0.0)
            env, _ = peer.message("hostile", skew=skew)
        if kind == "h_msg_bad_signature":
            fake = base64.b64encode(os.urandom(32)).decode()
            env["metadata"] = {**env["metadata"], "signature": f"sig1=:{fake}:"}
        elif kind == "h_msg_tampered":
            data = bytearray(base64.b64decode(env["payload"]))
            data[-1] ^= 1
            env["payload"] = base64.b64encode(bytes(data)).decode()
        elif kind == "h_msg_unknown_session":
            env["context_id"] = "no-such-session"
        elif kind == "h_header_mismatch":
            req = encode_envelope(env)
            req.headers["x-sage-did"] = "did:sage:solana:someone-else"
            return req
        return encode_envelope(env)

    async def run_kind(self, kind: str) -> None:
        try:
            if kind == "future":
                await self.k_future()
            elif kind == "replay":
                await self.k_replay()
            elif kind == "hs_flood":
                await self.k_hs_flood()
            elif kind == "hs_unknown":
                await self.k_hs_unknown()
            else:
                await self.k_hostile(kind)
        except Exception as exc:
            self.finding(kind, -1, "attacker_error", repr(exc)[:200])

    # -- the paced run ---------------------------------------------------------------------

    def schedule(self):  # smooth weighted round robin: exact shares, evenly interleaved
        current = dict.fromkeys(self.weights, 0.0)
        while True:
            for kind, weight in self.weights.items():
                current[kind] += weight
            best = max(current, key=current.__getitem__)
            current[best] -= 1.0
            yield best

    async def attack(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_inflight)
        tasks: set[asyncio.Task[None]] = set()
        scheduled = collections.Counter()
        interval = 1.0 / self.rate
        cpu0 = time.process_time()
        self.t0 = start = time.monotonic()
        next_at, end = loop.time(), loop.time() + self.seconds
        blocked = 0.0
        kinds = self.schedule()
        while loop.time() < end:
            kind = next(kinds)
            waited = loop.time()
            await slots.acquire()
            blocked += loop.time() - waited
            scheduled[kind] += 1
            task = loop.create_task(self.run_kind(kind))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:  # far behind: do not burst to catch up
                next_at = loop.time()
        sending = time.monotonic() - start
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        elapsed = time.monotonic() - start
        total = sum(self.counts.values())
        by_kind: dict[str, Any] = {}
        for (kind, status, code), n in sorted(self.counts.items()):
            entry = by_kind.setdefault(kind, {"sent": 0, "answers": {}, "unexpected": 0})
            entry["sent"] += n
            entry["answers"][f"{status} {code}"] = n
            if (status, code) not in EXPECTED.get(kind, set()):
                entry["unexpected"] += n
        for kind, entry in by_kind.items():
            lat = sorted(self.latency[kind])
            entry["rate"] = round(entry["sent"] / sending, 2)
            entry["p50_ms"] = round(percentile(lat, 50) * 1e3, 2)
            entry["p99_ms"] = round(percentile(lat, 99) * 1e3, 2)
        by_code: collections.Counter[str] = collections.Counter()
        for (_kind, status, code), n in self.counts.items():
            by_code[f"{status} {code}"] += n
        return {
            "target_rate": self.rate,
            "achieved_rate": round(total / sending, 2),
            "requests": total,
            "seconds": round(sending, 2),
            "seconds_incl_drain": round(elapsed, 2),
            "seconds_blocked_on_inflight_cap": round(blocked, 2),
            "max_inflight": self.max_inflight,
            "cpu_seconds": round(time.process_time() - cpu0, 2),
            "weights": {k: round(w, 4) for k, w in self.weights.items()},
            "by_status_code": dict(sorted(by_code.items())),
            "by_kind": by_kind,
            "status_5xx": sum(n for (_k, s, _c), n in self.counts.items() if s >= 500),
            "findings_total": sum(self.finding_counts.values()),
            "findings_by_kind": {
                f"{k} {s} {c}": n for (k, s, c), n in sorted(self.finding_counts.items())
            },
            "findings": self.findings,
            "timeline_10s": [self.timeline[i] for i in range(max(self.timeline, default=-1) + 1)],
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }

    async def aclose(self) -> None:
        await self.replay_peer.aclose()
        await self.hostile_peer.aclose()
        await self.http.aclose()


async def amain(args: argparse.Namespace) -> None:
    attacker = Attacker(args)
    await attacker.setup()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    if not args.no_wait:
        await loop.run_in_executor(None, sys.stdin.readline)
    try:
        result = await attacker.attack()
    finally:
        await attacker.aclose()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("DONE", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--server-did", required=True)
    parser.add_argument("--secrets", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated kinds (or 'hostile')")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-wait", action="store_true", help="start without the GO line")
    asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
