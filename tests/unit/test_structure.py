"""The package's shape, read from its source: one error type, the CLI imported only by entry
points, no import cycles, small modules, few function-level imports of distgan modules.

These checks cover every module under distgan/, whoever owns it."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from distgan.errors import DistganError

PACKAGE = Path(__file__).resolve().parents[2] / "distgan"
MAX_LINES = 500
MAX_FUNCTION_IMPORTS = 15
CLI_IMPORTERS = ("distgan.cli", "distgan.__main__", "distgan.train")
"""The entry points: the CLI package itself, `python -m distgan` and the launcher script."""
NOT_IMPORTABLE = ("distgan.__main__", "distgan.train")
"""Entry points that run when imported (and `distgan.train` would rebind the API function)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported distgan module, inside a function?) for each runtime import of module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        in_function = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in _ancestors(node, parents))
        found += [(t, in_function) for t in targets if t == "distgan" or t.startswith("distgan.")]
    return found


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]):
    while node in parents:
        node = parents[node]
        yield node


def test_every_exception_class_is_a_distgan_error():
    offenders = []
    for name, path in MODULES.items():
        if name in NOT_IMPORTABLE:
            continue
        classes = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
        if not classes:
            continue
        module = importlib.import_module(name)
        for cls_name in classes:
            cls = getattr(module, cls_name)
            if inspect.isclass(cls) and issubclass(cls, BaseException) and not issubclass(cls, DistganError):
                offenders.append(f"{name}.{cls_name}")
    assert not offenders, f"exception classes that do not derive from distgan.errors.DistganError: {offenders}"


def test_only_entry_points_import_the_cli():
    offenders = [f"{name} imports {target}" for name in MODULES if not name.startswith(CLI_IMPORTERS)
                 for target, _ in imports(name) if target == "distgan.cli" or target.startswith("distgan.cli.")]
    assert not offenders


def test_nothing_imports_the_launcher_module():
    """`import distgan.train` would replace the API function `distgan.train` by the module."""
    assert not [name for name in MODULES for target, _ in imports(name) if target == "distgan.train"]


def test_no_import_cycles():
    graph = {name: sorted({t for t, _ in imports(name) if t in MODULES and t != name}) for name in MODULES}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_few_function_level_imports_of_distgan_modules():
    lazy = [f"{name} -> {target}" for name in MODULES for target, in_function in imports(name) if in_function]
    assert len(lazy) <= MAX_FUNCTION_IMPORTS, "\n".join(lazy)
