from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct

import pytest

from sage_otel.agent import hpke, keyschedule
from sage_otel.agent.errors import CryptoError

CTX = "ctx-1234"
INIT = "did:sage:ethereum:0x1111111111111111111111111111111111111111"
RESP = "did:sage:solana:9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
SEED = bytes(range(32))


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """Plain RFC 5869, written out with the standard library as an independent check."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def test_info_string_exact() -> None:
    assert keyschedule.SUITE == "hpke-base+x25519+hkdf-sha256"
    assert keyschedule.COMBINER == "e2e-x25519-hkdf-v1"
    assert keyschedule.build_info(CTX, INIT, RESP) == (
        b"sage/hpke-info|v1|suite=hpke-base+x25519+hkdf-sha256|combiner=e2e-x25519-hkdf-v1"
        b"|ctx=ctx-1234|init=did:sage:ethereum:0x1111111111111111111111111111111111111111"
        b"|resp=did:sage:solana:9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
    )


def test_export_ctx_string_exact() -> None:
    assert keyschedule.build_export_ctx(CTX) == (
        b"sage/hpke-export|v1|suite=hpke-base+x25519+hkdf-sha256"
        b"|combiner=e2e-x25519-hkdf-v1|ctx=ctx-1234"
    )


def test_info_is_utf8() -> None:
    assert keyschedule.build_export_ctx("é").endswith(b"|ctx=\xc3\xa9")


def test_combine_seed_matches_rfc5869() -> None:
    exporter, ss = b"\x01" * 32, b"\x02" * 32
    export_ctx = keyschedule.build_export_ctx(CTX)
    seed = keyschedule.combine_seed(exporter, ss, export_ctx)
    assert seed == _hkdf_sha256(exporter + ss, export_ctx, b"SAGE-HPKE+E2E-Combiner", 32)
    assert keyschedule.combine_seed(ss, exporter, export_ctx) != seed


def test_session_id_format_and_value() -> None:
    sid = keyschedule.session_id(SEED)
    assert len(sid) == 22
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", sid)
    digest = hashlib.sha256(b"sage/hpke+e2e v1" + SEED).digest()[:16]
    assert sid == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert keyschedule.session_id(SEED) == sid
    assert keyschedule.session_id(SEED[::-1]) != sid
    with pytest.raises(ValueError):
        keyschedule.session_id(b"")


@pytest.mark.parametrize("n", [32, 64])
def test_expand_label_counter_mode(n: int) -> None:
    key, info = b"k" * 32, b"SAGE-ack-key-v1"
    expected = b"".join(
        hmac.new(key, info + struct.pack(">I", counter), hashlib.sha256).digest()
        for counter in range(1, n // 32 + 1)
    )
    assert keyschedule.expand_label(key, info, n) == expected


def test_expand_label_is_not_hkdf_expand_and_truncates() -> None:
    key, info = b"k" * 32, b"label"
    out = keyschedule.expand_label(key, info, 64)
    # RFC 5869 would chain T(1) into T(2); SAGE's expansion does not.
    chained = hmac.new(key, out[:32] + info + b"\x02", hashlib.sha256).digest()
    assert out[32:] != chained
    assert keyschedule.expand_label(key, info, 40) == out[:40]
    assert keyschedule.expand_label(key, info, 0) == b""


INFO = keyschedule.build_info(CTX, INIT, RESP)
EXPORT_CTX = keyschedule.build_export_ctx(CTX)
ENC, EPH_C, EPH_S = b"\xe0" * 32, b"\xc0" * 32, b"\x50" * 32


def test_transcript_hash_layout() -> None:
    segments = [INFO, EXPORT_CTX, ENC, EPH_C, EPH_S, INIT.encode(), RESP.encode()]
    expected = hashlib.sha256(b"".join(b"\x00" + s for s in segments)).digest()
    th = keyschedule.transcript_hash(INFO, EXPORT_CTX, ENC, EPH_C, EPH_S, INIT, RESP)
    assert th == expected


def test_transcript_hash_order_matters() -> None:
    th = keyschedule.transcript_hash
    base = th(INFO, EXPORT_CTX, ENC, EPH_C, EPH_S, INIT, RESP)
    assert th(INFO, EXPORT_CTX, ENC, EPH_S, EPH_C, INIT, RESP) != base
    assert th(INFO, EXPORT_CTX, ENC, EPH_C, EPH_S, RESP, INIT) != base
    assert th(EXPORT_CTX, INFO, ENC, EPH_C, EPH_S, INIT, RESP) != base
    # The 0x00 separators keep segment boundaries significant.
    assert th(INFO, EXPORT_CTX, ENC[:31], ENC[:1] + EPH_C, EPH_S, INIT, RESP) != base


def _ack_reference(seed: bytes, ctx: str, nonce: str, kid: str, th: bytes) -> bytes:
    ack_key = hmac.new(seed, b"SAGE-ack-key-v1" + b"\x00\x00\x00\x01", hashlib.sha256).digest()
    msg = b"SAGE-ack-msg|v1|"
    for field in (ctx, nonce, kid):
        raw = field.encode()
        msg += len(raw).to_bytes(2, "big") + raw
    return hmac.new(ack_key, msg + th, hashlib.sha256).digest()


def test_ack_tag_value() -> None:
    th = hashlib.sha256(b"transcript").digest()
    tag = keyschedule.ack_tag(SEED, CTX, "nonce-abc", "kid-1", th)
    assert len(tag) == 32
    assert tag == _ack_reference(SEED, CTX, "nonce-abc", "kid-1", th)


def test_ack_tag_changes_with_every_input() -> None:
    th = hashlib.sha256(b"transcript").digest()
    base = (SEED, CTX, "nonce-abc", "kid-1", th)
    tag = keyschedule.ack_tag(*base)
    variants = [
        (SEED[::-1], *base[1:]),
        (SEED, "ctx-other", *base[2:]),
        (*base[:2], "nonce-xyz", *base[3:]),
        (*base[:3], "kid-2", th),
        (*base[:4], hashlib.sha256(b"other").digest()),
        # Length prefixes stop bytes from shifting between fields.
        (SEED, CTX + "n", "once-abc", "kid-1", th),
    ]
    for variant in variants:
        assert keyschedule.ack_tag(*variant) != tag, variant


def test_ack_tag_rejects_overlong_field() -> None:
    with pytest.raises(ValueError):
        keyschedule.ack_tag(SEED, "x" * 0x10000, "n", "k", b"")


def test_directional_keys() -> None:
    sid = keyschedule.session_id(SEED)
    keys = keyschedule.directional_keys(SEED, sid)
    parts = [keys.c2s_encrypt, keys.c2s_sign, keys.s2c_encrypt, keys.s2c_sign]
    assert all(len(p) == 32 for p in parts)
    assert len(set(parts)) == 4
    assert b"".join(parts) == _hkdf_sha256(SEED, sid.encode(), b"sage-directional-keys-v1", 128)
    assert keyschedule.directional_keys(SEED, sid) == keys
    assert keyschedule.directional_keys(SEED, sid + "x") != keys
    with pytest.raises(AttributeError):
        keys.c2s_encrypt = b""  # type: ignore[misc]
    assert keys.c2s_encrypt.hex() not in repr(keys)


def test_x25519_e2e_agrees() -> None:
    sk_a, pk_a = hpke.generate_key_pair()
    sk_b, pk_b = hpke.generate_key_pair()
    ss = keyschedule.x25519_e2e(sk_a, pk_b)
    assert ss == keyschedule.x25519_e2e(sk_b, pk_a)
    assert len(ss) == 32


@pytest.mark.parametrize(
    "bad_pk",
    [bytes(32), (1).to_bytes(32, "little")],
    ids=["zero", "order-one"],
)
def test_x25519_e2e_rejects_low_order_point(bad_pk: bytes) -> None:
    sk, _ = hpke.generate_key_pair()
    with pytest.raises(CryptoError):
        keyschedule.x25519_e2e(sk, bad_pk)


def test_x25519_e2e_rejects_bad_length() -> None:
    sk, pk = hpke.generate_key_pair()
    with pytest.raises(CryptoError):
        keyschedule.x25519_e2e(sk, pk[:31])
    with pytest.raises(CryptoError):
        keyschedule.x25519_e2e(sk + b"\x00", pk)


def test_full_handshake_derivation_agrees() -> None:
    """Initiator and responder derive the same seed, id, ack tag and keys."""
    sk_r, pk_r = hpke.generate_key_pair()
    info = keyschedule.build_info(CTX, INIT, RESP)
    export_ctx = keyschedule.build_export_ctx(CTX)
    enc, sender = hpke.setup_base_sender(pk_r, info)
    receiver = hpke.setup_base_receiver(enc, sk_r, info)
    eph_c_sk, eph_c = hpke.generate_key_pair()
    eph_s_sk, eph_s = hpke.generate_key_pair()

    seeds = []
    for ctx, own_sk, peer_pk in ((sender, eph_c_sk, eph_s), (receiver, eph_s_sk, eph_c)):
        exporter = ctx.export(export_ctx, 32)
        seeds.append(
            keyschedule.combine_seed(exporter, keyschedule.x25519_e2e(own_sk, peer_pk), export_ctx)
        )
    assert seeds[0] == seeds[1]
    th = keyschedule.transcript_hash(info, export_ctx, enc, eph_c, eph_s, INIT, RESP)
    sid = keyschedule.session_id(seeds[0])
    assert keyschedule.ack_tag(seeds[0], CTX, "n", "kid-x", th) == keyschedule.ack_tag(
        seeds[1], CTX, "n", "kid-x", th
    )
    assert keyschedule.directional_keys(seeds[0], sid) == keyschedule.directional_keys(
        seeds[1], keyschedule.session_id(seeds[1])
    )
