"""No import cycles among the modules of dzad/: every import counts, function-local ones included
(a cycle hidden inside a function still ties two modules together), except those under
``if TYPE_CHECKING:``, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "dzad"


def module_name(path: Path, root: Path) -> str:
    """``root/sub/b.py`` -> ``dzad.sub.b`` (the package is named after ``root``)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_names(path: Path, root: Path) -> set[str]:
    """Dotted names ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def import_graph(root: Path = LIBRARY) -> dict[str, set[str]]:
    """``{module: project modules it imports}`` for every module under ``root``."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}

    def project_module(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in paths.items():
        targets = {project_module(n) for n in imported_names(path, root)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "dzad.detection_modes" in graph["dzad.detection"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycles_are_found_including_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "dzad"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dzad.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dzad import a\n"
    )
    graph = import_graph(pkg)
    assert graph["dzad.sub.b"] == {"dzad", "dzad.a"} and graph["dzad.c"] == set()
    assert find_cycle(graph) == ["dzad.a", "dzad.sub.b", "dzad.a"]
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None
