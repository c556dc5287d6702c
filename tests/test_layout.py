"""The package's layout rules: an acyclic import graph, no private names across modules, small
modules. Each rule is read from the source (``ast``), so a violation names the file and line."""

from __future__ import annotations

import ast
import graphlib
import os
import pathlib
import subprocess
import sys

from tests.helpers import REPO

PACKAGE = REPO / "ptq_adversary"
#: The issue's bound on a module's length ("no module over ~400 lines").
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]):
    """``(line, imported module, bound name, imported attribute)`` for every import in ``path``,
    at any depth (an import inside a function counts: it is how cycles hide)."""
    name, is_package = _module_name(path), path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, alias.asname or alias.name.split(".")[0], None
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, name, is_package)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                target = full if full in modules else source
                yield node.lineno, target, alias.asname or alias.name, alias.name


def _graph() -> dict[str, set[str]]:
    modules = _package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target, _, _ in _imports(path, modules):
            if target in modules and target != module:
                graph[module].add(target)
    return graph


def test_import_graph_is_acyclic():
    graph = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle of the design: the
    # submodules import each other, never their package's __init__ (checked here).
    for module, deps in graph.items():
        parents = {".".join(module.split(".")[:i]) for i in range(2, module.count(".") + 1)}
        assert not deps & parents, f"{module} imports its own package {deps & parents}"
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
    assert set(order) == set(graph)


def test_every_module_imports_first_in_a_fresh_interpreter_in_dependency_order():
    order = list(graphlib.TopologicalSorter(_graph()).static_order())
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script, *order], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _our_modules() -> dict[str, pathlib.Path]:
    """Every module of the repository by the name it is imported under: the package's and the
    tests' dotted names, and the experiments' file stems (they import each other by path)."""
    ours = {_module_name(p): p for p in sorted((REPO / "tests").rglob("*.py"))}
    ours |= {p.stem: p for p in sorted((REPO / "experiments").glob("*.py"))}
    return ours | _package_modules()


def _private_uses(path: pathlib.Path, ours: dict[str, pathlib.Path]) -> list[str]:
    """``file:line what`` for each private name of another of our modules used in ``path``:
    ``from mod import _name`` or ``mod._name`` where ``mod`` is bound to one of our modules."""
    where = path.relative_to(REPO)
    bound: dict[str, str] = {}  # local name -> our module it is bound to
    found = []
    for line, target, local, attr in _imports(path, ours):
        if target not in ours:
            continue
        if attr is not None and not target.endswith(f".{attr}") and target != attr:
            if attr.startswith("_") and not attr.startswith("__"):
                found.append(f"{where}:{line} from {target} import {attr}")
            continue  # a function or class, not a module
        bound[local] = target
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{where}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_from_another_module():
    ours = _our_modules()
    found = [use for path in sorted(set(ours.values())) for use in _private_uses(path, ours)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_no_module_is_over_the_line_limit():
    long = {
        str(p.relative_to(REPO)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
