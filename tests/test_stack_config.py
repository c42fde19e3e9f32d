"""The compose stacks for users (collector/docker-compose*.yaml) and the files they mount.

Nothing here runs a container (there is no Docker engine). The compose files, alone and with
the remote-write override merged in, are validated against the Compose Specification by
Debian's ``docker-compose`` (``config`` works offline and checks the files against the spec's
JSON schema); every configuration they mount by the program that reads it: the collector's
by ``sage-otelcol validate``, Prometheus's by Prometheus 3's ``promtool`` (the release of the
compose image, built by scripts/build-prometheus.sh), Alertmanager's by ``amtool``. Tempo's
config and Grafana's provisioning are checked structurally and against each other: every
uid, host, port and path one file names must be what the file it points at defines.

``make validators`` and ``make e2e-prereqs`` provide the validators; a missing one fails the
test under ``CI=true`` and skips it elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
import yaml

from sage_otel.telemetry.catalog import INSTRUMENTS, OTHER, Kind
from tools import services as stack_services

REPO = Path(__file__).resolve().parents[1]
COLLECTOR = REPO / "collector"
COMPOSE = COLLECTOR / "docker-compose.yaml"
REMOTE_WRITE_COMPOSE = COLLECTOR / "docker-compose.remote-write.yaml"
COLLECTOR_CONFIG = COLLECTOR / "otel-collector.yaml"
REMOTE_WRITE_CONFIG = COLLECTOR / "otel-collector.remote-write.yaml"
BUILDER_CONFIG = COLLECTOR / "builder-config.yaml"
PROMETHEUS_CONFIG = COLLECTOR / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = COLLECTOR / "alertmanager" / "alertmanager.yml"
TEMPO_CONFIG = COLLECTOR / "tempo" / "tempo.yaml"
DATASOURCES = COLLECTOR / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = COLLECTOR / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARD_DIR = COLLECTOR / "grafana" / "dashboards"

SERVICES = {"sage-demo", "otel-collector", "tempo", "prometheus", "alertmanager", "grafana"}
# The monitoring plan (§6.2): agent metrics on 9090, Prometheus on 9091, Grafana on 3000.
PLAN_PORTS = {9090: ("sage-demo", 9090), 9091: ("prometheus", 9090), 3000: ("grafana", 3000)}
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib"
PROMETHEUS_IMAGE = "prom/prometheus"
BUILD_PROMETHEUS = REPO / "scripts" / "build-prometheus.sh"
BUILD_JAEGER = REPO / "scripts" / "build-jaeger.sh"
# Jaeger's newest approved release; the newer ones served by the module proxy are not.
JAEGER_RELEASE = "v1.75.0"
GRAFANA_PROVISIONING = PurePosixPath("/etc/grafana/provisioning")
CATALOG_NAMES = {instrument.prometheus_name for instrument in INSTRUMENTS}
SAGE_METRIC = re.compile(r"\bsage_[a-z0-9_]+")


def missing(reason: str) -> NoReturn:
    """A validator is absent: fail under CI (it must be there), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def tool(name: str) -> str:
    """A prerequisite binary located as the end-to-end tests locate it (tools/services.py)."""
    try:
        return stack_services.binary(name)
    except stack_services.Unavailable as exc:
        missing(str(exc))


def load(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def run(argv: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- parsed files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return load(PROMETHEUS_CONFIG)


@pytest.fixture(scope="module")
def tempo() -> dict[str, Any]:
    return load(TEMPO_CONFIG)


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    document = load(DATASOURCES)
    assert document["apiVersion"] == 1
    listed = document["datasources"]
    uids = [source["uid"] for source in listed]
    assert len(uids) == len(set(uids)), f"duplicate data source uids: {uids}"
    return {source["uid"]: source for source in listed}


def image_parts(image: str) -> tuple[str, str]:
    """``repo[:tag][@digest]`` -> (repo, tag); the tag is "" when there is none."""
    name = image.split("@", 1)[0]
    repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    return repo, tag


def published_ports(service: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """(host port, container port) of each published port, short or long syntax."""
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            yield int(entry["published"]), int(entry["target"])
            continue
        parts = str(entry).split("/", 1)[0].split(":")
        assert len(parts) in (2, 3), f"{entry!r}: publish ports as [IP:]HOST:CONTAINER"
        yield int(parts[-2]), int(parts[-1])


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, PurePosixPath]]:
    """(source, container path) of each volume entry, short or long syntax."""
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            yield str(entry["source"]), PurePosixPath(entry["target"])
        else:
            source, target = str(entry).split(":")[:2]
            yield source, PurePosixPath(target)


def bind_mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> the repository path bind-mounted there (relative to collector/)."""
    return {
        target: (COLLECTOR / source).resolve()
        for source, target in mounts(service)
        if source.startswith((".", "/"))
    }


def repo_path_in(service: dict[str, Any], container_path: PurePosixPath) -> Path | None:
    """The repository file a container path of ``service`` shows, through its bind mounts."""
    for target, source in bind_mounts(service).items():
        if container_path == target or target in container_path.parents:
            return source / container_path.relative_to(target)
    return None


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def container_ports(service: dict[str, Any]) -> set[int]:
    return {container for _, container in published_ports(service)}


# --- the compose file -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_compose() -> str:
    """Debian's docker-compose (v1, which validates the Compose Specification form offline),
    installed by ``make validators`` (scripts/ensure-validators.sh)."""
    found = shutil.which("docker-compose")
    if not found:
        missing("docker-compose is not installed (run: make validators)")
    return found


def test_compose_file_is_valid_against_the_compose_specification(docker_compose: str) -> None:
    result = run([docker_compose, "-f", str(COMPOSE), "config", "-q"])
    assert result.returncode == 0, result.stderr or result.stdout


def test_compose_validator_rejects_what_the_specification_does_not_allow(
    docker_compose: str, tmp_path: Path
) -> None:
    """The check above means something: an unknown service key is an error."""
    bad = tmp_path / "docker-compose.yaml"
    bad.write_text("services:\n  demo:\n    image: busybox:1.36\n    no_such_key: 1\n")
    result = run([docker_compose, "-f", str(bad), "config", "-q"])
    assert result.returncode != 0
    assert "no_such_key" in result.stderr


def test_compose_uses_the_specification_form(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose Specification has no `version:` key"
    assert set(compose["services"]) == SERVICES


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        repo, tag = image_parts(service["image"])
        assert tag and tag != "latest", f"{name}: pin {repo} to a release, not {tag or 'none'}"
        assert re.search(r"\d", tag), f"{name}: {service['image']} names no version"


def test_collector_image_is_the_builder_manifest_release(
    services: dict[str, dict[str, Any]],
) -> None:
    release = load(BUILDER_CONFIG)["dist"]["version"]
    repo, tag = image_parts(services["otel-collector"]["image"])
    assert repo == COLLECTOR_IMAGE
    assert tag.removeprefix("v") == str(release).removeprefix("v")


def test_published_ports_follow_the_plan(services: dict[str, dict[str, Any]]) -> None:
    published: dict[int, tuple[str, int]] = {}
    for name, service in services.items():
        for host, container in published_ports(service):
            assert host not in published, f"host port {host} published twice"
            published[host] = (name, container)
    for host, expected in PLAN_PORTS.items():
        assert published.get(host) == expected, f"host port {host}"


def test_every_bind_mount_exists_in_the_repository(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert source == REPO or REPO in source.parents, f"{name}: {source} is outside"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _ in mounts(service):
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_dependencies_exist_and_wait_only_for_checkable_health(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for other, condition in (service.get("depends_on") or {}).items():
            assert other in services, f"{name} depends on unknown service {other}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[other], f"{other} has no health check"


def test_collector_service_matches_its_config(
    services: dict[str, dict[str, Any]], tempo: dict[str, Any]
) -> None:
    collector = services["otel-collector"]
    config_text = COLLECTOR_CONFIG.read_text(encoding="utf-8")
    variables = set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", config_text))
    env = {key: str(value) for key, value in collector["environment"].items()}
    assert set(env) <= variables, f"not variables of otel-collector.yaml: {set(env) - variables}"

    # The config is mounted where --config reads it.
    config_flag = next(arg for arg in collector["command"] if arg.startswith("--config"))
    assert repo_path_in(collector, PurePosixPath(config_flag.split("=", 1)[1])) == COLLECTOR_CONFIG

    # Traces to Tempo's OTLP gRPC receiver.
    host, port = host_port(env["TEMPO_ENDPOINT"])
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host == "tempo"
    assert port == host_port(tempo_grpc)[1]

    # Metrics to Prometheus's OTLP receiver (the exporter appends /v1/metrics), on the port
    # it listens on inside, which the receiver's flag turns on.
    url = urlsplit(env["PROMETHEUS_OTLP_ENDPOINT"])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http",
        "prometheus",
        9090,
        "/api/v1/otlp",
    )
    assert url.port in container_ports(services["prometheus"])
    assert "--web.enable-otlp-receiver" in services["prometheus"]["command"]
    assert "PROMETHEUS_REMOTE_WRITE_URL" not in env, "remote write is the override's option"

    # The OTLP receivers and the health check listen on every interface, published as is.
    for key in ("OTLP_GRPC_ENDPOINT", "OTLP_HTTP_ENDPOINT", "HEALTH_CHECK_ENDPOINT"):
        listen_host, listen_port = host_port(env[key])
        assert listen_host == "0.0.0.0", key
        assert (listen_port, listen_port) in set(published_ports(collector)), key


def test_demo_agent_service(services: dict[str, dict[str, Any]]) -> None:
    demo = services["sage-demo"]
    assert image_parts(demo["image"]) == ("python", "3.12-slim")
    script = " ".join(demo["command"])
    assert "pip install" in script and "/src" in script
    assert "sage-otel demo --in-process --metrics-port 9090" in script
    assert repo_path_in(demo, PurePosixPath("/src/pyproject.toml")) == REPO / "pyproject.toml"

    env = {key: str(value) for key, value in demo["environment"].items()}
    assert env["OTEL_EXPORTER_PROMETHEUS_HOST"] == "0.0.0.0"
    assert env["OTEL_SERVICE_NAME"]
    # Traces-to-metrics maps service.name to the job label; the collector's remote write
    # makes job "<namespace>/<name>" when service.namespace is set.
    assert "service.namespace" not in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "otel-collector", 4318)
    collector_env = services["otel-collector"]["environment"]
    assert host_port(collector_env["OTLP_HTTP_ENDPOINT"])[1] == endpoint.port
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"


# --- the collector's configurations and the remote-write override ---------------------------


def config_variables(*paths: Path) -> set[str]:
    """The ${env:NAME} variables the collector configurations read."""
    text = "".join(path.read_text(encoding="utf-8") for path in paths)
    return set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", text))


def metrics_exporters(config: dict[str, Any]) -> list[str]:
    return config["service"]["pipelines"]["metrics"]["exporters"]


@pytest.mark.parametrize(
    "configs",
    [[COLLECTOR_CONFIG], [COLLECTOR_CONFIG, REMOTE_WRITE_CONFIG]],
    ids=["otlp", "remote-write"],
)
def test_collector_configs_validate_with_the_built_collector(configs: list[Path]) -> None:
    """The shipped configuration, and it with the remote-write overlay merged in, as the
    compose files run them (several --config flags are merged by the collector)."""
    collector = tool("sage-otelcol")
    result = run([collector, "validate", *[f"--config={path}" for path in configs]])
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_metrics_go_over_otlp_and_the_overlay_switches_them_to_remote_write() -> None:
    base, overlay = load(COLLECTOR_CONFIG), load(REMOTE_WRITE_CONFIG)
    default = metrics_exporters(base)
    assert default and all(name.split("/")[0] in {"otlp_http", "otlphttp"} for name in default)
    for name in default:
        assert "${env:PROMETHEUS_OTLP_ENDPOINT" in str(base["exporters"][name]["endpoint"])
    # The collector merges maps key by key and replaces lists: the overlay's exporter list wins.
    switched = metrics_exporters(overlay)
    assert switched and all(n.split("/")[0] == "prometheus_remote_write" for n in switched)
    exporters = {**base.get("exporters", {}), **overlay.get("exporters", {})}
    for name in switched:
        endpoint = str(exporters[name]["http"]["endpoint"])
        assert "${env:PROMETHEUS_REMOTE_WRITE_URL" in endpoint, name
    # Traces are untouched by the overlay.
    assert "traces" not in overlay["service"]["pipelines"] or (
        overlay["service"]["pipelines"]["traces"] == base["service"]["pipelines"]["traces"]
    )


@pytest.fixture(scope="module")
def remote_write_stack(docker_compose: str) -> dict[str, Any]:
    """docker-compose's own merge of the compose file and the remote-write override."""
    result = run([docker_compose, "-f", str(COMPOSE), "-f", str(REMOTE_WRITE_COMPOSE), "config"])
    assert result.returncode == 0, result.stderr or result.stdout
    return yaml.safe_load(result.stdout)


def test_remote_write_override_changes_only_the_collector(
    remote_write_stack: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert set(load(REMOTE_WRITE_COMPOSE)["services"]) == {"otel-collector"}
    merged = remote_write_stack["services"]
    assert set(merged) == set(services)
    for name in set(services) - {"otel-collector"}:
        assert merged[name]["image"] == services[name]["image"], name
        assert merged[name].get("command") == services[name].get("command"), name


def test_remote_write_override_runs_the_overlay_into_prometheus(
    remote_write_stack: dict[str, Any],
) -> None:
    merged = remote_write_stack["services"]
    collector = merged["otel-collector"]
    paths = [
        repo_path_in(collector, PurePosixPath(arg.split("=", 1)[1]))
        for arg in collector["command"]
        if arg.startswith("--config")
    ]
    assert paths == [COLLECTOR_CONFIG, REMOTE_WRITE_CONFIG]
    for path in paths:
        assert path is not None and path.is_file(), path
    env = {key: str(value) for key, value in collector["environment"].items()}
    assert set(env) <= config_variables(COLLECTOR_CONFIG, REMOTE_WRITE_CONFIG)
    url = urlsplit(env["PROMETHEUS_REMOTE_WRITE_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http",
        "prometheus",
        9090,
        "/api/v1/write",
    )
    assert "--web.enable-remote-write-receiver" in merged["prometheus"]["command"]


# --- Prometheus and Alertmanager ------------------------------------------------------------


def test_promtool_accepts_the_config() -> None:
    """Prometheus 3's promtool, the compose image's release: it also loads every rule file."""
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    rule_files = sorted((PROMETHEUS_CONFIG.parent / "alerts").glob("*.yml"))
    assert rule_files
    for path in rule_files:
        assert f"Checking {path}\n" in result.stdout, f"{path.name} was not loaded"


def test_promtool_validation_means_something(tmp_path: Path) -> None:
    """The check above rejects a setting Prometheus does not have."""
    config = load(PROMETHEUS_CONFIG)
    config.pop("rule_files", None)
    config.setdefault("otlp", {})["no_such_setting"] = True
    bad = tmp_path / "prometheus.yml"
    bad.write_text(yaml.safe_dump(config))
    result = run([tool("promtool"), "check", "config", str(bad)])
    assert result.returncode != 0
    assert "no_such_setting" in result.stdout + result.stderr


def prometheus_release() -> str:
    """The Prometheus release scripts/build-prometheus.sh builds: module v0.3XX.Y is v3.XX.Y."""
    found = re.search(r"PROMETHEUS_VERSION:-v0\.(\d+)\.(\d+)\b", BUILD_PROMETHEUS.read_text())
    assert found, "scripts/build-prometheus.sh names no PROMETHEUS_VERSION default"
    major, minor = divmod(int(found.group(1)), 100)
    return f"v{major}.{minor}.{found.group(2)}"


def test_prometheus_image_is_the_release_the_tests_run(
    services: dict[str, dict[str, Any]],
) -> None:
    repo, tag = image_parts(services["prometheus"]["image"])
    assert repo == PROMETHEUS_IMAGE
    assert tag == prometheus_release()
    assert tag.startswith("v3."), "the OTLP receiver and prometheus.yml's otlp: need Prometheus 3"


def test_built_prometheus_is_that_release() -> None:
    """The binary the end-to-end tests and the checks above run reports that very version."""
    result = run([tool("prometheus"), "--version"])
    assert result.returncode == 0, result.stderr
    version = re.search(r"prometheus, version (\S+)", result.stdout + result.stderr)
    assert version, result.stdout + result.stderr
    assert f"v{version.group(1)}" == prometheus_release()


def test_prometheus_service_flags_and_mounts(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    flags = prometheus["command"]
    # The collector's metrics arrive over OTLP; Tempo's metrics generator can only remote-write.
    assert "--web.enable-otlp-receiver" in flags
    assert "--web.enable-remote-write-receiver" in flags
    assert "--enable-feature=exemplar-storage" in flags
    config_flag = next(flag for flag in flags if flag.startswith("--config.file="))
    config_path = PurePosixPath(config_flag.split("=", 1)[1])
    assert repo_path_in(prometheus, config_path) == PROMETHEUS_CONFIG
    # rule_files are relative to the config file: the alerts must be mounted beside it.
    alerts_dir = repo_path_in(prometheus, config_path.parent / "alerts")
    assert alerts_dir == PROMETHEUS_CONFIG.parent / "alerts"


def test_prometheus_scrapes_the_agent_the_collector_and_itself(
    prometheus_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    assert set(jobs) >= {"sage-agent", "otel-collector", "prometheus"}

    def targets(job: str) -> list[str]:
        return [t for group in jobs[job]["static_configs"] for t in group["targets"]]

    assert jobs["sage-agent"].get("metrics_path", "/metrics") == "/metrics"
    assert "sage-demo:9090" in targets("sage-agent")
    collector_port = services["otel-collector"]["environment"]["COLLECTOR_METRICS_PORT"]
    assert f"otel-collector:{collector_port}" in targets("otel-collector")
    assert "localhost:9090" in targets("prometheus")
    for job in jobs.values():
        for target in (t for group in job["static_configs"] for t in group["targets"]):
            host, _ = host_port(target)
            assert host in services or host == "localhost", f"{job['job_name']}: {target}"


def test_exemplars_are_scraped(prometheus_config: dict[str, Any]) -> None:
    """Exemplars come only with OpenMetrics: a scrape_protocols override must keep it."""
    blocks = [prometheus_config.get("global", {}), *prometheus_config["scrape_configs"]]
    for block in blocks:
        if "scrape_protocols" in block:
            assert any(p.startswith("OpenMetricsText") for p in block["scrape_protocols"])


def test_prometheus_rules_and_alertmanager(
    prometheus_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert prometheus_config["rule_files"] == ["alerts/*.yml"]
    targets = [
        target
        for manager in prometheus_config["alerting"]["alertmanagers"]
        for group in manager["static_configs"]
        for target in group["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    assert 9093 in container_ports(services["alertmanager"])


def test_alertmanager_config_structure(services: dict[str, dict[str, Any]]) -> None:
    config = load(ALERTMANAGER_CONFIG)
    names = [receiver["name"] for receiver in config["receivers"]]
    assert len(names) == len(set(names))

    def walk(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield route
        for child in route.get("routes", []):
            yield from walk(child)

    assert config["route"].get("receiver"), "the top-level route needs a receiver"
    for route in walk(config["route"]):
        if "receiver" in route:
            assert route["receiver"] in names, f"unknown receiver {route['receiver']}"

    def reached(route: dict[str, Any], inherited: str) -> Iterator[str]:
        """The receiver of every route; a route without one takes its parent's."""
        own = route.get("receiver", inherited)
        yield own
        for child in route.get("routes", []):
            yield from reached(child, own)

    # Where notifications go is said in one place: every route ends at the one receiver.
    receivers = set(reached(config["route"], config["route"]["receiver"]))
    assert len(names) == 1 and receivers == set(names), f"receivers {names}, routed {receivers}"
    alertmanager = services["alertmanager"]
    config_flag = next(f for f in alertmanager["command"] if f.startswith("--config.file="))
    mounted = repo_path_in(alertmanager, PurePosixPath(config_flag.split("=", 1)[1]))
    assert mounted == ALERTMANAGER_CONFIG


def test_amtool_accepts_the_config() -> None:
    amtool = shutil.which("amtool")
    if not amtool:
        missing("amtool is not installed (run: make validators)")
    result = run([amtool, "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Tempo ----------------------------------------------------------------------------------


def test_tempo_receives_otlp_on_every_interface(tempo: dict[str, Any]) -> None:
    protocols = tempo["distributor"]["receivers"]["otlp"]["protocols"]
    assert host_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert host_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)


def test_tempo_stores_locally_on_its_volume(
    tempo: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    volumes = {target for source, target in mounts(services["tempo"]) if not source.startswith(".")}
    trace = tempo["storage"]["trace"]
    assert trace["backend"] == "local"
    paths = [
        trace["wal"]["path"],
        trace["local"]["path"],
        tempo["metrics_generator"]["storage"]["path"],
    ]
    for path in map(PurePosixPath, paths):
        assert any(volume in path.parents for volume in volumes), f"{path} is not on a volume"


def test_tempo_generates_service_graphs_and_span_metrics_into_prometheus(
    tempo: dict[str, Any], services: dict[str, dict[str, Any]], datasources: dict[str, Any]
) -> None:
    generator = tempo["overrides"]["defaults"]["metrics_generator"]
    assert {"service-graphs", "span-metrics"} <= set(generator["processors"])
    writes = tempo["metrics_generator"]["storage"]["remote_write"]
    assert writes, "the metrics generator must remote-write somewhere"
    for write in writes:
        url = urlsplit(write["url"])
        assert (url.hostname, url.port, url.path) == ("prometheus", 9090, "/api/v1/write")
        assert write.get("send_exemplars") is True
    assert "--web.enable-remote-write-receiver" in services["prometheus"]["command"]
    # The generated histograms' exemplars use the label Grafana turns into trace links.
    destinations = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert generator.get("trace_id_label_name", "traceID") in {d["name"] for d in destinations}


def test_tempo_service_runs_this_config(
    tempo: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    service = services["tempo"]
    flag = next(arg for arg in service["command"] if arg.startswith("-config.file="))
    assert repo_path_in(service, PurePosixPath(flag.split("=", 1)[1])) == TEMPO_CONFIG
    assert tempo["server"]["http_listen_port"] in container_ports(service)


# --- Grafana --------------------------------------------------------------------------------


def test_grafana_datasources_point_at_the_stack(
    datasources: dict[str, dict[str, Any]],
    services: dict[str, dict[str, Any]],
    tempo: dict[str, Any],
) -> None:
    expected = {
        "prometheus": ("prometheus", "prometheus", 9090),
        "tempo": ("tempo", "tempo", tempo["server"]["http_listen_port"]),
    }
    for uid, (kind, host, port) in expected.items():
        source = datasources[uid]
        url = urlsplit(source["url"])
        assert source["type"] == kind
        assert (url.hostname, url.port) == (host, port)
    for source in datasources.values():
        url = urlsplit(source["url"])
        assert url.hostname in services, f"{source['name']}: {url.hostname} is no service"
        assert url.port in container_ports(services[url.hostname]), source["name"]


def test_exemplars_link_to_tempo(datasources: dict[str, dict[str, Any]]) -> None:
    destinations = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert {"name": "trace_id", "datasourceUid": "tempo"} in destinations
    for destination in destinations:
        assert datasources[destination["datasourceUid"]]["type"] == "tempo"


def test_tempo_links_to_sage_metrics_and_a_service_map(
    datasources: dict[str, dict[str, Any]],
) -> None:
    settings = datasources["tempo"]["jsonData"]
    traces_to_metrics = settings["tracesToMetrics"]
    assert datasources[traces_to_metrics["datasourceUid"]]["type"] == "prometheus"
    assert {"key": "service.name", "value": "job"} in traces_to_metrics["tags"]
    queries = traces_to_metrics["queries"]
    assert queries
    for query in queries:
        assert "$__tags" in query["query"], query["name"]
        names = {
            re.sub(r"_(bucket|sum|count)$", "", name)
            for name in SAGE_METRIC.findall(query["query"])
        }
        assert names, f"{query['name']}: no SAGE metric"
        assert names <= CATALOG_NAMES, f"{query['name']}: not in the catalog: {names}"
    assert datasources[settings["serviceMap"]["datasourceUid"]]["type"] == "prometheus"
    assert settings["nodeGraph"]["enabled"] is True
    assert "tracesToLogs" not in settings and "tracesToLogsV2" not in settings


def test_dashboards_use_provisioned_datasources(datasources: dict[str, dict[str, Any]]) -> None:
    def referenced(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            reference = node.get("datasource")
            if isinstance(reference, dict) and isinstance(reference.get("uid"), str):
                yield reference["uid"]
            if node.get("type") == "datasource" and isinstance(node.get("current"), dict):
                yield str(node["current"].get("value", ""))
            for value in node.values():
                yield from referenced(value)
        elif isinstance(node, list):
            for value in node:
                yield from referenced(value)

    files = sorted(DASHBOARD_DIR.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARD_DIR.relative_to(REPO)}"
    for file in files:
        uids = set(referenced(json.loads(file.read_text(encoding="utf-8"))))
        concrete = {uid for uid in uids if uid and not uid.startswith(("$", "-- "))}
        assert concrete <= set(datasources), f"{file.name}: {concrete - set(datasources)}"


def test_grafana_provisioning_is_mounted(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert repo_path_in(grafana, GRAFANA_PROVISIONING / "datasources" / DATASOURCES.name) == (
        DATASOURCES
    )
    assert repo_path_in(
        grafana, GRAFANA_PROVISIONING / "dashboards" / DASHBOARD_PROVIDERS.name
    ) == (DASHBOARD_PROVIDERS)


def test_dashboard_provider_reads_the_mounted_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    document = load(DASHBOARD_PROVIDERS)
    assert document["apiVersion"] == 1
    grafana = services["grafana"]
    providers = document["providers"]
    assert providers
    for provider in providers:
        assert provider["type"] == "file"
        path = PurePosixPath(provider["options"]["path"])
        assert path == PurePosixPath("/var/lib/grafana/dashboards")
        assert repo_path_in(grafana, path) == DASHBOARD_DIR
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        shown = repo_path_in(grafana, PurePosixPath(home))
        assert shown is not None and shown.is_file(), f"home dashboard {home} is not mounted"


# --- the scale-out stack (collector/docker-compose.scale.yaml, docs/scaling.md) -------------

SCALE_COMPOSE = COLLECTOR / "docker-compose.scale.yaml"
AGENT_TIER = COLLECTOR / "tiers" / "agent.yaml"
GATEWAY_TIER = COLLECTOR / "tiers" / "gateway.yaml"
SCALE_TEMPO = COLLECTOR / "tiers" / "tempo.yaml"
HASHRING = COLLECTOR / "tiers" / "thanos" / "hashring.json"
THANOS_IMAGE = "quay.io/thanos/thanos"
INGESTERS = {"thanos-receive-1", "thanos-receive-2", "thanos-receive-3"}


def flag(args: list[str], name: str) -> str:
    """The value of ``--name=value`` in a command line (the only one)."""
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name}: {values}"
    return values[0]


@pytest.fixture(scope="module")
def scale() -> dict[str, dict[str, Any]]:
    return load(SCALE_COMPOSE)["services"]


def test_scale_compose_file_is_valid(docker_compose: str) -> None:
    result = run([docker_compose, "-f", str(SCALE_COMPOSE), "config", "-q"])
    assert result.returncode == 0, result.stderr or result.stdout


@pytest.mark.parametrize("config", [AGENT_TIER, GATEWAY_TIER], ids=lambda p: p.stem)
def test_tier_configs_validate_with_the_built_collector(config: Path) -> None:
    collector = tool("sage-otelcol")
    result = run([collector, "validate", f"--config={config}"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_tier_validation_means_something(tmp_path: Path) -> None:
    """The check above rejects a setting the tail sampler does not have. (It does not parse
    the policies' OTTL: tests/e2e/test_scale.py runs the gateways, which do.)"""
    collector = tool("sage-otelcol")
    config = load(GATEWAY_TIER)
    config["processors"]["tail_sampling"]["no_such_setting"] = 1
    bad = tmp_path / "gateway.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = run([collector, "validate", f"--config={bad}"])
    assert result.returncode != 0
    assert "no_such_setting" in result.stdout + result.stderr


def test_thanos_accepts_the_alert_rules() -> None:
    """thanos rule evaluates the project's rule files unchanged in the scale-out stack."""
    thanos = tool("thanos")
    rules = sorted(str(path) for path in (COLLECTOR / "prometheus" / "alerts").glob("*.yml"))
    assert rules
    result = run([thanos, "tools", "rules-check", *[f"--rules={path}" for path in rules]])
    assert result.returncode == 0, result.stdout + result.stderr


def test_scale_images_are_pinned_at_the_manifest_and_thanos_releases(
    scale: dict[str, dict[str, Any]],
) -> None:
    release = str(load(BUILDER_CONFIG)["dist"]["version"])
    thanos_version = re.search(
        r"THANOS_VERSION:-(v[0-9.]+)", (REPO / "scripts" / "build-thanos.sh").read_text()
    )
    assert thanos_version
    for name, service in scale.items():
        repo, tag = image_parts(service["image"])
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {service['image']}"
        if repo == COLLECTOR_IMAGE:
            assert tag == release, name
        if repo == THANOS_IMAGE:
            assert tag == thanos_version.group(1), name


def test_scale_bind_mounts_exist(scale: dict[str, dict[str, Any]]) -> None:
    for name, service in scale.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_agent_collectors_route_to_the_gateways_and_write_to_the_router(
    scale: dict[str, dict[str, Any]],
) -> None:
    variables = set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", AGENT_TIER.read_text()))
    gateways = {name for name, s in scale.items() if "gateway.yaml" in str(s.get("volumes"))}
    agents = {name for name, s in scale.items() if "agent.yaml" in str(s.get("volumes"))}
    assert len(gateways) >= 2 and len(agents) >= 2
    for name in agents:
        service = scale[name]
        assert repo_path_in(service, PurePosixPath("/etc/otelcol-contrib/config.yaml")) == (
            AGENT_TIER
        )
        env = {key: str(value) for key, value in service["environment"].items()}
        assert set(env) <= variables, f"{name}: {set(env) - variables}"
        endpoints = yaml.safe_load(env["GATEWAY_ENDPOINTS"])
        assert {host_port(e)[0] for e in endpoints} == gateways, name
        for endpoint in endpoints:
            gateway_env = scale[host_port(endpoint)[0]]["environment"]
            assert host_port(gateway_env["OTLP_GRPC_ENDPOINT"])[1] == host_port(endpoint)[1]
        url = urlsplit(env["REMOTE_WRITE_URL"])
        router = scale[url.hostname]["command"]
        assert url.path == "/api/v1/receive"
        assert host_port(flag(router, "remote-write.address"))[1] == url.port


def test_gateway_policies_keep_what_the_plan_needs() -> None:
    tail = load(GATEWAY_TIER)["processors"]["tail_sampling"]
    policies = {policy["name"]: policy for policy in tail["policies"]}
    assert policies["sage-error"]["status_code"]["status_codes"] == ["ERROR"]
    replay = " ".join(policies["sage-replay"]["ottl_condition"]["span"])
    assert {"replay_detected", "handshake_replay", "peer_replay"} <= set(
        re.findall(r'== "([a-z_]+)"', replay)
    )
    signature = " ".join(policies["sage-signature-failure"]["ottl_condition"]["span"])
    assert {"bad_signature", "digest_mismatch", "peer_signature"} <= set(
        re.findall(r'== "([a-z_]+)"', signature)
    )
    assert "sage.handshake" in policies["slow-handshake"]["ottl_condition"]["span"][0]
    assert policies["baseline"]["type"] == "probabilistic"
    # A stopping gateway decides what it holds rather than dropping it.
    assert tail["drop_pending_traces_on_shutdown"] is False
    # Tail sampling runs on whole traces: nothing before it may drop or split spans.
    pipeline = load(GATEWAY_TIER)["service"]["pipelines"]["traces"]["processors"]
    assert pipeline.index("tail_sampling") < pipeline.index("batch")


def test_the_agent_queue_is_bounded_and_retries() -> None:
    otlp = load(AGENT_TIER)["exporters"]["load_balancing"]["protocol"]["otlp"]
    queue = otlp["sending_queue"]
    assert queue["enabled"] is True and queue["sizer"] == "items"
    assert re.fullmatch(r"\$\{env:GATEWAY_QUEUE_SPANS:-\d+\}", str(queue["queue_size"]))
    assert otlp["retry_on_failure"]["enabled"] is True


def test_thanos_hashring_query_and_replication_agree(scale: dict[str, dict[str, Any]]) -> None:
    rings = json.loads(HASHRING.read_text())
    assert len(rings) == 1
    endpoints = rings[0]["endpoints"]
    assert {host_port(e)[0] for e in endpoints} == INGESTERS
    replicas = set()
    for name in INGESTERS:
        command = scale[name]["command"]
        grpc_port = host_port(flag(command, "grpc-address"))[1]
        assert f"{name}:{grpc_port}" in endpoints
        replicas.add(flag(command, "label"))
        assert "--receive.hashrings-file" not in " ".join(command)  # ingesters only
    assert len(replicas) == len(INGESTERS), "each ingester needs its own replica label"
    router = scale["thanos-router"]["command"]
    assert int(flag(router, "receive.replication-factor")) == len(INGESTERS)
    mounted = repo_path_in(
        scale["thanos-router"], PurePosixPath(flag(router, "receive.hashrings-file"))
    )
    assert mounted == HASHRING
    query = scale["thanos-query"]["command"]
    assert sorted(a.split("=", 1)[1] for a in query if a.startswith("--endpoint=")) == sorted(
        endpoints
    )
    assert flag(query, "query.replica-label") == "receive_replica"
    assert all(label.startswith("receive_replica=") for label in replicas)
    assert "--query.partial-response" in query
    assert flag(query, "deduplication.func") == "chain"


def test_grafana_and_the_rules_read_thanos_unchanged(scale: dict[str, dict[str, Any]]) -> None:
    """The provisioned `prometheus` data source (http://prometheus:9090) is Thanos query."""
    query = scale["thanos-query"]
    assert "prometheus" in query["networks"]["default"]["aliases"]
    assert host_port(flag(query["command"], "http-address"))[1] == 9090
    datasource = urlsplit(load(DATASOURCES)["datasources"][0]["url"])
    assert (datasource.hostname, datasource.port) == ("prometheus", 9090)
    grafana = scale["grafana"]
    assert repo_path_in(grafana, GRAFANA_PROVISIONING / "datasources" / DATASOURCES.name) == (
        DATASOURCES
    )
    rule = scale["thanos-rule"]["command"]
    rule_dir = PurePosixPath(flag(rule, "rule-file")).parent
    assert repo_path_in(scale["thanos-rule"], rule_dir) == COLLECTOR / "prometheus" / "alerts"
    assert flag(rule, "query").split(":")[0] == "thanos-query"
    assert urlsplit(flag(rule, "alertmanagers.url")).hostname == "alertmanager"


def test_scale_tempo_writes_generated_metrics_to_the_router(
    scale: dict[str, dict[str, Any]],
) -> None:
    tempo = load(SCALE_TEMPO)
    service = scale["tempo"]
    config_flag = next(arg for arg in service["command"] if arg.startswith("-config.file="))
    assert repo_path_in(service, PurePosixPath(config_flag.split("=", 1)[1])) == SCALE_TEMPO
    for write in tempo["metrics_generator"]["storage"]["remote_write"]:
        url = urlsplit(write["url"])
        assert (url.hostname, url.path) == ("thanos-router", "/api/v1/receive")
    # Everything else is the base stack's Tempo configuration.
    base = load(TEMPO_CONFIG)
    for config in (base, tempo):
        config["metrics_generator"]["storage"].pop("remote_write")
        config["metrics_generator"]["registry"]["external_labels"].pop("cluster")
    assert tempo == base


# --- the Jaeger pin -------------------------------------------------------------------------


def test_jaeger_is_pinned_to_its_approved_release() -> None:
    """The module proxy also serves newer Jaeger versions that are not approved releases."""
    default = re.search(r"JAEGER_VERSION:-(v[0-9.]+)\}", BUILD_JAEGER.read_text())
    assert default and default.group(1) == JAEGER_RELEASE


def test_nothing_in_the_repository_names_another_jaeger_release() -> None:
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"])
    assert listed.returncode == 0, listed.stderr
    version = re.compile(r"jaeger[^\n]*?\bv?(1\.\d+\.\d+)\b", re.IGNORECASE)
    named: dict[str, set[str]] = {}
    for name in listed.stdout.splitlines():
        path = REPO / name
        if path.suffix in {".png", ".svg", ".json"} or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for found in version.finditer(text):
            named.setdefault(found.group(1), set()).add(name)
    assert set(named) <= {JAEGER_RELEASE.removeprefix("v")}, named


def test_built_jaeger_is_the_pinned_release() -> None:
    """The binary the end-to-end tests run was built from that release (Go build info)."""
    jaeger = tool("jaeger")
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).is_file():
        missing("Go is not installed (needed to read the binary's build info)")
    result = run([go, "version", "-m", jaeger])
    assert result.returncode == 0, result.stderr
    modules = re.findall(
        r"^\s*(?:mod|dep)\s+github\.com/jaegertracing/jaeger\s+(\S+)", result.stdout, re.M
    )
    assert modules == [JAEGER_RELEASE], result.stdout[:2000]


# --- the telemetry pipeline as a trust boundary (docs/security.md) --------------------------

COMPOSE_FILES = (COMPOSE, REMOTE_WRITE_COMPOSE, COLLECTOR / "docker-compose.scale.yaml")
# Collector configs whose OTLP receiver takes metrics from agents.
AGENT_FACING = (COLLECTOR_CONFIG, COLLECTOR / "tiers" / "agent.yaml")
CATALOG_FILTER = "filter/catalog"
# The OpenTelemetry SDK's own pipeline metrics an agent exports beside the catalog's
# (OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED, set by sage_otel.configure()).
SDK_METRIC_PREFIX = "otel.sdk."
NAME_LIST = re.compile(r"ContainsValue\(\[([^\]]*)\],\s*metric\.name\)")


def _published(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host IP, the entry as written) of each published port, short or long syntax."""
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            yield str(entry.get("host_ip", "")), str(entry)
        else:
            parts = str(entry).split("/", 1)[0].rsplit(":", 2)
            yield (parts[0] if len(parts) == 3 else ""), str(entry)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_published_port_is_bound_to_loopback(path: Path) -> None:
    """Each published port accepts writes or control from whoever reaches it: loopback only."""
    services = load(path)["services"]
    exposed = [
        f"{name}: {entry}"
        for name, service in services.items()
        for host_ip, entry in _published(service)
        if host_ip != "127.0.0.1"
    ]
    assert not exposed, f'publish as "127.0.0.1:HOST:CONTAINER" (docs/security.md): {exposed}'


def test_merged_stack_publishes_only_on_loopback(docker_compose: str) -> None:
    """The base file with the remote-write override, as Compose resolves it."""
    result = run([docker_compose, "-f", str(COMPOSE), "-f", str(REMOTE_WRITE_COMPOSE), "config"])
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    published = [(n, ip) for n, s in services.items() for ip, _ in _published(s)]
    assert published, "the merged stack publishes nothing: the check would prove nothing"
    assert {ip for _, ip in published} == {"127.0.0.1"}, published


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_service_serves_a_lifecycle_or_admin_api(path: Path) -> None:
    """--web.enable-lifecycle lets anyone who reaches Prometheus stop it (POST /-/quit);
    the admin API deletes series. Reloads use SIGHUP (docs/stack.md)."""
    for name, service in load(path)["services"].items():
        command = service.get("command") or []
        for flag_ in ("--web.enable-lifecycle", "--web.enable-admin-api"):
            assert flag_ not in command, f"{name}: {flag_}"


@pytest.mark.parametrize("path", (COMPOSE, COLLECTOR / "docker-compose.scale.yaml"))
def test_grafana_anonymous_access_is_at_most_viewer(path: Path) -> None:
    """An anonymous Editor could create Alertmanager silences and change dashboards."""
    env = load(path)["services"]["grafana"]["environment"]
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer"
    assert env.get("GF_AUTH_DISABLE_LOGIN_FORM") not in ("true", True)


def _catalog_filter(path: Path) -> dict[str, Any]:
    config = load(path)
    assert CATALOG_FILTER in config["processors"], f"{path.name}: no {CATALOG_FILTER}"
    return config["processors"][CATALOG_FILTER]


# Drop conditions on every data point, whatever its metric. Prometheus' OTLP receiver refuses
# a whole request (400) for one delta sum or histogram, or one sample older than its
# out_of_order_time_window (30m, prometheus.yml) or in the future, and the exporter then
# drops every agent's points batched with it: such points are dropped here instead.
POINT_CONDITIONS = (
    "metric.aggregation_temporality != nil"
    " and metric.aggregation_temporality != AGGREGATION_TEMPORALITY_CUMULATIVE",
    'datapoint.time < Now() - Duration("25m") or datapoint.time > Now() + Duration("5m")',
)
# The OTLP shape configure() exports for each Kind (sage_otel.telemetry.meters): counters
# are monotonic sums, up-down counters non-monotonic sums, histograms explicit-bucket ones.
SHAPES = {
    Kind.COUNTER: "metric.type != METRIC_DATA_TYPE_SUM or metric.is_monotonic != true",
    Kind.UP_DOWN_COUNTER: "metric.type != METRIC_DATA_TYPE_SUM or metric.is_monotonic != false",
    Kind.HISTOGRAM: "metric.type != METRIC_DATA_TYPE_HISTOGRAM",
}


def _datapoint_condition(instrument: Any) -> str:
    """What a data point of ``instrument`` must satisfy, as the filter's drop condition:
    its metric's type and unit (another makes another Prometheus name), then its labels."""
    parts = [
        SHAPES[instrument.kind],
        f'metric.unit != "{instrument.unit}"',
        f"Len(datapoint.attributes) != {len(instrument.labels)}",
    ]
    for label in instrument.labels:
        values = ", ".join(f'"{value}"' for value in (*label.values, OTHER))
        parts.append(f'not ContainsValue([{values}], datapoint.attributes["{label.key}"])')
    return f'metric.name == "{instrument.name}" and ({" or ".join(parts)})'


def _fix(path: Path, sdk: list[str]) -> str:
    """The ``metric_conditions`` the catalog asks for, to paste into ``path``."""
    names = ", ".join(f'"{instrument.name}"' for instrument in INSTRUMENTS)
    listed = ", ".join(f'"{name}"' for name in sdk)
    first = (
        f"not ContainsValue([{names}], metric.name) and not ContainsValue([{listed}], metric.name)"
    )
    conditions = [
        first,
        *POINT_CONDITIONS,
        *(_datapoint_condition(instrument) for instrument in INSTRUMENTS),
    ]
    block = yaml.safe_dump({"metric_conditions": conditions}, width=100, sort_keys=False)
    return f"\nset {CATALOG_FILTER}'s metric_conditions in {path.relative_to(REPO)} to:\n{block}"


def _sdk_names(path: Path) -> list[str]:
    found = NAME_LIST.findall(_normal(_catalog_filter(path)["metric_conditions"][0]))
    return [name.strip(' "') for name in found[1].split(",")] if len(found) == 2 else []


def _normal(condition: str) -> str:
    return re.sub(r"\s+", " ", condition.replace("[ ", "[").replace(" ]", "]")).strip()


@pytest.mark.parametrize("path", AGENT_FACING, ids=lambda p: p.stem)
def test_collector_passes_only_catalog_metrics(path: Path) -> None:
    """The filter's allow-list is the catalog's OTel names plus the SDK's own metrics.

    Adding, renaming or removing an instrument without updating the filter fails here: an
    agent's new metric would be dropped, or a removed name still accepted from anyone.
    """
    settings = _catalog_filter(path)
    assert settings["error_mode"] == "propagate", "a failing condition must not let data by"
    conditions = [_normal(c) for c in settings["metric_conditions"]]
    lists = NAME_LIST.findall(conditions[0])
    assert conditions[0].startswith("not ContainsValue(") and len(lists) == 2, conditions[0]
    catalog, sdk = ([name.strip(' "') for name in found.split(",")] for found in lists)
    expected = [instrument.name for instrument in INSTRUMENTS]
    assert catalog == expected, (
        f"{path.name}: make {CATALOG_FILTER}'s first list the catalog's names, in order: "
        f"missing {sorted(set(expected) - set(catalog))}, "
        f"not in the catalog {sorted(set(catalog) - set(expected))}" + _fix(path, sdk)
    )
    assert sdk and all(name.startswith(SDK_METRIC_PREFIX) for name in sdk), sdk


@pytest.mark.parametrize("path", AGENT_FACING, ids=lambda p: p.stem)
def test_collector_drops_points_prometheus_would_refuse(path: Path) -> None:
    """Right after the allow-list: delta sums and histograms, and points outside the time
    window Prometheus stores, each of which would make it refuse everyone's batch."""
    conditions = [_normal(c) for c in _catalog_filter(path)["metric_conditions"]]
    expected = [_normal(condition) for condition in POINT_CONDITIONS]
    assert conditions[1 : 1 + len(expected)] == expected, (
        f"{path.name}: not the point conditions" + _fix(path, _sdk_names(path))
    )


@pytest.mark.parametrize("path", AGENT_FACING, ids=lambda p: p.stem)
def test_collector_closes_every_catalog_metrics_shape_and_label_set(path: Path) -> None:
    """A data point whose metric has not its instrument's type, monotonicity and unit, or
    whose attributes are not exactly its labels, each with a value from its closed set (or
    ``other``), is dropped: no forged name, label or series."""
    conditions = [_normal(c) for c in _catalog_filter(path)["metric_conditions"]]
    conditions = conditions[1 + len(POINT_CONDITIONS) :]
    expected = [_normal(_datapoint_condition(instrument)) for instrument in INSTRUMENTS]
    wrong = [e for e in expected if e not in conditions]
    stale = set(conditions) - set(expected)
    assert not wrong and not stale, (
        f"{path.name}: missing {wrong}, not the catalog's {sorted(stale)}"
        + _fix(path, _sdk_names(path))
    )


@pytest.mark.parametrize("path", AGENT_FACING, ids=lambda p: p.stem)
def test_every_agent_facing_metrics_pipeline_filters_first(path: Path) -> None:
    """Right after the memory limiter, before anything can stamp, batch or export."""
    pipelines = load(path)["service"]["pipelines"]
    metrics = [p for name, p in pipelines.items() if name.split("/")[0] == "metrics"]
    assert metrics
    for pipeline in metrics:
        assert pipeline["processors"][:2] == ["memory_limiter", CATALOG_FILTER], pipeline


def test_agent_tier_filters_as_the_base_collector_does() -> None:
    assert _catalog_filter(AGENT_FACING[1]) == _catalog_filter(AGENT_FACING[0])
