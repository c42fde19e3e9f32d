#!/usr/bin/env bash
# Build the sage-otelcol collector distribution from collector/builder-config.yaml with the
# OpenTelemetry Collector Builder (ocb) of the same release, into a cache outside the repo:
#   ${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}/otelcol-<release>-<sha of the manifest>/sage-otelcol
# A cached binary is reused. Prints the binary's path; a cold build says on stderr what it is
# doing and how far along it is (scripts/go-cache.sh).
# With --check it builds nothing: prints the path if the binary is there, else exits 3.
set -euo pipefail
# shellcheck source=scripts/go-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-cache.sh"

parse_check_flag "$@"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
manifest="$root/collector/builder-config.yaml"

die() { echo "build-collector: $*" >&2; exit 1; }

[ -f "$manifest" ] || die "missing $manifest"
# The release is the one the manifest pins for the OTLP receiver; ocb must match it.
release="$(sed -n 's|^.*go\.opentelemetry\.io/collector/receiver/otlpreceiver \(v[0-9][^ ]*\).*$|\1|p' "$manifest" | head -n 1)"
[ -n "$release" ] || die "cannot read the collector release from $manifest"
sha="$(sha256sum "$manifest" | cut -c1-12)"
dir="$cache/otelcol-$release-$sha"
bin="$dir/sage-otelcol"

cached_or_continue collector "$bin"

use_go

lock_cache collector "$bin"

ocb_dir="$cache/ocb-$release"
ocb="$ocb_dir/builder"
log="$cache/otelcol-$release-$sha.log"
: >"$log"
if [ ! -x "$ocb" ]; then
    step 1 3 "installing the Collector Builder $release (go install)"
    if ! logged "$log" env GOBIN="$ocb_dir" go install "go.opentelemetry.io/collector/cmd/builder@$release"; then
        cat "$log" >&2
        die "could not install ocb $release (go install go.opentelemetry.io/collector/cmd/builder@$release)"
    fi
else
    step 1 3 "the Collector Builder $release is cached"
fi

work="$(mktemp -d "$cache/.otelcol-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
step 2 3 "generating and compiling sage-otelcol with ocb (cold: several minutes)"
build() { cd "$work" && "$ocb" --config "$manifest"; }
if ! logged "$log" build; then
    tail -n 60 "$log" >&2
    die "ocb failed for $manifest (full log: $log)"
fi
[ -x "$work/build/sage-otelcol" ] || die "ocb produced no sage-otelcol binary (log: $log)"
mkdir -p "$dir"
mv "$work/build/sage-otelcol" "$dir/.sage-otelcol.tmp"
mv "$dir/.sage-otelcol.tmp" "$bin"
rm -f "$log"
step 3 3 "built $bin"
echo "$bin"
