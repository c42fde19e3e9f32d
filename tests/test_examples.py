"""The examples run as documented: a manually configured pair and an auto-instrumented one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, **extra}


def test_manual_pair_serves_sage_metrics() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "manual_pair.py"), "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr
    assert "/metrics" in done.stdout
    scraped = [
        line.strip() for line in done.stdout.splitlines() if line.strip().startswith("sage_")
    ]
    assert any(line.startswith("sage_handshakes_completed_total") for line in scraped), done.stdout
    assert any(line.startswith("sage_messages_processed_total") for line in scraped), done.stdout


def test_auto_instrumented_pair_emits_sage_spans() -> None:
    launcher = BIN / "opentelemetry-instrument"
    assert launcher.exists(), f"{launcher} is missing: install the opentelemetry-distro package"
    done = subprocess.run(
        [str(launcher), sys.executable, str(EXAMPLES / "auto_instrumented.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(
            OTEL_SERVICE_NAME="sage-example-auto",
            OTEL_TRACES_EXPORTER="console",
            OTEL_METRICS_EXPORTER="console",
            OTEL_LOGS_EXPORTER="none",
        ),
    )
    assert done.returncode == 0, done.stderr
    assert '"name": "sage.handshake"' in done.stdout
    assert '"name": "sage.message.receive"' in done.stdout
    assert '"name": "sage.handshakes.completed"' in done.stdout
