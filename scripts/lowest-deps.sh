#!/usr/bin/env bash
# The unit tests against the lowest versions pyproject.toml allows for the runtime
# dependencies, so that its floors are versions that were tested, not guesses.
#
# A separate venv, cached outside the clone ($SAGE_OTEL_CACHE/lowest-venv):
#   1. the runtime dependencies and those of the user-facing extras (auto, web), resolved
#      by `uv pip compile --resolution lowest-direct`: every direct one at its floor, what
#      they pull in at the newest version they allow;
#   2. a check that each of them really is at its floor (one that is not was
#      pushed up by another's requirement: its floor is untrue and must be raised);
#   3. the package with the dev extra (pytest, hypothesis, ...) at its newest, constrained to
#      the versions of step 1, so the test tools cannot move a runtime dependency;
#   4. the unit tests: everything but tests/e2e (real services) and the wheel test.
# Without uv, pip installs with a constraints file pinning every floor (`==`).
#
#   bash scripts/lowest-deps.sh [pytest args]      (make lowest-deps)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SAGE_OTEL_CACHE:-$HOME/.cache/sage-otel}"
VENV="$CACHE/lowest-venv"
PROJECT_PYTHON="${PROJECT_PYTHON:-.venv/bin/python}"
UV="${UV:-$(dirname "$PROJECT_PYTHON")/uv}"
LOWEST="$VENV/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The interpreter the project venv was made from (not the venv itself).
BASE_PYTHON="$("$PROJECT_PYTHON" -c 'import sys; print(sys._base_executable)')"

# Each runtime dependency, and those of the user-facing extras (all but dev), pinned to its
# floor (the `>=` bound of its specifier); and the names of those extras.
EXTRAS="$("$PROJECT_PYTHON" - "$WORK/floors.txt" <<'PY'
import sys
import tomllib

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = sorted(name for name in project.get("optional-dependencies", {}) if name != "dev")
lines = list(project["dependencies"])
for extra in extras:
    lines += project["optional-dependencies"][extra]
floors = []
for line in lines:
    req = Requirement(line)
    if req.marker and not req.marker.evaluate():
        continue
    lower = [s.version for s in req.specifier if s.operator == ">="]
    if len(lower) != 1:
        sys.exit(f"lowest-deps: {line!r} needs exactly one '>=' floor")
    floors.append(f"{req.name}=={lower[0]}")
with open(sys.argv[1], "w") as out:
    out.write("\n".join(floors) + "\n")
print(" ".join(f"--extra {extra}" for extra in extras))
PY
)"

start=$SECONDS
if [ -x "$UV" ]; then
    # A cached venv whose interpreter is gone or of another version is made anew.
    want="$("$BASE_PYTHON" -c 'import sys; print(sys.version_info[:3])')"
    have="$("$LOWEST" -c 'import sys; print(sys.version_info[:3])' 2>/dev/null || true)"
    if [ "$want" != "$have" ]; then
        rm -rf "$VENV"
        "$UV" venv --quiet --python "$BASE_PYTHON" "$VENV"
    fi
    # shellcheck disable=SC2086 # EXTRAS is a list of options
    "$UV" pip compile --quiet --python "$LOWEST" --resolution lowest-direct $EXTRAS \
        --no-header --no-annotate pyproject.toml -o "$WORK/runtime.txt"
    # Exactly these: whatever an earlier run left is removed.
    "$UV" pip sync --quiet --python "$LOWEST" "$WORK/runtime.txt"
else
    echo "lowest-deps: no uv at $UV; pip with the floors as constraints" >&2
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    "$LOWEST" -m pip install --quiet -c "$WORK/floors.txt" ".[$(echo "$EXTRAS" | sed 's/--extra //g; s/ /,/g')]"
    "$LOWEST" -m pip freeze > "$WORK/runtime.txt"
fi
grep -v '^sage-otel' "$WORK/runtime.txt" > "$WORK/constraints.txt"

# Each at its floor, or the floor is not what was tested.
"$PROJECT_PYTHON" - "$WORK/floors.txt" "$WORK/runtime.txt" <<'PY'
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

installed = {}
for line in open(sys.argv[2]).read().splitlines():
    name, sep, pinned = line.partition("==")
    if sep:
        installed[canonicalize_name(name)] = pinned.strip()
wrong = []
for line in open(sys.argv[1]).read().splitlines():
    req = Requirement(line)
    (floor,) = req.specifier
    have = installed.get(canonicalize_name(req.name), "missing")
    ok = have != "missing" and Version(have) == Version(floor.version)
    print(f"  {req.name:40} floor {floor.version:>8}  installed {have:>8}  {'ok' if ok else 'NO'}")
    if not ok:
        wrong.append(req.name)
if wrong:
    sys.exit(
        "lowest-deps: not at their floor (another dependency requires more): "
        + ", ".join(wrong) + ". Raise these floors in pyproject.toml."
    )
PY

# The test tools, newest, without moving any runtime dependency.
if [ -x "$UV" ]; then
    "$UV" pip install --quiet --python "$LOWEST" -c "$WORK/constraints.txt" \
        --refresh-package sage-otel --reinstall-package sage-otel '.[dev]'
else
    "$LOWEST" -m pip install --quiet -c "$WORK/constraints.txt" '.[dev]'
    "$LOWEST" -m pip install --quiet --force-reinstall --no-deps .
fi
echo "lowest-deps: venv ready in $((SECONDS - start)) s ($VENV)"

"$LOWEST" -m pytest -q -p no:cacheprovider --ignore=tests/e2e -m "not e2e and not packaging" "$@"
echo "lowest-deps: done in $((SECONDS - start)) s"
