#!/usr/bin/env bash
# Make sure the validators of the user-facing stack files are installed, from Debian's
# packages: docker-compose (validates collector/docker-compose.yaml against the Compose
# Specification offline with `config -q`; no Docker engine is needed or started) and amtool
# (from prometheus-alertmanager: `amtool check-config`; the service it ships is kept stopped).
# The same package's Alertmanager (0.25) is what the alert delivery test runs.
# Prints their paths, one a line: docker-compose, amtool, Alertmanager; quiet otherwise unless
# it fails. With --check it installs nothing: prints the paths if all are there, else exits 3.
set -euo pipefail

die() { echo "ensure-validators: $*" >&2; exit 1; }
found() {
    command -v docker-compose >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 &&
        command -v prometheus-alertmanager >/dev/null 2>&1
}

if ! found; then
    if [ "${1:-}" = "--check" ]; then
        echo "ensure-validators: docker-compose/amtool/prometheus-alertmanager are not installed (run: make validators)" >&2
        exit 3
    fi
    [ "$(id -u)" -eq 0 ] || die "docker-compose/amtool are missing and we are not root: apt-get install docker-compose prometheus-alertmanager"
    command -v apt-get >/dev/null 2>&1 || die "docker-compose/amtool are missing and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    # policy-rc.d exit 101 keeps invoke-rc.d from starting alertmanager during the install
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    trap 'rm -f "$log"; [ -z "$made_policy" ] || rm -f "$policy"' EXIT
    packages=(docker-compose prometheus-alertmanager)
    if ! { apt-get install -y -q --no-install-recommends "${packages[@]}" ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${packages[@]}"; }; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get install ${packages[*]} failed"
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || true
    fi
    pkill -x prometheus-alertmanager >/dev/null 2>&1 || true
    found || die "docker-compose/amtool/prometheus-alertmanager still missing after the install"
fi
command -v docker-compose
command -v amtool
command -v prometheus-alertmanager
