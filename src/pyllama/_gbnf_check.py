"""The GBNF pre-check: refuse grammars that would crash, hang or exhaust memory in llama.cpp.

``pyllama._core`` calls :func:`precheck_gbnf` before every grammar reaches llama.cpp's parser
(``SamplerChain.add_grammar``, ``validate_grammar``), so this module belongs to the core layer:
it imports nothing from pyllama but the exception classes.  :mod:`pyllama.grammar` re-exports
both functions.

* :func:`precheck_gbnf` -- GrammarError for GBNF text that llama.cpp cannot survive;
* :func:`gbnf_syntax_error` -- llama.cpp's syntax error for a text, as "line L, column C: reason".

Results are cached by text (a small LRU), so a grammar used for every request is parsed in
Python once, not once per request.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from threading import Lock
from typing import Callable, Dict, List, Optional, Tuple

from pyllama.errors import GrammarError

__all__ = ["precheck_gbnf", "precheck_cache_clear", "gbnf_syntax_error", "check_before_llama", "MAX_REPETITION"]

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
MAX_REPETITION = 2000           # llama.cpp's MAX_REPETITION_THRESHOLD
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
        return _stop_message(text, e)
    except GrammarError:
        return None
    if root not in scan.symbols:
        return f"the grammar has no rule named {root!r}"
    return None


def _stop_message(text: str, e: _SyntaxStop) -> str:
    if e.pos < 0:
        return e.message
    line = text.count("\n", 0, e.pos) + 1
    col = e.pos - (text.rfind("\n", 0, e.pos) + 1) + 1
    return f"line {line}, column {col}: {e.message}"


# Texts that passed the pre-check, by (text, n_vocab): the same grammar is usually checked for
# every request (LLM(grammar=...), complete(json_schema=...)), and checking is pure, so a pass
# is remembered.  Failures are not: they are rare, and the message is rebuilt each time.
_PASSED: "OrderedDict[Tuple[str, Optional[int]], None]" = OrderedDict()
_PASSED_LOCK = Lock()
_CACHE_ENTRIES = 64
_CACHE_MAX_CHARS = 1 << 20      # bigger grammars are checked every time rather than held


def precheck_cache_clear() -> None:
    """Forget which grammars passed :func:`precheck_gbnf` (for tests and measurements)."""
    with _PASSED_LOCK:
        _PASSED.clear()


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
    key = (text, n_vocab)
    if _passed_before(key):
        return
    _precheck(text, n_vocab)
    _remember_pass(key, text)


def check_before_llama(text: str, root: str = "root", *, n_vocab: Optional[int] = None,
                       token_count: Optional[Callable[[str], int]] = None) -> None:
    """What ``pyllama._core`` runs before llama.cpp's parser sees `text`: :func:`precheck_gbnf`,
    and llama.cpp's syntax errors raised here as ``GrammarError("invalid grammar: line L,
    column C: reason")``.  llama.cpp prints those to stderr, which we would otherwise have to
    capture by redirecting file descriptor 2 -- for every thread of the process.

    `token_count(text)`: how many tokens the model's vocabulary makes of `text` (special
    tokens parsed), for ``<token>`` references, which llama.cpp accepts only when they are
    exactly one token.  A grammar with such references is checked every time (the answer
    depends on the vocabulary, not only on the text)."""
    if not isinstance(text, str):
        raise TypeError(f"grammar must be GBNF text (str), not {type(text).__name__}")
    key = (text, n_vocab, root)
    if _passed_before(key):
        return
    scan = _GbnfScan(text, n_vocab, token_count)
    error = _precheck(text, n_vocab, root=root, scan=scan)
    if error is not None:
        raise GrammarError(f"invalid grammar: {error}")
    if not scan.token_texts:
        _remember_pass(key, text)


def _passed_before(key: tuple) -> bool:
    with _PASSED_LOCK:
        if key in _PASSED:
            _PASSED.move_to_end(key)
            return True
    return False


def _remember_pass(key: tuple, text: str) -> None:
    if len(text) <= _CACHE_MAX_CHARS:
        with _PASSED_LOCK:
            _PASSED[key] = None
            if len(_PASSED) > _CACHE_ENTRIES:
                _PASSED.popitem(last=False)


def _precheck(text: str, n_vocab: Optional[int], root: Optional[str] = None,
              scan: Optional["_GbnfScan"] = None) -> Optional[str]:
    """GrammarError for what llama.cpp cannot survive; otherwise llama.cpp's syntax error for
    `text` ("line L, column C: reason"), or None when it parses (and has `root`, if given)."""
    if "\0" in text:
        raise GrammarError(f"the grammar contains a NUL character (at index {text.index(chr(0))})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GrammarError(f"the grammar is not valid text: {e.reason} at index {e.start}") from None
    if not text.strip():
        raise GrammarError("the grammar is empty: llama.cpp would run unconstrained")
    if scan is None:
        scan = _GbnfScan(text, n_vocab)
    try:
        scan.parse()
    except _SyntaxStop as e:
        return _stop_message(text, e)
    scan.check_left_recursion()
    if root is not None and root not in scan.symbols:
        return f"the grammar has no rule named {root!r}"
    return None


class _GbnfScan:
    """Mirror of llama_grammar_parser: same symbol ids, same rewrite of repetitions, but a
    rule is stored as alternatives of symbols ('T', n_elements) / ('R', rule_id)."""

    def __init__(self, text: str, n_vocab: Optional[int],
                 token_count: Optional[Callable[[str], int]] = None) -> None:
        self.s = text + "\0"
        self.n_vocab = n_vocab
        self.token_count = token_count
        self.token_texts = 0           # <token> references seen (checked with token_count)
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
                if lo_times > MAX_REPETITION:
                    raise _SyntaxStop(f"number of repetitions exceeds {MAX_REPETITION}", start)
                if hi_times is not None and hi_times > MAX_REPETITION:
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
        self.token_texts += 1
        if self.token_count is not None:
            # llama.cpp tokenizes "<...>" itself (special tokens parsed) and refuses anything
            # but exactly one token -- with its message on stderr only.
            token_text = s[start:end + 1]
            if self.token_count(token_text) != 1:
                raise _SyntaxStop(f"invalid token '{token_text}' (a <...> reference must be exactly one "
                                  "token of this model's vocabulary)", start)
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
        if n_prev_rules * total_rules > MAX_REPETITION:
            raise _SyntaxStop(f"repeating this would create more than {MAX_REPETITION} rules", pos)
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

