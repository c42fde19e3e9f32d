from __future__ import annotations

import base58
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from sage_otel.agent.errors import InvalidMessageError, SignatureError
from sage_otel.agent.identity import (
    DID,
    AgentIdentity,
    Chain,
    KemKeyPair,
    KeyType,
    SigningKey,
    did_for_key,
    ethereum_address,
    keccak256,
    key_matches_did,
    new_kid,
    parse_did,
    verify_signature,
)

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
ETH_ID = "0x" + "ab" * 20
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
SOL_ID = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"


def secp_key(secret: int) -> SigningKey:
    return SigningKey.from_private_bytes(KeyType.SECP256K1, secret.to_bytes(32, "big"))


def uncompressed(public_key: bytes) -> bytes:
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
    return point.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def test_keccak256_is_keccak_not_sha3() -> None:
    assert keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )


def test_ethereum_address_of_private_key_one() -> None:
    # The well-known address of secp256k1 private key 1.
    key = secp_key(1)
    assert ethereum_address(key.public_bytes()) == "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf"
    did = did_for_key(Chain.ETHEREUM, KeyType.SECP256K1, key.public_bytes())
    assert str(did) == "did:sage:ethereum:0x7e5f4552091a69125d5dfcb7b8c2659029395bdf"


def test_ethereum_did_is_keccak_of_uncompressed_point() -> None:
    identity = AgentIdentity.generate(Chain.ETHEREUM)
    public = identity.signing_key.public_bytes()
    assert identity.signing_key.key_type is KeyType.SECP256K1
    assert len(public) == 33 and public[0] in (2, 3)
    expected = "0x" + keccak256(uncompressed(public)[1:])[-20:].hex()
    assert identity.did == DID(Chain.ETHEREUM, expected)
    # Compressed and uncompressed encodings of the same point give the same address.
    assert ethereum_address(uncompressed(public)) == expected


def test_solana_did_is_base58_of_public_key() -> None:
    identity = AgentIdentity.generate(Chain.SOLANA)
    public = identity.signing_key.public_bytes()
    assert identity.signing_key.key_type is KeyType.ED25519
    assert len(public) == 32
    assert identity.did.chain is Chain.SOLANA
    assert base58.b58decode(identity.did.identifier) == public
    assert did_for_key(Chain.SOLANA, KeyType.ED25519, bytes(32)).identifier == "1" * 32


def test_generate_accepts_chain_aliases_and_makes_distinct_identities() -> None:
    eth, sol = AgentIdentity.generate("eth"), AgentIdentity.generate("sol")
    assert eth.did.chain is Chain.ETHEREUM and sol.did.chain is Chain.SOLANA
    assert len(eth.kem.public) == 32 and len(eth.kem.private) == 32
    other = AgentIdentity.generate("eth")
    assert other.did != eth.did and other.kid != eth.kid
    assert parse_did(str(eth.did)) == eth.did and parse_did(str(sol.did)) == sol.did


def test_kem_key_pair_is_x25519() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    pair = KemKeyPair.generate()
    derived = x25519.X25519PrivateKey.from_private_bytes(pair.private).public_key()
    assert derived.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == (
        pair.public
    )
    assert "private" not in repr(pair) and repr(pair.private) not in repr(pair)


def test_new_kid_format() -> None:
    kid = new_kid()
    assert kid.startswith("kid-") and len(kid) == 40 and kid != new_kid()


@pytest.mark.parametrize(
    ("chain", "key_type"), [(Chain.ETHEREUM, KeyType.ED25519), (Chain.SOLANA, KeyType.SECP256K1)]
)
def test_did_for_key_refuses_the_wrong_key_type(chain: Chain, key_type: KeyType) -> None:
    with pytest.raises(InvalidMessageError) as info:
        did_for_key(chain, key_type, bytes(33))
    assert info.value.code == "bad_key_type"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"did:sage:ethereum:{ETH_ID}", DID(Chain.ETHEREUM, ETH_ID)),
        (f"did:sage:eth:{ETH_ID}", DID(Chain.ETHEREUM, ETH_ID)),
        (f"did:sage:ETH:{ETH_ID.upper().replace('0X', '0x')}", DID(Chain.ETHEREUM, ETH_ID)),
        (f"did:sage:eth:{ETH_ID}:42", DID(Chain.ETHEREUM, f"{ETH_ID}:42")),
        (f"did:sage:solana:{SOL_ID}", DID(Chain.SOLANA, SOL_ID)),
        (f"did:sage:sol:{SOL_ID}", DID(Chain.SOLANA, SOL_ID)),
        (f"did:sage:Solana:{SOL_ID}", DID(Chain.SOLANA, SOL_ID)),
    ],
)
def test_parse_did_normalises_aliases(text: str, expected: DID) -> None:
    did = parse_did(text)
    assert did == expected
    assert str(did) == text  # the text as given is what the peer signs and binds


@pytest.mark.parametrize(
    "text",
    [
        None,
        42,
        b"did:sage:eth:" + ETH_ID.encode(),
        "",
        "did:sage",
        "did:sage:eth",
        f"did:web:eth:{ETH_ID}",
        f"DID:sage:eth:{ETH_ID}",
        f"did:sage:btc:{ETH_ID}",
        f"did:sage::{ETH_ID}",
        f"did:sage:eth:{ETH_ID}\n",
        f"did:sage:eth:{ETH_ID} ",
        "did:sage:eth:agent one",
        "did:sage:eth:agent\x00",
        "did:sage:eth:ägent",
        f"did:sage:sol:{SOL_ID}" + "x" * 200,
    ],
)
def test_parse_did_rejects(text: object) -> None:
    with pytest.raises(InvalidMessageError) as info:
        parse_did(text)
    assert info.value.code == "bad_did"


@pytest.mark.parametrize(
    "text",
    [
        "did:sage:eth:0x1234",
        "did:sage:eth:" + "ab" * 20,
        f"did:sage:eth:{ETH_ID}:x",
        f"did:sage:sol:{ETH_ID}",
        "did:sage:sol:" + "0" * 32,
        f"did:sage:sol:{SOL_ID}:1",
        "did:sage:ETHEREUM:agent-one",
    ],
)
def test_opaque_identifiers_parse_but_no_key_derives_them(text: str) -> None:
    """The spec's identifier is opaque: such DIDs are valid, but none can be registered
    with a key, because no key derives them."""
    did = parse_did(text)
    assert str(did) == text
    for chain in Chain:
        key = AgentIdentity.generate(chain).signing_key
        assert not key_matches_did(did, key.key_type, key.public_bytes())


DID_LIKE = st.builds(
    lambda chain, ident: f"did:sage:{chain}:{ident}",
    st.sampled_from(["ethereum", "eth", "solana", "sol", "ETH", "btc", ""]),
    st.text(max_size=60)
    | st.from_regex(r"0x[0-9a-fA-F]{40}(:[0-9]{1,3})?", fullmatch=True)
    | st.text(alphabet=B58 + "0Ol", max_size=50),
)


@given(st.text(max_size=250) | DID_LIKE)
def test_parse_did_on_arbitrary_text_returns_did_or_invalid(text: str) -> None:
    try:
        did = parse_did(text)
    except InvalidMessageError as exc:
        assert exc.code == "bad_did"
        return
    assert isinstance(did, DID)
    assert parse_did(str(did)) == did


@pytest.mark.parametrize("chain", [Chain.ETHEREUM, Chain.SOLANA])
def test_key_matches_did(chain: Chain) -> None:
    identity, other = AgentIdentity.generate(chain), AgentIdentity.generate(chain)
    key = identity.signing_key
    assert key_matches_did(identity.did, key.key_type, key.public_bytes())
    assert not key_matches_did(identity.did, key.key_type, other.signing_key.public_bytes())
    wrong_type = KeyType.ED25519 if key.key_type is KeyType.SECP256K1 else KeyType.SECP256K1
    assert not key_matches_did(identity.did, wrong_type, key.public_bytes())
    assert not key_matches_did(identity.did, key.key_type, b"\x02" + bytes(3))


def test_key_matches_ethereum_did_with_nonce_suffix() -> None:
    identity = AgentIdentity.generate(Chain.ETHEREUM)
    did = parse_did(f"{identity.did}:7")
    assert key_matches_did(did, KeyType.SECP256K1, identity.signing_key.public_bytes())


@pytest.mark.parametrize(
    ("key_type", "size"), [(KeyType.ED25519, 64), (KeyType.SECP256K1, 65), (KeyType.P256, 64)]
)
def test_sign_and_verify(key_type: KeyType, size: int) -> None:
    key = SigningKey.generate(key_type)
    assert key.algorithm == key_type.value
    signature = key.sign(b"hello agents")
    assert len(signature) == size
    key.verify(b"hello agents", signature)
    verify_signature(key_type, key.public_bytes(), b"hello agents", signature)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_verify_rejects_wrong_key_tampered_data_and_tampered_signature(key_type: KeyType) -> None:
    key, other = SigningKey.generate(key_type), SigningKey.generate(key_type)
    signature = key.sign(b"payload")
    with pytest.raises(SignatureError):
        verify_signature(key_type, other.public_bytes(), b"payload", signature)
    with pytest.raises(SignatureError):
        key.verify(b"payloaD", signature)
    for index in (0, 31, 32, 63):
        flipped = bytearray(signature)
        flipped[index] ^= 0x01
        with pytest.raises(SignatureError):
            key.verify(b"payload", bytes(flipped))
    for bad in (b"", signature[:63], signature + b"\x00" * 2, bytes(64), bytes(65)):
        with pytest.raises(SignatureError):
            key.verify(b"payload", bad)
    with pytest.raises(SignatureError):
        verify_signature(key_type, b"\x05" * 7, b"payload", signature)


def test_verify_rejects_signature_for_the_other_key_type() -> None:
    ed = SigningKey.generate(KeyType.ED25519)
    with pytest.raises(SignatureError):
        verify_signature(KeyType.SECP256K1, ed.public_bytes(), b"x", ed.sign(b"x"))


def test_secp256k1_signs_keccak_of_the_data() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import (
        Prehashed,
        encode_dss_signature,
    )

    key = secp_key(0xC0FFEE)
    signature = key.sign(b"message")
    assert len(signature) == 65 and signature[64] in (0, 1)
    assert key.sign(b"message") == signature  # RFC 6979: deterministic
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), key.public_bytes())
    public.verify(
        encode_dss_signature(r, s), keccak256(b"message"), ec.ECDSA(Prehashed(hashes.SHA256()))
    )


def test_secp256k1_signatures_are_low_s() -> None:
    key = SigningKey.generate(KeyType.SECP256K1)
    for i in range(64):
        signature = key.sign(b"msg-%d" % i)
        s = int.from_bytes(signature[32:64], "big")
        assert 0 < s <= SECP256K1_N // 2
        key.verify(b"msg-%d" % i, signature)


def test_ed25519_signature_is_standard() -> None:
    key = SigningKey.generate(KeyType.ED25519)
    public = ed25519.Ed25519PublicKey.from_public_bytes(key.public_bytes())
    public.verify(key.sign(b"data"), b"data")


def test_signing_key_repr_hides_private_key() -> None:
    key = SigningKey.generate(KeyType.ED25519)
    assert "_private" not in repr(key)


def test_secp256k1_high_s_signatures_are_refused() -> None:
    from sage_otel.agent.identity import _SECP256K1_N

    key = SigningKey.generate(KeyType.SECP256K1)
    signature = key.sign(b"data")
    s = int.from_bytes(signature[32:64], "big")
    high = signature[:32] + (_SECP256K1_N - s).to_bytes(32, "big")
    key.verify(b"data", signature)
    for form in (high, high + bytes([signature[64] ^ 1])):
        with pytest.raises(SignatureError):
            key.verify(b"data", form)


def test_secp256k1_accepts_the_forms_the_reference_accepts() -> None:
    """64-byte r||s, 65-byte r||s||v (v as 0/1 or 27/28) and DER; v must recover the key."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    key = SigningKey.generate(KeyType.SECP256K1)
    signature = key.sign(b"data")
    r, s, v = signature[:32], signature[32:64], signature[64]
    der = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    for form in (signature, r + s, r + s + bytes([v + 27]), der):
        key.verify(b"data", form)
    for bad_v in (v ^ 1, (v ^ 1) + 27, 2, 29, 255):
        with pytest.raises(SignatureError):
            key.verify(b"data", r + s + bytes([bad_v]))


def test_chain_names_are_case_insensitive_when_generating() -> None:
    assert AgentIdentity.generate("ETH").did.chain is Chain.ETHEREUM
