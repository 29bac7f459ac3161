"""Regular expressions -> GBNF, for JSON Schema's ``pattern`` keyword (and ``format``).

:func:`regex_to_gbnf` turns a practical subset of ECMA-262 patterns (literals, classes,
``\\d \\w \\s``, groups, ``|``, ``? * + {m,n}``, ``^``/``$`` at the ends) into GBNF that
produces the *JSON-encoded* form of the strings the pattern matches, without the quotes.
Anything else raises JSONSchemaError with ``keyword="pattern"``.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from pyllama._gbnf_check import MAX_REPETITION as _MAX_REPETITION
from pyllama.grammar._text import (_HEX, _JSON_SHORT_ESCAPES, _JSON_UNSAFE, _Ranges, _complement, _contains,
                                   _gbnf_class, _gbnf_literal, _json_escaped, _normalize, _quantifier,
                                   _schema_error, _subtract)

__all__ = ["regex_to_gbnf", "MAX_REGEX_NESTING"]

#: How deeply groups may nest in a pattern.  Parsing and writing the grammar recurse once per
#: group level; a deeper pattern is a JSONSchemaError (a ValueError), never a RecursionError.
MAX_REGEX_NESTING = 64


def regex_to_gbnf(pattern: str, path: str = "#") -> str:
    """GBNF (one expression, no rule) for the JSON-encoded strings matching `pattern`.

    `path` is the JSON pointer named in errors.  Raises JSONSchemaError (keyword "pattern")
    for syntax pyllama does not support.
    """
    text, _ = _RegexEmitter(path).alternatives(_Regex(pattern, path).parse())
    return text


_DIGIT: _Ranges = [(0x30, 0x39)]
_WORD: _Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: _Ranges = [(0x09, 0x0D), (0x20, 0x20)]
_NOT_NEWLINE: _Ranges = _complement([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)])
_SIMPLE_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "f": 0x0C, "v": 0x0B, "0": 0x00}
_QUANT_RE = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")


class _Regex:
    """A practical subset of ECMA-262 regular expressions, turned into GBNF that produces the
    JSON-encoded form of matching strings.  AST: alternatives = [sequence], sequence =
    [(node, min, max)], node = ("lit", cp) | ("set", ranges) | ("group", alternatives)."""

    def __init__(self, pattern: str, path: str) -> None:
        if not isinstance(pattern, str):
            raise _schema_error(f"pattern must be a string, got {type(pattern).__name__}", path, "pattern")
        self.p = pattern
        self.i = 0
        self.path = path
        self.depth = 0   # groups open at self.i

    def error(self, what: str) -> None:
        raise _schema_error(f"pattern {self.p!r}: {what} (at offset {self.i}); pyllama supports literals, "
                            "classes, \\d \\w \\s, groups, |, ?, *, +, {m,n} and ^/$ at the ends", self.path,
                            "pattern")

    def parse(self) -> List[list]:
        alts = self.alternatives(top=True)
        if self.i < len(self.p):
            self.error("unbalanced ')'")
        return alts

    def alternatives(self, top: bool) -> List[list]:
        alts = [self.sequence(top)]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            alts.append(self.sequence(top))
        return alts

    def sequence(self, top: bool) -> list:
        p = self.p
        seq: list = []
        while self.i < len(p) and p[self.i] not in "|)":
            c = p[self.i]
            if c == "^":
                if top and not seq:
                    self.i += 1
                    continue
                self.error("'^' is only supported at the start")
            if c == "$":
                if top and (self.i + 1 == len(p) or p[self.i + 1] == "|"):
                    self.i += 1
                    continue
                self.error("'$' is only supported at the end")
            node = self.atom()
            lo, hi = self.quantifier()
            seq.append((node, lo, hi))
        return seq

    def quantifier(self) -> Tuple[int, Optional[int]]:
        p = self.p
        if self.i >= len(p):
            return 1, 1
        c = p[self.i]
        if c in "*+?":
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        else:
            m = _QUANT_RE.match(p, self.i)
            if not m:
                return 1, 1
            self.i = m.end()
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if hi is not None and hi < lo:
                self.error(f"quantifier {m.group()} has its maximum below its minimum")
        if self.i < len(p) and p[self.i] == "?":
            self.i += 1  # lazy: same language
        elif self.i < len(p) and (p[self.i] in "*+" or (p[self.i] == "{" and _QUANT_RE.match(p, self.i))):
            self.error("repeated quantifier")
        return lo, hi

    def atom(self) -> tuple:
        p = self.p
        c = p[self.i]
        if c == "(":
            self.i += 1
            if p.startswith("?:", self.i):
                self.i += 2
            elif p.startswith("?P<", self.i) or (p.startswith("?<", self.i) and not p.startswith(("?<=", "?<!"), self.i)):
                end = p.find(">", self.i)
                if end < 0:
                    self.error("unterminated group name")
                self.i = end + 1
            elif p.startswith("?", self.i):
                self.error("lookarounds, inline flags and other '(?' constructs are not supported")
            if self.depth >= MAX_REGEX_NESTING:
                self.error(f"groups nested more than {MAX_REGEX_NESTING} levels deep (pyllama's limit)")
            self.depth += 1
            alts = self.alternatives(top=False)
            self.depth -= 1
            if self.i >= len(p) or p[self.i] != ")":
                self.error("missing ')'")
            self.i += 1
            return ("group", alts)
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return ("set", _NOT_NEWLINE)
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?" or (c == "{" and _QUANT_RE.match(p, self.i)):
            self.error("nothing to repeat")
        self.i += 1
        return ("lit", ord(c))

    def escape(self, in_class: bool) -> tuple:
        p = self.p
        self.i += 1
        if self.i >= len(p):
            self.error("trailing backslash")
        e = p[self.i]
        self.i += 1
        shorthand = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if e in shorthand:
            return ("set", shorthand[e])
        if e in "DWS":
            return ("set", _complement(shorthand[e.lower()]))
        if e == "b" and in_class:
            return ("lit", 0x08)
        if e in _SIMPLE_ESCAPES and not (e == "0" and self.i < len(p) and p[self.i].isdigit()):
            return ("lit", _SIMPLE_ESCAPES[e])
        if e in "xu":
            size = 2 if e == "x" else 4
            digits = p[self.i:self.i + size]
            if len(digits) == size and all(d in _HEX for d in digits):
                self.i += size
                return ("lit", int(digits, 16))
            self.error(f"bad \\{e} escape")
        if e.isalnum():
            what = {"b": "word boundaries", "B": "word boundaries", "p": "Unicode properties",
                    "P": "Unicode properties", "k": "named backreferences", "c": "control escapes"}
            self.error(f"\\{e} ({what.get(e, 'backreferences' if e.isdigit() else 'unknown escape')}) "
                       "is not supported")
        return ("lit", ord(e))

    def char_class(self) -> tuple:
        p = self.p
        self.i += 1
        negated = False
        if self.i < len(p) and p[self.i] == "^":
            negated = True
            self.i += 1
        ranges: _Ranges = []
        first = True
        while True:
            if self.i >= len(p):
                self.error("missing ']'")
            c = p[self.i]
            if c == "]":
                if first:
                    self.error("empty character class")
                self.i += 1
                break
            first = False
            if p.startswith("[:", self.i):
                self.error("POSIX classes like [:alpha:] are not supported")
            lo = self.class_atom()
            if (self.i + 1 < len(p) and p[self.i] == "-" and p[self.i + 1] != "]"):
                self.i += 1
                hi = self.class_atom()
                if lo[0] != "lit" or hi[0] != "lit":
                    self.error("a range bound cannot be a class like \\d")
                if hi[1] < lo[1]:
                    self.error("character range out of order")
                ranges.append((lo[1], hi[1]))
            elif lo[0] == "lit":
                ranges.append((lo[1], lo[1]))
            else:
                ranges.extend(lo[1])
        ranges = _normalize(ranges)
        return ("set", _complement(ranges) if negated else ranges)

    def class_atom(self) -> tuple:
        if self.p[self.i] == "\\":
            node = self.escape(in_class=True)
            if node[0] == "set" and node[1] is not _DIGIT and node[1] is not _WORD and node[1] is not _SPACE:
                self.error("negated shorthands (\\D \\W \\S) inside a class are not supported")
            return node
        c = self.p[self.i]
        self.i += 1
        return ("lit", ord(c))


class _RegexEmitter:
    """GBNF for a parsed pattern: the JSON-encoded text of the strings it matches."""

    def __init__(self, path: str) -> None:
        self.path = path

    def alternatives(self, alts: List[list]) -> Tuple[str, bool]:
        """(GBNF text, is a single symbol)"""
        parts = [self.sequence(seq) for seq in alts]
        if len(parts) == 1:
            return parts[0]
        return "(" + " | ".join(text for text, _ in parts) + ")", True

    def sequence(self, seq: list) -> Tuple[str, bool]:
        out: List[str] = []
        pending: List[str] = []
        for node, lo, hi in seq:
            if node[0] == "lit" and lo == 1 and hi == 1:
                pending.append(_json_escaped(node[1]))
                continue
            if pending:
                out.append(_gbnf_literal("".join(pending)))
                pending = []
            if hi == 0:
                continue
            text, atomic = self.node(node)
            if text == '""':
                continue  # an empty group, e.g. "()*"
            if (lo, hi) == (1, 1):
                out.append(text)
                continue
            if not atomic:
                text = f"({text})"
            if lo > _MAX_REPETITION:
                raise _schema_error(f"pattern repeats an item at least {lo} times; llama.cpp grammars allow "
                                    f"at most {_MAX_REPETITION}", self.path, "pattern")
            if hi is not None and hi > _MAX_REPETITION:
                hi = None  # llama.cpp treats larger bounds as unbounded; say so explicitly
            out.append(text + _quantifier(lo, hi))
        if pending:
            out.append(_gbnf_literal("".join(pending)))
        if not out:
            return '""', True
        return " ".join(out), len(out) == 1

    def node(self, node: tuple) -> Tuple[str, bool]:
        kind = node[0]
        if kind == "lit":
            return _gbnf_literal(_json_escaped(node[1])), True
        if kind == "group":
            return self.alternatives(node[1])
        return self.char_set(node[1])

    def char_set(self, ranges: _Ranges) -> Tuple[str, bool]:
        """GBNF for one JSON-encoded character from `ranges`."""
        ranges = _normalize(ranges)
        alts: List[str] = []
        plain = _subtract(ranges, _JSON_UNSAFE)
        if plain:
            comp = _complement(plain)
            # A negated class is shorter when the set is "everything but a few" ([^,] and such).
            alts.append(_gbnf_class(comp, negated=True) if len(comp) < len(plain) else _gbnf_class(plain))
        # Characters JSON must escape: the short escapes always; \u00XX forms only when the set
        # names a few of them on purpose (a negated class would otherwise offer ~25 of them).
        unsafe = [cp for lo, hi in _JSON_UNSAFE for cp in range(lo, hi + 1) if _contains(ranges, cp)]
        others = [cp for cp in unsafe if cp not in _JSON_SHORT_ESCAPES]
        for cp in unsafe:
            if cp in _JSON_SHORT_ESCAPES or len(others) <= 8:
                alts.append(_gbnf_literal(_json_escaped(cp)))
        if not alts:
            raise _schema_error("pattern has a character class with no character that can be written in JSON",
                                self.path, "pattern")
        if len(alts) == 1:
            return alts[0], True
        return "(" + " | ".join(alts) + ")", True

