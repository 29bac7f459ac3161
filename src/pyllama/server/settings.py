"""ServerSettings: everything `create_app` and `pyllama serve` can be told, validated once."""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self) -> None:
        if isinstance(self.api_keys, str):
            self.api_keys = (self.api_keys,)
        self.api_keys = tuple(k for k in self.api_keys if k)
        if isinstance(self.cors_origins, str):
            self.cors_origins = (self.cors_origins,)
        self.cors_origins = tuple(self.cors_origins)
        for name in ("max_queue", "max_body_bytes", "max_header_bytes", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < -1:
            raise ValueError(f"default_max_tokens must be an int >= -1, got {self.default_max_tokens!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            from pyllama.sampling import _unknown_message

            raise TypeError("create_app(): " + _unknown_message(unknown, frozenset(names), "setting"))
        return cls(**kwargs)
