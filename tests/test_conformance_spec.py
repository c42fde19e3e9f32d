"""The SAGE spec's own vectors (tests/data/sage-vectors, copied byte for byte from sage-spec):
the crypto, hpke, did and jcs suites, each vector run through the public API.

The session and rfc9421 suites describe the spec's next record format and HTTP message
signatures, which the released reference does not speak; docs/agent.md lists them as gaps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sage_otel.agent import hpke
from sage_otel.agent.canonical import jcs, loads_ieee
from sage_otel.agent.errors import InvalidMessageError, SignatureError
from sage_otel.agent.identity import (
    Chain,
    KeyType,
    SigningKey,
    ethereum_address,
    key_id,
    parse_chain,
    parse_did,
    verify_signature,
)
from sage_otel.agent.keyschedule import (
    ack_tag,
    build_export_ctx,
    build_info,
    combine_seed,
    traffic_keys,
    transcript_hash,
    x25519_e2e,
)
from sage_otel.agent.proofs import (
    pop_challenge,
    prove_possession,
    verify_agent_card,
    verify_possession,
)

VECTORS = Path(__file__).parent / "data" / "sage-vectors"
SUITES = ("crypto", "hpke", "did", "jcs")


def suite(name: str) -> dict[str, dict]:
    data = json.loads((VECTORS / f"{name}.json").read_text())
    assert data["suite"] == name
    return {v["name"]: v for v in data["vectors"]}


def label_key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def hx(value: str) -> bytes:
    return bytes.fromhex(value)


def test_the_suites_hold_nineteen_vectors_and_each_is_run_here() -> None:
    names = {(s, n) for s in SUITES for n in suite(s)}
    assert len(names) == 19
    assert names == {(s, n) for s, n, _ in CASES}


# -- crypto ---------------------------------------------------------------------------------


def crypto_ed25519_sign(v: dict) -> None:
    key = SigningKey.from_private_bytes(KeyType.ED25519, label_key(v["input"]["seed_label"]))
    assert key.public_bytes().hex() == v["output"]["public_key"]
    assert key.sign(hx(v["input"]["message"])).hex() == v["output"]["signature"]
    assert key.key_id() == v["output"]["key_id"]


def crypto_secp256k1_keccak_sign(v: dict) -> None:
    key = SigningKey.from_private_bytes(KeyType.SECP256K1, label_key(v["input"]["scalar_label"]))
    out, message = v["output"], hx(v["input"]["message"])
    assert key.public_bytes().hex() == out["public_key_compressed"]
    assert key.key_data().hex() == out["public_key"]
    assert ethereum_address(key.public_bytes()) == out["ethereum_address"]
    signature = key.sign(message)
    assert signature.hex() == out["signature"]  # RFC 6979: the same bytes as Go
    assert signature[64] == out["recovery_id"] and signature[:64].hex() == out["signature_rs"]
    assert key.key_id() == out["key_id"]
    for form in (signature, signature[:64]):
        verify_signature(KeyType.SECP256K1, key.public_bytes(), message, form)


def crypto_p256_sha256_sign(v: dict) -> None:
    out, message = v["output"], hx(v["input"]["message"])
    key = SigningKey.from_private_bytes(KeyType.P256, label_key(v["input"]["scalar_label"]))
    assert key.public_bytes().hex() == out["public_key"]
    verify_signature(KeyType.P256, hx(out["public_key"]), message, hx(out["signature"]))
    with pytest.raises(SignatureError):
        verify_signature(KeyType.P256, hx(out["public_key"]), message + b".", hx(out["signature"]))
    # Our own signatures over the same message verify the same way.
    verify_signature(KeyType.P256, key.public_bytes(), message, key.sign(message))


def crypto_key_id(v: dict) -> None:
    assert key_id(hx(v["input"]["public_key"])) == v["output"]["key_id"]


# -- hpke -----------------------------------------------------------------------------------


def hpke_info_and_export_context(v: dict) -> None:
    i, out = v["input"], v["output"]
    info = build_info(i["context_id"], i["init_did"], i["resp_did"])
    export_ctx = build_export_ctx(i["context_id"])
    assert info.decode() == out["info"] and info.hex() == out["info_hex"]
    assert export_ctx.hex() == out["export_context_hex"]
    assert hashlib.sha256(info).hexdigest() == out["info_sha256"]
    assert hashlib.sha256(export_ctx).hexdigest() == out["export_context_sha256"]


def hpke_x25519_e2e_shared_secret(v: dict) -> None:
    i, out = v["input"], v["output"]
    a, b = label_key(i["init_label"]), label_key(i["resp_label"])
    assert (a.hex(), hpke.public_key(a).hex()) == (out["init_private"], out["init_public"])
    assert (b.hex(), hpke.public_key(b).hex()) == (out["resp_private"], out["resp_public"])
    assert x25519_e2e(a, hx(out["resp_public"])).hex() == out["shared_secret"]
    assert x25519_e2e(b, hx(out["init_public"])).hex() == out["shared_secret"]


def hpke_combine_secrets(v: dict) -> None:
    i, out = v["input"], v["output"]
    export_ctx = build_export_ctx(i["context_id"])
    assert export_ctx.hex() == out["export_context_hex"]
    seed = combine_seed(hx(i["exporter_hpke"]), hx(i["ss_e2e"]), export_ctx)
    assert seed.hex() == out["seed"]


def hpke_traffic_keys(v: dict) -> None:
    keys = traffic_keys(hx(v["input"]["seed"]))
    for name, value in v["output"].items():
        assert getattr(keys, name).hex() == value, name


def hpke_ack_tag(v: dict) -> None:
    i = v["input"]
    info = build_info(i["context_id"], i["init_did"], i["resp_did"])
    export_ctx = build_export_ctx(i["context_id"])
    th = transcript_hash(
        info,
        export_ctx,
        hx(i["enc"]),
        hx(i["eph_c"]),
        hx(i["eph_s"]),
        i["init_did"],
        i["resp_did"],
    )
    tag = ack_tag(hx(i["seed"]), i["context_id"], i["nonce"], i["kid"], th)
    assert tag.hex() == v["output"]["ack_tag"]


def hpke_hpke_export_roundtrip(v: dict) -> None:
    i, out = v["input"], v["output"]
    private = label_key(i["resp_label"])
    assert hpke.public_key(private).hex() == out["resp_public"]
    info = build_info(i["context_id"], i["init_did"], i["resp_did"])
    receiver = hpke.setup_base_receiver(hx(out["enc"]), private, info)
    assert receiver.export(build_export_ctx(i["context_id"]), 32).hex() == out["exporter"]


# -- did ------------------------------------------------------------------------------------


def did_parse(v: dict) -> None:
    for text, expected in zip(v["input"]["valid"], v["output"]["parsed"], strict=True):
        did = parse_did(text)
        assert did.chain.value == expected["chain"]
        assert did.identifier.lower() == expected["identifier"].lower()
        assert str(did) == expected["did"]
    assert v["output"]["rejected"] == v["input"]["invalid"]
    for text in v["input"]["invalid"]:
        with pytest.raises(InvalidMessageError):
            parse_did(text)


def did_chain_aliases(v: dict) -> None:
    for name in v["input"]["names"]:
        assert parse_chain(name).value == v["output"]["chains"][name]
    generated = parse_did(v["output"]["generated"])
    assert generated.chain is Chain.ETHEREUM and str(generated) == v["output"]["generated"]


def did_pop_ed25519(v: dict) -> None:
    key = SigningKey.from_private_bytes(KeyType.ED25519, label_key(v["input"]["seed_label"]))
    _check_pop(key, v)


def did_pop_secp256k1(v: dict) -> None:
    key = SigningKey.from_private_bytes(KeyType.SECP256K1, label_key(v["input"]["scalar_label"]))
    _check_pop(key, v)


def _check_pop(key: SigningKey, v: dict) -> None:
    did, out = v["input"]["did"], v["output"]
    assert key.key_data().hex() == out["key_data"]
    assert pop_challenge(did, key.key_data()) == out["challenge"]
    assert prove_possession(key, did).hex() == out["proof"]
    verify_possession(key.key_type, key.key_data(), did, hx(out["proof"]))
    with pytest.raises(SignatureError):
        verify_possession(key.key_type, key.key_data(), did + "0", hx(out["proof"]))


def did_a2a_card_proof_ed25519(v: dict) -> None:
    i, card_json = v["input"], v["output"]["card_json"]
    card = verify_agent_card(card_json)
    key = SigningKey.from_private_bytes(KeyType.ED25519, label_key(i["seed_label"]))
    assert card["publicKey"][0]["publicKeyHex"] == key.public_bytes().hex()
    assert card["id"] == i["did"] and card["name"] == i["name"]
    assert card["publicKey"][1]["publicKeyHex"] == hpke.public_key(label_key(i["kem_label"])).hex()
    tampered = json.loads(card_json)
    tampered["name"] = "someone-else"
    with pytest.raises(SignatureError):
        verify_agent_card(json.dumps(tampered))


# -- jcs ------------------------------------------------------------------------------------


def jcs_vector(v: dict) -> None:
    canonical = jcs(loads_ieee(v["input"]["json"]))
    assert canonical.decode() == v["output"]["canonical"]
    assert canonical.hex() == v["output"]["canonical_hex"]
    assert hashlib.sha256(canonical).hexdigest() == v["output"]["sha256"]


CASES = [
    ("crypto", "ed25519-sign", crypto_ed25519_sign),
    ("crypto", "secp256k1-keccak-sign", crypto_secp256k1_keccak_sign),
    ("crypto", "p256-sha256-sign", crypto_p256_sha256_sign),
    ("crypto", "key-id", crypto_key_id),
    ("hpke", "info-and-export-context", hpke_info_and_export_context),
    ("hpke", "x25519-e2e-shared-secret", hpke_x25519_e2e_shared_secret),
    ("hpke", "combine-secrets", hpke_combine_secrets),
    ("hpke", "traffic-keys", hpke_traffic_keys),
    ("hpke", "ack-tag", hpke_ack_tag),
    ("hpke", "hpke-export-roundtrip", hpke_hpke_export_roundtrip),
    ("did", "parse", did_parse),
    ("did", "chain-aliases", did_chain_aliases),
    ("did", "pop-ed25519", did_pop_ed25519),
    ("did", "pop-secp256k1", did_pop_secp256k1),
    ("did", "a2a-card-proof-ed25519", did_a2a_card_proof_ed25519),
    ("jcs", "rfc8785-appendix-a", jcs_vector),
    ("jcs", "rfc8785-unicode-sorting", jcs_vector),
    ("jcs", "agent-card-like", jcs_vector),
    ("jcs", "numbers", jcs_vector),
]


@pytest.mark.parametrize(
    ("suite_name", "name", "check"), CASES, ids=[f"{s}/{n}" for s, n, _ in CASES]
)
def test_spec_vector(suite_name: str, name: str, check) -> None:
    check(suite(suite_name)[name])


def test_vector_copies_match_the_shared_spec_when_present() -> None:
    """tests/data holds byte copies so a clone tests alone; they must not drift."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "spec"
    if not shared.is_dir():
        pytest.skip("no shared/spec beside this checkout")
    for folder in ("sage-vectors", "sage-go-vectors"):
        for path in (shared / folder).iterdir():
            assert (Path(__file__).parent / "data" / folder / path.name).read_bytes() == (
                path.read_bytes()
            ), path.name
