"""RFC 9180 HPKE, base mode, for the one suite SAGE negotiates.

Suite: DHKEM(X25519, HKDF-SHA256) ``0x0020``, HKDF-SHA256 ``0x0001``,
ChaCha20-Poly1305 ``0x0003``. The handshake only needs the exporter, but seal/open are
provided too so the whole key schedule can be checked against RFC 9180 Appendix A.2.1.

The key schedule is written here on top of ``cryptography`` primitives rather than
wrapping ``pyhpke``: ``pyhpke`` advances the receiver's sequence number even when an
open fails, so one forged ciphertext desynchronises the context for good, which
RFC 9180 section 5.2 forbids (the sequence is only incremented after a successful open).
"""

from __future__ import annotations

import hmac as _std_hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from sage_otel.agent.errors import CryptoError

__all__ = [
    "AEAD_ID",
    "KDF_ID",
    "KEM_ID",
    "Context",
    "derive_key_pair",
    "generate_key_pair",
    "public_key",
    "setup_base_receiver",
    "setup_base_sender",
]

KEM_ID = 0x0020
KDF_ID = 0x0001
AEAD_ID = 0x0003

_MODE_BASE = 0x00
_VERSION_LABEL = b"HPKE-v1"
_KEM_SUITE_ID = b"KEM" + KEM_ID.to_bytes(2, "big")
_HPKE_SUITE_ID = (
    b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
)

_NH = 32  # HKDF-SHA256 output size
_NSECRET = 32  # KEM shared secret size
_NSK = 32  # X25519 private key size
_NPK = 32  # X25519 public key size (also Nenc)
_NK = 32  # ChaCha20-Poly1305 key size
_NN = 12  # ChaCha20-Poly1305 nonce size
_MAX_SEQ = (1 << (8 * _NN)) - 1
_MAX_EXPAND = 255 * _NH
_ZERO_DH = bytes(32)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract; an empty salt equals HashLen zero bytes under HMAC's key padding.

    The standard library's one-shot HMAC (OpenSSL underneath) costs a fraction of building
    an HMAC object per call, and a handshake makes a dozen of these."""
    return _std_hmac.digest(salt, ikm, "sha256")


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, _VERSION_LABEL + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = length.to_bytes(2, "big") + _VERSION_LABEL + suite_id + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled_info).derive(prk)


def load_private(sk: bytes | X25519PrivateKey) -> X25519PrivateKey:
    """A raw private key as a key object; loading computes the public key, a full scalar
    multiplication, so a handshake loads each key once and passes the object on."""
    if isinstance(sk, X25519PrivateKey):
        return sk
    if len(sk) != _NSK:
        raise CryptoError("hpke invalid private key")
    return X25519PrivateKey.from_private_bytes(sk)


def _load_public(pk: bytes) -> X25519PublicKey:
    if len(pk) != _NPK:
        raise CryptoError("hpke invalid public key")
    return X25519PublicKey.from_public_bytes(pk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _dh(sk: X25519PrivateKey, pk: X25519PublicKey) -> bytes:
    """X25519 with the all-zero output (a low-order peer point) rejected, RFC 9180 7.1.4."""
    try:
        dh = sk.exchange(pk)
    except ValueError:
        raise CryptoError("hpke invalid dh result") from None
    if _std_hmac.compare_digest(dh, _ZERO_DH):
        raise CryptoError("hpke invalid dh result")
    return dh


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", kem_context, _NSECRET)


def derive_key_pair(ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 DeriveKeyPair: deterministic ``(sk, pk)`` from input keying material.

    ``ikm`` must carry at least as much entropy as a private key, so fewer than 32 bytes
    are refused.
    """
    sk_bytes, sk = _derive_private(ikm)
    return sk_bytes, public_bytes(sk)


def _derive_private(ikm: bytes) -> tuple[bytes, X25519PrivateKey]:
    if len(ikm) < _NSK:
        raise CryptoError("hpke ikm too short")
    dkp_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk_bytes = _labeled_expand(_KEM_SUITE_ID, dkp_prk, b"sk", b"", _NSK)
    return sk_bytes, X25519PrivateKey.from_private_bytes(sk_bytes)


def public_key(sk: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    return public_bytes(load_private(sk))


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh random X25519 ``(sk, pk)`` pair, raw 32 bytes each."""
    sk = X25519PrivateKey.generate()
    return private_bytes(sk), public_bytes(sk)


class Context:
    """An HPKE encryption context for one direction: a sender seals, a receiver opens.

    Both ends can export. Key material is kept out of ``repr``.
    """

    __slots__ = ("_aead", "_base_nonce", "_exporter_secret", "_is_sender", "_seq")

    def __init__(
        self, key: bytes, base_nonce: bytes, exporter_secret: bytes, *, is_sender: bool
    ) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._base_nonce = base_nonce
        self._exporter_secret = exporter_secret
        self._is_sender = is_sender
        self._seq = 0

    def __repr__(self) -> str:
        role = "sender" if self._is_sender else "receiver"
        return f"<hpke.Context {role} seq={self._seq}>"

    def _nonce(self) -> bytes:
        if self._seq >= _MAX_SEQ:
            raise CryptoError("hpke message limit reached")
        seq = self._seq.to_bytes(_NN, "big")
        return bytes(a ^ b for a, b in zip(self._base_nonce, seq, strict=True))

    def seal(self, aad: bytes, pt: bytes) -> bytes:
        """Encrypt the next message in sequence (sender only)."""
        if not self._is_sender:
            raise RuntimeError("hpke receiver context cannot seal")
        ct = self._aead.encrypt(self._nonce(), pt, aad)
        self._seq += 1
        return ct

    def open(self, aad: bytes, ct: bytes) -> bytes:
        """Decrypt the next message in sequence (receiver only).

        The sequence number only advances on success, so a forged message does not break
        the context for the genuine ones that follow.
        """
        if self._is_sender:
            raise RuntimeError("hpke sender context cannot open")
        try:
            pt = self._aead.decrypt(self._nonce(), ct, aad)
        except InvalidTag:
            raise CryptoError("hpke open failed") from None
        self._seq += 1
        return pt

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """RFC 9180 secret export; both ends derive the same value."""
        if not 0 < length <= _MAX_EXPAND:
            raise ValueError(f"hpke export length must be in 1..{_MAX_EXPAND}")
        return _labeled_expand(
            _HPKE_SUITE_ID, self._exporter_secret, b"sec", exporter_context, length
        )


def _key_schedule(shared_secret: bytes, info: bytes, *, is_sender: bool) -> Context:
    psk_id_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"info_hash", info)
    ks_context = bytes([_MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE_ID, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE_ID, secret, b"key", ks_context, _NK)
    base_nonce = _labeled_expand(_HPKE_SUITE_ID, secret, b"base_nonce", ks_context, _NN)
    exporter_secret = _labeled_expand(_HPKE_SUITE_ID, secret, b"exp", ks_context, _NH)
    return Context(key, base_nonce, exporter_secret, is_sender=is_sender)


def setup_base_sender(
    pk_r: bytes, info: bytes, *, ikm_e: bytes | None = None
) -> tuple[bytes, Context]:
    """SetupBaseS: encapsulate to ``pk_r`` and return ``(enc, context)``.

    ``ikm_e`` fixes the ephemeral key and exists only to reproduce test vectors; real
    callers leave it out so the ephemeral key is fresh and random.
    """
    pk = _load_public(pk_r)
    sk_e = X25519PrivateKey.generate() if ikm_e is None else _derive_private(ikm_e)[1]
    dh = _dh(sk_e, pk)
    enc = public_bytes(sk_e)
    shared_secret = _extract_and_expand(dh, enc + pk_r)
    return enc, _key_schedule(shared_secret, info, is_sender=True)


def setup_base_receiver(
    enc: bytes, sk_r: bytes | X25519PrivateKey, info: bytes, pk_r: bytes | None = None
) -> Context:
    """SetupBaseR: decapsulate ``enc`` with ``sk_r`` and return the receiving context.

    A responder passes its static key as a loaded object with its public key ``pk_r``, so
    no handshake pays for loading it again."""
    pk_e = _load_public(enc)
    sk = load_private(sk_r)
    dh = _dh(sk, pk_e)
    shared_secret = _extract_and_expand(dh, enc + (pk_r or public_bytes(sk)))
    return _key_schedule(shared_secret, info, is_sender=False)
