"""SAGE handshake and session key derivation, as pure functions.

Every label, separator and length prefix here is fixed by the SAGE reference
implementation: given identical inputs, the info strings, session id, ack tag and
directional keys must be byte-for-byte those of a Go peer, or the handshake fails.
"""

from __future__ import annotations

import base64
import hmac as _std_hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sage_otel.agent.errors import CryptoError

__all__ = [
    "COMBINER",
    "SUITE",
    "DirectionalKeys",
    "ack_tag",
    "build_export_ctx",
    "build_info",
    "combine_seed",
    "directional_keys",
    "expand_label",
    "session_id",
    "traffic_keys",
    "transcript_hash",
    "x25519_e2e",
]

SUITE = "hpke-base+x25519+hkdf-sha256"
COMBINER = "e2e-x25519-hkdf-v1"

_INFO_LABEL = "sage/hpke-info|v1"
_EXPORT_LABEL = "sage/hpke-export|v1"
_COMBINER_LABEL = b"SAGE-HPKE+E2E-Combiner"
_SESSION_ID_LABEL = b"sage/hpke+e2e v1"
_ACK_KEY_LABEL = b"SAGE-ack-key-v1"
_ACK_MSG_LABEL = b"SAGE-ack-msg|v1|"
_DIRECTIONAL_LABEL = b"sage-directional-keys-v1"
_ZERO32 = bytes(32)


def build_info(ctx_id: str, init_did: str, resp_did: str) -> bytes:
    """HPKE ``info``: binds suite, combiner, context and both DIDs into the key schedule."""
    return (
        f"{_INFO_LABEL}|suite={SUITE}|combiner={COMBINER}"
        f"|ctx={ctx_id}|init={init_did}|resp={resp_did}"
    ).encode()


def build_export_ctx(ctx_id: str) -> bytes:
    """HPKE exporter context, also the combiner's HKDF salt."""
    return f"{_EXPORT_LABEL}|suite={SUITE}|combiner={COMBINER}|ctx={ctx_id}".encode()


def combine_seed(exporter: bytes, ss_e2e: bytes, export_ctx: bytes) -> bytes:
    """Session seed from the HPKE exporter and the ephemeral X25519 secret.

    Mixing in ``ss_e2e`` gives forward secrecy: a later leak of the responder's static
    KEM key reveals the exporter but not the seed.
    """
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=export_ctx, info=_COMBINER_LABEL)
    return hkdf.derive(exporter + ss_e2e)


def session_id(seed: bytes) -> str:
    """Deterministic 22-character session id both peers compute from the same seed."""
    if not seed:
        raise ValueError("empty session seed")
    h = hashes.Hash(hashes.SHA256())
    h.update(_SESSION_ID_LABEL)
    h.update(seed)
    return base64.urlsafe_b64encode(h.finalize()[:16]).rstrip(b"=").decode("ascii")


def _hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    return _std_hmac.digest(key, b"".join(parts), "sha256")


def expand_label(key: bytes, info: bytes, n: int) -> bytes:
    """SAGE's counter expansion: ``HMAC(key, info || be32(i))`` for i = 1, 2, ..., truncated.

    This is not RFC 5869 HKDF-Expand (no previous block is fed back in); it must stay this
    way to match the reference's ack key.
    """
    if n < 0:
        raise ValueError("expand length must not be negative")
    out = bytearray()
    counter = 1
    while len(out) < n:
        out += _hmac_sha256(key, info, counter.to_bytes(4, "big"))
        counter += 1
    return bytes(out[:n])


def transcript_hash(
    info: bytes,
    export_ctx: bytes,
    enc: bytes,
    eph_c: bytes,
    eph_s: bytes,
    init_did: str,
    resp_did: str,
) -> bytes:
    """SHA-256 over the handshake transcript, each segment preceded by one 0x00 byte."""
    segments = (
        info,
        export_ctx,
        enc,
        eph_c,
        eph_s,
        init_did.encode(),
        resp_did.encode(),
    )
    h = hashes.Hash(hashes.SHA256())
    for segment in segments:
        h.update(b"\x00")
        h.update(segment)
    return h.finalize()


def _len16(value: str) -> bytes:
    data = value.encode()
    if len(data) > 0xFFFF:
        raise ValueError("ack field longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def ack_tag(seed: bytes, ctx_id: str, nonce: str, kid: str, th: bytes) -> bytes:
    """Responder's key confirmation: proves it holds the seed and saw the same transcript."""
    ack_key = expand_label(seed, _ACK_KEY_LABEL, 32)
    return _hmac_sha256(ack_key, _ACK_MSG_LABEL, _len16(ctx_id), _len16(nonce), _len16(kid), th)


def x25519_e2e(sk: bytes | X25519PrivateKey, pk: bytes) -> bytes:
    """Ephemeral X25519 for the forward-secrecy secret; a low-order peer key is refused."""
    if isinstance(sk, X25519PrivateKey):
        private = sk
    elif len(sk) == 32:
        private = X25519PrivateKey.from_private_bytes(sk)
    else:
        raise CryptoError("invalid x25519 key length")
    if len(pk) != 32:
        raise CryptoError("invalid x25519 key length")
    public = X25519PublicKey.from_public_bytes(pk)
    try:
        shared = private.exchange(public)
    except ValueError:
        raise CryptoError("x25519 produced an all-zero secret") from None
    if _std_hmac.compare_digest(shared, _ZERO32):
        raise CryptoError("x25519 produced an all-zero secret")
    return shared


@dataclass(frozen=True, slots=True)
class DirectionalKeys:
    """Per-direction session keys: the initiator sends with c2s, the responder with s2c."""

    c2s_encrypt: bytes
    c2s_sign: bytes
    s2c_encrypt: bytes
    s2c_sign: bytes

    def __repr__(self) -> str:
        return "DirectionalKeys(<redacted>)"


def directional_keys(seed: bytes, session_id: str) -> DirectionalKeys:
    """Split one HKDF output into the four directional keys, salted with the session id."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=128,
        salt=session_id.encode(),
        info=_DIRECTIONAL_LABEL,
    )
    okm = hkdf.derive(seed)
    return DirectionalKeys(
        c2s_encrypt=okm[0:32],
        c2s_sign=okm[32:64],
        s2c_encrypt=okm[64:96],
        s2c_sign=okm[96:128],
    )


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    """The reference's ``DeriveTrafficKeys``: keys, IVs and a channel binding from a seed.

    Its sessions key their AEAD from :func:`directional_keys` instead; these are kept so
    that an application binding a channel to the handshake derives the same values.
    """

    c2s_key: bytes
    c2s_iv: bytes
    s2c_key: bytes
    s2c_iv: bytes
    channel_binding: bytes

    def __repr__(self) -> str:
        return "TrafficKeys(<redacted>)"


def traffic_keys(seed: bytes) -> TrafficKeys:
    return TrafficKeys(
        c2s_key=expand_label(seed, b"SAGE-c2s:key", 32),
        c2s_iv=expand_label(seed, b"SAGE-c2s:iv", 12),
        s2c_key=expand_label(seed, b"SAGE-s2c:key", 32),
        s2c_iv=expand_label(seed, b"SAGE-s2c:iv", 12),
        channel_binding=expand_label(seed, b"SAGE-cb-v1", 32),
    )
