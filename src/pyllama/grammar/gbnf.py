"""GBNF text and files: load_grammar (text, file or JSON Schema), the grammars shipped with
pyllama, and the bounded whitespace rule every generated grammar uses.

The shipped grammar files live in ``pyllama/grammars/`` (``json.gbnf``, ``list.gbnf``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, List, Optional, Union

from pyllama._gbnf_check import precheck_gbnf
from pyllama.errors import GrammarError
from pyllama.grammar._text import WHITESPACE_RULE
from pyllama.grammar.json_schema import json_schema_to_gbnf

__all__ = ["available_grammars", "grammar_path", "load_grammar", "WHITESPACE_RULE"]

# The shipped grammars stay in pyllama/grammars/ (the wheel and sdist rules name that folder).
_GRAMMAR_DIR = Path(__file__).resolve().parent.parent / "grammars"


# ----------------------------------------------------------------------------- shipped grammars


def available_grammars() -> List[str]:
    """Names of the grammars shipped with pyllama (for :func:`grammar_path`)."""
    return sorted(p.stem for p in _GRAMMAR_DIR.glob("*.gbnf"))


def grammar_path(name: str) -> str:
    """Absolute path of a grammar file shipped with pyllama.

    ``name`` is the grammar's name with or without the ``.gbnf`` suffix: ``"json"`` (a JSON
    object), ``"list"`` (a JSON array of strings).  ValueError for any other name.
    """
    if not isinstance(name, str):
        raise TypeError(f"grammar name must be a str, not {type(name).__name__}")
    stem = name[:-5] if name.endswith(".gbnf") else name
    names = available_grammars()
    if stem not in names or "/" in stem or "\\" in stem:
        raise ValueError(f"no shipped grammar named {name!r}; available: {', '.join(names)}")
    return str(_GRAMMAR_DIR / f"{stem}.gbnf")


# ----------------------------------------------------------------------------- load_grammar


def load_grammar(
    grammar: Optional[str] = None,
    grammar_path: Union[str, "os.PathLike[str]", None] = None,
    json_schema: Any = None,
) -> Optional[str]:
    """GBNF text from exactly one source, or None when none is given.

    * ``grammar``: GBNF text, used as is.
    * ``grammar_path``: a GBNF file (UTF-8).
    * ``json_schema``: a JSON Schema (dict or JSON text) or a pydantic model class, converted
      with :func:`json_schema_to_gbnf`.

    The text is passed through :func:`precheck_gbnf`.  Raises ValueError when more than one
    source is given, FileNotFoundError for a missing file, GrammarError for an empty grammar
    (llama.cpp would silently run unconstrained) and JSONSchemaError for unsupported schemas.
    """
    given = [n for n, v in (("grammar", grammar), ("grammar_path", grammar_path),
                            ("json_schema", json_schema)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of grammar, grammar_path, json_schema (got {' and '.join(given)})")
    if not given:
        return None
    if json_schema is not None:
        return json_schema_to_gbnf(json_schema)
    if grammar_path is not None:
        text = _read_grammar_file(grammar_path)
        where = f" (file {os.fspath(grammar_path)!s})"
    else:
        if isinstance(grammar, bytes):
            try:
                grammar = grammar.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GrammarError(f"the grammar is not valid UTF-8: {e}") from None
        if not isinstance(grammar, str):
            raise TypeError(f"grammar must be GBNF text (str), not {type(grammar).__name__}")
        text = grammar
        where = ""
    if not text.strip():
        raise GrammarError(f"the grammar is empty{where}: llama.cpp would run unconstrained")
    precheck_gbnf(text)
    return text


def _read_grammar_file(path: Union[str, "os.PathLike[str]"]) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"grammar_path must be a path (str or os.PathLike), not {type(path).__name__}")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        hint = ""
        if p.stem in available_grammars():
            hint = f"; for pyllama's own {p.stem!r} grammar use pyllama.grammar.grammar_path({p.stem!r})"
        if p.exists():
            raise IsADirectoryError(f"grammar_path is not a file: {str(p)!r}")
        raise FileNotFoundError(errno.ENOENT, f"grammar file not found{hint}", str(p))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GrammarError(f"grammar file {str(p)!r} is not valid UTF-8: {e}") from None

