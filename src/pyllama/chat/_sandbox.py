"""The guarded Jinja environment a chat template renders in, and its render budget.

A chat template from a GGUF file is untrusted code.  It is compiled in transformers'
environment (Jinja's immutable sandbox, the same globals and filters) with checks on
every operation that can allocate without bound, and instrumented so that each render
counts its steps, output and time against :class:`RenderLimits`
(:func:`_compile`, :class:`_Compiled`).  Nothing here knows about messages or models.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.utils
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pyllama.errors import PyllamaError


class ChatTemplateError(PyllamaError, ValueError):
    """A chat template refused the conversation (its ``raise_exception``), or a
    template could not be rendered at all and no fallback was allowed."""


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
            # llama.cpp's Jinja joins a string and an undefined or none operand as the string
            # alone (runtime.cpp, workaround_concat_null_with_str); templates rely on it, e.g.
            # FireFunction v2's `"..." + functions` with no functions given.
            if type(left) is str and (right is None or isinstance(right, jinja2.Undefined)):
                return left
            if type(right) is str and (left is None or isinstance(left, jinja2.Undefined)):
                return right
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
