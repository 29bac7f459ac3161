"""transformers' own chat-template renderer, for tests that compare pyllama's.

`hf_render` compiles the template with ``transformers.utils.chat_template_utils`` — the
environment `apply_chat_template` itself uses (sandbox, trim/lstrip, filters, globals) —
so a test that compares against it compares against the real library, not a copy of its
settings.  (tests/test_chat_transformers.py goes further: tokenizers read from the GGUF
files, apply_chat_template end to end, token ids.)
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never the network, even by accident


def hf_render(source: str, messages, **kwargs) -> str:
    """Render `source` for `messages`; kwargs are the template's variables (bos_token, ...)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source).render(messages=messages, **kwargs)
