"""The HPKE 1-RTT handshake ("hpke/complete@v1").

Three stages, each its own code unit so that each can be timed:

* :meth:`Initiator.init` builds and signs the request (HPKE encapsulation to the peer's
  KEM key, a fresh ephemeral X25519 key for the end-to-end combiner);
* :meth:`Responder.process` verifies it, opens the HPKE context, answers with a signed
  response carrying its ephemeral key and the ackTag, and creates its session;
* :meth:`Initiator.finalize` verifies the answer and the ackTag and creates its session.

Both sides derive the same seed (HPKE exporter secret combined with X25519(ephS, ephC)),
so session ids and keys match the Go reference for identical inputs.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import hpke
from .canonical import go_json, loads
from .did import DIDDocument, DIDResolver
from .encoding import b64url, format_rfc3339, from_b64url, parse_rfc3339
from .entropy import SYSTEM, Entropy
from .errors import (
    InvalidMessageError,
    OverloadError,
    RateLimitedError,
    ReplayError,
    SignatureError,
    TimestampSkewError,
)
from .identity import AgentIdentity, parse_did
from .keyschedule import (
    ack_tag,
    build_export_ctx,
    build_info,
    combine_seed,
    session_id,
    transcript_hash,
    x25519_e2e,
)
from .replay import NonceStatus, ScopedNonceCaches
from .session import PeerProfile, Role, Session, SessionManager, address_key

TASK = "hpke/complete@v1"
VERSION = "v1"
HANDSHAKE_SKEW = 120.0
HANDSHAKE_REPLAY_TTL = 600.0
MAX_FIELD_BYTES = 1024  # ctx, nonce and kid travel with 16-bit length prefixes in the ackTag
MAX_PAYLOAD_BYTES = 8192  # a real init payload is about 1 KiB
REPLAYS_PER_DID = 4096  # handshake nonces kept per sender DID within the replay TTL
_REQUEST_FIELDS = ("initDid", "respDid", "info", "exportCtx", "nonce", "ts", "enc", "ephC")
# The answer is signed over the reference's struct (serverSigEnvelope) in this field order.
ANSWER_FIELDS = (
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
)
PROFILE_FIELD = "profile"


def answer_signed_bytes(answer: dict[str, str]) -> bytes:
    """The exact bytes a responder signs: the twelve fields in the reference's order."""
    return go_json({key: answer[key] for key in ANSWER_FIELDS})


def _sha256_b64(data: bytes) -> str:
    return b64url(hashlib.sha256(data).digest())


def _load_json_object(data: bytes, what: str) -> dict[str, str]:
    try:
        obj = loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessageError(f"{what} is not JSON", code="bad_handshake") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
        raise InvalidMessageError(f"{what} must be an object of strings", code="bad_handshake")
    return obj


@dataclass(frozen=True)
class HandshakeRequest:
    """What the initiator sends: the raw payload bytes and its signature over them."""

    ctx_id: str
    init_did: str
    payload: bytes
    signature: bytes


@dataclass
class PendingHandshake:
    """Initiator state between init and finalize; holds the ephemeral secret until finalize."""

    request: HandshakeRequest
    peer: DIDDocument
    fields: dict[str, str]
    profile: PeerProfile
    exporter: bytes = field(repr=False)
    eph_c_private: hpke.X25519PrivateKey | None = field(repr=False)

    def wipe(self) -> None:
        """Drop this object's references to the secrets so they can be freed.

        Python ``bytes`` cannot be overwritten in place: this shortens how long the secrets
        are reachable, it does not erase them from memory.
        """
        self.exporter, self.eph_c_private = b"", None


class Initiator:
    def __init__(
        self, identity: AgentIdentity, sessions: SessionManager, entropy: Entropy = SYSTEM
    ) -> None:
        self.identity = identity
        self.sessions = sessions
        self.entropy = entropy

    def init(
        self,
        peer: DIDDocument,
        ctx_id: str | None = None,
        *,
        profile: PeerProfile = PeerProfile.NATIVE,
    ) -> PendingHandshake:
        """Build and sign the request; randomness is read in the reference's order."""
        entropy = self.entropy
        ctx_id = ctx_id or f"ctx-{entropy.uuid4()}"
        init_did, resp_did = str(self.identity.did), str(peer.did)
        info = build_info(ctx_id, init_did, resp_did)
        export_ctx = build_export_ctx(ctx_id)
        enc, context = hpke.setup_base_sender(peer.kem_public_key, info, ikm_e=entropy.random(32))
        eph_c_private = hpke.load_private(entropy.random(32))
        eph_c = hpke.public_bytes(eph_c_private)
        fields = {
            "initDid": init_did,
            "respDid": resp_did,
            "info": info.decode(),
            "exportCtx": export_ctx.decode(),
            "nonce": entropy.uuid4(),
            "ts": format_rfc3339(entropy.time_ns()),
            "enc": b64url(enc),
            "ephC": b64url(eph_c),
        }
        if profile is PeerProfile.NATIVE:
            fields[PROFILE_FIELD] = profile.value
        payload = go_json(fields, sort_keys=True)  # the reference marshals a map: keys sorted
        signature = self.identity.signing_key.sign(payload)
        return PendingHandshake(
            request=HandshakeRequest(ctx_id, init_did, payload, signature),
            peer=peer,
            fields=fields,
            profile=profile,
            exporter=context.export(export_ctx, 32),
            eph_c_private=eph_c_private,
        )

    def finalize(self, pending: PendingHandshake, response: object) -> Session:
        """Verify the responder's answer and create the initiator's session."""
        try:
            if not isinstance(response, dict):
                raise InvalidMessageError(
                    "handshake response must be an object", code="bad_handshake"
                )
            resp = {k: v for k, v in response.items() if k != "sigB64"}
            if set(resp) != set(ANSWER_FIELDS) or not all(
                isinstance(v, str) for v in response.values()
            ):
                raise InvalidMessageError(
                    "handshake response must be exactly the answer's string fields",
                    code="bad_handshake",
                )
            sent = pending.fields
            for key, expected in (
                ("v", VERSION),
                ("task", TASK),
                ("ctx", pending.request.ctx_id),
                ("enc", sent["enc"]),
                ("ephC", sent["ephC"]),
                ("infoHash", _sha256_b64(sent["info"].encode())),
                ("exportCtxHash", _sha256_b64(sent["exportCtx"].encode())),
            ):
                if resp.get(key) != expected:
                    raise InvalidMessageError(
                        f"handshake response {key} mismatch", code="bad_handshake"
                    )
            if parse_did(resp["did"]) != pending.peer.did:
                raise InvalidMessageError("handshake response did mismatch", code="bad_handshake")
            pending.peer.verify(
                answer_signed_bytes(resp), from_b64url(response.get("sigB64"), "sigB64")
            )
            kid = resp.get("kid", "")
            if not _bound_text(kid):
                raise InvalidMessageError("handshake response kid invalid", code="bad_handshake")
            eph_s = from_b64url(resp.get("ephS"), "ephS")
            if pending.eph_c_private is None:
                raise InvalidMessageError("handshake already finalized", code="bad_handshake")
            seed = combine_seed(
                pending.exporter,
                x25519_e2e(pending.eph_c_private, eph_s),
                sent["exportCtx"].encode(),
            )
            th = transcript_hash(
                sent["info"].encode(),
                sent["exportCtx"].encode(),
                from_b64url(sent["enc"]),
                from_b64url(sent["ephC"]),
                eph_s,
                sent["initDid"],
                sent["respDid"],
            )
            expected_tag = ack_tag(seed, pending.request.ctx_id, sent["nonce"], kid, th)
            if not hmac.compare_digest(
                expected_tag, from_b64url(resp.get("ackTagB64"), "ackTagB64")
            ):
                raise SignatureError("ackTag mismatch", code="bad_ack_tag")
            return self.sessions.create(
                session_id(seed),
                Role.INITIATOR,
                seed,
                peer_did=sent["respDid"],
                kid=kid,
                profile=pending.profile,
            )
        finally:
            pending.wipe()


_PER = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
GLOBAL_HANDSHAKE_RATE = "200/second"
ADDRESS_HANDSHAKE_RATE = "100/second"


def parse_rate(rate: str) -> tuple[float, float]:
    """``"<n>/second|minute|hour"`` as (burst, tokens per second); ValueError otherwise."""
    count, _, unit = rate.partition("/")
    try:
        burst = float(count)
        per_second = burst / _PER[unit.strip()]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"rate must be '<n>/second|minute|hour', not {rate!r}") from exc
    if not (burst > 0 and per_second < float("inf")):
        raise ValueError(f"rate must be a positive number per unit, not {rate!r}")
    return burst, per_second


class HandshakeLimiter:
    """A token bucket per sender DID, checked after the signature verifies.

    Keyed by the verified DID, so nobody can spend another peer's allowance. ``rate`` is
    ``"<n>/second"``, ``"/minute"`` or ``"/hour"``; a peer may burst up to ``n`` at once.
    Buckets are kept for at most ``max_peers`` DIDs (the least recently seen is forgotten,
    which only ever refills it). Written here rather than taken from a rate-limit library:
    the in-memory backends considered start a timer thread per expiry, on the hot path.
    """

    code = "handshake_rate_limited"
    refusal = "handshake rate limit for this peer"

    def __init__(
        self,
        rate: str = "50/second",
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = 100_000,
    ) -> None:
        self.burst, self.per_second = parse_rate(rate)
        self.clock = clock
        self.max_peers = max_peers
        self._buckets: dict[object, tuple[float, float]] = {}

    def hit(self, did: object) -> None:
        now = self.clock()
        tokens, last = self._buckets.pop(did, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[did] = (tokens, now)
            raise RateLimitedError(
                self.refusal, code=self.code, retry_after=(1.0 - tokens) / self.per_second
            )
        self._buckets[did] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_peers:
            del self._buckets[next(iter(self._buckets))]


class AddressLimiter(HandshakeLimiter):
    """A token bucket per source address (an IPv6 /64 as one), checked after the per-DID
    one: many DIDs from one host share one allowance. Sources :func:`address_key` does not
    count (loopback, none) pass."""

    code = "address_rate_limited"
    refusal = "handshake rate limit for this address"

    def __init__(
        self,
        rate: str = ADDRESS_HANDSHAKE_RATE,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = 100_000,
    ) -> None:
        super().__init__(rate, clock, max_peers)

    def hit(self, did: object) -> None:  # ``did`` is the source address here
        key = address_key(did) if isinstance(did, str) else None
        if key is not None:
            super().hit(key)


class GlobalHandshakeLimiter:
    """One token bucket for every handshake this process answers, whoever sends it.

    Bounds the rate at which sessions can be created at all, whatever the number of DIDs
    and addresses. Newcomers may spend only the top ``new_peer_share`` of the bucket; the
    rest is kept for established peers (holding a session for a minute or more, see
    :meth:`SessionManager.is_established`), so a flood of fresh DIDs cannot lock them out
    (beyond it: 429 ``global_handshake_rate`` with Retry-After).
    """

    def __init__(
        self,
        rate: str = GLOBAL_HANDSHAKE_RATE,
        new_peer_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.per_second = parse_rate(rate)
        self.newcomer_floor = self.burst * (1.0 - new_peer_share)
        self.clock = clock
        self._tokens, self._last = self.burst, clock()

    def hit(self, *, newcomer: bool) -> None:
        now = self.clock()
        tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        floor = self.newcomer_floor if newcomer else 0.0
        if tokens - 1.0 < floor:
            self._tokens = tokens
            # Newcomers spent their half: a limit on them (429). An established peer refused
            # from the reserve: the server is out of handshakes for everyone (503).
            refusal = RateLimitedError if newcomer else OverloadError
            raise refusal(
                "handshake rate limit of this server",
                code="global_handshake_rate",
                retry_after=(floor + 1.0 - tokens) / self.per_second,
            )
        self._tokens = tokens - 1.0


class Responder:
    def __init__(
        self,
        identity: AgentIdentity,
        resolver: DIDResolver,
        sessions: SessionManager,
        replays: ScopedNonceCaches | None = None,
        clock=time.time,
        entropy: Entropy = SYSTEM,
        limiter: HandshakeLimiter | None = None,
        *,
        address_limiter: AddressLimiter | None = None,
        global_limiter: GlobalHandshakeLimiter | None = None,
    ) -> None:
        """``limiter`` (per DID) defaults to 50/second; the per-address and global limits
        apply only when given (:class:`~.server_agent.ServerAgent` gives both)."""
        self.identity = identity
        self.resolver = resolver
        self.sessions = sessions
        self._kem: tuple[bytes, hpke.X25519PrivateKey] | None = None
        self.clock = clock
        self.entropy = entropy
        self.limiter = limiter if limiter is not None else HandshakeLimiter()
        self.address_limiter = address_limiter
        self.global_limiter = global_limiter
        self.replays = (
            replays
            if replays is not None
            else ScopedNonceCaches(HANDSHAKE_REPLAY_TTL, REPLAYS_PER_DID, clock)
        )

    @property
    def _kem_private(self) -> hpke.X25519PrivateKey:
        """The static KEM key, loaded once (and again only if the identity's key changes)."""
        raw = self.identity.kem.private
        if self._kem is None or self._kem[0] is not raw:
            self._kem = (raw, hpke.load_private(raw))
        return self._kem[1]

    async def process(
        self,
        sender_did: str,
        payload: bytes,
        signature: bytes,
        ctx_id: str | None = None,
        *,
        source: str = "",
    ) -> tuple[dict[str, str], Session]:
        """Check the request, cheapest checks first, answer it, create the session.

        Order: size and shape of the payload, DIDs (sender = ``initDid``, ``respDid`` = us),
        timestamp, context, ``info``/``exportCtx``, key sizes, replay (read only), then the
        costly part: DID resolution (cached, unknown DIDs too), the signature, the rate
        limits (the sender's, its source address's, the server's) and the session
        allowance, and only then is the replay key reserved and the HPKE work done.
        Nothing a request changes before its signature verifies. ``source`` is the
        sender's network address (the HTTP peer), for the per-address limits.
        ``ctx_id`` is the envelope's ``context_id`` (what the reference binds); without an
        envelope it is read from ``exportCtx``, which must name it either way.
        """
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise InvalidMessageError("handshake payload too large", code="bad_handshake")
        fields = _load_json_object(payload, "handshake payload")
        missing = [k for k in _REQUEST_FIELDS if not fields.get(k)]
        if missing:
            raise InvalidMessageError(f"handshake payload lacks {missing[0]}", code="bad_handshake")
        if any(len(value) > MAX_FIELD_BYTES for value in fields.values()) or len(fields) > 16:
            raise InvalidMessageError("handshake field too long", code="bad_handshake")
        try:
            profile = PeerProfile(fields.get(PROFILE_FIELD, PeerProfile.GO.value))
        except ValueError:
            raise InvalidMessageError("unknown peer profile", code="bad_handshake") from None
        # DIDs compare as DIDs (aliases, address case); the strings as sent are what the
        # key schedule binds, on both sides.
        sender = parse_did(sender_did)
        if parse_did(fields["initDid"]) != sender or parse_did(fields["respDid"]) != (
            self.identity.did
        ):
            raise InvalidMessageError("handshake DIDs do not match", code="did_mismatch")
        ts = parse_rfc3339(fields["ts"], "ts") / 1e9
        if abs(ts - self.clock()) > HANDSHAKE_SKEW:
            raise TimestampSkewError("handshake timestamp outside tolerance")
        ctx_id = _ctx_from_export(fields["exportCtx"]) if ctx_id is None else ctx_id
        if not _bound_text(ctx_id):
            raise InvalidMessageError("handshake context id invalid", code="bad_handshake")
        init_did, resp_did = fields["initDid"], fields["respDid"]
        info = build_info(ctx_id, init_did, resp_did)
        export_ctx = build_export_ctx(ctx_id)
        if fields["info"].encode() != info or fields["exportCtx"].encode() != export_ctx:
            raise InvalidMessageError("info or exportCtx mismatch", code="bad_handshake")
        enc, eph_c = from_b64url(fields["enc"], "enc"), from_b64url(fields["ephC"], "ephC")
        if len(enc) != 32 or len(eph_c) != 32:
            raise InvalidMessageError("enc and ephC must be 32 bytes", code="bad_handshake")
        replays = self.replays.scope(sender)
        replay_key = f"{ctx_id}|{fields['nonce']}".encode()
        _check_replay(replays.check(replay_key, ts))

        document = await self.resolver.resolve(sender)
        document.verify(payload, signature)
        self.limiter.hit(sender)
        if self.address_limiter is not None:
            self.address_limiter.hit(source)
        self.sessions.check_shares(init_did, source)  # at its limit: spend nothing shared
        if self.global_limiter is not None:
            self.global_limiter.hit(newcomer=not self.sessions.is_established(init_did))
        self.sessions.admit(init_did, source=source)
        if not replays.mark_new(replay_key, ts):  # a concurrent twin won since the check
            raise ReplayError("handshake replayed", code="handshake_replay")

        context = hpke.setup_base_receiver(enc, self._kem_private, info, self.identity.kem.public)
        eph_s_private = hpke.load_private(self.entropy.random(32))
        eph_s = hpke.public_bytes(eph_s_private)
        seed = combine_seed(
            context.export(export_ctx, 32), x25519_e2e(eph_s_private, eph_c), export_ctx
        )
        kid = f"kid-{self.entropy.uuid4()}"
        th = transcript_hash(info, export_ctx, enc, eph_c, eph_s, init_did, resp_did)
        response = {
            "v": VERSION,
            "task": TASK,
            "ctx": ctx_id,
            "kid": kid,
            "ephS": b64url(eph_s),
            "ackTagB64": b64url(ack_tag(seed, ctx_id, fields["nonce"], kid, th)),
            "ts": format_rfc3339(self.entropy.time_ns()),
            "did": str(self.identity.did),
            "infoHash": _sha256_b64(info),
            "exportCtxHash": _sha256_b64(export_ctx),
            "enc": fields["enc"],
            "ephC": fields["ephC"],
        }
        response["sigB64"] = b64url(self.identity.signing_key.sign(answer_signed_bytes(response)))
        session = self.sessions.create(
            session_id(seed),
            Role.RESPONDER,
            seed,
            peer_did=init_did,
            kid=kid,
            profile=profile,
            source=source,
        )
        return response, session


def _bound_text(value: object) -> bool:
    """A non-empty string that fits the ackTag's length prefixes and is valid UTF-8."""
    if not isinstance(value, str) or not value:
        return False
    try:
        return len(value.encode()) <= MAX_FIELD_BYTES
    except UnicodeEncodeError:  # a lone surrogate from a caller that skipped the JSON layer
        return False


def _check_replay(status: NonceStatus) -> None:
    if status is NonceStatus.INVALID:
        raise ReplayError("handshake replayed", code="handshake_replay")
    if status is NonceStatus.EXPIRED:
        raise TimestampSkewError("handshake outside the replay window", code="nonce_expired")


def _ctx_from_export(export_ctx: str) -> str:
    _, sep, ctx_id = export_ctx.rpartition("|ctx=")
    if not sep or not ctx_id or len(ctx_id) > 128:
        raise InvalidMessageError("exportCtx lacks ctx", code="bad_handshake")
    return ctx_id
