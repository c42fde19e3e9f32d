"""Real services for the end-to-end tests: Prometheus, the sage-otelcol collector, Jaeger v2,
Thanos (receive and query).

They are started by :mod:`tools.services`, which ``make pictures`` uses too. Here a missing
binary skips the test, or fails it when ``CI=true`` (it must have been built there).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tools import services as _services
from tools.services import (  # noqa: F401  (the helpers the e2e tests use through this module)
    COLLECTOR_CONFIG,
    JAEGER_CONFIG,
    LOOPBACK,
    PROMETHEUS_CONFIG,
    REMOTE_WRITE_OVERLAY,
    REPO,
    SCRIPTS,
    Collector,
    Jaeger,
    Prometheus,
    PrometheusError,
    collector_env,
    free_port,
    get_json,
    http_get,
    log_tail,
    loopback,
    port_open,
    wait_for,
)


def missing(reason: str) -> NoReturn:
    """A prerequisite is absent: fail under CI (it must have been built), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def binary(name: str) -> str:
    """Path of a prerequisite binary; skips (or fails under CI) when it is missing."""
    try:
        return _services.binary(name)
    except _services.Unavailable as exc:
        missing(str(exc))


def prometheus(*args: Any, **kwargs: Any) -> Any:
    """:func:`tools.services.prometheus`, once its binary is known to be there."""
    binary("prometheus")
    return _services.prometheus(*args, **kwargs)


def collector(*args: Any, **kwargs: Any) -> Any:
    """:func:`tools.services.collector`, once its binary is known to be there."""
    binary("sage-otelcol")
    return _services.collector(*args, **kwargs)


def jaeger(*args: Any, **kwargs: Any) -> Any:
    """:func:`tools.services.jaeger`, once its binary is known to be there."""
    binary("jaeger")
    return _services.jaeger(*args, **kwargs)


# ----------------------------------------------------------------------------- Thanos


@dataclass
class ThanosReceive:
    """One ``thanos receive``: an ingester (stores, answers the Store API on ``grpc``) or a
    router (``remote_write_url`` in front, forwarding each series to its replicas)."""

    grpc: str
    """``127.0.0.1:<port>``: its gRPC address (the hashring entry of an ingester)."""
    http: str
    """``http://127.0.0.1:<port>``: its own /metrics and /-/ready."""
    remote_write_url: str
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self) -> None:
        """SIGTERM, then wait for the exit (a stopped node, as when its host goes away)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def write_hashring(path: Path, ingesters: Sequence[str]) -> Path:
    """A Thanos hashring file: one ring, the ingesters' gRPC addresses."""
    path.write_text(json.dumps([{"hashring": "default", "endpoints": list(ingesters)}], indent=2))
    return path


@contextlib.contextmanager
def thanos_receive(
    root: Path,
    name: str,
    *,
    hashring: Path | None = None,
    replication_factor: int = 3,
    replica: str | None = None,
    grpc: str | None = None,
    ready_timeout: float = 60,
) -> Iterator[ThanosReceive]:
    """``thanos receive`` on loopback ports: an ingester (``replica`` names its
    ``receive_replica`` label; no hashring) or, with ``hashring``, a router that stores
    nothing and writes each series to ``replication_factor`` ingesters, succeeding on a
    quorum of them."""
    executable = binary("thanos")
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    grpc = grpc or loopback()
    http, remote_write = loopback(), loopback()
    args = [
        executable,
        "receive",
        f"--grpc-address={grpc}",
        f"--http-address={http}",
        f"--remote-write.address={remote_write}",
        # Unused with protobuf replication, but bound all the same: keep it on loopback.
        f"--receive.capnproto-address={loopback()}",
        f"--tsdb.path={directory / 'data'}",
        "--log.level=info",
    ]
    if hashring is not None:
        args += [
            f"--receive.hashrings-file={hashring}",
            f"--receive.replication-factor={replication_factor}",
            "--receive.hashrings-algorithm=ketama",
        ]
    # Every receive needs an external label; a router stores nothing it would apply to.
    args += [f"--label=receive_replica={json.dumps(replica or name)}"]
    log_path = directory / "thanos.log"
    with _services._running(args, log_path=log_path) as process:
        node = ThanosReceive(
            grpc=grpc,
            http=f"http://{http}",
            remote_write_url=f"http://{remote_write}/api/v1/receive",
            log_path=log_path,
            process=process,
        )
        _services._wait_ready(
            process,
            lambda: bool(http_get(node.http + "/-/ready", timeout=2)) and port_open(remote_write),
            what=f"thanos receive {name}",
            log_path=log_path,
            timeout=ready_timeout,
        )
        yield node


class ThanosQuery(Prometheus):
    """``thanos query``: the Prometheus HTTP API (``/api/v1/*``) over the ingesters'
    Store APIs, replicas deduplicated by ``receive_replica``."""


@contextlib.contextmanager
def thanos_query(
    root: Path, stores: Sequence[str], *, ready_timeout: float = 60
) -> Iterator[ThanosQuery]:
    executable = binary("thanos")
    directory = root / "query"
    directory.mkdir(parents=True, exist_ok=True)
    http = loopback()
    args = [
        executable,
        "query",
        f"--http-address={http}",
        f"--grpc-address={loopback()}",
        "--query.replica-label=receive_replica",
        # Replicas written by the receive routers carry identical samples: merge them one
        # for one. (The default, penalty, is for HA Prometheus pairs scraping at different
        # instants.)
        "--deduplication.func=chain",
        # One ingester down must not fail a query: its two replicas answer for it.
        "--query.partial-response",
        *[f"--endpoint={store}" for store in stores],
        "--log.level=info",
    ]
    log_path = directory / "thanos.log"
    url = f"http://{http}"
    with _services._running(args, log_path=log_path) as process:
        query = ThanosQuery(url, directory, log_path, process)

        def ready() -> bool:
            if not http_get(url + "/-/ready", timeout=2):
                return False
            # every store connected, so that a query right after this sees all of them
            up = get_json(url + "/api/v1/stores").get("data", {}).get("receive", [])
            return sum(1 for entry in up if not entry.get("lastError")) == len(stores)

        _services._wait_ready(
            process, ready, what="thanos query", log_path=log_path, timeout=ready_timeout
        )
        yield query


INGESTION_AGENT = REPO / "tests" / "e2e" / "ingestion_agent.py"


def start_ingestion_agent(
    args: Sequence[str], env: dict[str, str], cwd: Path
) -> subprocess.Popen[str]:
    """tests/e2e/ingestion_agent.py with ``args``: it prints "ready", waits for a line on
    stdin, runs its traffic and prints its JSON summary (read them with ``read_line``)."""
    return subprocess.Popen(
        [sys.executable, str(INGESTION_AGENT), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The process's next stdout line, or a failure if it prints none within ``timeout``."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1):
            return process.stdout.readline()
    raise AssertionError(f"the agent printed nothing (exit status {process.poll()})")
