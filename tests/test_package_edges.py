"""The library stays free of the orchestration edge: no module under dzad/ imports Prefect,
MLflow, DVC or flows/ (the ``dzad`` command, :mod:`flows.cli`, adds what needs them)."""

from __future__ import annotations

import ast
from pathlib import Path

EDGE = ("flows", "mlflow", "prefect", "dvc")
LIBRARY = Path(__file__).resolve().parents[1] / "dzad"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_module_imports_the_edge():
    found = {
        str(p.relative_to(LIBRARY.parent)): sorted(_imports(p) & set(EDGE))
        for p in sorted(LIBRARY.rglob("*.py"))
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_the_dzad_command_resolves_registry_uris_through_the_edge():
    from dzad.cli._app import MODEL_RESOLVERS
    from flows.cli import app  # registers the registry commands and the resolver

    names = {c.name for c in app.registered_commands}
    assert {"promote", "models", "score"} <= names
    assert "models:/" in MODEL_RESOLVERS
