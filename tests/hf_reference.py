"""An independent chat-template render with transformers' apply_chat_template settings.

The tests compare pyllama's chat formatting against this: same jinja2 sandbox, same
trim/lstrip rules, same extra filters and globals as transformers, none of pyllama's code.
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def hf_render(source: str, messages, **kwargs) -> str:
    """Render `source` for `messages`; kwargs are the template's variables (bos_token, ...)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source).render(messages=messages, **kwargs)
