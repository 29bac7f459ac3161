"""llama-server's own routes: /completion, /embedding, /props, /apply-template, /slots/{id} actions (issue 28).

These are llama-server's native (non-OpenAI) shapes, for clients written against llama-server:

* ``POST /completion`` (and ``/completions``, llama-server's alias): ``prompt`` as a string,
  token ids, strings and ids mixed, ``{"prompt_string", "multimodal_data"}``, or a list of those
  (one answer each); the answer is ``content``, ``tokens``, ``stop``, ``stop_type``,
  ``timings``, ``generation_settings``, ``completion_probabilities`` (``n_probs``) ...; streamed,
  one event per token and a last one with ``stop: true`` (no ``[DONE]``).
* ``POST /embedding`` (and ``/embeddings``): ``[{"index", "embedding": [[...]]}]``: the pooled
  vector, or with ``--pooling none`` one vector per token.
* ``GET /props``, ``POST /props`` (``--props``), ``POST /apply-template``.
* ``POST /slots/{id}?action=save|restore|erase`` (``--slot-save-path``).

Request fields follow llama-server's names; unknown fields are refused, as on the other routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, Dict, List, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError, field_validator

from pyllama.server import protocol as P
from pyllama.server import schemas as S
from pyllama.server.backend import as_api_errors, gather_or_cancel
from pyllama.server.errors import APIError, bad_request, error_event, pydantic_errors_to_api_error

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pyllama.server.app import ServerState

#: llama.cpp's LLAMA_DEFAULT_SEED: what llama-server reports for "a random seed".
DEFAULT_SEED = 0xFFFFFFFF
#: llama.cpp's default sampler order (common_params_sampling::samplers): what generation_settings
#: reports; pyllama's chain applies its samplers in this order.
SAMPLER_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
#: The library's finish reasons -> llama-server's stop_type.
STOP_TYPES = {"eog": "eos", "length": "limit", "stop": "word", "cancelled": "none"}
NOT_SUPPORTED = "not_supported_error"


# --------------------------------------------------------------------------- request bodies


class LlamaCompletionRequest(S.SamplingFields):
    """POST /completion: llama-server's fields (server-schema.cpp's names and aliases)."""

    prompt: Any
    n_probs: Optional[int] = Field(default=None, ge=0, le=20)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)      # llama-server's alias of n_probs
    max_completion_tokens: Optional[int] = Field(default=None, ge=-1, le=S.INT32_MAX)
    n_cmpl: Optional[int] = Field(default=None, ge=1, le=128)           # alias of n
    logit_bias: Any = None                    # a dict, or a list of [token id or text, bias or false]
    return_tokens: bool = False
    response_fields: Optional[List[str]] = None
    post_sampling_probs: bool = False
    id_slot: int = Field(default=-1, ge=-1, le=S.INT32_MAX)
    min_keep: int = Field(default=0, ge=0, le=S.INT32_MAX)
    n_indent: int = Field(default=0, ge=0, le=S.INT32_MAX)
    samplers: Optional[Union[List[str], str]] = None
    # streamed: the timings so far on every event; prompt_progress events while the prompt is evaluated
    timings_per_token: Optional[bool] = None
    return_progress: Optional[bool] = None
    # accepted, no effect here (docs/server.md, "llama-server's routes")
    n_keep: Optional[int] = Field(default=None, ge=-1, le=S.INT32_MAX)
    n_discard: Optional[int] = Field(default=None, ge=0, le=S.INT32_MAX)
    n_cache_reuse: Optional[int] = Field(default=None, ge=0, le=S.INT32_MAX)
    backend_sampling: Optional[bool] = None
    t_max_prompt_ms: Optional[int] = None
    t_max_predict_ms: Optional[int] = None
    verbose: Optional[bool] = None
    sse_ping_interval: Optional[int] = None
    adaptive_target: Optional[float] = None
    adaptive_decay: Optional[float] = None
    # drafting knobs per request: the verified tokens are the same whatever they are, so the
    # server's flags apply (speculative.type "none" turns drafting off for the request)
    spec_type: Optional[str] = Field(default=None, alias="speculative.type")
    spec_n_max: Optional[int] = Field(default=None, alias="speculative.n_max", ge=0, le=S.INT32_MAX)
    spec_n_min: Optional[int] = Field(default=None, alias="speculative.n_min", ge=0, le=S.INT32_MAX)
    spec_p_min: Optional[float] = Field(default=None, alias="speculative.p_min", ge=0.0, le=1.0)
    spec_ngram_size_n: Optional[int] = Field(default=None, alias="speculative.ngram_size_n", ge=1,
                                             le=S.INT32_MAX)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, v: Any) -> Any:      # replaces SamplingFields' (a dict of ids only)
        if v is None or isinstance(v, (dict, list)):
            return v
        raise ValueError("logit_bias must be an object {token: bias} or a list of [token or text, bias]")


class ApplyTemplateRequest(S.ChatCompletionRequest):
    """POST /apply-template: a chat request (its generation fields are accepted and unused)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False


class EmbeddingRequest(S._Strict):
    """POST /embedding: ``content`` (or ``input``), llama-server's shapes."""

    content: Any = None
    input: Any = None
    model: Optional[str] = None
    encoding_format: Optional[str] = None
    embd_normalize: Optional[int] = None


def _parse(model: type, body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise pydantic_errors_to_api_error(exc.errors()) from None


async def _json_body(request: Request) -> Any:
    import json

    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


# --------------------------------------------------------------------------- prompts


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _subprompts(prompt: Any) -> list:
    """llama-server's tokenize_input_prompts: a list holding no token id is a list of prompts;
    anything else (a string, ids, ids mixed with strings, an object) is one prompt."""
    if isinstance(prompt, list) and not any(_is_int(x) for x in prompt):
        if not prompt:
            raise bad_request('"prompt" must not be empty', param="prompt")
        return list(prompt)
    return [prompt]


def _mixed_tokens(llm: Any, parts: Any) -> list:
    """tokenize_mixed: strings are tokenized with special tokens parsed, BOS only before a
    leading string; ids are taken as they are."""
    if isinstance(parts, str):
        return llm.tokenize(parts, add_special=True, parse_special=True)
    tokens: list = []
    for k, part in enumerate(parts):
        if isinstance(part, str):
            tokens.extend(llm.tokenize(part, add_special=k == 0, parse_special=True))
        elif _is_int(part):
            tokens.append(part)
        else:
            raise bad_request(f"prompt: a list may hold token ids and strings, got {type(part).__name__}",
                              param="prompt")
    return tokens


def prompt_input(llm: Any, prompt: Any) -> Any:
    """One prompt of /completion or /embedding as the LLM takes it: token ids, or a
    MediaPrompt for ``{"prompt_string", "multimodal_data": [base64 ...]}``."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(x, str) or _is_int(x)
                                                                    for x in prompt)):
        return _mixed_tokens(llm, prompt)
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt_string"), (str, list)):
        media = prompt.get("multimodal_data")
        if media is None:
            return _mixed_tokens(llm, prompt["prompt_string"])
        if llm.multimodal is None:
            raise bad_request("Multimodal data provided, but model does not support multimodal requests.",
                              param="prompt")
        if not isinstance(prompt["prompt_string"], str) or not isinstance(media, list):
            raise bad_request("multimodal_data needs a prompt_string text and a list of base64 files", param="prompt")
        try:
            bitmaps = [llm.multimodal.load(base64.b64decode(item, validate=True)) for item in media]
        except (binascii.Error, TypeError, ValueError) as exc:
            raise bad_request(f"multimodal_data: {exc}", param="prompt") from None
        return llm.multimodal.tokenize(prompt["prompt_string"], bitmaps)
    raise bad_request('"prompt" elements must be a string, a list of tokens, a JSON object containing a prompt '
                      'string, or a list of mixed strings & tokens.', param="prompt")


def _content_tokens(llm: Any, parts: Any) -> list:
    """An embedding input ``{"content": [{"type": "text", "text": ...}, ...]}``: the texts,
    joined, tokenized as one (llama-server's tokenize_oai_content_array)."""
    if not isinstance(parts, list):
        raise bad_request('"content" must be an array of parts', param="content")
    text = ""
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"content parts of an embedding input must be text, got {kind or part!r}",
                              param="content")
        text += part["text"]
    return llm.tokenize(text, add_special=True, parse_special=True)


def embedding_inputs(llm: Any, source: Any, n_vocab: int) -> list:
    """The token lists of an embeddings request's input: /completion's prompt shapes plus
    ``{"content": [text parts]}`` objects, as llama-server's embeddings routes take them."""
    out = []
    for p in _subprompts(source):
        if isinstance(p, dict) and "content" in p and "prompt_string" not in p:
            out.append(_content_tokens(llm, p["content"]))
            continue
        tokens = prompt_input(llm, p)
        if not isinstance(tokens, list):
            raise bad_request("embeddings take text and token ids, not multimodal data", param="content")
        out.append(tokens)
    P.check_token_ids(out, n_vocab, param="content")
    if any(not t for t in out):
        raise bad_request("Input content cannot be empty", param="content")
    return out


def _tokens_of(prompt: Any) -> list:
    return list(getattr(prompt, "tokens", prompt))


def _prompts(llm: Any, prompt: Any, n_vocab: int) -> list:
    out = [prompt_input(llm, p) for p in _subprompts(prompt)]
    P.check_token_ids([p for p in out if isinstance(p, list)], n_vocab)
    for p in out:
        if not _tokens_of(p):
            raise bad_request("the prompt is empty (no tokens)", param="prompt")
    return out


# --------------------------------------------------------------------------- sampling


def _logit_bias(llm: Any, value: Any, n_vocab: int) -> Dict[int, float]:
    """llama-server's logit_bias: {"id": bias} or [[id or text, bias or false], ...]; a text
    biases each of its tokens; false (or -100 and below, as OpenAI) bans."""
    pairs = list(value.items()) if isinstance(value, dict) else value
    out: Dict[int, float] = {}
    for pair in pairs:
        if isinstance(value, list) and (not isinstance(pair, list) or len(pair) != 2):
            raise bad_request("logit_bias entries must be [token or text, bias]", param="logit_bias")
        key, bias = pair
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise bad_request(f"logit_bias: the bias of {key!r} must be a finite number or false", param="logit_bias")
        elif bias <= -100:
            bias = -math.inf
        if isinstance(key, str) and key.isascii() and key.isdigit() and isinstance(value, dict):
            tokens = [int(key)]
        elif isinstance(key, str):
            tokens = llm.tokenize(key, add_special=False, parse_special=False)
        elif _is_int(key):
            tokens = [key]
        else:
            raise bad_request(f"logit_bias: {key!r} is not a token id or a text", param="logit_bias")
        for tok in tokens:
            if not 0 <= tok < n_vocab:
                raise bad_request(f"logit_bias names token {tok}, outside the vocabulary [0, {n_vocab})",
                                  param="logit_bias", code="invalid_token")
            out[tok] = float(bias)
    return out


def completion_kwargs(body: LlamaCompletionRequest, state: "ServerState", n_vocab: int) -> dict:
    """The LLM keyword arguments of one /completion request (llama-server's field names)."""
    cfg = state.settings
    unsupported = {"min_keep": body.min_keep, "n_indent": body.n_indent}
    for name, value in unsupported.items():
        if value:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="not_supported")
    if body.samplers is not None:
        order = body.samplers.split(";") if isinstance(body.samplers, str) else body.samplers
        if [s for s in order if s] and list(order) != list(SAMPLER_ORDER):
            raise APIError(400, f"samplers: only llama.cpp's default order is supported ({';'.join(SAMPLER_ORDER)})",
                           param="samplers", code="not_supported")
    n_predict = next((v for v in (body.n_predict, body.max_tokens, body.max_completion_tokens) if v is not None),
                     None)
    # logit_bias has llama-server's own forms (below); n_cmpl is its name of n
    common = body.model_copy(update={"logit_bias": None, "n": body.n_cmpl or body.n})
    kw = P.sampling_kwargs(common, cfg, n_vocab, max_tokens=n_predict)
    if kw["max_tokens"] == -1:      # as llama-server: -1 (or none) means the server's --n-predict
        kw["max_tokens"] = cfg.default_max_tokens
    if body.logit_bias:
        kw["logit_bias"] = _logit_bias(state.llm, body.logit_bias, n_vocab)
    if body.spec_type == "none":
        kw["speculative"] = False
    if body.n_keep:
        kw["n_keep"] = body.n_keep         # the context shift's (--context-shift)
    if body.n_discard:
        kw["n_discard"] = body.n_discard
    n_probs = body.n_probs if body.n_probs is not None else body.logprobs
    if n_probs:
        kw["logprobs"] = True
        kw["top_logprobs"] = n_probs
        if body.post_sampling_probs:     # the probabilities after the sampler chain
            kw["post_sampling_probs"] = True
    # llama-server tokenizes completion prompts with special tokens parsed (done above)
    return kw


def generation_settings(llm: Any, kw: dict, stream: bool, n_probs: int) -> dict:
    """llama-server's ``generation_settings`` (task_params::to_json) of one request."""
    fields = {f.name for f in dataclasses.fields(llm.defaults)}
    p = dataclasses.replace(llm.defaults, **{k: v for k, v in kw.items() if k in fields})
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or ())
    # -inf (a ban) is null in llama-server's JSON; ignore_eos bans every end-of-generation token
    bias = [{"bias": b if math.isfinite(b) else None, "token": t} for t, b in (p.logit_bias or {}).items()]
    if p.ignore_eos:
        bias += [{"bias": None, "token": t} for t in llm._eog_tokens()]
    return {
        "seed": DEFAULT_SEED if p.seed is None else p.seed, "temperature": p.temperature,
        "dynatemp_range": p.dynatemp_range, "dynatemp_exponent": p.dynatemp_exponent, "top_k": p.top_k,
        "top_p": p.top_p, "min_p": p.min_p, "top_n_sigma": p.top_n_sigma, "xtc_probability": p.xtc_probability,
        "xtc_threshold": p.xtc_threshold, "typical_p": p.typical_p, "repeat_last_n": p.last_n_tokens_size,
        "repeat_penalty": p.repeat_penalty, "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty, "dry_multiplier": p.dry_multiplier, "dry_base": p.dry_base,
        "dry_allowed_length": p.dry_allowed_length, "dry_penalty_last_n": p.dry_penalty_last_n,
        "dry_sequence_breakers": list(p.dry_sequence_breakers), "mirostat": p.mirostat_mode,
        "mirostat_tau": p.mirostat_tau, "mirostat_eta": p.mirostat_eta, "adaptive_target": -1.0,
        "adaptive_decay": 0.9, "stop": stop, "max_tokens": kw.get("max_tokens", -1),
        "n_predict": kw.get("max_tokens", -1), "n_keep": p.n_keep, "n_discard": p.n_discard, "ignore_eos": p.ignore_eos,
        "stream": stream, "logit_bias": bias, "n_probs": n_probs, "min_keep": 0,
        "grammar": p.grammar or "", "samplers": list(SAMPLER_ORDER), "timings_per_token": False,
        "post_sampling_probs": p.post_sampling_probs, "backend_sampling": False, "lora": [],
    }


# --------------------------------------------------------------------------- answers


def _probs(entries: Any, post_sampling: bool = False) -> list:
    """completion_probabilities: llama-server's probs_vector_to_json (log-probabilities, or with
    post_sampling_probs the probabilities the sampler chain left, as "prob" and "top_probs")."""
    key, value = ("prob", lambda lp: math.exp(lp)) if post_sampling else ("logprob", lambda lp: lp)
    out = []
    for e in entries or ():
        out.append({"id": e.id, "token": e.token, "bytes": e.bytes, key: value(e.logprob),
                    f"top_{key}s": [{"id": t.id, "token": t.token, "bytes": t.bytes, key: value(t.logprob)}
                                    for t in e.top_logprobs]})
    return out


def timings(comp: Any) -> dict:
    """llama-server's timings (server_slot_stats::to_json): predicted_n counts the tokens sampled;
    the rates are over the decode steps, one fewer (the first token comes from the prompt's
    logits); draft_n and draft_n_accepted only when something was drafted."""
    t = P.timings(comp).model_dump()
    n, ms = len(comp.tokens), t["predicted_ms"]
    steps = max(n - 1, 0)
    t["predicted_n"] = n
    t["predicted_per_token_ms"] = ms / steps if steps else 0.0
    t["predicted_per_second"] = 1000.0 * steps / ms if ms > 0 and steps else 0.0
    if not t["draft_n"]:
        del t["draft_n"], t["draft_n_accepted"]
    return t


class _Answer:
    """What the final object of one answer is made of."""

    def __init__(self, llm: Any, prompt: Any, kw: dict, body: LlamaCompletionRequest, model: str) -> None:
        self.llm = llm
        self.prompt_tokens = _tokens_of(prompt)
        self.kw = kw
        self.body = body
        self.model = model
        self.n_probs = kw.get("top_logprobs", 0) if kw.get("logprobs") else 0
        self.stops = list(kw.get("stop") or ())

    def _stopping_word(self, comp: Any) -> str:
        if comp.finish_reason != "stop" or not self.stops:
            return ""
        full = self.llm.detokenize(comp.tokens)
        rest = full[len(comp.text):] if full.startswith(comp.text) else ""
        return next((s for s in self.stops if rest.startswith(s)), "")

    def final(self, comp: Any, index: int, stream: bool) -> dict:
        word = self._stopping_word(comp)
        stop_type = STOP_TYPES.get(comp.finish_reason, "none")
        if comp.finish_reason == "stop" and not word:
            stop_type = "eos"          # a stop token, not a stop string
        n_prompt, n_gen = len(self.prompt_tokens), len(comp.tokens)
        # "length" before n_predict: the slot (or the shared KV memory) was full, llama-server's
        # "truncated"; so is an answer whose slot shifted (--context-shift)
        max_tokens = self.kw.get("max_tokens", -1)
        truncated = (comp.finish_reason == "length" and not (0 <= max_tokens <= n_gen)) or comp.n_discarded > 0
        prompt_text = self.llm.detokenize([t for t in self.prompt_tokens if t >= 0], unparse_special=True)
        out = {
            "index": index, "content": "" if stream else comp.text,
            "tokens": list(comp.tokens) if (self.body.return_tokens and not stream) else [],
            "id_slot": self.body.id_slot, "stop": True, "model": self.model, "tokens_predicted": n_gen,
            "tokens_evaluated": n_prompt,
            "generation_settings": generation_settings(self.llm, self.kw, stream, self.n_probs),
            "prompt": prompt_text, "has_new_line": "\n" in comp.text, "truncated": truncated,
            "stop_type": stop_type, "stopping_word": word, "tokens_cached": n_prompt + n_gen,
            "timings": timings(comp),
        }
        if not stream and self.n_probs:
            out["completion_probabilities"] = _probs(comp.logprobs, self.body.post_sampling_probs)
        if self.body.response_fields:
            return _nested_values(self.body.response_fields, out)
        return out


def verbose_object(llm: Any, prompt: Any, kw: dict, comp: Any, model: str) -> dict:
    """llama-server's ``__verbose`` debug object of an OpenAI-shaped answer (``--verbose``, or a
    request's ``verbose``): the final object /completion would give, with the prompt the model
    got as text.  `prompt`: its tokens (or a MediaPrompt), or a completion's text prompt."""
    if isinstance(prompt, str):       # as /v1/completions tokenizes it
        prompt = llm.tokenize(prompt, add_special=True, parse_special=True)
    return _Answer(llm, prompt, kw, LlamaCompletionRequest.model_construct(), model).final(comp, 0, False)


def _nested_values(paths: List[str], obj: dict) -> dict:
    """llama-server's json_get_nested_values: {"a/b": obj["a"]["b"]} for each path that exists."""
    out = {}
    for path in paths:
        cur: Any = obj
        for key in path.split("/"):
            if not isinstance(cur, dict) or key not in cur:
                break
            cur = cur[key]
        else:
            out[path] = cur
    return out


def _context_error(n_prompt: int, n_ctx: int) -> APIError:
    return APIError(400, f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
                         "try increasing it", type="exceed_context_size_error", param="prompt",
                    code="context_length_exceeded", extra={"n_prompt_tokens": n_prompt, "n_ctx": n_ctx})


# --------------------------------------------------------------------------- the routes


def add_routes(app: "FastAPI", state: "ServerState") -> None:
    """Register this module's routes on `app`."""
    from pyllama.server import app as A      # its stream helpers (imported here: app imports us)

    cfg = state.settings

    def n_ctx_slot() -> int:
        llm = state.llm
        return int(llm.n_ctx if llm.context.kv_unified else llm.context.n_ctx_seq)

    # ---- /completion -----------------------------------------------------------------------

    @app.post("/completion")
    @app.post("/completions")
    async def completion(request: Request) -> Response:
        body = _parse(LlamaCompletionRequest, await _json_body(request))
        backend = state.ready_backend()
        llm = state.llm
        nv = int(llm.vocab.n_tokens)
        A._check_n(body.n_cmpl or body.n, backend)
        with as_api_errors("prompt"):
            prompts = await asyncio.to_thread(_prompts, llm, body.prompt, nv)
            kw = await asyncio.to_thread(completion_kwargs, body, state, nv)
        limit = n_ctx_slot()
        for p in prompts:
            if len(_tokens_of(p)) >= limit:
                raise _context_error(len(_tokens_of(p)), limit)
        n = kw.get("n", 1)
        answers = [_Answer(llm, p, kw, body, state.model_id) for p in prompts]
        if not body.stream:
            with backend.admit(len(prompts) * n):
                results = await A.unless_disconnected(
                    request, gather_or_cancel([backend.complete(p, **kw) for p in prompts]))

            def build() -> Any:
                objs = []
                for k, result in enumerate(results):
                    for j, comp in enumerate(result if isinstance(result, list) else [result]):
                        objs.append(answers[k].final(comp, k * n + j, stream=False))
                return objs[0] if len(objs) == 1 else objs

            return A._json_response(await asyncio.to_thread(build))
        ticket = backend.acquire(len(prompts) * n)
        progress = bool(body.return_progress)
        tasks = await A._open_streams(request, ticket, [
            backend.stream_complete(p, prompt_progress=progress, **kw) for p in prompts])
        return A.SSEResponse(_completion_events(tasks, answers, n, bool(body.timings_per_token)),
                             cleanup=A._closer(ticket, tasks))

    async def _completion_events(tasks: list, answers: List[_Answer], n: int,
                                 timings_per_token: bool) -> AsyncGenerator[bytes, None]:
        decoded: Dict[int, int] = {}
        # timings_per_token: the timings so far on every event (the engine requests' counters)
        timings_now = P.LiveTimings(tasks, timings_per_token)
        try:
            async for k, piece in A._merge(tasks):
                index = k * n + piece.index
                if getattr(piece, "prompt_progress", None) is not None:      # return_progress
                    yield P.sse(P.progress_chunk({
                        "index": index, "content": "", "tokens": [], "stop": False,
                        "id_slot": answers[k].body.id_slot, "tokens_predicted": 0,
                        "tokens_evaluated": len(answers[k].prompt_tokens)}, piece.prompt_progress, timings_per_token))
                    continue
                now = timings_now(k, piece.index)
                now = now.model_dump() if now is not None else None
                ids = list(piece.token_ids or ())
                lps = list(piece.logprobs or ())
                if not ids and piece.text:      # text held back (a possible stop string), now released
                    yield P.sse({"index": index, "content": piece.text, "tokens": [], "stop": False,
                                 "id_slot": answers[k].body.id_slot, "tokens_predicted": decoded.get(index, 0),
                                 "tokens_evaluated": len(answers[k].prompt_tokens)})
                # one event per token, as llama-server sends them; the text rides on the last
                for t, tok in enumerate(ids):
                    decoded[index] = decoded.get(index, 0) + 1
                    last = t == len(ids) - 1
                    event = {"index": index, "content": piece.text if last else "", "tokens": [tok],
                             "stop": False, "id_slot": answers[k].body.id_slot,
                             "tokens_predicted": decoded[index],
                             "tokens_evaluated": len(answers[k].prompt_tokens)}
                    if answers[k].n_probs and t < len(lps):
                        event["completion_probabilities"] = _probs([lps[t]], answers[k].body.post_sampling_probs)
                    if now is not None:
                        event["timings"] = now
                    yield P.sse(event)
            for k, task in enumerate(tasks):
                for j, comp in enumerate(task.result().completions or []):
                    yield P.sse(answers[k].final(comp, k * n + j, stream=True))
        except Exception as exc:  # noqa: BLE001  (sent to the client, which already has a 200)
            err = error_event(exc)
            yield P.sse(err.body())

    # ---- /embedding --------------------------------------------------------------------------

    @app.post("/embedding")
    @app.post("/embeddings")
    async def embedding(request: Request) -> Response:
        body = _parse(EmbeddingRequest, await _json_body(request))
        backend = state.ready_backend()
        llm = state.llm
        if not llm.embedding:
            raise APIError(501, "This server does not support embeddings. Start it with `--embeddings`",
                           type=NOT_SUPPORTED, code="embeddings_disabled")
        if body.encoding_format not in (None, "float"):
            raise bad_request("/embedding answers floats: encoding_format must be \"float\" (base64: use "
                              "/v1/embeddings)", param="encoding_format")
        source = body.content if body.content is not None else body.input
        if source is None:
            raise bad_request('"input" or "content" must be provided', param="content", code="missing_field")
        nv = int(llm.vocab.n_tokens)
        with as_api_errors("content"):
            prompts = await asyncio.to_thread(embedding_inputs, llm, source, nv)
        from pyllama import embeddings as E
        from pyllama.errors import ContextLengthError

        per_token = E.pooling_of(llm) == "none"
        normalize = body.embd_normalize is None or body.embd_normalize == 2
        if body.embd_normalize not in (None, -1, 2):
            raise bad_request("embd_normalize: only 2 (Euclidean, the default) and -1 (none) are supported",
                              param="embd_normalize")

        def run() -> list:
            if per_token:
                return [v.tolist() for v in E.embed_tokens(llm, prompts)]
            return [[row.tolist()] for row in llm.embed(prompts, normalize=normalize)]

        with backend.admit():
            try:
                with as_api_errors("content"):
                    vectors = await A.unless_disconnected(request, asyncio.to_thread(run))
            except APIError as exc:
                if isinstance(exc.__cause__, ContextLengthError):   # llama-server's words first
                    exc.message = f"input is too large to process. increase the physical batch size: {exc.message}"
                raise
        return A._json_response([{"index": i, "embedding": v} for i, v in enumerate(vectors)])

    # ---- /props, /apply-template -------------------------------------------------------------

    @app.get("/props")
    async def props() -> JSONResponse:
        backend = state.ready_backend()
        llm = state.llm
        kw = P.sampling_kwargs(S.SamplingFields(), cfg, int(llm.vocab.n_tokens))
        template = _chat_template_source(llm)
        vocab = llm.vocab
        mm = llm.multimodal
        return JSONResponse({
            "default_generation_settings": {"params": generation_settings(llm, kw, False, 0),
                                            "n_ctx": n_ctx_slot()},
            "total_slots": backend.n_slots, "model_alias": state.model_id, "model_path": llm.model_path,
            "modalities": {"vision": bool(mm is not None and getattr(mm, "supports_vision", True)),
                           "video": False,
                           "audio": bool(mm is not None and getattr(mm, "supports_audio", False))},
            "media_marker": _media_marker(), "endpoint_slots": cfg.slots_endpoint,
            "endpoint_props": cfg.props_endpoint, "endpoint_metrics": cfg.metrics_endpoint, "ui": False,
            "chat_template": template, "bos_token": _token_text(vocab, "bos"),
            "eos_token": _token_text(vocab, "eos"), "build_info": _build_info(), "is_sleeping": False,
        })

    @app.post("/props")
    async def set_props() -> JSONResponse:
        if not cfg.props_endpoint:
            raise APIError(501, "This server does not support changing global properties. Start it with `--props`",
                           type=NOT_SUPPORTED, code="not_supported")
        return JSONResponse({"success": True})      # nothing can be changed yet, as in llama-server

    def chat_variables(body: ApplyTemplateRequest) -> dict:
        """The template variables a chat request gets (as _requests.prepare_chat makes them):
        the flags' and the request's, and enable_thinking=False for a budget of 0."""
        from pyllama.chat.reasoning import check_reasoning_args

        kw = P.reasoning_kwargs(body, cfg)
        variables = check_reasoning_args(kw["reasoning_format"], kw["reasoning_budget"],
                                         kw.get("chat_template_kwargs"))
        if kw["reasoning_budget"] == 0:
            variables.setdefault("enable_thinking", False)
        return variables

    def chat_tools(body: ApplyTemplateRequest) -> Optional[list]:
        return [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None

    @app.post("/apply-template")
    async def apply_template(body: ApplyTemplateRequest) -> JSONResponse:
        """The prompt text the chat template makes of the messages."""
        body.check()
        state.ready_backend()
        llm = state.llm

        def render() -> str:
            return llm.render_chat(P.chat_messages(body), add_generation_prompt=body.add_generation_prompt,
                                   tools=chat_tools(body), continue_final_message=body.continue_final_message,
                                   **chat_variables(body))

        with as_api_errors("messages"):
            return JSONResponse({"prompt": await asyncio.to_thread(render)})

    @app.post("/chat/completions/input_tokens")
    @app.post("/v1/chat/completions/input_tokens")
    async def chat_input_tokens(body: ApplyTemplateRequest) -> JSONResponse:
        """How many tokens the chat's prompt is (llama-server's count, before generating)."""
        body.check()
        backend = state.ready_backend()
        llm = state.llm
        messages = P.chat_messages(body)
        backend._check_media(messages, {})      # image parts need the projector: 400 without

        def count() -> int:
            prompt = llm.chat_prompt(messages, tools=chat_tools(body), allow_files=False,
                                     add_generation_prompt=body.add_generation_prompt, **chat_variables(body))
            return len(_tokens_of(prompt))

        with as_api_errors("messages"):
            return JSONResponse({"input_tokens": await asyncio.to_thread(count), "object": "response.input_tokens"})

    # ---- /slots/{id}?action= -------------------------------------------------------------------

    @app.post("/slots/{id_slot}")
    async def slot_action(id_slot: str, request: Request) -> JSONResponse:
        if cfg.slot_save_path is None:
            raise APIError(501, "This server does not support slots action. Start it with `--slot-save-path`",
                           type=NOT_SUPPORTED, code="not_supported")
        try:
            slot = int(id_slot)
        except ValueError:
            raise bad_request("Invalid slot ID", param="id_slot") from None
        action = request.query_params.get("action", "")
        if action not in ("save", "restore", "erase"):
            raise bad_request("Invalid action", param="action")
        backend = state.ready_backend()
        if not 0 <= slot < backend.n_slots:
            raise bad_request(f"Invalid slot ID: this server has slots 0..{backend.n_slots - 1}", param="id_slot")
        if action == "erase":
            return JSONResponse(await _when_idle(request, state.llm, slot, _erase_slot))
        body = await _json_body(request)
        filename = body.get("filename") if isinstance(body, dict) else None
        path = slot_file(cfg.slot_save_path, filename)
        if action == "save":
            return JSONResponse(await _when_idle(request, state.llm, slot, lambda llm, s: _save_slot(llm, s, path)))
        return JSONResponse(await _when_idle(request, state.llm, slot, lambda llm, s: _restore_slot(llm, s, path)))


#: How long a slot action waits for a busy slot to finish (llama-server defers it without a limit).
SLOT_WAIT_S = 60.0


async def _when_idle(request: Request, llm: Any, slot: int, action: Callable[[Any, int], dict]) -> dict:
    """Run `action(llm, slot)` once slot `slot` is idle, with the engine's lock held (no step
    runs meanwhile, so the slot cannot be taken).  A busy slot is waited for, as llama-server
    defers the action, up to SLOT_WAIT_S (then 503)."""
    deadline = time.monotonic() + SLOT_WAIT_S

    def attempt() -> Optional[dict]:
        with llm.context.lock:
            return None if llm.slots()[slot]["busy"] else action(llm, slot)

    while True:
        done = await asyncio.to_thread(attempt)
        if done is not None:
            return done
        if time.monotonic() > deadline or await request.is_disconnected():
            raise APIError(503, f"slot {slot} stayed busy for {SLOT_WAIT_S:g} s", type="unavailable_error",
                           code="slot_busy", headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)


def _erase_slot(llm: Any, slot: int) -> dict:
    """Forget the slot's prompt cache: its KV cells are removed; the engine notices that its
    record of them no longer matches (it checks before reusing a cache) and evaluates the next
    prompt afresh."""
    n_cached = llm.slots()[slot]["n_cached"]
    llm.context.kv_seq_rm(slot)
    return {"id_slot": slot, "n_erased": int(n_cached)}


def _save_slot(llm: Any, slot: int, path: str) -> dict:
    t0 = time.perf_counter()
    try:
        n = llm.save_slot(slot, path)
    except (OSError, ValueError) as exc:
        raise APIError(500, f"Unable to save slot: {exc}", type="server_error") from None
    return {"id_slot": slot, "filename": os.path.basename(path), "n_saved": n, "n_written": os.path.getsize(path),
            "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}


def _restore_slot(llm: Any, slot: int, path: str) -> dict:
    t0 = time.perf_counter()
    try:
        n = llm.restore_slot(slot, path)
    except (OSError, ValueError) as exc:
        raise bad_request(f"Unable to restore slot: {exc}") from None
    return {"id_slot": slot, "filename": os.path.basename(path), "n_restored": n, "n_read": os.path.getsize(path),
            "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}


#: What fs_validate_filename lets through, roughly: no separators, no leading dot, printable.
_FILENAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}$")


def slot_file(folder: str, filename: Any) -> str:
    """The path of a slot file named by a client: a plain file name inside `folder` (no
    separators, no '..', no leading dot), else 400 "Invalid filename"."""
    if not isinstance(filename, str) or not _FILENAME.match(filename) or ".." in filename:
        raise bad_request("Invalid filename", param="filename")
    path = os.path.realpath(os.path.join(folder, filename))
    if os.path.dirname(path) != os.path.realpath(folder):
        raise bad_request("Invalid filename", param="filename")
    return path


def _chat_template_source(llm: Any) -> str:
    fmt = llm._chat_formatter()
    source = getattr(fmt, "source", None) or getattr(fmt, "template_source", None)
    if isinstance(source, str):
        return source
    template = getattr(fmt, "template", None)
    return template if isinstance(template, str) else ""


def _token_text(vocab: Any, which: str) -> str:
    tok = getattr(vocab, which, None)
    if not _is_int(tok) or tok < 0:
        return ""
    return vocab.token_to_piece(tok, True).decode("utf-8", "replace")


def _media_marker() -> str:
    from pyllama import _core

    try:
        return _core.media_marker()
    except Exception:  # noqa: BLE001  (a build without mtmd)
        return "<__media__>"


def _build_info() -> str:
    import pyllama

    return f"pyllama {getattr(pyllama, '__version__', '?')}"


__all__ = ["add_routes", "prompt_input", "embedding_inputs", "completion_kwargs", "generation_settings", "slot_file",
           "LlamaCompletionRequest"]
