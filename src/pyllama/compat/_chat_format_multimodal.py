"""llama-cpp-python's multimodal chat handlers (:class:`Llava15ChatHandler` and its siblings,
:class:`MTMDChatHandler`) as descriptions for the compat ``Llama``: the projector file, the
chat template to render with and how to prepare the messages; pyllama's ``LLM.chat`` does the
rest with llama.cpp's mtmd.

Re-exported by :mod:`pyllama.compat.llama_chat_format`, their public home.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from pyllama.compat._chat_format_named import _get_system_message

if TYPE_CHECKING:  # pragma: no cover
    from pyllama.compat.llama import Llama


class ClipModelNotFoundError(FileNotFoundError, ValueError):
    """The projector file given as ``clip_model_path`` does not exist.  Both a
    FileNotFoundError and, as llama-cpp-python raises, a ValueError."""


#: How pyllama's LLM.chat marks where an image was taken out of a conversation before the
#: template renders it (pyllama.multimodal.chat_media_prompt): templates that treat images
#: and text differently recognise the image placeholders by this prefix.
_MEDIA_MARKER_PREFIX = "<__pyllama_media_"


class MultimodalChatHandler:
    """The common base of the multimodal chat handlers: what the compat ``Llama`` needs to
    answer conversations with images through ``LLM.chat``.

    * :attr:`clip_model_path` -- the projector (mmproj) GGUF; load the model with
      ``mmproj_path=handler.clip_model_path``.
    * :attr:`chat_template` -- the Jinja template to render with
      (``LLM(..., chat_template=handler.chat_template)``), or None for the GGUF's own.
    * :meth:`prepare_messages` -- the conversation as that template expects it (the
      handler's default system message added, images placed where the format puts them).

    Handlers do not generate: calling one (``handler(llama=..., messages=...)``) asks
    ``llama.create_chat_completion`` of the ``Llama`` built with it.
    """

    #: The Jinja chat template of the format, as llama-cpp-python writes it (None: the GGUF's own).
    CHAT_FORMAT: Optional[str] = None
    #: System message added when a conversation has none (None: add nothing).
    DEFAULT_SYSTEM_MESSAGE: Optional[str] = None
    #: Whether the format puts a message's images before its text (CHAT_FORMAT renders all
    #: image parts first); pyllama renders parts in order, so prepare_messages moves them.
    IMAGES_FIRST: bool = False
    #: A pyllama-side variant of CHAT_FORMAT, for formats whose image and text parts get
    #: different surroundings (None: CHAT_FORMAT itself).
    _PYLLAMA_CHAT_FORMAT: Optional[str] = None

    def __init__(self, clip_model_path: Union[str, "os.PathLike[str]"], verbose: bool = True) -> None:
        if not isinstance(clip_model_path, (str, os.PathLike)):
            raise TypeError(f"clip_model_path must be a path (str), not {type(clip_model_path).__name__}")
        path = os.fspath(clip_model_path)
        if not os.path.exists(path):
            raise ClipModelNotFoundError(errno.ENOENT, f"Clip model path does not exist: {path}", path)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "clip_model_path is a directory, not a GGUF file", path)
        self.clip_model_path = path
        self.verbose = verbose

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clip_model_path={self.clip_model_path!r})"

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja template ``LLM`` should render conversations with (None: the model's own)."""
        return self._PYLLAMA_CHAT_FORMAT or self.CHAT_FORMAT

    @property
    def chat_format(self) -> Optional[str]:
        """Alias of :attr:`chat_template` (the "chat format" hint for the Llama class)."""
        return self.chat_template

    def prepare_messages(self, messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """The messages as this format renders them: the default system message first when
        there is no system message, and (for formats that show images before text) each
        message's image parts moved before its other parts.  The input is not modified."""
        out = [dict(m) for m in messages]
        if self.DEFAULT_SYSTEM_MESSAGE is not None and _get_system_message(out) == "":
            out.insert(0, {"role": "system", "content": self.DEFAULT_SYSTEM_MESSAGE})
        if self.IMAGES_FIRST:
            for m in out:
                content = m.get("content")
                if isinstance(content, (list, tuple)):
                    images = [p for p in content if isinstance(p, Mapping) and p.get("type") == "image_url"]
                    others = [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "image_url")]
                    m["content"] = images + others
        return out

    @staticmethod
    def get_image_urls(messages: Sequence[Mapping[str, Any]]) -> List[str]:
        """The image URLs of the user messages, in order (llama-cpp-python's helper)."""
        image_urls: List[str] = []
        for message in messages:
            if message["role"] != "user" or message["content"] is None or isinstance(message["content"], str):
                continue
            for content in message["content"]:
                if isinstance(content, dict) and content.get("type") == "image_url":
                    url = content["image_url"]
                    image_urls.append(url["url"] if isinstance(url, dict) and "url" in url else url)
        return image_urls

    def __call__(self, *, llama: "Llama", messages: List[Dict[str, Any]], **kwargs: Any) -> Any:
        if getattr(llama, "chat_handler", None) is not self:
            raise ValueError(f"this {type(self).__name__} answers only through the Llama it was given to "
                             "(Llama(model_path, chat_handler=handler)); that Llama has another chat handler")
        return llama.create_chat_completion(messages=messages, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: Optional[str],
        local_dir: Union[str, "os.PathLike[str]", None] = None,
        local_dir_use_symlinks: Union[bool, str] = "auto",
        cache_dir: Union[str, "os.PathLike[str]", None] = None,
        *,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        progress: Optional[bool] = None,
        **kwargs: Any,
    ) -> "MultimodalChatHandler":
        """A handler whose projector is downloaded from the Hugging Face Hub: the one file of
        `repo_id` matching `filename` (a name or glob such as ``"*mmproj*"``), through
        huggingface_hub's cache (``pip install 'pyllama[hf]'``).  Other keyword arguments
        go to the handler (``verbose``).  Errors are pyllama.models' (HubRepoNotFoundError,
        HubFileNotFoundError, HubAmbiguousFileError -- a ValueError -- HubOfflineError)."""
        from pyllama import models

        del local_dir_use_symlinks  # accepted for llama-cpp-python code; huggingface_hub ignores it too
        if not filename:
            raise ValueError("filename is required: a name or glob of the projector file, e.g. '*mmproj*'")
        path = models.fetch_from_hub(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                     local_dir=local_dir, token=token, progress=progress)
        return cls(clip_model_path=os.fspath(path), **kwargs)


class Llava15ChatHandler(MultimodalChatHandler):
    DEFAULT_SYSTEM_MESSAGE: Optional[str] = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is string %}"
        "\nUSER: {{ message.content }}"
        "{% endif %}"
        "{% if message.content is iterable %}"
        "\nUSER: "
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' and content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.type == 'image_url' and content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% endif %}"
        "{% if message.role == 'assistant' and message.content is not none %}"
        "\nASSISTANT: {{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "\nASSISTANT: "
        "{% endif %}"
    )


class ObsidianChatHandler(Llava15ChatHandler):
    # ChatML with ### as the separator.
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        # System message
        "{% if message.role == 'system' %}"
        "<|im_start|>system\n"
        "{{ message.content }}\n"
        "###\n"
        "{% endif %}"
        # User message
        "{% if message.role == 'user' %}"
        "<|im_start|>user\n"
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' and content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.type == 'image_url' and content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "###\n"
        "{% endif %}"
        # Assistant message
        "{% if message.role == 'assistant' %}"
        "<|im_start|>assistant\n"
        "{{ message.content }}"
        "###\n"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


class MoondreamChatHandler(Llava15ChatHandler):
    # f"<image>\n\n{chat_history}Question: {question}\n\nAnswer:"
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        # <image>
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}\n\n"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}\n\n"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        # Question:
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "Question: {{ content.text }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        # Question:
        "{% if message.content is string %}"
        "Question: {{ message.content }}\n\n"
        "{% endif %}"
        "{% endif %}"
        # Answer:
        "{% if message.role == 'assistant' %}"
        "Answer:{{ message.content }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )
    _PYLLAMA_CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "{{ content.text }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and not content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "Question: {{ content.text }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% if message.content is string %}"
        "Question: {{ message.content }}\n\n"
        "{% endif %}"
        "{% endif %}"
        "{% if message.role == 'assistant' %}"
        "Answer:{{ message.content }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )


class Llava16ChatHandler(Llava15ChatHandler):
    DEFAULT_SYSTEM_MESSAGE = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. "
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        # <image>
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}\n"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}\n"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        # Question:
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        # Question:
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endif %}"
        # Answer:
        "{% if message.role == 'assistant' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )
    _PYLLAMA_CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "{{ content.text }}\n"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and not content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endif %}"
        "{% if message.role == 'assistant' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )


class NanoLlavaChatHandler(Llava15ChatHandler):
    # ChatML without "\n" after <|im_end|>.
    DEFAULT_SYSTEM_MESSAGE = "Answer the question"
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        # System message
        "{% if message.role == 'system' %}"
        "<|im_start|>system\n"
        "{{ message.content }}"
        "<|im_end|>"
        "{% endif %}"
        # User message
        "{% if message.role == 'user' %}"
        "<|im_start|>user\n"
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' and content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.type == 'image_url' and content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>"
        "{% endif %}"
        # Assistant message
        "{% if message.role == 'assistant' %}"
        "<|im_start|>assistant\n"
        "{{ message.content }}"
        "<|im_end|>"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


class Llama3VisionAlphaChatHandler(Llava15ChatHandler):
    # prompt = f"<|start_header_id|>user<|end_header_id|>\n\n<image>{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    DEFAULT_SYSTEM_MESSAGE = None
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "<|start_header_id|>"
        "{% if message.role == 'user' %}"
        "user<|end_header_id|>\n\n"
        "{% if message.content is iterable %}"
        # <image>
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        # Question:
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        # Question:
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endif %}"
        # Answer:
        "{% if message.role == 'assistant' %}"
        "assistant<|end_header_id|>\n\n"
        "{{ message.content }}"
        "{% endif %}"
        "<|eot_id|>"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    )


# alias, as in llama-cpp-python
Llama3VisionAlpha = Llama3VisionAlphaChatHandler


class MiniCPMv26ChatHandler(Llava15ChatHandler):
    DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is iterable %}"
        "{% for content in message['content'] %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message['content'] %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


class Qwen25VLChatHandler(Llava15ChatHandler):
    DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
    IMAGES_FIRST = False  # parts in order
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n"
        "{{ self.DEFAULT_SYSTEM_MESSAGE }}<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}<|im_end|>\n"
        "{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}"
        "{% else %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% elif content['type'] == 'text' %}"
        "{{ content['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "<|im_start|>assistant\n"
    )


class MTMDChatHandler(MultimodalChatHandler):
    """Images with the model's own chat template (llama-cpp-python's generic mtmd handler).
    ``use_gpu`` is recorded; pyllama's projector follows the model's GPU offload."""

    def __init__(self, clip_model_path: Union[str, "os.PathLike[str]"], verbose: bool = True,
                 use_gpu: bool = True) -> None:
        super().__init__(clip_model_path, verbose=verbose)
        self.use_gpu = use_gpu


class Gemma4ChatHandler(MTMDChatHandler):
    pass
