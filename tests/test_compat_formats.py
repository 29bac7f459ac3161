"""llama-cpp-python's companions of ``Llama`` on pyllama: chat formats and handlers
(pyllama.compat.llama_chat_format), grammars (llama_grammar), tokenizers (llama_tokenizer),
draft models (llama_speculative) and the low-level vocabulary functions outlines calls
(pyllama.compat._lowlevel).

Expected prompt strings are llama-cpp-python 0.3.36's: each was produced by running the named
function of its llama_cpp/llama_chat_format.py (the source release on the package registry)
on the conversation below, and is written out here so the test needs no llama-cpp-python.
"""

from __future__ import annotations

import base64
import ctypes
import json
import pickle
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from pyllama import _core
from pyllama.compat import _lowlevel as ll
from pyllama.compat import llama_chat_format as lcf
from pyllama.compat import llama_grammar as lg
from pyllama.compat.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding
from pyllama.compat.llama_tokenizer import BaseLlamaTokenizer, LlamaHFTokenizer, LlamaTokenizer
from pyllama.errors import GrammarError

ROOT = Path(__file__).resolve().parents[1]
VOCABS = ROOT / "vendor" / "llama.cpp" / "models"

# --------------------------------------------------------------------------- chat formats

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]

# (chat_format name, llama-cpp-python function that makes it, prompt, stop)
LCP_FORMATS = [
    ('llama-2', 'format_llama2', '[INST] <<SYS>>\nYou are terse.\n<</SYS>> Hi [/INST]Hello! </s><s>[INST]What is 2+2?  [/INST]', None),
    ('llama-3', 'format_llama3', '<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n', '<|eot_id|>'),
    ('alpaca', 'format_alpaca', 'You are terse.\n\n### Instruction: Hi\n\n### Response: Hello!</s>### Instruction: What is 2+2?\n\n', None),
    ('qwen', 'format_qwen', '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n', '<|endoftext|>'),
    ('vicuna', 'format', "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>USER: What is 2+2? ASSISTANT:", None),
    ('oasst_llama', 'format_oasst_llama', '[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n<|prompter|>Hi</s><|assistant|>Hello!</s><|prompter|>What is 2+2?</s><|assistant|>', None),
    ('baichuan-2', 'format_baichuan2', 'You are terse.<reserved_106>Hi<reserved_107>Hello!<reserved_106>What is 2+2?<reserved_107>', None),
    ('baichuan', 'format_baichuan', 'You are terse.<reserved_102>Hi<reserved_103>Hello!<reserved_102>What is 2+2?<reserved_103>', None),
    ('openbuddy', 'format_openbuddy', "You are a helpful, respectful and honest INTP-T AI Assistant named Buddy. You are talking to a human User.\nAlways answer as helpfully and logically as possible, while being safe. Your answers should not include any harmful, political, religious, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.\nYou can speak fluently in many languages, for example: English, Chinese.\nYou cannot access the internet, but you have vast knowledge, cutoff: 2021-09.\nYou are trained by OpenBuddy team, (https://openbuddy.ai, https://github.com/OpenBuddy/OpenBuddy), you are based on LLaMA and Falcon transformers model, not related to GPT or OpenAI.\n\n\nUser: Hi\nAssistant: Hello!\nUser: What is 2+2?\nAssistant:", None),
    ('redpajama-incite', 'format_redpajama_incite', 'You are terse.\n<human>: Hi\n<bot>: Hello!\n<human>: What is 2+2?\n<bot>:', '<human>'),
    ('snoozy', 'format_snoozy', 'You are terse.\n### Prompt: Hi\n### Response: Hello!\n### Prompt: What is 2+2?\n### Response:', '###'),
    ('phind', 'format_phind', '### System Prompt\nYou are an intelligent programming assistant.\n\n### User Message: Hi\n\n### Assistant: Hello!\n\n### User Message: What is 2+2?\n\n### Assistant:', None),
    ('intel', 'format_intel', '### System:\n{system_message}\n### User:: Hi\n### Assistant:: Hello!\n### User:: What is 2+2?\n### Assistant::', None),
    ('open-orca', 'format_open_orca', "You are a helpful assistant. Please answer truthfully and write out your thinking step by step to be sure you get the right answer. If you make a mistake or encounter an error in your thinking, say so out loud and attempt to correct it. If you don't know or aren't sure about something, say so clearly. You will act as a professional logician, mathematician, and physicist. You will also act as the most appropriate type of expert to answer any particular question or solve the relevant problem; state which expert type your are, if so. Also think of any particular named expert that would be ideal to answer the relevant question or solve the relevant problem; name and act as them, if appropriate.<|end_of_turn|>\nAssistant: ", 'User'),
    ('mistrallite', 'format_mistrallite', '<|system|>You are terse.</s><|prompter|>Hi </s>\n<|assistant|>Hello! <|prompter|>What is 2+2? </s>\n<|assistant|>', None),
    ('zephyr', 'format_zephyr', '<|system|>\nYou are terse.</s>\n<|user|>\n\nHi</s>\n<|assistant|>\n\nHello!</s>\n<|user|>\n\nWhat is 2+2?</s>\n<|assistant|>\n\n', '</s>'),
    ('pygmalion', 'format_pygmalion', '<|system|>You are terse.\n\n<|user|>\nHi\n\n<|model|>\nHello!\n\n<|user|>\nWhat is 2+2?\n\n<|model|>\n', '\n'),
    ('chatml', 'format_chatml', '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n', '<|im_end|>'),
    ('mistral-instruct', 'format_mistral_instruct', '[INST] Hi [/INST]Hello!</s>[INST] What is 2+2? [/INST]', '</s>'),
    ('chatglm3', 'format_chatglm3', '<|system|>\nYou are terse.<|user|>\n Hi<|assistant|>\n Hello!<|user|>\n What is 2+2?<|assistant|>', '</s>'),
    ('openchat', 'format_openchat', 'You are terse.<|end_of_turn|><|end_of_turn|>\nGPT4 Correct User: \nHi<|end_of_turn|>\n<|end_of_turn|>GPT4 Correct Assistant: \nHello!<|end_of_turn|>\nGPT4 Correct User: \nWhat is 2+2?<|end_of_turn|>\n<|end_of_turn|>GPT4 Correct Assistant: \n', '<|end_of_turn|>'),
    ('saiga', 'format_saiga', '<s>system\nYou are terse.</s><s>user\nHi</s><s>user\nWhat is 2+2?</s><s>bot', None),
    ('gemma', 'format_gemma', '<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n', '<end_of_turn>\n'),
]


@pytest.mark.parametrize("name, function, prompt, stop", LCP_FORMATS, ids=[f[0] for f in LCP_FORMATS])
def test_chat_format_prompt_is_llama_cpp_pythons(name: str, function: str, prompt: str, stop: Any) -> None:
    formatter = lcf.get_chat_format(name)
    assert formatter is getattr(lcf, function)  # llama-cpp-python's function name is importable too
    result = formatter(messages=CONVERSATION)
    assert isinstance(result, lcf.ChatFormatterResponse)
    assert result.prompt == prompt
    assert result.stop == stop
    assert result.added_special is False and result.stopping_criteria is None


def test_every_format_is_registered_and_named() -> None:
    assert lcf.chat_format_names() == sorted(f[0] for f in LCP_FORMATS)
    for name in lcf.chat_format_names():
        handler = lcf.get_chat_completion_handler(name)
        assert handler.chat_formatter is lcf.get_chat_format(name)  # type: ignore[attr-defined]


def test_unknown_and_tool_calling_formats_are_clear_value_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown chat format 'nope'.*chatml.*llama-2"):
        lcf.get_chat_format("nope")
    for name in sorted(lcf.TOOL_CALLING_CHAT_FORMATS):
        with pytest.raises(ValueError, match=r"create_chat_completion\(tools="):
            lcf.get_chat_format(name)
        with pytest.raises(lcf.LlamaChatCompletionHandlerNotFoundException, match="tool calling"):
            lcf.get_chat_completion_handler(name)
    with pytest.raises(lcf.LlamaChatCompletionHandlerNotFoundException, match="Invalid chat handler: nope"):
        lcf.get_chat_completion_handler("nope")
    with pytest.raises(TypeError):
        lcf.get_chat_format(None)  # type: ignore[arg-type]


def test_registry_is_one_table_and_refuses_silent_overwrites() -> None:
    registry = lcf.LlamaChatCompletionHandlerRegistry()
    assert registry is lcf.LlamaChatCompletionHandlerRegistry()

    @lcf.register_chat_format("test-compat-format")
    def format_test(messages: list, **kwargs: Any) -> lcf.ChatFormatterResponse:
        return lcf.ChatFormatterResponse(prompt="|".join(m["content"] for m in messages), stop="END")

    try:
        assert lcf.get_chat_format("test-compat-format")(messages=CONVERSATION).prompt.startswith("You are terse.|Hi")
        with pytest.raises(ValueError, match="already registered"):
            lcf.register_chat_format("test-compat-format")(format_test)

        @lcf.register_chat_completion_handler("test-compat-handler")
        def handler(**kwargs: Any) -> str:
            return "handled"

        assert lcf.get_chat_completion_handler("test-compat-handler")() == "handled"
        registry.unregister_chat_handler("test-compat-handler")
        with pytest.raises(ValueError):
            registry.unregister_chat_handler("test-compat-handler")
    finally:
        registry._chat_handlers.pop("test-compat-format", None)
        lcf._CHAT_FORMATS.pop("test-compat-format", None)


def test_guess_chat_format_from_gguf_metadata() -> None:
    guess = lcf.guess_chat_format_from_gguf_metadata
    assert guess({}) is None
    assert guess({"tokenizer.chat_template": lcf.CHATML_CHAT_TEMPLATE}) == "chatml"
    assert guess({"tokenizer.chat_template": lcf.MIXTRAL_INSTRUCT_CHAT_TEMPLATE}) == "mistral-instruct"
    assert guess({"tokenizer.chat_template": lcf.LLAMA3_INSTRUCT_CHAT_TEMPLATE}) == "llama-3"
    assert guess({"tokenizer.chat_template": "{{ messages }}"}) is None


# --------------------------------------------------------------------------- Jinja2ChatFormatter


def test_jinja2_formatter_renders_the_smollm2_template_as_pyllama_does(smollm2_path: Path) -> None:
    from pyllama.chat import formatter_for_model

    model = _core.Model(str(smollm2_path), vocab_only=True)
    vocab = model.vocab
    template = model.chat_template()
    assert template
    fmt = lcf.Jinja2ChatFormatter(template, eos_token=vocab.token_text(vocab.eos), bos_token=vocab.token_text(vocab.bos))
    result = fmt(messages=CONVERSATION)
    assert result.prompt == formatter_for_model(model).render(CONVERSATION)
    assert result.prompt == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                             "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert result.stop == [vocab.token_text(vocab.eos)] and result.added_special is True


def test_jinja2_formatter_matches_llama_cpp_python_on_its_templates() -> None:
    # llama-cpp-python's Jinja2ChatFormatter(CHATML_CHAT_TEMPLATE, "<|im_end|>", "<s>") output.
    chatml = lcf.Jinja2ChatFormatter(lcf.CHATML_CHAT_TEMPLATE, lcf.CHATML_EOS_TOKEN, lcf.CHATML_BOS_TOKEN)
    assert chatml(messages=CONVERSATION[1:2]).prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    llama3 = lcf.Jinja2ChatFormatter(lcf.LLAMA3_INSTRUCT_CHAT_TEMPLATE, "<|eot_id|>", "<|begin_of_text|>",
                                     add_generation_prompt=False)
    assert llama3(messages=CONVERSATION[1:3]).prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    mistral = lcf.Jinja2ChatFormatter(lcf.MISTRAL_INSTRUCT_CHAT_TEMPLATE, "</s>", "<s>")
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        mistral(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # Extra keyword arguments and tools reach the template, as there.
    probe = lcf.Jinja2ChatFormatter("{{ tools[0].function.name }}/{{ tool_choice }}/{{ custom }}", "", "")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert probe(messages=CONVERSATION, tools=tools, tool_choice="auto", custom=3).prompt == "f/auto/3"
    # an assistant message with only tool_calls (no content key) renders, as there
    calls = lcf.Jinja2ChatFormatter("{% for m in messages %}{{ m.role }}:{{ m.content or m.tool_calls[0].id }};"
                                    "{% endfor %}", "", "")
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}]
    assert calls(messages=turn).prompt == "user:Hi;assistant:c1;"


def test_jinja2_formatter_stop_token_ids_become_a_stopping_criterion() -> None:
    fmt = lcf.Jinja2ChatFormatter(lcf.CHATML_CHAT_TEMPLATE, "<|im_end|>", "<s>", stop_token_ids=[7, 9])
    (criterion,) = fmt(messages=CONVERSATION[1:2]).stopping_criteria
    assert criterion(np.array([1, 2, 9]), np.zeros(3)) is True
    assert criterion(np.array([9, 2]), np.zeros(3)) is False


def test_jinja2_formatter_is_sandboxed() -> None:
    from pyllama.chat import ChatTemplateError

    hostile = lcf.Jinja2ChatFormatter("{{ ''.__class__.__mro__[1].__subclasses__() }}", "", "")
    with pytest.raises(ChatTemplateError, match="unsafe"):
        hostile(messages=CONVERSATION)


def test_hf_tokenizer_config_formatter_as_llama_cpp_pythons_test() -> None:
    # llama-cpp-python tests/test_llama_chat_format.py::test_hf_tokenizer_config_str_to_chat_formatter
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": lcf.MIXTRAL_INSTRUCT_CHAT_TEMPLATE}
    fmt = lcf.hf_tokenizer_config_to_chat_formatter(config)
    result = fmt(messages=[{"role": "user", "content": "Hello, world!"}])
    assert result.prompt == "<s>[INST] Hello, world! [/INST]</s>"
    assert result.stop == ["</s>", "<s>"] and result.added_special is True
    with pytest.raises(ValueError, match="chat_template"):
        lcf.hf_tokenizer_config_to_chat_formatter({"bos_token": "<s>", "eos_token": "</s>"})


# --------------------------------------------------------------------------- chat handlers over create_completion


class StandInLlama:
    """Just what a chat completion handler calls on a Llama, recording the calls."""

    verbose = False

    def __init__(self, text: str = "4", chunks: tuple = ("4", "!")) -> None:
        self.text, self.chunks = text, chunks
        self.calls: list = []

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list:
        self.calls.append(("tokenize", text, add_bos, special))
        return list(text[:4])

    def create_completion(self, **kwargs: Any) -> Any:
        self.calls.append(("create_completion", kwargs))
        base = {"id": "cmpl-1", "created": 5, "model": "m"}
        if not kwargs["stream"]:
            return {**base, "object": "text_completion",
                    "choices": [{"text": self.text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}

        def gen() -> Iterator[dict]:
            for i, piece in enumerate(self.chunks):
                last = i == len(self.chunks) - 1
                yield {**base, "object": "text_completion",
                       "choices": [{"text": piece, "index": 0, "logprobs": None,
                                    "finish_reason": "stop" if last else None}]}
        return gen()


def test_format_handler_renders_tokenizes_and_reshapes() -> None:
    llama = StandInLlama()
    handler = lcf.get_chat_completion_handler("chatml")
    out = handler(llama=llama, messages=CONVERSATION, stop="###", max_tokens=3, temperature=0.0)
    (_, text, add_bos, special), (_, kwargs) = llama.calls
    assert text == LCP_FORMATS[17][2].encode() and add_bos is True and special is True
    assert kwargs["prompt"] == list(text[:4]) and kwargs["stop"] == ["###", "<|im_end|>"]
    assert kwargs["max_tokens"] == 3 and kwargs["temperature"] == 0.0 and kwargs["grammar"] is None
    assert out == {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "logprobs": None,
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}


def test_format_handler_streams_chunks_like_llama_cpp_python() -> None:
    chunks = list(lcf.get_chat_completion_handler("llama-2")(llama=StandInLlama(), messages=CONVERSATION, stream=True))
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant"}, {"content": "4"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)


def test_format_handler_response_format_and_tool_choice_grammars() -> None:
    llama = StandInLlama(text='{"a": 1}')
    handler = lcf.get_chat_completion_handler("chatml")
    handler(llama=llama, messages=CONVERSATION, response_format={"type": "json_object"})
    assert llama.calls[-1][1]["grammar"].grammar == lg.JSON_GBNF
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    handler(llama=llama, messages=CONVERSATION, response_format={"type": "json_object", "schema": schema})
    assert llama.calls[-1][1]["grammar"].grammar == lg.json_schema_to_gbnf(json.dumps(schema))
    # OpenAI's json_schema response format (llama-cpp-python ignores it; pyllama does not)
    handler(llama=llama, messages=CONVERSATION,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert llama.calls[-1][1]["grammar"].grammar == lg.json_schema_to_gbnf(schema)

    tools = [{"type": "function", "function": {"name": "add", "parameters": schema}}]
    out = handler(llama=llama, messages=CONVERSATION, tools=tools,
                  tool_choice={"type": "function", "function": {"name": "add"}})
    assert llama.calls[-1][1]["grammar"].grammar == lg.json_schema_to_gbnf(schema)
    message = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert message["tool_calls"] == [{"id": "call__0_add_cmpl-1", "type": "function",
                                      "function": {"name": "add", "arguments": '{"a": 1}'}}]
    assert message["function_call"] == {"name": "add", "arguments": '{"a": 1}'}
    with pytest.raises(ValueError, match="Tool choice 'nope' not found"):
        handler(llama=llama, messages=CONVERSATION, tools=tools,
                tool_choice={"type": "function", "function": {"name": "nope"}})
    # legacy functions/function_call map onto tools/tool_choice
    stream = list(handler(llama=StandInLlama(chunks=('{"a"', ": 1}")), messages=CONVERSATION, stream=True,
                          functions=[tools[0]["function"]], function_call={"name": "add"}))
    assert stream[0]["choices"][0]["delta"]["role"] == "assistant"
    args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in stream[1:-1])
    assert args == '{"a": 1}' and stream[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------------------------- grammars


def test_shipped_grammar_constants_are_accepted_by_llama_cpp(vocab_dir: Path) -> None:
    vocab = _core.Model(str(vocab_dir / "ggml-vocab-llama-bpe.gguf"), vocab_only=True).vocab
    for name in ("ARITHMETIC_GBNF", "C_GBNF", "CHESS_GBNF", "JAPANESE_GBNF", "JSON_ARR_GBNF", "JSON_GBNF", "LIST_GBNF"):
        grammar = lg.LlamaGrammar.from_string(getattr(lg, name))
        assert grammar._grammar == getattr(lg, name) == grammar.grammar == str(grammar)
        assert grammar._root == lg.LLAMA_GRAMMAR_DEFAULT_ROOT == "root"
        _core.validate_grammar(vocab, grammar._grammar)


# llama-cpp-python tests/test_llama_grammar.py's schemas
COMPOSED = {
    "$defs": {"A": {"properties": {"a": {"title": "A", "type": "integer"}}, "required": ["a"], "title": "A",
                    "type": "object"}},
    "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"title": "B", "type": "integer"}},
    "required": ["a", "b"], "title": "B", "type": "object",
}
ANYOF = {
    "properties": {
        "temperature": {"description": "The temperature mentioned", "type": "number"},
        "unit": {"anyOf": [{"description": "Unit for temperature", "enum": ["celsius", "fahrenheit"],
                            "type": "string"}, {"type": "null"}]},
    },
    "type": "object",
}


@pytest.mark.parametrize("schema", [COMPOSED, ANYOF], ids=["composed", "anyof"])
def test_from_json_schema_gives_grammar_llama_cpp_accepts(schema: dict, vocab_dir: Path) -> None:
    vocab = _core.Model(str(vocab_dir / "ggml-vocab-llama-bpe.gguf"), vocab_only=True).vocab
    grammar = lg.LlamaGrammar.from_json_schema(json.dumps(schema))
    _core.validate_grammar(vocab, grammar._grammar)
    assert lg.LlamaGrammar.from_json_schema(schema) == grammar  # a dict works too
    assert grammar._grammar == lg.json_schema_to_gbnf(json.dumps(schema))


def test_property_order_follows_llama_cpp_python() -> None:
    schema = {"type": "object", "properties": {"c": {"type": "integer"}, "b": {"type": "integer"},
                                               "a": {"type": "integer"}}, "required": ["a"]}
    from pyllama.grammar import json_schema_to_gbnf as pyllama_gbnf

    def reordered(*names: str) -> dict:
        return {**schema, "properties": {n: schema["properties"][n] for n in names}}

    # required first, then as declared; prop_order ranks before declaration order
    assert lg.json_schema_to_gbnf(json.dumps(schema)) == pyllama_gbnf(reordered("a", "c", "b"))
    assert lg.json_schema_to_gbnf(json.dumps(schema), prop_order=["b", "c"]) == pyllama_gbnf(reordered("a", "b", "c"))
    nested = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    assert lg.json_schema_to_gbnf(nested) == pyllama_gbnf({**nested, "properties": {"x": reordered("a", "c", "b")}})
    # const values are data: their key order is kept
    const = {"const": {"properties": {"z": 1, "y": 2}, "required": ["y"]}}
    assert '\\"z\\"' in lg.json_schema_to_gbnf(const).split('\\"y\\"')[0]
    converter = lg.SchemaConverter(prop_order={"b": 0}, allow_fetch=False, dotall=False, raw_pattern=False)
    assert converter.visit(converter.resolve_refs(schema, "stdin"), "") == "root"
    assert converter.format_grammar() == lg.json_schema_to_gbnf(schema, prop_order=["b"])
    with pytest.raises(NotImplementedError):
        lg.SchemaConverter(prop_order={}, allow_fetch=True, dotall=False, raw_pattern=False)


@pytest.mark.parametrize("text, message", [
    ("root ::= foo", "undefined rule"),
    ("root ::= (", "expecting"),
    ('item ::= "a"', "no rule named 'root'"),
    ("   ", "empty"),
    ('root ::= "a"{3,1}', ""),
])
def test_bad_grammar_raises_value_error_at_construction(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message or None) as info:
        lg.LlamaGrammar.from_string(text)
    assert isinstance(info.value, GrammarError)


def test_grammar_from_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "g.gbnf"
    path.write_text(lg.LIST_GBNF, encoding="utf-8")
    assert lg.LlamaGrammar.from_file(path)._grammar == lg.LIST_GBNF
    assert lg.LlamaGrammar.from_file(str(path), verbose=False)._grammar == lg.LIST_GBNF
    with pytest.raises(FileNotFoundError):
        lg.LlamaGrammar.from_file(tmp_path / "missing.gbnf")
    (tmp_path / "empty.gbnf").write_text("")
    with pytest.raises(ValueError, match="empty"):
        lg.LlamaGrammar.from_file(tmp_path / "empty.gbnf")
    with pytest.raises(ValueError):
        lg.LlamaGrammar.from_json_schema('{"type": "object", "properties": ')  # not JSON
    with pytest.raises(TypeError):
        lg.LlamaGrammar(_grammar=lg.JSON_GBNF, parsed=True)


def test_grammar_pickles_and_compares() -> None:
    grammar = lg.LlamaGrammar.from_string(lg.JSON_GBNF)
    again = pickle.loads(pickle.dumps(grammar))
    assert again == grammar and hash(again) == hash(grammar) and again._grammar == lg.JSON_GBNF
    assert "LlamaGrammar(" in repr(grammar)


def test_grammar_is_obeyed_by_pyllama(tiny_model_path: Path) -> None:
    from pyllama import LLM

    grammar = lg.LlamaGrammar.from_string('root ::= "yes" | "no"')
    with LLM(str(tiny_model_path), n_ctx=64, verbose=False) as llm:
        out = llm.complete("Answer:", grammar=grammar._grammar, max_tokens=8, temperature=0.0)
    assert out.text in ("yes", "no")


# --------------------------------------------------------------------------- multimodal handlers

URL1 = "data:image/png;base64," + base64.b64encode(b"one").decode()
URL2 = "data:image/png;base64," + base64.b64encode(b"two").decode()
IMAGE_CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": URL1}}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": [{"type": "image_url", "image_url": URL2}, {"type": "text", "text": "And this?"}]},
]
# llama-cpp-python 0.3.36: <Handler>.__call__'s rendering of CHAT_FORMAT (with its default
# system message) for IMAGE_CONVERSATION, image URLs replaced by mtmd's marker "<__media__>".
LCP_MULTIMODAL = {
    'Llava15ChatHandler': "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.USER: <__media__>What is this?ASSISTANT: A cat.USER: <__media__>And this?ASSISTANT: ",
    'ObsidianChatHandler': "<|im_start|>system\nA chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.\n###\n<|im_start|>user\n<__media__>What is this?###\n<|im_start|>assistant\nA cat.###\n<|im_start|>user\n<__media__>And this?###\n<|im_start|>assistant\n",
    'MoondreamChatHandler': '<__media__>\n\nQuestion: What is this?\n\nAnswer:A cat.\n\n<__media__>\n\nQuestion: And this?\n\nAnswer:',
    'Llava16ChatHandler': "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. <__media__>\nWhat is this?A cat.<__media__>\nAnd this?Answer:",
    'NanoLlavaChatHandler': '<|im_start|>system\nAnswer the question<|im_end|><|im_start|>user\n<__media__>What is this?<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\n<__media__>And this?<|im_end|><|im_start|>assistant\n',
    'Llama3VisionAlphaChatHandler': '<|start_header_id|>user<|end_header_id|>\n\n<__media__>What is this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<__media__>And this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    'MiniCPMv26ChatHandler': '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<__media__>What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\n<__media__>And this?<|im_end|>\n<|im_start|>assistant\n',
    'Qwen25VLChatHandler': '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is this?<__media__><|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\n<__media__>And this?<|im_end|>\n<|im_start|>assistant',
}


@pytest.fixture
def clip_file(tmp_path: Path) -> Path:
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(b"GGUF")
    return path


class FakeMultimodal:
    """What pyllama.multimodal.chat_media_prompt calls on LLM.multimodal: renders the
    tokenized pieces back to text with mtmd's marker where each image went."""

    def load(self, data: bytes) -> tuple:
        return ("image", data)

    def tokenize_parts(self, pieces: list, add_special: bool) -> str:
        return "".join("<__media__>" if p[0] == "image" else p[0] for p in pieces)


@pytest.mark.parametrize("name", sorted(LCP_MULTIMODAL))
def test_multimodal_handler_prompt_is_llama_cpp_pythons(name: str, clip_file: Path, smollm2_path: Path) -> None:
    """The handler's template and prepared messages, through LLM.chat's media path
    (pyllama.multimodal.chat_media_prompt), give llama-cpp-python's prompt."""
    from pyllama.chat import ChatFormatter
    from pyllama.multimodal import chat_media_prompt

    handler = getattr(lcf, name)(clip_model_path=str(clip_file))
    assert isinstance(handler, lcf.MultimodalChatHandler)
    vocab = _core.Model(str(smollm2_path), vocab_only=True).vocab
    formatter = ChatFormatter(handler.chat_template, "<s>", "</s>")
    rendered = chat_media_prompt(formatter, vocab, FakeMultimodal(), handler.prepare_messages(IMAGE_CONVERSATION))
    assert rendered == LCP_MULTIMODAL[name]
    assert handler.get_image_urls(IMAGE_CONVERSATION) == [URL1, URL2]


def test_multimodal_handlers_validate_and_describe(clip_file: Path, tmp_path: Path) -> None:
    for cls in (lcf.Llava15ChatHandler, lcf.Llava16ChatHandler, lcf.MoondreamChatHandler, lcf.NanoLlavaChatHandler,
                lcf.Llama3VisionAlphaChatHandler, lcf.MiniCPMv26ChatHandler, lcf.Qwen25VLChatHandler,
                lcf.ObsidianChatHandler, lcf.MTMDChatHandler, lcf.Gemma4ChatHandler):
        handler = cls(clip_model_path=str(clip_file), verbose=False)
        assert handler.clip_model_path == str(clip_file) and isinstance(handler, lcf.MultimodalChatHandler)
        missing = tmp_path / "nope" / "mmproj.gguf"
        with pytest.raises(FileNotFoundError, match="Clip model path does not exist") as info:
            cls(clip_model_path=str(missing))
        assert isinstance(info.value, ValueError)  # llama-cpp-python raises ValueError
        with pytest.raises(IsADirectoryError):
            cls(clip_model_path=str(tmp_path))
    assert lcf.Llama3VisionAlpha is lcf.Llama3VisionAlphaChatHandler
    assert lcf.MTMDChatHandler(str(clip_file)).chat_template is None  # the GGUF's own template
    assert lcf.MTMDChatHandler(str(clip_file), use_gpu=False).use_gpu is False
    # prepare_messages adds the default system message only when there is none, never in place
    llava = lcf.Llava15ChatHandler(str(clip_file))
    prepared = llava.prepare_messages(IMAGE_CONVERSATION)
    assert prepared[0] == {"role": "system", "content": llava.DEFAULT_SYSTEM_MESSAGE}
    assert prepared[1]["content"][0]["type"] == "image_url" and IMAGE_CONVERSATION[0]["content"][0]["type"] == "text"
    assert llava.prepare_messages(CONVERSATION)[0] == CONVERSATION[0]
    assert lcf.Llama3VisionAlphaChatHandler(str(clip_file)).prepare_messages(CONVERSATION[1:])[0]["role"] == "user"
    with pytest.raises(ValueError, match="chat_handler"):
        llava(llama=StandInLlama(), messages=CONVERSATION)


def test_multimodal_handler_from_pretrained(clip_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    from hf_hub_server import HubServer

    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer() as hub:
        hub.add_repo("test/vision-GGUF", {"model-Q4_K_M.gguf": b"model", "mmproj-model-f16.gguf": clip_file})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        handler = lcf.Llava15ChatHandler.from_pretrained("test/vision-GGUF", "*mmproj*", verbose=False)
        assert isinstance(handler, lcf.Llava15ChatHandler) and handler.verbose is False
        assert Path(handler.clip_model_path).read_bytes() == b"GGUF"
        local = lcf.MoondreamChatHandler.from_pretrained("test/vision-GGUF", "mmproj-model-f16.gguf",
                                                          local_dir=tmp_path / "local")
        assert Path(local.clip_model_path).parent == tmp_path / "local"
        with pytest.raises(ValueError):
            lcf.Llava15ChatHandler.from_pretrained("test/vision-GGUF", "*.gguf")  # two files match


# --------------------------------------------------------------------------- low-level vocabulary functions

SMALL_VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-gpt-2.gguf",
                "ggml-vocab-bert-bge.gguf"]


@pytest.mark.parametrize("name", SMALL_VOCABS)
def test_token_to_piece_matches_pyllama_for_every_token(name: str, vocab_dir: Path) -> None:
    model = _core.Model(str(vocab_dir / name), vocab_only=True)
    vocab = ll.llama_model_get_vocab(ll.model_handle(model))
    n_vocab = ll.llama_n_vocab(vocab)
    assert n_vocab == ll.llama_vocab_n_tokens(vocab) == model.vocab.n_tokens
    size = 32
    buffer = (ctypes.c_char * size)()  # outlines' LlamaCppTokenizer loop
    for token in range(n_vocab):
        for special in (True, False):
            n = ll.llama_token_to_piece(vocab, token, buffer, size, 0, special)
            expected = model.vocab.token_to_piece(token, special=special)
            if n < 0:  # too long for the buffer: llama.cpp's convention, nothing written
                assert -n == len(expected) > size
                big = ctypes.create_string_buffer(-n)
                assert ll.llama_token_to_piece(vocab, token, big, -n, 0, special) == -n
                assert big.raw == expected
            else:
                assert buffer[:n] == expected, token
    # a text's pieces, joined, are pyllama's detokenization of it
    ids = model.vocab.tokenize("Hello wörld, 1234 ünïcode!", add_special=False)
    pieces = b""
    for token in ids:
        n = ll.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        pieces += buffer[:n]
    if model.vocab.type != "wpm":  # WordPiece's detokenizer also rejoins punctuation
        assert pieces.lstrip(b" ").decode("utf-8") == model.vocab.detokenize(ids).lstrip(" ")


def test_lowlevel_text_attr_special_tokens_and_lstrip(vocab_dir: Path) -> None:
    model = _core.Model(str(vocab_dir / "ggml-vocab-llama-spm.gguf"), vocab_only=True)
    v = ll.llama_model_get_vocab(ll.model_handle(model))
    assert ll.llama_token_bos(v) == ll.llama_vocab_bos(v) == model.vocab.bos == 1
    assert ll.llama_token_eos(v) == model.vocab.eos and ll.llama_vocab_type(v) == ll.LLAMA_VOCAB_TYPE_SPM
    assert ll.llama_token_get_attr(v, 1) & ll.LLAMA_TOKEN_ATTR_CONTROL
    assert ll.llama_token_get_text(v, 1) == b"<s>" and ll.llama_vocab_is_control(v, 1)
    assert ll.llama_token_is_eog(v, model.vocab.eos) and ll.llama_add_bos_token(v) == model.vocab.add_bos
    assert isinstance(ll.llama_token_get_score(v, 100), float)
    space_tok = model.vocab.tokenize(" Hello", add_special=False)[0]
    buf = bytearray(16)
    n = ll.llama_token_to_piece(v, space_tok, buf, 16, 1, False)
    assert bytes(buf[:n]) == model.vocab.token_to_piece(space_tok).lstrip(b" ")


def test_lowlevel_tokenize_detokenize_write_caller_buffers(vocab_dir: Path) -> None:
    model = _core.Model(str(vocab_dir / "ggml-vocab-llama-bpe.gguf"), vocab_only=True)
    v = ll.llama_model_get_vocab(model)
    text = "Hello world".encode()
    tokens = (ll.llama_token * 16)()
    n = ll.llama_tokenize(v, text, len(text), tokens, 16, True, False)
    assert list(tokens[:n]) == model.vocab.tokenize(text, add_special=True)
    assert ll.llama_tokenize(v, text, len(text), tokens, 1, True, False) == -n
    out = ctypes.create_string_buffer(64)
    k = ll.llama_detokenize(v, tokens, n, out, 64, True, False)
    assert out.raw[:k] == b"Hello world"
    assert ll.llama_detokenize(v, tokens, n, out, 3, True, False) == -k
    with pytest.raises(ValueError, match="holds 4 bytes"):
        ll.llama_token_to_piece(v, model.vocab.tokenize("Hello", add_special=False)[0], (ctypes.c_char * 4)(), 64, 0,
                                False)


def test_lowlevel_model_functions_and_refusals(tiny_model_path: Path) -> None:
    from pyllama import LLM

    with LLM(str(tiny_model_path), n_ctx=32, verbose=False) as llm:
        handle = ll.model_handle(llm)
        assert ll.model_handle(handle) is handle and ll.model_handle(llm.model) == handle
        assert ll.llama_model_n_ctx_train(handle) == llm.model.n_ctx_train == ll.llama_n_ctx_train(handle)
        assert ll.llama_model_n_embd(handle) == llm.model.n_embd and ll.llama_model_n_layer(handle) == llm.model.n_layer
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_model_desc(handle, buf, 256)
        assert buf.value.decode() == llm.model.description and n == len(llm.model.description)
        arch = llm.model.meta("general.architecture")
        assert ll.llama_model_meta_val_str(handle, b"general.architecture", buf, 256) == len(arch)
        assert buf.value.decode() == arch
        assert ll.llama_model_meta_val_str(handle, b"no.such.key", buf, 256) == -1
        assert ll.llama_model_meta_count(handle) == len(llm.model.metadata)
    for raw in (12345, ctypes.c_void_p(12345)):
        with pytest.raises(TypeError, match="raw llama_model pointer"):
            ll.llama_model_get_vocab(raw)
    with pytest.raises(NotImplementedError, match="no raw C functions"):
        ll._lib.llama_tokenize  # noqa: B018 - llguidance takes its address


def test_lowlevel_constants_and_system_queries() -> None:
    assert ll.LLAMA_DEFAULT_SEED == 0xFFFFFFFF and ll.LLAMA_TOKEN_NULL == -1
    assert (ll.LLAMA_SPLIT_MODE_NONE, ll.LLAMA_SPLIT_MODE_LAYER, ll.LLAMA_SPLIT_MODE_ROW) == (0, 1, 2)
    assert (ll.LLAMA_POOLING_TYPE_UNSPECIFIED, ll.LLAMA_POOLING_TYPE_MEAN, ll.LLAMA_POOLING_TYPE_CLS) == (-1, 1, 2)
    assert (ll.GGML_TYPE_F16, ll.GGML_TYPE_Q8_0, ll.GGML_TYPE_Q4_K) == (1, 8, 12)
    assert ll.LLAMA_ROPE_SCALING_TYPE_YARN == 2 and ll.LLAMA_FLASH_ATTN_TYPE_ENABLED == 1
    assert ll.LLAMA_MAX_DEVICES == _core.max_devices()
    assert ll.llama_supports_gpu_offload() is _core.supports_gpu_offload()
    assert ll.llama_supports_mmap() is _core.supports_mmap() and ll.llama_supports_mlock() is _core.supports_mlock()
    assert ll.llama_print_system_info() == _core.system_info().encode()
    ll.llama_backend_init()
    assert "llama_token_to_piece" in ll.__all__ and "LLAMA_TOKEN_ATTR_CONTROL" in ll.__all__


def test_outlines_tokenizer_reads_the_vocabulary(vocab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """outlines' own LlamaCppTokenizer (unchanged) on a stand-in Llama whose .model is our handle."""
    pytest.importorskip("outlines")
    import pyllama.compat

    monkeypatch.setitem(sys.modules, "llama_cpp", pyllama.compat)
    from outlines.models.llamacpp import LlamaCppTokenizer

    model = _core.Model(str(vocab_dir / "ggml-vocab-gpt-2.gguf"), vocab_only=True)

    class Stand:
        def __init__(self) -> None:
            self.model = ll.model_handle(model)

        def tokenizer(self) -> LlamaTokenizer:
            return LlamaTokenizer(model)

        def token_eos(self) -> int:
            return model.vocab.eos

        def n_vocab(self) -> int:
            return model.vocab.n_tokens

    tok = LlamaCppTokenizer(Stand())
    assert tok.eos_token_id == model.vocab.eos
    assert tok.vocabulary[model.vocab.token_to_piece(262, special=True).decode("utf-8", "replace")] <= 262
    assert len(tok.vocabulary) > 40000
    ids, mask = tok.encode("Hello world")
    assert ids == model.vocab.tokenize("Hello world", add_special=True, parse_special=True) and mask == [1] * len(ids)
    assert tok.decode(ids) == ["Hello world"]


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("name", ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-qwen2.gguf"])
def test_llama_tokenizer_delegates_to_the_vocabulary(name: str, vocab_dir: Path) -> None:
    model = _core.Model(str(vocab_dir / name), vocab_only=True)
    tok = LlamaTokenizer.from_ggml_file(str(vocab_dir / name))
    assert isinstance(tok, BaseLlamaTokenizer)
    text = "Hello world <|im_start|> x"
    ids = tok.tokenize(text.encode(), add_bos=True, special=True)
    assert ids == model.vocab.tokenize(text, add_special=True, parse_special=True)
    assert tok.tokenize(text.encode(), add_bos=False, special=False) == model.vocab.tokenize(text, add_special=False)
    assert tok.encode(text) == ids
    # llama-cpp-python: pieces joined, the space after a leading BOS dropped
    joined = b"".join(model.vocab.token_to_piece(t) for t in ids)
    expected = joined[1:] if ids and ids[0] == model.vocab.bos and joined[:1] == b" " else joined
    assert tok.detokenize(ids) == expected
    assert tok.decode(ids) == expected.decode("utf-8", "ignore")
    joined = b"".join(model.vocab.token_to_piece(t, special=True) for t in ids)
    expected = joined[1:] if ids and ids[0] == model.vocab.bos and joined[:1] == b" " else joined
    assert tok.detokenize(ids, special=True) == expected
    with pytest.raises(TypeError, match="bytes"):
        tok.tokenize(text)  # type: ignore[arg-type]


def test_llama_tokenizer_on_the_compat_llama(tiny_model_path: Path) -> None:
    from pyllama.compat import llama as llama_mod
    llama = llama_mod.Llama(model_path=str(tiny_model_path), n_ctx=64, verbose=False)
    try:
        tok = LlamaTokenizer(llama)
        ids = tok.tokenize(b"Hello", add_bos=True, special=False)
        assert ids == llama.tokenize(b"Hello", add_bos=True, special=False)
        assert tok.detokenize(ids) == llama.detokenize(ids) == b"Hello"
        assert ll.model_handle(llama) == ll.model_handle(llama.llm)
    finally:
        llama.close()


def test_llama_hf_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "!": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>")
    hf.save_pretrained(tmp_path / "tok")
    tok = LlamaHFTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert isinstance(tok, BaseLlamaTokenizer)
    ids = tok.tokenize(b"hello world !")
    assert ids == [2, 3, 4]
    assert tok.detokenize(ids) == b"hello world !"
    assert tok.detokenize([4], prev_tokens=[2, 3]) == b" !"
    assert tok.detokenize([1, 2], special=True).startswith(b"<s>") and tok.detokenize([1, 2]) == b"hello"

    # llama_chat_format.hf_autotokenizer_to_chat_formatter renders with that tokenizer's template
    hf.chat_template = lcf.CHATML_CHAT_TEMPLATE
    hf.eos_token = "!"
    hf.save_pretrained(tmp_path / "tok-chat")
    result = lcf.hf_autotokenizer_to_chat_formatter(str(tmp_path / "tok-chat"))(
        messages=CONVERSATION[1:2], add_generation_prompt=True)
    assert result.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert result.stop == "!" and result.added_special is True


# --------------------------------------------------------------------------- speculative


def test_prompt_lookup_decoding_as_llama_cpp_pythons_test() -> None:
    find = LlamaPromptLookupDecoding.find_candidate_pred_tokens
    assert np.array_equal(find(np.array([1, 2, 3, 1, 2, 3, 1, 2, 3]), max_ngram_size=3, num_pred_tokens=2),
                          np.array([1, 2]))
    assert np.array_equal(find(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9]), max_ngram_size=3, num_pred_tokens=2),
                          np.array([]))
    draft = LlamaPromptLookupDecoding(num_pred_tokens=3)
    assert isinstance(draft, LlamaDraftModel) and (draft.max_ngram_size, draft.num_pred_tokens) == (2, 3)
    assert list(draft(np.array([5, 6, 7, 8, 5, 6], dtype=np.intc))) == [7, 8, 5]
    with pytest.raises(ValueError):
        LlamaPromptLookupDecoding(max_ngram_size=0)


# --------------------------------------------------------------------------- with the compat Llama


def test_format_handler_runs_on_the_compat_llama(tiny_model_path: Path) -> None:
    """A registered format's handler drives the real Llama.create_completion with every
    parameter llama-cpp-python passes (tfs_z, mirostat_*, stopping_criteria, ...)."""
    from pyllama.compat import llama as llama_mod
    llama = llama_mod.Llama(model_path=str(tiny_model_path), n_ctx=256, verbose=False)
    try:
        handler = lcf.get_chat_completion_handler("chatml")
        out = handler(llama=llama, messages=CONVERSATION[1:2], max_tokens=4, temperature=0.0)
        assert out["object"] == "chat.completion" and out["id"].startswith("chat")
        assert out["usage"]["completion_tokens"] <= 4 and out["choices"][0]["message"]["role"] == "assistant"
        chunks = list(handler(llama=llama, messages=CONVERSATION[1:2], max_tokens=3, stream=True))
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        llama.close()


def test_llava_handler_answers_with_an_image_through_the_compat_llama(tiny_model_path: Path, tmp_path: Path) -> None:
    from pyllama.compat import llama as llama_mod
    from tiny_mmproj import make_tiny_mmproj

    jpeg = ROOT / "vendor" / "llama.cpp" / "tools" / "mtmd" / "test-1.jpeg"
    handler = lcf.Llava15ChatHandler(clip_model_path=str(make_tiny_mmproj(tmp_path / "mmproj.gguf")), verbose=False)
    llama = llama_mod.Llama(model_path=str(tiny_model_path), n_ctx=2048, chat_handler=handler, verbose=False)
    try:
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg.read_bytes()).decode()
        with_image = [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                                   {"type": "image_url", "image_url": {"url": url}}]}]
        text_only = [{"role": "user", "content": "What?"}]
        out = llama.create_chat_completion(messages=with_image, max_tokens=3)
        plain = handler(llama=llama, messages=text_only, max_tokens=3)  # llama-cpp-python's call form
        assert out["object"] == plain["object"] == "chat.completion"
        # the image's embeddings take prompt positions the text alone does not
        assert out["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 4
    finally:
        llama.close()
