"""GBNF grammars: shipped grammar files, loading, regex and JSON Schema conversion.

* :func:`grammar_path` -- the file path of a grammar shipped with pyllama (``"json"``, ``"list"``).
* :func:`load_grammar` -- GBNF text from exactly one of: a string, a file, a JSON schema.
* :func:`json_schema_to_gbnf` -- a JSON Schema (dict, JSON text, or pydantic model class) as
  GBNF (cached).
* :func:`regex_to_gbnf` -- a regular expression as GBNF for the JSON strings it matches.
* :func:`precheck_gbnf` -- reject grammars that would crash or hang llama.cpp's grammar parser.

Modules: :mod:`~pyllama.grammar.gbnf` (text, files, shipped grammars),
:mod:`~pyllama.grammar.regex`, :mod:`~pyllama.grammar.json_schema`.  The pre-check belongs to
the core layer (:mod:`pyllama._gbnf_check`, which ``pyllama._core`` calls before every grammar
reaches llama.cpp) and is re-exported here.

Final validation is llama.cpp's own parser (``pyllama._core.validate_grammar``); nothing here
tries to reproduce its error messages.  :func:`precheck_gbnf` exists only because some inputs
make that parser overflow the C stack, allocate without bound, or run for minutes, and those
cannot be caught once they are in C.  See docs/grammars.md.
"""

from pyllama._gbnf_check import gbnf_syntax_error, precheck_cache_clear, precheck_gbnf
from pyllama.grammar.gbnf import WHITESPACE_RULE, available_grammars, grammar_path, load_grammar
from pyllama.grammar.json_schema import json_schema_cache_clear, json_schema_to_gbnf
from pyllama.grammar.regex import regex_to_gbnf

__all__ = [
    "available_grammars",
    "grammar_path",
    "load_grammar",
    "json_schema_to_gbnf",
    "regex_to_gbnf",
    "precheck_gbnf",
    "gbnf_syntax_error",
    "clear_caches",
    "WHITESPACE_RULE",
]


def clear_caches() -> None:
    """Forget cached JSON Schema conversions and pre-check results (for measurements)."""
    json_schema_cache_clear()
    precheck_cache_clear()
