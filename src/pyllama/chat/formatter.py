"""The chat formatter: pick a chat template and render conversations with it.

:class:`ChatFormatter` renders a Jinja template (in :mod:`pyllama.chat._sandbox`), or one
of llama.cpp's built-in templates, falling back as docs/chat.md describes;
:func:`formatter_for_model` and :func:`guess_builtin_template` choose the template for a
loaded model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import jinja2

from pyllama.chat._protect import _partition_frags, _partition_tokens, _VocabSpecials, render_protected
from pyllama.chat._sandbox import (
    DEFAULT_LIMITS,
    ChatTemplateError,
    ChatTemplateLimitError,
    RenderLimits,
    _Compiled,
    _compile,
)
from pyllama.chat.messages import _check_nesting, _flatten_content, _has_non_text_parts, normalize_messages

if TYPE_CHECKING:  # pragma: no cover
    from pyllama._core import Model

logger = logging.getLogger("pyllama")

#: Last-resort template when nothing better is known (llama.cpp does the same).
DEFAULT_BUILTIN = "chatml"

#: Architectures whose models ship without a template often enough (base
#: models) that guessing from the architecture beats ChatML.
_ARCH_BUILTINS = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "gemma-embedding": "gemma",
}

#: Special-token texts that identify a template family when the model has no
#: template (checked in order, when the vocabulary has the token).
_VOCAB_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|start_header_id|>", "llama3"),
)


class TokenizeInput(NamedTuple):
    """What :meth:`ChatFormatter.render_for_tokenize` returns (a plain 2-tuple)."""

    prompt: str
    add_special: bool


def _looks_like_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


# --------------------------------------------------------------------------
# The variables llama.cpp gives every Jinja template
# --------------------------------------------------------------------------


def llama_template_variables(now: datetime | None = None) -> dict[str, Any]:
    """The variables llama.cpp's chat code (common/chat.cpp) gives every Jinja template on top
    of messages/tools/add_generation_prompt/bos_token/eos_token, with its defaults:

    * ``date_string``: today, local time, as ``"%d %b %Y"`` (``"05 Mar 2025"``; Llama 3.x
      templates print it as "Today Date");
    * ``datetime``: the same day as ``"%b %d %Y"`` (``"Mar 05 2025"``; FireFunction v2);
    * ``enable_thinking``: True (thinking templates such as QwQ / DeepSeek-R1 / Command R7B
      close the thinking block when it is false or undefined); a chat's ``reasoning_budget=0``
      or ``chat_template_kwargs={"enable_thinking": False}`` overrides it.

    ``strftime_now(fmt)`` is a global of the sandbox (pyllama.chat._sandbox), as in llama.cpp.
    """
    if now is None:
        now = datetime.now()
    return {"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y"),
            "enable_thinking": True}


def _add_llama_aliases(context: dict[str, Any]) -> None:
    """llama.cpp's aliases of two variables (common/jinja/caps.cpp), set unless given:
    ``preserve_reasoning`` (a bool) becomes ``preserve_thinking`` and its negation
    ``clear_thinking`` / ``truncate_history_thinking`` / ``drop_thinking`` (the names the
    templates of GLM, DeepSeek V4, Nemotron ... read); a non-empty ``reasoning_effort``
    becomes ``reasoning_strength`` too."""
    preserve = context.get("preserve_reasoning")
    if isinstance(preserve, bool):
        context.setdefault("preserve_thinking", preserve)
        for name in ("clear_thinking", "truncate_history_thinking", "drop_thinking"):
            context.setdefault(name, not preserve)
    effort = context.get("reasoning_effort")
    if isinstance(effort, str) and effort:
        context.setdefault("reasoning_strength", effort)


# --------------------------------------------------------------------------
# llama.cpp built-in templates
# --------------------------------------------------------------------------


def builtin_template_names() -> list[str]:
    """Names of llama.cpp's built-in chat templates (needs the compiled extension)."""
    from pyllama import _core

    return list(_core.chat_builtin_templates())


def _builtin_known(name: str) -> bool | None:
    """True/False if the extension can tell, None if it is not available."""
    try:
        return name in builtin_template_names()
    except (ImportError, AttributeError):  # extension not built (yet)
        return None


def _apply_builtin(template: str, messages: list[dict[str, Any]], add_assistant: bool) -> str:
    from pyllama import _core

    flat = [{"role": m["role"], "content": _flatten_content(m.get("content"))} for m in messages]
    return _core.apply_builtin_chat_template(template, flat, add_assistant)


# --------------------------------------------------------------------------
# The formatter
# --------------------------------------------------------------------------


class ChatFormatter:
    """Renders conversations with one chat template.

    ``template`` is either a Jinja template (a GGUF's ``tokenizer.chat_template``),
    the name of one of llama.cpp's built-in templates (``"chatml"``, ``"gemma"``,
    ``"llama3"``, ... see :func:`builtin_template_names`), or None for the
    ``fallback`` template.

    A Jinja template is compiled once (compilations are cached by source) and
    rendered as transformers does.  If it cannot be compiled or rendered, for
    any reason other than the template's own ``raise_exception(...)`` (which
    raises :class:`ChatTemplateError`), the conversation is rendered by
    llama.cpp instead: first by the built-in template llama.cpp recognises in
    the Jinja source, else by ``fallback``.  A warning is logged on the
    "pyllama" logger.  With ``fallback=None`` nothing falls back: errors raise
    :class:`ChatTemplateError`.

    A template is untrusted code: it runs in Jinja's immutable sandbox and
    within ``limits`` (:class:`RenderLimits`: time, steps, output size).  A
    template that exceeds them raises :class:`ChatTemplateLimitError` and does
    not fall back.

    With ``llama_variables`` (the default) a Jinja template also gets the variables
    llama.cpp gives every template (:func:`llama_template_variables`: ``date_string``,
    ``datetime``, ``enable_thinking=True``), so a prompt is the one llama-server renders;
    ``extra_context`` and ``render()``'s keyword arguments override them.  False renders
    with transformers' variables only (``apply_chat_template`` gives none of these).
    """

    def __init__(
        self,
        template: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        *,
        fallback: str | None = DEFAULT_BUILTIN,
        extra_context: Mapping[str, Any] | None = None,
        limits: RenderLimits | None = None,
        llama_variables: bool = True,
    ) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"template must be a str or None, not {type(template).__name__}")
        for label, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if not isinstance(value, str):
                raise TypeError(f"{label} must be a str, not {type(value).__name__}")
        if fallback is not None:
            _check_builtin_name(fallback, "fallback")
        if limits is None:
            limits = DEFAULT_LIMITS
        elif not isinstance(limits, RenderLimits):
            raise TypeError(f"limits must be a RenderLimits or None, not {type(limits).__name__}")
        self.limits = limits
        self._specials: tuple[Any, _VocabSpecials] | None = None
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.fallback = fallback
        self.extra_context: dict[str, Any] = dict(extra_context or {})
        self.llama_variables = bool(llama_variables)
        self._compiled: _Compiled | None = None
        self._compile_error: Exception | None = None
        self._source_detect_ok: bool | None = None  # does llama.cpp recognise the Jinja source?
        self._warned = False

        if template is None or not template.strip():
            if fallback is None:
                raise ValueError("no chat template and no fallback")
            self.template = None
            self.builtin: str | None = fallback
        elif _looks_like_jinja(template):
            self.builtin = None
            try:
                self._compiled = _compile(template)
            except jinja2.TemplateError as exc:
                if fallback is None:
                    raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
                self._compile_error = exc
        else:
            name = template.strip()
            _check_builtin_name(name, "template")
            self.template = None
            self.builtin = name

    # -- construction helpers ------------------------------------------------

    @classmethod
    def from_model(cls, model: Model, template_name: str | None = None, **kwargs: Any) -> ChatFormatter:
        """Same as :func:`formatter_for_model`."""
        return formatter_for_model(model, template_name, **kwargs)

    def __repr__(self) -> str:
        if self.uses_jinja:
            what = f"jinja template ({len(self.template or '')} chars)"
        else:
            what = f"builtin {self.builtin!r}"
        return f"ChatFormatter({what}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    @property
    def uses_jinja(self) -> bool:
        """True if conversations are rendered by the Jinja template (when it works)."""
        return self._compiled is not None

    @property
    def supports_typed_content(self) -> bool:
        """Whether the Jinja template itself handles content given as a list of parts.
        When it does not, text parts are joined with newlines before rendering."""
        return self._compiled is not None and self._compiled.caps(self.limits)[1]

    # -- rendering -----------------------------------------------------------

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        prefill_assistant: bool = False,
        **extra: Any,
    ) -> str:
        """Render a conversation to a prompt string.

        ``add_generation_prompt`` appends the header of the assistant's turn.
        ``continue_final_message`` leaves the last message open so the model
        continues it (as in transformers: the rendering cut after the message's
        text; exclusive with add_generation_prompt).  ``prefill_assistant`` is
        llama.cpp's way of continuing a final assistant message (llama-server's
        default, and its ``continue_final_message``): the conversation before it
        rendered with the assistant's header, then the message's text (text parts
        joined by blank lines), whatever the template would do with it.
        ``tools`` (JSON schemas) and ``extra`` keyword arguments become template
        variables.  To tokenize the result, see :meth:`render_for_tokenize`.
        """
        msgs = normalize_messages(messages)
        prefill = _prefill_text(msgs) if prefill_assistant else None
        if prefill is not None:
            if continue_final_message:
                raise ValueError("prefill_assistant and continue_final_message are two ways to continue the last "
                                 "message: pass one")
            msgs.pop()
            add_generation_prompt = True
        _check_nesting(msgs, "messages")
        if tools is not None:
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not all(
                isinstance(t, Mapping) for t in tools
            ):
                raise TypeError("tools must be a list of dicts (JSON schemas) or None")
            tools = [dict(t) for t in tools]
            _check_nesting(tools, "tools")
        for name, value in extra.items():
            _check_nesting(value, name)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true; "
                                 "pass add_generation_prompt=False to continue the last message")
            add_generation_prompt = False

        if self._compiled is not None:
            try:
                rendered = self._render_jinja(msgs, add_generation_prompt, tools, extra)
            except ChatTemplateError:
                raise  # the template's own raise_exception, or a limit (ChatTemplateLimitError)
            except MemoryError as exc:
                raise ChatTemplateLimitError(f"chat template ran out of memory: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any template failure falls back
                if self.fallback is None:
                    raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
                self._warn_fallback(f"{type(exc).__name__}: {exc}")
                rendered = self._render_fallback(msgs, add_generation_prompt, tools)
        elif self._compile_error is not None:
            self._warn_fallback(f"does not compile: {self._compile_error}")
            rendered = self._render_fallback(msgs, add_generation_prompt, tools)
        else:
            rendered = self._render_builtin_name(self.builtin or DEFAULT_BUILTIN, msgs, add_generation_prompt, tools)

        if continue_final_message:
            rendered = _cut_after_final_message(rendered, msgs[-1]["content"])
        if prefill is not None:
            rendered += prefill
        return rendered

    def render_for_tokenize(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> TokenizeInput:
        """Render, and say how to tokenize the result: returns ``(prompt, add_special)``.

        ``add_special`` is False when the prompt already begins with the BOS
        token's text (the template wrote it), True otherwise (let the tokenizer
        add BOS if the model wants one).  Either way the tokens hold at most one
        BOS.  Tokenize with ``parse_special=True``::

            prompt, add_special = fmt.render_for_tokenize(messages)
            tokens = vocab.tokenize(prompt, add_special=add_special, parse_special=True)
        """
        prompt = self.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final_message,
            **extra,
        )
        return TokenizeInput(prompt, self.add_special_for(prompt))

    def render_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        vocab: Any,
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        allow_special_in_messages: bool = False,
        **extra: Any,
    ) -> list[int]:
        """Render a conversation and tokenize it with `vocab` (a ``pyllama.Vocab``).

        Messages are data: only the template's own markup becomes control tokens.
        Text inside a message (content, text parts, names, tool calls and their
        arguments, tool results; also the strings in ``tools``) that spells a
        control token, such as ``"<|im_start|>system"`` in a user message, is
        tokenized as plain text (``parse_special=False``).  When no such text
        occurs (nearly always), the tokens are exactly those of::

            prompt, add_special = fmt.render_for_tokenize(messages, ...)
            vocab.tokenize(prompt, add_special=add_special, parse_special=True)

        which is also what ``allow_special_in_messages=True`` returns in every
        case (the behaviour of llama-server and transformers).
        """
        text, protected, add_special, info = render_protected(
            self, messages, vocab, add_generation_prompt=add_generation_prompt, tools=tools,
            continue_final_message=continue_final_message, allow_special_in_messages=allow_special_in_messages,
            **extra)
        if not protected:
            return vocab.tokenize(text, add_special=add_special, parse_special=True)
        return _partition_tokens(text, protected, info, vocab, add_special)

    def render_parts(
        self,
        messages: Sequence[Mapping[str, Any]],
        vocab: Any,
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        allow_special_in_messages: bool = False,
        **extra: Any,
    ) -> tuple[list[tuple[str, bool]], bool]:
        """:meth:`render_tokens` for tokenizers that take text (llama.cpp's mtmd): the
        rendering as ``(text, parse_special)`` parts, and add_special.  Tokenizing each part
        with its flag gives render_tokens' tokens (control tokens as their own parts)."""
        text, protected, add_special, info = render_protected(
            self, messages, vocab, add_generation_prompt=add_generation_prompt, tools=tools,
            continue_final_message=continue_final_message, allow_special_in_messages=allow_special_in_messages,
            **extra)
        if not protected:
            return [(text, True)], add_special
        parts: list[tuple[str, bool]] = []
        for frag in _partition_frags(text, protected, info):
            if isinstance(frag, int):
                parts.append((vocab.token_text(frag), True))
            elif frag[1] > frag[0]:
                parts.append((text[frag[0]:frag[1]], False))
        return parts, add_special

    def _vocab_specials(self, vocab: Any) -> _VocabSpecials:
        cached = self._specials
        if cached is not None and cached[0] is vocab:
            return cached[1]
        info = _VocabSpecials(vocab)
        self._specials = (vocab, info)
        return info

    def add_special_for(self, prompt: str) -> bool:
        """The ``add_special`` flag to tokenize `prompt` with (see render_for_tokenize)."""
        return not (self.bos_token and prompt.startswith(self.bos_token))

    # -- internals -----------------------------------------------------------

    def _render_jinja(self, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                      tools: list[dict[str, Any]] | None, extra: Mapping[str, Any]) -> str:
        assert self._compiled is not None
        supports_str, supports_typed = self._compiled.caps(self.limits)
        for m in msgs:
            content = m["content"]
            if isinstance(content, list) and not supports_typed:
                m["content"] = _flatten_content(content)
            elif isinstance(content, str) and not supports_str and supports_typed:
                m["content"] = [{"type": "text", "text": content}]
        context: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        if self.llama_variables:
            context.update(llama_template_variables())   # today's date at each render
        context.update(self.extra_context)
        context.update(extra)
        if self.llama_variables:
            _add_llama_aliases(context)
        return self._compiled.render(
            self.limits, messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt, **context
        )

    def _render_fallback(self, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                         tools: list[dict[str, Any]] | None) -> str:
        assert self.template is not None and self.fallback is not None
        if tools:
            logger.warning("chat: the built-in fallback template cannot show tools; they are left out")
        if _has_non_text_parts(msgs):
            logger.warning("chat: non-text content parts are dropped by the built-in template")
        if self._source_detect_ok is not False:
            # llama.cpp recognises many Jinja templates by their markers.
            try:
                out = _apply_builtin(self.template, msgs, add_generation_prompt)
            except ImportError:
                raise
            except Exception:
                self._source_detect_ok = False
            else:
                self._source_detect_ok = True
                return out
        return _apply_builtin(self.fallback, msgs, add_generation_prompt)

    def _render_builtin_name(self, name: str, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                             tools: list[dict[str, Any]] | None) -> str:
        if tools:
            logger.warning("chat: built-in template %r cannot show tools; they are left out", name)
        if _has_non_text_parts(msgs):
            logger.warning("chat: non-text content parts are dropped by the built-in template %r", name)
        return _apply_builtin(name, msgs, add_generation_prompt)

    def _warn_fallback(self, why: str) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        logger.log(level, "chat: the model's Jinja chat template cannot be used (%s); "
                          "falling back to llama.cpp's built-in templates", why)


def _check_builtin_name(name: str, label: str) -> None:
    known = _builtin_known(name)
    if known is False:
        raise ValueError(
            f"{label} {name!r} is neither a Jinja template nor one of llama.cpp's built-in templates "
            f"({', '.join(builtin_template_names())})"
        )


def _prefill_text(msgs: list[dict[str, Any]]) -> str:
    """The text a prefilled final assistant message puts after the generation prompt
    (llama.cpp's common_chat_msg::render_content: text parts joined by blank lines)."""
    last = msgs[-1]
    if last["role"] != "assistant":
        raise ValueError(f"prefill_assistant: the last message is the {last['role']}'s; only an assistant "
                         "message can be continued")
    if last.get("tool_calls"):
        raise ValueError("Cannot continue an assistant message that contains tool calls.")
    content = last.get("content")
    if isinstance(content, list):
        return "\n\n".join(p["text"] for p in content if p.get("type") == "text")
    return content or ""


def _cut_after_final_message(rendered: str, content: Any) -> str:
    """transformers' continue_final_message: drop what follows the last message."""
    if isinstance(content, list):
        texts = [p["text"] for p in content if p.get("type") == "text"]
        if not texts:
            raise ValueError("continue_final_message: the last message has no text part to continue")
        final = texts[-1]
    else:
        final = content or ""
    stripped = final.strip()
    if not stripped:
        raise ValueError("continue_final_message: the last message is empty")
    if stripped not in rendered:
        raise ValueError("continue_final_message: the last message's text does not appear in the rendered "
                         "prompt (the template changes it)")
    loc = rendered.rindex(stripped)
    if rendered[loc: loc + len(final.lstrip())] == final.lstrip():
        return rendered[: loc + len(final.lstrip())]
    return rendered[: loc + len(stripped)]


# --------------------------------------------------------------------------
# From a model
# --------------------------------------------------------------------------


def _token_text(vocab: Any, token: int) -> str:
    if token is None or token < 0:
        return ""
    try:
        return vocab.token_text(token)
    except Exception:  # noqa: BLE001 - a token without text is as good as none
        return ""


def _vocab_has_special(vocab: Any, text: str) -> bool:
    try:
        toks = vocab.tokenize(text, add_special=False, parse_special=True)
        return len(toks) == 1 and vocab.token_text(toks[0]) == text
    except Exception:  # noqa: BLE001
        return False


def guess_builtin_template(model: Model) -> str:
    """The llama.cpp built-in template to use for a model that has no chat template:
    by architecture (gemma*), then by the special tokens its vocabulary has, else ChatML."""
    arch = ""
    try:
        arch = model.architecture
    except Exception:  # noqa: BLE001
        pass
    if arch in _ARCH_BUILTINS:
        return _ARCH_BUILTINS[arch]
    vocab = model.vocab
    for marker, name in _VOCAB_MARKERS:
        if _vocab_has_special(vocab, marker):
            return name
    return DEFAULT_BUILTIN


def formatter_for_model(
    model: Model,
    template_name: str | None = None,
    *,
    fallback: str | None = "auto",
    extra_context: Mapping[str, Any] | None = None,
    limits: RenderLimits | None = None,
) -> ChatFormatter:
    """A ChatFormatter for a loaded model.

    Template selection:

    1. ``template_name`` given: the GGUF's named template
       (``tokenizer.chat_template.<name>``) if it has one; else a llama.cpp
       built-in template of that name (``"chatml"``, ``"llama3"``, ...); else, if
       it is itself a Jinja template (contains ``{{`` or ``{%``), that template.
       Anything else is a ValueError.
    2. No name: the GGUF's ``tokenizer.chat_template``.
    3. No template in the model: a built-in template guessed from the model
       (:func:`guess_builtin_template`), ChatML when nothing is known.

    ``fallback`` is the built-in template a broken Jinja template falls back to
    when llama.cpp does not recognise the Jinja source itself: ``"auto"`` (the
    default) uses the guess of step 3, None disables falling back.  BOS/EOS texts come from the model's vocabulary ("" when
    the model has no such token).
    """
    vocab = model.vocab
    bos = _token_text(vocab, vocab.bos)
    eos = _token_text(vocab, vocab.eos)

    template: str | None
    if template_name is not None:
        if not isinstance(template_name, str) or not template_name:
            raise TypeError("template_name must be a non-empty str or None")
        template = template_name if _looks_like_jinja(template_name) else model.chat_template(template_name)
        if template is None:
            if template_name in builtin_template_names():
                template = template_name
            else:
                raise ValueError(
                    f"unknown chat template {template_name!r}: the model has no template of that name and "
                    f"llama.cpp has no built-in one (built-ins: {', '.join(builtin_template_names())})"
                )
    else:
        template = model.chat_template()

    guessed: str | None = None
    if fallback == "auto":
        guessed = guess_builtin_template(model)
        fallback = guessed
    if template is None:
        template = guessed or guess_builtin_template(model)
    return ChatFormatter(template, bos, eos, fallback=fallback, extra_context=extra_context, limits=limits)
