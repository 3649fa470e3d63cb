"""Every DVC stage lists the project code it runs, and only that code.

For each stage of ``dvc.yaml`` the test finds what its ``cmd`` runs (a ``dzad stage <name>``
command function, or a ``python -m <module>``), follows the project imports from there (AST,
function-local imports included, ``if TYPE_CHECKING:`` blocks skipped) and compares the files
reached with the stage's ``deps``: a file reached must be listed (or a folder above it), and a
listed ``.py`` file must be reached. Package ``__init__.py`` files that hold only a docstring and
constants run no code of the stage and are not required. The sibling command groups that
``dzad/cli/__init__.py`` registers (data, model, score) are not part of a stage: a stage runs
one command function of ``dzad/cli/study_cmds.py`` and what that imports.
"""

from __future__ import annotations

import ast
import functools
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("dzad", "flows")
STAGE_COMMANDS = REPO / "dzad" / "cli" / "study_cmds.py"
# registers every command group on the app (``python -m dzad`` runs it); no stage's code
NOT_STAGE_CODE = frozenset({"dzad.cli"})


def _stages() -> dict[str, dict]:
    """Stage name -> its definition (a ``foreach`` stage's ``do`` body)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}


def module_file(name: str) -> Path | None:
    """Repo file of dotted module ``name`` (a module or a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runs_code(init: Path) -> bool:
    """False for an ``__init__.py`` of only a docstring and literal assignments."""
    for node in ast.parse(init.read_text()).body:
        literal = isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Constant)
        if not literal:
            return True
    return False


def _imported_names(nodes: list[ast.stmt], package: str) -> set[str]:
    """Dotted project modules imported anywhere in ``nodes`` (``package``: for relative imports).

    ``from a.b import c`` yields ``a.b.c`` when that is a module, else ``a.b``.
    """
    out: set[str] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)  # type-only imports never run
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if module_file(sub) else base)
        todo.extend(ast.iter_child_nodes(node))
    return {n for n in out if module_file(n)}


@functools.cache
def _module_imports(name: str) -> frozenset[str]:
    """Project modules that module ``name`` imports anywhere in its file."""
    path = module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return frozenset(_imported_names(ast.parse(path.read_text()).body, package))


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module runs its packages' ``__init__``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(roots: set[str]) -> set[Path]:
    """Files of the project modules ``roots`` import, transitively (``roots`` included)."""
    seen: set[str] = set()
    todo = [p for r in roots for p in _with_parents(r)]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_STAGE_CODE:
            continue
        seen.add(name)
        todo.extend(p for n in _module_imports(name) for p in _with_parents(n))
    files = {module_file(n) for n in seen}
    return {f for f in files if f is not None and (f.name != "__init__.py" or _runs_code(f))}


def _stage_command_roots(command: str) -> tuple[set[str], Path]:
    """Modules imported by ``dzad stage <command>``: study_cmds' own imports + the function's."""
    tree = ast.parse(STAGE_COMMANDS.read_text())
    module_level = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        names = {ast.unparse(d) for d in fn.decorator_list}
        if f"stage.command({command!r})" in names:
            return _imported_names([*module_level, fn], "dzad.cli"), STAGE_COMMANDS
    raise AssertionError(f"no `dzad stage {command}` command in {STAGE_COMMANDS}")


def stage_code(cmd: str) -> set[Path]:
    """Project files the stage command ``cmd`` runs."""
    argv = shlex.split(cmd)
    if argv[:2] != ["python", "-m"]:
        raise AssertionError(f"unknown stage command form (teach this test): {cmd}")
    if argv[2:4] == ["dzad", "stage"]:
        roots, entry = _stage_command_roots(argv[4])
        return closure(roots) | {entry}
    entry = module_file(argv[2])
    assert entry is not None, f"{cmd}: {argv[2]} is not a project module"
    return closure({argv[2]})


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d + "/") for d in (d.rstrip("/") for d in deps))


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_list_exactly_the_code_it_imports(name):
    stage = _stages()[name]
    deps = [d for d in stage.get("deps", []) if "${" not in d]
    code = stage_code(stage["cmd"])
    missing = sorted(p.relative_to(REPO).as_posix() for p in code if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {name!r} runs but does not list: {missing}"
    listed = [d for d in deps if d.endswith(".py")]
    stale = sorted(d for d in listed if REPO / d not in code)
    assert not stale, f"dvc.yaml stage {name!r} lists code it never imports: {stale}"


def test_the_import_walk_follows_local_relative_and_package_imports():
    """The walk itself: function-local, relative and ``from package import module`` imports are
    followed, ``if TYPE_CHECKING:`` ones are not; docstring-only package inits are left out."""
    src = """
from typing import TYPE_CHECKING
import dzad.errors
if TYPE_CHECKING:
    from dzad.model import DZAD
def f():
    from dzad.study import layout
    from . import _app
"""
    names = _imported_names(ast.parse(src).body, "dzad.cli")
    assert names == {"dzad.errors", "dzad.study.layout", "dzad.cli._app"}
    rel = {p.relative_to(REPO).as_posix() for p in closure({"dzad.cli._app"})}
    assert {"dzad/config.py", "dzad/errors.py", "dzad/cli/_app.py"} <= rel  # config: in a function
    assert "dzad/__init__.py" not in rel  # a docstring and __version__: runs nothing
    assert "flows/__init__.py" in {  # sets environment variables on import: it runs code
        p.relative_to(REPO).as_posix() for p in closure({"flows.register"})
    }
