"""/metrics with TLS and basic auth from a web config file (exporter-toolkit style)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import re
import socket
import ssl
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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


# --- issue 16: the endpoint holds when exposed to the internet ----------------------------------


@contextlib.contextmanager
def serving(config: Path | None = None) -> Iterator[int]:
    """A metrics server on a free loopback port, shut down (workers too) when the block ends."""
    port = free_port()
    server, _ = start_metrics_server(port, "127.0.0.1", registry(), config)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def web_config(
    tmp_path: Path, tls: bool = True, rounds: int = 4, password: bytes = b"s3cret"
) -> Path:
    """A config with user ``prometheus`` (bcrypt of ``password`` at ``rounds``), TLS if asked."""
    config: dict[str, object] = {
        "basic_auth_users": {"prometheus": bcrypt.hashpw(password, bcrypt.gensalt(rounds)).decode()}
    }
    if tls:
        cert, key = self_signed(tmp_path)
        config["tls_server_config"] = {"cert_file": str(cert), "key_file": str(key)}
    path = tmp_path / "web.yml"
    path.write_text(json.dumps(config))
    return path


def idle_connections(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """``count`` connections that send ``first_bytes`` (maybe nothing) and then nothing more.
    Non-blocking connects: a server that stops accepting cannot stall the test here."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        held.append(sock)
    if first_bytes:
        for sock in held:
            sock.setblocking(True)
            sock.settimeout(2)
            sock.sendall(first_bytes)
    return held


def raw_status(port: int, authorization: bytes) -> int:
    """The status of a GET /metrics sent byte for byte (urllib would re-encode the header)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization + b"\r\n\r\n"
        )
        return int(sock.makefile("rb").readline().split()[1])


def test_idle_tls_connections_do_not_delay_a_scrape(tmp_path: Path) -> None:
    # Before: the handshake ran inside accept() on the one serving thread, so the first
    # silent connection held every scrape (the scrape never finished in 60 s).
    config = web_config(tmp_path)
    cert = tmp_path / "server.crt"
    with serving(config) as port:
        held = idle_connections(port, 20)
        time.sleep(0.2)
        started = time.monotonic()
        status, body = get(f"https://127.0.0.1:{port}/metrics", cert, ("prometheus", "s3cret"))
        elapsed = time.monotonic() - started
        for sock in held:
            sock.close()
    assert status == 200 and "sage_probe_total 1.0" in body
    assert elapsed < 2


@pytest.mark.parametrize("first_bytes", [b"", b"\x16\x03\x01", b"GET /metrics HTTP/1.1\r\n"])
def test_a_connection_that_stalls_is_closed_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_bytes: bytes
) -> None:
    # Silent, mid-handshake (a TLS record header) and mid-header clients: each is closed
    # once the deadline for a complete request head has passed. Before: held forever.
    monkeypatch.setenv("SAGE_OTEL_METRICS_TIMEOUT", "0.5")
    tls = first_bytes != b"GET /metrics HTTP/1.1\r\n"
    with serving(web_config(tmp_path, tls=tls)) as port:
        [sock] = idle_connections(port, 1, first_bytes)
        sock.setblocking(True)
        sock.settimeout(5)
        started = time.monotonic()
        try:
            closed = sock.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        elapsed = time.monotonic() - started
        sock.close()
    assert closed and elapsed < 2


def test_threads_stay_bounded_under_200_idle_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: one thread per connection, 200 idle connections meant 200 threads.
    monkeypatch.setenv("SAGE_OTEL_METRICS_WORKERS", "4")
    before = threading.active_count()
    with serving() as port:
        held = idle_connections(port, 100) + idle_connections(
            port, 100, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
        )
        time.sleep(0.5)
        threads = threading.active_count() - before
        started = time.monotonic()
        status, _ = get(f"http://127.0.0.1:{port}/metrics")
        elapsed = time.monotonic() - started
        for sock in held:
            sock.close()
    assert threads <= 4 + 1  # the workers and the selector thread
    assert status == 200 and elapsed < 2


def test_beyond_max_connections_the_longest_waiting_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGE_OTEL_METRICS_MAX_CONNECTIONS", "8")
    with serving() as port:
        held = idle_connections(port, 20)
        time.sleep(0.3)
        status, _ = get(f"http://127.0.0.1:{port}/metrics")
        first = held[0]
        first.setblocking(True)
        first.settimeout(2)
        try:
            dropped = first.recv(1) == b""
        except ConnectionResetError:
            dropped = True
        for sock in held:
            sock.close()
    assert status == 200 and dropped


def test_an_oversized_request_head_is_refused(tmp_path: Path) -> None:
    # Before: 100 header lines of up to 64 KiB each were read and parsed.
    with serving() as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(
                    b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
                )
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("SAGE_OTEL_METRICS_WORKERS", "many"),
        ("SAGE_OTEL_METRICS_WORKERS", "0"),
        ("SAGE_OTEL_METRICS_TIMEOUT", "inf"),
        ("SAGE_OTEL_METRICS_MAX_CONNECTIONS", "-1"),
        ("SAGE_OTEL_METRICS_MAX_HEADER_BYTES", "1.5"),
    ],
)
def test_a_bad_limit_variable_names_itself(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    monkeypatch.setenv(variable, text)
    with pytest.raises(ValueError, match=variable):
        start_metrics_server(free_port(), "127.0.0.1", registry())


def test_a_password_longer_than_72_bytes_is_401_not_500(tmp_path: Path) -> None:
    # Before: bcrypt raised on a known user's 100-byte password; the answer was a 500.
    # As Go's bcrypt (and so exporter-toolkit), only the first 72 bytes count.
    long_password = b"p" * 72
    with serving(web_config(tmp_path, tls=False, password=long_password)) as port:
        url = f"http://127.0.0.1:{port}/metrics"
        assert get(url, auth=("prometheus", "x" * 100))[0] == 401
        assert get(url, auth=("prometheus", "p" * 100))[0] == 200
        assert get(url, auth=("prometheus", "p" * 71))[0] == 401
        # An unknown user is checked against prometheus' hash, and still refused.
        assert get(url, auth=("nobody", "p" * 72))[0] == 401


def test_an_unknown_user_costs_what_a_known_user_costs(tmp_path: Path) -> None:
    # Before: an unknown user answered without bcrypt (1-5 ms against 340-370 ms at cost 12),
    # which told an attacker which user names exist.
    with serving(web_config(tmp_path, tls=False, rounds=8)) as port:
        url = f"http://127.0.0.1:{port}/metrics"

        def seconds(user: str) -> float:
            started = time.perf_counter()
            assert get(url, auth=(user, "wrong"))[0] == 401
            return time.perf_counter() - started

        seconds("prometheus"), seconds("nobody")  # warm-up
        known, unknown = [], []
        for _ in range(20):
            known.append(seconds("prometheus"))
            unknown.append(seconds("nobody"))
    ratio = statistics.median(known) / statistics.median(unknown)
    assert 0.5 < ratio < 2, (statistics.median(known), statistics.median(unknown))


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_the_basic_scheme_is_case_insensitive(tmp_path: Path, scheme: str) -> None:
    with serving(web_config(tmp_path, tls=False)) as port:
        credentials = base64.b64encode(b"prometheus:s3cret")
        assert raw_status(port, scheme.encode() + b" " + credentials) == 200


GARBAGE_AUTHORIZATION = [
    b"Basic",
    b"Basic ",
    b"Basic !!!!",
    b"Basic cHJvbWV0aGV1cw",  # no padding
    b"Basic " + base64.b64encode(b"prometheus"),  # no colon
    b"Basic " + base64.b64encode(b"\xff\xfe:\xff"),  # not UTF-8
    b"Basic \xc3\xa9\xff",  # not ASCII: was a 500
    b"Bearer " + base64.b64encode(b"prometheus:s3cret"),
    b"Basic " + base64.b64encode(b"prometheus:s3cret") + b"====",  # bad padding: was a 200
]


def test_a_malformed_authorization_is_401(tmp_path: Path) -> None:
    with serving(web_config(tmp_path, tls=False)) as port:
        statuses = {value: raw_status(port, value) for value in GARBAGE_AUTHORIZATION}
    assert set(statuses.values()) == {401}, statuses


HOSTILE_HEADS = [
    b"\x00\x01\x02\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % n for n in range(101)) + b"\r\n",
    b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /metrics HTTP/9.9\r\n\r\n",
    b"\r\n\r\n",
]


def test_hostile_requests_get_a_4xx_or_a_close_and_no_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    statuses = []
    with serving(web_config(tmp_path, tls=False)) as port:
        for head in HOSTILE_HEADS:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(head)
                answer = sock.makefile("rb").read()
                # "HTTP/1.x NNN", or an HTTP/0.9 error page (no status line), or a close
                found = re.search(rb"^HTTP/1\.\d (\d{3})|Error code: (\d{3})", answer)
                statuses.append(int(next(filter(None, found.groups()))) if found else 0)
        # A client that sends a request and leaves without reading the answer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert get(f"http://127.0.0.1:{port}/metrics", auth=("prometheus", "s3cret"))[0] == 200
    assert all(status == 0 or 400 <= status < 500 for status in statuses), statuses
    assert "Traceback" not in capfd.readouterr().err
    assert not [record for record in caplog.records if record.exc_info]
