"""Key proofs: proof of possession of a DID's key, and the A2A agent-card proof.

Both are the SAGE DID method's: a registrar asks an agent to sign a challenge that binds its
DID to its key (``SAGE-PoP:<did>:<hex key>``, signed over its SHA-256), and an agent card
(a JSON-LD document) carries a proof over its RFC 8785 canonical form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import base58

from . import identity as _identity
from .canonical import jcs, loads_ieee
from .errors import InvalidMessageError, SignatureError
from .identity import DID, KeyType, SigningKey

POP_PREFIX = "SAGE-PoP:"
MAX_CARD_BYTES = 64 * 1024
_CARD_KEY_TYPES = {
    "Ed25519VerificationKey2020": KeyType.ED25519,
    "EcdsaSecp256k1VerificationKey2019": KeyType.SECP256K1,
}


def pop_challenge(did: DID | str, key_data: bytes) -> str:
    """``SAGE-PoP:<did>:<hex of the public key as the reference serialises it>``."""
    return f"{POP_PREFIX}{did}:{key_data.hex()}"


def prove_possession(key: SigningKey, did: DID | str) -> bytes:
    """Sign SHA-256 of the challenge (not Keccak, even for secp256k1: the reference's rule)."""
    digest = hashlib.sha256(pop_challenge(did, key.key_data()).encode()).digest()
    return key.sign_digest(digest)


def verify_possession(key_type: KeyType, key_data: bytes, did: DID | str, proof: bytes) -> None:
    """Raise :class:`SignatureError` unless ``proof`` proves possession of ``key_data``."""
    digest = hashlib.sha256(pop_challenge(did, key_data).encode()).digest()
    _identity.verify_digest(key_type, key_data, digest, proof)  # looked up late: instrumented


def sign_agent_card(card: Mapping[str, object], key: SigningKey, method: str, created: str) -> dict:
    """The card with a proof over the JCS form of everything but ``proof``."""
    body = {k: v for k, v in card.items() if k != "proof"}
    proof_type = (
        "Ed25519Signature2020"
        if key.key_type is KeyType.ED25519
        else ("EcdsaSecp256k1Signature2019")
    )
    signature = key.sign(jcs(body))
    return {
        **body,
        "proof": {
            "type": proof_type,
            "created": created,
            "verificationMethod": method,
            "proofPurpose": "assertionMethod",
            "proofValue": base58.b58encode(signature).decode("ascii"),
        },
    }


def verify_agent_card(card_json: str | bytes) -> dict:
    """Verify an A2A agent card's proof with the card's own verification method.

    Returns the card. A card whose key is not the one its DID is registered with proves
    only self-consistency: callers compare the key with the resolved DID document.
    """
    if len(card_json) > MAX_CARD_BYTES:
        raise InvalidMessageError("agent card too large", code="bad_card")
    try:
        card = loads_ieee(card_json)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessageError("agent card is not JSON", code="bad_card") from exc
    if not isinstance(card, dict) or not isinstance(card.get("proof"), dict):
        raise InvalidMessageError("agent card lacks a proof", code="bad_card")
    proof = card["proof"]
    method = proof.get("verificationMethod")
    keys = card.get("publicKey")
    matching = (
        [k for k in keys if isinstance(k, dict) and k.get("id") == method]
        if isinstance(keys, list)
        else []
    )
    key_type = matching[0].get("type") if len(matching) == 1 else None
    if not isinstance(key_type, str) or key_type not in _CARD_KEY_TYPES:
        raise InvalidMessageError("agent card proof names no usable key", code="bad_card")
    entry = matching[0]
    key_hex, proof_value = entry.get("publicKeyHex"), proof.get("proofValue")
    if not isinstance(key_hex, str) or not isinstance(proof_value, str):
        raise InvalidMessageError("agent card key or proof malformed", code="bad_card")
    try:
        public_key = bytes.fromhex(key_hex)
        signature = base58.b58decode(proof_value)
    except (ValueError, TypeError) as exc:
        raise InvalidMessageError("agent card key or proof malformed", code="bad_card") from exc
    body = {k: v for k, v in card.items() if k != "proof"}
    try:
        _identity.verify_signature(_CARD_KEY_TYPES[entry["type"]], public_key, jcs(body), signature)
    except SignatureError:
        raise SignatureError("agent card proof invalid", code="bad_card_proof") from None
    return card
