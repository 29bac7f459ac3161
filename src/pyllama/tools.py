"""Tool calling: OpenAI-style ``tools`` for any GGUF chat model.

    from pyllama import LLM
    llm = LLM("model.gguf")
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    comp = llm.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[weather], tool_choice="required")
    comp.tool_calls   # [{"id": "call_...", "type": "function",
                      #   "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]

This module is the one home of tool calling in pyllama: ``LLM.chat(tools=...)`` (and with it
:func:`chat_with_tools`, the LangChain chat model's ``bind_tools`` and the server) plans here.  It

* validates tools and ``tool_choice`` (:func:`validate_tools`, :func:`normalize_tool_choice`);
* shows the tools to the model through its own chat template when the template uses ``tools``
  (Hermes/Qwen, Llama 3.x, Mistral and others), else through a documented generic system
  prompt (:data:`GENERIC_TOOL_PROMPT`);
* for ``tool_choice="required"`` or a named function, constrains generation with a grammar so
  the output is a call, in the template's own call format where a grammar can express it,
  with arguments that satisfy the function's JSON schema;
* for ``"auto"``, generates freely and parses calls out of the text (:func:`parse_tool_calls`);
* renders tool results (``{"role": "tool", "tool_call_id": ..., "content": ...}``) and earlier
  assistant calls back through the template (:func:`prepare_messages`).

Tool calling is a plan (:class:`ToolPlan`, made by :func:`plan_chat`): the prepared messages,
how to render them, the options (with the grammar of a forced call) and the parser.  Nothing
here runs a request: the LLM runs the plan like any other (:func:`chat_with_tools` is
``llm.chat`` under the name this module always had).  Planning needs only something
that renders conversations (the LLM's chat formatter); :func:`plan_tool_chat` also renders the
prompt (``LLM.chat_prompt``) for callers that run the plan themselves.  Reading calls out of
text is :mod:`pyllama._tool_parse`.  docs/tools.md has the details.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import re
import threading
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

# Reading calls out of generated text is its own module; these names are part of this one's API.
from pyllama._tool_parse import ParsedToolCalls, make_tool_call, new_call_id, parse_tool_calls

__all__ = [
    "GENERIC_TOOL_PROMPT",
    "TOOL_RESULT_PREFIX",
    "ToolFormat",
    "ParsedToolCalls",
    "validate_tools",
    "normalize_tool_choice",
    "detect_tool_format",
    "prepare_messages",
    "render_tool_prompt",
    "tool_call_schema",
    "tool_call_grammar",
    "parse_tool_calls",
    "make_tool_call",
    "new_call_id",
    "chat_with_tools",
    "plan_chat",
    "plan_tool_chat",
    "ToolPlan",
]

#: The system prompt that shows tools to a model whose chat template does not use ``tools``
#: (``{tools}``: a JSON list of the functions; ``{choice}``: empty, or a sentence saying which
#: tool must be called now).  Calls of earlier turns are written back into the conversation in
#: the same JSON form, and tool results come back in user messages that begin with
#: :data:`TOOL_RESULT_PREFIX`.
GENERIC_TOOL_PROMPT = (
    "You can call the following tools. Each is described by a JSON object with its name, what it "
    "does and a JSON schema of its arguments:\n{tools}\n\n"
    "To call a tool, reply with only a JSON object, and nothing else, of the form "
    '{{"name": "<tool name>", "arguments": {{<the arguments>}}}}. To call several tools, write one '
    "such object per line. If no tool is needed, answer the user directly in plain text. The "
    'results of tool calls come back in messages that begin with "Tool result".{choice}'
)

#: How a tool result begins when the template cannot show the ``tool`` role (generic format):
#: ``Tool result (<tool name>, call <id>):`` followed by a newline and the result.
TOOL_RESULT_PREFIX = "Tool result"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_CHOICE_WORDS = ("none", "auto", "required")

logger = logging.getLogger("pyllama")


# ---------------------------------------------------------------------------------- validation


def validate_tools(tools: Any) -> List[Dict[str, Any]]:
    """Check OpenAI-shaped tools and return normalised copies.

    Each tool is ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``
    (``"type"`` may be left out).  Names are 1-64 letters, digits, ``_``, ``-`` or ``.``, and
    unique; ``parameters`` is a JSON schema of an object (missing: no arguments).  The copies
    always have ``description`` (str) and ``parameters``.  Raises TypeError (wrong type) or
    ValueError (wrong value) naming the offending tool.
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of tool dicts, not {type(tools).__name__}")
    if not tools:
        raise ValueError("tools is empty: give at least one tool, or leave tools out")
    out: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise TypeError(f"{where} must be a dict like {{'type': 'function', 'function': {{'name': ...}}}}, "
                            f"not {type(tool).__name__}")
        kind = tool.get("type", "function")
        if kind != "function":
            raise ValueError(f"{where} has type {kind!r}; only 'function' tools are supported")
        fn = tool.get("function")
        if fn is None:
            raise ValueError(f"{where} has no 'function' (expected {{'type': 'function', 'function': "
                             "{'name': ..., 'parameters': {...}}}})")
        if not isinstance(fn, Mapping):
            raise TypeError(f"{where}['function'] must be a dict, not {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str):
            raise TypeError(f"{where}['function']['name'] must be a str, not {type(name).__name__}")
        where = f"{where} ({name!r})"
        if not _NAME_RE.match(name):
            raise ValueError(f"{where}: a tool name is 1 to 64 letters, digits, '_', '-' or '.'")
        if name in seen:
            raise ValueError(f"{where}: the name is also used by tools[{seen[name]}]; tool names must be unique")
        seen[name] = i
        desc = fn.get("description", "")
        if desc is None:
            desc = ""
        if not isinstance(desc, str):
            raise TypeError(f"{where}: 'description' must be a str, not {type(desc).__name__}")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise TypeError(f"{where}: 'parameters' must be a JSON schema (dict), not {type(params).__name__}")
        ptype = params.get("type", "object")
        if ptype != "object":
            raise ValueError(f"{where}: 'parameters' must describe an object (type 'object'), not {ptype!r}")
        props = params.get("properties", {})
        if not isinstance(props, Mapping):
            raise TypeError(f"{where}: 'parameters.properties' must be a dict, not {type(props).__name__}")
        required = params.get("required", [])
        if not isinstance(required, Sequence) or isinstance(required, str) or \
                not all(isinstance(r, str) for r in required):
            raise TypeError(f"{where}: 'parameters.required' must be a list of property names")
        _check_nesting(dict(params), f"{where}: 'parameters'")
        try:
            json.dumps(params)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: 'parameters' is not JSON-serialisable: {exc}") from None
        new_fn = {k: copy.deepcopy(v) for k, v in fn.items()}
        new_fn["description"] = desc
        new_fn["parameters"] = copy.deepcopy(dict(params))
        out.append({"type": "function", "function": new_fn})
    return out


def _check_nesting(value: Any, what: str) -> None:
    """ValueError when `value` nests deeper than pyllama's JSON limit (copying, dumping or
    converting it would recurse past Python's limit)."""
    from pyllama.grammar._text import MAX_JSON_NESTING, json_nesting

    if json_nesting(value) > MAX_JSON_NESTING:
        raise ValueError(f"{what} nests objects/arrays more than {MAX_JSON_NESTING} levels deep (pyllama's limit)")


def _names(tools: Sequence[Mapping[str, Any]]) -> List[str]:
    return [t["function"]["name"] for t in tools]


def normalize_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> Union[str, Dict[str, Any]]:
    """``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name": N}}``.

    Accepts those, None (= ``"auto"``) and a bare tool name.  A tool named like one of the
    three words is chosen with the dict form.  Raises TypeError/ValueError otherwise (an
    unknown name lists the tools).  `tools` are validated tools (:func:`validate_tools`).
    """
    names = _names(tools)
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice in _CHOICE_WORDS:
            return tool_choice
        name = tool_choice
    elif isinstance(tool_choice, Mapping):
        kind = tool_choice.get("type", "function")
        if kind != "function":
            raise ValueError(f"tool_choice has type {kind!r}; use {{'type': 'function', 'function': {{'name': ...}}}}")
        fn = tool_choice.get("function")
        if isinstance(fn, Mapping):
            name = fn.get("name")
        elif fn is None and "name" in tool_choice:
            name = tool_choice["name"]
        else:
            raise ValueError("tool_choice as a dict must be {'type': 'function', 'function': {'name': <tool name>}}")
        if not isinstance(name, str):
            raise TypeError(f"tool_choice's function name must be a str, not {type(name).__name__}")
    else:
        raise TypeError("tool_choice must be 'none', 'auto', 'required', a tool name or "
                        f"{{'type': 'function', 'function': {{'name': ...}}}}, not {type(tool_choice).__name__}")
    if name not in names:
        raise ValueError(f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names)})")
    return {"type": "function", "function": {"name": name}}


def _forced_tools(tools: List[Dict[str, Any]], choice: Union[str, Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """The tools one of which must be called (None: no call is forced)."""
    if choice == "required":
        return tools
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return [t for t in tools if t["function"]["name"] == name]
    return None


# ---------------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """How a model's chat template handles tools.

    ``style``: the call format the template teaches (and the grammar of a forced call uses):
    ``"hermes"`` (``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``: Hermes 2/3,
    Qwen 2.5/3 and others), ``"llama3"`` (``{"name": ..., "parameters": ...}``: Llama 3.1-3.3),
    ``"mistral"`` (``[TOOL_CALLS][{"name": ..., "arguments": ...}]``) or ``"json"`` (``{"name":
    ..., "arguments": ...}``: the generic format, and templates whose own call format is none of
    the above).
    ``native_tools``: the template shows ``tools`` itself (else :data:`GENERIC_TOOL_PROMPT` does).
    ``native_history``: the template renders assistant ``tool_calls`` and ``tool`` messages
    (else they are rewritten as text: the calls as JSON, the results as user messages).
    """

    style: str = "json"
    native_tools: bool = False
    native_history: bool = False


GENERIC = ToolFormat()

_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool", "description": "probe",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}}}}
_PROBE_ID = "pRobe0001"            # 9 alphanumeric characters: Mistral's templates insist on them
_PROBE_VALUE = "probe-arg-value"
_PROBE_RESULT = "probe-result-text"

_formats: "weakref.WeakKeyDictionary[Any, ToolFormat]" = weakref.WeakKeyDictionary()
_formats_lock = threading.Lock()


class _Quiet(logging.Filter):
    """Hides the chat module's "cannot show tools" warnings while the template is probed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _try_render(template: Any, messages: List[Dict[str, Any]], **kw: Any) -> Optional[str]:
    render = getattr(template, "render_chat", None) or template.render   # an LLM, or its chat formatter
    try:
        return render(messages, **kw)
    except Exception:  # noqa: BLE001 - a template that cannot render this is a template without it
        return None


def detect_tool_format(llm: Any) -> ToolFormat:
    """How `llm`'s chat template handles tools, found by rendering a probe conversation
    (cached per LLM).  `llm` may also be a chat formatter (what the LLM itself passes).
    See :class:`ToolFormat`."""
    with _formats_lock:
        cached = _formats.get(llm)
    if cached is not None:
        return cached
    user = {"role": "user", "content": "probe question"}
    call = {"role": "assistant", "content": "", "tool_calls": [{
        "id": _PROBE_ID, "type": "function",
        "function": {"name": "probe_tool", "arguments": {"probe_arg": _PROBE_VALUE}}}]}
    result = {"role": "tool", "tool_call_id": _PROBE_ID, "name": "probe_tool", "content": _PROBE_RESULT}
    quiet = _Quiet()
    logger.addFilter(quiet)
    try:
        plain = _try_render(llm, [user])
        with_tools = _try_render(llm, [user], tools=[_PROBE_TOOL])
        history = _try_render(llm, [user, call, result], tools=[_PROBE_TOOL])
        if history is None:
            history = _try_render(llm, [user, call, result])
    finally:
        logger.removeFilter(quiet)
    native_tools = with_tools is not None and plain is not None and with_tools != plain
    native_history = history is not None and _PROBE_VALUE in history and _PROBE_RESULT in history
    seen = (with_tools or "") + (history or "") if (native_tools or native_history) else ""
    if "<tool_call>" in seen:
        style = "hermes"
    elif "[TOOL_CALLS]" in seen or "[AVAILABLE_TOOLS]" in seen:
        style = "mistral"
    elif re.search(r'"name":\s*"probe_tool",\s*"parameters"', seen) or "<|python_tag|>" in seen \
            or "Environment: ipython" in seen:
        style = "llama3"
    else:
        style = "json"
    fmt = ToolFormat(style, native_tools, native_history)
    with _formats_lock:
        try:
            _formats[llm] = fmt
        except TypeError:   # not weak-referenceable: just do not cache
            pass
    return fmt


# ---------------------------------------------------------------------------------- messages


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) and "type" in p for p in content):
        return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return json.dumps(content, ensure_ascii=False)


def _arguments_dict(arguments: Any, where: str) -> Any:
    """Arguments as templates want them (a dict); a JSON string is decoded, other text kept."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):   # too deep to decode: keep it as text
            return arguments
        return value
    if isinstance(arguments, Mapping):
        return dict(arguments)
    raise TypeError(f"{where}: 'arguments' must be a JSON string or a dict, not {type(arguments).__name__}")


def _short_id(call_id: str) -> str:
    """A 9-character alphanumeric stand-in for a call id (Mistral's templates require it)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    return hashlib.sha1(call_id.encode("utf-8")).hexdigest()[:9]


def _normalise_history(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Copies of the messages with assistant tool_calls in OpenAI's shape (ids filled in,
    arguments as dicts) and tool messages carrying their tool's name and text content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, not {type(messages).__name__}")
    out: List[Dict[str, Any]] = []
    names_by_id: Dict[str, str] = {}
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(msg).__name__}")
        m = dict(msg)
        _check_nesting(m, f"messages[{i}]")
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
                raise TypeError(f"messages[{i}]['tool_calls'] must be a list, not {type(calls).__name__}")
            new_calls = []
            for j, call in enumerate(calls):
                where = f"messages[{i}]['tool_calls'][{j}]"
                if not isinstance(call, Mapping):
                    raise TypeError(f"{where} must be a dict, not {type(call).__name__}")
                fn = call.get("function", call)
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"{where} needs a function name: "
                                     "{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
                call_id = call.get("id") or new_call_id()
                if not isinstance(call_id, str):
                    raise TypeError(f"{where}['id'] must be a str, not {type(call_id).__name__}")
                names_by_id[call_id] = fn["name"]
                new_calls.append({"id": call_id, "type": "function", "function": {
                    "name": fn["name"], "arguments": _arguments_dict(fn.get("arguments"), where)}})
            m["tool_calls"] = new_calls
            if m.get("content") is None:
                m["content"] = ""
        elif role == "assistant" and "tool_calls" in m:
            m.pop("tool_calls")   # an empty list or None: a plain answer
            if m.get("content") is None:
                m["content"] = ""
        elif role == "tool":
            m["content"] = _text(m.get("content"))
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise TypeError(f"messages[{i}]['tool_call_id'] must be a str, not {type(call_id).__name__}")
            if not m.get("name") and call_id in names_by_id:
                m["name"] = names_by_id[call_id]
        out.append(m)
    return out


def _generic_call_text(call: Mapping[str, Any]) -> str:
    fn = call["function"]
    return json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)


def _history_as_text(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Tool calls written into the assistant's text (generic JSON) and tool results as user
    messages, consecutive user messages merged (templates that insist on alternating roles)."""
    out: List[Dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            lines = [_text(m.get("content"))] if _text(m.get("content")).strip() else []
            lines += [_generic_call_text(c) for c in m["tool_calls"]]
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = "\n".join(lines)
        elif role == "tool":
            who = m.get("name") or "a tool"
            cid = f", call {m['tool_call_id']}" if m.get("tool_call_id") else ""
            m = {"role": "user", "content": f"{TOOL_RESULT_PREFIX} ({who}{cid}):\n{m['content']}"}
            if out and out[-1].get("role") == "user" and isinstance(out[-1].get("content"), str):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
                continue
        elif role == "user" and out and out[-1].get("role") == "user" and \
                str(out[-1].get("content", "")).startswith(TOOL_RESULT_PREFIX) and isinstance(m.get("content"), str):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
            continue
        out.append(m)
    return out


def _generic_prompt(tools: Sequence[Mapping[str, Any]], choice: Union[str, Dict[str, Any]]) -> str:
    listing = json.dumps([{"name": t["function"]["name"], "description": t["function"]["description"],
                           "parameters": t["function"]["parameters"]} for t in tools], ensure_ascii=False)
    if choice == "required":
        must = "\n\nCall one of the tools now."
    elif isinstance(choice, dict):
        must = f"\n\nCall the tool {choice['function']['name']!r} now."
    else:
        must = ""
    return GENERIC_TOOL_PROMPT.format(tools=listing, choice=must)


def prepare_messages(llm: Any, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]],
                     tool_choice: Union[str, Dict[str, Any]] = "auto",
                     fmt: Optional[ToolFormat] = None) -> Tuple[List[Dict[str, Any]], Optional[List[Dict[str, Any]]]]:
    """The messages (and the ``tools`` argument) to render for `llm`'s template.

    Assistant tool calls and tool results are put into the shape templates expect (arguments
    as a dict, tool names on tool messages, 9-character ids for Mistral); when the template
    cannot render them, they are rewritten as text.  When the template does not show tools,
    :data:`GENERIC_TOOL_PROMPT` goes into the system message and the returned tools are None.
    `tools=None` (or tool_choice "none"): the history is prepared, no tools are shown.
    """
    fmt = fmt or detect_tool_format(llm)
    if tools:
        tools = validate_tools(tools)
        tool_choice = normalize_tool_choice(tool_choice, tools)
    msgs = _normalise_history(messages)
    if not fmt.native_history:
        msgs = _history_as_text(msgs)
    elif fmt.style == "mistral":
        for m in msgs:
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "id": _short_id(c["id"])} for c in m["tool_calls"]]
            if m.get("role") == "tool" and isinstance(m.get("tool_call_id"), str):
                m["tool_call_id"] = _short_id(m["tool_call_id"])
    if not tools or tool_choice == "none":
        return msgs, None
    if fmt.native_tools:
        return msgs, [dict(t) for t in tools]
    note = _generic_prompt(tools, tool_choice)
    if msgs and msgs[0].get("role") == "system":
        first = _text(msgs[0].get("content"))
        msgs[0] = {**msgs[0], "content": (first + "\n\n" + note).strip()}
    else:
        msgs.insert(0, {"role": "system", "content": note})
    return msgs, None


def _add_special(llm: Any, prompt: str) -> bool:
    """False when the rendered prompt already starts with the BOS token's text."""
    vocab = llm.vocab
    bos = getattr(vocab, "bos", -1)
    if bos is None or bos < 0:
        return True
    try:
        text = vocab.token_text(bos)
    except Exception:  # noqa: BLE001
        return True
    return not (text and prompt.startswith(text))


def _prompt_for(llm: Any, msgs: List[Dict[str, Any]], *, tools: Optional[List[Dict[str, Any]]],
                allow_special_in_messages: bool, allow_files: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """(prompt, how to tokenize it) for llm.complete: the template's tokens, with message
    contents kept as data (text spelling a control token stays text) where the LLM can do that;
    a MediaPrompt when messages hold images (LLM.chat_prompt)."""
    if hasattr(llm, "chat_prompt"):
        return llm.chat_prompt(msgs, tools=tools, allow_special_in_messages=allow_special_in_messages,
                               allow_files=allow_files), {}
    if hasattr(llm, "chat_tokens"):
        return llm.chat_tokens(msgs, tools=tools, allow_special_in_messages=allow_special_in_messages), {}
    prompt = llm.render_chat(msgs, tools=tools) if tools is not None else llm.render_chat(msgs)
    return prompt, {"add_special": _add_special(llm, prompt), "parse_special": True}


def render_tool_prompt(llm: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                       tool_choice: Any = "auto") -> Tuple[str, bool, ToolFormat]:
    """``(prompt, add_special, format)``: the prompt text for a conversation with tools
    (tokenize it with ``add_special`` and ``parse_special=True``)."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    fmt = detect_tool_format(llm)
    msgs, shown = prepare_messages(llm, messages, tools, choice, fmt)
    prompt = llm.render_chat(msgs, tools=shown) if shown is not None else llm.render_chat(msgs)
    return prompt, _add_special(llm, prompt), fmt


# ---------------------------------------------------------------------------------- grammars


# Keywords whose values are JSON data, not schemas: a {"$ref": ...} inside them is data.
_DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples", "example"))


def _rewrite_refs(schema: Any, home: str) -> bool:
    """Point the local ``$ref`` s of `schema` (a tool's parameters, changed in place) at
    `home`, the JSON pointer where the wrapper keeps a copy of it: ``#/$defs/Item`` becomes
    ``<home>/$defs/Item``, ``#`` becomes `home`.  True when there was one.  Iterative: the
    schema's depth was checked, but this must not recurse on it either."""
    found = False
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = home + ref[1:]
            found = True
        stack.extend(v for k, v in node.items() if k not in _DATA_KEYWORDS)
    return found


def _parameters_schema(fn: Mapping[str, Any], defs: Dict[str, Any]) -> Dict[str, Any]:
    """The schema of one tool's arguments inside the call wrapper of :func:`tool_call_schema`.

    Its ``$ref`` s are written for the tool's own schema (``#`` is the parameters object), so
    they are rewritten to point at a copy of that schema kept under the wrapper's ``$defs``
    (one entry per tool, named after it): refs resolve exactly as in the tool's schema, and
    two tools' same-named ``$defs`` (or ``definitions``) stay apart."""
    name = str(fn["name"])
    params = copy.deepcopy(dict(fn.get("parameters") or {"type": "object", "properties": {}}))
    params.pop("title", None)
    params.setdefault("type", "object")
    key = name if _NAME_RE.match(name) else f"tool-{len(defs)}"
    while key in defs:
        key += "-"
    if _rewrite_refs(params, f"#/$defs/{key}"):
        defs[key] = copy.deepcopy(params)   # what the refs resolve in
        # The copy above carries the tool's $defs; the arguments themselves need not.
        for defs_key in ("$defs", "definitions"):
            params.pop(defs_key, None)
    return params


def tool_call_schema(tools: Sequence[Mapping[str, Any]], *, arguments_key: str = "arguments") -> Dict[str, Any]:
    """JSON schema of one call of one of `tools`: ``{"name": <const>, <arguments_key>: <the
    tool's parameters>}`` (``arguments_key`` is ``"parameters"`` for Llama 3.x).

    A tool's ``$ref`` s keep their meaning: each tool's parameters are kept whole under the
    wrapper's ``$defs`` (named after the tool) and its refs point there, so ``#`` and
    ``#/$defs/X`` resolve in the tool's own schema, never in the wrapper or another tool."""
    defs: Dict[str, Any] = {}
    options = []
    for tool in tools:
        fn = tool["function"] if "function" in tool else tool
        _check_nesting(fn.get("parameters"), f"the parameters of tool {fn.get('name')!r}")
        options.append({"type": "object",
                        "properties": {"name": {"const": fn["name"]}, arguments_key: _parameters_schema(fn, defs)},
                        "required": ["name", arguments_key]})
    schema: Dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


_WRAPPERS = {   # style -> (text before the JSON call, text after, JSON is a one-element list)
    "hermes": ("<tool_call>\\n", "\\n</tool_call>", False),
    "mistral": ("[TOOL_CALLS]", "", True),
    "llama3": ("", "", False),
    "json": ("", "", False),
}


@functools.lru_cache(maxsize=64)
def _grammar_cached(schema_json: str, style: str) -> str:
    from pyllama.grammar import json_schema_to_gbnf

    before, after, as_list = _WRAPPERS[style]
    body = json_schema_to_gbnf(json.loads(schema_json), root="tool-call")
    # One line, as templates write calls (and fewer tokens): at most one space between JSON tokens.
    body = re.sub(r"^ws ::= .*$", 'ws ::= | " "', body, flags=re.M)
    if re.search(r"^root\s*::=", body, re.M):   # a property named "root" could take the name
        raise ValueError("cannot build the tool call grammar: a rule named 'root' clashes")
    call = '"[" tool-call "]"' if as_list else "tool-call"
    parts = [f'"{before}"' if before else "", call, f'"{after}"' if after else ""]
    return "root ::= " + " ".join(p for p in parts if p) + "\n" + body


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], style: str = "json") -> str:
    """GBNF text whose outputs are exactly one call of one of `tools` in `style`'s format
    (see :class:`ToolFormat`), with arguments valid under the tool's ``parameters``."""
    if style not in _WRAPPERS:
        raise ValueError(f"unknown tool call style {style!r} (use one of {', '.join(_WRAPPERS)})")
    key = "parameters" if style == "llama3" else "arguments"
    schema = tool_call_schema(tools, arguments_key=key)
    return _grammar_cached(json.dumps(schema), style)   # key order matters: "name" first


# ---------------------------------------------------------------------------------- chat


_GRAMMAR_KEYS = ("grammar", "grammar_path", "json_schema")


def _set_fields(comp: Any, tool_calls: Optional[List[Dict[str, Any]]], content: Optional[str]) -> Any:
    """A copy of `comp` with tool_calls, content and finish_reason set."""
    reason = "tool_calls" if tool_calls else comp.finish_reason
    names = {f.name for f in dataclasses.fields(comp)} if dataclasses.is_dataclass(comp) else set()
    updates: Dict[str, Any] = {"finish_reason": reason}
    if "tool_calls" in names:
        updates["tool_calls"] = tool_calls
    if "content" in names:
        updates["content"] = content
    new = dataclasses.replace(comp, **updates) if names else comp
    if "tool_calls" not in names:   # Completion without these fields yet: plain attributes
        new.tool_calls = tool_calls
    if "content" not in names:
        new.content = content
    if not names:
        new.finish_reason = reason
    return new


def _finish(comp: Any, tools: List[Dict[str, Any]], reasoning: Any = None) -> Any:
    """`comp` with its tool calls parsed.  With a reasoning model's configuration
    (pyllama.chat.reasoning), calls are read from the answer only (a call the model wrote
    while thinking is no call), and the thinking goes where its format says."""
    if reasoning is None or not reasoning.active:
        content, calls = parse_tool_calls(comp.text, tools)
        return _set_fields(comp, calls or None, content)
    from pyllama.chat.reasoning import apply_to_completion, partition

    parts = partition(comp.text, reasoning)
    head, _, answer = parts
    content, calls = parse_tool_calls(answer, tools)
    if head and not reasoning.separates:     # reasoning_format "none"/"deepseek-legacy": the thinking is content
        content = (head + (content or "")).strip() or None
    return _set_fields(apply_to_completion(comp, reasoning, parts), calls or None, content)


class ToolStream:
    """What ``chat_with_tools(..., stream=True)`` returns: an iterator that yields the final
    content once (the text outside tool calls; nothing when there is none) after generating
    the whole answer.  ``.completion`` holds the Completion (with ``tool_calls``)."""

    def __init__(self, completion: Any) -> None:
        self.completion = completion
        self.completions = [completion]
        self._pending = [completion.content] if completion.content else []

    def __iter__(self) -> "ToolStream":
        return self

    def __next__(self) -> str:
        if not self._pending:
            raise StopIteration
        return self._pending.pop(0)

    def close(self) -> None:
        self._pending = []


class ToolPlan:
    """Tool calling as a plan, data that an LLM runs like any other request (sync or async,
    batched with every other caller, cancellable); nothing here generates.

    * :attr:`messages`: the conversation prepared for the template (calls and results in the
      shape it renders, or as text; the generic tool prompt in the system message);
    * :attr:`prompt_args`: how to render them (``LLM.chat_prompt`` keyword arguments: the
      ``tools`` the template shows, special-token and file permissions);
    * :attr:`prompt`: the rendered prompt, once someone rendered it (:func:`plan_tool_chat`
      does; the LLM renders its own);
    * :attr:`options`: ``LLM.complete`` keyword arguments (sampling overrides with the grammar
      of a forced call, ``n``, logprobs, ``max_tokens`` ...);
    * :meth:`finish`: the parser that turns the finished Completion(s) into
      ``tool_calls``/``content``;
    * :attr:`reasoning`: a reasoning model's configuration (pyllama.chat.reasoning), set by
      the LLM: calls are parsed from the answer after the thinking, which goes to
      ``reasoning``.

    ``tools is None`` means ``tool_choice="none"``: a plain chat of :attr:`messages`, with
    :attr:`options` as ``LLM.chat`` keyword arguments, nothing to parse.
    """

    __slots__ = ("messages", "prompt_args", "prompt", "options", "tools", "stream", "reasoning")

    def __init__(self, messages: List[Dict[str, Any]], prompt_args: Dict[str, Any], options: Dict[str, Any],
                 tools: Optional[List[Dict[str, Any]]], stream: bool = False) -> None:
        self.messages = messages
        self.prompt_args = prompt_args
        self.prompt: Any = None
        self.options = options
        self.tools = tools
        self.stream = stream
        self.reasoning: Any = None     # a ReasoningConfig: calls are parsed from the answer only

    def finish(self, result: Any) -> Any:
        """The Completion (list of them when n > 1) with tool_calls, content and finish_reason
        set; a :class:`ToolStream` over it when the plan was made with ``stream=True``."""
        if self.tools is None:
            return result
        if isinstance(result, list):
            return [_finish(c, self.tools, self.reasoning) for c in result]
        comp = _finish(result, self.tools, self.reasoning)
        return ToolStream(comp) if self.stream else comp


def plan_chat(template: Any, messages: Sequence[Mapping[str, Any]], *, tools: Any, tool_choice: Any = "auto",
              stream: bool = False, **kwargs: Any) -> ToolPlan:
    """Validate a conversation with tools and make the :class:`ToolPlan` that answers it,
    without rendering its prompt.  `template` renders conversations: an LLM or its chat
    formatter (anything :func:`detect_tool_format` takes).  Other arguments as
    :func:`chat_with_tools`; bad input raises before any work."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    kwargs = dict(kwargs)
    allow_special = bool(kwargs.pop("allow_special_in_messages", False))
    allow_files = bool(kwargs.pop("allow_files", True))
    if stream and kwargs.get("n", 1) not in (None, 1):
        raise ValueError("stream=True with tools and n > 1 is not supported; use stream=False")
    fmt = detect_tool_format(template)
    response_format = kwargs.pop("response_format", None)
    if response_format is not None and (not isinstance(response_format, Mapping)
                                        or response_format.get("type") not in (None, "text")):
        if choice != "none":
            raise ValueError("response_format cannot be combined with tools (a reply is either a tool call or "
                             "text); leave response_format out, or use tool_choice='none'")
    if choice == "none":
        msgs, _ = prepare_messages(template, messages, None, choice, fmt)
        if response_format is not None:
            kwargs["response_format"] = response_format
        if allow_special:
            kwargs["allow_special_in_messages"] = True
        if not allow_files:
            kwargs["allow_files"] = False
        return ToolPlan(msgs, {}, kwargs, None, stream)
    forced = _forced_tools(tools, choice)
    if forced is not None:
        given = [k for k in _GRAMMAR_KEYS if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"{given[0]} cannot be combined with tool_choice={tool_choice!r}: the tool call "
                             "grammar constrains the reply; use tool_choice='auto' with your own grammar")
        for k in _GRAMMAR_KEYS:
            kwargs.pop(k, None)
        kwargs["grammar"] = tool_call_grammar(forced, fmt.style)
    msgs, shown = prepare_messages(template, messages, tools, choice, fmt)
    prompt_args = {"tools": shown, "allow_special_in_messages": allow_special, "allow_files": allow_files}
    return ToolPlan(msgs, prompt_args, kwargs, tools, stream)


def plan_tool_chat(llm: Any, messages: Sequence[Mapping[str, Any]], *, tools: Any, tool_choice: Any = "auto",
                   stream: bool = False, **kwargs: Any) -> ToolPlan:
    """:func:`plan_chat` for a caller that runs the plan with ``llm.complete(plan.prompt,
    **plan.options)`` itself: the prompt is rendered too (``llm.chat_prompt``)."""
    plan = plan_chat(llm, messages, tools=tools, tool_choice=tool_choice, stream=stream, **kwargs)
    if plan.tools is not None:
        plan.prompt, how = _prompt_for(llm, plan.messages, **plan.prompt_args)
        plan.options = {**how, **plan.options}
    return plan


def chat_with_tools(llm: Any, messages: Sequence[Mapping[str, Any]], *, tools: Any, tool_choice: Any = "auto",
                    stream: bool = False, **kwargs: Any) -> Any:
    """Answer a conversation with tools available; returns a :class:`pyllama.llm.Completion`
    (a list of them when ``n > 1``) with ``tool_calls`` (OpenAI-shaped list, or None),
    ``content`` (the text outside tool calls, or None) and ``finish_reason == "tool_calls"``
    when calls were made.

    ``tool_choice``: ``"auto"`` (default; the model decides, calls are parsed from its text),
    ``"required"`` (a call of one of the tools, forced by a grammar), a tool's name or
    ``{"type": "function", "function": {"name": ...}}`` (a call of that tool, forced), or
    ``"none"`` (no tools shown; plain chat).  A forced call is exactly one call.
    ``allow_special_in_messages``: message text that spells a control token stays text unless
    it is True.
    ``stream=True``: the answer is generated whole, then the returned :class:`ToolStream`
    yields its content once.  Other keyword arguments are ``llm.chat``'s (sampling,
    ``max_tokens``, ``n``, ...); a grammar of your own only combines with ``"auto"``.

    The same as ``llm.chat(messages, tools=tools, tool_choice=tool_choice, ...)``, which plans
    with :func:`plan_chat` and runs the plan.
    """
    validate_tools(tools)   # an empty list is an error here (llm.chat takes it for no tools)
    return llm.chat(messages, tools=tools, tool_choice=tool_choice, stream=stream, **kwargs)
