"""The wheel, installed alone in a fresh venv, imports, configures and serves /metrics.

`python -m build --wheel`, then `pip install` of that wheel, without any extra, into a new
venv (pip's cache makes a warm run take seconds), and in that venv, isolated from this
checkout (`python -I`, another working directory): every sage_otel module imports, test and
build-time tools are absent, and ``sage_otel.configure(metrics_port=0)`` serves SAGE series
on /metrics. This catches a runtime import of a package that only the dev venv has, and a
module left out of (or a build-time one left in) the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sage_otel.telemetry.catalog import INSTRUMENTS

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib, importlib.metadata, importlib.util, json, pkgutil, sys, urllib.request

import sage_otel

modules = [m.name for m in pkgutil.walk_packages(sage_otel.__path__, "sage_otel.")]
for name in modules:
    importlib.import_module(name)
absent = ["pytest", "tools", "opentelemetry.distro", "grafana_foundation_sdk", "hypothesis"]
present = [name for name in absent if importlib.util.find_spec(name) is not None]
entry_points = sorted(
    f"{ep.group}:{ep.name}" for ep in importlib.metadata.distribution("sage-otel").entry_points
)
import sniffio  # noqa: F401  (a runtime dependency: httpcore wants it)

telemetry = sage_otel.configure(metrics_port=0, otlp=False)
try:
    host, port = telemetry.metrics_address
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}:{port}/metrics", timeout=10) as answer:
        status, body = answer.status, answer.read().decode()
finally:
    clean = telemetry.shutdown()
print(json.dumps({
    "file": sage_otel.__file__, "modules": modules, "present": present,
    "entry_points": entry_points, "status": status, "body": body, "clean": clean,
}))
"""


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)])
    (built,) = out.glob("sage_otel-*.whl")
    return built


def test_wheel_holds_the_package_and_no_build_time_tools(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "sage_otel/telemetry/catalog.py" in names
    assert "sage_otel/agent/transport.py" in names
    # PEP 561: type checkers read sage_otel's own annotations only with this marker.
    assert "sage_otel/py.typed" in names
    assert not [n for n in names if n.startswith(("tools/", "tests/", "fuzz/", "benchmarks/"))]
    for module in ("dashboards", "docs", "queries"):
        assert f"sage_otel/telemetry/{module}.py" not in names, f"{module} belongs in tools/"
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        Requirement(line.split(":", 1)[1])
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    unconditional = {canonicalize_name(req.name) for req in requires if req.marker is None}
    assert "Classifier: Typing :: Typed" in zipfile.ZipFile(wheel).read(metadata).decode()
    assert "sniffio" in unconditional
    for name in ("pytest", "opentelemetry-distro", "grafana-foundation-sdk", "build"):
        assert name not in unconditional, f"{name} is a runtime requirement of the wheel"


def test_installed_wheel_imports_configures_and_serves_metrics(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OTEL_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], env=env)

    result = run([str(python), "-I", "-c", CHECK], cwd=tmp_path, env=env)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(venv), report["file"]
    assert "sage_otel.telemetry.setup" in report["modules"]
    assert report["present"] == [], f"not runtime dependencies, yet installed: {report}"
    assert "opentelemetry_instrumentor:sage" in report["entry_points"]
    assert "console_scripts:sage-otel" in report["entry_points"]
    assert report["status"] == 200 and report["clean"] is True
    sage_lines = [line for line in report["body"].splitlines() if line.startswith("sage_")]
    assert sage_lines, report["body"][:2000]
    exposed = {line.split("{")[0].split(" ")[0] for line in sage_lines}
    for instrument in INSTRUMENTS:
        family = instrument.prometheus_name
        assert exposed & {family, f"{family}_bucket"}, f"{family} missing from /metrics"

    run([str(venv / "bin" / "sage-otel"), "--help"], cwd=tmp_path, env=env)
