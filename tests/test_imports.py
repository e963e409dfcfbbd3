"""The package's shape (issue 11): vlora_core imports nothing above it (no ui, no Gradio) and its modules import
each other in one direction only, read from the source's top-level imports (the AST, nothing is run)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "vlora_core"


def _module(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports at module level (not inside functions)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in CORE.rglob("*.py")}
    return {name: {d for d in _top_level_imports(p) if d in files and d != name} for name, p in files.items()}


def test_the_core_imports_nothing_above_it():
    for path in CORE.rglob("*.py"):
        roots = {name.split(".")[0] for name in _top_level_imports(path)}
        assert not roots & {"ui", "gradio", "app", "spaces"}, path


def test_the_core_has_no_import_cycle():
    graph = _graph()
    graph = {n: {d for d in deps if d != "vlora_core"} for n, deps in graph.items()}  # the package's own re-exports
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node) :] + [node]))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert "vlora_core.subspace" in done and len(done) == len(graph) > 10
