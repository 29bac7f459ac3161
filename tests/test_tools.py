"""Tool calling (pyllama.tools): validation, the template formats, parsing, grammars, and real
generation on SmolLM2 and Gemma 3.

The template-format tests render real chat templates (Qwen 2.5's Hermes format, Llama 3.2's JSON
calls, Mistral-Nemo's [TOOL_CALLS]) through a vocab-only LLM loaded with that template; the
generation tests run SmolLM2 (also with Qwen 2.5's template, to exercise the <tool_call> grammar)
and Gemma 3 270M, one load per model for the module.
"""

from __future__ import annotations

import json
import re

import pytest

import pyllama
from pyllama import tools as T

jsonschema = pytest.importorskip("jsonschema")

THREADS = 2

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 24, "description": "the city name"},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 32}},
                   "required": ["timezone"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object",
                   "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                  "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

PROMPTS = ["What is the weather in Paris?", "What time is it in Tokyo?", "What is 17 plus 25?"]


def _check_call(call: dict, name: str | None = None) -> dict:
    """An OpenAI-shaped call whose arguments validate against the tool's schema; returns them."""
    assert set(call) == {"id", "type", "function"}
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 8
    fn = call["function"]
    assert isinstance(fn["arguments"], str)
    args = json.loads(fn["arguments"])
    if name is not None:
        assert fn["name"] == name
    jsonschema.validate(args, SCHEMAS[fn["name"]])
    return args


# --------------------------------------------------------------------------- chat templates with tools

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct): Hermes-style tools.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3.2 Instruct's chat template (JSON tool calls with "parameters"; results in the ipython role).
LLAMA32_TEMPLATE = '{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0][\'role\'] == \'system\' %}\n    {%- set system_message = messages[0][\'content\']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n{#- System message #}\n{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0][\'content\']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n{%- endif %}\n    {{- \'<|start_header_id|>user<|end_header_id|>\\n\\n\' -}}\n    {{- "Given the following functions, please respond with a JSON for a function call " }}\n    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == \'ipython\' or message.role == \'tool\' or \'tool_calls\' in message) %}\n        {{- \'<|start_header_id|>\' + message[\'role\'] + \'<|end_header_id|>\\n\\n\'+ message[\'content\'] + \'<|eot_id|>\' }}\n    {%- elif \'tool_calls\' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' -}}\n        {{- \'{"name": "\' + tool_call.name + \'", \' }}\n        {{- \'"parameters": \' }}\n        {{- tool_call.arguments | tojson }}\n        {{- "}" }}\n        {{- "<|eot_id|>" }}\n    {%- elif message.role == "tool" or message.role == "ipython" %}\n        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' }}\n{%- endif %}\n'

# Mistral-Nemo-Instruct-2407's template (as in llama.cpp's tests/test-chat-template.cpp):
# [AVAILABLE_TOOLS], [TOOL_CALLS][...], [TOOL_RESULTS] and 9-character call ids.
MISTRAL_NEMO_TEMPLATE = "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n            {{- raise_exception(\"After the optional system message, conversation roles must alternate user/assistant/user/assistant/...\") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n            {{- \"[AVAILABLE_TOOLS][\" }}\n            {%- for tool in tools %}\n                {%- set tool = tool.function %}\n                {{- '{\"type\": \"function\", \"function\": {' }}\n                {%- for key, val in tool.items() if key != \"return\" %}\n                    {%- if val is string %}\n                        {{- '\"' + key + '\": \"' + val + '\"' }}\n                    {%- else %}\n                        {{- '\"' + key + '\": ' + val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last %}\n                        {{- \", \" }}\n                    {%- endif %}\n                {%- endfor %}\n                {{- \"}}\" }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- else %}\n                    {{- \"]\" }}\n                {%- endif %}\n            {%- endfor %}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n        {%- if loop.last and system_message is defined %}\n            {{- \"[INST]\" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n        {%- else %}\n            {{- \"[INST]\" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}\n        {{- \"[TOOL_CALLS][\" }}\n        {%- for tool_call in message.tool_calls %}\n            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n            {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n            {%- if not loop.last %}\n                {{- \", \" }}\n            {%- else %}\n                {{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- message[\"content\"] + eos_token}}\n    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n        {%- if message.content is defined and message.content.content is defined %}\n            {%- set content = message.content.content %}\n        {%- else %}\n            {%- set content = message.content %}\n        {%- endif %}\n        {{- '[TOOL_RESULTS]{\"content\": ' + content|string + \", \" }}\n        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n            {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n        {%- endif %}\n        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n"

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    llm = pyllama.LLM(str(smollm2_path), n_ctx=1024, n_threads=THREADS, temperature=0)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gemma(gemma_path):
    llm = pyllama.LLM(str(gemma_path), n_ctx=1024, n_threads=THREADS, temperature=0)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def smollm2_hermes(smollm2_path):
    """SmolLM2 speaking Qwen 2.5's template: tools in the system prompt, <tool_call> tags."""
    llm = pyllama.LLM(str(smollm2_path), n_ctx=1024, n_threads=THREADS, temperature=0,
                      chat_template=QWEN25_TEMPLATE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def with_template(smollm2_path):
    """factory(template) -> a vocab-only LLM rendering with that template (cheap: no weights)."""
    made = {}

    def factory(template):
        if template not in made:
            made[template] = pyllama.LLM(str(smollm2_path), vocab_only=True, chat_template=template)
        return made[template]

    yield factory
    for llm in made.values():
        llm.close()


@pytest.fixture(params=["smollm2", "gemma"])
def model(request):
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- validation


def test_validate_tools_normalises_copies():
    bare = {"function": {"name": "ping"}}                   # "type" and "parameters" may be left out
    out = T.validate_tools([WEATHER, bare])
    assert out[0] == {"type": "function", "function": WEATHER["function"]} and out[0] is not WEATHER
    assert out[1] == {"type": "function", "function": {"name": "ping", "description": "",
                                                       "parameters": {"type": "object", "properties": {}}}}
    out[0]["function"]["parameters"]["properties"]["city"]["maxLength"] = 1
    assert WEATHER["function"]["parameters"]["properties"]["city"]["maxLength"] == 24   # deep copies


@pytest.mark.parametrize("tools,exc,match", [
    ("get_weather", TypeError, "list of tool dicts"),
    (WEATHER, TypeError, "list of tool dicts"),
    ([], ValueError, "empty"),
    ([WEATHER, "x"], TypeError, r"tools\[1\]"),
    ([{"type": "retrieval", "function": {"name": "f"}}], ValueError, "only 'function'"),
    ([{"type": "function"}], ValueError, r"tools\[0\] has no 'function'"),
    ([{"type": "function", "function": {"name": 3}}], TypeError, "name'] must be a str"),
    ([{"type": "function", "function": {"name": "get weather!"}}], ValueError, "'get weather!'"),
    ([WEATHER, WEATHER], ValueError, r"'get_weather'.*also used by tools\[0\]"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], TypeError, r"'f'.*JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], ValueError,
     r"'f'.*must describe an object"),
    ([{"type": "function", "function": {"name": "f", "description": 1}}], TypeError, r"'f'.*description"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}],
     TypeError, r"'f'.*required"),
])
def test_bad_tools_raise_clearly(tools, exc, match):
    with pytest.raises(exc, match=match):
        T.validate_tools(tools)


def test_tool_choice_forms():
    tools = T.validate_tools(TOOLS)
    named = {"type": "function", "function": {"name": "get_time"}}
    assert T.normalize_tool_choice(None, tools) == "auto"
    for word in ("none", "auto", "required"):
        assert T.normalize_tool_choice(word, tools) == word
    assert T.normalize_tool_choice("get_time", tools) == named
    assert T.normalize_tool_choice(named, tools) == named
    assert T.normalize_tool_choice({"type": "function", "name": "get_time"}, tools) == named


@pytest.mark.parametrize("choice,exc,match", [
    ("nope", ValueError, r"'nope'.*get_weather, get_time, add"),
    ({"type": "function", "function": {"name": "nope"}}, ValueError, "'nope'"),
    ({"type": "tool", "function": {"name": "add"}}, ValueError, "type 'tool'"),
    ({"type": "function", "function": "add"}, ValueError, "must be"),
    ({"type": "function", "function": {"name": 1}}, TypeError, "must be a str"),
    (3, TypeError, "tool_choice must be"),
    (True, TypeError, "tool_choice must be"),
])
def test_bad_tool_choice_raises_clearly(choice, exc, match):
    with pytest.raises(exc, match=match):
        T.normalize_tool_choice(choice, T.validate_tools(TOOLS))


def test_bad_input_to_chat_with_tools_raises_before_generating(smollm2):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="'nope'"):
        T.chat_with_tools(smollm2, msgs, tools=TOOLS, tool_choice="nope")
    with pytest.raises(TypeError, match="list of tool dicts"):
        T.chat_with_tools(smollm2, msgs, tools=WEATHER)
    with pytest.raises(ValueError, match="grammar cannot be combined"):
        T.chat_with_tools(smollm2, msgs, tools=TOOLS, tool_choice="required", grammar='root ::= "a"')
    with pytest.raises(ValueError, match="response_format"):
        T.chat_with_tools(smollm2, msgs, tools=TOOLS, response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="n > 1"):
        T.chat_with_tools(smollm2, msgs, tools=TOOLS, stream=True, n=2)
    bad_history = msgs + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {}}]}]
    with pytest.raises(ValueError, match=r"messages\[1\]\['tool_calls'\]\[0\]"):
        T.chat_with_tools(smollm2, bad_history, tools=TOOLS)


# --------------------------------------------------------------------------- parsing, one test per format


def _calls(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


def test_parse_hermes_tags():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>')
    parsed = T.parse_tool_calls(text, TOOLS)
    assert parsed.content == "Let me check."
    assert _calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]
    ids = [c["id"] for c in parsed.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    # an unterminated block (cut off after the JSON) still counts; arguments given as a JSON string too
    cut = T.parse_tool_calls('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', TOOLS)
    assert cut.content is None and _calls(cut) == [("add", {"a": 1, "b": 2})]


def test_parse_mistral_tool_calls():
    text = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_time", "arguments": {}}]'
    parsed = T.parse_tool_calls(text, TOOLS)
    assert parsed.content is None and _calls(parsed) == [("add", {"a": 1, "b": 2}), ("get_time", {})]
    # the [TOOL_CALLS] control token may be missing from the text: the bare list still parses
    bare = T.parse_tool_calls(' [{"name": "add", "arguments": {"a": 3, "b": 4}}]', TOOLS)
    assert bare.content is None and _calls(bare) == [("add", {"a": 3, "b": 4})]


def test_parse_llama3_json_and_python_tag():
    parsed = T.parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}', TOOLS)
    assert parsed.content is None and _calls(parsed) == [("get_weather", {"city": "Oslo"})]
    tagged = T.parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                                '{"name": "get_time", "parameters": {"timezone": "UTC"}}', TOOLS)
    assert tagged.content is None
    assert _calls(tagged) == [("add", {"a": 1, "b": 2}), ("get_time", {"timezone": "UTC"})]


def test_parse_generic_json():
    assert _calls(T.parse_tool_calls('  {"name": "add", "arguments": {"a": 1, "b": 2}}\n', TOOLS)) == \
        [("add", {"a": 1, "b": 2})]
    fenced = T.parse_tool_calls('```json\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n```', TOOLS)
    assert fenced.content is None and _calls(fenced) == [("get_time", {"timezone": "UTC"})]
    lines = T.parse_tool_calls('{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                               '{"name": "get_time", "arguments": {"timezone": "UTC"}}', TOOLS)
    assert lines.content is None and [n for n, _ in _calls(lines)] == ["add", "get_time"]
    inline = T.parse_tool_calls('Sure! {"name": "get_weather", "arguments": {"city": "Rome"}} One moment.', TOOLS)
    assert inline.content == "Sure!  One moment." and _calls(inline) == [("get_weather", {"city": "Rome"})]
    openai = T.parse_tool_calls('{"type": "function", "function": {"name": "add", "arguments": "{\\"a\\": 5, '
                                '\\"b\\": 6}"}}', TOOLS)
    assert _calls(openai) == [("add", {"a": 5, "b": 6})]


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    '{"name": "unknown_tool", "arguments": {}}',                         # not one of the tools
    '{"name": "add", "arguments": [1, 2]}',                               # arguments not an object
    '{"name": "add", "arguments": "not json"}',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call>',     # broken JSON
    '{"answer": "yes"}',
    "",
])
def test_parse_text_without_calls_is_content(text):
    parsed = T.parse_tool_calls(text, TOOLS)
    assert parsed.tool_calls == [] and parsed.content == (text.strip() or None)


# --------------------------------------------------------------------------- grammars


@pytest.mark.parametrize("style,root", [("hermes", 'root ::= "<tool_call>\\n" tool-call "\\n</tool_call>"'),
                                        ("llama3", "root ::= tool-call"),
                                        ("mistral", 'root ::= "[TOOL_CALLS]" "[" tool-call "]"'),
                                        ("json", "root ::= tool-call")])
def test_tool_call_grammar_is_accepted_by_llama_cpp(with_template, style, root):
    gbnf = T.tool_call_grammar(T.validate_tools(TOOLS), style)
    pyllama._core.validate_grammar(with_template("chatml").vocab, gbnf)   # llama.cpp's own parser
    assert gbnf.splitlines()[0] == root
    key = "parameters" if style == "llama3" else "arguments"
    schema = T.tool_call_schema(T.validate_tools([ADD]), arguments_key=key)
    assert list(schema["properties"]) == ["name", key] and schema["properties"]["name"] == {"const": "add"}
    assert T.tool_call_grammar([WEATHER], style) is T.tool_call_grammar([WEATHER], style)   # cached
    with pytest.raises(ValueError, match="unknown tool call style"):
        T.tool_call_grammar([WEATHER], "xml")


# --------------------------------------------------------------------------- templates and round trips


CALL_ID = "call_abc123def456"
ROUND_TRIP = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [   # as OpenAI sends it: arguments as a JSON string
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 C"},
]


@pytest.mark.parametrize("template,style,native", [
    (QWEN25_TEMPLATE, "hermes", True), (LLAMA32_TEMPLATE, "llama3", True), (MISTRAL_NEMO_TEMPLATE, "mistral", True),
    ("chatml", "json", False), (None, "json", False)],   # None: SmolLM2's own template (no tools)
    ids=["qwen2.5", "llama3.2", "mistral-nemo", "chatml", "smollm2"])
def test_detect_tool_format(with_template, template, style, native):
    fmt = T.detect_tool_format(with_template(template))
    assert fmt == T.ToolFormat(style, native, native)
    assert T.detect_tool_format(with_template(template)) is fmt   # cached per LLM


def test_round_trip_renders_in_hermes_format(with_template):
    prompt, add_special, fmt = T.render_tool_prompt(with_template(QWEN25_TEMPLATE), ROUND_TRIP, TOOLS)
    assert fmt.style == "hermes"
    assert prompt.startswith("<|im_start|>system\nYou are a weather bot.\n\n# Tools\n")
    assert json.dumps(WEATHER) in prompt                                  # the template lists the tools
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n") in prompt                          # arguments as an object, not a string
    assert prompt.endswith("<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert add_special is False   # SmolLM2's BOS token is <|im_start|>: the prompt already starts with it


def test_round_trip_renders_in_llama3_format(with_template):
    prompt, _, fmt = T.render_tool_prompt(with_template(LLAMA32_TEMPLATE), ROUND_TRIP, TOOLS)
    assert fmt.style == "llama3" and "Environment: ipython" in prompt
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris"}}<|eot_id|>') in prompt
    # (the template writes a str result with tojson: a str is "iterable" in Jinja, as in transformers)
    assert prompt.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21 C"<|eot_id|>'
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_round_trip_renders_in_mistral_format(with_template):
    prompt, _, fmt = T.render_tool_prompt(with_template(MISTRAL_NEMO_TEMPLATE), ROUND_TRIP, TOOLS)
    assert fmt.style == "mistral" and "[AVAILABLE_TOOLS]" in prompt
    call = re.search(r'\[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": \{"city": "Paris"\}, '
                     r'"id": "([A-Za-z0-9]{9})"\}\]', prompt)
    assert call, prompt                 # Mistral wants 9-character ids: the OpenAI id is mapped, consistently
    assert f'[TOOL_RESULTS]{{"content": sunny, 21 C, "call_id": "{call.group(1)}"}}[/TOOL_RESULTS]' in prompt


def test_round_trip_renders_generic_format(with_template, gemma):
    """Templates without tools (SmolLM2's, Gemma's built-in one that insists on alternating roles):
    the generic prompt, the call as JSON in the assistant's turn, the result as a user message."""
    convo = ROUND_TRIP + [{"role": "tool", "tool_call_id": "call_2", "content": {"humidity": 40}},
                          {"role": "user", "content": "And tomorrow?"}]
    result = 'Tool result (get_weather, call call_abc123def456):\nsunny, 21 C'
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    prompt, _, fmt = T.render_tool_prompt(with_template(None), convo, TOOLS)
    assert fmt == T.ToolFormat("json", False, False)
    assert prompt.startswith("<|im_start|>system\nYou are a weather bot.\n\nYou can call the following tools.")
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n" in prompt
    assert (f"<|im_start|>user\n{result}\n\nTool result (a tool, call call_2):\n" + '{"humidity": 40}'
            "\n\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n") in prompt
    prompt, _, _ = T.render_tool_prompt(gemma, convo, TOOLS)
    assert f"<start_of_turn>model\n{call}<end_of_turn>\n<start_of_turn>user\n{result}\n\n" in prompt
    assert T.GENERIC_TOOL_PROMPT.split("{tools}")[0] in prompt


def test_prepare_messages_without_tools_keeps_history_renderable(with_template):
    msgs, shown = T.prepare_messages(with_template(QWEN25_TEMPLATE), ROUND_TRIP, None)
    assert shown is None and msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2]["content"] == "" and msgs[3]["name"] == "get_weather"
    assert ROUND_TRIP[2]["content"] is None and "name" not in ROUND_TRIP[3]   # the caller's messages are untouched


# --------------------------------------------------------------------------- real generation


@pytest.mark.parametrize("choice", ["get_weather", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["name", "dict"])
def test_named_tool_choice_always_parses_and_validates(model, choice):
    name = choice if isinstance(choice, str) else choice["function"]["name"]
    for prompt in PROMPTS:
        comp = T.chat_with_tools(model, [{"role": "user", "content": prompt}], tools=TOOLS, tool_choice=choice,
                                 max_tokens=64)
        assert comp.finish_reason == "tool_calls", comp.text
        assert len(comp.tool_calls) == 1 and comp.content is None
        _check_call(comp.tool_calls[0], name)


def test_named_tool_choice_validates_when_sampling(model):
    for seed in (1, 2):
        comp = T.chat_with_tools(model, [{"role": "user", "content": PROMPTS[seed]}], tools=TOOLS,
                                 tool_choice="add", max_tokens=64, temperature=0.9, seed=seed)
        assert comp.finish_reason == "tool_calls", comp.text
        _check_call(comp.tool_calls[0], "add")


def test_required_always_yields_a_call(model):
    for prompt in PROMPTS[:2] + ["Say hello."]:
        comp = T.chat_with_tools(model, [{"role": "user", "content": prompt}], tools=TOOLS, tool_choice="required",
                                 max_tokens=64)
        assert comp.finish_reason == "tool_calls" and len(comp.tool_calls) >= 1, comp.text
        for call in comp.tool_calls:
            _check_call(call)


def test_auto_without_a_need_for_tools_gives_plain_content(model):
    comp = T.chat_with_tools(model, [{"role": "user", "content": "Say hello to me."}], tools=TOOLS,
                             max_tokens=24)
    assert comp.tool_calls is None and comp.finish_reason != "tool_calls"
    assert isinstance(comp.content, str) and comp.content and comp.content == comp.text.strip()


def test_hermes_template_forced_call_uses_tool_call_tags(smollm2_hermes):
    for prompt in PROMPTS[:2]:
        comp = T.chat_with_tools(smollm2_hermes, [{"role": "user", "content": prompt}], tools=TOOLS,
                                 tool_choice="get_weather", max_tokens=64)
        assert re.match(r'<tool_call>\n\{ ?"name" ?: ?"get_weather" ?, ?"arguments" ?: ?\{', comp.text), comp.text
        assert comp.text.endswith("}\n</tool_call>") and comp.finish_reason == "tool_calls"
        _check_call(comp.tool_calls[0], "get_weather")


@pytest.mark.parametrize("fixture,expect", [
    ("smollm2", "<|im_start|>user\nTool result (get_weather, call {id}):\nsunny, 21 C<|im_end|>\n"
                "<|im_start|>assistant\n"),
    ("smollm2_hermes", "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
                       "<|im_start|>assistant\n"),
    ("gemma", "<start_of_turn>user\nTool result (get_weather, call {id}):\nsunny, 21 C<end_of_turn>\n"
              "<start_of_turn>model\n"),
], ids=["smollm2-generic", "smollm2-hermes", "gemma-generic"])
def test_full_round_trip(request, monkeypatch, fixture, expect):
    """call -> tool message -> final answer: the result reaches the model in the template's format."""
    llm = request.getfixturevalue(fixture)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    comp = T.chat_with_tools(llm, msgs, tools=TOOLS, tool_choice="get_weather", max_tokens=64)
    call = comp.tool_calls[0]
    msgs += [{"role": "assistant", "content": comp.content, "tool_calls": comp.tool_calls},
             {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    text, _, _ = T.render_tool_prompt(llm, msgs, TOOLS)
    assert text.endswith(expect.format(id=call["id"]))
    args = json.loads(call["function"]["arguments"])
    assert json.dumps({"name": "get_weather", "arguments": args})[:-1] in text   # the call, arguments as an object
    prompts = []
    real = llm.complete

    def spy(prompt, **kw):
        prompts.append(prompt)
        return real(prompt, **kw)

    monkeypatch.setattr(llm, "complete", spy)
    final = T.chat_with_tools(llm, msgs, tools=TOOLS, max_tokens=32)
    assert len(prompts) == 1   # what the model saw: the same prompt
    seen = prompts[0] if isinstance(prompts[0], str) else llm.detokenize(prompts[0], unparse_special=True)
    assert seen.endswith(expect.format(id=call["id"]))
    if final.tool_calls:                 # the model may call again: then well-formed calls
        assert final.finish_reason == "tool_calls", final
        for c in final.tool_calls:
            _check_call(c)
    else:                                # or answer: then with text
        assert final.content and final.content.strip() and final.finish_reason in ("eog", "length", "stop"), final


def test_tool_choice_none_is_plain_chat(smollm2):
    convo = ROUND_TRIP[1:]
    comp = T.chat_with_tools(smollm2, convo, tools=TOOLS, tool_choice="none", max_tokens=16)
    plain = smollm2.chat(T.prepare_messages(smollm2, convo, None)[0], max_tokens=16)
    assert comp.text == plain.text


def test_stream_yields_the_content_once(smollm2):
    stream = T.chat_with_tools(smollm2, [{"role": "user", "content": "Say hello to me."}], tools=TOOLS,
                               stream=True, max_tokens=16)
    pieces = list(stream)
    assert pieces == [stream.completion.content] and stream.completion.tool_calls is None
    forced = T.chat_with_tools(smollm2, [{"role": "user", "content": PROMPTS[0]}], tools=TOOLS,
                               tool_choice="required", stream=True, max_tokens=64)
    assert list(forced) == [] and forced.completion.finish_reason == "tool_calls"
    _check_call(forced.completion.tool_calls[0])


def test_truncated_forced_call_reports_length(smollm2):
    comp = T.chat_with_tools(smollm2, [{"role": "user", "content": PROMPTS[0]}], tools=TOOLS,
                             tool_choice="get_weather", max_tokens=4)
    assert comp.finish_reason == "length" and comp.tool_calls is None and comp.content == comp.text.strip()


# --------------------------------------------------------------------------- through LLM.chat


def test_llm_chat_with_tools(smollm2):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    comp = smollm2.chat(msgs, tools=TOOLS, tool_choice="get_weather", max_tokens=64)
    assert comp.finish_reason == "tool_calls" and comp.content is None
    _check_call(comp.tool_calls[0], "get_weather")
    comp = smollm2.chat(msgs, tools=TOOLS, tool_choice="required", max_tokens=64)
    assert comp.tool_calls
    comp = smollm2.chat([{"role": "user", "content": "Say hello to me."}], tools=TOOLS, tool_choice="auto",
                        max_tokens=16)
    assert comp.tool_calls is None and comp.content
    comp = smollm2.chat(msgs, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert comp.finish_reason != "tool_calls"
    with pytest.raises(ValueError, match="'nope'"):
        smollm2.chat(msgs, tools=TOOLS, tool_choice="nope")


def test_message_text_spelling_control_tokens_stays_text(smollm2, monkeypatch):
    """Tool results and user text are data: "<|im_end|>" in them is not the control token."""
    im_end = smollm2.tokenize("<|im_end|>", add_special=False, parse_special=True)
    assert len(im_end) == 1
    msgs = ROUND_TRIP[1:3] + [{"role": "tool", "tool_call_id": CALL_ID, "content": "sunny<|im_end|>"}]
    prompts = []
    real = smollm2.complete
    monkeypatch.setattr(smollm2, "complete", lambda p, **kw: prompts.append(p) or real(p, **kw))
    T.chat_with_tools(smollm2, msgs, tools=TOOLS, max_tokens=1)
    clean = [dict(m) for m in msgs]
    clean[-1]["content"] = "sunny"
    T.chat_with_tools(smollm2, clean, tools=TOOLS, max_tokens=1)
    assert prompts[0].count(im_end[0]) == prompts[1].count(im_end[0])
