"""The import graph of jisu/: no cycle between modules (function-local imports included) and no
edge across a layer boundary. Built from the source with `ast`, nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "jisu"
EXTENSIONS = {"jisu._kernels"}  # compiled modules: leaves of the graph

# folder -> the jisu folders its modules must never import (see docs/architecture.md)
FORBIDDEN = {
    "kernels": {"models", "engine", "io", "compress", "serve", "eval", "api", "cli"},
    "models": {"engine", "io", "serve", "compress", "eval", "api", "cli"},
    "engine": {"serve", "compress", "eval", "cli"},
    "io": {"engine", "serve", "compress", "eval", "cli"},
    "compress": {"serve", "cli"},
}


def module_name(path: Path) -> str:
    parts = ["jisu", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The jisu modules `name` imports anywhere in its file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known | EXTENSIONS else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t in EXTENSIONS:
                continue
            while t and t not in known:  # `import jisu.kernels._kernels` (an extension) -> its package
                t = t.rpartition(".")[0]
            if t.startswith("jisu") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports_of(n, p, known) for n, p in mods.items()}


def area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_local_imports():
    """The scanner itself: relative, absolute and function-local imports all become edges."""
    g = graph()
    assert "jisu.kernels.ops" in g and "jisu.config" in g
    assert any(g.values()), "no imports found at all"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_forbidden_edge():
    bad = sorted(f"{n} imports {m}" for n, deps in graph().items() for m in deps
                 if area(m) in FORBIDDEN.get(area(n), ()))
    assert not bad, "imports across a boundary:\n" + "\n".join(bad)
