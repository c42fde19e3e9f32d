# Shared by the build-*.sh scripts (sourced, not run): a Go build cached outside the repo.
#   parse_check_flag "$@"         sets check=1 for --check (build nothing), rejects the rest
#   cached_or_continue NAME BIN   prints BIN and exits if it is built; with --check, exits 3
#                                 if it is not; otherwise returns so the caller builds it
#   use_go                        puts Go on PATH and keeps module/build caches at defaults
#   lock_cache NAME               serializes concurrent builds of NAME; exits if one finished
# The caller defines die(). The cache directory is $cache.

cache="${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}"

parse_check_flag() {
    check=
    case "${1:-}" in
        --check) check=1 ;;
        "") ;;
        *) echo "usage: $0 [--check]" >&2; exit 2 ;;
    esac
}

cached_or_continue() {
    if [ -x "$2" ]; then
        echo "$2"
        exit 0
    fi
    if [ -n "$check" ]; then
        echo "$(basename "$0"): $2 is not built (run: make $1)" >&2
        exit 3
    fi
}

use_go() {
    if ! command -v go >/dev/null 2>&1; then
        [ -x /usr/local/go/bin/go ] || die "Go is not installed (need go on PATH or /usr/local/go/bin/go)"
        PATH="/usr/local/go/bin:$PATH"
    fi
    # -mod=mod lets generated modules resolve their go.sum; the module and build caches stay
    # at their defaults (~/go/pkg/mod, ~/.cache/go-build) so later builds are warm.
    export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
}

lock_cache() {
    mkdir -p "$cache"
    exec 9>"$cache/.$1.lock"
    flock 9
    cached_or_continue "$1" "$2" # built by a concurrent run while we waited
}
