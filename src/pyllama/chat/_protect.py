"""Special-token protection: message text that spells a control token stays text.

Only a template's own markup may become control tokens.  :func:`render_protected`
finds the strings in messages and tools that would tokenize to control tokens and
renders again with placeholders to locate them; :func:`_partition_tokens` then
tokenizes as llama.cpp does with ``parse_special=True``, except inside those spans.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pyllama.chat._sandbox import ChatTemplateError
from pyllama.chat.messages import _max_nesting

if TYPE_CHECKING:  # pragma: no cover
    from pyllama.chat.formatter import ChatFormatter

logger = logging.getLogger("pyllama")

# llama_token_attr bits (llama.h)
_ATTR_UNKNOWN = 1 << 0
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4
_ATTR_LSTRIP = 1 << 7
_ATTR_RSTRIP = 1 << 8
#: Tokens that only parse_special=True turns text into (llama.cpp skips them otherwise).
_GATED = _ATTR_CONTROL | _ATTR_UNKNOWN
#: The whitespace llama.cpp's lstrip/rstrip token attributes strip (C isspace).
_C_SPACE = " \t\n\v\f\r"


class _VocabSpecials:
    """What llama.cpp's special-token pre-pass of tokenization knows about a vocabulary:
    its "special" tokens (control, user-defined, unknown), longest text first."""

    __slots__ = ("specials", "gated_ids", "first_chars", "prefix", "suffix")

    def __init__(self, vocab: Any) -> None:
        specials: list[tuple[str, int, int]] = []
        for tid in range(vocab.n_tokens):
            attr = vocab.token_attr(tid)
            if attr & (_GATED | _ATTR_USER_DEFINED):
                text = vocab.token_text(tid)
                if text:
                    specials.append((text, tid, attr))
        # llama.cpp sorts by text length, longest first (std::sort; ties in id order here).
        specials.sort(key=lambda s: -len(s[0].encode("utf-8")))
        self.specials = specials
        self.gated_ids = frozenset(tid for _, tid, attr in specials if attr & _GATED)
        self.first_chars = frozenset(text[0] for text, _, attr in specials if attr & _GATED)
        # What add_special=True puts around the tokens (BOS, EOS, CLS/SEP...).
        plain = vocab.tokenize("a", add_special=False, parse_special=False)
        full = vocab.tokenize("a", add_special=True, parse_special=False)
        at = _find_sub(full, plain)
        if at < 0:  # cannot tell: use the BOS/EOS flags
            self.prefix = [vocab.bos] if vocab.add_bos and vocab.bos >= 0 else []
            self.suffix = [vocab.eos] if vocab.add_eos and vocab.eos >= 0 else []
        else:
            self.prefix = full[:at]
            self.suffix = full[at + len(plain):]

    def gated_in(self, text: str, vocab: Any) -> list[str]:
        """The texts of the control/unknown tokens that tokenizing `text` with
        parse_special=True would produce (empty for almost every text)."""
        if not self.first_chars or not any(c in text for c in self.first_chars):
            return []
        toks = vocab.tokenize(text, add_special=False, parse_special=True)
        gated = self.gated_ids
        return sorted({vocab.token_text(t) for t in toks if t in gated}, key=len, reverse=True)


def _find_sub(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i:i + n] == sub:
            return i
    return -1


def render_protected(fmt: ChatFormatter, messages: Sequence[Mapping[str, Any]], vocab: Any, *, tools: Any,
                     allow_special_in_messages: bool, **kwargs: Any) -> tuple[str, list, bool, Any]:
    """(text, protected spans, add_special, vocab specials): the rendering, and the spans
    of it that come from the data and spell control tokens (empty: tokenize it whole
    with parse_special=True)."""
    kwargs = dict(tools=tools, **kwargs)
    prompt, add_special = fmt.render_for_tokenize(messages, **kwargs)
    if allow_special_in_messages:
        return prompt, [], add_special, None

    info = fmt._vocab_specials(vocab)
    found: dict[str, list[str]] = {}  # tainted string -> control texts in it
    strings: list[str] = []
    _strings_in(list(messages), strings)
    if tools is not None:
        _strings_in(list(tools), strings)
    for text in set(strings):
        gated = info.gated_in(text, vocab)
        if gated:
            found[text] = gated
    if not found:
        return prompt, [], add_special, info

    # Render again with each control-token text inside the data replaced by a
    # placeholder, so that the template's own markup and the data's look-alikes
    # can be told apart; then put the texts back as protected (plain) spans.
    opening, closing = _pick_markers(prompt, fmt.template or "", *strings)
    originals: list[str] = []
    index: dict[str, int] = {}
    patterns = {text: re.compile("|".join(map(re.escape, gated))) for text, gated in found.items()}

    def placeholder(m: re.Match[str]) -> str:
        s = m.group(0)
        if s not in index:
            index[s] = len(originals)
            originals.append(s)
        return f"{opening}{index[s]}{closing}"

    def neutralize(text: str) -> str:
        rx = patterns.get(text)
        return text if rx is None else rx.sub(placeholder, text)

    neutral_msgs = _map_strings(list(messages), neutralize)
    neutral_tools = None if tools is None else _map_strings(list(tools), neutralize)
    neutral = fmt.render(neutral_msgs, **{**kwargs, "tools": neutral_tools})

    marker = re.compile(re.escape(opening) + r"(\d+)" + re.escape(closing))
    pieces: list[str] = []
    protected: list[tuple[int, int]] = []
    pos = last = 0
    for m in marker.finditer(neutral):
        k = int(m.group(1))
        if k >= len(originals):
            continue  # not ours (cannot happen: the markers occur nowhere else)
        pieces.append(neutral[last:m.start()])
        pos += m.start() - last
        pieces.append(originals[k])
        protected.append((pos, pos + len(originals[k])))
        pos += len(originals[k])
        last = m.end()
    pieces.append(neutral[last:])
    restored = "".join(pieces)
    if restored != prompt:
        # The template treated the placeholders differently from the texts (it
        # searched, sliced or split the content): use what it made of the
        # placeholders, which holds no control text from the data.
        logger.debug("chat: the template renders control-token look-alikes in messages differently; "
                     "tokenizing its rendering with placeholders (texts kept as plain text)")
        add_special = fmt.add_special_for(restored)
    return restored, protected, add_special, info


def _strings_in(obj: Any, out: list[str]) -> None:
    """Every str inside messages / tools (dict values, list items), at any depth."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


def _map_strings(obj: Any, fn: Any, depth: int = 0) -> Any:
    # Recursive, but the data was checked by _check_nesting (render) before it gets here.
    if isinstance(obj, str):
        return fn(obj)
    if depth > _max_nesting() + 2:
        raise ValueError("messages nest too deeply")
    if isinstance(obj, Mapping):
        return {k: _map_strings(v, fn, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_strings(v, fn, depth + 1) for v in obj)
    return obj


def _pick_markers(*texts: str) -> tuple[str, str]:
    """Two private-use characters that occur in none of `texts`."""
    for base in range(0xF0000, 0xF0000 + 4096, 2):
        opening, closing = chr(base), chr(base + 1)
        if not any(opening in t or closing in t for t in texts):
            return opening, closing
    raise ChatTemplateError("cannot render: the conversation uses thousands of private-use characters")


def _partition_tokens(text: str, protected: list[tuple[int, int]], info: _VocabSpecials, vocab: Any,
                      add_special: bool) -> list[int]:
    """Tokenize `text` as llama.cpp does with parse_special=True, except that no control or
    unknown token may be matched where it overlaps a `protected` span (text from a message):
    llama.cpp's special-token pre-pass (tokenizer_st_partition, longest token text first,
    with the tokens' lstrip/rstrip), then each plain-text fragment tokenized on its own
    with parse_special=False, exactly as llama.cpp tokenizes the fragments between
    special tokens."""
    tokens: list[int] = list(info.prefix) if add_special else []
    for frag in _partition_frags(text, protected, info):
        if isinstance(frag, int):
            tokens.append(frag)
        else:
            tokens.extend(vocab.tokenize(text[frag[0]:frag[1]], add_special=False, parse_special=False))
    if add_special:
        tokens.extend(info.suffix)
    return tokens


def _partition_frags(text: str, protected: list[tuple[int, int]], info: _VocabSpecials) -> list[Any]:
    """_partition_tokens' pre-pass: `text` as control token ids (ints) and (start, end)
    fragments of plain text, in order."""
    starts = [s for s, _ in protected]
    ends = [e for _, e in protected]

    def overlaps(a: int, b: int) -> bool:
        # protected spans are sorted and disjoint
        i = bisect.bisect_left(ends, a + 1)
        return i < len(starts) and starts[i] < b

    frags: list[Any] = [(0, len(text))]
    for tok_text, tid, attr in info.specials:
        if tok_text not in text:
            continue
        gated = bool(attr & _GATED)
        new: list[Any] = []
        for frag in frags:
            if isinstance(frag, int):
                new.append(frag)
                continue
            cur, end = frag
            pos = cur
            while True:
                m = text.find(tok_text, pos, end)
                if m < 0:
                    break
                stop = m + len(tok_text)
                if gated and protected and overlaps(m, stop):
                    pos = m + 1
                    continue
                left = m
                if attr & _ATTR_LSTRIP:
                    while left > cur and text[left - 1] in _C_SPACE:
                        left -= 1
                if left > cur:
                    new.append((cur, left))
                new.append(tid)
                if attr & _ATTR_RSTRIP:
                    while stop < end and text[stop] in _C_SPACE:
                        stop += 1
                cur = pos = stop
            if cur < end:
                new.append((cur, end))
        frags = new
    return frags
