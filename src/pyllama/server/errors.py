"""OpenAI's error object, and the mapping from pyllama's exceptions onto HTTP statuses.

Every error the server returns has OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

so the `openai` SDK raises its matching exception (BadRequestError, AuthenticationError,
NotFoundError, RateLimitError/InternalServerError ...) with our message.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pyllama.errors import (ClosedError, ContextLengthError, GrammarError, InvalidTokenError, JSONSchemaError,
                            KVCacheFullError)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
UNAVAILABLE = "unavailable_error"
SERVER = "server_error"


class APIError(Exception):
    """An error to answer with: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None, extra: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        err: dict = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}


#: An image or audio part sent to a model loaded without a projector.  The words are llama-server's
#: (clients match them); the status is 400, not its 500: the request cannot succeed as sent, and
#: a 5xx would have the openai/anthropic clients retry it.
NO_PROJECTOR = ("image input is not supported by this model (nor audio): it was loaded without a multimodal "
                "projector - start the server with --mmproj FILE")


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_CTX_NUMBERS = re.compile(r"(\d+) tokens.*?\b(?:is|of|has) (\d+)", re.S)

#: Seconds a client is told to wait when the KV memory is short or the server is stopping.
RETRY_AFTER_S = 1


def unavailable(message: str, code: str, retry_after_s: int = RETRY_AFTER_S) -> APIError:
    """A 503 that a retry may cure (OpenAI's SDK retries 503s that carry Retry-After)."""
    return APIError(503, message, type=UNAVAILABLE, code=code, headers={"Retry-After": str(retry_after_s)})


#: "repeat_penalty must be ..." -> param "repeat_penalty": the library names the argument first.
_LEADING_NAME = re.compile(r"^([a-z_][a-z0-9_]*)\b")


def from_library_error(exc: BaseException, param: Optional[str] = None) -> Optional[APIError]:
    """The API error for an exception the library raised while building or running a request
    (bad value, grammar, schema, token id, prompt too long: 400; the LLM closed or the KV
    memory short for now: 503 + Retry-After), or None if it is not the caller's fault."""
    if isinstance(exc, ClosedError):
        return unavailable("the server is shutting down; retry on another instance", "shutting_down")
    # A retryable ContextLengthError: the prompt fits a slot, but other sequences hold the KV
    # cells it needs (it clears as they finish), unlike a prompt longer than a slot.
    if isinstance(exc, KVCacheFullError) or (isinstance(exc, ContextLengthError) and exc.retryable):
        return unavailable(f"no room in the KV memory right now, retry later: {exc}", "kv_cache_full")
    if isinstance(exc, ContextLengthError):
        extra: dict = {}
        m = _CTX_NUMBERS.search(str(exc))
        if m:   # llama-server's fields, so clients written for it find the numbers
            extra = {"n_prompt_tokens": int(m.group(1)), "n_ctx": int(m.group(2))}
        return APIError(400, str(exc), param=param or "messages", code="context_length_exceeded", extra=extra)
    if isinstance(exc, InvalidTokenError):
        return bad_request(str(exc), param=param or "prompt", code="invalid_token")
    if isinstance(exc, JSONSchemaError):
        return bad_request(str(exc), param="response_format", code="invalid_json_schema")
    if isinstance(exc, GrammarError):
        return bad_request(str(exc), param="grammar", code="invalid_grammar")
    if isinstance(exc, ValueError):   # the library's validation; a TypeError would be our bug: 500
        m = _LEADING_NAME.match(str(exc))
        if m and m.group(1) in _request_fields():
            param = m.group(1)
        return bad_request(str(exc), param=param)
    return None


def _request_fields() -> frozenset:
    from pyllama.server import schemas as S

    names = frozenset(S.ChatCompletionRequest.model_fields) | frozenset(S.CompletionRequest.model_fields)
    return names - {"model", "user"}      # "model ..." is about the loaded model, not the field


def error_event(exc: BaseException) -> APIError:
    """The error object sent as the last SSE event (before ``data: [DONE]``) of a stream
    that failed after it started."""
    if isinstance(exc, APIError):
        return exc
    api = from_library_error(exc)
    if api is not None:
        return api
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type=SERVER)


def pydantic_errors_to_api_error(errors: Any) -> APIError:
    """FastAPI's RequestValidationError list -> one 400 with the first problem, named like OpenAI
    does (``param`` is the dotted field path)."""
    errors = list(errors)
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic reports a union's failed branches as extra path items ("str", "list[...]"); drop them
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
                           code="invalid_json")
    if kind == "missing" and not loc:
        return bad_request("the request needs a JSON body")
    if kind == "missing":
        return bad_request(f"'{param}' is required", param=param, code="missing_field")
    if kind == "extra_forbidden":
        return bad_request(f"unknown field '{param}'", param=param, code="unknown_field")
    if kind == "model_attributes_type" and not loc:
        return bad_request("the request body must be a JSON object")
    msg = first.get("msg", "invalid value")
    given = first.get("input")
    shown = _short_repr(given)
    n_more = len(errors) - 1
    more = f" (and {n_more} more problem{'s' if n_more > 1 else ''})" if n_more else ""
    where = f"'{param}'" if param else "the request body"
    return bad_request(f"{where}: {msg}, got {shown}{more}", param=param, code="invalid_value")


def _is_type_tag(p: str) -> bool:
    return bool(re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|"
                             r"[A-Z][A-Za-z]+|tagged-union\[.*\]|is-instance\[.*\]|constrained-.*)", p))


def _short_repr(value: Any, limit: int = 80) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
