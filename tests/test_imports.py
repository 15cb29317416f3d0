"""No module of fastrms imports another in a cycle (issue 17).

Every module of the package (and of ``kernels/``, installed as ``fastrms.kernels``) is parsed
with :mod:`ast`; each ``import`` and ``from ... import`` of a fastrms module, at top level or
inside a function, is an edge of the graph. A cycle in it fails the test and is named. Imports
deferred into functions to keep ``import fastrms`` cheap are fine as long as they close no cycle.

An edge goes to the module named (``from . import dispatch``: to ``fastrms.dispatch``; ``from
.specs import SPECS``: to ``fastrms.specs``), not to the packages above it, whose
``__init__`` Python has already run or is running by then.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Each package of the distribution and the folder its modules are in (pyproject's package-dir).
PACKAGES = {"fastrms": ROOT / "fastrms", "fastrms.kernels": ROOT / "kernels"}

Graph = dict[str, set[str]]


def modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name and its file; a package is named by its ``__init__.py``."""
    found = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if name not in found:  # fastrms/kernels, if present, does not shadow kernels/
                found[name] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from <...> import`` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, _is_package(path), node)
            # A name that is a submodule is an edge to it; any other name is the base's.
            out.update(
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            )
    return {_nearest(name, known) for name in out if _nearest(name, known)} - {module}


def _nearest(name: str, known: set[str]) -> str | None:
    """``name`` if it is a module of ours, else the module it is an attribute of, else None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(packages: dict[str, Path]) -> Graph:
    found = modules(packages)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan's algorithm),
    each written ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in {component}")


def test_no_fastrms_module_imports_another_in_a_cycle():
    graph = import_graph(PACKAGES)
    assert "fastrms.functional" in graph and "fastrms.kernels.cpu" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_leaves_the_tools_to_the_fastrms_command():
    """Only the ``fastrms`` command imports :mod:`fastrms.tools` (the benchmark report, the
    demos): the library proper stands without them."""
    graph = import_graph(PACKAGES)
    tools = {m for m in graph if m == "fastrms.tools" or m.startswith("fastrms.tools.")}
    assert {"fastrms.tools.bench.command", "fastrms.tools.demo.command"} <= tools
    importers = {m for m, targets in graph.items() if targets & tools} - tools
    assert importers == {"fastrms.cli"}


def test_the_grouped_step_and_the_functional_api_import_one_way():
    graph = import_graph(PACKAGES)
    assert "fastrms.grouped" in graph["fastrms.functional"]
    assert "fastrms.functional" not in graph["fastrms.grouped"]


# -- the checker itself finds cycles, at any depth, and names them ------------------------------


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "from . import b\n", "b.py": "from .a import f\n"},
         [["pkg.a", "pkg.b", "pkg.a"]]),
        (
            {"a.py": "def f():\n    from .b import g\n", "b.py": "import pkg.c\n",
             "c.py": "from pkg import a\n"},
            [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]],
        ),
        (
            {"__init__.py": "from .sub import x\n", "sub/__init__.py": "from .. import y\n",
             "y.py": "from .sub.z import q\n", "sub/z.py": "from ..y import r\n"},
            [["pkg.sub.z", "pkg.y", "pkg.sub.z"]],
        ),
        ({"a.py": "from . import b\n", "b.py": "import numpy\nfrom .c import x\n",
          "c.py": "import os\n"}, []),
    ],
    ids=["two", "deferred-three", "nested", "none"],
)  # fmt: skip
def test_the_checker_finds_and_names_cycles(tmp_path, files, expected):
    _write(tmp_path / "pkg", files)
    assert find_cycles(import_graph({"pkg": tmp_path / "pkg"})) == expected
