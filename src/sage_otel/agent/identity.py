"""Agent identities: signing keys, X25519 key-agreement keys, and the DIDs derived from them.

Ethereum DIDs carry a secp256k1 key (address = last 20 bytes of Keccak-256 of the public
point); Solana DIDs carry an Ed25519 key (id = base58 of the public key). P-256 keys sign and
verify too (no chain derives a DID from one). Signatures are those of the SAGE reference:
Ed25519 over the raw message; secp256k1 over Keccak-256 with RFC 6979 nonces, low-s, 65 bytes
``r||s||v`` (through libsecp256k1); P-256 over SHA-256, raw ``r||s``, low-s.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from enum import Enum

import base58
import coincurve
from coincurve.ecdsa import cdata_to_der, deserialize_compact
from Crypto.Hash import keccak
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import InvalidMessageError, SignatureError


class Chain(str, Enum):
    ETHEREUM = "ethereum"
    SOLANA = "solana"


class KeyType(str, Enum):
    ED25519 = "ed25519"
    SECP256K1 = "secp256k1"
    P256 = "p256"


CHAIN_ALIASES = {
    "ethereum": Chain.ETHEREUM,
    "eth": Chain.ETHEREUM,
    "solana": Chain.SOLANA,
    "sol": Chain.SOLANA,
}
CHAIN_KEY_TYPE = {Chain.ETHEREUM: KeyType.SECP256K1, Chain.SOLANA: KeyType.ED25519}

_ETH_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}(?::\d{1,20})?$")
_IDENTIFIER = re.compile(r"^[\x21-\x7e]{1,128}$")  # opaque, visible ASCII, bounded
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
MAX_DID_LENGTH = 200


def keccak256(data: bytes) -> bytes:
    return keccak.new(data=data, digest_bits=256).digest()


def parse_chain(name: object) -> Chain:
    """A chain name, case- and whitespace-insensitive, aliases ``eth``/``sol`` accepted."""
    chain = CHAIN_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if chain is None:
        raise InvalidMessageError("unknown chain", code="bad_did")
    return chain


@dataclass(frozen=True)
class DID:
    """``did:sage:<chain>:<identifier>``.

    Two DIDs are equal when chain and identifier are (Ethereum addresses compare without
    case); ``str()`` gives back the text the DID was parsed from, because that text is what
    the peer signed and bound into the handshake.
    """

    chain: Chain
    identifier: str
    text: str = field(default="", compare=False, repr=False)

    def __str__(self) -> str:
        return self.text or f"did:sage:{self.chain.value}:{self.identifier}"


def parse_did(text: object) -> DID:
    """Parse ``did:sage:<chain>:<identifier>``; the identifier is opaque and keeps its colons."""
    if not isinstance(text, str) or len(text) > MAX_DID_LENGTH:
        raise InvalidMessageError("DID must be a short string", code="bad_did")
    parts = text.split(":", 3)
    if len(parts) != 4 or parts[0] != "did" or parts[1] != "sage":
        raise InvalidMessageError("not a did:sage DID", code="bad_did")
    chain = parse_chain(parts[2])
    ident = parts[3]
    if not _IDENTIFIER.fullmatch(ident):
        raise InvalidMessageError("malformed did:sage identifier", code="bad_did")
    if chain is Chain.ETHEREUM and _ETH_ADDRESS.fullmatch(ident):
        ident = ident.lower()
    return DID(chain, ident, text)


def ethereum_address(public_key: bytes) -> str:
    """``0x`` + hex of the last 20 bytes of Keccak-256 over the uncompressed point."""
    raw = _secp256k1_public(public_key).format(compressed=False)
    return "0x" + keccak256(raw[1:])[-20:].hex()


def did_for_key(chain: Chain, key_type: KeyType, public_key: bytes) -> DID:
    if CHAIN_KEY_TYPE[chain] is not key_type:
        raise InvalidMessageError(
            f"{chain.value} DIDs need {CHAIN_KEY_TYPE[chain].value} keys", code="bad_key_type"
        )
    if chain is Chain.ETHEREUM:
        return DID(chain, ethereum_address(public_key))
    return DID(chain, base58.b58encode(public_key).decode("ascii"))


def key_matches_did(did: DID, key_type: KeyType, public_key: bytes) -> bool:
    """Whether ``did`` is derived from this key (an opaque identifier never is)."""
    try:
        return (
            did_for_key(did.chain, key_type, public_key).identifier == did.identifier.split(":")[0]
        )
    except (InvalidMessageError, SignatureError, ValueError, KeyError):
        return False


def key_id(public_key: bytes) -> str:
    """The reference's ``keys.KeyID``: hex of the first 8 bytes of SHA-256(public key)."""
    return hashlib.sha256(public_key).digest()[:8].hex()


def _secp256k1_public(public_key: bytes) -> coincurve.PublicKey:
    try:
        return coincurve.PublicKey(public_key)
    except (ValueError, TypeError) as exc:
        raise SignatureError("invalid secp256k1 public key") from exc


def _verify_secp256k1(public_key: bytes, digest: bytes, signature: bytes) -> None:
    """64-byte ``r||s``, 65-byte ``r||s||v`` or DER, as the reference accepts; low-s only.

    In the 65-byte form ``v`` (0/1, or 27/28) must recover this very key, so one signature
    has one encoding of each form.
    """
    if len(signature) in (64, 65):
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    else:
        try:
            r, s = decode_dss_signature(signature)
        except ValueError as exc:
            raise SignatureError("secp256k1 signature is not 64, 65 bytes or DER") from exc
    if not (0 < r < _SECP256K1_N and 0 < s <= _SECP256K1_N // 2):
        raise SignatureError("secp256k1 signature out of range or not low-s")
    key = _secp256k1_public(public_key)
    if len(signature) == 65:
        v = signature[64] - 27 if signature[64] >= 27 else signature[64]
        if v not in (0, 1):
            raise SignatureError("secp256k1 recovery id must be 0, 1, 27 or 28")
        try:
            recovered = coincurve.PublicKey.from_signature_and_message(
                signature[:64] + bytes([v]), digest, hasher=None
            )
        except (ValueError, TypeError) as exc:
            raise SignatureError("secp256k1 signature does not recover") from exc
        if recovered.format() != key.format():
            raise SignatureError("signature verification failed")
        return
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if not key.verify(cdata_to_der(deserialize_compact(compact)), digest, hasher=None):
        raise SignatureError("signature verification failed")


def _verify_p256(public_key: bytes, data: bytes, signature: bytes) -> None:
    if len(signature) != 64:
        raise SignatureError("p256 signature must be 64 bytes (r||s)")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < _P256_N and 0 < s <= _P256_N // 2):
        raise SignatureError("p256 signature out of range or not low-s")
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    point.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))


def verify_signature(key_type: KeyType, public_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is valid for ``data``."""
    try:
        if key_type is KeyType.ED25519:
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        elif key_type is KeyType.SECP256K1:
            _verify_secp256k1(public_key, keccak256(data), signature)
        elif key_type is KeyType.P256:
            _verify_p256(public_key, data, signature)
        else:
            raise SignatureError("unsupported key type")
    except (InvalidSignature, ValueError) as exc:
        if isinstance(exc, SignatureError):
            raise
        raise SignatureError("signature verification failed") from exc


def verify_digest(key_type: KeyType, public_key: bytes, digest: bytes, signature: bytes) -> None:
    """Verify a signature over a 32-byte digest used as is (key proofs of possession).

    Ed25519 has no prehashed form: the digest is its message.
    """
    try:
        if key_type is KeyType.SECP256K1:
            _verify_secp256k1(public_key, digest, signature)
        elif key_type is KeyType.ED25519:
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, digest)
        else:
            raise SignatureError("unsupported key type for a digest signature")
    except (InvalidSignature, ValueError) as exc:
        if isinstance(exc, SignatureError):
            raise
        raise SignatureError("signature verification failed") from exc


_PrivateKey = ed25519.Ed25519PrivateKey | coincurve.PrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class SigningKey:
    """An identity key pair; ``sign`` returns what the SAGE reference signs (module docstring)."""

    key_type: KeyType
    _private: _PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, key_type: KeyType) -> SigningKey:
        if key_type is KeyType.ED25519:
            return cls(key_type, ed25519.Ed25519PrivateKey.generate())
        if key_type is KeyType.SECP256K1:
            return cls(key_type, coincurve.PrivateKey())
        return cls(key_type, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_private_bytes(cls, key_type: KeyType, secret: bytes) -> SigningKey:
        """Ed25519 from its 32-byte seed; secp256k1 from its scalar; P-256 from a scalar
        reduced modulo the group order (how the reference derives keys from labels)."""
        if key_type is KeyType.ED25519:
            return cls(key_type, ed25519.Ed25519PrivateKey.from_private_bytes(secret))
        if key_type is KeyType.SECP256K1:
            return cls(key_type, coincurve.PrivateKey(secret))
        scalar = int.from_bytes(secret, "big") % _P256_N
        return cls(key_type, ec.derive_private_key(scalar, ec.SECP256R1()))

    @property
    def algorithm(self) -> str:
        return self.key_type.value

    def public_bytes(self) -> bytes:
        """Ed25519 raw 32 bytes; secp256k1 compressed 33; P-256 uncompressed 65."""
        private = self._private
        if isinstance(private, coincurve.PrivateKey):
            return private.public_key.format(compressed=True)
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        return private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def private_bytes(self) -> bytes:
        """The secret as :meth:`from_private_bytes` takes it (for the identity file only)."""
        private = self._private
        if isinstance(private, coincurve.PrivateKey):
            return private.secret
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        return private.private_numbers().private_value.to_bytes(32, "big")

    def key_data(self) -> bytes:
        """The public key as the reference serialises it (secp256k1 uncompressed, 65 bytes)."""
        if isinstance(self._private, coincurve.PrivateKey):
            return self._private.public_key.format(compressed=False)
        return self.public_bytes()

    def key_id(self) -> str:
        return key_id(self.key_data())

    def sign(self, data: bytes) -> bytes:
        private = self._private
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return private.sign(data)
        if isinstance(private, coincurve.PrivateKey):
            return private.sign_recoverable(keccak256(data), hasher=None)
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        s = min(s, _P256_N - s)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest as is (key proofs of possession); see :func:`verify_digest`."""
        private = self._private
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return private.sign(digest)
        if isinstance(private, coincurve.PrivateKey):
            return private.sign_recoverable(digest, hasher=None)
        raise SignatureError("unsupported key type for a digest signature")

    def verify(self, data: bytes, signature: bytes) -> None:
        verify_signature(self.key_type, self.public_bytes(), data, signature)


@dataclass
class KemKeyPair:
    """The X25519 key an agent publishes in its DID document for HPKE."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> KemKeyPair:
        key = x25519.X25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(raw, pub)

    @classmethod
    def from_private_bytes(cls, secret: bytes) -> KemKeyPair:
        key = x25519.X25519PrivateKey.from_private_bytes(secret)
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(bytes(secret), pub)


@dataclass
class AgentIdentity:
    """Everything an agent needs to prove who it is: DID, signing key, KEM key, key id."""

    did: DID
    signing_key: SigningKey
    kem: KemKeyPair
    kid: str

    @classmethod
    def generate(cls, chain: Chain | str) -> AgentIdentity:
        chain = chain if isinstance(chain, Chain) else parse_chain(chain)
        key = SigningKey.generate(CHAIN_KEY_TYPE[chain])
        did = did_for_key(chain, key.key_type, key.public_bytes())
        return cls(did, key, KemKeyPair.generate(), new_kid())

    @classmethod
    def from_secrets(
        cls, chain: Chain | str, signing_secret: bytes, kem_secret: bytes
    ) -> AgentIdentity:
        """An identity from fixed secrets (see :meth:`SigningKey.from_private_bytes`)."""
        chain = chain if isinstance(chain, Chain) else parse_chain(chain)
        key = SigningKey.from_private_bytes(CHAIN_KEY_TYPE[chain], signing_secret)
        did = did_for_key(chain, key.key_type, key.public_bytes())
        return cls(did, key, KemKeyPair.from_private_bytes(kem_secret), new_kid())


def new_kid() -> str:
    return f"kid-{uuid.uuid4()}"
