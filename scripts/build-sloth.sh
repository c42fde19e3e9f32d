#!/usr/bin/env bash
# Build Sloth (github.com/slok/sloth/cmd/sloth, Apache-2.0: generates multi-window,
# multi-burn-rate SLO recording and alerting rules from an SLO spec) from the Go module proxy
# into a cache outside the repo:
#   ${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}/sloth-<version>/sloth
# `make slos` runs it on collector/prometheus/slos/ and tests/test_slos.py checks that the
# committed rules are what it generates.
# A cached binary is reused. Prints the binary's path; a cold build says on stderr what it is
# doing and how far along it is (scripts/go-cache.sh).
# With --check it builds nothing: prints the path if the binary is there, else exits 3.
set -euo pipefail
# shellcheck source=scripts/go-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-cache.sh"

parse_check_flag "$@"

version="${SLOTH_VERSION:-v0.16.0}"
dir="$cache/sloth-$version"
bin="$dir/sloth"

die() { echo "build-sloth: $*" >&2; exit 1; }

cached_or_continue sloth "$bin"

use_go

lock_cache sloth "$bin"

work="$(mktemp -d "$cache/.sloth-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$cache/sloth-$version.log"
fail() {
    tail -n 60 "$log" >&2
    die "$* (full log: $log)"
}
# Sloth's go.mod has no replace directives, so `go install module@version` builds it with
# exactly the versions its own go.mod selects (v0.16.0 declares go 1.26.0: the local Go).
module="github.com/slok/sloth"
step 1 2 "downloading and compiling $module/cmd/sloth@$version (go install; cold: about 7 minutes)"
compile() {
    GOBIN="$work" go install -v -trimpath \
        -ldflags="-s -w -X github.com/slok/sloth/internal/info.Version=$version" \
        "$module/cmd/sloth@$version"
}
logged "$log" compile || fail "go install $module/cmd/sloth@$version failed"
[ -x "$work/sloth" ] || die "the build produced no sloth binary (log: $log)"
mkdir -p "$dir"
mv "$work/sloth" "$dir/.sloth.tmp"
mv "$dir/.sloth.tmp" "$bin"
rm -f "$log"
step 2 2 "built $bin"
echo "$bin"
