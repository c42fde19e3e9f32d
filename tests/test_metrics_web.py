"""/metrics with TLS and basic auth from a web config file (exporter-toolkit style)."""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter

from sage_otel.telemetry.web import WebConfigError, start_metrics_server
from support import free_port


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("sage_probe", "a probe", registry=reg).inc()
    return reg


def get(
    url: str, cafile: Path | None = None, auth: tuple[str, str] | None = None
) -> tuple[int, str]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    handlers = [urllib.request.ProxyHandler({})]
    if cafile:
        handlers.append(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(cafile)))
        )
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_tls_and_basic_auth(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        json.dumps(
            {
                "tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
                "basic_auth_users": {"prometheus": hashed},
            }
        )
    )
    port = free_port()
    server, _ = start_metrics_server(port, "127.0.0.1", registry(), config)
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        status, body = get(url, cert, ("prometheus", "s3cret"))
        assert status == 200 and "sage_probe_total 1.0" in body
        assert get(url, cert, ("prometheus", "wrong"))[0] == 401
        assert get(url, cert)[0] == 401
        with pytest.raises(OSError):  # plain HTTP is not served (reset or refused)
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/metrics", timeout=5
            )
    finally:
        server.shutdown()


def test_without_a_config_it_is_plain_http(tmp_path: Path) -> None:
    port = free_port()
    server, _ = start_metrics_server(port, "127.0.0.1", registry())
    try:
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        server.shutdown()


def test_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text("http_server_config:\n  http2: true\n")
    with pytest.raises(WebConfigError):
        start_metrics_server(free_port(), "127.0.0.1", registry(), config)
