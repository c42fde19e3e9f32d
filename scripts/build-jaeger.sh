#!/usr/bin/env bash
# Build Jaeger v2 (github.com/jaegertracing/jaeger/cmd/jaeger, an OTLP trace backend built
# on the OpenTelemetry Collector) from the Go module proxy into a cache outside the repo:
#   ${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}/jaeger-<version>/jaeger
# It stands in for Tempo (AGPL, not installable here) in the end-to-end tests.
# A cached binary is reused. Prints the binary's path; a cold build says on stderr what it is
# doing and how far along it is (scripts/go-cache.sh).
# With --check it builds nothing: prints the path if the binary is there, else exits 3.
set -euo pipefail
# shellcheck source=scripts/go-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-cache.sh"

parse_check_flag "$@"

version="${JAEGER_VERSION:-v1.75.0}"
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
step 1 3 "resolving $module@$version and its modules (go mod download, go get)"
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
resolve() { cd "$work" && go get "$module/cmd/jaeger@$version"; }
logged "$log" resolve || fail "go get $module/cmd/jaeger@$version failed"
# go build -v names each package it compiles: against the package count, how far along it is.
total="$(cd "$work" && go list -deps "$module/cmd/jaeger" 2>>"$log" | wc -l)" || total=""
step 2 3 "compiling jaeger (${total:-?} packages; cold: several minutes)"
compile() { cd "$work" && go build -v -trimpath -ldflags="-s -w" -o "$work/jaeger" "$module/cmd/jaeger"; }
logged "$log" "$total" compile || fail "building $module/cmd/jaeger@$version failed"
[ -x "$work/jaeger" ] || die "the build produced no jaeger binary (log: $log)"
mkdir -p "$dir"
mv "$work/jaeger" "$dir/.jaeger.tmp"
mv "$dir/.jaeger.tmp" "$bin"
rm -f "$log"
step 3 3 "built $bin"
echo "$bin"
