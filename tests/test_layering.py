"""The package's layering: no import cycle, small method files, short functions.

Every import statement counts, at module level, inside functions and under `if TYPE_CHECKING:`,
so a cycle cannot hide behind a lazy import. `from pkg import name` is an edge to `pkg.name` when
that is a module, else to `pkg` (its `__init__`). The implicit import of a parent package that
Python performs for `import pkg.mod` is not an edge: `adaptinf/__init__.py` imports only the leaf
`version` at module level, so it adds no cycle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adaptinf"
MAX_METHOD_FILE_LINES = 700
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every adaptinf module `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import adaptinf.x.y as z` of a module, or a name in a module
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    # adaptinf/__init__.py imports the registry inside `load` only
    assert "adaptinf.registry" in graph["adaptinf"] and "adaptinf.version" in graph["adaptinf"]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (each line one strongly connected group):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_layers_point_one_way():
    graph = import_graph()

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            v = todo.pop()
            if v == b:
                return True
            if v not in seen:
                seen.add(v)
                todo += graph.get(v, ())
        return False

    methods = [m for m in graph if m.startswith("adaptinf.methods.")]
    assert methods
    for m in methods:  # models know nothing of training, disk or the catalogue
        for low in ("adaptinf.recipes", "adaptinf.recipes.finetune", "adaptinf.checkpoint", "adaptinf.registry"):
            assert not reaches(m, low), f"{m} imports {low} (directly or through another module)"
    assert not reaches("adaptinf.checkpoint", "adaptinf.registry")  # the format knows no method
    assert not reaches("adaptinf.model", "adaptinf.recipes.finetune")
    assert not any(reaches("adaptinf.settings", m) for m in graph if m != "adaptinf.settings")


def test_method_files_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "methods").glob("*.py")}
    big = {n: s for n, s in sizes.items() if s > MAX_METHOD_FILE_LINES}
    assert not big, f"method files over {MAX_METHOD_FILE_LINES} lines: {big}"


def test_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
