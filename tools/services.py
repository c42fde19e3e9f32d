"""Real services on loopback: Prometheus, the sage-otelcol collector, Jaeger v2.

Each one runs as a child process on free loopback ports, is waited for until it answers as
ready, and is always stopped afterwards. The binaries come from the scripts in scripts/
(``make e2e-prereqs`` builds or installs them); ``binary()`` only looks them up and raises
:class:`Unavailable` when one is missing. The end-to-end tests (``tests/e2e/services.py``
turns that into a skip, or a failure under ``CI=true``) and ``make pictures``
(:mod:`tools.pictures`) both start their services here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
COLLECTOR_CONFIG = REPO / "collector" / "otel-collector.yaml"
# The overlay that switches the collector's metrics from OTLP to remote write.
REMOTE_WRITE_OVERLAY = REPO / "collector" / "otel-collector.remote-write.yaml"
PROMETHEUS_CONFIG = REPO / "collector" / "prometheus" / "prometheus.yml"
JAEGER_CONFIG = REPO / "tests" / "e2e" / "jaeger-test.yaml"
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


# binary name -> (script that builds or installs it, line of the script's output with its path)
_LOCATORS = {
    "sage-otelcol": ("build-collector.sh", 0),
    "jaeger": ("build-jaeger.sh", 0),
    # Prometheus 3 built from Go modules: what the end-to-end tests run by default.
    "prometheus": ("build-prometheus.sh", 0),
    "promtool": ("build-prometheus.sh", 1),
    # Debian's Prometheus 2.42.
    "prometheus-2": ("ensure-prometheus.sh", 0),
    "promtool-2": ("ensure-prometheus.sh", 1),
    "alertmanager": ("ensure-validators.sh", 2),
    "sloth": ("build-sloth.sh", 0),
    "dot": ("ensure-graphviz.sh", 0),
    "thanos": ("build-thanos.sh", 0),
}


class Unavailable(RuntimeError):
    """A prerequisite binary is not built or installed."""


# Ports handed out below the kernel's ephemeral range: a port taken from that range (bind to
# port 0) can be given to any outgoing connection between the check and the service's own
# bind, and the service then fails with "address already in use".
_PORT_RANGE = (20000, 32767)
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bound, then released),
    below the ephemeral range and not handed out before by this process."""
    low, high = _PORT_RANGE[0], min(_PORT_RANGE[1], _ephemeral_floor() - 1)
    for _ in range(200):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def binary(name: str) -> str:
    """Path of a prerequisite binary, as its script reports it (the script's --check mode
    builds or installs nothing); raises Unavailable when it is missing."""
    script, line = _LOCATORS[name]
    try:
        result = subprocess.run(
            ["bash", str(SCRIPTS / script), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{name}: scripts/{script} --check did not run: {exc}") from None
    paths = result.stdout.splitlines()
    if result.returncode != 0 or len(paths) <= line or not os.access(paths[line], os.X_OK):
        detail = result.stderr.strip() or f"scripts/{script} --check exited {result.returncode}"
        raise Unavailable(f"{name} is not available ({detail}); `make e2e-prereqs` provides it")
    return paths[line]


def loopback(port: int | None = None) -> str:
    """``127.0.0.1:<port>``, on a free port unless one is given."""
    return f"{LOOPBACK}:{port or free_port()}"


# ----------------------------------------------------------------------------- HTTP


def http_get(url: str, params: Mapping[str, Any] | None = None, timeout: float = 10) -> bytes:
    """GET a loopback URL; raises urllib.error.HTTPError on a non-2xx status."""
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    assert urllib.parse.urlsplit(url).hostname == LOOPBACK, f"not a loopback URL: {url}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def get_json(url: str, params: Mapping[str, Any] | None = None, timeout: float = 10) -> Any:
    return json.loads(http_get(url, params, timeout))


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


def wait_for(
    check: Callable[[], T], *, timeout: float = 30, interval: float = 0.5, what: str = "condition"
) -> T:
    """Call ``check`` until it returns something truthy; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, urllib.error.URLError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- processes


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _running(
    args: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` with output to ``log_path``; terminate it (then kill) on the way out."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def _wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    log_path: Path,
    timeout: float = 60,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"{what} exited with status {process.returncode} before it was ready:\n"
                + log_tail(log_path)
            )
        with contextlib.suppress(OSError, urllib.error.URLError):
            if ready():
                return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not ready after {timeout:g}s:\n" + log_tail(log_path))
        time.sleep(0.1)


@contextlib.contextmanager
def _log_dir(log_dir: Path | None) -> Iterator[Path]:
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        yield log_dir
    else:
        with tempfile.TemporaryDirectory(prefix="sage-otel-e2e-") as tmp:
            yield Path(tmp)


# ----------------------------------------------------------------------------- Prometheus


class PrometheusError(AssertionError):
    """Prometheus answered a query with an error (bad PromQL, for instance)."""


@dataclass
class Prometheus:
    url: str
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def remote_write_url(self) -> str:
        return self.url + "/api/v1/write"

    @property
    def otlp_url(self) -> str:
        """The OTLP receiver's base: a PROMETHEUS_OTLP_ENDPOINT (exporters add /v1/metrics)."""
        return self.url + "/api/v1/otlp"

    def api(self, path: str, **params: Any) -> Any:
        """``/api/v1/<path>``'s ``data``; a PrometheusError carries Prometheus' own message."""
        try:
            body = get_json(f"{self.url}/api/v1/{path}", params)
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                error = exc.reason
            raise PrometheusError(f"{path} {params}: {error}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, promql: str, time: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result: vectors as a list of samples, a scalar/string as one."""
        params: dict[str, Any] = {"query": promql}
        if time is not None:
            params["time"] = time
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(
        self, promql: str, start: float, end: float, step: float = 1
    ) -> list[dict[str, Any]]:
        return self.api("query_range", query=promql, start=start, end=end, step=step)["result"]

    def query_exemplars(self, promql: str, start: float, end: float) -> list[dict[str, Any]]:
        """``/api/v1/query_exemplars``: one entry per series, each with its ``exemplars``."""
        return self.api("query_exemplars", query=promql, start=start, end=end)

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_for(self, promql: str, *, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll an instant query until it returns a non-empty result."""
        return wait_for(lambda: self.query(promql), timeout=timeout, what=f"data for {promql!r}")


def shipped_otlp_settings() -> dict[str, Any]:
    """The ``otlp:`` and ``storage:`` sections of collector/prometheus/prometheus.yml: a test's
    Prometheus translates OTLP exactly as the shipped one does."""
    import yaml  # a test and tooling dependency only

    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {key: shipped[key] for key in ("otlp", "storage") if key in shipped}


def _scrape_configs(
    targets: Mapping[str, Sequence[str] | Mapping[str, Any]] | Sequence[str],
) -> list[dict[str, Any]]:
    if not isinstance(targets, Mapping):
        targets = {"sage": list(targets)} if targets else {}
    configs = []
    for job, spec in targets.items():
        if isinstance(spec, Mapping):
            configs.append({"job_name": job, **spec})
        else:
            configs.append({"job_name": job, "static_configs": [{"targets": list(spec)}]})
    return configs


@contextlib.contextmanager
def prometheus(
    tmp_path: Path,
    scrape_targets: Mapping[str, Sequence[str] | Mapping[str, Any]] | Sequence[str] = (),
    *,
    remote_write: bool = True,
    rule_files: Sequence[str | Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    extra_args: Sequence[str] = (),
    extra_config: Mapping[str, Any] | None = None,
    executable: str | None = None,
    otlp: bool = False,
) -> Iterator[Prometheus]:
    """A Prometheus on a free loopback port, its config and data under ``tmp_path``.

    ``scrape_targets`` is a list of ``host:port`` (job ``sage``) or a mapping from job name
    to such a list, or to a scrape config of its own (``static_configs``, ``metrics_path``…).
    Exemplar storage is always on; the remote-write receiver unless ``remote_write=False``;
    with ``otlp`` the OTLP receiver (``Prometheus.otlp_url``, Prometheus 3), with the
    ``otlp:`` and out-of-order settings of the shipped prometheus.yml.
    """
    executable = executable or binary("prometheus")
    root = tmp_path / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(path).resolve()) for path in rule_files],
        "scrape_configs": _scrape_configs(scrape_targets),
        **(shipped_otlp_settings() if otlp else {}),
        **dict(extra_config or {}),
    }
    config_path = root / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    address = loopback()
    args = [
        executable,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address={address}",
        "--enable-feature=exemplar-storage",
        "--log.level=info",
        *(["--web.enable-remote-write-receiver"] if remote_write else []),
        *(["--web.enable-otlp-receiver"] if otlp else []),
        *extra_args,
    ]
    log_path = root / "prometheus.log"
    url = f"http://{address}"
    with _running(args, log_path=log_path) as process:
        _wait_ready(
            process,
            lambda: bool(http_get(url + "/-/ready", timeout=2)),
            what="prometheus",
            log_path=log_path,
        )
        yield Prometheus(url, config_path, log_path, process)


# ----------------------------------------------------------------------------- collector


@dataclass
class Collector:
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def otlp_grpc(self) -> str:
        """``127.0.0.1:<port>`` of the OTLP gRPC receiver."""
        return self.env["OTLP_GRPC_ENDPOINT"]

    @property
    def otlp_http(self) -> str:
        """``http://127.0.0.1:<port>``: an OTEL_EXPORTER_OTLP_ENDPOINT for the HTTP receiver."""
        return "http://" + self.env["OTLP_HTTP_ENDPOINT"]

    @property
    def health_url(self) -> str:
        return "http://" + self.env["HEALTH_CHECK_ENDPOINT"] + "/"

    @property
    def metrics_address(self) -> str:
        """``host:port`` of the collector's own /metrics."""
        return f"{self.env['COLLECTOR_METRICS_HOST']}:{self.env['COLLECTOR_METRICS_PORT']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def collector_env(**overrides: str) -> dict[str, str]:
    """Every endpoint variable of collector/otel-collector.yaml on a loopback port.

    The exporters' defaults point at ports nobody listens on, so nothing leaves loopback
    even when a test does not override them.
    """
    env = {
        "OTLP_GRPC_ENDPOINT": loopback(),
        "OTLP_HTTP_ENDPOINT": loopback(),
        "HEALTH_CHECK_ENDPOINT": loopback(),
        "COLLECTOR_METRICS_HOST": LOOPBACK,
        "COLLECTOR_METRICS_PORT": str(free_port()),
        "TEMPO_ENDPOINT": loopback(),
        "PROMETHEUS_OTLP_ENDPOINT": f"http://{loopback()}/api/v1/otlp",
        "PROMETHEUS_REMOTE_WRITE_URL": f"http://{loopback()}/api/v1/write",
        "DEPLOYMENT_ENVIRONMENT": "e2e",
    }
    env.update(overrides)
    return env


@contextlib.contextmanager
def collector(
    config_path: Path | Sequence[Path] = COLLECTOR_CONFIG,
    env: Mapping[str, str] | None = None,
    *,
    log_dir: Path | None = None,
    ready_timeout: float = 60,
    name: str = "collector",
) -> Iterator[Collector]:
    """The sage-otelcol binary running ``config_path``, ready once its health check says so.

    Several paths are merged in order, as several ``--config`` flags are (an overlay such
    as ``REMOTE_WRITE_OVERLAY`` after the base file). ``env`` overrides the loopback
    defaults of ``collector_env()``; ``name`` names the log (``<name>.log``).
    """
    executable = binary("sage-otelcol")
    settings = collector_env(**dict(env or {}))
    paths = [config_path] if isinstance(config_path, (str, Path)) else list(config_path)
    with _log_dir(log_dir) as directory:
        log_path = directory / f"{name}.log"
        args = [executable, *(f"--config={path}" for path in paths)]
        with _running(args, log_path=log_path, env={**os.environ, **settings}) as process:
            running = Collector(settings, log_path, process)
            _wait_ready(
                process,
                lambda: bool(http_get(running.health_url, timeout=2)),
                what="sage-otelcol",
                log_path=log_path,
                timeout=ready_timeout,
            )
            yield running


# ----------------------------------------------------------------------------- Jaeger


@dataclass
class Jaeger:
    otlp_grpc: str
    """``127.0.0.1:<port>`` of its OTLP gRPC receiver (a TEMPO_ENDPOINT for the collector)."""
    otlp_http: str
    """``http://127.0.0.1:<port>`` of its OTLP HTTP receiver."""
    query_url: str
    """``http://127.0.0.1:<port>``: the query service's HTTP API."""
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def services(self) -> list[str]:
        return get_json(self.query_url + "/api/services")["data"] or []

    def operations(self, service: str) -> list[str]:
        path = f"/api/services/{urllib.parse.quote(service, safe='')}/operations"
        return get_json(self.query_url + path)["data"] or []

    def traces(
        self, service: str, *, limit: int = 100, lookback: str = "1h", **params: Any
    ) -> list[dict[str, Any]]:
        """Search: ``/api/traces?service=…``, each trace with ``traceID``, ``spans``, …"""
        query = {"service": service, "limit": limit, "lookback": lookback, **params}
        return get_json(self.query_url + "/api/traces", query)["data"] or []

    def find_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace with this id (32 hex digits), or None when Jaeger does not have it."""
        try:
            data = get_json(f"{self.query_url}/api/traces/{trace_id.lower()}")["data"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return data[0] if data else None


@contextlib.contextmanager
def jaeger(
    log_dir: Path | None = None,
    *,
    config_path: Path = JAEGER_CONFIG,
    ready_timeout: float = 60,
) -> Iterator[Jaeger]:
    """Jaeger v2 with in-memory storage: OTLP receivers and the query API on loopback."""
    executable = binary("jaeger")
    settings = {
        "JAEGER_OTLP_GRPC_ENDPOINT": loopback(),
        "JAEGER_OTLP_HTTP_ENDPOINT": loopback(),
        "JAEGER_QUERY_HTTP_ENDPOINT": loopback(),
        "JAEGER_QUERY_GRPC_ENDPOINT": loopback(),
    }
    with _log_dir(log_dir) as directory:
        log_path = directory / "jaeger.log"
        args = [executable, f"--config={config_path}"]
        with _running(args, log_path=log_path, env={**os.environ, **settings}) as process:
            running = Jaeger(
                otlp_grpc=settings["JAEGER_OTLP_GRPC_ENDPOINT"],
                otlp_http="http://" + settings["JAEGER_OTLP_HTTP_ENDPOINT"],
                query_url="http://" + settings["JAEGER_QUERY_HTTP_ENDPOINT"],
                log_path=log_path,
                process=process,
            )
            _wait_ready(
                process,
                lambda: (
                    port_open(running.otlp_grpc)
                    and port_open(settings["JAEGER_OTLP_HTTP_ENDPOINT"])
                    and isinstance(running.services(), list)
                ),
                what="jaeger",
                log_path=log_path,
                timeout=ready_timeout,
            )
            yield running


# ----------------------------------------------------------------------------- Alertmanager


@dataclass
class Alertmanager:
    url: str
    """``http://127.0.0.1:<port>``: the API and UI (Prometheus' ``alerting`` target)."""
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, as a Prometheus ``alertmanagers`` static target."""
        return self.url.removeprefix("http://")

    def alerts(self, **params: Any) -> list[dict[str, Any]]:
        """``/api/v2/alerts``: each alert with ``labels`` and ``status`` (``state``:
        active or suppressed, ``inhibitedBy``: the inhibiting alerts' fingerprints)."""
        return get_json(self.url + "/api/v2/alerts", params)


@contextlib.contextmanager
def alertmanager(
    tmp_path: Path, config: str, *, executable: str | None = None
) -> Iterator[Alertmanager]:
    """An Alertmanager running ``config`` (the YAML text) on a free loopback port, alone:
    clustering off, so it binds nothing else, and its data under ``tmp_path``."""
    executable = executable or binary("alertmanager")
    root = tmp_path / "alertmanager"
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "alertmanager.yml"
    config_path.write_text(config)
    address = loopback()
    url = f"http://{address}"
    args = [
        executable,
        f"--config.file={config_path}",
        f"--storage.path={root / 'data'}",
        f"--web.listen-address={address}",
        f"--web.external-url={url}",
        "--cluster.listen-address=",
        "--log.level=info",
    ]
    log_path = root / "alertmanager.log"
    with _running(args, log_path=log_path) as process:
        _wait_ready(
            process,
            lambda: bool(http_get(url + "/-/ready", timeout=2)),
            what="alertmanager",
            log_path=log_path,
        )
        yield Alertmanager(url, config_path, log_path, process)
