"""Reading tool calls out of generated text: Hermes ``<tool_call>`` blocks, Mistral's
``[TOOL_CALLS]``, Llama 3.x's ``<|python_tag|>`` and JSON calls anywhere in the text, into
OpenAI-shaped calls (:func:`parse_tool_calls`).  Never raises on model output.

pyllama.tools re-exports everything public here; import it from there.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

def new_call_id() -> str:
    """A fresh tool call id, ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def make_tool_call(name: str, arguments: Any, id: Optional[str] = None) -> Dict[str, Any]:
    """An OpenAI-shaped tool call: ``{"id", "type": "function", "function": {"name", "arguments"}}``
    with the arguments as a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


class ParsedToolCalls(NamedTuple):
    """What :func:`parse_tool_calls` found: the text outside tool calls (None when there is
    none) and the calls (OpenAI-shaped; empty when there are none)."""

    content: Optional[str]
    tool_calls: List[Dict[str, Any]]


_CALL_KEYS = frozenset(("name", "arguments", "parameters", "id", "type", "function"))


def _call_from(obj: Any, names: Sequence[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(name, arguments) when `obj` is a call of one of the tools, else None."""
    if not isinstance(obj, dict) or not set(obj) <= _CALL_KEYS:
        return None   # e.g. a tool's description echoed back ({"name", "description", "parameters"})
    if isinstance(obj.get("function"), dict) and "name" not in obj:   # {"type": "function", "function": {...}}
        obj = obj["function"]
        if not set(obj) <= _CALL_KEYS:
            return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj:
        args = obj["parameters"]
    else:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    from pyllama.grammar._text import MAX_JSON_NESTING, json_nesting

    if json_nesting(args) > MAX_JSON_NESTING:
        return None   # could not be written back as JSON (and no tool schema nests this deep)
    try:
        json.dumps(args, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return None   # a lone surrogate (a "\\ud800" escape): not text any client could receive
    return name, args


def _calls_from(value: Any, names: Sequence[str]) -> Optional[List[Tuple[str, Dict[str, Any]]]]:
    """The calls in a JSON value (one call, or a list of calls); None unless all are calls."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = [_call_from(v, names) for v in items]
    if any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


_DECODER = json.JSONDecoder()
_FENCE_RE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.S)


def _loads_lenient(text: str) -> Any:
    """JSON from `text` (whitespace and a ``` fence allowed around it); raises ValueError
    (also for JSON nested too deeply for Python's parser)."""
    s = text.strip()
    m = _FENCE_RE.match(s)
    if m:
        s = m.group(1)
    try:
        return json.loads(s)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _decode_at(text: str, pos: int) -> Tuple[Any, int]:
    """The JSON value starting at text[pos] (after whitespace) and where it ends; ValueError
    (also for JSON nested too deeply for Python's parser)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        return _DECODER.raw_decode(text, pos)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"
_FENCE_OPEN_RE = re.compile(r"\s*```[A-Za-z]*")
_FENCE_CLOSE_RE = re.compile(r"\s*```")
_SPACE_RE = re.compile(r"\s*")


def _hermes_block(text: str, pos: int) -> Tuple[Any, int]:
    """The JSON value of a ``<tool_call>`` block whose tag ends at `pos`, and where the block
    ends (after ``</tool_call>``, or at the end of a text cut off after the JSON).  The JSON
    is decoded from its start, so a ``</tool_call>`` inside an argument string is just text.
    ValueError when the block holds anything but one JSON value (a ``` fence allowed)."""
    fence = _FENCE_OPEN_RE.match(text, pos)
    if fence:
        pos = fence.end()
    value, pos = _decode_at(text, pos)
    if fence:
        close = _FENCE_CLOSE_RE.match(text, pos)
        if not close:
            raise ValueError("unclosed ``` fence in a <tool_call> block")
        pos = close.end()
    pos = _SPACE_RE.match(text, pos).end()
    if text.startswith(_HERMES_CLOSE, pos):
        return value, pos + len(_HERMES_CLOSE)
    if pos == len(text):
        return value, pos
    raise ValueError("text after the JSON of a <tool_call> block")


_MISTRAL_RE = re.compile(r"\[TOOL_CALLS\]")
_PYTHON_TAG_RE = re.compile(r"<\|python_tag\|>")
_INLINE_RE = re.compile(r"\[\s*\{\s*\"name\"\s*:|\{\s*\"(?:name|type|function)\"\s*:")
_EMPTY_FENCE_RE = re.compile(r"```[A-Za-z]*\s*```")


def parse_tool_calls(text: str, tools: Sequence[Any]) -> ParsedToolCalls:
    """Find tool calls in generated `text`.

    Formats, in this order: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks
    (Hermes, Qwen), ``[TOOL_CALLS][{...}, ...]`` (Mistral), ``<|python_tag|>{...}`` (Llama 3.x),
    then JSON objects ``{"name": ..., "arguments"|"parameters": ...}`` (or lists of them) anywhere
    in the text (Llama 3.x's JSON calls, the generic format, optionally in a ``` fence).  Only
    calls that name one of `tools` (tool dicts or names) count, and their arguments must be a JSON
    object (or a string holding one).  Returns the text outside the calls (stripped; None when
    empty) and the calls, OpenAI-shaped with fresh ids.

    Never raises on model output and never drops text: output with no call (JSON nested too
    deeply for Python's parser included) comes back whole as content.  A ``<tool_call>``
    block's JSON is decoded from its start, so ``</tool_call>`` inside an argument string
    does not end the block.
    """
    names = [t if isinstance(t, str) else t["function"]["name"] for t in tools]
    spans: List[Tuple[int, int]] = []
    found: List[Tuple[int, str, Dict[str, Any]]] = []

    def take(start: int, end: int, calls: Optional[List[Tuple[str, Dict[str, Any]]]]) -> bool:
        if not calls or any(s < end and start < e for s, e in spans):
            return False
        spans.append((start, end))
        found.extend((start, n, a) for n, a in calls)
        return True

    start = text.find(_HERMES_OPEN)
    while start >= 0:
        try:
            value, end = _hermes_block(text, start + len(_HERMES_OPEN))
            take(start, end, _calls_from(value, names))
        except ValueError:
            pass
        start = text.find(_HERMES_OPEN, start + 1)
    for regex in (_MISTRAL_RE, _PYTHON_TAG_RE):
        for m in regex.finditer(text):
            pos, calls = m.end(), []
            try:
                while True:   # one value, or several separated by ';' (python tag)
                    value, pos = _decode_at(text, pos)
                    got = _calls_from(value, names)
                    if got is None:
                        break
                    calls.extend(got)
                    nxt = pos
                    while nxt < len(text) and text[nxt].isspace():
                        nxt += 1
                    if nxt < len(text) and text[nxt] == ";":
                        pos = nxt + 1
                        continue
                    break
            except ValueError:
                pass
            take(m.start(), pos, calls or None)
    if not found:
        try:
            calls = _calls_from(_loads_lenient(text), names)
        except ValueError:
            calls = None
        if calls:
            return ParsedToolCalls(None, [make_tool_call(n, a) for n, a in calls])
    for m in _INLINE_RE.finditer(text):
        if any(s <= m.start() < e for s, e in spans):
            continue
        try:
            value, end = _decode_at(text, m.start())
        except ValueError:
            continue
        take(m.start(), end, _calls_from(value, names))
    if not found:
        content = text.strip()
        return ParsedToolCalls(content or None, [])
    spans.sort()
    parts, pos = [], 0
    for s, e in spans:
        parts.append(text[pos:s])
        pos = e
    parts.append(text[pos:])
    content = _EMPTY_FENCE_RE.sub("", "".join(parts)).strip()
    found.sort(key=lambda f: f[0])
    return ParsedToolCalls(content or None, [make_tool_call(n, a) for _, n, a in found])
