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
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.utils
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pyllama.errors import PyllamaError

if TYPE_CHECKING:  # pragma: no cover
    from pyllama._core import Model

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


class ChatTemplateError(PyllamaError, ValueError):
    """A chat template refused the conversation (its ``raise_exception``), or a
    template could not be rendered at all and no fallback was allowed."""


class TokenizeInput(NamedTuple):
    """What :meth:`ChatFormatter.render_for_tokenize` returns (a plain 2-tuple)."""

    prompt: str
    add_special: bool


# --------------------------------------------------------------------------
# The Jinja environment, as transformers builds it
# --------------------------------------------------------------------------


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers overrides Jinja's tojson: no HTML escaping, non-ASCII kept.
    _check_chars(_size(x) * 2 + (indent if isinstance(indent, int) and indent > 0 else 0) * 64, "a JSON text")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to mark
    assistant tokens; for rendering it is a no-op wrapper around its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class ChatTemplateLimitError(ChatTemplateError):
    """A chat template ran past its time, step or size limit (see :class:`RenderLimits`).

    A template from a GGUF file is untrusted code; one that loops for ever, recurses
    without end or builds gigabytes of text is treated as hostile: this error is
    raised and nothing falls back to a built-in template."""


@dataclass(frozen=True)
class RenderLimits:
    """Limits on one rendering of a Jinja chat template (beside Jinja's sandbox).

    ``timeout``    wall-clock seconds one render may take (normal templates take
                   well under a millisecond per message).
    ``max_steps``  loop iterations, macro calls, function calls and outputs, together.
    ``max_chars``  characters of output (counted as produced, at every level, so
                   text a macro returns counts again where it is printed), and the
                   size of any one string, list or number a template operation may build.
    """

    timeout: float = 2.0
    max_steps: int = 10_000_000
    max_chars: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"RenderLimits.timeout must be a positive number of seconds, not {self.timeout!r}")
        for name in ("max_steps", "max_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RenderLimits.{name} must be an int >= 1, not {value!r}")


DEFAULT_LIMITS = RenderLimits()

#: Bits an integer built by a template may have (a number of 20,000 digits).
_MAX_INT_BITS = 1 << 16
#: Containers a size estimate walks before giving up (the template built a huge graph).
_MAX_WALK = 200_000
_C_SPACE = " \t\n\v\f\r"
#: Strings shorter than this are not size-checked by the + operator (only the output counts).
_SMALL = 1 << 16


class _Budget:
    """The running totals of one render (thread-local, see _render_limited)."""

    __slots__ = ("limits", "deadline", "steps", "chars", "tripped")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout
        self.steps = limits.max_steps
        self.chars = limits.max_chars
        self.tripped: str | None = None


_local = threading.local()


def _budget() -> _Budget | None:
    return getattr(_local, "budget", None)


def _trip(message: str) -> None:
    b = _budget()
    if b is not None and b.tripped is None:
        b.tripped = message
    raise ChatTemplateLimitError(message)


def _step() -> None:
    b = _budget()
    if b is None:
        return
    if b.tripped is not None:  # sticky: nothing in the template may swallow it
        raise ChatTemplateLimitError(b.tripped)
    b.steps -= 1
    if b.steps < 0:
        _trip(f"chat template exceeded its step limit ({b.limits.max_steps:,} loop iterations and calls): "
              "an endless or runaway loop in the template?")
    if time.monotonic() > b.deadline:
        _trip(f"chat template exceeded its time limit ({b.limits.timeout:g} s): "
              "an endless or runaway loop in the template?")


def _max_chars() -> int:
    b = _budget()
    return (b.limits if b is not None else DEFAULT_LIMITS).max_chars


def _check_chars(n: int, what: str) -> None:
    cap = _max_chars()
    if n > cap:
        _trip(f"chat template tried to build {what} of about {n:,} characters (limit {cap:,})")


def _size(obj: Any) -> int:
    """About how many characters ``str(obj)`` (or its JSON) has, without building it.
    Raises ChatTemplateLimitError when it is over the limit or the object graph is huge."""
    if isinstance(obj, str):
        return len(obj)
    cap = _max_chars()
    total = 0
    walked = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        walked += 1
        if walked > _MAX_WALK:
            _trip(f"chat template built a value with more than {_MAX_WALK:,} parts")
        if isinstance(x, str):
            total += len(x) + 4
        elif isinstance(x, bool) or x is None:
            total += 5
        elif isinstance(x, int):
            total += x.bit_length() // 3 + 2
        elif isinstance(x, float):
            total += 24
        elif isinstance(x, Mapping):
            total += 2
            for k, v in x.items():
                stack.append(k)
                stack.append(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += 2 + len(x)
            stack.extend(x)
        elif isinstance(x, jinja2.utils.Namespace):
            stack.append(object.__getattribute__(x, "_Namespace__attrs"))
        elif isinstance(x, jinja2.Undefined):
            pass
        else:
            total += 64
        if total > cap:
            _check_chars(total, "a value")
    return total


def _check_int(n: int, what: str) -> None:
    if n > _MAX_INT_BITS:
        _trip(f"chat template tried to build {what} (an integer of about {n:,} bits)")


# %-format specs and {}-format specs: widths and precisions are the sizes to check.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_FIELD = re.compile(r"\{[^{}]*\}")
_DIGITS = re.compile(r"\d+")


def _check_format(fmt: str, args: Any) -> None:
    cap = _max_chars()
    spec_total = 0
    for field in _BRACE_FIELD.findall(fmt):
        if ":" in field:
            spec_total += sum(int(d) for d in _DIGITS.findall(field.split(":", 1)[1]))
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                vals = args if isinstance(args, (list, tuple)) else (args,)
                spec_total += sum(v for v in vals if isinstance(v, int) and not isinstance(v, bool) and v > 0)
            elif g:
                spec_total += int(g)
    if spec_total > cap:
        _trip(f"chat template used a format width of {spec_total:,} (limit {cap:,})")
    _check_chars(len(fmt) + spec_total + _size(args), "a formatted string")


def _check_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = (len(s) + 1) if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_chars(len(s) + n * (len(new) - len(old)), "a replaced string")


def _check_join(sep: str, items: list[Any]) -> None:
    _check_chars(sum(_size(x) for x in items) + len(sep) * max(len(items) - 1, 0), "a joined string")


def _check_str_method(owner: str, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Size checks for str methods that can build huge strings; returns (maybe materialised) args."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if isinstance(width, int):
            _check_chars(width, f"a str.{name}() result")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_chars(len(owner) + owner.count("\t") * size, "a str.expandtabs() result")
    elif name == "replace":
        _check_replace(owner, *(list(args) + [None] * 3)[:3])
    elif name == "join" and args:
        items = list(args[0])
        _check_join(owner, items)
        args = (items,) + tuple(args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _check_chars(len(owner) * max(longest, 1), "a str.translate() result")
    return args


# ---- filters and globals that can build large values, checked ----------------------


def _f_center(value: Any, width: int = 80) -> str:
    if isinstance(width, int):
        _check_chars(max(width, len(str(value))), "a centred string")
    return jinja2.filters.do_center(value, width)


def _f_indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    pad_len = len(width) if isinstance(width, str) else (width if isinstance(width, int) else 0)
    _check_chars(len(text) + (text.count("\n") + 1) * max(pad_len, 0), "an indented string")
    return jinja2.filters.do_indent(s, width, first, blank)


@jinja2.pass_environment
def _f_wordwrap(environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
                wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text = str(s)
    sep = wrapstring if isinstance(wrapstring, str) else environment.newline_sequence
    if isinstance(width, int) and width > 0:
        _check_chars(len(text) + (len(text) // width + text.count("\n") + 1) * len(sep), "a wrapped string")
    return jinja2.filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _f_format(value: Any, *args: Any, **kwargs: Any) -> str:
    if isinstance(value, str):
        _check_format(value, kwargs if kwargs else args)
    return jinja2.filters.do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _f_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    _check_replace(str(s) if not isinstance(s, str) else s, str(old), str(new), count)
    return jinja2.filters.do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _f_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is None:
        _check_join(str(d), items)
    result = jinja2.filters.sync_do_join(eval_ctx, items, d, attribute)
    _check_chars(len(result), "a joined string")
    return result


def _f_string(value: Any) -> str:
    _size(value)
    return jinja2.filters.FILTERS["string"](value)


def _f_pprint(value: Any) -> str:
    _check_chars(_size(value) * 2, "a pretty-printed value")
    return jinja2.filters.do_pprint(value)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if isinstance(n, int) and isinstance(max, int):
        _check_chars(n * max * 12, "lorem ipsum")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


# The hooks an instrumented template calls (see _instrument).  They are filters
# because the compiled code calls filters directly (a sandboxed call costs far
# more); their names are not identifiers, so template source cannot name them,
# and they take the context so that Jinja never runs them at compile time.
_TICK = "pyllama:tick"
_OUT = "pyllama:out"
_CONCAT = "pyllama:concat"


@jinja2.pass_context
def _g_tick(_context: Any, value: Any) -> Any:
    _step()
    return value


@jinja2.pass_context
def _g_out(_context: Any, value: Any) -> Any:
    b = _budget()
    if b is not None:
        _step()
        b.chars -= len(value) if isinstance(value, str) else _size(value)
        if b.chars < 0:
            _trip(f"chat template output exceeded {b.limits.max_chars:,} characters")
    return value


@jinja2.pass_context
def _g_concat(_context: Any, values: tuple[Any, ...]) -> str:
    _check_chars(sum(_size(v) for v in values), "a string (the ~ operator)")
    return "".join(map(str, values))


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus size checks on operators and calls that can
    allocate without bound in one step ('x' * 10**10, 10**10**10, 'x'.ljust(10**10))."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":
            if type(left) is str and type(right) is str:  # the common case, kept cheap
                if len(left) + len(right) > _SMALL:
                    _check_chars(len(left) + len(right), "a concatenation (the + operator)")
                return left + right
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_chars(_size(left) + _size(right), "a concatenation (the + operator)")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool) and n > 1:
                    _check_chars(_size(seq) * n, "a repeated sequence (the * operator)")
            if isinstance(left, int) and isinstance(right, int):
                _check_int(left.bit_length() + right.bit_length(), "a product")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _check_int(left.bit_length() * min(right, _MAX_INT_BITS + 1), "a power")
        elif operator == "%":
            if isinstance(left, str):
                _check_format(left, right)
        return self.binop_table[operator](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and callable(__obj):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        if getattr(value, "__name__", None) not in ("format", "format_map"):  # (cheap: runs on every getattr)
            return None
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, (args, kwargs))
            return wrapped(*args, **kwargs)

        return checked


def make_environment() -> ImmutableSandboxedEnvironment:
    """A Jinja environment configured like transformers' ``apply_chat_template``
    (plus pyllama's limits: see :class:`RenderLimits`)."""
    env = _GuardedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.filters.update({
        "center": _f_center, "indent": _f_indent, "wordwrap": _f_wordwrap, "format": _f_format,
        "replace": _f_replace, "join": _f_join, "string": _f_string, "pprint": _f_pprint,
        _TICK: _g_tick, _OUT: _g_out, _CONCAT: _g_concat,
    })
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["lipsum"] = _lipsum
    return env


_ENV = make_environment()


def _guard(name: str, node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None)


def _is_guard(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Filter) and node.name.startswith("pyllama:")


def _instrument(tree: nodes.Template) -> nodes.Template:
    """Make a parsed template account for its work: a step at every loop iteration
    (and loop-filter test) and macro / call-block call, every printed value counted
    against the output limit, and every ``~`` concatenation size-checked."""
    for node in tree.find_all((nodes.For, nodes.Macro, nodes.CallBlock)):
        node.body.insert(0, nodes.ExprStmt(_guard(_TICK, nodes.Const(None))))
        if isinstance(node, nodes.For) and node.test is not None:
            node.test = _guard(_TICK, node.test)
    for out in tree.find_all(nodes.Output):
        out.nodes = [
            child if _is_guard(child)
            else _guard(_OUT, nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else child)
            for child in out.nodes
        ]
    _replace_concat(tree)
    return tree


def _replace_concat(node: nodes.Node) -> None:
    for field, value in node.iter_fields():
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, nodes.Node):
                    _replace_concat(item)
                    if isinstance(item, nodes.Concat):
                        value[i] = _guard(_CONCAT, nodes.Tuple(item.nodes, "load"))
        elif isinstance(value, nodes.Node):
            _replace_concat(value)
            if isinstance(value, nodes.Concat):
                setattr(node, field, _guard(_CONCAT, nodes.Tuple(value.nodes, "load")))


def _render_limited(template: jinja2.Template, limits: RenderLimits, variables: Mapping[str, Any]) -> str:
    """Render under a fresh budget; ChatTemplateLimitError if it ran out (even if caught inside)."""
    budget = _Budget(limits)
    previous = _budget()
    _local.budget = budget
    try:
        out = template.render(**variables)
    except ChatTemplateLimitError:
        raise
    except Exception:
        if budget.tripped is not None:
            raise ChatTemplateLimitError(budget.tripped) from None
        raise
    finally:
        _local.budget = previous
    if budget.tripped is not None:
        raise ChatTemplateLimitError(budget.tripped)
    return out


_NEEDLE = "pyllama-needle-7c1f"


class _Compiled:
    """A compiled template plus lazily probed capabilities."""

    __slots__ = ("template", "_caps")

    def __init__(self, template: jinja2.Template) -> None:
        self.template = template
        self._caps: tuple[bool, bool] | None = None

    def render(self, limits: RenderLimits, **variables: Any) -> str:
        return _render_limited(self.template, limits, variables)

    def _probe(self, content: Any, limits: RenderLimits) -> bool:
        try:
            out = self.render(
                limits,
                messages=[{"role": "user", "content": content}],
                add_generation_prompt=False, bos_token="", eos_token="", tools=None,
            )
        except ChatTemplateLimitError:
            raise  # a hostile template: say so now, not after two more renders
        except Exception:
            return False
        # A template that stringifies a list of parts would "contain" the needle too.
        return _NEEDLE in out and "'type'" not in out and '"type"' not in out

    def caps(self, limits: RenderLimits = DEFAULT_LIMITS) -> tuple[bool, bool]:
        """(supports string content, supports typed content parts)."""
        if self._caps is None:
            self._caps = (self._probe(_NEEDLE, limits), self._probe([{"type": "text", "text": _NEEDLE}], limits))
        return self._caps


@lru_cache(maxsize=64)
def _compile(source: str) -> _Compiled:
    """Parse, instrument (see _instrument) and compile a template; cached by source."""
    tree = _instrument(_ENV.parse(source))
    code = _ENV.compile(tree)
    return _Compiled(_ENV.template_class.from_code(_ENV, code, _ENV.make_globals(None), None))


def _looks_like_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


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
# Messages
# --------------------------------------------------------------------------


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
        **extra: Any,
    ) -> str:
        """Render a conversation to a prompt string.

        ``add_generation_prompt`` appends the header of the assistant's turn.
        ``continue_final_message`` leaves the last message open so the model
        continues it (as in transformers; exclusive with add_generation_prompt).
        ``tools`` (JSON schemas) and ``extra`` keyword arguments become template
        variables.  To tokenize the result, see :meth:`render_for_tokenize`.
        """
        msgs = normalize_messages(messages)
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
        text, protected, add_special, info = self._render_protected(
            messages, vocab, add_generation_prompt=add_generation_prompt, tools=tools,
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
        text, protected, add_special, info = self._render_protected(
            messages, vocab, add_generation_prompt=add_generation_prompt, tools=tools,
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

    def _render_protected(self, messages: Sequence[Mapping[str, Any]], vocab: Any, *, tools: Any,
                          allow_special_in_messages: bool, **kwargs: Any) -> tuple[str, list, bool, Any]:
        """(text, protected spans, add_special, vocab specials): the rendering, and the spans
        of it that come from the data and spell control tokens (empty: tokenize it whole
        with parse_special=True)."""
        kwargs = dict(tools=tools, **kwargs)
        prompt, add_special = self.render_for_tokenize(messages, **kwargs)
        if allow_special_in_messages:
            return prompt, [], add_special, None

        info = self._vocab_specials(vocab)
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
        opening, closing = _pick_markers(prompt, self.template or "", *strings)
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
        neutral = self.render(neutral_msgs, **{**kwargs, "tools": neutral_tools})

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
            add_special = self.add_special_for(restored)
        return restored, protected, add_special, info

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
        context.update(self.extra_context)
        context.update(extra)
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


# --------------------------------------------------------------------------
# Messages are data: tokenizing with only the template's markup special
# --------------------------------------------------------------------------

# llama_token_attr bits (llama.h)
_ATTR_UNKNOWN = 1 << 0
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4
_ATTR_LSTRIP = 1 << 7
_ATTR_RSTRIP = 1 << 8
#: Tokens that only parse_special=True turns text into (llama.cpp skips them otherwise).
_GATED = _ATTR_CONTROL | _ATTR_UNKNOWN


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


# How deeply messages, tools and other template variables may nest (objects and lists inside
# each other): a tool's parameters may nest pyllama's JSON limit deep, plus the few levels of
# the tool list around them.  Deeper data is a ValueError before rendering, so that neither
# the template (tojson) nor the walks below (which neutralise control-token text at any
# depth) can run into Python's recursion limit.
def _max_nesting() -> int:
    from pyllama.grammar._text import MAX_JSON_NESTING

    return MAX_JSON_NESTING + 8


def _check_nesting(value: Any, what: str) -> None:
    from pyllama.grammar._text import json_nesting

    limit = _max_nesting()
    if json_nesting(value, limit) > limit:
        raise ValueError(f"{what} nests objects/lists more than {limit} levels deep (pyllama's limit)")


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


def _check_builtin_name(name: str, label: str) -> None:
    known = _builtin_known(name)
    if known is False:
        raise ValueError(
            f"{label} {name!r} is neither a Jinja template nor one of llama.cpp's built-in templates "
            f"({', '.join(builtin_template_names())})"
        )


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
