# Shared by the build-*.sh scripts (sourced, not run): a Go build cached outside the repo.
#   parse_check_flag "$@"         sets check=1 for --check (build nothing), rejects the rest
#   cached_or_continue NAME BIN   prints BIN and exits if it is built; with --check, exits 3
#                                 if it is not; otherwise returns so the caller builds it
#   use_go                        puts Go on PATH and keeps module/build caches at defaults
#   lock_cache NAME               serializes concurrent builds of NAME; exits if one finished
#   step N TOTAL WHAT             a cold build's progress: "<script>: [N/TOTAL] WHAT" on stderr
#   logged LOG [TOTAL] CMD...     CMD's output appended to LOG; every $progress_every seconds a
#                                 line on stderr with the time so far and the lines CMD logged
#                                 (of about TOTAL, when TOTAL is a number: then a percentage)
# The caller defines die(). The cache directory is $cache. Progress goes to stderr: stdout
# carries only the binary's path, which tools/services.py reads.

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

progress_every="${SAGE_OTEL_PROGRESS_SECONDS:-30}"
started=$SECONDS

elapsed() {
    local s=$((SECONDS - started))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

step() {
    echo "$(basename "$0" .sh): [$1/$2] $3 ($(elapsed) so far)" >&2
}

logged() {
    local log="$1" total="" status=0 before now lines pid next pct
    shift
    case "$1" in '') shift ;; *[!0-9]*) ;; *) total="$1"; shift ;; esac
    touch "$log"
    before="$(wc -l <"$log")"
    "$@" >>"$log" 2>&1 &
    pid=$!
    # A background job of a script ignores SIGINT: stop it when the script is stopped.
    trap 'kill -TERM "$pid" 2>/dev/null; exit 130' INT TERM
    next=$((SECONDS + progress_every))
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ "$SECONDS" -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
            now="$(wc -l <"$log")"
            lines=$((now - before))
            if [ -n "$total" ] && [ "$total" -gt 0 ]; then
                pct=$((lines * 100 / total))
                [ "$pct" -le 99 ] || pct=99
                echo "$(basename "$0" .sh):   ... $(elapsed), about $pct% ($lines of ~$total packages)" >&2
            elif [ "$lines" -gt 0 ]; then
                echo "$(basename "$0" .sh):   ... $(elapsed), $lines lines in $log" >&2
            else
                echo "$(basename "$0" .sh):   ... $(elapsed)" >&2
            fi
            next=$((SECONDS + progress_every))
        fi
    done
    wait "$pid" || status=$?
    trap - INT TERM
    return "$status"
}
