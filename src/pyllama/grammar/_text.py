"""Writing GBNF text: literals, character classes, code-point ranges, JSON escapes, quantifiers.

Shared by :mod:`pyllama.grammar.regex` and :mod:`pyllama.grammar.json_schema`; private.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from pyllama.errors import JSONSchemaError

#: Whitespace allowed between JSON tokens in every grammar pyllama writes: nothing, one space,
#: or one newline followed by at most 20 spaces/tabs.  Bounded, so greedy decoding cannot spin
#: on whitespace forever.
WHITESPACE_RULE = 'ws ::= | " " | "\\n" [ \\t]{0,20}'

_HEX = frozenset("0123456789abcdefABCDEF")

#: How deeply JSON values given to pyllama as schemas, tool definitions or tool-call
#: arguments may nest (objects and arrays inside each other).  Deeper values would drive
#: Python's recursion (json, copy, the converters) into RecursionError; they are refused with
#: a ValueError instead.  A JSON schema nested as deeply as the converter allows
#: (:data:`pyllama.grammar.json_schema.MAX_SCHEMA_DEPTH` levels of properties) stays within it.
MAX_JSON_NESTING = 200


def json_nesting(value: object, limit: int = MAX_JSON_NESTING) -> int:
    """How deeply `value`'s dicts, lists and tuples nest (a scalar: 0), counted without
    recursion; the walk stops as soon as the depth passes `limit` and returns limit + 1."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if depth > limit:
            return limit + 1
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def _gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02X}")
        elif 0xD800 <= cp <= 0xDFFF:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _class_char(cp: int) -> str:
    """One code point inside a GBNF character class (ASCII-only output)."""
    if cp in (0x5D, 0x5C, 0x2D, 0x5B):  # ] \ - [
        return "\\" + chr(cp)
    if 0x20 <= cp < 0x7F and cp != 0x5E:  # ^ is only special first, escape it everywhere
        return chr(cp)
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def _gbnf_class(ranges: List[Tuple[int, int]], negated: bool = False) -> str:
    body = "".join(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}" for lo, hi in ranges)
    return f"[{'^' if negated else ''}{body}]"


_MAX_CP = 0x10FFFF
_Ranges = List[Tuple[int, int]]


def _normalize(ranges: _Ranges) -> _Ranges:
    out: _Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: _Ranges) -> _Ranges:
    out: _Ranges = []
    nxt = 0
    for lo, hi in _normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_CP:
        out.append((nxt, _MAX_CP))
    return out


def _subtract(ranges: _Ranges, remove: _Ranges) -> _Ranges:
    keep = _complement(remove)
    out: _Ranges = []
    for lo, hi in _normalize(ranges):
        for klo, khi in keep:
            a, b = max(lo, klo), min(hi, khi)
            if a <= b:
                out.append((a, b))
    return _normalize(out)


def _contains(ranges: _Ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


# Characters a JSON string cannot hold literally.
_JSON_UNSAFE: _Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_JSON_SHORT_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x08: "\\b", 0x0C: "\\f"}


def _json_escaped(cp: int) -> str:
    """How code point `cp` is written inside a JSON string."""
    if cp in _JSON_SHORT_ESCAPES:
        return _JSON_SHORT_ESCAPES[cp]
    if cp < 0x20 or cp == 0x7F:
        return f"\\u{cp:04x}"
    return chr(cp)


def _quantifier(lo: int, hi: Optional[int]) -> str:
    if (lo, hi) == (0, None):
        return "*"
    if (lo, hi) == (1, None):
        return "+"
    if (lo, hi) == (0, 1):
        return "?"
    if hi is None:
        return f"{{{lo},}}"
    if lo == hi:
        return f"{{{lo}}}"
    return f"{{{lo},{hi}}}"


def _schema_error(message: str, path: str, keyword: Optional[str] = None) -> JSONSchemaError:
    err = JSONSchemaError(f"{message} (at {path})")
    err.keyword = keyword  # type: ignore[attr-defined]
    err.path = path  # type: ignore[attr-defined]
    return err
