"""The package's shape (docs/architecture.md), checked from the source alone (no build).

Each file does one job, so none grows past a size a reader takes in (Python modules 900
lines, Cython include files 1,000); the extension imports only leaf modules (nothing above
it); and no two modules import each other at module level.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "pyllama"

#: Pure-Python modules the extension may import: each imports nothing of pyllama but errors.
LEAVES = {"pyllama.errors", "pyllama._cpu", "pyllama._media", "pyllama._gbnf_check"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


#: The extension: a module too (`from pyllama import _core`), whose own imports the test of
#: leaf imports checks.
EXTENSION = "pyllama._core"


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _top_level_imports(path: Path, name: str, modules: dict) -> set:
    """pyllama modules that `path` imports when it is imported: module-level statements
    (and those inside module-level try/if blocks), not function bodies or TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set = set()

    def visit(body: list) -> None:
        for node in body:
            if _is_type_checking(node):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pyllama"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([node.module] if node.module else []))
                if not base.startswith("pyllama"):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules or sub == EXTENSION else base)

    visit(tree.body)
    return {m for m in found if (m in modules or m == EXTENSION) and m != name}


def test_no_module_is_too_long():
    long_py = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py")
               if (n := len(p.read_text().splitlines())) > 900}
    long_pxi = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.pxi")
                if (n := len(p.read_text().splitlines())) > 1000}
    assert not long_py, f"Python modules over 900 lines: {long_py}"
    assert not long_pxi, f"Cython include files over 1,000 lines: {long_pxi}"


def test_the_extension_imports_only_leaf_modules():
    """_core is the bottom layer: the Python modules above import it, never the reverse
    (an upward import is a cycle waiting to happen, and a slower import of _core)."""
    pattern = re.compile(r"^\s*(?:from\s+(pyllama[\w.]*)\s+(?:c?import)\s+([\w, ]+)|import\s+(pyllama[\w.]*))",
                         re.M)
    used = set()
    for path in [PKG / "_core.pyx", *PKG.glob("*.pxi")]:
        for m in pattern.finditer(path.read_text()):
            if "cimport" in m.group(0):
                continue          # .pxd declarations, not Python modules
            base = m.group(1) or m.group(3)
            if m.group(2) and base == "pyllama":
                used.update(f"pyllama.{n.strip()}" for n in m.group(2).split(","))
            else:
                used.add(base)
    assert used, "the pattern found no imports at all: it no longer matches the source"
    assert used <= LEAVES, f"the extension imports modules above it: {sorted(used - LEAVES)}"
    modules = _modules()
    for leaf in LEAVES:
        deps = _top_level_imports(modules[leaf], leaf, modules)
        assert deps <= {"pyllama.errors", "pyllama"} - {leaf}, f"{leaf} is not a leaf: imports {deps}"


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: _top_level_imports(path, name, modules) for name, path in modules.items()}
    # The package's __init__ imports its public modules; a module importing `pyllama` itself
    # (for a name __init__ re-exports) would close a cycle through it.
    cycles = []
    state: dict = {}

    def walk(node: str, stack: list) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_says_what_it_is_for(name):
    path = _modules()[name]
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.relative_to(SRC)} has no module docstring (its one job)"
