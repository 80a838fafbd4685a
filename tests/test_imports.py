"""The package's import rules, read from the source (every import, those inside functions too): no two modules
import each other, directly or around a circle, and models/ imports nothing above it. A circle hidden in a
function-level import still ties the modules together: neither can be read, tested or moved without the other."""

from __future__ import annotations

import ast
from pathlib import Path

import llm_streamline

PACKAGE = Path(llm_streamline.__file__).parent


def _modules(package: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package by its __init__.py)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = f.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imported_modules(path: Path) -> set[str]:
    """What a file imports, as written (`from pkg import name` also as `pkg.name`: the name may be a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}. A module's use of a package it belongs to is left out (the
    parts of `baselines` share its `BaselineResult`; everything may read `llm_streamline.__version__`); a
    package's dispatch to its parts is kept (`recipes.run` imports the recipe it runs, and what that imports)."""
    mods = _modules(package)
    graph = {}
    for name, f in mods.items():
        targets = set()
        for imported in _imported_modules(f):
            while imported and imported not in mods:  # `pkg.module.name` -> `pkg.module`
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of the graph, one per strongly connected group of modules (Tarjan), each as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_that_imports_it_back():
    """Once: stages <-> assets (the cache command), plan -> cli -> recipes -> plan (composing a config), and
    preflight <-> recipes.common (sizing the block), all through imports inside functions."""
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(
        " / ".join(f"{m} -> {sorted(graph[m] & set(group))}" for m in group) for group in found)


def test_the_circle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    """The check itself can fail: two modules tied only by an import inside a function are a circle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from pkg import a, b\n")
    (pkg / "sub").mkdir()  # a package dispatching to its part, which uses the package: no circle
    (pkg / "sub" / "__init__.py").write_text("X = 1\n\ndef run():\n    from pkg.sub import part\n    return part\n")
    (pkg / "sub" / "part.py").write_text("from pkg.sub import X\n")
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_models_imports_nothing_above_it():
    """models/ may use config, stages, assets, precision (a leaf: dtype names and the hardware's bf16 support)
    and itself; never the method, the recipes or the evaluation."""
    allowed = ("llm_streamline.models", "llm_streamline.config", "llm_streamline.stages", "llm_streamline.assets",
               "llm_streamline.precision")
    for f in sorted((PACKAGE / "models").glob("*.py")):
        ours = {m for m in _imported_modules(f) if m.startswith("llm_streamline.")}
        bad = {m for m in ours if not m.startswith(allowed)}
        assert not bad, f"{f.name} imports {sorted(bad)}"
