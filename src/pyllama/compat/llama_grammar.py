"""llama-cpp-python's ``llama_cpp.llama_grammar`` on pyllama's grammar support.

:class:`LlamaGrammar` holds GBNF text (``_grammar``) that the compat ``Llama`` hands to
pyllama's ``grammar=``; nothing here parses grammars into C structures.  Unlike
llama-cpp-python (whose ``LlamaGrammar`` accepts any text and fails at sampling time, or
not at all), a grammar is checked when it is made: a syntax error, a missing ``root`` rule,
an empty grammar or one that would crash or hang llama.cpp raises
:class:`pyllama.errors.GrammarError`, a ValueError.

JSON Schema conversion is pyllama's own (:func:`pyllama.grammar.json_schema_to_gbnf`): the
grammar text differs from llama-cpp-python's, the JSON it admits does not, except that
whitespace between tokens is bounded.  Properties come in llama-cpp-python's order: by
``prop_order``, then as declared, required ones before optional ones.

The ``*_GBNF`` constants are llama.cpp's example grammars, as llama-cpp-python 0.3.36 ships
them (vendor/llama.cpp/grammars).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Union

from pyllama._gbnf_check import check_before_llama
from pyllama.errors import GrammarError, JSONSchemaError
from pyllama.grammar import json_schema_to_gbnf as _pyllama_json_schema_to_gbnf
from pyllama.grammar import load_grammar

__all__ = [
    "LlamaGrammar",
    "LLAMA_GRAMMAR_DEFAULT_ROOT",
    "json_schema_to_gbnf",
    "SchemaConverter",
    "ARITHMETIC_GBNF",
    "C_GBNF",
    "CHESS_GBNF",
    "JAPANESE_GBNF",
    "JSON_ARR_GBNF",
    "JSON_GBNF",
    "LIST_GBNF",
    "SPACE_RULE",
]

LLAMA_GRAMMAR_DEFAULT_ROOT = "root"


def _checked_gbnf(grammar: Any, root: str = LLAMA_GRAMMAR_DEFAULT_ROOT) -> str:
    """`grammar` as GBNF text, or GrammarError (a ValueError) saying what llama.cpp would refuse."""
    if isinstance(grammar, (bytes, bytearray)):
        try:
            grammar = bytes(grammar).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GrammarError(f"the grammar is not valid UTF-8: {e}") from None
    if not isinstance(grammar, str):
        raise TypeError(f"grammar must be GBNF text (str), not {type(grammar).__name__}")
    if not grammar.strip():
        raise GrammarError("the grammar is empty: llama.cpp would run unconstrained")
    check_before_llama(grammar, root)
    return grammar


class LlamaGrammar:
    """A GBNF grammar for ``Llama(...)(prompt, grammar=...)`` and ``create_chat_completion``.

    Make one with :meth:`from_string`, :meth:`from_file` or :meth:`from_json_schema`.  The
    text is in ``_grammar`` (and :attr:`grammar`, ``str(g)``), the start rule in ``_root``.
    ``verbose`` is accepted everywhere, as in llama-cpp-python, and has no effect.
    """

    def __init__(self, *args: Any, _grammar: str, **kwargs: Any) -> None:
        # llama-cpp-python's signature is (*args, _grammar, **kwargs) and it ignores the rest;
        # only its own `verbose` is worth accepting silently.
        kwargs.pop("verbose", None)
        if args or kwargs:
            extra = [repr(a) for a in args] + [f"{k}=..." for k in kwargs]
            raise TypeError(f"LlamaGrammar takes only _grammar=<GBNF text>, got also {', '.join(extra)}; "
                            "use LlamaGrammar.from_string(text)")
        self._grammar: str = _checked_gbnf(_grammar)
        self._root: str = LLAMA_GRAMMAR_DEFAULT_ROOT

    @property
    def grammar(self) -> str:
        """The GBNF text."""
        return self._grammar

    @property
    def root(self) -> str:
        """The name of the start rule (always ``"root"``, as in llama-cpp-python)."""
        return self._root

    def __str__(self) -> str:
        return self._grammar

    def __repr__(self) -> str:
        first = self._grammar.strip().splitlines()[0] if self._grammar.strip() else ""
        more = " ..." if len(self._grammar.strip().splitlines()) > 1 else ""
        return f"LlamaGrammar({first!r}{more}, {len(self._grammar)} chars)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LlamaGrammar):
            return NotImplemented
        return self._grammar == other._grammar and self._root == other._root

    def __hash__(self) -> int:
        return hash((self._grammar, self._root))

    def __reduce__(self) -> Any:
        return (_rebuild, (self._grammar,))

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        """A grammar from GBNF text; GrammarError (ValueError) if llama.cpp would refuse it."""
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: Union[str, "os.PathLike[str]"], verbose: bool = True) -> "LlamaGrammar":
        """A grammar from a GBNF file (UTF-8).  FileNotFoundError for a missing file,
        GrammarError (ValueError) for an empty or invalid one."""
        text = load_grammar(grammar_path=file)
        return cls(_grammar=text)

    @classmethod
    def from_json_schema(cls, json_schema: Any, verbose: bool = True) -> "LlamaGrammar":
        """A grammar for the JSON documents valid under `json_schema` (JSON text as in
        llama-cpp-python; a dict or a pydantic model class work too).  JSONSchemaError (a
        ValueError) for keywords pyllama cannot express."""
        return cls(_grammar=json_schema_to_gbnf(json_schema))


def _rebuild(text: str) -> LlamaGrammar:
    return LlamaGrammar(_grammar=text)


# ----------------------------------------------------------------------------- JSON Schema

# Keywords whose values are data, not subschemas: their objects keep their key order.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})


def _schema_dict(schema: Any) -> Any:
    """The schema as a fresh JSON document (dict/bool) we may reorder in place."""
    if isinstance(schema, (str, bytes, bytearray)):
        try:
            return json.loads(schema)
        except ValueError as e:
            raise JSONSchemaError(f"the JSON schema is not valid JSON: {e}") from None
        except RecursionError:
            raise JSONSchemaError("the JSON schema nests objects/arrays too deeply") from None
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if hasattr(schema, "model_json_schema") and not isinstance(schema, Mapping):
        return type(schema).model_json_schema()
    if isinstance(schema, (Mapping, bool)):
        try:
            return copy.deepcopy(schema)
        except RecursionError:
            raise JSONSchemaError("the JSON schema nests objects/arrays too deeply") from None
    raise TypeError(f"json_schema must be JSON text, a dict or a pydantic model class, not {type(schema).__name__}")


def _order_properties(document: Any, prop_order: Mapping[str, int]) -> None:
    """Reorder every ``properties`` map in `document` as llama-cpp-python's converter emits
    them: by `prop_order` rank, then declaration order; required before optional."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        props = node.get("properties")
        if isinstance(props, dict) and props:
            required = node.get("required")
            required = set(required) if isinstance(required, list) and all(
                isinstance(r, str) for r in required) else set()
            rank = len(prop_order)
            keys = sorted(enumerate(props), key=lambda ik: (ik[1] not in required,
                                                             prop_order.get(ik[1], rank), ik[0]))
            node["properties"] = {k: props[k] for _, k in keys}
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key == "properties" and isinstance(value, dict):
                stack.extend(node["properties"].values())  # names are not keywords
            elif isinstance(value, (dict, list)):
                stack.append(value)


def json_schema_to_gbnf(schema: Any, prop_order: Optional[List[str]] = None) -> str:
    """GBNF for the JSON documents valid under `schema` (JSON text, as in
    llama-cpp-python; a dict or a pydantic model class work too).

    The conversion is pyllama's (:func:`pyllama.grammar.json_schema_to_gbnf`), with
    properties ordered as llama-cpp-python orders them: names in `prop_order` first (in that
    order), then the rest as declared, required properties before optional ones.
    """
    if prop_order is not None and (isinstance(prop_order, (str, bytes)) or not all(
            isinstance(p, str) for p in prop_order)):
        raise TypeError("prop_order must be a list of property names")
    document = _schema_dict(schema)
    _order_properties(document, {name: i for i, name in enumerate(prop_order or ())})
    return _pyllama_json_schema_to_gbnf(document)


class SchemaConverter:
    """llama-cpp-python's converter interface (``resolve_refs``, ``visit``,
    ``format_grammar``) over pyllama's converter.

    ``visit(schema, name)`` converts the whole schema at once (references included, so
    ``resolve_refs`` only hands the schema back); ``format_grammar()`` returns the GBNF
    text of the last visit.  Remote references (``allow_fetch``), ``dotall`` and
    ``raw_pattern`` are not supported.
    """

    def __init__(self, *, prop_order: Mapping[str, int], allow_fetch: bool = False, dotall: bool = False,
                 raw_pattern: bool = False) -> None:
        for name, value in (("allow_fetch", allow_fetch), ("dotall", dotall), ("raw_pattern", raw_pattern)):
            if value:
                raise NotImplementedError(f"SchemaConverter({name}=True) is not supported by pyllama's "
                                          "converter (pyllama makes no network requests and converts "
                                          "whole schemas)")
        self._prop_order: Dict[str, int] = dict(prop_order or {})
        self._grammar: Optional[str] = None

    def resolve_refs(self, schema: Any, url: str) -> Any:
        """The schema unchanged: local ``$ref``s are resolved during conversion."""
        return schema

    def visit(self, schema: Any, name: str) -> str:
        """Convert `schema`; its rule is ``name`` (``"root"`` when empty)."""
        root = name or LLAMA_GRAMMAR_DEFAULT_ROOT
        document = _schema_dict(schema)
        _order_properties(document, self._prop_order)
        from pyllama.grammar.json_schema import json_schema_to_gbnf as convert

        self._grammar = convert(document, root=root)
        return root

    def format_grammar(self) -> str:
        """The GBNF text of the last :meth:`visit`."""
        if self._grammar is None:
            raise ValueError("nothing converted yet: call visit(schema, '') first")
        return self._grammar


# ----------------------------------------------------------------------------- example grammars

# whitespace is constrained to a single space char to prevent model "running away" in
# whitespace (llama-cpp-python's converter rule; pyllama's grammars use WHITESPACE_RULE).
SPACE_RULE = '" "?'

# llama.cpp gbnf rules from vendor/llama.cpp/grammars, as llama-cpp-python 0.3.36 has them.

ARITHMETIC_GBNF = r"""
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"""

C_GBNF = r"""
root ::= (declaration)*

declaration ::= dataType identifier "(" parameter? ")" "{" statement* "}"

dataType  ::= "int" ws | "float" ws | "char" ws
identifier ::= [a-zA-Z_] [a-zA-Z_0-9]*

parameter ::= dataType identifier

statement ::=
    ( dataType identifier ws "=" ws expression ";" ) |
    ( identifier ws "=" ws expression ";" ) |
    ( identifier ws "(" argList? ")" ";" ) |
    ( "return" ws expression ";" ) |
    ( "while" "(" condition ")" "{" statement* "}" ) |
    ( "for" "(" forInit ";" ws condition ";" ws forUpdate ")" "{" statement* "}" ) |
    ( "if" "(" condition ")" "{" statement* "}" ("else" "{" statement* "}")? ) |
    ( singleLineComment ) |
    ( multiLineComment )

forInit ::= dataType identifier ws "=" ws expression | identifier ws "=" ws expression
forUpdate ::= identifier ws "=" ws expression

condition ::= expression relationOperator expression
relationOperator ::= ("<=" | "<" | "==" | "!=" | ">=" | ">")

expression ::= term (("+" | "-") term)*
term ::= factor(("*" | "/") factor)*

factor ::= identifier | number | unaryTerm | funcCall | parenExpression
unaryTerm ::= "-" factor
funcCall ::= identifier "(" argList? ")"
parenExpression ::= "(" ws expression ws ")"

argList ::= expression ("," ws expression)*

number ::= [0-9]+

singleLineComment ::= "//" [^\n]* "\n"
multiLineComment ::= "/*" ( [^*] | ("*" [^/]) )* "*/"

ws ::= ([ \t\n]+)
"""

CHESS_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]*)) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= ([ \t\n] ws)?
"""

# llama-cpp-python ships the same text under this name too (its japanese.gbnf example is not it).
JAPANESE_GBNF = CHESS_GBNF

JSON_ARR_GBNF = r"""
# This is the same as json.gbnf but we restrict whitespaces at the end of the root array
# Useful for generating JSON arrays

root   ::= arr
value  ::= object | array | string | number | ("true" | "false" | "null") ws

arr  ::=
  "[\n" ws (
            value
    (",\n" ws value)*
  )? "]"

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]*)) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= ([ \t\n] ws)?
"""


JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""

LIST_GBNF = r"""
root ::= item+

# Excludes various line break characters
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
"""
