"""Chat templates: turn a list of messages into one prompt string.

A GGUF model usually carries the Jinja chat template of its Hugging Face
tokenizer under ``tokenizer.chat_template``.  :class:`ChatFormatter` renders it
exactly the way ``transformers``' ``apply_chat_template`` does (same Jinja
environment, same globals and filters, same variables), so a prompt built here
is byte-for-byte the prompt the model was trained on.

When there is no usable Jinja template, llama.cpp's built-in templates take
over (``pyllama._core.apply_builtin_chat_template``), and ChatML is the last
resort.  See docs/chat.md for the selection order.

The BOS rule
------------
Many templates emit the BOS token's text themselves (``{{ bos_token }}``).
Tokenizing such a prompt with ``add_special=True`` would give the model *two*
BOS tokens.  Use :meth:`ChatFormatter.render_for_tokenize`, which returns the
prompt together with the ``add_special`` flag to tokenize it with, and always
tokenize chat prompts with ``parse_special=True`` (the prompt contains
special-token text such as ``<|im_start|>``)::

    prompt, add_special = fmt.render_for_tokenize(messages)
    tokens = vocab.tokenize(prompt, add_special=add_special, parse_special=True)

Better, :meth:`ChatFormatter.render_tokens` does both and treats messages as data:
control-token text inside a message stays text.  A template is untrusted code: it
renders in Jinja's sandbox within :class:`RenderLimits` (see docs/chat.md).

Modules, one job each: :mod:`~pyllama.chat.messages` (checking a conversation),
:mod:`~pyllama.chat.formatter` (choosing a template and rendering with it),
:mod:`~pyllama.chat._sandbox` (the guarded Jinja environment and the render budget),
:mod:`~pyllama.chat._protect` (keeping control-token text inside messages as text) and
:mod:`~pyllama.chat.reasoning` (a reasoning model's thinking apart from its answer).
"""

from pyllama.chat._sandbox import (
    DEFAULT_LIMITS,
    ChatTemplateError,
    ChatTemplateLimitError,
    RenderLimits,
    make_environment,
)
from pyllama.chat.formatter import (
    DEFAULT_BUILTIN,
    ChatFormatter,
    TokenizeInput,
    builtin_template_names,
    formatter_for_model,
    guess_builtin_template,
)
from pyllama.chat.messages import normalize_messages

# make_environment and DEFAULT_BUILTIN stay importable from here (as from the old chat.py),
# outside __all__ as before.

__all__ = [
    "ChatTemplateError",
    "ChatTemplateLimitError",
    "ChatFormatter",
    "RenderLimits",
    "DEFAULT_LIMITS",
    "TokenizeInput",
    "formatter_for_model",
    "guess_builtin_template",
    "builtin_template_names",
    "normalize_messages",
]
