"""llama-cpp-python's ``llama_cpp.llama_chat_format``: chat formats, chat handlers, and the
multimodal chat handlers, on pyllama.

* Named chat formats (``format_chatml``, ``format_llama2``, ...) build exactly the prompt
  strings llama-cpp-python 0.3.36 builds; :func:`get_chat_format` returns one by name.
* :class:`Jinja2ChatFormatter` renders a Hugging Face chat template in pyllama's template
  sandbox (:class:`pyllama.chat.ChatFormatter`: transformers' environment, with limits).
* :func:`chat_formatter_to_chat_completion_handler` turns a formatter into a chat completion
  handler: it only renders, tokenizes and calls ``llama.create_completion`` (the compat
  ``Llama``'s, which runs on pyllama's engine), then reshapes the result into a chat
  completion.  There is no generation loop here.
* The multimodal handlers (:class:`Llava15ChatHandler` and its siblings) are descriptions
  for the compat ``Llama``: the projector file (``clip_model_path``), the chat template to
  render with (:attr:`MultimodalChatHandler.chat_template`) and how to prepare the messages
  (:meth:`MultimodalChatHandler.prepare_messages`).  The ``Llama`` loads the model with
  ``mmproj_path=handler.clip_model_path`` and answers through ``LLM.chat``, which
  tokenizes images with llama.cpp's mtmd.
* Tool-calling formats (``chatml-function-calling``, ``functionary*``) are not chat formats
  here: tool calls go through ``create_chat_completion(tools=...)`` with the model's own chat
  template (pyllama's tool calling).  :data:`TOOL_CALLING_CHAT_FORMATS` names them.

This module is the public home of every name below (code written for llama-cpp-python, and
its own tests, import private ones too); they live next to it:

* ``_chat_format_handlers.py`` -- the handler registry, formatters (:class:`Jinja2ChatFormatter`,
  Hugging Face ones) and :func:`chat_formatter_to_chat_completion_handler`;
* ``_chat_format_named.py`` -- the named chat formats and their table;
* ``_chat_format_responses.py`` -- completion -> chat completion shapes;
* ``_chat_format_multimodal.py`` -- :class:`MultimodalChatHandler` and the Llava-style handlers.
"""

from __future__ import annotations

from pyllama.compat import llama_grammar  # noqa: F401  (llama_cpp.llama_chat_format.llama_grammar)
from pyllama.compat._chat_format_handlers import (  # noqa: F401
    TOOL_CALLING_CHAT_FORMATS,
    _TOOL_CALLING_HINT,
    ChatFormatter,
    ChatFormatterResponse,
    Jinja2ChatFormatter,
    LlamaChatCompletionHandler,
    LlamaChatCompletionHandlerNotFoundException,
    LlamaChatCompletionHandlerRegistry,
    _grammar_for_json,
    _grammar_for_json_schema,
    _grammar_for_response_format,
    _stopping_criteria_list,
    _tool_choice_from_function_call,
    _tools_from_functions,
    chat_formatter_to_chat_completion_handler,
    get_chat_completion_handler,
    hf_autotokenizer_to_chat_completion_handler,
    hf_autotokenizer_to_chat_formatter,
    hf_tokenizer_config_to_chat_completion_handler,
    hf_tokenizer_config_to_chat_formatter,
    register_chat_completion_handler,
)
from pyllama.compat._chat_format_multimodal import (  # noqa: F401
    _MEDIA_MARKER_PREFIX,
    ClipModelNotFoundError,
    Gemma4ChatHandler,
    Llama3VisionAlpha,
    Llama3VisionAlphaChatHandler,
    Llava15ChatHandler,
    Llava16ChatHandler,
    MTMDChatHandler,
    MiniCPMv26ChatHandler,
    MoondreamChatHandler,
    MultimodalChatHandler,
    NanoLlavaChatHandler,
    ObsidianChatHandler,
    Qwen25VLChatHandler,
)
from pyllama.compat._chat_format_named import (  # noqa: F401
    _CHAT_FORMATS,
    CHATML_BOS_TOKEN,
    CHATML_CHAT_TEMPLATE,
    CHATML_EOS_TOKEN,
    LLAMA3_INSTRUCT_CHAT_TEMPLATE,
    MISTRAL_INSTRUCT_BOS_TOKEN,
    MISTRAL_INSTRUCT_CHAT_TEMPLATE,
    MISTRAL_INSTRUCT_EOS_TOKEN,
    MIXTRAL_INSTRUCT_CHAT_TEMPLATE,
    _OPENBUDDY_SYSTEM_MESSAGE,
    _OPEN_ORCA_SYSTEM_MESSAGE,
    _format_add_colon_single,
    _format_add_colon_space_single,
    _format_add_colon_two,
    _format_chatglm3,
    _format_chatml,
    _format_llama2,
    _format_no_colon_single,
    _get_system_message,
    _map_roles,
    chat_format_names,
    format,
    format_alpaca,
    format_baichuan,
    format_baichuan2,
    format_chatglm3,
    format_chatml,
    format_gemma,
    format_intel,
    format_llama2,
    format_llama3,
    format_mistral_instruct,
    format_mistrallite,
    format_oasst_llama,
    format_open_orca,
    format_openbuddy,
    format_openchat,
    format_phind,
    format_pygmalion,
    format_qwen,
    format_redpajama_incite,
    format_saiga,
    format_snoozy,
    format_vicuna,
    format_zephyr,
    get_chat_format,
    guess_chat_format_from_gguf_metadata,
    logger,
    register_chat_format,
)
from pyllama.compat._chat_format_responses import (  # noqa: F401
    _convert_completion_to_chat,
    _convert_completion_to_chat_function,
    _convert_text_completion_chunks_to_chat,
    _convert_text_completion_logprobs_to_chat,
    _convert_text_completion_to_chat,
    _tool_call_delta,
)

__all__ = [
    "CHATML_CHAT_TEMPLATE",
    "CHATML_BOS_TOKEN",
    "CHATML_EOS_TOKEN",
    "MISTRAL_INSTRUCT_CHAT_TEMPLATE",
    "MISTRAL_INSTRUCT_BOS_TOKEN",
    "MISTRAL_INSTRUCT_EOS_TOKEN",
    "MIXTRAL_INSTRUCT_CHAT_TEMPLATE",
    "LLAMA3_INSTRUCT_CHAT_TEMPLATE",
    "TOOL_CALLING_CHAT_FORMATS",
    "LlamaChatCompletionHandler",
    "LlamaChatCompletionHandlerNotFoundException",
    "LlamaChatCompletionHandlerRegistry",
    "get_chat_completion_handler",
    "register_chat_completion_handler",
    "ChatFormatterResponse",
    "ChatFormatter",
    "Jinja2ChatFormatter",
    "chat_formatter_to_chat_completion_handler",
    "hf_autotokenizer_to_chat_formatter",
    "hf_autotokenizer_to_chat_completion_handler",
    "hf_tokenizer_config_to_chat_formatter",
    "hf_tokenizer_config_to_chat_completion_handler",
    "guess_chat_format_from_gguf_metadata",
    "register_chat_format",
    "get_chat_format",
    "chat_format_names",
    "ClipModelNotFoundError",
    "MultimodalChatHandler",
    "Llava15ChatHandler",
    "Llava16ChatHandler",
    "ObsidianChatHandler",
    "MoondreamChatHandler",
    "NanoLlavaChatHandler",
    "Llama3VisionAlphaChatHandler",
    "Llama3VisionAlpha",
    "MiniCPMv26ChatHandler",
    "Qwen25VLChatHandler",
    "MTMDChatHandler",
    "Gemma4ChatHandler",
]
