"""Request and response bodies, with OpenAI's field names (and llama-server's extensions).

Requests forbid unknown fields (a typo such as ``temprature`` is a 400 naming the closest
field, not a silently ignored setting); fields OpenAI defines that have no meaning here
(``user``, ``store``, ``metadata`` ...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from pyllama.server.errors import APIError, bad_request

#: The largest value of a C ``int32_t``: every integer field that reaches llama.cpp as an
#: int is bounded by it (a larger one would be an OverflowError in C, a 500).
INT32_MAX = 2**31 - 1
#: Bound of the float fields that have no natural maximum (penalties, mirostat, DRY ...):
#: far beyond any useful value, and finite in C's float.
FLOAT_MAX = 1e6
#: A stop list (and DRY's sequence breakers) is checked against the text after every token
#: of its request: at most this many strings ...
MAX_STOP_STRINGS = 64
#: ... of at most this many characters together.
MAX_STOP_CHARS = 8192

# --------------------------------------------------------------------------- shared pieces


class _Strict(BaseModel):
    # allow_inf_nan=False: 1e400 (inf after JSON parsing) is refused like NaN and Infinity
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class _Open(BaseModel):
    """Sub-objects whose extra keys are kept (passed through to templates / tools)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


Stop = Union[str, List[str], None]


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's name; accepted, usage comes at the end


class SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)
    n_predict: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)          # llama-server's name
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=INT32_MAX)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    typical_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Optional[int] = Field(default=None, ge=-1, le=0xFFFFFFFF)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: Optional[float] = Field(default=None, gt=0.0, le=FLOAT_MAX)
    repeat_last_n: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)
    mirostat: Optional[Literal[0, 1, 2]] = None
    mirostat_tau: Optional[float] = Field(default=None, ge=0.0, le=FLOAT_MAX)
    mirostat_eta: Optional[float] = Field(default=None, ge=0.0, le=FLOAT_MAX)
    # llama-server's newer samplers (pyllama.SamplingParams documents them)
    top_n_sigma: Optional[float] = Field(default=None, ge=-FLOAT_MAX, le=FLOAT_MAX)   # <= 0: off
    xtc_probability: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    xtc_threshold: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    dynatemp_range: Optional[float] = Field(default=None, ge=0.0, le=FLOAT_MAX)
    dynatemp_exponent: Optional[float] = Field(default=None, ge=0.0, le=FLOAT_MAX)
    dry_multiplier: Optional[float] = Field(default=None, ge=0.0, le=FLOAT_MAX)
    # < 1 means the default (1.75), as in llama-server
    dry_base: Optional[float] = Field(default=None, ge=-FLOAT_MAX, le=FLOAT_MAX)
    dry_allowed_length: Optional[int] = Field(default=None, ge=0, le=INT32_MAX)
    dry_penalty_last_n: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)
    dry_sequence_breakers: Optional[List[str]] = Field(default=None, min_length=1)
    logit_bias: Optional[Dict[str, float]] = None
    grammar: Optional[str] = None
    json_schema: Optional[Dict[str, Any]] = None                   # llama-server's extension
    ignore_eos: Optional[bool] = None
    cache_prompt: Optional[bool] = None
    # OpenAI fields that change nothing here
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[Dict[str, Any]] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        for s in items:
            if not s:
                raise ValueError("stop strings must not be empty")
        _check_string_list(items, "stop strings")
        return v

    @field_validator("dry_sequence_breakers")
    @classmethod
    def _breakers(cls, v: Optional[List[str]]) -> Optional[List[str]]:
        _check_string_list(v or [], "dry_sequence_breakers")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        if v is None:
            return v
        for key, bias in v.items():
            # int() alone would also take " 5", "+5", "1_0" and non-ASCII digits
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return v


def _check_string_list(items: List[str], what: str) -> None:
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} {what} are allowed, got {len(items)}")
    total = sum(len(s) for s in items)
    if total > MAX_STOP_CHARS:
        raise ValueError(f"{what} may have at most {MAX_STOP_CHARS} characters together, got {total}")


# --------------------------------------------------------------------------- chat


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Optional[str] = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


# Image and audio parts need a model loaded with a projector (pyllama serve --mmproj); the
# backend says so when it has none.
ContentPart = Union[TextPart, ImagePart, AudioPart]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    refusal: Optional[str] = None

    @model_validator(mode="after")
    def _content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs 'content'")
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self

    def to_template(self) -> dict:
        """The dict the chat template (and pyllama.tools) sees."""
        msg = self.model_dump(exclude_none=True)
        if self.role == "developer":        # OpenAI's newer name for system
            msg["role"] = "system"
        if "content" not in msg:
            msg["content"] = None
        return msg


class FunctionDefinition(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class JSONSchemaSpec(_Strict):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaSpec] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")   # llama-server's shortcut

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema":
            schema = self.json_schema.schema_ if self.json_schema is not None else self.schema_
            if schema is None:
                raise ValueError("a json_schema response_format needs json_schema.schema")
        return self

    def to_library(self) -> dict:
        if self.type == "json_schema":
            schema = self.json_schema.schema_ if self.json_schema is not None else self.schema_
            return {"type": "json_schema", "json_schema": {"schema": schema}}
        if self.type == "json_object" and self.schema_ is not None:
            return {"type": "json_object", "schema": self.schema_}
        return {"type": self.type}


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    # reasoning models (llama-server's fields; the server's flags give the defaults)
    reasoning_format: Optional[Literal["none", "auto", "deepseek", "deepseek-legacy"]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    reasoning_budget_tokens: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)   # -1: the server's
    thinking_budget_tokens: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)    # the same, older name
    reasoning_effort: Optional[str] = None      # "none": no thinking; else a template variable (gpt-oss)
    # llama-server's (and vLLM's) prompt controls (see prompt_controls)
    add_generation_prompt: bool = True
    continue_final_message: Union[bool, Literal["content", "reasoning_content"]] = False
    timings_per_token: bool = False             # llama-server's: the timings so far on every streamed chunk
    verbose: Optional[bool] = None              # llama-server's __verbose debug object (None: --verbose)
    return_progress: bool = False               # llama-server's: prompt_progress chunks (streamed)
    # llama-server's slot pin: accepted as on /completion (the engine chooses the slot: a prompt
    # cache hit picks the slot holding that prefix)
    id_slot: int = Field(default=-1, ge=-1, le=INT32_MAX)
    # accepted and ignored (OpenAI)
    modalities: Optional[List[str]] = None
    verbosity: Optional[str] = None

    def check(self) -> None:
        """Cross-field checks (raise APIError with the field's name)."""
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or ()]
            if self.tool_choice.function.name not in names:
                raise bad_request(f"tool_choice names the function {self.tool_choice.function.name!r}, "
                                  f"which is not in tools ({', '.join(names) or 'none given'})",
                                  param="tool_choice")
        elif self.tool_choice is not None and not self.tools:
            # as OpenAI answers: a tool_choice without tools is a mistake, not a no-op
            raise bad_request("tool_choice is only allowed when tools are given", param="tool_choice")
        for key, value in (self.chat_template_kwargs or {}).items():
            if not key.isidentifier():
                raise bad_request(f"chat_template_kwargs: {key!r} is not a template variable name",
                                  param="chat_template_kwargs")
            if key == "enable_thinking" and not isinstance(value, bool):
                # as llama-server: "false" (a string) is a mistake, not a truthy value
                raise bad_request(f"invalid type for \"enable_thinking\" (expected boolean, got "
                                  f"{type(value).__name__})", param="chat_template_kwargs")

    def prompt_controls(self, prefill_assistant: bool = True) -> dict:
        """How the prompt ends, as llama-server decides it (server-common.cpp,
        oaicompat_chat_params_parse): `LLM.chat`'s continue_final_message and
        add_generation_prompt.  A final assistant message is continued when the request says
        continue_final_message, or by default (`prefill_assistant`, llama-server's
        ``--no-prefill-assistant`` turns it off).  Refused, with llama-server's messages: two
        assistant messages at the end, add_generation_prompt together with
        continue_final_message, continuing a message that holds tool calls; and here,
        continuing anything but an assistant message's content."""
        msgs = self.messages
        explicit = self.continue_final_message
        if explicit == "reasoning_content":
            raise APIError(400, "continue_final_message: continuing an assistant message's reasoning is not "
                                "supported", param="continue_final_message", code="not_supported")
        last_assistant = msgs[-1].role == "assistant"
        if not explicit:
            if not (prefill_assistant and last_assistant):
                return {} if self.add_generation_prompt else {"add_generation_prompt": False}
            if len(msgs) >= 2 and msgs[-2].role == "assistant":
                raise bad_request("Cannot have 2 or more assistant messages at the end of the list.",
                                  param="messages")
        elif self.add_generation_prompt:
            raise bad_request("Cannot set both add_generation_prompt and continue_final_message to true.",
                              param="continue_final_message")
        elif not last_assistant:
            raise bad_request("continue_final_message: the last message must be the assistant's",
                              param="continue_final_message")
        if msgs[-1].tool_calls:
            raise bad_request("Cannot continue an assistant message that contains tool calls.",
                              param="continue_final_message")
        return {"continue_final_message": True, "add_generation_prompt": False}


# --------------------------------------------------------------------------- completions


Prompt = Union[str, List[str], List[int], List[List[int]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=1, le=128)
    return_progress: bool = False               # llama-server's: prompt_progress chunks (streamed)
    timings_per_token: bool = False             # llama-server's: the timings so far on every streamed chunk
    verbose: Optional[bool] = None              # llama-server's __verbose debug object (None: --verbose)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("prompt contains an empty list of token ids")
        return v

    def check(self) -> None:
        """Cross-field checks (raise APIError with the field's name)."""
        if self.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (give n only)", param="best_of")


# --------------------------------------------------------------------------- embeddings, tokens


class EmbeddingRequest(_Strict):
    #: OpenAI's shapes and llama-server's (ids mixed with texts, {"prompt_string"} and
    #: {"content": [text parts]} objects): the route checks them (llama_routes.embedding_inputs)
    input: Union[str, List[Any], Dict[str, Any]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1, le=INT32_MAX)
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("input is an empty list")
        return v


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    tokens: List[int]


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ServerTimings(BaseModel):
    """llama-server's ``timings`` object."""

    cache_n: int = 0
    prompt_n: int = 0
    prompt_ms: float = 0.0
    prompt_per_token_ms: float = 0.0
    prompt_per_second: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_token_ms: float = 0.0
    predicted_per_second: float = 0.0
    draft_n: int = 0              # speculative decoding: tokens drafted, and accepted
    draft_n_accepted: int = 0


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None      # a reasoning model's thinking (left out when none)
    tool_calls: Optional[List[Dict[str, Any]]] = None
    refusal: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_empty_reasoning(self, handler: Any) -> Dict[str, Any]:
        out = handler(self)
        if out.get("reasoning_content") is None:     # as llama-server: only when there was thinking
            out.pop("reasoning_content", None)
        return out


class _Choice(BaseModel):
    index: int
    finish_reason: Optional[str]
    logprobs: Optional[Dict[str, Any]] = None


class ChatChoice(_Choice):
    message: ResponseMessage


class CompletionChoice(_Choice):
    text: str


class _Response(BaseModel):
    """What every non-streamed answer carries besides its choices."""

    id: str
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    usage: Usage
    timings: Optional[ServerTimings] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: List[ChatChoice]


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: List[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pyllama"
    meta: Optional[Dict[str, Any]] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[List[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: List[EmbeddingData]
    model: str
    usage: EmbeddingUsage
