"""Issue 29, input handling: input that used to become a RecursionError (a 500 from the
server), lost model output, forced tool calls that broke their own schema, upper-case URL
schemes, the Ray predictor's missing values, and sampling settings that reached C unchecked.

Every test here fails on the code before the fix."""

from __future__ import annotations

import base64
import json
import math
import os
import random
import sys

import jsonschema
import pytest

import pyllama
from pyllama import tools as T
from pyllama.chat import ChatFormatter
from pyllama.errors import JSONSchemaError, MediaError
from pyllama.grammar import json_schema_to_gbnf, regex_to_gbnf
from pyllama.grammar.json_schema import MAX_SCHEMA_DEPTH
from pyllama.grammar.regex import MAX_REGEX_NESTING
from pyllama.multimodal import media_bytes
from pyllama.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams


def _nested_items(levels):
    schema = {"type": "string", "maxLength": 2}
    for _ in range(levels):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


def _nested_list(levels):
    value = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _tool(name, parameters):
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def _deep_stack(frames, fn):
    """Call fn() with `frames` extra Python frames below it (a caller already deep in its stack)."""
    return fn() if frames == 0 else _deep_stack(frames - 1, fn)


# --------------------------------------------------------------------------- 1. nesting limits


@pytest.mark.parametrize("make", [
    lambda: json_schema_to_gbnf(_nested_items(199)),
    lambda: json_schema_to_gbnf(_nested_items(5000)),
    lambda: json_schema_to_gbnf("[" * 100_000 + "]" * 100_000),
    lambda: json_schema_to_gbnf({"type": "object", "$defs": {"x": _nested_list(3000)}}),
    lambda: regex_to_gbnf("(" * 300 + "a" + ")" * 300),
    lambda: json_schema_to_gbnf({"type": "string", "pattern": "(" * 300 + "a" + ")" * 300}),
    lambda: T.tool_call_grammar(T.validate_tools([_tool("f", {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?:" * 300 + "a" + ")" * 300}}})])),
    lambda: T.tool_call_grammar(T.validate_tools([_tool("f", {"type": "object", "properties": {
        "x": _nested_items(199)}})])),
    lambda: T.validate_tools([_tool("f", {"type": "object", "properties": {"x": _nested_items(5000)}})]),
    lambda: T.tool_call_grammar([_tool("f", {"type": "object", "properties": {"x": _nested_items(5000)}})]),
], ids=["schema-199", "schema-5000", "schema-text-100k", "schema-deep-defs", "regex-300", "pattern-300",
        "tool-pattern-300", "tool-schema-199", "validate-tools-5000", "tool-grammar-unvalidated-5000"])
def test_deep_schemas_and_patterns_are_value_errors(make):
    with pytest.raises(ValueError, match="levels|nested|deep"):
        make()


def test_limits_are_usable_right_up_to_the_edge_even_from_deep_in_the_stack():
    """A schema at the documented depth converts, also when the caller is 300 frames deep
    (a server handler, a test runner): the limits keep far from Python's recursion limit."""
    # MAX_SCHEMA_DEPTH levels in all: the root schema and its nested items.
    gbnf = _deep_stack(300, lambda: json_schema_to_gbnf(_nested_items(MAX_SCHEMA_DEPTH - 1)))
    assert gbnf.startswith("root ::=")
    with pytest.raises(JSONSchemaError, match=f"more than {MAX_SCHEMA_DEPTH} levels"):
        _deep_stack(300, lambda: json_schema_to_gbnf(_nested_items(MAX_SCHEMA_DEPTH)))
    pattern = "(" * MAX_REGEX_NESTING + "a" + ")" * MAX_REGEX_NESTING
    assert _deep_stack(300, lambda: regex_to_gbnf(pattern)) == '"a"'
    with pytest.raises(JSONSchemaError, match=f"more than {MAX_REGEX_NESTING} levels"):
        regex_to_gbnf("(" + pattern + ")")


def test_deep_chat_messages_and_tools_are_value_errors():
    fmt = ChatFormatter("{% for m in messages %}{{ m.content }}{{ m.extra | tojson }}{% endfor %}"
                        "{{ tools | tojson }}")
    deep = _nested_list(5000)
    with pytest.raises(ValueError, match="messages nests"):
        fmt.render([{"role": "user", "content": "hi", "extra": deep}])
    with pytest.raises(ValueError, match="tools nests"):
        fmt.render([{"role": "user", "content": "hi"}], tools=[{"deep": deep}])
    # within the limit it renders
    ok = json.loads("[" * 150 + "]" * 150)
    assert fmt.render([{"role": "user", "content": "hi", "extra": ok}], tools=[{"x": ok}]).count("[") == 301


def test_deep_tool_history_is_text_or_a_value_error_not_recursion():
    # An assistant's arguments string too deep to decode stays text (templates see it as is).
    deep_args = "[" * 5000 + "]" * 5000
    msgs = T._normalise_history([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": deep_args}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == deep_args
    # A tool message nested past the limit is refused with the message's index.
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match=r"messages\[1\] nests"):
        T._normalise_history([{"role": "user", "content": "hi"},
                              {"role": "tool", "content": deep, "tool_call_id": "call_1"}])


def test_control_token_text_is_found_at_any_depth():
    """The untrusted-message walk used to stop at 64 levels, leaving deeper text unneutralised."""
    from pyllama.chat._protect import _strings_in

    value = "<|im_start|>"
    for _ in range(150):
        value = {"k": [value]}
    found = []
    _strings_in([{"role": "user", "content": "x", "extra": value}], found)
    assert "<|im_start|>" in found


# --------------------------------------------------------------------------- 2. any output parses

TOOLS = [_tool("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}),
         _tool("f", {"type": "object", "properties": {"s": {"type": "string"}}})]


@pytest.mark.parametrize("text", [
    "[" * 1100,
    "{" * 1100,
    '{"name":' * 1100,
    '[{"name":' * 1100,
    "<tool_call>" + "[" * 1100,
    "<tool_call>" * 1100,
    "[TOOL_CALLS]" + "[" * 1100,
    "<|python_tag|>" + '{"a":' * 1100,
    '{"name": "add", "arguments": ' + "[" * 1100 + "]" * 1100 + "}",
    '{"name": "add", "arguments": {"a": ' + "[" * 900 + "]" * 900 + "}}",
    '{"name": "add", "arguments": "' + "[" * 1100 + '"}',
    '{"name": "f", "arguments": {"s": "\\ud800"}}',
], ids=["brackets", "braces", "names", "list-of-names", "hermes-brackets", "hermes-tags", "mistral-brackets",
        "python-tag-objects", "arguments-1100-deep", "arguments-900-deep", "arguments-string", "lone-surrogate"])
def test_any_output_parses_to_calls_or_the_whole_text(text):
    parsed = T.parse_tool_calls(text, TOOLS)
    assert parsed.tool_calls == [] and parsed.content == text.strip()


_PIECES = ["[", "]", "{", "}", '"', ":", ",", " ", "\n", "a", "1", '"name"', '"arguments"', '"add"', '"f"',
           "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```", ";", "\\", "null",
           '{"name": "add", "arguments": {"a": 1}}', '{"name": "f", "arguments": "{}"}', "[" * 1100, "{" * 1100]


def _fuzzed_texts(n, seed=29):
    rng = random.Random(seed)
    return ["".join(rng.choice(_PIECES) for _ in range(rng.randrange(61))) for _ in range(n)]


def test_fuzzed_output_never_raises_and_never_loses_text():
    with_calls = 0
    for text in _fuzzed_texts(400):
        parsed = T.parse_tool_calls(text, TOOLS)
        if not parsed.tool_calls:
            assert parsed.content == (text.strip() or None), text
            continue
        with_calls += 1
        for call in parsed.tool_calls:
            assert call["function"]["name"] in ("add", "f"), text
            assert isinstance(json.loads(call["function"]["arguments"]), dict), text
        # what is left is the text with the calls taken out
        assert parsed.content is None or len(parsed.content) < len(text), text
    assert with_calls > 0          # the fuzzed texts hold calls too: both branches ran


# --------------------------------------------------------------------------- 4. Hermes calls decoded from their start


def test_hermes_argument_holding_the_closing_tag_leaves_no_junk():
    args = {"s": "a</tool_call>b <tool_call> c"}
    text = f'Sure.\n<tool_call>\n{json.dumps({"name": "f", "arguments": args})}\n</tool_call>\nDone.'
    parsed = T.parse_tool_calls(text, TOOLS)
    assert [json.loads(c["function"]["arguments"]) for c in parsed.tool_calls] == [args]
    assert parsed.content == "Sure.\n\nDone."
    # two blocks, the first one's argument naming the tag
    two = text + f'<tool_call>{json.dumps({"name": "add", "arguments": {"a": 1}})}</tool_call>'
    parsed = T.parse_tool_calls(two, TOOLS)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["f", "add"]
    assert parsed.content == "Sure.\n\nDone."
    # a block with text after its JSON is not a call; nothing is lost
    junk = '<tool_call>{"name": "f", "arguments": {}} oops</tool_call>'
    kept = T.parse_tool_calls(junk, TOOLS)
    assert "oops" in (kept.content or "")


# --------------------------------------------------------------------------- 3. forced calls keep their refs

ORDER = _tool("place_order", {
    "type": "object",
    "$defs": {"Item": {"type": "object", "properties": {"kind": {"enum": ["x", "y"]},
                                                        "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                       "required": ["kind", "n"], "additionalProperties": False}},
    "properties": {"item": {"$ref": "#/$defs/Item"}, "again": {"$ref": "#/properties/item"}},
    "required": ["item", "again"], "additionalProperties": False})
TURN = _tool("turn", {
    "type": "object",
    "$defs": {"Item": {"enum": ["left", "right"]}},
    "definitions": {"Way": {"enum": [1, 2]}},
    "properties": {"item": {"$ref": "#/$defs/Item"}, "way": {"$ref": "#/definitions/Way"},
                   "note": {"const": {"$ref": "#/not/a/ref"}}},
    "required": ["item", "way", "note"], "additionalProperties": False})
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (ORDER, TURN)}


def test_tool_call_schema_resolves_refs_in_each_tools_own_schema():
    wrapper = T.tool_call_schema(T.validate_tools([ORDER, TURN]))
    good = [{"name": "place_order", "arguments": {"item": {"kind": "x", "n": 1}, "again": {"kind": "y", "n": 2}}},
            {"name": "turn", "arguments": {"item": "left", "way": 2, "note": {"$ref": "#/not/a/ref"}}}]
    for call in good:
        jsonschema.validate(call, wrapper)
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    bad = {"name": "place_order", "arguments": {"item": "left", "again": "left"}}   # the other tool's Item
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, wrapper)
    assert TURN["function"]["parameters"]["properties"]["item"] == {"$ref": "#/$defs/Item"}   # not modified


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_path):
    llm = pyllama.LLM(str(tiny_model_path), n_ctx=512, n_threads=1)
    yield llm
    llm.close()


def test_forced_calls_only_produce_valid_arguments(tiny_llm):
    """Sampled (not greedy) under the forced-call grammar, every call validates against the
    original tool's schema, for both tools."""
    names = set()
    for tools, style in (([ORDER, TURN], "json"), ([TURN, ORDER], "hermes")):
        gbnf = T.tool_call_grammar(T.validate_tools(tools), style)
        for seed in range(8):
            comp = tiny_llm.complete("Call a tool:", grammar=gbnf, temperature=1.5, seed=seed, max_tokens=200)
            assert comp.finish_reason != "length", comp.text
            parsed = T.parse_tool_calls(comp.text, tools)
            assert len(parsed.tool_calls) == 1 and parsed.content is None, comp.text
            fn = parsed.tool_calls[0]["function"]
            jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])
            names.add(fn["name"])
    assert names == {"place_order", "turn"}


def test_recursive_root_ref_and_root_named_tool():
    tree = _tool("root", {"type": "object", "properties": {
        "leaf": {"type": "integer", "minimum": 0, "maximum": 3}, "kids": {"type": "array", "maxItems": 2,
                                                                          "items": {"$ref": "#"}}},
        "required": ["leaf"]})
    gbnf = T.tool_call_grammar(T.validate_tools([tree]))   # a rule named "root" used to clash
    assert gbnf.splitlines()[0] == "root ::= tool-call"
    wrapper = T.tool_call_schema(T.validate_tools([tree]))
    jsonschema.validate({"name": "root", "arguments": {"leaf": 1, "kids": [{"leaf": 2, "kids": [{"leaf": 3}]}]}},
                        wrapper)
    with pytest.raises(jsonschema.ValidationError):   # "#" is the tool's parameters, not the wrapper
        jsonschema.validate({"name": "root", "arguments": {"leaf": 1, "kids": [{"name": "root", "arguments": {}}]}},
                            wrapper)


# --------------------------------------------------------------------------- 5. URL schemes are case-insensitive

PNG_BYTES = b"\x89PNG\r\n\x1a\nnot really"


@pytest.mark.parametrize("prefix", ["DATA:", "Data:", "data:", "dAtA:"])
@pytest.mark.parametrize("allow_files", [True, False])
def test_data_urls_in_any_case(prefix, allow_files):
    b64 = base64.b64encode(PNG_BYTES).decode()
    assert media_bytes(f"{prefix}image/png;base64,{b64}", allow_files=allow_files) == PNG_BYTES
    assert media_bytes(f"{prefix}image/png;BASE64,{b64}", allow_files=allow_files) == PNG_BYTES


def test_file_urls_in_any_case_and_other_schemes_are_never_paths(tmp_path, monkeypatch):
    image = tmp_path / "cat.png"
    image.write_bytes(PNG_BYTES)
    assert media_bytes(f"FILE://{image}") == PNG_BYTES
    assert media_bytes(f"File://localhost{image}") == PNG_BYTES
    monkeypatch.chdir(tmp_path)
    for name in ("ftp:cat.png", "s3:cat.png", "DATAX:cat.png"):
        (tmp_path / name).write_bytes(PNG_BYTES)   # a file by that name exists: it must not be read
        with pytest.raises(MediaError, match="unsupported URL scheme"):
            media_bytes(name)
    with pytest.raises(MediaError, match="not fetched"):
        media_bytes("HTTPS://example.invalid/cat.png")
    assert media_bytes(os.fspath(image)) == PNG_BYTES
    assert media_bytes(tmp_path / "ftp:cat.png") == PNG_BYTES   # a PathLike is always a path
    assert media_bytes("./ftp:cat.png") == PNG_BYTES


# --------------------------------------------------------------------------- 6. the Ray predictor


@pytest.fixture(scope="module")
def predictor(tiny_model_path):
    pytest.importorskip("pandas")
    from pyllama.integrations.ray import LLMPredictor

    p = LLMPredictor(str(tiny_model_path), n_ctx=256, n_threads=1, temperature=0.0, max_tokens=3)
    yield p
    p.llm.close()


def test_predictor_keeps_const_null_in_a_row_schema(predictor, monkeypatch):
    import numpy as np

    seen = []
    real = predictor.llm.generate

    def generate(prompts, per_prompt=None, **kwargs):
        seen.append(per_prompt)
        return real(prompts, per_prompt=per_prompt, **kwargs)

    monkeypatch.setattr(predictor.llm, "generate", generate)
    schemas = np.empty(3, dtype=object)
    schemas[:] = [{"const": None}, {"type": "object", "properties": {"a": {"const": None, "type": None}},
                                    "required": ["a"]}, None]
    out = predictor({"prompt": np.array(["one", "two", "three"], dtype=object), "json_schema": schemas})
    assert list(out["error"]) == [None, None, None]
    assert seen[-1][0] == {"json_schema": {"const": None}}
    # the None of "type" is Arrow's filler for a missing key and goes; const's None is JSON null
    assert seen[-1][1] == {"json_schema": {"type": "object", "properties": {"a": {"const": None}},
                                           "required": ["a"]}}
    assert out["generated_text"][0] == "null"


def test_predictor_rows_with_missing_prompts_get_errors(predictor):
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"prompt": pd.Series(["alpha", pd.NA, None, np.nan], dtype=object),
                          "json_schema": pd.Series([pd.NA, None, np.nan, pd.NA], dtype=object)})
    out = predictor(frame)
    assert pd.isna(out["error"][0]) and isinstance(out["generated_text"][0], str)
    for i in (1, 2, 3):
        assert out["error"][i].startswith("ValueError: the row has no prompt"), out["error"][i]
        assert pd.isna(out["generated_text"][i])
    strings = predictor(pd.DataFrame({"prompt": pd.array(["beta", pd.NA], dtype="string")}))
    assert pd.isna(strings["error"][0]) and strings["error"][1].startswith("ValueError: the row has no prompt")


# --------------------------------------------------------------------------- 7. sampling settings before C

I32 = 2**31


@pytest.mark.parametrize("field,value,shown", [
    ("top_k", I32, "2147483647"), ("max_tokens", I32, "2147483647"), ("max_tokens", 10**12, "2147483647"),
    ("last_n_tokens_size", I32, "2147483647"), ("dry_allowed_length", I32, "2147483647"),
    ("dry_penalty_last_n", I32, "2147483647"), ("seed", 2**32, "2\\*\\*32"), ("seed", -2, "2\\*\\*32"),
    ("temperature", 1e39, "float32"), ("top_n_sigma", -1e39, "float32"), ("dry_base", 10**40, "float32"),
    ("mirostat_tau", 1e300, "float32"),
    ("logit_bias", {I32: 1.0}, str(I32)), ("logit_bias", {-1: 1.0}, "-1"),
    ("logit_bias", {5: 1e10}, "10000000000"), ("logit_bias", {5: math.inf}, "inf"),
    ("logit_bias", {5: math.nan}, "nan"),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1), str(MAX_STOP_STRINGS)),
    ("stop", ["x" * (MAX_STOP_CHARS + 1)], str(MAX_STOP_CHARS)),
    ("stop", ["x" * (MAX_STOP_CHARS // 2), "y" * (MAX_STOP_CHARS // 2 + 1)], str(MAX_STOP_CHARS)),
    ("dry_sequence_breakers", ["x"] * (MAX_STOP_STRINGS + 1), str(MAX_STOP_STRINGS)),
    ("stop_tokens", [I32], str(I32)), ("stop_tokens", [-1], "-1"),
])
def test_out_of_range_settings_name_the_value_and_the_limit(field, value, shown):
    with pytest.raises(ValueError, match=f"{field}.*{shown}|{shown}.*{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("top_k", I32 - 1), ("max_tokens", I32 - 1), ("seed", 2**32 - 1), ("seed", -1), ("seed", None),
    ("logit_bias", {5: -math.inf}), ("logit_bias", {5: -1e9, 6: 1e9}), ("stop", ["x"] * MAX_STOP_STRINGS),
    ("stop", ["x" * MAX_STOP_CHARS]), ("temperature", 3.0e38), ("stop_tokens", [0, I32 - 1]),
])
def test_settings_at_their_limits_are_accepted(field, value):
    SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs", [{"max_tokens": 10**12}, {"top_k": I32}, {"seed": 2**40},
                                    {"logit_bias": {2**40: 1.0}}, {"dry_penalty_last_n": I32, "dry_multiplier": 1.0}])
def test_llm_refuses_out_of_range_settings_before_c(tiny_llm, kwargs):
    with pytest.raises(ValueError) as info:
        tiny_llm.complete("hi", **kwargs)
    assert not isinstance(info.value, OverflowError)
    assert tiny_llm.complete("hi", max_tokens=1).text is not None   # still serving


if __name__ == "__main__":   # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
