"""llama-cpp-python's named chat formats (``"chatml"``, ``"llama-2"``, ``"gemma"``, ...): the
prompt strings each builds, the helpers that build them, the table of names
(:func:`register_chat_format`, :func:`get_chat_format`, :func:`chat_format_names`) and the
common templates a GGUF may carry verbatim (:func:`guess_chat_format_from_gguf_metadata`).

Re-exported by :mod:`pyllama.compat.llama_chat_format`, their public home.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from pyllama.compat._chat_format_handlers import (
    _TOOL_CALLING_HINT,
    TOOL_CALLING_CHAT_FORMATS,
    ChatFormatter,
    ChatFormatterResponse,
    LlamaChatCompletionHandlerRegistry,
    chat_formatter_to_chat_completion_handler,
)

logger = logging.getLogger("pyllama")


### Common chat templates and special tokens (llama-cpp-python's constants) ###

# Source: https://huggingface.co/teknium/OpenHermes-2.5-Mistral-7B/blob/main/tokenizer_config.json
CHATML_CHAT_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
CHATML_BOS_TOKEN = "<s>"
CHATML_EOS_TOKEN = "<|im_end|>"

# Source: https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.1/blob/main/tokenizer_config.json
MISTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
MISTRAL_INSTRUCT_BOS_TOKEN = "<s>"
MISTRAL_INSTRUCT_EOS_TOKEN = "</s>"

# Source: https://huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1/blob/main/tokenizer_config.json
MIXTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"

# Source: https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/tokenizer_config.json
LLAMA3_INSTRUCT_CHAT_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"


def guess_chat_format_from_gguf_metadata(metadata: Mapping[str, str]) -> Optional[str]:
    """The chat format name whose template a GGUF carries verbatim (chatml,
    mistral-instruct, llama-3), else None (then the GGUF's own template is used)."""
    template = metadata.get("tokenizer.chat_template")
    if template is None:
        return None
    if template == CHATML_CHAT_TEMPLATE:
        return "chatml"
    if template in (MISTRAL_INSTRUCT_CHAT_TEMPLATE, MIXTRAL_INSTRUCT_CHAT_TEMPLATE):
        return "mistral-instruct"
    if template == LLAMA3_INSTRUCT_CHAT_TEMPLATE:
        return "llama-3"
    return None


### Prompt-building helpers (llama-cpp-python's, same outputs) ###


def _get_system_message(messages: Sequence[Mapping[str, Any]]) -> str:
    """The first system message's content ("" if none)."""
    for message in messages:
        if message["role"] == "system":
            return message["content"] or ""
    return ""


def _map_roles(messages: Sequence[Mapping[str, Any]], role_map: Mapping[str, str]) -> List[Tuple[str, Optional[str]]]:
    """(mapped role, content) for the messages whose role is in `role_map`; content that is
    not a string (a list of parts, None) becomes None, as in llama-cpp-python."""
    output: List[Tuple[str, Optional[str]]] = []
    for message in messages:
        role = message["role"]
        if role in role_map:
            content = message["content"] if isinstance(message["content"], str) else None
            output.append((role_map[role], content))
    return output


def _format_llama2(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str, sep2: str) -> str:
    seps = [sep, sep2]
    ret = system_message + sep
    for i, (role, message) in enumerate(messages):
        if system_message and i == 0:
            ret += (message or "") + seps[i % 2]
        elif message:
            ret += role + message + " " + seps[i % 2]
        else:
            ret += role + " "
    return ret


def _format_add_colon_single(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message + sep
    for role, message in messages:
        ret += role + ": " + message + sep if message else role + ":"
    return ret


def _format_add_colon_two(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str, sep2: str) -> str:
    seps = [sep, sep2]
    ret = system_message + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def _format_no_colon_single(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message
    for role, message in messages:
        ret += role + message + sep if message else role
    return ret


def _format_add_colon_space_single(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message + sep
    for role, message in messages:
        ret += role + ": " + message + sep if message else role + ": "  # must end with a space
    return ret


def _format_chatml(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = "" if system_message == "" else system_message + sep + "\n"
    for role, message in messages:
        ret += role + "\n" + message + sep + "\n" if message else role + "\n"
    return ret


def _format_chatglm3(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message or ""
    for role, message in messages:
        ret += role + "\n" + " " + message if message else role
    return ret


### Named chat formats ###

_CHAT_FORMATS: Dict[str, ChatFormatter] = {}


def register_chat_format(name: str) -> Callable[[Any], Any]:
    """Decorator: register a chat format under `name`, both as a formatter
    (:func:`get_chat_format`) and as a chat completion handler
    (:func:`get_chat_completion_handler`), as llama-cpp-python does.  A name registered
    twice raises ValueError."""

    def decorator(f: ChatFormatter) -> ChatFormatter:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(
            name, chat_formatter_to_chat_completion_handler(f))
        _CHAT_FORMATS[name] = f
        return f

    return decorator


def chat_format_names() -> List[str]:
    """The names :func:`get_chat_format` knows, sorted."""
    return sorted(_CHAT_FORMATS)


def get_chat_format(name: str) -> ChatFormatter:
    """The chat format registered as `name` (``format_chatml`` for ``"chatml"``, ...).

    ValueError for an unknown name (the message lists the known ones) and for the
    tool-calling handlers' names (:data:`TOOL_CALLING_CHAT_FORMATS`), which pyllama serves
    with the model's own template instead.  (pyllama's addition: llama-cpp-python only has
    :func:`get_chat_completion_handler`.)
    """
    if not isinstance(name, str):
        raise TypeError(f"chat format name must be a str, not {type(name).__name__}")
    try:
        return _CHAT_FORMATS[name]
    except KeyError:
        pass
    if name in TOOL_CALLING_CHAT_FORMATS:
        raise ValueError(_TOOL_CALLING_HINT.format(name=name))
    raise ValueError(f"unknown chat format {name!r}; known chat formats: {', '.join(chat_format_names())} "
                     "(or leave chat_format=None to use the model's own chat template)")


# see https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/tokenization_llama.py
# system prompt is "embedded" in the first message
@register_chat_format("llama-2")
def format_llama2(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _system_template = "[INST] <<SYS>>\n{system_message}\n<</SYS>>"
    _roles = dict(user="<s>[INST]", assistant="[/INST]")
    _messages = _map_roles(messages, _roles)
    system_message = _get_system_message(messages)
    if system_message:
        system_message = _system_template.format(system_message=system_message)
    _prompt = _format_llama2(system_message, _messages, " ", "</s>") + "[/INST]"
    return ChatFormatterResponse(prompt=_prompt)


# https://github.com/meta-llama/llama3/blob/main/llama/tokenizer.py#L202-L229
@register_chat_format("llama-3")
def format_llama3(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(
        system="<|start_header_id|>system<|end_header_id|>\n\n",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    _sep = "<|eot_id|>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single("", _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("alpaca")
def format_alpaca(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="### Instruction", assistant="### Response")
    system_message = _get_system_message(messages)
    _messages = _map_roles(messages, _roles)
    _prompt = _format_add_colon_two(system_message, _messages, "\n\n", "</s>")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("qwen")
def format_qwen(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<|im_start|>user", assistant="<|im_start|>assistant")
    system_message = _get_system_message(messages) or "You are a helpful assistant."
    system_message = "<|im_start|>system\n{system_message}".format(system_message=system_message)
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, "<|im_end|>")
    return ChatFormatterResponse(prompt=_prompt, stop="<|endoftext|>")


@register_chat_format("vicuna")
def format_vicuna(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                      "gives helpful, detailed, and polite answers to the user's questions.")
    _roles = dict(user="USER", assistant="ASSISTANT")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_two(system_message, _messages, " ", "</s>")
    return ChatFormatterResponse(prompt=_prompt)


# llama-cpp-python names this function `format`; keep that name importable too.
format = format_vicuna  # noqa: A001


@register_chat_format("oasst_llama")
def format_oasst_llama(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _system_template = "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"
    _roles = dict(user="<|prompter|>", assistant="<|assistant|>")
    system_message = _system_template.format(system_message=_get_system_message(messages))
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, "</s>")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("baichuan-2")
def format_baichuan2(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<reserved_106>", assistant="<reserved_107>")
    system_message = _get_system_message(messages)
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, "")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("baichuan")
def format_baichuan(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<reserved_102>", assistant="<reserved_103>")
    system_message = _get_system_message(messages)
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, "")
    return ChatFormatterResponse(prompt=_prompt)


_OPENBUDDY_SYSTEM_MESSAGE = """You are a helpful, respectful and honest INTP-T AI Assistant named Buddy. You are talking to a human User.
Always answer as helpfully and logically as possible, while being safe. Your answers should not include any harmful, political, religious, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.
If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.
You can speak fluently in many languages, for example: English, Chinese.
You cannot access the internet, but you have vast knowledge, cutoff: 2021-09.
You are trained by OpenBuddy team, (https://openbuddy.ai, https://github.com/OpenBuddy/OpenBuddy), you are based on LLaMA and Falcon transformers model, not related to GPT or OpenAI.

"""


@register_chat_format("openbuddy")
def format_openbuddy(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="User", assistant="Assistant")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(_OPENBUDDY_SYSTEM_MESSAGE, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("redpajama-incite")
def format_redpajama_incite(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = _get_system_message(messages)
    _roles = dict(user="<human>", assistant="<bot>")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(system_message, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt, stop="<human>")


@register_chat_format("snoozy")
def format_snoozy(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    default_system_message = ("The prompt below is a question to answer, a task to complete, or a conversation "
                              "to respond to; decide which and write an appropriate response.")
    # llama-cpp-python builds "### Instruction:\n{system}" and then uses the bare system
    # message instead; the prompt below is what it actually sends.
    system_message = _get_system_message(messages) or default_system_message
    _roles = dict(user="### Prompt", assistant="### Response")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(system_message, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt, stop="###")


@register_chat_format("phind")
def format_phind(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="### User Message", assistant="### Assistant")
    _system_message = "### System Prompt\nYou are an intelligent programming assistant."
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(_system_message, _messages, "\n\n")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("intel")
def format_intel(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="### User:", assistant="### Assistant:")
    # llama-cpp-python sends the placeholder literally (it never formats it in).
    _system_message = "### System:\n{system_message}"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(_system_message, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt)


_OPEN_ORCA_SYSTEM_MESSAGE = (
    "You are a helpful assistant. Please answer truthfully and write out your "
    "thinking step by step to be sure you get the right answer. If you make a mistake or encounter "
    "an error in your thinking, say so out loud and attempt to correct it. If you don't know or "
    "aren't sure about something, say so clearly. You will act as a professional logician, mathematician, "
    "and physicist. You will also act as the most appropriate type of expert to answer any particular "
    "question or solve the relevant problem; state which expert type your are, if so. Also think of "
    "any particular named expert that would be ideal to answer the relevant question or solve the "
    "relevant problem; name and act as them, if appropriate."
)


@register_chat_format("open-orca")
def format_open_orca(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    roles = ("User", "Assistant")
    # llama-cpp-python maps the roles "User"/"Assistant" (capitalised) only, so OpenAI-style
    # "user"/"assistant" messages are left out of the prompt; kept as it is.
    _messages = _map_roles(messages, dict(zip(roles, roles)))
    _messages.append((roles[1], None))
    _prompt = _format_add_colon_space_single(_OPEN_ORCA_SYSTEM_MESSAGE, _messages, "<|end_of_turn|>\n")
    return ChatFormatterResponse(prompt=_prompt, stop="User")


@register_chat_format("mistrallite")
def format_mistrallite(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<|prompter|>", assistant="</s>\n<|assistant|>")
    system_message = "<|system|>{system_message}</s>".format(system_message=_get_system_message(messages))
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, " ")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("zephyr")
def format_zephyr(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|system|>\n{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|user|>\n", assistant="<|assistant|>\n")
    _sep = "</s>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("pygmalion")
def format_pygmalion(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|system|>{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|user|>", assistant="<|model|>")
    _sep = "\n"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("chatml")
def format_chatml(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|im_start|>system\n{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|im_start|>user", assistant="<|im_start|>assistant")
    _sep = "<|im_end|>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("mistral-instruct")
def format_mistral_instruct(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    eos = "</s>"
    prompt = ""
    for message in messages:
        if message["role"] == "user" and message["content"] is not None and isinstance(message["content"], str):
            prompt += "[INST] " + message["content"]
        elif message["role"] == "assistant" and message["content"] is not None:
            prompt += " [/INST]" + message["content"] + eos
    prompt += " [/INST]"
    return ChatFormatterResponse(prompt=prompt, stop=eos)


@register_chat_format("chatglm3")
def format_chatglm3(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|system|>\n{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|user|>", assistant="<|assistant|>")
    _sep = "</s>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatglm3(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("openchat")
def format_openchat(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "{system_message}<|end_of_turn|>".format(system_message=_get_system_message(messages))
    _roles = dict(user="GPT4 Correct User: ", assistant="<|end_of_turn|>GPT4 Correct Assistant: ")
    _sep = "<|end_of_turn|>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


# https://huggingface.co/collections/IlyaGusev/saiga2-saigamistral-6505d4ccc3d1e53166b636cd
@register_chat_format("saiga")
def format_saiga(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _message_template = "<s>{role}\n{content}</s>"
    _roles = dict(user="user", bot="bot", system="system")
    _messages = _map_roles(messages, _roles)
    _prompt = ""
    for role, content in _messages:
        if content:
            _prompt += _message_template.format(role=role, content=content)
        else:
            _prompt += f"<s>{role}\n"
    _prompt += "<s>bot"
    return ChatFormatterResponse(prompt=_prompt.strip())


# https://huggingface.co/collections/google/gemma-release-65d5efbccdbb8c4202ec078b
@register_chat_format("gemma")
def format_gemma(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    if _get_system_message(messages) != "":
        logger.debug("`role='system'` messages are not allowed on Google's Gemma models.")
    _roles = dict(user="<start_of_turn>user\n", assistant="<start_of_turn>model\n")
    _sep = "<end_of_turn>\n"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message="", messages=_messages, sep=_sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)
