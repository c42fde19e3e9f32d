#!/usr/bin/env bash
# Build Prometheus 3 (github.com/prometheus/prometheus, Apache-2.0: cmd/prometheus and
# cmd/promtool) from the Go module proxy into a cache outside the repo:
#   ${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}/prometheus-<version>-<tags>/{prometheus,promtool}
# Module version v0.316.0 is Prometheus 3.16.0 (v0.3XX.Y is v3.XX.Y; its VERSION file says so).
# The end-to-end tests run it by default: its OTLP receiver (/api/v1/otlp/v1/metrics) is the
# collector's metrics path. Built with `netgo,remove_all_sd`: static scrape configs and file
# service discovery only (no Kubernetes, cloud... SDs, a third of the compile), and without
# `builtinassets`: the API only, no web UI.
# Prometheus v0.316.0 declares `go 1.26.7`; when the local Go is older the build runs under the
# go1.27.3 toolchain (GOTOOLCHAIN=go1.27.3, fetched once by the go command).
# A cached build is reused. Prints the prometheus path, then the promtool path, one a line; a
# cold build says on stderr what it is doing and how far along it is (scripts/go-cache.sh).
# With --check it builds nothing: prints the paths if both are there, else exits 3.
set -euo pipefail
# shellcheck source=scripts/go-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-cache.sh"

parse_check_flag "$@"

version="${PROMETHEUS_VERSION:-v0.316.0}"
toolchain=go1.27.3
tags=netgo,remove_all_sd
dir="$cache/prometheus-$version-${tags//,/-}"
bin="$dir/prometheus"
tool="$dir/promtool"

die() { echo "build-prometheus: $*" >&2; exit 1; }

# promtool is moved into place before prometheus, so a prometheus binary marks a whole build.
built() {
    if [ -x "$bin" ] && [ -x "$tool" ]; then
        echo "$bin"
        echo "$tool"
        exit 0
    fi
}
built
if [ -n "$check" ]; then
    echo "build-prometheus: $bin is not built (run: make prometheus3)" >&2
    exit 3
fi

use_go

mkdir -p "$cache"
exec 9>"$cache/.prometheus3.lock"
flock 9
built # by a concurrent run while we waited

work="$(mktemp -d "$cache/.prometheus-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$cache/prometheus-$version.log"
fail() {
    tail -n 60 "$log" >&2
    die "$* (full log: $log)"
}
# A throwaway module that requires Prometheus (as build-thanos.sh does): `go list -deps` can
# then count the packages for the progress lines, and any replace directives of Prometheus's
# go.mod (v0.316.0 has none) are repeated so the build selects exactly its versions.
module="github.com/prometheus/prometheus"
step 1 3 "resolving $module@$version and its modules (go mod download, go get)"
gomod="$(cd "$work" && { GOTOOLCHAIN=local go mod download -json "$module@$version" 2>"$log" || true; } |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[ -f "$gomod" ] || fail "go mod download $module@$version gave no go.mod"
needed="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
have="$(GOTOOLCHAIN=local go env GOVERSION | sed 's/^go//')"
if [ "$(printf '%s\n%s\n' "$needed" "$have" | sort -V | head -n 1)" != "$needed" ]; then
    export GOTOOLCHAIN="$toolchain"
else
    export GOTOOLCHAIN=local
fi
{
    echo "module sage-otel/prometheus-build"
    echo
    echo "go $needed"
    awk '/^replace \(/ { block = 1 } block || /^replace / { print } block && /^\)/ { block = 0 }' "$gomod"
} >"$work/go.mod"
resolve() { cd "$work" && go get "$module/cmd/prometheus@$version" "$module/cmd/promtool@$version"; }
logged "$log" resolve || fail "go get $module/cmd/{prometheus,promtool}@$version failed (GOTOOLCHAIN=$GOTOOLCHAIN)"
# go build -v names each package it compiles: against the package count, how far along it is.
total="$(cd "$work" && go list -deps -tags "$tags" "$module/cmd/prometheus" "$module/cmd/promtool" 2>>"$log" |
    sort -u | wc -l)" || total=""
step 2 3 "compiling prometheus and promtool (${total:-?} packages; cold: several minutes)"
compile() {
    local name
    for name in prometheus promtool; do
        (cd "$work" && go build -v -trimpath -tags "$tags" \
            -ldflags="-s -w -X github.com/prometheus/common/version.Version=3.${version#v0.3}" \
            -o "$work/$name" "$module/cmd/$name") || return 1
    done
}
logged "$log" "$total" compile || fail "building $module/cmd/{prometheus,promtool}@$version failed (GOTOOLCHAIN=$GOTOOLCHAIN)"
[ -x "$work/prometheus" ] && [ -x "$work/promtool" ] || die "the build produced no prometheus/promtool binary (log: $log)"
mkdir -p "$dir"
mv "$work/promtool" "$dir/.promtool.tmp"
mv "$dir/.promtool.tmp" "$tool"
mv "$work/prometheus" "$dir/.prometheus.tmp"
mv "$dir/.prometheus.tmp" "$bin"
rm -f "$log"
step 3 3 "built $bin and $tool"
echo "$bin"
echo "$tool"
