"""The server's only door into the model: admission (slots + bounded queue) and the calls
into `LLM`'s async API.

The `LLM` owns the engine, the scheduling of sequences into its slots, the prompt cache,
logprobs, `n`, tool calling and cancellation; this module only

* counts the engine requests in flight (a prompt list times `n` counts each) and refuses
  (503 + Retry-After) those beyond ``slots + max_queue``; a :class:`Ticket` holds the places
  of one HTTP request and gives them back exactly once,
* awaits `LLM`'s coroutines and starts its async streams (a :class:`StartedStream` has
  its first chunk already), turning the library's input errors into 400s,
* makes sure a request whose client went away is cancelled (closing the async iterator /
  cancelling the awaiting task is what cancels the request inside the `LLM`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, List, Optional

from pyllama.server.errors import NO_PROJECTOR, UNAVAILABLE, APIError, bad_request, from_library_error

if TYPE_CHECKING:   # annotations only: the server must import without loading the model code
    from pyllama.llm import LLM, AsyncStream, Chunk, Completion


class StartedStream:
    """The library's `AsyncStream` (in Chunks) once its first chunk has arrived; iterating
    gives that chunk again, then the rest.  Reading the first chunk before answering is what
    lets an input error or a refusal still be the request's status (400/503) rather than a
    broken event stream."""

    def __init__(self, stream: "AsyncStream", chunks: AsyncIterator["Chunk"], first: Optional["Chunk"]) -> None:
        self._stream = stream
        self._chunks = chunks
        self._first = first

    def __aiter__(self) -> "StartedStream":
        return self

    async def __anext__(self) -> "Chunk":
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._chunks.__anext__()

    @property
    def completions(self) -> Optional[List["Completion"]]:
        """The final `Completion` of each choice, once the stream is exhausted."""
        return self._stream.completions

    async def aclose(self) -> None:
        """Stop (cancels the request in the LLM if it is still running)."""
        self._first = None
        await self._stream.aclose()


async def _start(stream: "AsyncStream") -> StartedStream:
    """Wait for `stream`'s first chunk (starting it is what submits its requests)."""
    chunks = stream.__aiter__()
    try:
        first: Optional["Chunk"] = await chunks.__anext__()
    except StopAsyncIteration:       # an empty answer (max_tokens=0): nothing to give again
        first = None
    return StartedStream(stream, chunks, first)


class Backend:
    """Admission control and the async calls into one `LLM`."""

    def __init__(self, llm: "LLM", *, max_queue: int = 64, retry_after_s: int = 1) -> None:
        self.llm = llm
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.n_slots = llm.n_parallel
        self.in_flight = 0

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
            raise APIError(503, f"the server is busy: {self.in_flight} requests are in flight "
                                f"({self.n_slots} slots, queue of {self.max_queue}); retry later",
                           type=UNAVAILABLE, code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += places
        return Ticket(self, places)

    @contextlib.contextmanager
    def admit(self, places: int = 1) -> Iterator["Ticket"]:
        """Hold `places` places among slots + queue for the duration of a request, or raise."""
        ticket = self.acquire(places)
        try:
            yield ticket
        finally:
            ticket.release()

    # ---- what the routes use -------------------------------------------------------------
    # Library input errors become 400s (as_api_errors); a stream is started here, so that
    # they do before any byte of the answer is sent.

    async def complete(self, prompt: Any, **kwargs: Any) -> Any:
        with as_api_errors("prompt"):
            return await self.llm.acomplete(prompt, **kwargs)

    async def chat(self, messages: list, **kwargs: Any) -> Any:
        self._check_media(messages, kwargs)
        with as_api_errors("messages"):
            return await self.llm.achat(messages, **kwargs)

    async def stream_complete(self, prompt: Any, **kwargs: Any) -> StartedStream:
        with as_api_errors("prompt"):
            return await _start(self.llm.astream(prompt, chunks=True, **kwargs))

    async def stream_chat(self, messages: list, **kwargs: Any) -> StartedStream:
        self._check_media(messages, kwargs)
        with as_api_errors("messages"):
            return await _start(self.llm.astream_chat(messages, chunks=True, **kwargs))

    def _check_media(self, messages: list, kwargs: dict) -> None:
        """Image/audio parts need a projector; a client's parts may only carry data: URLs
        (never a path on this machine)."""
        from pyllama.multimodal import has_media

        if has_media(messages):
            if self.llm.multimodal is None:
                raise bad_request(NO_PROJECTOR, param="messages")
            kwargs["allow_files"] = False

    async def embed(self, texts: Any) -> Any:
        with as_api_errors("input"):
            return await asyncio.to_thread(self.llm.embed, texts)

    def slots(self) -> List[dict]:
        return self.llm.slots()

    def metrics(self) -> dict:
        return self.llm.metrics()


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
            if isinstance(res, StartedStream):
                with contextlib.suppress(BaseException):
                    await res.aclose()


@contextlib.contextmanager
def as_api_errors(param: Optional[str]) -> Iterator[None]:
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
