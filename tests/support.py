"""Helpers the test modules share: free loopback ports, proxy-free GETs, child processes."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.request
from collections.abc import Iterator

from tools.services import free_port as free_port  # re-exported: the tests take ports here

LOOPBACK = "127.0.0.1"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, accept: str | None = None, timeout: float = 5.0) -> tuple[str, str]:
    """GET ``url``, never through a proxy; returns (content type, body)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with _NO_PROXY.open(request, timeout=timeout) as answer:
        return answer.headers.get("Content-Type", ""), answer.read().decode()


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A subprocess that is always killed (and reaped) when the block ends."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)
