"""A handshake's crypto floor: the public-key operations it must do, each at its fastest.

A complete handshake (init, process, finalize) does, whatever the implementation:

* three X25519 key generations (the HPKE encapsulation key, ephC, ephS),
* four X25519 exchanges (encapsulation, decapsulation, and the end-to-end secret on each side),
* one signature and one verification with the initiator's identity key (the request), and
  one of each with the responder's (the answer).

Each primitive is timed with every well-kept implementation installed (OpenSSL through
``cryptography``, libsodium through PyNaCl, libsecp256k1 through ``coincurve``) and the
fastest counts. Hashing and key derivation (SHA-256, Keccak, HKDF, HMAC: a few microseconds
in all) are left out, so the floor is slightly below what any handshake can reach.
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable

import coincurve
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

try:  # libsodium is optional: the floor uses it when it is installed (the dev extra has it)
    import nacl.bindings
    import nacl.signing
except ImportError:  # pragma: no cover - depends on the environment
    nacl = None  # type: ignore[assignment]

KEY_TYPE = {"ethereum": "secp256k1", "solana": "ed25519"}
MESSAGE = os.urandom(400)  # about the size of a signed init payload or answer


def _candidates() -> dict[str, dict[str, Callable[[], object]]]:
    digest = os.urandom(32)
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_pub, ed_sig = ed.public_key(), ed.sign(MESSAGE)
    x_raw = os.urandom(32)
    x_key = x25519.X25519PrivateKey.from_private_bytes(x_raw)
    x_peer = x25519.X25519PrivateKey.generate().public_key()
    k1 = coincurve.PrivateKey()
    k1_der, k1_rec = k1.sign(digest, hasher=None), k1.sign_recoverable(digest, hasher=None)
    ossl_k1 = ec.derive_private_key(int.from_bytes(k1.secret, "big"), ec.SECP256K1())
    ossl_k1_sig = ossl_k1.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    ossl_k1_pub = ossl_k1.public_key()
    found: dict[str, dict[str, Callable[[], object]]] = {
        "x25519 key generation": {
            "cryptography": lambda: x25519.X25519PrivateKey.from_private_bytes(x_raw).public_key()
        },
        "x25519 exchange": {"cryptography": lambda: x_key.exchange(x_peer)},
        "ed25519 sign": {"cryptography": lambda: ed.sign(MESSAGE)},
        "ed25519 verify": {"cryptography": lambda: ed_pub.verify(ed_sig, MESSAGE)},
        "secp256k1 sign": {
            "coincurve": lambda: k1.sign_recoverable(digest, hasher=None),
            "cryptography": lambda: ossl_k1.sign(MESSAGE, ec.ECDSA(hashes.SHA256())),
        },
        "secp256k1 verify": {
            "coincurve": lambda: k1.public_key.verify(k1_der, digest, hasher=None),
            "coincurve recover": lambda: coincurve.PublicKey.from_signature_and_message(
                k1_rec, digest, hasher=None
            ),
            "cryptography": lambda: ossl_k1_pub.verify(
                ossl_k1_sig, MESSAGE, ec.ECDSA(hashes.SHA256())
            ),
        },
    }
    if nacl is not None:
        signer = nacl.signing.SigningKey.generate()
        verifier, na_sig = signer.verify_key, signer.sign(MESSAGE).signature
        na_peer = nacl.bindings.crypto_scalarmult_base(os.urandom(32))
        found["x25519 key generation"]["pynacl"] = lambda: nacl.bindings.crypto_scalarmult_base(
            x_raw
        )
        found["x25519 exchange"]["pynacl"] = lambda: nacl.bindings.crypto_scalarmult(x_raw, na_peer)
        found["ed25519 sign"]["pynacl"] = lambda: signer.sign(MESSAGE)
        found["ed25519 verify"]["pynacl"] = lambda: verifier.verify(MESSAGE, na_sig)
    return found


def primitives(number: int = 300, repeat: int = 5) -> dict[str, dict[str, float]]:
    """Microseconds per call of each primitive for each implementation (best of ``repeat``)."""
    return {
        op: {
            impl: min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6
            for impl, fn in impls.items()
        }
        for op, impls in _candidates().items()
    }


def floor_us(timings: dict[str, dict[str, float]], client_chain: str, server_chain: str) -> float:
    """The sum of the fastest implementation of every operation one handshake does."""
    best = {op: min(impls.values()) for op, impls in timings.items()}
    total = 3 * best["x25519 key generation"] + 4 * best["x25519 exchange"]
    for chain in (client_chain, server_chain):
        key = KEY_TYPE[chain]
        total += best[f"{key} sign"] + best[f"{key} verify"]
    return total


def fastest(timings: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    return {op: min(impls.items(), key=lambda item: item[1]) for op, impls in timings.items()}
