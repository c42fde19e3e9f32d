#!/usr/bin/env bash
# Make sure `prometheus` and `promtool` are installed (Debian's prometheus package, installed
# through apt when we are root). The tests start their own Prometheus instances on free
# loopback ports, so any service the package starts is stopped and disabled.
# Prints the two paths, one a line; quiet otherwise unless it fails.
# With --check it installs nothing: prints the paths if both are there, else exits 3.
set -euo pipefail

check=
case "${1:-}" in
    --check) check=1 ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

die() { echo "ensure-prometheus: $*" >&2; exit 1; }

found() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if ! found && [ -n "$check" ]; then
    echo "ensure-prometheus: prometheus/promtool are not installed (run: make prometheus)" >&2
    exit 3
fi

if ! found; then
    [ "$(id -u)" -eq 0 ] || die "prometheus/promtool are not installed and we are not root: install Debian's 'prometheus' package (apt-get install prometheus)"
    command -v apt-get >/dev/null 2>&1 || die "prometheus/promtool are not installed and apt-get is not available"
    log="$(mktemp)"
    trap 'rm -f "$log"' EXIT
    # policy-rc.d exit 101 keeps invoke-rc.d from starting the service during the install
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    status=0
    {
        apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
    } >"$log" 2>&1 || status=$?
    [ -z "$made_policy" ] || rm -f "$policy"
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log" >&2
        die "apt-get install prometheus failed"
    fi
    # Stop whatever the package started anyway (systemd or sysvinit), and keep it off.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    if [ -x /etc/init.d/prometheus ]; then
        /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        command -v update-rc.d >/dev/null 2>&1 && update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
    found || die "prometheus/promtool still missing after apt-get install prometheus"
fi

command -v prometheus
command -v promtool
