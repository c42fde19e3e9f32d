#!/usr/bin/env bash
# Build Thanos (github.com/thanos-io/thanos/cmd/thanos, Apache-2.0: `thanos receive` as the
# replicated metrics store behind remote write, `thanos query` as its PromQL API) from the Go
# module proxy into a cache outside the repo:
#   ${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}/thanos-<version>-netgo-slicelabels/thanos
# Thanos v0.42.5 declares `go 1.26.10`; when the local Go is older the build runs under the
# go1.27.3 toolchain (GOTOOLCHAIN=go1.27.3, fetched once by the go command). It is built with
# the tags of Thanos's own release builds (.promu.yml: netgo, slicelabels): Thanos converts
# its protobuf labels to Prometheus labels in place, which is only sound with Prometheus's
# slice label layout; without the tag, receive and query corrupt labels and panic.
# A cached binary is reused. Prints the binary's path; a cold build says on stderr what it is
# doing and how far along it is (scripts/go-cache.sh).
# With --check it builds nothing: prints the path if the binary is there, else exits 3.
set -euo pipefail
# shellcheck source=scripts/go-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-cache.sh"

parse_check_flag "$@"

version="${THANOS_VERSION:-v0.42.5}"
toolchain=go1.27.3
tags=netgo,slicelabels
dir="$cache/thanos-$version-${tags//,/-}"
bin="$dir/thanos"

die() { echo "build-thanos: $*" >&2; exit 1; }

cached_or_continue thanos "$bin"

use_go

lock_cache thanos "$bin"

work="$(mktemp -d "$cache/.thanos-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$cache/thanos-$version.log"
fail() {
    tail -n 60 "$log" >&2
    die "$* (full log: $log)"
}
# Thanos's go.mod has replace directives, which `go install module@version` refuses: build it
# from a throwaway module that requires Thanos and repeats them (as build-jaeger.sh does).
module="github.com/thanos-io/thanos"
step 1 3 "resolving $module@$version and its modules (go mod download, go get)"
# With the local Go older than the module's `go` line the download reports that as its error
# (and a non-zero status) but still fetches the go.mod, which is all that is read here.
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
    echo "module sage-otel/thanos-build"
    echo
    echo "go $needed"
    awk '/^replace \(/ { block = 1 } block || /^replace / { print } block && /^\)/ { block = 0 }' "$gomod"
} >"$work/go.mod"
resolve() { cd "$work" && go get "$module/cmd/thanos@$version"; }
logged "$log" resolve || fail "go get $module/cmd/thanos@$version failed (GOTOOLCHAIN=$GOTOOLCHAIN)"
# go build -v names each package it compiles: against the package count, how far along it is.
total="$(cd "$work" && go list -deps -tags "$tags" "$module/cmd/thanos" 2>>"$log" | wc -l)" || total=""
step 2 3 "compiling thanos (${total:-?} packages; cold: several minutes)"
compile() {
    cd "$work" && go build -v -trimpath -tags "$tags" \
        -ldflags="-s -w -X github.com/prometheus/common/version.Version=${version#v}" \
        -o "$work/thanos" "$module/cmd/thanos"
}
logged "$log" "$total" compile || fail "building $module/cmd/thanos@$version failed (GOTOOLCHAIN=$GOTOOLCHAIN)"
[ -x "$work/thanos" ] || die "the build produced no thanos binary (log: $log)"
mkdir -p "$dir"
mv "$work/thanos" "$dir/.thanos.tmp"
mv "$dir/.thanos.tmp" "$bin"
rm -f "$log"
step 3 3 "built $bin"
echo "$bin"
