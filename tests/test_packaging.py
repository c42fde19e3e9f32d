"""pyproject.toml's runtime dependencies are exactly what the runtime code imports.

Every import under src/sage_otel is mapped to the installed distribution whose files provide
it. What is imported eagerly (at module level, outside ``try``) must be in
``[project].dependencies``; what is imported lazily (inside a function, or a ``try``)
may instead come from a user-facing extra (``web``). Every dependency and every extra's
package must be imported somewhere, but for the few listed below with the reason. The
build-time generators live in tools/ and the test tools in the ``dev`` extra, so neither may
be imported here.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from importlib.metadata import distributions
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info < (3, 11):
    pytest.skip("tomllib needs Python >= 3.11", allow_module_level=True)
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "sage_otel"
# Declared although nothing here imports it, and why.
DECLARED_WITHOUT_IMPORT = {
    # httpcore (under httpx) tries `import sniffio` on every request, and without it pays
    # for the failed import each time.
    "sniffio",
    # The `auto` extra: `opentelemetry-instrument` loads it (entry points) to set up the SDK.
    "opentelemetry-distro",
}


def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def runtime_requirements() -> dict[str, Requirement]:
    reqs = (Requirement(line) for line in project()["dependencies"])
    return {canonicalize_name(req.name): req for req in reqs}


class _Imports(ast.NodeVisitor):
    """(module, where, lazy) for every absolute import; ``if TYPE_CHECKING:`` is skipped."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.depth = 0  # inside a function or a try: runs late, or may fail
        self.found: list[tuple[str, str, bool]] = []

    def _lazy(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_Try = _lazy
    visit_TryStar = _lazy

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, module: str, node: ast.stmt) -> None:
        self.found.append((module, f"{self.where}:{node.lineno}", self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            # `from pkg import sub` may name a submodule: owner() tries pkg.sub before pkg.
            for alias in node.names:
                self._add(f"{node.module}.{alias.name}", node)


def imported_modules() -> Iterator[tuple[str, str, bool]]:
    """(module, where, lazy) for every import under src/sage_otel."""
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(REPO))
        visitor = _Imports(where)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), where))
        yield from visitor.found


def module_owners() -> dict[str, str]:
    """Importable module name -> the distribution that installs its file."""
    owners: dict[str, str] = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or ():
            parts = PurePosixPath(str(file)).parts
            if not parts or parts[-1].endswith(".pth") or ".." in parts:
                continue
            if parts[-1] == "__init__.py":
                parts = parts[:-1]
            elif parts[-1].endswith(".py"):
                parts = (*parts[:-1], parts[-1][:-3])
            elif ".cpython-" in parts[-1] or parts[-1].endswith((".so", ".pyd")):
                parts = (*parts[:-1], parts[-1].split(".")[0])
            else:
                continue
            if parts and all(part.isidentifier() for part in parts):
                owners.setdefault(".".join(parts), name)
    return owners


def owner(module: str, owners: dict[str, str]) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = owners.get(".".join(parts[:n]))
        if found:
            return found
    return None


def imported_distributions() -> dict[str, dict[str, bool]]:
    """Distribution -> {where: lazy}; the standard library and sage_otel itself left out."""
    owners = module_owners()
    found: dict[str, dict[str, bool]] = {}
    unknown = []
    for module, where, lazy in imported_modules():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "sage_otel":
            continue
        dist = owner(module, owners)
        if dist is None:
            unknown.append(f"{module} ({where})")
        else:
            found.setdefault(dist, {})[where] = lazy
    assert not unknown, f"imports that no installed distribution provides: {unknown}"
    return found


def extras() -> dict[str, set[str]]:
    """The user-facing extras (all but dev) and their distributions."""
    return {
        extra: {canonicalize_name(Requirement(line).name) for line in lines}
        for extra, lines in project().get("optional-dependencies", {}).items()
        if extra != "dev"
    }


def test_every_import_is_a_declared_dependency() -> None:
    declared = set(runtime_requirements())
    optional = set().union(*extras().values())
    missing, eager = {}, {}
    for dist, places in imported_distributions().items():
        if dist in declared:
            continue
        if dist not in optional:
            missing[dist] = sorted(places)[:3]
        elif not all(places.values()):
            eager[dist] = sorted(where for where, lazy in places.items() if not lazy)
    assert not missing, (
        f"imported by src/sage_otel but neither in [project].dependencies nor in an extra: "
        f"{missing}"
    )
    assert not eager, (
        f"from an extra, but imported at module level (import it where it is used): {eager}"
    )


def test_every_dependency_is_imported() -> None:
    imported = set(imported_distributions())
    unused = set(runtime_requirements()) - imported - DECLARED_WITHOUT_IMPORT
    assert not unused, f"in [project].dependencies but not imported by src/sage_otel: {unused}"
    for extra, dists in extras().items():
        unused = dists - imported - DECLARED_WITHOUT_IMPORT
        assert not unused, f"in the {extra!r} extra but not imported by src/sage_otel: {unused}"


def test_every_dependency_has_a_floor() -> None:
    lines = list(project()["dependencies"])
    for extra in extras():
        lines += project()["optional-dependencies"][extra]
    for req in map(Requirement, lines):
        floors = [s for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"{req.name}: one '>=' floor (tested by `make lowest-deps`)"


def test_test_and_build_tools_are_not_runtime_dependencies() -> None:
    declared = set(runtime_requirements())
    for name in ("pytest", "opentelemetry-distro", "grafana-foundation-sdk", "build", "uv"):
        assert name not in declared, f"{name} is not needed at run time"
    assert extras()["auto"] == {"opentelemetry-distro"}


def test_build_time_generators_are_outside_the_package() -> None:
    telemetry = PACKAGE / "telemetry"
    for module in ("dashboards.py", "docs.py", "queries.py"):
        assert not (telemetry / module).exists(), f"{module} belongs in tools/"
    for module in ("dashboards.py", "metrics_docs.py", "queries.py"):
        assert (REPO / "tools" / module).exists()
