"""OpenAI requests -> `LLM` keyword arguments, and `Completion` objects -> OpenAI bodies.

Pure functions, no I/O: the routes in app.py call these around the backend's awaits.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence

from pyllama.server import schemas as S
from pyllama.server.errors import bad_request
from pyllama.server.settings import ServerSettings

if TYPE_CHECKING:   # annotations only: the server must import without loading the model code
    from pyllama.llm import Completion, TokenLogprob

#: The library's finish reasons -> OpenAI's.
FINISH_REASONS = {"eog": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls",
                  "cancelled": "stop", None: None}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    return FINISH_REASONS.get(reason, reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- requests


def sampling_kwargs(req: S.SamplingFields, settings: ServerSettings, n_vocab: int,
                    max_tokens: Optional[int] = None) -> dict:
    """The generation keyword arguments of `LLM.complete` / `LLM.chat` for one request."""
    kw: dict = dict(settings.sampling_defaults)
    if max_tokens is None:
        max_tokens = req.max_tokens if req.max_tokens is not None else req.n_predict
    kw["max_tokens"] = settings.default_max_tokens if max_tokens is None else max_tokens
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
                 "repeat_penalty", "mirostat_tau", "mirostat_eta", "ignore_eos", "grammar", "json_schema",
                 "cache_prompt", "top_n_sigma", "xtc_probability", "xtc_threshold", "dynatemp_range",
                 "dynatemp_exponent", "dry_multiplier", "dry_allowed_length", "dry_penalty_last_n",
                 "dry_sequence_breakers"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.dry_base is not None and req.dry_base >= 1.0:
        kw["dry_base"] = req.dry_base
    if req.repeat_last_n is not None:
        kw["last_n_tokens_size"] = req.repeat_last_n
    if req.mirostat is not None:
        kw["mirostat_mode"] = req.mirostat
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.seed is not None:
        kw["seed"] = None if req.seed == -1 else req.seed
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            tok = int(key)
            if not 0 <= tok < n_vocab:
                raise bad_request(f"logit_bias names token {tok}, outside the vocabulary [0, {n_vocab})",
                                  param="logit_bias", code="invalid_token")
            # OpenAI: -100 bans a token, 100 forces it; llama.cpp adds the bias to the logit.
            bias[tok] = -math.inf if value <= -100 else float(value)
        kw["logit_bias"] = bias
    if req.n > 1:
        kw["n"] = req.n
    return kw


def chat_kwargs(req: S.ChatCompletionRequest, settings: ServerSettings, n_vocab: int) -> dict:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else None
    if max_tokens is None:
        max_tokens = req.max_tokens if req.max_tokens is not None else req.n_predict
    kw = sampling_kwargs(req, settings, n_vocab, max_tokens)
    if req.logprobs:
        kw["logprobs"] = True
        if req.top_logprobs:
            kw["top_logprobs"] = req.top_logprobs
    if req.response_format is not None and req.response_format.type != "text":
        kw["response_format"] = req.response_format.to_library()
    if req.tools and req.tool_choice != "none":
        kw["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        choice = req.tool_choice
        if choice is not None:
            kw["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
    kw.update(reasoning_kwargs(req, settings))
    kw.update(req.prompt_controls(settings.prefill_assistant))
    return kw


def reasoning_kwargs(req: S.ChatCompletionRequest, settings: ServerSettings) -> dict:
    """`LLM.chat`'s reasoning_format, reasoning_budget and chat_template_kwargs of a request,
    as llama-server resolves them: the request's fields over the server's flags
    (``--reasoning-format``, ``--reasoning-budget``, ``--chat-template-kwargs``); a request's
    budget of -1 means the server's; ``reasoning_effort`` "none" turns the thinking off, any
    other value reaches the template as ``reasoning_effort``."""
    kw: dict = {"reasoning_format": req.reasoning_format or settings.reasoning_format}
    budget = req.reasoning_budget_tokens if req.reasoning_budget_tokens is not None else req.thinking_budget_tokens
    kw["reasoning_budget"] = settings.reasoning_budget if budget is None or budget == -1 else budget
    variables = dict(settings.chat_template_kwargs or {})
    variables.update(req.chat_template_kwargs or {})
    if req.reasoning_effort == "none":
        variables["enable_thinking"] = False
        variables.pop("reasoning_effort", None)
    elif req.reasoning_effort:
        variables["reasoning_effort"] = req.reasoning_effort
    if variables:
        kw["chat_template_kwargs"] = variables
    return kw


def chat_messages(req: S.ChatCompletionRequest) -> list:
    return [m.to_template() for m in req.messages]


def completion_prompts(req: S.CompletionRequest) -> list:
    """The prompts of a /v1/completions request: each a str or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and isinstance(p[0], int):
        return [list(p)]
    return list(p)


def check_token_ids(prompts: Sequence[Any], n_vocab: int, param: str = "prompt") -> None:
    for i, p in enumerate(prompts):
        if isinstance(p, list):
            for tok in p:
                if not 0 <= tok < n_vocab:
                    where = param if len(prompts) == 1 else f"{param}.{i}"
                    raise bad_request(f"token id {tok} is outside the vocabulary [0, {n_vocab})", param=where,
                                      code="invalid_token")


# --------------------------------------------------------------------------- responses


def timings(comp: "Completion") -> S.ServerTimings:
    """llama-server's ``timings`` object of one answer."""
    return timings_from(comp.timings)


def live_timings(req: Any) -> S.ServerTimings:
    """The ``timings`` so far of an answer still being generated, from its engine request's
    counters (read as results.completion_from reads them at the end): what a request's
    ``timings_per_token`` puts on every chunk, as llama-server does."""
    n_gen = len(req.tokens)
    prompt_n = int(req.n_prompt_evaluated)
    return timings_from(SimpleNamespace(
        cached_n=req.n_cached_tokens if prompt_n else req.n_prompt, prompt_n=prompt_n,
        prompt_ms=req.t_prompt_ms if prompt_n else 0.0, predicted_n=max(n_gen - 1, 0), predicted_ms=req.t_gen_ms,
        draft_n=req.n_drafted, draft_n_accepted=req.n_draft_accepted))


def live_requests(stream: Any) -> Optional[list]:
    """The engine requests behind an open stream, one per choice (their counters are the
    timings so far), or None where the stream does not expose them.  (The library's
    AsyncStream keeps them as _prep.requests; a chat's stream wraps it (_inner) to split a
    reasoning model's thinking.  A public accessor in the library would be better.)"""
    inner = getattr(stream, "_stream", None)
    while inner is not None and getattr(inner, "_prep", None) is None and hasattr(inner, "_inner"):
        inner = inner._inner
    prep = getattr(inner, "_prep", None)
    return list(getattr(prep, "requests", None) or ()) or None


class LiveTimings:
    """timings_per_token over a request's streams (one per prompt of a list): the timings so
    far of choice i of stream k, or None when not asked for.  A stream's engine requests are
    looked up when its first piece arrives: the others may still be opening then."""

    def __init__(self, tasks: Sequence[Any], wanted: bool) -> None:
        self.tasks, self.wanted, self.requests = tasks, wanted, {}

    def __call__(self, k: int, i: int) -> Optional[S.ServerTimings]:
        if not self.wanted:
            return None
        if k not in self.requests:
            self.requests[k] = live_requests(self.tasks[k].result())
        reqs = self.requests[k]
        return live_timings(reqs[i]) if reqs and i < len(reqs) else None


def timings_from(t: Any) -> S.ServerTimings:
    """llama-server's ``timings`` object of a `Timings` (or anything with its fields)."""
    pn, pms = int(t.prompt_n), float(t.prompt_ms)
    gn, gms = int(t.predicted_n), float(t.predicted_ms)
    return S.ServerTimings(
        cache_n=int(t.cached_n), prompt_n=pn, prompt_ms=pms,
        prompt_per_token_ms=pms / pn if pn else 0.0, prompt_per_second=1000.0 * pn / pms if pms > 0 else 0.0,
        predicted_n=gn, predicted_ms=gms, predicted_per_token_ms=gms / gn if gn else 0.0,
        predicted_per_second=1000.0 * gn / gms if gms > 0 else 0.0,
        draft_n=int(getattr(t, "draft_n", 0)), draft_n_accepted=int(getattr(t, "draft_n_accepted", 0)))


def usage(groups: Sequence[Sequence["Completion"]]) -> S.Usage:
    """Usage of one request: `groups` holds, per prompt, the completions that share it."""
    prompt = cached = completion = 0
    for comps in groups:
        if not comps:
            continue
        prompt += int(comps[0].prompt_tokens)
        cached += int(comps[0].timings.cached_n)
        completion += sum(len(c.tokens) for c in comps)
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=S.PromptTokensDetails(cached_tokens=cached))


def chat_logprobs(entries: Optional[Iterable["TokenLogprob"]]) -> Optional[dict]:
    if entries is None:
        return None
    return {"content": [e.to_openai() for e in entries], "refusal": None}


def response_message(comp: "Completion") -> S.ResponseMessage:
    """The assistant message of one chat answer: its tool calls (and the text around them),
    or its text; a reasoning model's thinking as ``reasoning_content``."""
    reasoning = getattr(comp, "reasoning", None)
    if comp.tool_calls:
        return S.ResponseMessage(content=comp.content, tool_calls=list(comp.tool_calls), reasoning_content=reasoning)
    return S.ResponseMessage(content=comp.text if comp.content is None else comp.content, reasoning_content=reasoning)


def chat_response(comps: List["Completion"], model: str, rid: str, created: int) -> S.ChatCompletionResponse:
    choices = [S.ChatChoice(index=i, message=response_message(c), finish_reason=finish_reason(c.finish_reason),
                            logprobs=chat_logprobs(c.logprobs))
               for i, c in enumerate(comps)]
    return S.ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage([comps]),
                                    timings=timings(comps[0]))


def legacy_logprobs(entries: Optional[Sequence["TokenLogprob"]], offset0: int,
                    prompt_entries: Optional[Sequence["TokenLogprob"]] = None) -> Optional[dict]:
    """/v1/completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset.
    With echo, `prompt_entries` (the library scores prompt tokens 2..n; the first has no
    context to be scored in) come first and offsets count from the start of the text."""
    if entries is None:
        return None
    tokens: list = []
    token_logprobs: list = []
    tops: list = []
    offsets: list = []
    offset = offset0
    for e in list(prompt_entries or ()) + list(entries):
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        tops.append({t.token: t.logprob for t in (e.top_logprobs or ())})
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def completion_choice(comp: "Completion", index: int, prompt_text: str, echo: bool,
                      want_logprobs: bool) -> S.CompletionChoice:
    text = comp.text     # with echo, the library's text already starts with the prompt
    lp = None
    if want_logprobs:
        prompt_lp = comp.prompt_logprobs if echo else None
        start = 0
        if echo and prompt_lp is not None:   # the unscored first prompt token's text comes before
            start = max(0, len(prompt_text) - sum(len(e.token) for e in prompt_lp))
        elif echo:
            start = len(prompt_text)
        lp = legacy_logprobs(comp.logprobs or [], start, prompt_lp)
    return S.CompletionChoice(index=index, text=text, finish_reason=finish_reason(comp.finish_reason), logprobs=lp)


# --------------------------------------------------------------------------- streaming


def sse(obj: dict) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _chunk(kind: str, rid: str, created: int, model: str, choices: list, usage_obj: Any,
           include_usage_field: bool, timings: Any) -> dict:
    out: dict = {"id": rid, "object": kind, "created": created, "model": model,
                 "system_fingerprint": None, "choices": choices}
    if include_usage_field or usage_obj is not None:
        out["usage"] = usage_obj.model_dump() if usage_obj is not None else None
    if timings is not None:
        out["timings"] = timings.model_dump()
    return out


def chat_chunk(rid: str, created: int, model: str, choices: list, usage_obj: Any = None,
               include_usage_field: bool = False, timings: Any = None) -> dict:
    return _chunk("chat.completion.chunk", rid, created, model, choices, usage_obj, include_usage_field, timings)


def completion_chunk(rid: str, created: int, model: str, choices: list, usage_obj: Any = None,
                     include_usage_field: bool = False, timings: Any = None) -> dict:
    return _chunk("text_completion", rid, created, model, choices, usage_obj, include_usage_field, timings)


def chat_body(llm: Any, comps: list, model: str, rid: str, created: int, verbose: Optional[tuple]) -> dict:
    """A chat's JSON body; with `verbose` (its messages and LLM.chat arguments) llama-server's
    ``__verbose`` object too, whose prompt is rendered again by the chat's one preparation
    (a debugging aid: the cost of a second rendering is paid only when asked for)."""
    out = chat_response(comps, model, rid, created).model_dump()
    if verbose is not None:
        out["__verbose"] = chat_verbose(llm, verbose, comps[0], model)
    return out


def chat_verbose(llm: Any, verbose: tuple, comp: Any, model: str) -> dict:
    """llama-server's ``__verbose`` object of a chat answer: `verbose` is the chat's messages
    and LLM.chat arguments, whose prompt is rendered again (a debugging aid: the cost of a
    second rendering is paid only when asked for)."""
    from pyllama import _requests as rq
    from pyllama.server.llama_routes import verbose_object

    messages, kw = verbose
    prompt = rq.prepare_chat(llm, messages, **dict(kw, allow_files=False)).prompt
    return verbose_object(llm, prompt, kw, comp, model)


def progress_chunk(chunk: dict, progress: dict, with_timings: bool = True) -> dict:
    """A stream chunk carrying llama-server's ``prompt_progress`` (a request's return_progress)
    and, `with_timings`, the prompt's timings so far (timings_per_token)."""
    chunk["prompt_progress"] = progress
    if with_timings:
        chunk["timings"] = progress_timings(progress).model_dump()
    return chunk


def progress_timings(progress: dict) -> S.ServerTimings:
    """The ``timings`` of a prompt's progress report: the prompt evaluated so far, nothing
    generated yet."""
    return timings_from(SimpleNamespace(
        cached_n=progress["cache"], prompt_n=progress["processed"] - progress["cache"],
        prompt_ms=progress["time_ms"], predicted_n=0, predicted_ms=0.0))
