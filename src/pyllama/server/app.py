"""The FastAPI application: routes, the gate (API key, readiness, body limit), error bodies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import functools
import json
import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pyllama.server import metrics as M
from pyllama.server import protocol as P
from pyllama.server import schemas as S
from pyllama.server.backend import Backend, StartedStream, Ticket, as_api_errors, cancel_all, gather_or_cancel
from pyllama.server.errors import (AUTHENTICATION, NOT_FOUND, SERVER, UNAVAILABLE, APIError, bad_request,
                                   error_event, pydantic_errors_to_api_error)
from pyllama.server.settings import ServerSettings

if TYPE_CHECKING:   # annotations only: the server must import without loading the model code
    from pyllama.llm import LLM

logger = logging.getLogger("pyllama.server")

#: Paths answered without an API key (as llama-server does).
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


class ServerState:
    """What the routes share: settings, the backend once the model is loaded, the registry."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.backend: Optional[Backend] = None
        self.llm: Optional["LLM"] = None
        self.owns_llm = False
        self.load_error: Optional[BaseException] = None
        self.model_id = settings.model_alias or "pyllama"
        self.created = int(time.time())
        self.registry = M.make_registry(self._metrics)

    def set_llm(self, llm: "LLM", owns: bool) -> None:
        self.llm = llm
        self.owns_llm = owns
        if not self.settings.model_alias:
            self.model_id = os.path.basename(llm.model_path)
        self.backend = Backend(llm, max_queue=self.settings.max_queue, retry_after_s=self.settings.retry_after_s)

    def _metrics(self) -> dict:
        return self.backend.metrics() if self.backend is not None else {}

    def ready_backend(self) -> Backend:
        if self.backend is None:
            raise APIError(503, "Loading model", type=UNAVAILABLE, code="loading")
        return self.backend


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --------------------------------------------------------------------------- the gate (pure ASGI)


class _Gate:
    """API key, readiness and the body limit, before any routing or parsing."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        settings = self.state.settings
        if _head_bytes(scope) > settings.max_header_bytes:
            # (pyllama serve refuses them earlier, as the bytes arrive: see main.limited_http_protocol)
            await error_response(APIError(431, f"the request line and headers are larger than the limit of "
                                               f"{settings.max_header_bytes} bytes", code="headers_too_large")
                                 )(scope, receive, send)
            return
        if settings.api_keys and path not in PUBLIC_PATHS and scope.get("method") != "OPTIONS":
            if _api_key(scope) not in settings.api_keys:
                await error_response(APIError(401, "Invalid API Key: send 'Authorization: Bearer <key>'",
                                              type=AUTHENTICATION, code="invalid_api_key"))(scope, receive, send)
                return
        if self.state.backend is None and path not in PUBLIC_PATHS:
            if self.state.load_error is not None:
                err = APIError(500, f"the model failed to load: {self.state.load_error}", type=SERVER)
            else:
                err = APIError(503, "Loading model", type=UNAVAILABLE, code="loading",
                               headers={"Retry-After": "1"})
            await error_response(err)(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            limit = settings.max_body_bytes
            length = _content_length(scope)
            too_big = APIError(413, f"the request body is larger than the limit of {limit} bytes",
                               code="body_too_large")
            if length is not None and length > limit:
                await error_response(too_big)(scope, receive, send)
                return
            chunks: List[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > limit:
                    await error_response(too_big)(scope, receive, send)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            whole = b"".join(chunks)
            bad_text = await _json_text_error(whole)
            if bad_text is not None:
                await error_response(bad_text)(scope, receive, send)
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": whole, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


def _head_bytes(scope: dict) -> int:
    """About the size of the request line plus headers as they came over the wire."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
    for key, value in scope.get("headers", ()):
        size += len(key) + len(value) + 4
    return size


class _NotJSONConstant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSONConstant(name)


#: Bodies larger than this are checked for NaN/Infinity in a worker thread (not on the loop).
_PARSE_ON_LOOP_BYTES = 64 * 1024


async def _json_text_error(body: bytes) -> Optional[APIError]:
    """A 400 for a body that is not UTF-8 or that uses NaN/Infinity (which Python's json
    accepts and JSON does not); None otherwise (FastAPI's parser reports other problems)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad_request(f"the request body is not valid UTF-8 (byte {exc.start}): JSON must be UTF-8",
                           code="invalid_json")
    if b"NaN" not in body and b"Infinity" not in body:      # the common case: no parse here
        return None

    def find() -> Optional[str]:
        try:
            json.loads(body, parse_constant=_refuse_constant)
        except _NotJSONConstant as exc:
            return str(exc)
        except ValueError:
            return None     # malformed JSON: FastAPI answers it (invalid_json)
        return None

    found = await asyncio.to_thread(find) if len(body) > _PARSE_ON_LOOP_BYTES else find()
    if found is None:
        return None
    return bad_request(f"the request body is not valid JSON: {found} is not a JSON number", code="invalid_json")


def _header(scope: dict, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _api_key(scope: dict) -> Optional[str]:
    auth = _header(scope, b"authorization") or _header(scope, b"x-api-key")
    if auth is None:
        return None
    auth = auth.strip()
    if auth[:7].lower() == "bearer ":
        auth = auth[7:].strip()
    return auth


def _content_length(scope: dict) -> Optional[int]:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- disconnects


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, aw: Awaitable[Any]) -> Any:
    """Await `aw`, but cancel it (which cancels the request in the LLM) if the client leaves."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects (whatever ASGI version
    the server speaks), and always close the body iterator, which cancels the generation."""

    def __init__(self, content: AsyncGenerator[bytes, None], cleanup: Optional[Callable[[], Awaitable[None]]] = None
                 ) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        # Runs when the response ends, however it ends, even if the body iterator never
        # started (a client gone before the first byte): gives back the admission places and
        # closes the streams (an unstarted async generator's `finally` never runs).
        self._cleanup = cleanup

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError):
                await self.stream_response(send)

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        sender = asyncio.ensure_future(stream())
        listener = asyncio.ensure_future(listen())
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sender, listener):
                t.cancel()
            for t in (sender, listener):
                with contextlib.suppress(BaseException):
                    await t
            with contextlib.suppress(BaseException):
                await self._content.aclose()
            if self._cleanup is not None:
                await self._cleanup()


# --------------------------------------------------------------------------- the app


def create_app(llm: Optional["LLM"] = None, *, loader: Optional[Callable[[], "LLM"]] = None,
               **settings: Any) -> FastAPI:
    """An OpenAI-compatible ASGI app serving `llm` (a `pyllama.LLM`).

    Give either `llm` (already loaded; the caller closes it) or `loader`, a callable that
    returns one: it runs in a thread when the app starts (``/health`` answers 503 until it
    returns) and the app closes that LLM when it stops.  `settings` are
    :class:`ServerSettings` fields (api_keys, cors_origins, max_queue, model_alias ...).
    """
    if (llm is None) == (loader is None):
        raise TypeError("create_app() needs exactly one of llm (a loaded LLM) or loader (a callable returning one)")
    cfg = ServerSettings.from_kwargs(**settings)
    state = ServerState(cfg)
    if llm is not None:
        state.set_llm(llm, owns=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading: Optional[threading.Thread] = None
        if loader is not None and state.backend is None:
            def load() -> None:
                try:
                    state.set_llm(loader(), owns=True)
                except BaseException as exc:  # noqa: BLE001  (reported by /health)
                    state.load_error = exc
                    logger.error("the model failed to load: %s", exc)

            loading = threading.Thread(target=load, name="pyllama-server-load", daemon=True)
            loading.start()
        try:
            yield
        finally:
            if state.owns_llm and state.llm is not None:
                with contextlib.suppress(Exception):
                    # off the loop: closing waits for the engine's last step
                    await asyncio.to_thread(state.llm.close)

    app = FastAPI(title="pyllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pyllama = state
    _install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(_Gate, state=state)
    if cfg.cors_origins:
        # llama-server's CORS headers, casing and preflight answers (outside the gate: a
        # preflight carries no API key); "localhost" = any loopback origin
        from pyllama.server.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, origins=cfg.cors_origins)
    return app


_FIELDS = sorted(set(S.ChatCompletionRequest.model_fields) | set(S.CompletionRequest.model_fields)
                 | set(S.EmbeddingRequest.model_fields))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = pydantic_errors_to_api_error(exc.errors())
        if err.code == "unknown_field" and err.param and "." not in err.param:
            close = difflib.get_close_matches(err.param, _FIELDS, n=1, cutoff=0.6)
            if close:
                err.message += f" (did you mean '{close[0]}'?)"
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", type=NOT_FOUND, code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return error_response(err)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)   # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error while answering %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type=SERVER))


def _add_routes(app: FastAPI, state: ServerState) -> None:
    cfg = state.settings

    def n_vocab() -> int:
        return int(state.llm.vocab.n_tokens)

    # ---- ops ------------------------------------------------------------------------

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return error_response(APIError(500, f"the model failed to load: {state.load_error}", type=SERVER))
        if state.backend is None:
            return error_response(APIError(503, "Loading model", type=UNAVAILABLE, code="loading"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> JSONResponse:
        llm = state.llm
        meta: dict = {}
        with contextlib.suppress(Exception):    # an LLM closing at shutdown: the card without meta
            m = llm.model
            meta = {"n_vocab": llm.vocab.n_tokens, "n_ctx_train": m.n_ctx_train, "n_embd": m.n_embd,
                    "n_params": m.n_params, "size": m.size, "n_ctx": llm.n_ctx,
                    "n_ctx_slot": llm.context.n_ctx_seq, "n_slots": state.backend.n_slots}
        card = S.ModelCard(id=state.model_id, created=state.created, meta=meta or None)
        body = S.ModelList(data=[card]).model_dump(exclude_none=True)
        # llama-server's --alias a,b and --tags x,y
        body["data"][0].update(aliases=list(cfg.model_aliases or [state.model_id]), tags=list(cfg.model_tags))
        return JSONResponse(body)

    @app.get("/slots")
    async def slots() -> JSONResponse:
        if not cfg.slots_endpoint:      # --no-slots
            raise APIError(501, "This server does not support slots endpoint. Start it with `--slots`",
                           type="not_supported_error", code="not_supported")
        # llama-server's name for the library's "busy"
        return JSONResponse([dict(s, is_processing=s["busy"]) for s in state.ready_backend().slots()])

    @app.get("/metrics")
    async def metrics() -> Response:
        if not cfg.metrics_endpoint:    # --no-metrics
            raise APIError(501, "This server does not support metrics endpoint. Start it with `--metrics`",
                           type="not_supported_error", code="not_supported")
        resp = Response(M.render(state.registry), media_type=M.CONTENT_TYPE)
        # llama-server's header: when the counters started (this server's start, Unix seconds),
        # spelled as llama-server spells it (Starlette would lower-case it; some clients look
        # it up case-sensitively, llama-server's test suite among them)
        resp.raw_headers.append((b"Process-Start-Time-Unix", str(state.created).encode("ascii")))
        return resp

    @app.post("/tokenize")
    async def tokenize(body: S.TokenizeRequest) -> Response:
        llm = state.llm

        def work() -> bytes:   # a 16 MiB text takes seconds: never on the event loop
            tokens = llm.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special)
            if body.with_pieces:
                # each distinct token's JSON once (at most n_vocab of them), then joined
                pieces: dict = {}
                parts = []
                for t in tokens:
                    part = pieces.get(t)
                    if part is None:
                        part = pieces[t] = _json_bytes({"id": t, "piece": llm.detokenize([t])})
                    parts.append(part)
                return b'{"tokens":[' + b",".join(parts) + b"]}"
            return _json_list_bytes("tokens", tokens)

        with as_api_errors("content"):      # text it cannot encode (lone surrogates): 400
            return Response(await asyncio.to_thread(work), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(body: S.DetokenizeRequest) -> Response:
        nv = n_vocab()

        def work() -> bytes:
            P.check_token_ids([body.tokens], nv, param="tokens")
            return _json_bytes({"content": state.llm.detokenize(body.tokens)})

        with as_api_errors("tokens"):
            return Response(await asyncio.to_thread(work), media_type="application/json")

    # ---- embeddings ---------------------------------------------------------------------

    @app.post("/v1/embeddings")      # (/embeddings is llama-server's own shape: llama_routes)
    async def embeddings(body: S.EmbeddingRequest, request: Request) -> JSONResponse:
        backend = state.ready_backend()
        llm = state.llm
        if not llm.embedding:
            raise APIError(501, "this server's model was loaded without embeddings (LLM(..., embedding=True))",
                           type="not_supported_error", code="embeddings_disabled")
        from pyllama.errors import ContextLengthError
        from pyllama.server.llama_routes import embedding_inputs

        # llama-server's input shapes (as /embedding takes them): a text, token ids, texts and
        # ids mixed, {"prompt_string"}, {"content": [text parts]}, or a list of those
        try:
            with as_api_errors("input"):
                items = await asyncio.to_thread(embedding_inputs, llm, body.input, n_vocab())
        except APIError as exc:
            if exc.param:       # embedding_inputs names /embedding's field ("content.1" -> "input.1")
                exc.param = re.sub(r"^(content|prompt)\b", "input", exc.param)
            raise
        n_tokens = sum(len(x) for x in items)
        with backend.admit():
            try:
                vectors = await unless_disconnected(request, backend.embed(items))
            except APIError as exc:
                if isinstance(exc.__cause__, ContextLengthError):   # llama-server's words first
                    exc.message = f"input is too large to process. increase the physical batch size: {exc.message}"
                raise
        data = []
        for i, vec in enumerate(vectors):
            if body.dimensions is not None:
                vec = vec[: body.dimensions]
            if body.encoding_format == "base64":
                import numpy as np

                emb: Any = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
            else:
                emb = [float(x) for x in vec]
            data.append(S.EmbeddingData(index=i, embedding=emb))
        resp = S.EmbeddingResponse(data=data, model=state.model_id,
                                   usage=S.EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))
        return JSONResponse(resp.model_dump())

    def checked(body: Any) -> Backend:
        """A generation request's own checks, then the backend once the model is ready."""
        body.check()
        backend = state.ready_backend()
        _check_n(body.n, backend)
        return backend

    # ---- chat ----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Response:
        backend = checked(body)
        kw = P.chat_kwargs(body, cfg, n_vocab())
        messages = P.chat_messages(body)
        rid, created, model = P.new_id("chatcmpl"), P.now(), state.model_id
        # llama-server's __verbose object: asked for by the request, or --verbose for all
        verbose = (messages, kw) if (cfg.verbose_responses if body.verbose is None else body.verbose) else None
        describe = functools.partial(P.chat_verbose, state.llm, verbose) if verbose else None    # (streamed)
        if not body.stream or "tools" in kw:
            # (tool calls are parsed from the whole answer: streamed, it is sent as chunks after)
            with backend.admit(body.n), _exceed_context_size():
                result = await unless_disconnected(request, backend.chat(messages, **kw))
            comps = result if isinstance(result, list) else [result]
            if not body.stream:
                return _json_response(await asyncio.to_thread(
                    P.chat_body, state.llm, comps, model, rid, created, verbose))
            chunks = await asyncio.to_thread(
                lambda: list(_chat_chunks_from_completions(comps, body, rid, created, model, describe)))
            return SSEResponse(_iterate(chunks))
        ticket = backend.acquire(body.n)
        with _exceed_context_size():
            tasks = await _open_streams(request, ticket, [
                backend.stream_chat(messages, prompt_progress=body.return_progress, **kw)])
        return SSEResponse(_chat_events(tasks[0], body, rid, created, model, describe),
                           cleanup=_closer(ticket, tasks))

    # ---- completions -----------------------------------------------------------------------

    @app.post("/v1/completions")     # (/completions is llama-server's own shape: llama_routes)
    async def completions(body: S.CompletionRequest, request: Request) -> Response:
        backend = checked(body)
        llm = state.llm
        nv = n_vocab()
        kw = P.sampling_kwargs(body, cfg, nv)
        if body.logprobs is not None:
            kw["logprobs"] = True
            if body.logprobs > 0:
                kw["top_logprobs"] = body.logprobs
        prompts = P.completion_prompts(body)
        # llama-server tokenizes completion prompts with special tokens parsed
        kw["parse_special"] = True

        def check() -> Optional[list]:     # a list of a million ids: off the loop
            P.check_token_ids(prompts, nv)
            return [p if isinstance(p, str) else llm.detokenize(p) for p in prompts] if body.echo else None

        prompt_texts = await asyncio.to_thread(check)
        rid, created, model = P.new_id("cmpl"), P.now(), state.model_id
        places = len(prompts) * body.n       # one per engine request
        if not body.stream:
            with backend.admit(places):   # echo: the library puts the prompt in front (and scores it)
                results = await unless_disconnected(
                    request, gather_or_cancel([backend.complete(p, echo=body.echo, **kw) for p in prompts]))

            def build() -> dict:
                groups = [r if isinstance(r, list) else [r] for r in results]
                choices = []
                for pi, comps in enumerate(groups):
                    for j, c in enumerate(comps):
                        choices.append(P.completion_choice(c, pi * body.n + j,
                                                           prompt_texts[pi] if body.echo else "",
                                                           body.echo, body.logprobs is not None))
                # (the library's Completion.text already starts with the prompt when echo=True)
                out = S.CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                           usage=P.usage(groups), timings=P.timings(groups[0][0])).model_dump()
                if cfg.verbose_responses if body.verbose is None else body.verbose:
                    from pyllama.server.llama_routes import verbose_object

                    out["__verbose"] = verbose_object(llm, prompts[0], kw, groups[0][0], model)
                return out

            return _json_response(await asyncio.to_thread(build))
        ticket = backend.acquire(places)
        tasks = await _open_streams(request, ticket, [
            backend.stream_complete(p, prompt_progress=body.return_progress, **kw) for p in prompts])
        events = _completion_events(tasks, body, prompt_texts, rid, created, model)
        return SSEResponse(events, cleanup=_closer(ticket, tasks))

    # ---- the other APIs (each module registers its own routes) ------------------------------
    from pyllama.server import anthropic_api, llama_routes, rank_routes, responses_api

    for module in (llama_routes, rank_routes, responses_api, anthropic_api):
        module.add_routes(app, state)


@contextlib.contextmanager
def _exceed_context_size() -> Iterator[None]:
    """A prompt longer than a slot as llama-server answers it on every route: 400 with type
    exceed_context_size_error, n_prompt_tokens and n_ctx (/completion's error, reused)."""
    try:
        yield
    except APIError as exc:
        n_prompt, n_ctx = exc.extra.get("n_prompt_tokens"), exc.extra.get("n_ctx")
        if exc.code != "context_length_exceeded" or n_prompt is None or n_ctx is None:
            raise
        from pyllama.server.llama_routes import _context_error

        err = _context_error(n_prompt, n_ctx)
        err.param = exc.param
        raise err from exc.__cause__


def _check_n(n: int, backend: Backend) -> None:
    # The LLM would grow its context to n sequences when idle, changing every slot's size:
    # a server keeps the layout it was started with.
    if n > backend.n_slots:
        raise bad_request(f"n={n} choices need {n} slots at once but this server has {backend.n_slots} "
                          "(start it with a larger -np)", param="n")


def _json_bytes(obj: Any) -> bytes:
    """What JSONResponse would send (NaN never reaches here: requests refuse it)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


#: Items json.dumps encodes in one call: the encoder holds the GIL for a whole call, and
#: millions of items in one call would stall the event loop thread for seconds.
_JSON_BATCH = 4096


def _json_list_bytes(key: str, items: List[Any]) -> bytes:
    """``{"key": [items...]}`` encoded in batches (in a worker thread), so that the event loop
    gets the GIL between them."""
    parts = []
    for i in range(0, len(items), _JSON_BATCH):
        parts.append(_json_bytes(items[i:i + _JSON_BATCH])[1:-1])
    return b'{"' + key.encode() + b'":[' + b",".join(parts) + b"]}"


def _json_response(obj: Any) -> Response:
    return Response(_json_bytes(obj), media_type="application/json")


async def _iterate(items: List[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


async def _open_streams(request: Request, ticket: Ticket, opens: List[Awaitable[StartedStream]]
                        ) -> List["asyncio.Task"]:
    """Start every stream of a request (the prompts of a list) and return their tasks once
    the first has produced its first piece: text is sent as soon as there is some, even when
    the list is larger than the slots.  An input error or a refusal before that is the
    request's status (400/503); the admission places are given back, and every started
    stream is closed, if opening fails or the client leaves."""
    tasks = [asyncio.ensure_future(aw) for aw in opens]
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait([*tasks, watcher], return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            raise ClientGone()
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        return tasks
    except BaseException:
        ticket.release()
        await cancel_all(tasks)
        raise
    finally:
        watcher.cancel()


def _closer(ticket: Ticket, tasks: List["asyncio.Task"]) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        try:
            await cancel_all(tasks)
        finally:
            ticket.release()
    return close


async def _error_events(exc: BaseException) -> AsyncGenerator[bytes, None]:
    """How a stream that fails after it started ends (as llama-server and vLLM end it): an
    event with OpenAI's error object, then ``data: [DONE]``."""
    err = error_event(exc)
    if err.status >= 500 and err.status != 503:
        logger.error("a stream failed after it started: %s: %s", type(exc).__name__, exc)
    yield P.sse(err.body())
    yield P.SSE_DONE


def _include_usage(body: S.SamplingFields) -> bool:
    return bool(body.stream_options is not None and body.stream_options.include_usage)


def _role_delta(index: int) -> dict:
    """The first chunk of a choice: its role, content null (as llama-server and OpenAI send it;
    clients that refuse empty content deltas, such as llama-server's test client, read it)."""
    return {"index": index, "delta": {"role": "assistant", "content": None}, "logprobs": None, "finish_reason": None}


async def _chat_events(task: "asyncio.Task", body: S.ChatCompletionRequest, rid: str, created: int,
                       model: str, describe: Optional[Callable] = None) -> AsyncGenerator[bytes, None]:
    include_usage = _include_usage(body)

    def chunk(choices: list, usage: Any = None, timings: Any = None) -> bytes:
        return P.sse(P.chat_chunk(rid, created, model, choices, usage, include_usage, timings))

    finished: dict = {}
    stream: StartedStream = task.result()
    live = P.live_requests(stream) if body.timings_per_token else None
    try:
        for i in range(body.n):
            yield chunk([_role_delta(i)])
        async for piece in stream:
            if getattr(piece, "prompt_progress", None) is not None:      # return_progress: a role delta carries it
                yield P.sse(P.progress_chunk(P.chat_chunk(rid, created, model, [_role_delta(piece.index)]),
                                             piece.prompt_progress, body.timings_per_token))
                continue
            # timings_per_token: the timings so far ride on every chunk (llama-server's)
            now = P.live_timings(live[piece.index]) if live and piece.index < len(live) else None
            # a reasoning model's thinking comes as delta.reasoning_content (llama-server's name)
            if piece.reasoning:
                yield chunk([{"index": piece.index, "delta": {"reasoning_content": piece.reasoning},
                              "logprobs": None, "finish_reason": None}], timings=now)
            if piece.text or piece.logprobs:
                yield chunk([{"index": piece.index, "delta": {"content": piece.text},
                              "logprobs": P.chat_logprobs(piece.logprobs) if piece.logprobs else None,
                              "finish_reason": None}], timings=now)
            if piece.finish_reason is not None:
                finished[piece.index] = piece.finish_reason
        comps = stream.completions or []
        final = P.timings(comps[0]) if comps else None
        with_usage = include_usage and bool(comps)
        # describe: __verbose, on the first closing chunk (llama-server's)
        extra = await asyncio.to_thread(describe, comps[0], model) if describe is not None and comps else None
        for i in range(body.n):
            reason = comps[i].finish_reason if i < len(comps) else finished.get(i, "stop")
            last = i == body.n - 1 and not with_usage      # the timings go on the stream's last chunk
            out = P.chat_chunk(rid, created, model, [{"index": i, "delta": {}, "logprobs": None,
                                                      "finish_reason": P.finish_reason(reason)}],
                               None, include_usage, final if last else None)
            if extra is not None and i == 0:
                out["__verbose"] = extra
            yield P.sse(out)
        if with_usage:
            yield chunk([], usage=P.usage([comps]), timings=final)
        yield P.SSE_DONE
    except Exception as exc:  # noqa: BLE001  (sent to the client, which already has a 200)
        async for e in _error_events(exc):
            yield e
    finally:
        await stream.aclose()


def _chat_chunks_from_completions(comps: list, body: S.ChatCompletionRequest, rid: str, created: int,
                                  model: str, describe: Optional[Callable] = None) -> Iterator[bytes]:
    """A whole answer (tool calls) as stream chunks; runs in a worker thread (logprobs)."""
    include_usage = _include_usage(body)

    def chunk(choices: list, usage: Any = None, timings: Any = None) -> bytes:
        return P.sse(P.chat_chunk(rid, created, model, choices, usage, include_usage, timings))

    for i, c in enumerate(comps):
        yield chunk([_role_delta(i)])
        msg = P.response_message(c)
        # timings_per_token: the answer is whole already, its chunks carry its final timings
        now = P.timings(c) if body.timings_per_token else None
        if msg.reasoning_content:
            yield chunk([{"index": i, "delta": {"reasoning_content": msg.reasoning_content}, "logprobs": None,
                          "finish_reason": None}], timings=now)
        if msg.tool_calls:
            calls = [dict(tc, index=k) for k, tc in enumerate(msg.tool_calls)]
            delta: dict = {"tool_calls": calls}
            if msg.content:
                delta["content"] = msg.content
            yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], timings=now)
        elif msg.content:
            yield chunk([{"index": i, "delta": {"content": msg.content},
                          "logprobs": P.chat_logprobs(c.logprobs), "finish_reason": None}], timings=now)
        last = i == len(comps) - 1 and not include_usage      # the timings go on the stream's last chunk
        out = P.chat_chunk(rid, created, model, [{"index": i, "delta": {}, "logprobs": None,
                                                  "finish_reason": P.finish_reason(c.finish_reason)}],
                           None, include_usage, P.timings(c) if last else None)
        if describe is not None and i == 0:      # __verbose, on the first closing chunk
            out["__verbose"] = describe(c, model)
        yield P.sse(out)
    if include_usage:
        yield chunk([], usage=P.usage([comps]), timings=P.timings(comps[-1]) if comps else None)
    yield P.SSE_DONE


#: Pieces the merge of a prompt list holds for a slow reader before its streams wait (and
#: the library's backpressure pauses their requests) instead of queueing without bound.
_MERGE_BUFFER = 64


async def _merge(tasks: List["asyncio.Task"]) -> AsyncIterator[tuple]:
    """(stream index, piece) from several opening streams as they come.  The first error
    of any stream is raised (the caller closes the others)."""
    if len(tasks) == 1:
        async for piece in await tasks[0]:
            yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=_MERGE_BUFFER)

    async def pump(k: int, t: "asyncio.Task") -> None:
        try:
            async for piece in await t:
                await queue.put((k, piece, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            await queue.put((k, None, exc))
            return
        await queue.put((k, None, None))

    pumps = [asyncio.ensure_future(pump(k, t)) for k, t in enumerate(tasks)]
    try:
        open_ = len(tasks)
        while open_:
            k, piece, exc = await queue.get()
            if piece is None:
                if exc is not None:
                    raise exc
                open_ -= 1
                continue
            yield k, piece
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _completion_events(tasks: List["asyncio.Task"], body: S.CompletionRequest, prompt_texts: Optional[list],
                             rid: str, created: int, model: str) -> AsyncGenerator[bytes, None]:
    include_usage = _include_usage(body)
    want_lp = body.logprobs is not None
    offsets: dict = {}
    timings_now = P.LiveTimings(tasks, body.timings_per_token)    # on every text chunk, as llama-server

    def chunk(choices: list, usage: Any = None, timings: Any = None) -> bytes:
        return P.sse(P.completion_chunk(rid, created, model, choices, usage, include_usage, timings))

    try:
        if body.echo:
            for k, text in enumerate(prompt_texts or ()):
                for j in range(body.n):
                    yield chunk([{"index": k * body.n + j, "text": text, "logprobs": None, "finish_reason": None}])
                    offsets[k * body.n + j] = len(text)
        async for k, piece in _merge(tasks):
            index = k * body.n + piece.index
            if getattr(piece, "prompt_progress", None) is not None:      # return_progress
                yield P.sse(P.progress_chunk(P.completion_chunk(rid, created, model, [
                    {"index": index, "text": "", "logprobs": None, "finish_reason": None}]), piece.prompt_progress,
                    body.timings_per_token))
                continue
            if not piece.text and not piece.logprobs:
                continue
            lp = None
            if want_lp:
                lp = P.legacy_logprobs(piece.logprobs or [], offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(piece.text)
            yield chunk([{"index": index, "text": piece.text, "logprobs": lp, "finish_reason": None}],
                        timings=timings_now(k, piece.index))
        groups = [t.result().completions or [] for t in tasks]
        n_total = len(tasks) * body.n
        for index in range(n_total):
            k, j = divmod(index, body.n)
            comps = groups[k]
            reason = comps[j].finish_reason if j < len(comps) else "stop"
            last = index == n_total - 1
            yield chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": P.finish_reason(reason)}],
                        timings=P.timings(groups[0][0]) if (last and groups and groups[0]) else None)
        if include_usage:
            yield chunk([], usage=P.usage(groups))
        yield P.SSE_DONE
    except Exception as exc:  # noqa: BLE001  (sent to the client, which already has a 200)
        async for e in _error_events(exc):
            yield e
    finally:
        await cancel_all(tasks)     # a failed or abandoned list: its other prompts stop too
