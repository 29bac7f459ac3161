"""_core.pyi tells the truth about the compiled extension: every public name of the module and
of its classes is in the stub and vice versa, and wherever the extension exposes a signature
(inspect.signature of def methods, the signature Cython embeds in a class docstring for
__init__), the parameter names and default values equal the stub's.  mypy's stubtest misses
wrong defaults on Cython methods; this test does not."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from pyllama import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
if not STUB.exists():   # editable installs keep the stub in the source tree
    STUB = Path(__file__).resolve().parents[1] / "src" / "pyllama" / "_core.pyi"

# Names the stub may describe that are not attributes (type aliases used in annotations).
STUB_ONLY = {"Self"}


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text())


def _public(names) -> set:
    return {n for n in names if not n.startswith("_")}


def _stub_toplevel(tree: ast.Module) -> dict:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.ImportFrom):   # re-exports: from pyllama.errors import X as X
            for alias in node.names:
                if alias.asname == alias.name:
                    out[alias.name] = node
    return out


def _stub_members(cls: ast.ClassDef) -> dict:
    out = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return out


def _stub_params(fn: ast.FunctionDef) -> dict:
    """name -> default source (None: no default), without self."""
    a = fn.args
    params = {}
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, defaults):
        params[arg.arg] = None if d is None else ast.unparse(d)
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params[arg.arg] = None if d is None else ast.unparse(d)
    params.pop("self", None)
    params.pop("cls", None)
    return params


def _norm_default(src: str | None):
    if src is None:
        return None
    try:
        return ast.literal_eval(src)
    except Exception:   # noqa: BLE001 - e.g. a name
        return src


def _runtime_params(obj) -> dict | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None   # a wrapper slot: no real signature
        out[p.name] = None if p.default is p.empty else repr(p.default)
    out.pop("self", None)
    out.pop("cls", None)
    return out


def _embedded_init_params(cls) -> dict | None:
    """Cython's embedsignature: 'Name(type a, b=1, *, c=None)' on the class docstring."""
    doc = cls.__doc__ or ""
    m = re.match(rf"{cls.__name__}\((.*?)\)\s*(?:\n|$)", doc)
    if not m:
        return None
    params = {}
    depth, cur, parts = 0, "", []
    for ch in m.group(1):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    for part in parts:
        part = part.strip()
        if part in ("*", "/") or part.startswith("*"):
            continue
        decl, _, default = part.partition("=")
        name = decl.split()[-1]
        params[name] = default.strip() if default else None
    params.pop("self", None)
    return params


def _same_default(stub: str | None, runtime: str | None) -> bool:
    if stub is None or runtime is None:
        return stub is None and runtime is None
    if stub == "...":
        return True
    s, r = _norm_default(stub), _norm_default(runtime)
    return s == r or (r in ("True", "False") and str(s) == r)


def _compare(label: str, stub: dict, runtime: dict) -> list:
    """What differs between the stub's parameters and the extension's (names, defaults)."""
    if set(stub) != set(runtime):
        return [f"{label}: parameters {sorted(stub)} in the stub, {sorted(runtime)} at run time"]
    return [f"{label}({p}=...): default {stub[p]} in the stub, {runtime[p]} at run time"
            for p in stub if not _same_default(stub[p], runtime[p])]


def test_module_names_match():
    tree = _stub()
    stub_names = _public(_stub_toplevel(tree)) - STUB_ONLY
    runtime = _public(dir(_core))
    assert not (runtime - stub_names), f"in _core but not in _core.pyi: {sorted(runtime - stub_names)}"
    assert not (stub_names - runtime), f"in _core.pyi but not in _core: {sorted(stub_names - runtime)}"


def _classes():
    tree = _stub()
    return [(name, node) for name, node in _stub_toplevel(tree).items()
            if isinstance(node, ast.ClassDef) and not issubclass(getattr(_core, name), BaseException)]


@pytest.mark.parametrize("name,node", _classes(), ids=[n for n, _ in _classes()])
def test_class_members_and_signatures(name, node):
    cls = getattr(_core, name)
    members = _stub_members(node)
    runtime = _public(n for n in dir(cls) if not n.startswith("__"))
    stub = _public(members)
    assert not (runtime - stub), f"{name}: in the extension, missing from the stub: {sorted(runtime - stub)}"
    assert not (stub - runtime), f"{name}: in the stub, missing from the extension: {sorted(stub - runtime)}"
    problems = []
    for mname, fn in members.items():
        if not isinstance(fn, ast.FunctionDef) or any(
                isinstance(d, ast.Name) and d.id == "property" or
                isinstance(d, ast.Attribute) and d.attr == "setter" for d in fn.decorator_list):
            continue
        if mname == "__init__":
            rt = _embedded_init_params(cls)
        elif mname.startswith("__"):
            continue
        else:
            rt = _runtime_params(getattr(cls, mname))
        if rt is None:
            continue
        problems += _compare(f"{name}.{mname}", _stub_params(fn), rt)
    assert not problems, "\n".join(problems)


def test_module_function_signatures():
    problems = []
    for fname, fn in _stub_toplevel(_stub()).items():
        if not isinstance(fn, ast.FunctionDef) or fname.startswith("_"):
            continue
        rt = _runtime_params(getattr(_core, fname))
        if rt is None:
            continue
        problems += _compare(fname, _stub_params(fn), rt)
    assert not problems, "\n".join(problems)
