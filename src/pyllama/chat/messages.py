"""Message normalisation: check a conversation and copy it into the shape templates expect.

:func:`normalize_messages` validates roles and contents (strings or typed parts);
:func:`_check_nesting` bounds how deeply messages, tools and template variables nest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _flatten_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate a conversation; returns a new list of (shallow-copied) dicts.

    Each message is a mapping with a ``role`` (str) and a ``content`` that is a
    str, or a list of parts such as ``{"type": "text", "text": "..."}``
    (``content`` may be None for an assistant message, e.g. one carrying
    ``tool_calls``).  Other keys (``name``, ``tool_calls``, ...) are kept for
    the template.  Raises TypeError for a wrong type, ValueError for a wrong
    value, with the offending message's index in the text.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, not {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a chat needs at least one message")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content', not {type(msg).__name__}"
            )
        if "role" not in msg:
            raise ValueError(f"messages[{i}] has no 'role'")
        role = msg["role"]
        if not isinstance(role, str):
            raise TypeError(f"messages[{i}]['role'] must be a str, not {type(role).__name__}")
        if not role:
            raise ValueError(f"messages[{i}]['role'] is empty")
        if "content" not in msg:
            raise ValueError(f"messages[{i}] ({role!r}) has no 'content'")
        content = msg["content"]
        if content is None:
            if role != "assistant":
                raise TypeError(f"messages[{i}]['content'] is None (only an assistant message may omit content)")
        elif isinstance(content, str):
            pass
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}]['content'][{j}]"
                if not isinstance(part, Mapping):
                    raise TypeError(f"{where} must be a dict like {{'type': 'text', 'text': ...}}, "
                                    f"not {type(part).__name__}")
                ptype = part.get("type")
                if not isinstance(ptype, str):
                    raise ValueError(f"{where} needs a 'type' (str), e.g. 'text'")
                if ptype == "text":
                    if not isinstance(part.get("text"), str):
                        raise TypeError(f"{where} is a text part; its 'text' must be a str")
                parts.append(dict(part))
            content = parts
        else:
            raise TypeError(
                f"messages[{i}]['content'] must be a str or a list of parts, not {type(content).__name__}"
            )
        new = dict(msg)
        new["content"] = content
        out.append(new)
    return out


def _has_non_text_parts(messages: list[dict[str, Any]]) -> bool:
    return any(
        isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"]) for m in messages
    )


# How deeply messages, tools and other template variables may nest (objects and lists inside
# each other): a tool's parameters may nest pyllama's JSON limit deep, plus the few levels of
# the tool list around them.  Deeper data is a ValueError before rendering, so that neither
# the template (tojson) nor the walks of _protect.py (which neutralise control-token text at
# any depth) can run into Python's recursion limit.
def _max_nesting() -> int:
    from pyllama.grammar._text import MAX_JSON_NESTING

    return MAX_JSON_NESTING + 8


def _check_nesting(value: Any, what: str) -> None:
    from pyllama.grammar._text import json_nesting

    limit = _max_nesting()
    if json_nesting(value, limit) > limit:
        raise ValueError(f"{what} nests objects/lists more than {limit} levels deep (pyllama's limit)")
