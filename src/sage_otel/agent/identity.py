"""Agent identities: signing keys, X25519 key-agreement keys, and the DIDs derived from them.

Ethereum DIDs carry a secp256k1 key (address = last 20 bytes of Keccak-256 of the public
point, signatures over Keccak-256 like the reference); Solana DIDs carry an Ed25519 key
(id = base58 of the public key).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from enum import Enum

import base58
from Crypto.Hash import keccak
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
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


CHAIN_ALIASES = {
    "ethereum": Chain.ETHEREUM,
    "eth": Chain.ETHEREUM,
    "solana": Chain.SOLANA,
    "sol": Chain.SOLANA,
}
CHAIN_KEY_TYPE = {Chain.ETHEREUM: KeyType.SECP256K1, Chain.SOLANA: KeyType.ED25519}

_ETH_ID = re.compile(r"^0x[0-9a-fA-F]{40}(?::\d{1,20})?$")
_B58_ALPHABET = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def keccak256(data: bytes) -> bytes:
    return keccak.new(data=data, digest_bits=256).digest()


@dataclass(frozen=True)
class DID:
    chain: Chain
    identifier: str

    def __str__(self) -> str:
        return f"did:sage:{self.chain.value}:{self.identifier}"


def parse_did(text: object) -> DID:
    """Parse ``did:sage:<chain>:<id>``; chain aliases ``eth``/``sol`` are normalised."""
    if not isinstance(text, str) or len(text) > 200:
        raise InvalidMessageError("DID must be a string", code="bad_did")
    parts = text.split(":", 3)
    if len(parts) != 4 or parts[0] != "did" or parts[1] != "sage":
        raise InvalidMessageError("not a did:sage DID", code="bad_did")
    chain = CHAIN_ALIASES.get(parts[2].lower())
    ident = parts[3]
    if chain is Chain.ETHEREUM and _ETH_ID.fullmatch(ident):
        return DID(chain, ident.lower())
    if chain is Chain.SOLANA and 32 <= len(ident) <= 44 and set(ident) <= _B58_ALPHABET:
        return DID(chain, ident)
    raise InvalidMessageError("malformed did:sage identifier", code="bad_did")


def ethereum_address(public_key: bytes) -> str:
    """``0x`` + hex of the last 20 bytes of Keccak-256 over the uncompressed point."""
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
    raw = point.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
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
    try:
        return (
            did_for_key(did.chain, key_type, public_key).identifier == did.identifier.split(":")[0]
        )
    except (InvalidMessageError, ValueError):
        return False


def verify_signature(key_type: KeyType, public_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is valid for ``data``."""
    try:
        if key_type is KeyType.ED25519:
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
            return
        if len(signature) != 64:
            raise SignatureError("secp256k1 signature must be 64 bytes (r||s)")
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        if s > _SECP256K1_N // 2:  # malleable high-s form, refused like go-ethereum does
            raise SignatureError("secp256k1 signature not in low-s form")
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
        point.verify(
            encode_dss_signature(r, s), keccak256(data), ec.ECDSA(Prehashed(hashes.SHA256()))
        )
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature verification failed") from exc


@dataclass
class SigningKey:
    """An identity key pair; ``sign`` returns Ed25519 or 64-byte low-s secp256k1 r||s."""

    key_type: KeyType
    _private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def generate(cls, key_type: KeyType) -> SigningKey:
        if key_type is KeyType.ED25519:
            return cls(key_type, ed25519.Ed25519PrivateKey.generate())
        return cls(key_type, ec.generate_private_key(ec.SECP256K1()))

    @property
    def algorithm(self) -> str:
        return self.key_type.value

    def public_bytes(self) -> bytes:
        pub = self._private.public_key()
        if self.key_type is KeyType.ED25519:
            return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._private, ed25519.Ed25519PrivateKey):
            return self._private.sign(data)
        der = self._private.sign(keccak256(data), ec.ECDSA(Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(der)
        s = min(s, _SECP256K1_N - s)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

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


@dataclass
class AgentIdentity:
    """Everything an agent needs to prove who it is: DID, signing key, KEM key, key id."""

    did: DID
    signing_key: SigningKey
    kem: KemKeyPair
    kid: str

    @classmethod
    def generate(cls, chain: Chain | str) -> AgentIdentity:
        chain = CHAIN_ALIASES[chain.lower()] if isinstance(chain, str) else chain
        key = SigningKey.generate(CHAIN_KEY_TYPE[chain])
        did = did_for_key(chain, key.key_type, key.public_bytes())
        return cls(did, key, KemKeyPair.generate(), new_kid())


def new_kid() -> str:
    return f"kid-{uuid.uuid4()}"
