"""GBNF grammars: shipped grammar files, loading, JSON Schema conversion, and a safety pre-check.

* :func:`grammar_path` -- the file path of a grammar shipped with pyllama (``"json"``, ``"list"``).
* :func:`load_grammar` -- GBNF text from exactly one of: a string, a file, a JSON schema.
* :func:`json_schema_to_gbnf` -- a JSON Schema (dict, JSON text, or pydantic model class) as GBNF.
* :func:`precheck_gbnf` -- reject grammars that would crash or hang llama.cpp's grammar parser.

Final validation is llama.cpp's own parser (``pyllama._core.validate_grammar``); nothing here
tries to reproduce its error messages.  :func:`precheck_gbnf` exists only because some inputs
make that parser overflow the C stack, allocate without bound, or run for minutes, and those
cannot be caught once they are in C.  See docs/grammars.md.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import unquote

from pyllama.errors import GrammarError, JSONSchemaError

__all__ = [
    "available_grammars",
    "grammar_path",
    "load_grammar",
    "json_schema_to_gbnf",
    "precheck_gbnf",
    "gbnf_syntax_error",
    "WHITESPACE_RULE",
]

_GRAMMAR_DIR = Path(__file__).resolve().parent / "grammars"

#: Whitespace allowed between JSON tokens in every grammar pyllama writes: nothing, one space,
#: or one newline followed by at most 20 spaces/tabs.  Bounded, so greedy decoding cannot spin
#: on whitespace forever.
WHITESPACE_RULE = 'ws ::= | " " | "\\n" [ \\t]{0,20}'


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


# ----------------------------------------------------------------------------- GBNF pre-check
#
# llama.cpp's grammar parser (src/llama-grammar.cpp) reports most errors cleanly, but:
#   * parse_alternates/parse_sequence recurse once per nested "(": deep nesting overflows the
#     C stack (segfault; ~15k levels on an 8 MiB stack, ~1k on a 512 KiB thread stack);
#   * llama_grammar_detect_left_recursion recurses along chains of leftmost rule references
#     (segfault for ~60k+ chained rules) and, having no memo, walks every leftmost path: a
#     grammar with many alternatives sharing leftmost rules takes exponential time; the initial
#     stacks built by llama_grammar_advance_stack blow up the same way;
#   * "x{m,n}" with n < m makes handle_repetitions loop ~2**64 times (unbounded memory);
#   * repeating a long literal or class up to 2000 times multiplies its size (memory bomb);
#   * "<[id]>" with an id outside the vocabulary, and a class like [z-a], can never match, so
#     generation dead-ends (llama.cpp aborts if a token is then forced through the grammar);
#   * an empty grammar string makes llama.cpp build an unconstrained sampler, and a NUL byte
#     truncates the grammar silently.
# The pre-check parses the text the way llama.cpp does (same symbol numbering, same rewrite of
# repetitions) to measure those things, and stops quietly at the first syntax error: llama.cpp
# will report that one itself, and it never gets past it.

_MAX_GROUP_NESTING = 256        # "(" depth; each level costs ~0.5 KiB of C stack
_MAX_LEFT_CHAIN = 2000          # leftmost rule-reference chain; ~0.15 KiB of C stack per link
_MAX_LEFT_PATHS = 20000         # leftmost derivation paths from one rule (exponential blowup)
_MAX_LEFT_STACKS = 10000        # parse stacks one rule can start (llama.cpp's work is quadratic in them)
_MAX_ELEMENTS = 4_000_000       # llama_grammar_element entries after expanding repetitions
_MAX_REPETITION = 2000          # llama.cpp's MAX_REPETITION_THRESHOLD
_UINT64_MAX = 2**64 - 1

_NAME_RE = re.compile(r"[a-zA-Z0-9-]+")
_INT_RE = re.compile(r"[0-9]+")
_SPACE_NL_RE = re.compile(r"(?:[ \t\r\n]+|#[^\r\n\0]*)*")
_SPACE_RE = re.compile(r"(?:[ \t]+|#[^\r\n\0]*)*")
_LITERAL_RUN_RE = re.compile(r'[^"\\\0]*')
_HEX = frozenset("0123456789abcdefABCDEF")


class _SyntaxStop(Exception):
    """llama.cpp will reject the text here with its own message; nothing more to check."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos


def _undefined_rule_message(scan: "_GbnfScan") -> str:
    names = {v: k for k, v in scan.symbols.items()}
    referenced = {value for alts in scan.rules.values() for alt in alts for kind, value in alt if kind == "R"}
    missing = sorted(names[i] for i in referenced | set(range(max(scan.rules) + 1))
                     if i not in scan.rules and i in names)
    return "undefined rule " + ", ".join(repr(m) for m in missing) if missing else "undefined rule"


def gbnf_syntax_error(text: str, root: str = "root") -> Optional[str]:
    """Where and why llama.cpp's parser rejects `text`, as "line L, column C: reason", or None
    when it finds no syntax error (and the grammar has a rule named `root`).

    llama.cpp prints its parse errors to stderr rather than returning them, so this repeats the
    parse in Python to give the user a useful message (the wording is close to llama.cpp's,
    not identical).
    """
    if not isinstance(text, str) or "\0" in text:
        return None
    scan = _GbnfScan(text, None)
    try:
        scan.parse()
    except _SyntaxStop as e:
        if e.pos < 0:
            return e.message
        line = text.count("\n", 0, e.pos) + 1
        col = e.pos - (text.rfind("\n", 0, e.pos) + 1) + 1
        return f"line {line}, column {col}: {e.message}"
    except GrammarError:
        return None
    if root not in scan.symbols:
        return f"the grammar has no rule named {root!r}"
    return None


def precheck_gbnf(text: str, *, n_vocab: Optional[int] = None) -> None:
    """Raise GrammarError for GBNF text that would crash, hang or exhaust memory in llama.cpp.

    This is not a validator: syntax errors are left to llama.cpp's parser
    (``pyllama._core.validate_grammar``), which reports them cleanly.  Rejected here:

    * empty or whitespace-only text, NUL characters, text that is not valid Unicode;
    * groups nested more than 256 deep;
    * ``x{m,n}`` with ``n < m``;
    * more than 4 million grammar elements after expanding repetitions;
    * left recursion, and chains of more than 2000 leftmost rule references;
    * more than 20000 leftmost expansion paths from one rule (exponential work in llama.cpp);
    * a rule that can start more than 10000 parse stacks, such as 10000 alternatives in one
      rule (llama.cpp deduplicates its stacks pairwise: quadratic time, minutes at 100000);
    * character ranges with the bounds reversed, such as ``[z-a]``;
    * ``<[id]>`` token references with ``id >= n_vocab`` (when ``n_vocab`` is given).
    """
    if not isinstance(text, str):
        raise TypeError(f"grammar must be GBNF text (str), not {type(text).__name__}")
    if "\0" in text:
        raise GrammarError(f"the grammar contains a NUL character (at index {text.index(chr(0))})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GrammarError(f"the grammar is not valid text: {e.reason} at index {e.start}") from None
    if not text.strip():
        raise GrammarError("the grammar is empty: llama.cpp would run unconstrained")
    scan = _GbnfScan(text, n_vocab)
    try:
        scan.parse()
    except _SyntaxStop:
        return
    scan.check_left_recursion()


class _GbnfScan:
    """Mirror of llama_grammar_parser: same symbol ids, same rewrite of repetitions, but a
    rule is stored as alternatives of symbols ('T', n_elements) / ('R', rule_id)."""

    def __init__(self, text: str, n_vocab: Optional[int]) -> None:
        self.s = text + "\0"
        self.n_vocab = n_vocab
        self.symbols: Dict[str, int] = {}
        self.rules: Dict[int, List[List[Tuple[str, int]]]] = {}
        self.depth = 0
        self.n_elements = 0

    # -- helpers -------------------------------------------------------------------------

    def fail(self, pos: int, what: str) -> None:
        line = self.s.count("\n", 0, pos) + 1
        col = pos - (self.s.rfind("\n", 0, pos) + 1) + 1
        raise GrammarError(f"grammar rejected before reaching llama.cpp (line {line}, column {col}): {what}")

    def add_elements(self, n: int, pos: int) -> None:
        self.n_elements += n
        if self.n_elements > _MAX_ELEMENTS:
            self.fail(pos, f"the grammar expands to more than {_MAX_ELEMENTS} elements "
                           "(repetitions of long literals or classes); simplify it")

    def symbol_id(self, name: str) -> int:
        return self.symbols.setdefault(name, len(self.symbols))

    def generate_symbol_id(self, base: str) -> int:
        next_id = len(self.symbols)
        self.symbols[f"{base}_{next_id}"] = next_id  # may overwrite, as llama.cpp does
        return next_id

    def space(self, pos: int, newline_ok: bool) -> int:
        return (_SPACE_NL_RE if newline_ok else _SPACE_RE).match(self.s, pos).end()

    def parse_char(self, pos: int) -> Tuple[int, int]:
        s = self.s
        c = s[pos]
        if c == "\\":
            e = s[pos + 1]
            size = {"x": 2, "u": 4, "U": 8}.get(e)
            if size is not None:
                digits = s[pos + 2:pos + 2 + size]
                if len(digits) != size or not all(d in _HEX for d in digits):
                    raise _SyntaxStop(f"expecting {size} hex chars", pos + 2)
                return int(digits, 16), pos + 2 + size
            if e in "trn":
                return ord({"t": "\t", "r": "\r", "n": "\n"}[e]), pos + 2
            if e in '\\"[]-':
                return ord(e), pos + 2
            raise _SyntaxStop("unknown escape", pos)
        if c == "\0":
            raise _SyntaxStop("unexpected end of input", pos)
        return ord(c), pos + 1

    # -- the grammar -----------------------------------------------------------------------

    def parse(self) -> None:
        pos = self.space(0, True)
        while self.s[pos] != "\0":
            pos = self.parse_rule(pos)
        if not self.rules:
            raise _SyntaxStop("no rules (only comments)", -1)
        size = max(self.rules) + 1
        if len(self.rules) != size:
            raise _SyntaxStop(_undefined_rule_message(self), -1)
        named = set(self.symbols.values())
        for alts in self.rules.values():
            for alt in alts:
                for kind, value in alt:
                    if kind == "R" and value not in self.rules:
                        if value in named:
                            raise _SyntaxStop(_undefined_rule_message(self), -1)
                        # llama.cpp's check finds no name for the id and lets it through, then
                        # indexes past its rule table.
                        self.fail(0, f"a reference to rule #{value}, which llama.cpp could not resolve")

    def parse_rule(self, pos: int) -> int:
        m = _NAME_RE.match(self.s, pos)
        if not m:
            raise _SyntaxStop("expecting name", pos)
        name = m.group()
        pos = self.space(m.end(), False)
        rule_id = self.symbol_id(name)
        if self.s[pos:pos + 3] != "::=":
            raise _SyntaxStop("expecting ::=", pos)
        pos = self.space(pos + 3, True)
        pos = self.parse_alternates(pos, name, rule_id, False)
        c = self.s[pos]
        if c == "\r":
            pos += 2 if self.s[pos + 1] == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c != "\0":
            raise _SyntaxStop("expecting newline or end", pos)
        return self.space(pos, True)

    def parse_alternates(self, pos: int, rule_name: str, rule_id: int, nested: bool) -> int:
        alts: List[List[Tuple[str, int]]] = [[]]
        pos = self.parse_sequence(pos, rule_name, alts[-1], nested)
        while self.s[pos] == "|":
            alts.append([])
            pos = self.space(pos + 1, True)
            pos = self.parse_sequence(pos, rule_name, alts[-1], nested)
        self.add_elements(len(alts), pos)  # ALT separators + END
        self.rules[rule_id] = alts
        return pos

    def parse_sequence(self, pos: int, rule_name: str, alt: List[Tuple[str, int]], nested: bool) -> int:
        s = self.s
        last_sym_start = len(alt)
        n_prev_rules = 1
        while True:
            c = s[pos]
            start = pos
            if c == '"':
                pos += 1
                last_sym_start = len(alt)
                n_prev_rules = 1
                n = 0
                while True:
                    run = _LITERAL_RUN_RE.match(s, pos).end()
                    n += run - pos
                    pos = run
                    if s[pos] == '"':
                        break
                    if s[pos] == "\0":
                        raise _SyntaxStop("unexpected end of input (unclosed string literal)", start)
                    _, pos = self.parse_char(pos)
                    n += 1
                if n:
                    alt.append(("T", n))
                    self.add_elements(n, start)
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                if s[pos] == "^":
                    pos += 1
                last_sym_start = len(alt)
                n_prev_rules = 1
                n = 0
                while s[pos] != "]":
                    if s[pos] == "\0":
                        raise _SyntaxStop("unexpected end of input (unclosed character class)", start)
                    lo, pos = self.parse_char(pos)
                    n += 1
                    if s[pos] == "-" and s[pos + 1] != "]":
                        if s[pos + 1] == "\0":
                            raise _SyntaxStop("unexpected end of input", pos)
                        hi, pos = self.parse_char(pos + 1)
                        n += 1
                        if hi < lo:
                            self.fail(start, f"character range {_cp_repr(lo)}-{_cp_repr(hi)} has its bounds "
                                             "reversed and matches nothing")
                if n:
                    alt.append(("T", n))
                    self.add_elements(n, start)
                pos = self.space(pos + 1, nested)
            elif c == "<" or c == "!":
                negated = c == "!"
                if negated:
                    pos += 1
                pos = self.parse_token(pos, negated)
                last_sym_start = len(alt)
                n_prev_rules = 1
                alt.append(("T", 1))
                self.add_elements(1, start)
                pos = self.space(pos, nested)
            elif _NAME_RE.match(c):
                m = _NAME_RE.match(s, pos)
                ref = self.symbol_id(m.group())
                pos = self.space(m.end(), nested)
                last_sym_start = len(alt)
                n_prev_rules = 1
                alt.append(("R", ref))
                self.add_elements(1, start)
            elif c == "(":
                pos = self.space(pos + 1, True)
                n_before = len(self.symbols)
                sub_id = self.generate_symbol_id(rule_name)
                self.depth += 1
                if self.depth > _MAX_GROUP_NESTING:
                    self.fail(start, f"groups nested more than {_MAX_GROUP_NESTING} deep "
                                     "(llama.cpp's recursive parser would overflow the stack)")
                pos = self.parse_alternates(pos, rule_name, sub_id, True)
                self.depth -= 1
                n_prev_rules = max(1, len(self.symbols) - n_before)
                last_sym_start = len(alt)
                alt.append(("R", sub_id))
                self.add_elements(1, start)
                if s[pos] != ")":
                    raise _SyntaxStop("expecting ')'", pos)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last_sym_start = len(alt)
                n_prev_rules = 1
                alt.append(("T", 1))
                self.add_elements(1, start)
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                pos = self.space(pos + 1, nested)
                lo_times, hi_times = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                n_prev_rules = self.repeat(alt, last_sym_start, n_prev_rules, rule_name,
                                           lo_times, hi_times, start)
            elif c == "{":
                pos = self.space(pos + 1, nested)
                m = _INT_RE.match(s, pos)
                if not m:
                    raise _SyntaxStop("expecting an int", pos)
                lo_times = int(m.group())
                if lo_times > _UINT64_MAX:
                    raise _SyntaxStop("repetition count out of range", pos)
                pos = self.space(m.end(), nested)
                hi_times: Optional[int] = None
                if s[pos] == "}":
                    hi_times = lo_times
                    pos = self.space(pos + 1, nested)
                elif s[pos] == ",":
                    pos = self.space(pos + 1, nested)
                    m = _INT_RE.match(s, pos)
                    if m:
                        hi_times = int(m.group())
                        if hi_times > _UINT64_MAX:
                            raise _SyntaxStop("repetition count out of range", pos)
                        pos = self.space(m.end(), nested)
                    if s[pos] != "}":
                        raise _SyntaxStop("expecting '}'", pos)
                    pos = self.space(pos + 1, nested)
                else:
                    raise _SyntaxStop("expecting ','", pos)
                if lo_times > _MAX_REPETITION:
                    raise _SyntaxStop(f"number of repetitions exceeds {_MAX_REPETITION}", start)
                if hi_times is not None and hi_times > _MAX_REPETITION:
                    hi_times = None  # llama.cpp silently makes it unbounded
                n_prev_rules = self.repeat(alt, last_sym_start, n_prev_rules, rule_name,
                                           lo_times, hi_times, start)
            else:
                return pos

    def parse_token(self, pos: int, negated: bool) -> int:
        s = self.s
        start = pos
        if s[pos] != "<":
            raise _SyntaxStop("expecting '<'", pos)
        pos += 1
        if s[pos] == "[":
            m = _INT_RE.match(s, pos + 1)
            if not m:
                raise _SyntaxStop("expecting integer", pos + 1)
            token_id = int(m.group())
            if token_id > 0xFFFFFFFF:
                raise _SyntaxStop("parsed token id is too big", pos)
            pos = m.end()
            if s[pos] != "]" or s[pos + 1] != ">":
                raise _SyntaxStop("expecting ']>'", pos)
            if self.n_vocab is not None and not negated and token_id >= self.n_vocab:
                self.fail(start, f"token <[{token_id}]> is outside the vocabulary (n_vocab={self.n_vocab}) "
                                 "and can never match")
            return pos + 2
        end = s.find(">", pos)
        if end < 0 or "\0" in s[pos:end]:
            raise _SyntaxStop("expecting '>'", start)
        return end + 1

    def repeat(self, alt: List[Tuple[str, int]], last_sym_start: int, n_prev_rules: int, rule_name: str,
               min_times: int, max_times: Optional[int], pos: int) -> int:
        if last_sym_start == len(alt):
            raise _SyntaxStop("expecting preceding item to */+/?/{", pos)
        prev = alt[last_sym_start:]
        no_max = max_times is None
        if not no_max and max_times > 0:
            total_rules = max_times
        elif min_times > 0:
            total_rules = min_times
        else:
            total_rules = 1
        if n_prev_rules * total_rules > _MAX_REPETITION:
            raise _SyntaxStop(f"repeating this would create more than {_MAX_REPETITION} rules", pos)
        if not no_max and max_times < min_times:
            self.fail(pos, f"repetition {{{min_times},{max_times}}} has its maximum below its minimum "
                           "(llama.cpp would allocate without bound)")
        prev_elements = sum(n if kind == "T" else 1 for kind, n in prev)
        n_opt = 1 if no_max else max_times - min_times
        self.add_elements(prev_elements * max(min_times - 1, 0) + n_opt * (prev_elements + 3), pos)
        if min_times == 0:
            del alt[last_sym_start:]
        else:
            alt.extend(prev * (min_times - 1))
        last_rec_rule_id = 0
        for i in range(n_opt):
            rec_rule_id = self.generate_symbol_id(rule_name)
            rec = list(prev)
            if i > 0 or no_max:
                rec.append(("R", rec_rule_id if no_max else last_rec_rule_id))
            self.rules[rec_rule_id] = [rec, []]
            last_rec_rule_id = rec_rule_id
        if n_opt > 0:
            alt.append(("R", last_rec_rule_id))
        return n_prev_rules * total_rules

    # -- llama_grammar_detect_left_recursion, measured -----------------------------------

    def check_left_recursion(self) -> None:
        n = max(self.rules) + 1
        may_be_empty = [any(not alt for alt in self.rules[i]) for i in range(n)]
        # Leftmost references, one entry per occurrence (llama.cpp recurses once per occurrence),
        # and per rule the alternatives whose leftmost walk stops at a terminal or at the end.
        edges: List[List[int]] = []
        ends = [0] * n
        for i in range(n):
            out: List[int] = []
            for alt in self.rules[i]:
                for kind, value in alt:
                    if kind != "R":
                        ends[i] += 1
                        break
                    out.append(value)
                    if not may_be_empty[value]:
                        break
                else:
                    ends[i] += 1
            edges.append(out)
        names = {v: k for k, v in self.symbols.items()}

        # Iterative DFS: cycle detection, then longest chain and path counts in reverse postorder.
        state = [0] * n  # 0 new, 1 on stack, 2 done
        order: List[int] = []
        for root in range(n):
            if state[root]:
                continue
            stack = [(root, 0)]
            state[root] = 1
            while stack:
                node, k = stack[-1]
                if k < len(edges[node]):
                    stack[-1] = (node, k + 1)
                    nxt = edges[node][k]
                    if state[nxt] == 1:
                        raise GrammarError(
                            f"grammar rejected before reaching llama.cpp: left recursion through rule "
                            f"{names.get(nxt, nxt)!r} (llama.cpp's parser is top-down and cannot use it)")
                    if state[nxt] == 0:
                        state[nxt] = 1
                        stack.append((nxt, 0))
                else:
                    state[node] = 2
                    order.append(node)
                    stack.pop()
        # Per rule: the longest leftmost chain (C stack depth), the leftmost expansion paths
        # (exponential work) and the parse stacks it starts -- llama_grammar_advance_stack makes
        # one per leftmost terminal it reaches or way to derive the empty string, and checks
        # each new stack against all the others with std::find (quadratic work).
        depth = [1] * n
        paths = [1] * n
        stacks = [1] * n
        for node in order:  # children come before parents
            if edges[node]:
                depth[node] = 1 + max(depth[t] for t in edges[node])
                paths[node] = min(_MAX_LEFT_PATHS + 1, 1 + sum(paths[t] for t in edges[node]))
            stacks[node] = min(_MAX_LEFT_STACKS + 1, ends[node] + sum(stacks[t] for t in edges[node]))
        for measure, limit, what in (
            (depth, _MAX_LEFT_CHAIN, "starts a chain of {n} leftmost rule references (limit {limit}); llama.cpp's "
                                     "recursive check would overflow the stack"),
            (paths, _MAX_LEFT_PATHS, "has more than {limit} leftmost expansion paths (alternatives that share "
                                     "leftmost rules); llama.cpp would take exponential time on it"),
            (stacks, _MAX_LEFT_STACKS, "can start more than {limit} parse stacks (alternatives, counted through "
                                       "leftmost rule references); llama.cpp's time grows with the square of that "
                                       "number - split the rule or use fewer alternatives"),
        ):
            worst = max(range(n), key=measure.__getitem__)
            if measure[worst] > limit:
                raise GrammarError(f"grammar rejected before reaching llama.cpp: rule {names.get(worst, worst)!r} "
                                   + what.format(n=measure[worst], limit=limit))

def _cp_repr(cp: int) -> str:
    return repr(chr(cp)) if 0x20 < cp < 0x7F else f"U+{cp:04X}"


# ----------------------------------------------------------------------------- GBNF text helpers


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


# ----------------------------------------------------------------------------- regex -> GBNF

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
        self.p = pattern
        self.i = 0
        self.path = path

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
            alts = self.alternatives(top=False)
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
    def __init__(self, conv: "_SchemaConverter", path: str) -> None:
        self.conv = conv
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


# ----------------------------------------------------------------------------- JSON Schema -> GBNF

# Keywords with no effect on the generated text.
_ANNOTATIONS = frozenset({
    "$schema", "$id", "$comment", "$anchor", "$vocabulary", "title", "description", "default",
    "examples", "example", "deprecated", "readOnly", "writeOnly", "contentEncoding",
    "contentMediaType", "contentSchema", "discriminator", "$defs", "definitions", "xml",
    "externalDocs",
})
# Keywords we cannot turn into a grammar; they raise JSONSchemaError.
_UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "patternProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "uniqueItems", "multipleOf", "contains", "minContains", "maxContains",
    "propertyNames", "unevaluatedProperties", "unevaluatedItems", "minProperties",
    "maxProperties", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor",
})
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems"})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_DATE = (r"[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         r"|02-(0[1-9]|1[0-9]|2[0-8]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
}

_FRACTION = '("." [0-9]{1,16})?'
_EXPONENT = '([eE] [-+]? [0-9]{1,3})?'

# Building blocks, added to a grammar only when used.  {name} is replaced by the rule names
# chosen for the named dependencies (they may get suffixes when the schema uses the same names).
_PRIMITIVES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "ws": ('| " " | "\\n" [ \\t]{0,20}', ()),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" {char}* "\\""', ("char",)),
    "integer": ('"-"? ("0" | [1-9] [0-9]{0,15})', ()),
    "number": ('"-"? ("0" | [1-9] [0-9]{0,15}) ' + _FRACTION + " " + _EXPONENT, ()),
    "key-char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ["\\\\bfnrt]', ()),
    "boolean": ('"true" | "false"', ()),
    "null": ('"null"', ()),
    "value": ('{object} | {array} | {string} | {number} | {boolean} | {null}',
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" {ws} ({string} {ws} ":" {ws} {value} {ws} ("," {ws} {string} {ws} ":" {ws} {value} {ws})*)? "}"',
               ("ws", "string", "value")),
    "array": ('"[" {ws} ({value} {ws} ("," {ws} {value} {ws})*)? "]"', ("ws", "value")),
}

_RULE_NAME_RE = re.compile(r"^[a-zA-Z0-9-]+$")
_MAX_SCHEMA_DEPTH = 200


def _schema_error(message: str, path: str, keyword: Optional[str] = None) -> JSONSchemaError:
    err = JSONSchemaError(f"{message} (at {path})")
    err.keyword = keyword  # type: ignore[attr-defined]
    err.path = path  # type: ignore[attr-defined]
    return err


def _json_pointer_escape(token: str) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def _child(path: str, *tokens: Any) -> str:
    return path + "".join("/" + _json_pointer_escape(str(t)) for t in tokens)


def _json_text(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _as_int_bound(value: Any, name: str, path: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise _schema_error(f"{name} must be a finite number, got {value!r}", path, name)
    return value


class _SchemaConverter:
    def __init__(self, document: Any, root: str) -> None:
        self.doc = document
        self.root = root
        self.rules: Dict[str, Optional[str]] = {}
        self.used = {root}
        self.ref_rules: Dict[str, str] = {}
        self.prims: Dict[str, str] = {}
        self.depth = 0

    # -- names and rules -----------------------------------------------------------------

    def new_name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-") or "rule"
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}-{k}", k + 1
        self.used.add(name)
        return name

    def prim(self, key: str) -> str:
        if key not in self.prims:
            name = self.new_name(key)
            self.prims[key] = name
            self.rules[name] = None
            body, deps = _PRIMITIVES[key]
            names = {d: self.prim(d) for d in deps}
            self.rules[name] = re.sub(r"\{([a-z]+)\}", lambda m: names.get(m.group(1), m.group(0)), body)
        return self.prims[key]

    def format_rule(self, key: str, pattern: str, path: str) -> str:
        """Rule for a supported string format (a JSON string matching `pattern`)."""
        pkey = "format-" + key
        if pkey not in self.prims:
            name = self.new_name(key)
            self.prims[pkey] = name
            self.rules[name] = self.pattern_string(pattern, path)
        return self.prims[pkey]

    def named(self, hint: str, body: str) -> str:
        name = self.new_name(hint)
        self.rules[name] = body
        return name

    def grammar(self, schema: Any) -> str:
        body = self.visit(schema, "#", self.root, inline=True)
        lines = [f"{self.root} ::= {body}"]
        lines += [f"{name} ::= {rule}" for name, rule in self.rules.items()]
        return "\n".join(lines) + "\n"

    # -- $ref ------------------------------------------------------------------------------

    def resolve(self, ref: Any, path: str) -> Tuple[Any, str]:
        if not isinstance(ref, str):
            raise _schema_error(f"$ref must be a string, got {ref!r}", path, "$ref")
        if not ref.startswith("#"):
            raise _schema_error(f"remote $ref {ref!r} is not supported (only local refs like '#/$defs/Name')",
                                path, "$ref")
        if ref != "#" and not ref.startswith("#/"):
            raise _schema_error(f"$ref {ref!r} to an anchor is not supported (use a JSON pointer like "
                                "'#/$defs/Name')", path, "$ref")
        node = self.doc
        for raw in ref[2:].split("/") if ref != "#" else []:
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _schema_error(f"$ref {ref!r} does not resolve in this schema", path, "$ref")
        return node, ref

    def ref_rule(self, ref: str, path: str) -> str:
        target, target_path = self.resolve(ref, path)
        if ref in self.ref_rules:
            return self.ref_rules[ref]
        hint = target_path.rsplit("/", 1)[-1] if target_path != "#" else "root-ref"
        name = self.new_name(unquote(hint))
        self.ref_rules[ref] = name
        self.rules[name] = None  # placeholder keeps the order; recursion finds the name
        self.rules[name] = self.visit(target, target_path, name, inline=True)
        return name

    def deref(self, schema: Any, path: str) -> Any:
        """A schema with its top-level $ref (and allOf) merged in."""
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema:
            seen += 1
            if seen > 50:
                raise _schema_error("$ref chain too long or circular", path, "$ref")
            target, _ = self.resolve(schema["$ref"], path)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = self.merge([target, rest], path) if _meaningful(rest) else target
        return schema

    # -- allOf / merging -------------------------------------------------------------------

    def merge(self, schemas: List[Any], path: str) -> Dict[str, Any]:
        self.depth += 1
        try:
            if self.depth > _MAX_SCHEMA_DEPTH:
                raise _schema_error("allOf/$ref merging nested too deeply (a $ref cycle?)", path, "allOf")
            return self._merge(schemas, path)
        finally:
            self.depth -= 1

    def _merge(self, schemas: List[Any], path: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for i, sub in enumerate(schemas):
            sub = self.deref(sub, path)
            if sub is True:
                continue
            if sub is False:
                raise _schema_error("allOf contains `false`, which no value satisfies", path, "allOf")
            if not isinstance(sub, dict):
                raise _schema_error(f"expected a schema object, got {type(sub).__name__}", path)
            self.check_keywords(sub, path)
            if "allOf" in sub:
                rest = {k: v for k, v in sub.items() if k != "allOf"}
                sub = self.merge([rest] + list(sub["allOf"]), _child(path, "allOf"))
            for key, value in sub.items():
                if key in _ANNOTATIONS:
                    continue
                if key not in out:
                    out[key] = value
                    continue
                out[key] = self.merge_keyword(key, out[key], value, path)
        return out

    def merge_keyword(self, key: str, a: Any, b: Any, path: str) -> Any:
        if a == b:
            return a
        if key == "properties":
            merged = dict(a)
            for name, sub in b.items():
                merged[name] = sub if name not in merged else {"allOf": [merged[name], sub]}
            return merged
        if key == "required":
            return list(dict.fromkeys(list(a) + list(b)))
        if key == "type":
            ta = set([a] if isinstance(a, str) else a)
            tb = set([b] if isinstance(b, str) else b)
            both = ta & tb
            if "integer" in (ta | tb) and "number" in (ta | tb):
                if ("integer" in ta and "number" in tb) or ("number" in ta and "integer" in tb):
                    both.add("integer")
            if not both:
                raise _schema_error(f"allOf combines incompatible types {a!r} and {b!r}", path, "type")
            return [t for t in _TYPES if t in both]
        if key in ("minimum", "minLength", "minItems"):
            return max(a, b)
        if key in ("maximum", "maxLength", "maxItems"):
            return min(a, b)
        if key == "additionalProperties":
            if a is False or b is False:
                return False
            if a is True:
                return b
            if b is True:
                return a
            return {"allOf": [a, b]}
        if key in ("items", "additionalItems"):
            return {"allOf": [a, b]}
        if key == "enum":
            keep = [v for v in a if any(_json_text(v) == _json_text(w) for w in b)]
            if not keep:
                raise _schema_error("allOf combines enums with no value in common", path, "enum")
            return keep
        raise _schema_error(f"cannot merge different values of {key!r} in allOf", path, "allOf")

    # -- the schema walk -------------------------------------------------------------------

    def check_keywords(self, schema: Dict[str, Any], path: str) -> None:
        for key in schema:
            if key in _UNSUPPORTED:
                if key == "uniqueItems" and schema[key] is False:
                    continue
                raise _schema_error(f"unsupported JSON Schema keyword {key!r}: pyllama cannot express it as "
                                    "a grammar", path, key)

    def visit(self, schema: Any, path: str, hint: str, inline: bool = False) -> str:
        """GBNF expression for `schema`; `inline` means the caller makes it a rule body."""
        self.depth += 1
        try:
            if self.depth > _MAX_SCHEMA_DEPTH:
                raise _schema_error("schema nested too deeply (or a $ref cycle through allOf/siblings)", path)
            return self._visit(schema, path, hint, inline)
        finally:
            self.depth -= 1

    def _visit(self, schema: Any, path: str, hint: str, inline: bool) -> str:
        if schema is True:
            return self.prim("value")
        if schema is False:
            raise _schema_error("the schema is `false`, which no value satisfies", path)
        if not isinstance(schema, dict):
            raise _schema_error(f"expected a schema object, got {type(schema).__name__} {schema!r}", path)
        self.check_keywords(schema, path)
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            if not _meaningful(rest):
                return self.ref_rule(schema["$ref"], path)
            return self.visit(self.deref(schema, path), path, hint, inline)
        if "allOf" in schema:
            if not isinstance(schema["allOf"], list) or not schema["allOf"]:
                raise _schema_error("allOf must be a non-empty list", path, "allOf")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.visit(self.merge([rest] + schema["allOf"], path), path, hint, inline)
        if "anyOf" in schema or "oneOf" in schema:
            if "anyOf" in schema and "oneOf" in schema:
                raise _schema_error("anyOf together with oneOf in one schema is not supported", path, "oneOf")
            key = "anyOf" if "anyOf" in schema else "oneOf"
            branches = schema[key]
            if not isinstance(branches, list) or not branches:
                raise _schema_error(f"{key} must be a non-empty list", path, key)
            rest = {k: v for k, v in schema.items() if k != key}
            alts = []
            for i, branch in enumerate(branches):
                if _meaningful(rest):
                    branch = self.merge([rest, branch], _child(path, key, i))
                alts.append(self.visit(branch, _child(path, key, i), hint))
            return _alternatives(alts, inline)
        if "const" in schema:
            return _gbnf_literal(_json_text(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise _schema_error("enum must be a non-empty list", path, "enum")
            return _alternatives([_gbnf_literal(_json_text(v)) for v in values], inline)

        types = schema.get("type")
        if types is None:
            keys = set(schema)
            if keys & _OBJECT_KEYWORDS:
                types = ["object"]
            elif keys & _ARRAY_KEYWORDS:
                types = ["array"]
            elif keys & _STRING_KEYWORDS or schema.get("format") in _FORMATS:
                types = ["string"]
            elif keys & _NUMBER_KEYWORDS:
                types = ["number"]
            else:
                return self.prim("value")
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types:
            raise _schema_error(f"type must be a type name or a non-empty list of them, got {types!r}", path, "type")
        types = list(dict.fromkeys(types))
        if schema.get("nullable") is True and "null" not in types:
            types.append("null")
        if "integer" in types and "number" in types:
            types.remove("integer")
        alts = [self.visit_type(t, schema, path, hint, inline and len(types) == 1) for t in types]
        return _alternatives(alts, inline)

    def visit_type(self, t: Any, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        if t == "null":
            return self.prim("null")
        if t == "boolean":
            return self.prim("boolean")
        if t == "integer":
            return self.integer(schema, path)
        if t == "number":
            return self.number(schema, path)
        if t == "string":
            return self.string(schema, path, hint, inline)
        if t == "object":
            return self.object(schema, path, hint, inline)
        if t == "array":
            return self.array(schema, path, hint, inline)
        raise _schema_error(f"unknown type {t!r} (expected one of {', '.join(_TYPES)})", path, "type")

    # -- strings -------------------------------------------------------------------------------

    def pattern_string(self, pattern: str, path: str) -> str:
        ast = _Regex(pattern, path).parse()
        text, _ = _RegexEmitter(self, path).alternatives(ast)
        return f'"\\"" {text} "\\""'

    def string(self, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        min_len = schema.get("minLength")
        max_len = schema.get("maxLength")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise _schema_error(f"pattern must be a string, got {pattern!r}", path, "pattern")
            if min_len is not None or max_len is not None:
                raise _schema_error("pattern together with minLength/maxLength is not supported; put the "
                                    "length into the pattern (e.g. '^[a-z]{1,10}$')", path, "pattern")
            body = self.pattern_string(pattern, _child(path, "pattern"))
            return body if inline else self.named(hint, body)
        if isinstance(fmt, str) and fmt in _FORMATS:
            return self.format_rule(fmt, _FORMATS[fmt], _child(path, "format"))
        for key, value in (("minLength", min_len), ("maxLength", max_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise _schema_error(f"{key} must be a non-negative integer, got {value!r}", path, key)
        if min_len is None and max_len is None:
            return self.prim("string")
        lo = min_len or 0
        if max_len is not None and max_len < lo:
            raise _schema_error(f"maxLength {max_len} is below minLength {lo}", path, "maxLength")
        if lo > _MAX_REPETITION:
            raise _schema_error(f"minLength {lo} is above {_MAX_REPETITION}, the most a llama.cpp grammar can "
                                "repeat", path, "minLength")
        hi = max_len if max_len is not None and max_len <= _MAX_REPETITION else None
        return f'"\\"" {self.prim("char")}{_quantifier(lo, hi)} "\\""'

    # -- numbers -------------------------------------------------------------------------------

    def bounds(self, schema: Dict[str, Any], path: str) -> Tuple[Optional[float], bool, Optional[float], bool]:
        lo = _as_int_bound(schema.get("minimum"), "minimum", path)
        hi = _as_int_bound(schema.get("maximum"), "maximum", path)
        lo_excl = hi_excl = False
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(xlo, bool):  # draft 4
            lo_excl = xlo and lo is not None
        elif xlo is not None:
            xlo = _as_int_bound(xlo, "exclusiveMinimum", path)
            if lo is None or xlo >= lo:
                lo, lo_excl = xlo, True
        if isinstance(xhi, bool):
            hi_excl = xhi and hi is not None
        elif xhi is not None:
            xhi = _as_int_bound(xhi, "exclusiveMaximum", path)
            if hi is None or xhi <= hi:
                hi, hi_excl = xhi, True
        return lo, lo_excl, hi, hi_excl

    def integer(self, schema: Dict[str, Any], path: str) -> str:
        lo, lo_excl, hi, hi_excl = self.bounds(schema, path)
        if lo is None and hi is None:
            return self.prim("integer")
        ilo = None if lo is None else (math.floor(lo) + 1 if lo_excl else math.ceil(lo))
        ihi = None if hi is None else (math.ceil(hi) - 1 if hi_excl else math.floor(hi))
        if ilo is not None and ihi is not None and ilo > ihi:
            raise _schema_error(f"no integer satisfies the bounds [{lo}, {hi}]", path, "minimum")
        alts = []
        if ihi is None or ihi >= 0:  # the non-negative part
            alts.append(_uint_range(max(ilo, 0) if ilo is not None else 0, ihi))
        if ilo is None or ilo < 0:  # the negative part, by magnitude
            mag_lo = max(1, -ihi) if ihi is not None else 1
            mag_hi = -ilo if ilo is not None else None
            alts.append(f'"-" {_paren(_uint_range(mag_lo, mag_hi))}')
        return _paren(" | ".join(alts)) if len(alts) > 1 else alts[0]

    def number(self, schema: Dict[str, Any], path: str) -> str:
        lo, lo_excl, hi, hi_excl = self.bounds(schema, path)
        if lo is None and hi is None:
            return self.prim("number")
        for name, v in (("minimum", lo), ("maximum", hi)):
            if v is not None and v != int(v):
                raise _schema_error(f"{name} {v!r} on a number: only whole-number bounds are supported for "
                                    "type number (integers may have any bounds)", path, name)
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_excl or hi_excl))):
            raise _schema_error(f"no number satisfies the bounds ({lo}, {hi})", path, "minimum")
        alts = []
        if hi is None or hi > 0 or (hi == 0 and not hi_excl):
            if lo is not None and lo >= 0:
                alts += _magnitude(lo, lo_excl, hi, hi_excl)
            else:
                alts += _magnitude(0, False, hi, hi_excl)
        if lo is None or lo < 0:
            if hi is not None and hi < 0:
                neg = _magnitude(-hi, hi_excl, None if lo is None else -lo, lo_excl)
            else:
                neg = _magnitude(0, True, None if lo is None else -lo, lo_excl)
            if neg:
                alts.append('"-" ' + _paren(" | ".join(neg)))
        if not alts:
            raise _schema_error(f"no number satisfies the bounds ({lo}, {hi})", path, "minimum")
        return _paren(" | ".join(alts)) if len(alts) > 1 else alts[0]

    # -- objects -------------------------------------------------------------------------------

    def object(self, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise _schema_error("properties must be an object", path, "properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _schema_error("required must be a list of property names", path, "required")
        additional = schema.get("additionalProperties")
        if additional is None:
            # pyllama's default: an object that declares properties gets no others; a bare
            # {"type": "object"} is a free-form object.
            additional = not props
        props = dict(props)
        for name in required:
            if name not in props:
                if additional is False:
                    raise _schema_error(f"property {name!r} is required but not allowed (not in properties "
                                        "and additionalProperties is false)", path, "required")
                props[name] = additional
        if not props and additional is True:
            return self.prim("object")
        ws = self.prim("ws")
        members = []
        names = list(props)
        for name, sub in props.items():
            value = self.visit(sub, _child(path, "properties", name), f"{hint}-{name}")
            members.append((f'{_gbnf_literal(_json_text(name))} {ws} ":" {ws} {value} {ws}', name in required))
        extra_first = extra_rest = ""
        if additional is not False:
            value = self.visit(additional, _child(path, "additionalProperties"), f"{hint}-additional")
            key = self.key_not_in(list(props), hint) if props else self.prim("string")
            kv = self.named(f"{hint}-additional-kv", f'{key} {ws} ":" {ws} {value} {ws}')
            extra_rest = f'("," {ws} {kv})*'
            extra_first = f"({kv} {extra_rest})?"
        # rest[i]: members i.. after something was written (each starts with ","),
        # first[i]: members i.. when nothing was written yet.  Linear size, unambiguous.
        rest, first = extra_rest, extra_first
        for i in range(len(members) - 1, -1, -1):
            kv, is_required = members[i]
            after = names[i + 1] if i + 1 < len(names) else "extra"
            # rest is used twice below and first nests once per optional member: long ones get
            # their own rules, so the text stays linear and the group nesting shallow.
            if len(rest) > 60:
                rest = self.named(f"{hint}-rest-{after}", rest)
            if is_required:
                rest, first = _join('","', ws, kv, rest), _join(kv, rest)
            else:
                if len(first) > 60:
                    first = self.named(f"{hint}-first-{after}", first)
                rest, first = (_join(f'("," {ws} {kv})?', rest),
                               f"({_join(kv, rest)} | {first})" if first else f"({_join(kv, rest)})?")
        body = _join('"{"', ws, first, '"}"')
        return body if inline else self.named(hint, body)

    def key_not_in(self, names: List[str], hint: str) -> str:
        """A JSON string that is none of `names`: extra keys must not repeat declared ones.
        Keys are written with the short escapes only (no \\u, no \\/), so each key has one
        spelling and a trie of the declared spellings is enough."""
        trie: Dict[Any, Any] = {}
        for name in names:
            node = trie
            for unit in re.findall(r"\\u[0-9a-fA-F]{4}|\\.|.", _json_text(name)[1:-1], re.S):
                node = node.setdefault(unit, {})
            node[None] = True
        key_char = self.prim("key-char")

        def build(node: Dict[Any, Any], label: str) -> str:
            alts = [] if None in node else [""]
            plain = [u for u in node if u is not None and len(u) == 1]
            escaped = [u[1] for u in node if u is not None and len(u) == 2]
            for unit, child in node.items():
                if unit is not None:
                    alts.append(f"{_gbnf_literal(unit)} {build(child, label + '-' + str(len(alts)))}")
            other = [_gbnf_class(_normalize(_JSON_UNSAFE + [(ord(u), ord(u)) for u in plain]), negated=True)]
            rest = [ch for ch in '"\\bfnrt' if ch not in escaped]
            if rest:
                other.append('"\\\\" ' + _gbnf_class(_normalize([(ord(ch), ord(ch)) for ch in rest])))
            alts.append(f"({' | '.join(other)}) {key_char}*")
            return self.named(label, " | ".join(a for a in alts) if alts[0] else "| " + " | ".join(alts[1:]))

        return f'"\\"" {build(trie, f"{hint}-other-key")} "\\""'

    # -- arrays -------------------------------------------------------------------------------

    def array(self, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuple form
            if prefix is not None:
                raise _schema_error("items as a list together with prefixItems", path, "items")
            prefix, items = items, schema.get("additionalItems")
        prefix = list(prefix or [])
        min_items = schema.get("minItems", 0)
        max_items = schema.get("maxItems")
        for key, value in (("minItems", min_items), ("maxItems", max_items)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise _schema_error(f"{key} must be a non-negative integer, got {value!r}", path, key)
        if items is False:
            max_items = len(prefix) if max_items is None else min(max_items, len(prefix))
        if max_items is not None and max_items < min_items:
            raise _schema_error(f"maxItems {max_items} is below minItems {min_items}"
                                + (" (items is false)" if items is False else ""), path, "maxItems")
        ws = self.prim("ws")
        n_prefix = len(prefix) if max_items is None else min(len(prefix), max_items)
        elems = [f"{self.visit(s, _child(path, 'prefixItems', i), f'{hint}-{i}')} {ws}" for i, s in enumerate(prefix[:n_prefix])]
        # The repeated part after the prefix.
        tail = ""
        rep_lo = max(0, min_items - n_prefix)
        rep_hi = None if max_items is None else max_items - n_prefix
        item = None
        if rep_hi != 0 and items is not False:
            item = f"{self.visit(True if items is None else items, _child(path, 'items'), f'{hint}-item')} {ws}"
        if item is not None:
            if rep_lo > _MAX_REPETITION:
                raise _schema_error(f"minItems {min_items} is above what a llama.cpp grammar can repeat", path,
                                    "minItems")
            hi = rep_hi if rep_hi is not None and rep_hi <= _MAX_REPETITION else None
            if not elems:
                # item ("," item){lo-1, hi-1}, optional when lo == 0
                more = f'("," {ws} {item}){_quantifier(max(rep_lo - 1, 0), None if hi is None else hi - 1)}' \
                    if hi != 1 else ""
                content = _join(item, more)
                body = _join('"["', ws, content if rep_lo >= 1 else f"({content})?", '"]"')
                return body if inline else self.named(hint, body)
            tail = f'("," {ws} {item}){_quantifier(rep_lo, hi)}'
        elif rep_lo > 0:
            raise _schema_error(f"minItems {min_items} cannot be met (items is false)", path, "minItems")
        # Positions 1..n of the prefix: the first `min_items` are required.
        rest = tail
        for i in range(len(elems) - 1, 0, -1):
            piece = _join('","', ws, elems[i], rest)
            rest = piece if i < min_items else f"({piece})?"
            if len(rest) > 60:
                rest = self.named(f"{hint}-from-{i}", rest)
        content = _join(elems[0], rest) if elems else ""
        if elems and min_items < 1:
            content = f"({content})?"
        body = _join('"["', ws, content, '"]"')
        return body if inline else self.named(hint, body)


def _meaningful(schema: Dict[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS for k in schema)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _paren(text: str) -> str:
    return f"({text})"


def _alternatives(alts: List[str], inline: bool) -> str:
    alts = list(dict.fromkeys(alts))
    if len(alts) == 1:
        return alts[0]
    text = " | ".join(alts)
    return text if inline else f"({text})"


def _digit_class(a: int, b: int) -> str:
    return f'"{a}"' if a == b else f"[{a}-{b}]"


def _same_length_range(a: str, b: str) -> str:
    """GBNF for the digit strings of length len(a) between a and b (inclusive, a <= b)."""
    if a == b:
        return f'"{a}"'
    n = len(a)
    if n == 1:
        return _digit_class(int(a), int(b))
    if a[0] == b[0]:
        return f'"{a[0]}" {_paren(_same_length_range(a[1:], b[1:]))}'
    x, y = int(a[0]), int(b[0])
    alts = []
    if a[1:] != "0" * (n - 1):
        alts.append(f'"{x}" {_paren(_same_length_range(a[1:], "9" * (n - 1)))}')
        x += 1
    last = None
    if b[1:] != "9" * (n - 1):
        last = f'"{y}" {_paren(_same_length_range("0" * (n - 1), b[1:]))}'
        y -= 1
    if x <= y:
        alts.append(f"{_digit_class(x, y)} [0-9]{{{n - 1}}}")
    if last:
        alts.append(last)
    return alts[0] if len(alts) == 1 else _paren(" | ".join(alts))


def _uint_range(lo: int, hi: Optional[int]) -> str:
    """GBNF for non-negative integers (no leading zeros) in [lo, hi]; hi None: up to 16 digits
    (or the length of lo, if longer)."""
    alts = []
    d_lo = len(str(lo))
    d_hi = len(str(hi)) if hi is not None else max(16, d_lo)
    for d in range(d_lo, d_hi + 1):
        a = max(lo, 10 ** (d - 1) if d > 1 else 0)
        b = (10 ** d - 1) if hi is None else min(hi, 10 ** d - 1)
        if a > b:
            continue
        if hi is None and a == 10 ** (d - 1) and d > 1:
            alts.append(f"[1-9] [0-9]{{{d - 1},{d_hi - 1}}}")
            break
        alts.append(_same_length_range(str(a), str(b)))
    return alts[0] if len(alts) == 1 else _paren(" | ".join(alts))


def _magnitude(c: int, c_excl: bool, d: Optional[int], d_excl: bool) -> List[str]:
    """Alternatives for decimal numbers x (no sign, no exponent) with c <(=) x <(=) d."""
    low_int = c + 1 if c_excl else c
    alts = []
    if d is None:
        alts.append(f"{_uint_range(low_int, None)} {_FRACTION}")
    else:
        if low_int <= d - 1:
            alts.append(f"{_uint_range(low_int, d - 1)} {_FRACTION}")
        if not d_excl and d >= low_int:
            alts.append(f'"{d}" ("." [0]{{1,16}})?')
    if c_excl and (d is None or c < d):
        alts.append(f'"{c}" "." [0-9]{{0,15}} [1-9]')
    return alts


def json_schema_to_gbnf(schema: Any, *, root: str = "root") -> str:
    """A GBNF grammar whose outputs are JSON documents valid under `schema`.

    `schema` is a dict, JSON text, or a pydantic model class (its ``model_json_schema()``).
    Objects that declare ``properties`` get no other properties unless
    ``additionalProperties`` says otherwise; optional properties may be left out and
    properties come in the declared order.  Whitespace between tokens is bounded (see
    :data:`WHITESPACE_RULE`).  Keywords pyllama cannot express raise JSONSchemaError naming
    the keyword and where it is; the supported subset is listed in docs/grammars.md.
    """
    if not isinstance(root, str) or not _RULE_NAME_RE.match(root):
        raise ValueError(f"root must be a GBNF rule name (letters, digits, '-'), got {root!r}")
    schema = _schema_document(schema)
    grammar = _SchemaConverter(schema, root).grammar(schema)
    try:
        precheck_gbnf(grammar)
    except JSONSchemaError:
        raise
    except GrammarError as e:
        raise JSONSchemaError(f"the schema produces a grammar llama.cpp cannot use: {e}") from None
    return grammar


def _schema_document(schema: Any) -> Any:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, (str, bytes)):
        try:
            return json.loads(schema)
        except ValueError as e:
            raise JSONSchemaError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, (dict, bool)):
        return schema
    if hasattr(schema, "model_json_schema"):  # a pydantic model instance
        return type(schema).model_json_schema()
    raise TypeError(f"json_schema must be a dict, JSON text or a pydantic model class, not {type(schema).__name__}")
