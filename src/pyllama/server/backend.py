"""The server's only door into the model: admission (slots + bounded queue) and the calls
into `LLM`'s async API.

The `LLM` owns the engine, the scheduling of sequences into its slots, the prompt cache,
logprobs, `n`, tool calling and cancellation; this module only

* counts the engine requests in flight (a prompt list times `n` counts each) and refuses
  (503 + Retry-After) those beyond ``slots + max_queue``; a :class:`Ticket` holds the places
  of one HTTP request and gives them back exactly once,
* awaits `LLM`'s coroutines / async iterators (one adapter, :meth:`Backend._call` and
  :meth:`Backend._open_stream`), and turns the library's input errors into 400s,
* makes sure a request whose client went away is cancelled (closing the async iterator /
  cancelling the awaiting task is what cancels the request inside the `LLM`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional

from pyllama.server.errors import UNAVAILABLE, APIError, bad_request, from_library_error

logger = logging.getLogger("pyllama.server")


@dataclass
class Piece:
    """One streamed piece of one choice (the shape of the library's Chunk)."""

    index: int
    text: str
    token_ids: Optional[list] = None
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None


def _as_piece(item: Any) -> Piece:
    if isinstance(item, str):
        return Piece(0, item)
    if isinstance(item, tuple):                       # generate_stream's (index, piece)
        return Piece(int(item[0]), item[1])
    return Piece(int(getattr(item, "index", 0) or 0), getattr(item, "text", "") or "",
                 getattr(item, "token_ids", None), getattr(item, "logprobs", None),
                 getattr(item, "finish_reason", None))


class Stream:
    """An async iterator of :class:`Piece` over one running generation; after it is
    exhausted, :attr:`completions` holds the final `Completion` objects (one per choice)."""

    def __init__(self, source: Any, closer: Callable[[], Any], finals: Callable[[], Optional[list]]) -> None:
        self._source = source
        self._closer = closer
        self._finals = finals
        self.completions: Optional[list] = None
        self._done = False

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> Piece:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._source.__anext__()
        except StopAsyncIteration:
            self._done = True
            self.completions = self._finals()
            raise
        return _as_piece(item)

    async def aclose(self) -> None:
        """Stop (cancels the request in the LLM if it is still running)."""
        if not self._done:
            self._done = True
            res = self._closer()
            if inspect.isawaitable(res):
                await res


class Backend:
    """Admission control and the async calls into one `LLM`."""

    def __init__(self, llm: Any, *, max_queue: int = 64, retry_after_s: int = 1) -> None:
        self.llm = llm
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.n_slots = _slot_count(llm)
        self.in_flight = 0
        self.requests_total = 0
        self.rejected_total = 0
        self.started = time.time()

    # ---- admission ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.n_slots + self.max_queue

    def acquire(self, places: int = 1) -> "Ticket":
        """Take `places` places among slots + queue (one per engine request: prompts x n), or
        raise: 400 if they could never all be free at once, 503 (+ Retry-After) if not now.
        The :class:`Ticket` gives them back (once, however often it is released)."""
        if places > self.capacity:
            raise bad_request(f"this request needs {places} engine requests (prompts x n) at once but the server "
                              f"admits at most {self.capacity} ({self.n_slots} slots + a queue of "
                              f"{self.max_queue}; start it with a larger --max-queue)", param="prompt",
                              code="too_many_prompts")
        if self.in_flight + places > self.capacity:
            self.rejected_total += 1
            raise APIError(503, f"the server is busy: {self.in_flight} requests are in flight "
                                f"({self.n_slots} slots, queue of {self.max_queue}); retry later",
                           type=UNAVAILABLE, code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += places
        self.requests_total += 1
        return Ticket(self, places)

    @contextlib.contextmanager
    def admit(self, places: int = 1) -> Iterator["Ticket"]:
        """Hold `places` places among slots + queue for the duration of a request, or raise."""
        ticket = self.acquire(places)
        try:
            yield ticket
        finally:
            ticket.release()

    # ---- the adapter ------------------------------------------------------------------

    async def _call(self, name: str, *args: Any, param: Optional[str] = None, **kwargs: Any) -> Any:
        """``await llm.a<name>(...)``; library input errors become 400s."""
        with _as_api_errors(param):
            return await getattr(self.llm, "a" + name)(*args, **kwargs)

    async def _open_stream(self, name: str, *args: Any, param: Optional[str] = None, **kwargs: Any) -> Stream:
        """Start a streamed generation (``llm.astream`` / ``llm.astream_chat``, in Chunks) and wait
        for its first piece, so that input errors are still a 400 rather than a broken stream."""
        with _as_api_errors(param):
            afn = self.llm.astream_chat if name == "chat" else self.llm.astream
            return await _prefetch(_wrap_async(afn(*args, chunks=True, **kwargs)))

    # ---- what the routes use -------------------------------------------------------------

    async def complete(self, prompt: Any, **kwargs: Any) -> Any:
        return await self._call("complete", prompt, param="prompt", **kwargs)

    def _check_media(self, messages: list, kwargs: dict) -> None:
        """Image/audio parts need a projector; a client's parts may only carry data: URLs
        (never a path on this machine)."""
        from pyllama.multimodal import has_media

        if has_media(messages):
            if getattr(self.llm, "multimodal", None) is None:
                raise bad_request("image/audio content needs a model with a multimodal projector: start the "
                                  "server with --mmproj FILE", param="messages")
            kwargs["allow_files"] = False

    async def chat(self, messages: list, **kwargs: Any) -> Any:
        self._check_media(messages, kwargs)
        return await self._call("chat", messages, param="messages", **kwargs)

    async def stream_complete(self, prompt: Any, **kwargs: Any) -> Stream:
        return await self._open_stream("stream", prompt, param="prompt", **kwargs)

    async def stream_chat(self, messages: list, **kwargs: Any) -> Stream:
        self._check_media(messages, kwargs)
        return await self._open_stream("chat", messages, param="messages", **kwargs)

    async def embed(self, texts: Any) -> Any:
        with _as_api_errors("input"):
            return await asyncio.to_thread(self.llm.embed, texts)

    def slots(self) -> List[dict]:
        fn = getattr(self.llm, "slots", None)
        if fn is not None:
            return list(fn())
        busy = min(self.in_flight, self.n_slots)
        return [{"id": i, "is_processing": i < busy} for i in range(self.n_slots)]

    def metrics(self) -> dict:
        fn = getattr(self.llm, "metrics", None)
        out = dict(fn()) if fn is not None else {}
        out.setdefault("requests_processing", min(self.in_flight, self.n_slots))
        out.setdefault("requests_deferred", max(0, self.in_flight - self.n_slots))
        return out


class Ticket:
    """The admission places of one HTTP request; :meth:`release` gives them back once."""

    def __init__(self, backend: Backend, places: int) -> None:
        self._backend = backend
        self._places = places

    def release(self) -> None:
        if self._places:
            self._backend.in_flight -= self._places
            self._places = 0


async def gather_or_cancel(aws: list) -> list:
    """asyncio.gather that, when one awaitable fails (or this task is cancelled), cancels the
    others and waits for them to end before raising: a failed prompt of a list must not
    leave its siblings generating for nobody."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        failed = any(t.done() and not t.cancelled() and t.exception() is not None for t in tasks)
        if failed or not all(t.done() for t in tasks):
            await cancel_all(tasks)
    for t in tasks:     # the first error in list order (not a sibling we cancelled because of it)
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()
    if any(t.cancelled() for t in tasks):
        raise asyncio.CancelledError()
    return [t.result() for t in tasks]


async def cancel_all(tasks: list) -> None:
    """Cancel `tasks` and wait (bounded by their own cancellation) until each has ended; the
    streams that opened in the meantime are closed (which cancels them in the LLM)."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is None:
            res = t.result()
            if isinstance(res, Stream):
                with contextlib.suppress(BaseException):
                    await res.aclose()


@contextlib.contextmanager
def _as_api_errors(param: Optional[str]) -> Iterator[None]:
    """Library input errors (ValueError and kin) become OpenAI-style 400s; others propagate."""
    try:
        yield
    except APIError:
        raise
    except Exception as exc:
        api = from_library_error(exc, param)
        if api is None:
            raise
        raise api from exc


def _slot_count(llm: Any) -> int:
    for attr in ("n_parallel", "n_slots"):
        value = getattr(llm, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    try:
        return int(llm.context.n_seq_max)
    except Exception:  # noqa: BLE001
        return 1


async def _prefetch(stream: Stream) -> Stream:
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return stream
    source = stream._source

    async def chained() -> AsyncIterator[Any]:
        yield first
        async for item in source:
            yield item

    gen = chained()
    stream._source = gen
    original_closer = stream._closer

    async def close_both() -> None:
        await gen.aclose()
        res = original_closer()
        if inspect.isawaitable(res):
            await res

    stream._closer = close_both
    # The first piece was already converted to a Piece; chained() yields it as is.
    return stream


def _wrap_async(src: Any) -> Stream:
    def finals() -> Optional[list]:
        comps = getattr(src, "completions", None)
        if comps is None:
            comp = getattr(src, "completion", None)
            comps = [comp] if comp is not None else None
        return list(comps) if comps is not None else None

    async def closer() -> None:
        aclose = getattr(src, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            close = getattr(src, "close", None)
            if close is not None:
                close()

    return Stream(src.__aiter__(), closer, finals)
