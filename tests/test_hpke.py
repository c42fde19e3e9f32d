from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_otel.agent import hpke
from sage_otel.agent.errors import CryptoError

VECTOR_PATH = Path(__file__).parent / "data" / "rfc9180_a21.json"


@pytest.fixture(scope="module")
def vector() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTOR_PATH.read_text())
    assert (data["mode"], data["kem_id"], data["kdf_id"], data["aead_id"]) == (
        0,
        hpke.KEM_ID,
        hpke.KDF_ID,
        hpke.AEAD_ID,
    )
    return data


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


def test_vector_derive_key_pair(vector: dict[str, Any]) -> None:
    assert hpke.derive_key_pair(_h(vector["ikmE"])) == (_h(vector["skEm"]), _h(vector["pkEm"]))
    assert hpke.derive_key_pair(_h(vector["ikmR"])) == (_h(vector["skRm"]), _h(vector["pkRm"]))


def test_vector_enc(vector: dict[str, Any]) -> None:
    enc, _ = hpke.setup_base_sender(
        _h(vector["pkRm"]), _h(vector["info"]), ikm_e=_h(vector["ikmE"])
    )
    assert enc == _h(vector["enc"])


def test_vector_encryptions(vector: dict[str, Any]) -> None:
    info = _h(vector["info"])
    enc, sender = hpke.setup_base_sender(_h(vector["pkRm"]), info, ikm_e=_h(vector["ikmE"]))
    receiver = hpke.setup_base_receiver(enc, _h(vector["skRm"]), info)

    encryptions = sorted(vector["encryptions"], key=lambda e: e["sequence_number"])
    assert encryptions, "vector file has no encryptions"
    expected_seq = 0
    for entry in encryptions:
        # The file lists selected sequence numbers; seal/open the skipped ones to advance.
        while expected_seq < entry["sequence_number"]:
            receiver.open(b"", sender.seal(b"", b""))
            expected_seq += 1
        aad, pt, ct = _h(entry["aad"]), _h(entry["pt"]), _h(entry["ct"])
        assert sender.seal(aad, pt) == ct, entry["sequence_number"]
        assert receiver.open(aad, ct) == pt, entry["sequence_number"]
        expected_seq += 1


def test_vector_exports(vector: dict[str, Any]) -> None:
    info = _h(vector["info"])
    enc, sender = hpke.setup_base_sender(_h(vector["pkRm"]), info, ikm_e=_h(vector["ikmE"]))
    receiver = hpke.setup_base_receiver(enc, _h(vector["skRm"]), info)
    assert vector["exports"]
    for entry in vector["exports"]:
        context, length = _h(entry["exporter_context"]), entry["L"]
        expected = _h(entry["exported_value"])
        assert sender.export(context, length) == expected
        assert receiver.export(context, length) == expected


def test_round_trip_random_keys() -> None:
    sk_r, pk_r = hpke.generate_key_pair()
    assert len(sk_r) == 32 and len(pk_r) == 32
    enc, sender = hpke.setup_base_sender(pk_r, b"info")
    receiver = hpke.setup_base_receiver(enc, sk_r, b"info")
    for i in range(3):
        msg = f"message {i}".encode()
        assert receiver.open(b"aad", sender.seal(b"aad", msg)) == msg
    assert sender.export(b"ctx", 32) == receiver.export(b"ctx", 32)
    assert sender.export(b"ctx", 32) != sender.export(b"other", 32)


def test_fresh_ephemeral_per_sender() -> None:
    _, pk_r = hpke.generate_key_pair()
    enc1, _ = hpke.setup_base_sender(pk_r, b"info")
    enc2, _ = hpke.setup_base_sender(pk_r, b"info")
    assert enc1 != enc2


def test_tampered_ciphertext_rejected_without_desync() -> None:
    sk_r, pk_r = hpke.generate_key_pair()
    enc, sender = hpke.setup_base_sender(pk_r, b"info")
    receiver = hpke.setup_base_receiver(enc, sk_r, b"info")
    ct = sender.seal(b"aad", b"payload")
    tampered = bytes([ct[0] ^ 0x01]) + ct[1:]
    with pytest.raises(CryptoError, match="hpke open failed"):
        receiver.open(b"aad", tampered)
    with pytest.raises(CryptoError, match="hpke open failed"):
        receiver.open(b"other aad", ct)
    # A failed open must not consume a sequence number.
    assert receiver.open(b"aad", ct) == b"payload"


def test_wrong_receiver_key_rejected() -> None:
    _, pk_r = hpke.generate_key_pair()
    other_sk, _ = hpke.generate_key_pair()
    enc, sender = hpke.setup_base_sender(pk_r, b"info")
    receiver = hpke.setup_base_receiver(enc, other_sk, b"info")
    with pytest.raises(CryptoError, match="hpke open failed"):
        receiver.open(b"", sender.seal(b"", b"secret"))


def test_info_mismatch_rejected() -> None:
    sk_r, pk_r = hpke.generate_key_pair()
    enc, sender = hpke.setup_base_sender(pk_r, b"info-a")
    receiver = hpke.setup_base_receiver(enc, sk_r, b"info-b")
    with pytest.raises(CryptoError):
        receiver.open(b"", sender.seal(b"", b"secret"))
    assert sender.export(b"", 32) != receiver.export(b"", 32)


def test_error_message_has_no_key_material() -> None:
    sk_r, pk_r = hpke.generate_key_pair()
    enc, _ = hpke.setup_base_sender(pk_r, b"info")
    receiver = hpke.setup_base_receiver(enc, sk_r, b"info")
    with pytest.raises(CryptoError) as excinfo:
        receiver.open(b"", b"\x00" * 32)
    message = str(excinfo.value)
    for secret in (sk_r, pk_r, enc):
        assert secret.hex() not in message
    assert sk_r.hex() not in repr(receiver)


@pytest.mark.parametrize(
    "bad_pk",
    [bytes(32), (1).to_bytes(32, "little"), b"\x01" * 31],
    ids=["zero", "order-one", "short"],
)
def test_low_order_or_malformed_public_key_rejected(bad_pk: bytes) -> None:
    with pytest.raises(CryptoError):
        hpke.setup_base_sender(bad_pk, b"info")
    sk_r, _ = hpke.generate_key_pair()
    with pytest.raises(CryptoError):
        hpke.setup_base_receiver(bad_pk, sk_r, b"info")


def test_role_misuse_and_bad_lengths() -> None:
    sk_r, pk_r = hpke.generate_key_pair()
    enc, sender = hpke.setup_base_sender(pk_r, b"")
    receiver = hpke.setup_base_receiver(enc, sk_r, b"")
    with pytest.raises(RuntimeError):
        sender.open(b"", b"x" * 16)
    with pytest.raises(RuntimeError):
        receiver.seal(b"", b"x")
    with pytest.raises(ValueError):
        sender.export(b"", 0)
    with pytest.raises(ValueError):
        sender.export(b"", 255 * 32 + 1)
    assert len(sender.export(b"", 255 * 32)) == 255 * 32
    with pytest.raises(CryptoError):
        hpke.derive_key_pair(b"short")
    with pytest.raises(CryptoError):
        hpke.setup_base_receiver(enc, sk_r[:31], b"")


@settings(max_examples=50, deadline=None)
@given(aad=st.binary(max_size=256), pt=st.binary(max_size=1024))
def test_property_seal_open_round_trip(aad: bytes, pt: bytes) -> None:
    sk_r, pk_r = hpke.generate_key_pair()
    enc, sender = hpke.setup_base_sender(pk_r, b"prop")
    receiver = hpke.setup_base_receiver(enc, sk_r, b"prop")
    ct = sender.seal(aad, pt)
    assert len(ct) == len(pt) + 16
    assert receiver.open(aad, ct) == pt
