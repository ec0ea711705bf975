"""The product's import graph: no cycles, and the layering the architecture promises.

Every module under the product packages is parsed with ``ast`` (nothing is imported), and
every ``import`` statement counts, at module level or inside a function: a lazy import that
closes a circle is still a circle, only one that fails later. Imports under
``if TYPE_CHECKING:`` never run and are left out.

Layering (docs/architecture.md):
- ``shared.models`` knows no model family: families plug in through the registry;
- ``shared`` (algorithms, no I/O) imports nothing of ``server`` or ``edge_agent``;
- the device agent imports nothing of the server.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "server", "edge_agent", "edgeloop", "protos")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py file under the product packages."""
    found: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that importing ``name`` executes directly: each imported module plus
    the packages above it (their ``__init__`` runs first), except the importer's own
    packages, which are already being initialised."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        targets.add(base)
        # ``from pkg import sub`` imports the submodule when there is one.
        targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    own = set(_ancestors(name)) | {name}
    edges: set[str] = set()
    for target in targets:
        for mod in [*_ancestors(target), target]:
            if mod in modules and mod not in own:
                edges.add(mod)
    return edges


def build_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    modules = discover(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path: list[str] = [start]
        iters = [iter(sorted(graph[start]))]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]], importer: str, forbidden: Iterable[str]) -> list[str]:
    forbidden = tuple(forbidden)
    return sorted(
        f"{src} -> {dst}"
        for src, dsts in graph.items() if _within(src, importer)
        for dst in dsts if any(_within(dst, f) for f in forbidden)
    )


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return build_graph()


def test_graph_sees_the_product(graph) -> None:
    # Guard against a vacuous pass: the walk finds the modules and their edges.
    assert "shared.models.spec" in graph and "server.worker" in graph
    assert "shared.models.families" in graph["shared.models.spec"]
    assert "shared.dress.model_state" in graph["shared.dress.family"]


def test_no_import_cycle(graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_models_import_no_family(graph) -> None:
    # Families register through shared.models.families; the entry points name them as data.
    assert violations(graph, "shared.models", ["shared.dress", "shared.objectives"]) == []


def test_shared_imports_nothing_of_server_or_agent(graph) -> None:
    assert violations(graph, "shared", ["server", "edge_agent", "edgeloop"]) == []


def test_agent_imports_nothing_of_the_server(graph) -> None:
    assert violations(graph, "edge_agent", ["server"]) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_lazy_import_closing_a_circle_is_found(tmp_path) -> None:
    # The shape this repository once had: shared.models <-> shared.dress via function-level
    # imports, with a type-only import that must not count.
    _write(tmp_path, {
        "shared/__init__.py": "",
        "shared/models/__init__.py": "from shared.models.spec import Spec\n",
        "shared/models/spec.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from shared.other import T\n"
            "class Spec:\n    def check(self):\n        from shared.dress.state import parse\n"
        ),
        "shared/dress/__init__.py": "",
        "shared/dress/state.py": "def parse():\n    from shared.models import Spec\n",
        "shared/other.py": "import shared.models\n",
    })
    g = build_graph(tmp_path, ["shared"])
    assert "shared.other" not in g["shared.models.spec"]  # TYPE_CHECKING only
    assert find_cycle(g) is not None
    assert violations(g, "shared.models", ["shared.dress"]) == [
        "shared.models.spec -> shared.dress", "shared.models.spec -> shared.dress.state"]
    # Without the lazy import, there is none.
    _write(tmp_path, {"shared/dress/state.py": "def parse():\n    return 1\n"})
    g = build_graph(tmp_path, ["shared"])
    assert find_cycle(g) is None


def test_relative_imports_resolve(tmp_path) -> None:
    _write(tmp_path, {
        "server/__init__.py": "",
        "server/a/__init__.py": "from . import b\nfrom .b import f\n",
        "server/a/b.py": "from ..c import g\n",
        "server/c.py": "",
    })
    g = build_graph(tmp_path, ["server"])
    assert g["server.a"] == {"server.a.b"}
    assert g["server.a.b"] == {"server.c"}
