#!/usr/bin/env bash
# Make sure Graphviz's `dot` is installed (Debian's graphviz package, installed through apt
# when we are root). `make pictures` draws docs/images/architecture.png from
# docs/images/architecture.dot with it.
# Prints the path of `dot`; quiet otherwise unless it fails.
# With --check it installs nothing: prints the path if `dot` is there, else exits 3.
set -euo pipefail

check=
case "${1:-}" in
    --check) check=1 ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

die() { echo "ensure-graphviz: $*" >&2; exit 1; }

found() { command -v dot >/dev/null 2>&1; }

if ! found && [ -n "$check" ]; then
    echo "ensure-graphviz: dot is not installed (run: make graphviz)" >&2
    exit 3
fi

if ! found; then
    [ "$(id -u)" -eq 0 ] || die "dot is not installed and we are not root: install Debian's 'graphviz' package (apt-get install graphviz)"
    command -v apt-get >/dev/null 2>&1 || die "dot is not installed and apt-get is not available"
    log="$(mktemp)"
    trap 'rm -f "$log"' EXIT
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be fresh already (another ensure-* script ran); update if not.
    if ! { apt-get install -y -q --no-install-recommends graphviz ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends graphviz; }; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get install graphviz failed"
    fi
    found || die "dot still missing after apt-get install graphviz"
fi

command -v dot
