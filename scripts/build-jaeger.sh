#!/usr/bin/env bash
# Build Jaeger v2 (github.com/jaegertracing/jaeger/cmd/jaeger, an OTLP trace backend built
# on the OpenTelemetry Collector) from the Go module proxy into a cache outside the repo:
#   ${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}/jaeger-<version>/jaeger
# It stands in for Tempo (AGPL, not installable here) in the end-to-end tests.
# A cached binary is reused. Prints the binary's path; quiet otherwise unless it fails.
# With --check it builds nothing: prints the path if the binary is there, else exits 3.
set -euo pipefail
# shellcheck source=scripts/go-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-cache.sh"

parse_check_flag "$@"

version="${JAEGER_VERSION:-v1.76.0}"
dir="$cache/jaeger-$version"
bin="$dir/jaeger"

die() { echo "build-jaeger: $*" >&2; exit 1; }

cached_or_continue jaeger "$bin"

use_go

lock_cache jaeger "$bin"

work="$(mktemp -d "$cache/.jaeger-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$cache/jaeger-$version.log"
fail() {
    tail -n 60 "$log" >&2
    die "$* (full log: $log)"
}
# `go install module@version` refuses modules whose go.mod has replace directives (Jaeger's
# does), so build it from a throwaway module that requires Jaeger and repeats those replaces:
# the build then resolves exactly the versions Jaeger's own go.mod selects.
module="github.com/jaegertracing/jaeger"
gomod="$(cd "$work" && go mod download -json "$module@$version" 2>"$log" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')" ||
    fail "go mod download $module@$version failed"
[ -f "$gomod" ] || fail "go mod download $module@$version gave no go.mod"
{
    echo "module sage-otel/jaeger-build"
    echo
    sed -n 's/^go \([0-9.]*\)$/go \1/p' "$gomod"
    # single-line `replace a => b` and `replace ( ... )` blocks, copied as they are
    awk '/^replace \(/ { block = 1 } block || /^replace / { print } block && /^\)/ { block = 0 }' "$gomod"
} >"$work/go.mod"
if ! (cd "$work" && go get "$module/cmd/jaeger@$version" &&
    go build -trimpath -ldflags="-s -w" -o "$work/jaeger" "$module/cmd/jaeger") >>"$log" 2>&1; then
    fail "building $module/cmd/jaeger@$version failed"
fi
[ -x "$work/jaeger" ] || die "the build produced no jaeger binary (log: $log)"
mkdir -p "$dir"
mv "$work/jaeger" "$dir/.jaeger.tmp"
mv "$dir/.jaeger.tmp" "$bin"
rm -f "$log"
echo "$bin"
