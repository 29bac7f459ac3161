"""ServerSettings: everything `create_app` and `pyllama serve` can be told, validated once."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

#: Body size limit for one request (JSON), llama-server has none; a runaway client should
#: get a 413, not make the server buffer gigabytes.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Request line plus headers: beyond this, 431 (h11's own default is 16 KiB; httptools has none).
DEFAULT_MAX_HEADER_BYTES = 64 * 1024


@dataclass
class ServerSettings:
    """Settings of one server.  Names follow `pyllama serve`'s flags."""

    #: The model id reported by /v1/models and in every response (``--alias``).
    model_alias: Optional[str] = None
    #: Accepted API keys (``--api-key`` / ``--api-key-file``); empty = no authentication.
    api_keys: Sequence[str] = ()
    #: Origins allowed by CORS (``--cors-origin``, repeatable); "*" allows any.  Empty = no CORS headers.
    cors_origins: Sequence[str] = ()
    #: Requests that may wait for a free slot (``--max-queue``); beyond slots + this, 503.
    max_queue: int = 64
    #: Request bodies over this many bytes get 413.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Request line + headers over this many bytes get 431 (and the connection is closed).
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    #: max_tokens when a request gives none (-1 = until the end of generation or a full slot).
    default_max_tokens: int = -1
    #: Seconds a client is told to wait (Retry-After) when the queue is full.
    retry_after_s: int = 1
    #: Extra sampling defaults applied under every request's own fields.
    sampling_defaults: dict = field(default_factory=dict)
    #: How the model's thinking is returned (``--reasoning-format``): "auto"/"deepseek" put it in
    #: ``reasoning_content``, "none" leaves it in ``content`` (llama-server's meanings).
    reasoning_format: str = "auto"
    #: ``--reasoning-budget``: -1 unlimited, 0 no thinking, N at most N thinking tokens.
    reasoning_budget: int = -1
    #: ``--chat-template-kwargs``: extra variables for the chat template, under each request's own.
    chat_template_kwargs: dict = field(default_factory=dict)
    #: Every name of the model (``--alias a,b``: /v1/models' "aliases"); model_alias is its id.
    model_aliases: Sequence[str] = ()
    #: Informational tags of the model (``--tags``: /v1/models' "tags").
    model_tags: Sequence[str] = ()
    #: GET /slots answers (``--no-slots``: 501, as llama-server).
    slots_endpoint: bool = True
    #: GET /metrics answers (``--no-metrics``: 501, as llama-server without ``--metrics``).
    metrics_endpoint: bool = True
    #: POST /props is allowed (``--props``; it changes nothing yet, as in llama-server).
    props_endpoint: bool = False
    #: Where POST /slots/{id}?action=save|restore writes and reads slot files (``--slot-save-path``);
    #: None: the actions answer 501.  Files are named by the client, confined to this folder.
    slot_save_path: Optional[str] = None
    #: A final assistant message in a chat is continued (llama-server's default;
    #: ``--no-prefill-assistant`` answers after it instead).
    prefill_assistant: bool = True
    #: Every chat and completion response carries llama-server's ``__verbose`` debug object (the
    #: prompt the model got, its tokens' counts: ``--verbose``); a request's ``verbose`` field too.
    verbose_responses: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.api_keys, str):
            self.api_keys = (self.api_keys,)
        self.api_keys = tuple(k for k in self.api_keys if k)
        if isinstance(self.cors_origins, str):
            self.cors_origins = (self.cors_origins,)
        self.cors_origins = tuple(self.cors_origins)
        self.model_aliases = tuple(self.model_aliases)
        self.model_tags = tuple(self.model_tags)
        for name in ("max_queue", "max_body_bytes", "max_header_bytes", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < -1:
            raise ValueError(f"default_max_tokens must be an int >= -1, got {self.default_max_tokens!r}")
        if self.slot_save_path is not None and not os.path.isdir(self.slot_save_path):
            raise ValueError(f"slot_save_path must be an existing directory, got {self.slot_save_path!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            from pyllama.sampling import _unknown_message

            raise TypeError("create_app(): " + _unknown_message(unknown, frozenset(names), "setting"))
        return cls(**kwargs)
