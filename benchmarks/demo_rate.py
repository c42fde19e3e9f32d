"""``sage-otel demo --rate 0``, as ``make demo`` runs it, with telemetry on and off.

    python -m benchmarks.demo_rate [--rounds 3] [--seconds 8] [--clients 4]

Off is ``OTEL_SDK_DISABLED=true`` for both processes (the demo's clients and the server agent
it starts), so nothing of the telemetry runs anywhere; on is the default setup (/metrics on
both, no OTLP endpoint configured). Interleaved rounds; medians of messages/s.
Targets (docs/performance.md): >= 2,000 messages/s with telemetry on, on/off >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

TARGET_RATE = 2000.0
TARGET_RATIO = 0.90


def once(seconds: float, clients: int, telemetry: bool) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    if not telemetry:
        env["OTEL_SDK_DISABLED"] = "true"
    done = subprocess.run(
        [sys.executable, "-m", "sage_otel.cli", "demo", "--rate", "0", "--json",
         "--duration", str(seconds), "--clients", str(clients), "--metrics-port", "0"],
        capture_output=True, text=True, env=env, timeout=seconds + 60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["messages_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for round_index in range(args.rounds):
        order = ("on", "off") if round_index % 2 == 0 else ("off", "on")
        for name in order:
            rates[name].append(once(args.seconds, args.clients, telemetry=name == "on"))
        print(f"round {round_index + 1}: " + json.dumps({k: v[-1] for k, v in rates.items()}))
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print()
    print("| telemetry | messages/s |")
    print("| --- | ---: |")
    print(f"| on | {on:,.0f} |")
    print(f"| off (`OTEL_SDK_DISABLED=true`) | {off:,.0f} |")
    print()
    verdict = {True: "met", False: "NOT met"}
    print(
        f"on: {on:,.0f}/s (target >= {TARGET_RATE:,.0f}: {verdict[on >= TARGET_RATE]}); "
        f"on/off {on / off:.2f} (target >= {TARGET_RATIO}: {verdict[on / off >= TARGET_RATIO]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
