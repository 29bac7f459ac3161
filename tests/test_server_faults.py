"""The server under faults, over real sockets: numbers at their C limits, NaN and bad UTF-8,
oversized headers and stop lists, errors after a stream started, 503s that a retry cures,
admission that counts engine requests, clients that vanish, and an event loop that never
blocks.  After each fault the server must be idle and answer the next request.

Two kinds of server: `pyllama serve` on the tiny random model (a real process), and the app
under uvicorn in a thread with a scripted stand-in LLM (faults the real engine cannot be
made to produce on demand).  Every server a test starts is stopped by it; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from pyllama.errors import ClosedError, ContextLengthError, KVCacheFullError  # noqa: E402
from pyllama.server.app import SSEResponse, create_app  # noqa: E402
from pyllama.server.main import limited_http_protocol  # noqa: E402
from pyllama.server.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS  # noqa: E402
from server_process import ServerProcess  # noqa: E402

INT32_MAX = 2**31 - 1


def wait_for(condition, timeout=10.0, what="condition"):
    """Poll `condition` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- the tiny model as a process


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path):
    # a queue large enough for a list of 1,000 prompts
    server = ServerProcess("-m", str(tiny_model_path), "-np", "2", "-c", "1024", "--max-queue", "1100", "-t", "1",
                           "--max-header-size", "32768")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _metric(url, name):
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(rf"^llamacpp:{name} (\S+)$", text, re.M).group(1))


def assert_recovered(url):
    """Every slot idle, /metrics says nothing is processing, and the next request is answered."""
    def idle():
        slots = httpx.get(url + "/slots", timeout=10).json()
        return not any(s.get("is_processing") for s in slots) and _metric(url, "requests_processing") == 0
    wait_for(idle, 15, "idle slots")
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def post_raw(url, path, content, headers=None):
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return httpx.post(url + path, content=content, headers=h, timeout=60)


CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "x"}]

#: (path, field, largest accepted value, base body): each value at its limit must not be a
#: 500, one past it (and 2**31, 2**63) must be a 400 naming the field.
NUMERIC_LIMITS = [
    (CMPL, "max_tokens", INT32_MAX, {"prompt": "x"}),
    (CMPL, "n_predict", INT32_MAX, {"prompt": "x"}),
    (CHAT, "max_completion_tokens", INT32_MAX, {"messages": MSG}),
    (CHAT, "max_tokens", INT32_MAX, {"messages": MSG}),
    (CMPL, "top_k", INT32_MAX, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "repeat_last_n", INT32_MAX, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "dry_allowed_length", INT32_MAX, {"prompt": "x", "max_tokens": 1, "dry_multiplier": 0.5}),
    (CMPL, "dry_penalty_last_n", INT32_MAX, {"prompt": "x", "max_tokens": 1, "dry_multiplier": 0.5}),
    (CMPL, "seed", 2**32 - 1, {"prompt": "x", "max_tokens": 1}),
    (CHAT, "seed", 2**32 - 1, {"messages": MSG, "max_tokens": 1}),
    (CMPL, "n", 2, {"prompt": "x", "max_tokens": 1}),
    (CHAT, "n", 2, {"messages": MSG, "max_tokens": 1}),
    (CMPL, "best_of", 1, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "logprobs", 20, {"prompt": "x", "max_tokens": 1}),
    (CHAT, "top_logprobs", 20, {"messages": MSG, "max_tokens": 1, "logprobs": True}),
    (CMPL, "repeat_penalty", 1e6, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "mirostat_tau", 1e6, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "dry_multiplier", 1e6, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "dry_base", 1e6, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "top_n_sigma", 1e6, {"prompt": "x", "max_tokens": 1}),
    (CMPL, "dynatemp_range", 1e6, {"prompt": "x", "max_tokens": 1}),
]


def test_every_numeric_field_at_its_limit_and_one_past(tiny_server):
    url = tiny_server.url
    for path, field, limit, base in NUMERIC_LIMITS:
        r = post_raw(url, path, json.dumps({**base, field: limit}))
        assert r.status_code in (200, 400), (field, limit, r.text)   # never a 500
        over = [limit + 1 if isinstance(limit, int) else limit * 10, 2**31, 2**63, 10**12]
        if field in ("n", "best_of", "logprobs", "top_logprobs"):
            over.append(129)
        for value in [v for v in over if v > limit]:
            r = post_raw(url, path, json.dumps({**base, field: value}))
            assert r.status_code == 400, (path, field, value, r.text)
            err = r.json()["error"]
            assert err["param"] == field and err["type"] == "invalid_request_error", (field, value, err)
    # token ids: in prompts, /detokenize, logit_bias keys and values
    n_vocab = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["meta"]["n_vocab"]
    assert post_raw(url, CMPL, json.dumps({"prompt": [n_vocab - 1], "max_tokens": 1})).status_code == 200
    for tok in (n_vocab, 2**31, 2**63, -2**31 - 1):
        for path, body, param in [(CMPL, {"prompt": [1, tok]}, "prompt"), ("/detokenize", {"tokens": [tok]}, "tokens"),
                                  (CMPL, {"prompt": "x", "logit_bias": {str(tok): 1}}, "logit_bias")]:
            r = post_raw(url, path, json.dumps(body))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    for bias in (100.5, -1e30, 2**63):
        r = post_raw(url, CMPL, json.dumps({"prompt": "x", "logit_bias": {"5": bias}}))
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    assert_recovered(url)


@pytest.mark.parametrize("key", ["1_0", " 5", "+5", "\u0663", "abc", "5.0", "-1", "", "9" * 40])
def test_odd_logit_bias_keys_are_400(tiny_server, key):
    r = post_raw(tiny_server.url, CMPL, json.dumps({"prompt": "x", "max_tokens": 1, "logit_bias": {key: 1}}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "max_tokens": 1, "temperature": NaN}',
                                 b'{"prompt": "x", "max_tokens": 1, "temperature": Infinity}',
                                 b'{"prompt": "x", "max_tokens": 1, "logit_bias": {"5": -Infinity}}',
                                 b'{"prompt": "x", "max_tokens": 1, "metadata": {"a": NaN}}',
                                 b'{"prompt": "x", "max_tokens": 1, "temperature": 1e400}'])
def test_nan_and_infinity_are_400(tiny_server, raw):
    r = post_raw(tiny_server.url, CMPL, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_json", "invalid_value")
    # ... while the word inside a string is just text
    ok = post_raw(tiny_server.url, CMPL, b'{"prompt": "NaN Infinity", "max_tokens": 1}')
    assert ok.status_code == 200, ok.text


def test_invalid_utf8_is_invalid_json(tiny_server):
    # docs/server.md: malformed JSON is a 400 with code invalid_json
    r = post_raw(tiny_server.url, CMPL, b'{"prompt": "\xff\xfe caf\xe9", "max_tokens": 1}')
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and "UTF-8" in err["message"]


def test_tool_choice_without_tools_is_400(tiny_server):
    for choice in ("auto", "none", "required", {"type": "function", "function": {"name": "f"}}):
        r = httpx.post(tiny_server.url + CHAT, json={"messages": MSG, "max_tokens": 1, "tool_choice": choice},
                       timeout=30)
        assert r.status_code == 400, (choice, r.text)
        assert r.json()["error"]["param"] == "tool_choice"


def test_tokenize_text_it_cannot_encode_is_400(tiny_server):
    r = post_raw(tiny_server.url, "/tokenize", b'{"content": "a \\ud800 b"}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "content"
    r = post_raw(tiny_server.url, CMPL, b'{"prompt": "a \\udfff b", "max_tokens": 1}')
    assert r.status_code == 400, r.text
    assert_recovered(tiny_server.url)


def test_stop_list_cap(tiny_server):
    url = tiny_server.url
    most = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    ok = httpx.post(url + CMPL, json={"prompt": "x", "max_tokens": 2, "stop": most}, timeout=30)
    assert ok.status_code == 200, ok.text
    for stop in ([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)], ["y" * (MAX_STOP_CHARS + 1)],
                 ["a" * (MAX_STOP_CHARS // 2), "b" * (MAX_STOP_CHARS // 2 + 1)], [f"s{i}" for i in range(100_000)]):
        r = httpx.post(url + CMPL, json={"prompt": "x", "max_tokens": 2, "stop": stop}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text[:300]
    r = httpx.post(url + CHAT, json={"messages": MSG, "max_tokens": 2, "dry_multiplier": 0.5,
                                     "dry_sequence_breakers": ["z"] * (MAX_STOP_STRINGS + 1)}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "dry_sequence_breakers", r.text[:300]


def _raw_request(port, head: bytes, body: bytes = b"", timeout=20.0) -> bytes:
    """Send a request over a plain socket; the bytes of the answer ("" if the server cut it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass            # the server closed the connection while we were still sending
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return data


def test_oversized_headers_are_431(tiny_server):
    port = int(tiny_server.url.rsplit(":", 1)[1])
    big = b"a" * (4 * 1024 * 1024)
    head = (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n")
    answer = _raw_request(port, head)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # many small headers add up the same way
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
    answer = _raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # --max-header-size sets the limit: 40 KB of headers pass the default 64 KiB but not 32 KiB
    answer = _raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Mid: " + b"m" * 40_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # ordinary headers (8 KiB) are fine, and the body limit still holds
    r = httpx.get(tiny_server.url + "/health", headers={"X-Ok": "v" * 8192}, timeout=10)
    assert r.status_code == 200
    r = post_raw(tiny_server.url, CMPL, b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}')
    assert r.status_code == 413
    assert_recovered(tiny_server.url)


def test_health_answers_while_a_huge_tokenize_runs(tiny_server):
    url = tiny_server.url
    # 4 MiB: tokenizing it takes seconds with the tiny model's SPM vocabulary (15 MiB: ~25 s),
    # long enough for a loop blocked by it to miss the bound many times over
    text = ("The quick brown fox jumps over the lazy dog. " * 100_000)[: 4 * 1024 * 1024]
    body = json.dumps({"content": text, "with_pieces": True})
    result: dict = {}

    def tokenize():
        r = httpx.post(url + "/tokenize", content=body, headers={"content-type": "application/json"}, timeout=300)
        result["status"] = r.status_code
        # (not r.json(): parsing 100 MB here would hold this process's GIL and delay our own probes)
        result["n"] = r.content.count(b'"piece":')

    worker = threading.Thread(target=tokenize)
    worker.start()
    latencies = []
    try:
        with httpx.Client(timeout=60) as h:
            while worker.is_alive():
                t0 = time.monotonic()
                assert h.get(url + "/health").status_code == 200
                latencies.append(time.monotonic() - t0)
    finally:
        worker.join(300)
    assert result.get("status") == 200 and result["n"] > 1_000_000, result
    assert len(latencies) >= 5, latencies          # /health was asked while /tokenize ran
    assert max(latencies) < 2.0, sorted(latencies)[-5:]


def test_completion_list_of_1000_prompts(tiny_server):
    url = tiny_server.url
    prompts = [f"p{i}" for i in range(1000)]
    t0 = time.monotonic()
    r = httpx.post(url + CMPL, json={"prompt": prompts, "max_tokens": 1, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(1000))
    assert r.json()["usage"]["completion_tokens"] == 1000
    # streamed: every index ends with a finish_reason, then [DONE]
    finished = set()
    with httpx.stream("POST", url + CMPL, json={"prompt": prompts, "max_tokens": 1, "temperature": 0, "stream": True},
                      timeout=120) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        for c in json.loads(e)["choices"]:
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == set(range(1000))
    assert time.monotonic() - t0 < 60
    # beyond slots + queue: a 400 (it could never be admitted), not a 503
    r = httpx.post(url + CMPL, json={"prompt": [f"p{i}" for i in range(1103)], "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts", r.text[:300]
    r = httpx.post(url + CMPL, json={"prompt": prompts[:600], "n": 2, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts", r.text[:300]
    assert_recovered(url)


def test_streamed_list_client_vanishes_mid_stream(tiny_server):
    url = tiny_server.url
    body = {"prompt": ["Once", "upon", "a", "time"], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + CMPL, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    assert_recovered(url)


def test_slow_reader_gets_the_whole_answer_and_blocks_nobody(tiny_server):
    """A client that stops reading a (large: logprobs) stream: other requests are answered
    meanwhile, and when it reads on it gets the whole answer, equal to the non-streamed one."""
    url = tiny_server.url
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "logprobs": 20}
    whole = httpx.post(url + CMPL, json=body, timeout=60).json()["choices"][0]["text"]
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + CMPL, json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))[6:]]
            for _ in range(3):      # the reader stalls; the server goes on serving others
                other = httpx.post(url + CMPL, json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
                assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 3
            events += [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert text == whole
    assert_recovered(url)


# --------------------------------------------------------------------------- a scripted LLM under uvicorn


def _completion(text=" ok"):
    timings = SimpleNamespace(prompt_n=3, prompt_ms=1.0, cached_n=0, predicted_n=2, predicted_ms=2.0)
    return SimpleNamespace(text=text, tokens=[1, 2], finish_reason="length", prompt_tokens=3, timings=timings,
                           logprobs=None, content=None, tool_calls=None, reasoning=None)


def _piece(text="x"):
    return SimpleNamespace(index=0, text=text, token_ids=[1], logprobs=None, finish_reason=None, reasoning=None)


class ScriptedLLM:
    """Just enough of LLM for the server; what each call does depends on its prompt:
    "wait" waits for `release()`, "fail" is a ValueError, "closed" a ClosedError, "kvfull" a
    KVCacheFullError, "noroom" the engine's ContextLengthError for a KV memory held by
    others; streams: "boom" fails after one piece, "endless" never ends."""

    model_path = "/models/scripted.gguf"
    n_parallel = 2
    embedding = False

    def __init__(self) -> None:
        self.vocab = SimpleNamespace(n_tokens=100)
        self.lock = threading.Lock()
        self.started = 0
        self.ended = 0          # returned, raised or was cancelled/closed
        self._gate = None
        self._loop = None

    def _count(self, name, delta=1):
        with self.lock:
            setattr(self, name, getattr(self, name) + delta)

    def gate(self):
        if self._gate is None:
            self._loop = asyncio.get_running_loop()
            self._gate = asyncio.Event()
        return self._gate

    def release(self):    # from the test's thread
        wait_for(lambda: self._loop is not None, 10, "a waiting call")
        self._loop.call_soon_threadsafe(self.gate().set)

    async def _behave(self, prompt):
        if prompt == "fail":
            raise ValueError("this prompt is bad")
        if prompt == "closed":
            raise ClosedError("this LLM is closed")
        if prompt == "kvfull":
            raise KVCacheFullError("no room in the KV memory for this batch")
        if prompt == "noroom":
            err = ContextLengthError("no room in the KV memory for a prompt of 9 tokens while other sequences "
                                     "hold the rest of n_ctx=1024: retry later")
            err.retryable = True     # as the engine marks it
            raise err
        if prompt == "wait":
            await self.gate().wait()

    async def acomplete(self, prompt, **kw):
        self._count("started")
        try:
            await self._behave(prompt)
            return _completion()
        finally:
            self._count("ended")

    async def achat(self, messages, **kw):
        return await self.acomplete(messages[-1]["content"], **kw)

    def astream(self, prompt, **kw):
        llm = self

        class Stream:
            completions = None

            def __init__(self):
                self.gen = self._run()

            async def _run(self):
                llm._count("started")
                try:
                    await llm._behave(prompt)
                    yield _piece()
                    if prompt == "boom":
                        raise RuntimeError("the engine broke")
                    if prompt == "endless":
                        while True:
                            await asyncio.sleep(0.005)
                            yield _piece()
                    yield _piece()
                    self.completions = [_completion("xx")]
                finally:
                    llm._count("ended")

            def __aiter__(self):
                return self.gen

            async def aclose(self):
                await self.gen.aclose()

        return Stream()

    def astream_chat(self, messages, **kw):
        return self.astream(messages[-1]["content"], **kw)

    def slots(self):
        busy = self.started - self.ended
        return [{"id": i, "is_processing": i < busy} for i in range(self.n_parallel)]

    def metrics(self):
        busy = self.started - self.ended
        return {"requests_processing": min(busy, 2), "requests_deferred": max(0, busy - 2)}


@contextlib.contextmanager
def serve_in_thread(app, http=None):
    """`app` under uvicorn on a free loopback port, in a thread; stopped on exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            http=http or "auto", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 30, "uvicorn to start")
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


@pytest.fixture
def scripted():
    llm = ScriptedLLM()
    app = create_app(llm, max_queue=3, retry_after_s=2)
    with serve_in_thread(app) as url:
        yield SimpleNamespace(llm=llm, url=url, backend=app.state.pyllama.backend)


def assert_idle(s):
    wait_for(lambda: s.backend.in_flight == 0 and s.llm.started == s.llm.ended, 10, "an idle server")
    r = httpx.post(s.url + CMPL, json={"prompt": "x"}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " ok", r.text


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_error_after_stream_started_ends_with_error_event_and_done(scripted, path):
    body = {"prompt": "boom"} if path == CMPL else {"messages": [{"role": "user", "content": "boom"}]}
    r = httpx.post(scripted.url + path, json={**body, "stream": True}, timeout=30)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "the engine broke" in err["message"], err
    # the openai client raises it rather than seeing a truncated answer
    client = openai.OpenAI(base_url=scripted.url + "/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="the engine broke"):
        if path == CMPL:
            list(client.completions.create(model="m", prompt="boom", stream=True))
        else:
            list(client.chat.completions.create(model="m", messages=body["messages"], stream=True))
    assert_idle(scripted)


def test_mid_stream_error_in_a_prompt_list_stops_its_siblings(scripted):
    r = httpx.post(scripted.url + CMPL, json={"prompt": ["endless", "boom"], "stream": True}, timeout=30)
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert_idle(scripted)        # "endless" was closed


@pytest.mark.parametrize("prompt,code", [("closed", "shutting_down"), ("kvfull", "kv_cache_full"),
                                         ("noroom", "kv_cache_full")])
@pytest.mark.parametrize("stream", [False, True])
def test_shutdown_and_kv_pressure_are_503_with_retry_after(scripted, prompt, code, stream):
    r = httpx.post(scripted.url + CMPL, json={"prompt": prompt, "stream": stream}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"].isdigit()
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "unavailable_error"
    client = openai.OpenAI(base_url=scripted.url + "/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="m", prompt=prompt)
    assert info.value.status_code == 503
    assert_idle(scripted)


def test_admission_counts_each_prompt_and_choice(scripted):
    """2 slots + a queue of 3 = 5 places; a list of prompts (times n) takes one each."""
    s = scripted
    url = s.url
    with httpx.Client(timeout=30) as h:
        held = threading.Thread(target=lambda: h.post(url + CMPL, json={"prompt": ["wait"] * 4}))
        held.start()
        wait_for(lambda: s.llm.started == 4, 10, "4 engine requests")
        assert s.backend.in_flight == 4
        with httpx.Client(timeout=30) as h2:
            r = h2.post(url + CMPL, json={"prompt": ["x", "x"]})      # 2 more: only 1 place left
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            r = h2.post(url + CMPL, json={"prompt": "x", "n": 2})      # n counts too
            assert r.status_code == 503, r.text
            r = h2.post(url + CMPL, json={"prompt": ["x"] * 6})       # never admissible: 400
            assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts", r.text
            started = s.llm.started
            r = h2.post(url + CMPL, json={"prompt": ["x", "x"], "stream": True})   # a refused stream runs nothing
            assert r.status_code == 503
            assert s.llm.started == started
        s.llm.release()
        held.join(30)
    assert_idle(s)


def test_a_failed_prompt_cancels_its_siblings(scripted):
    s = scripted
    for stream in (False, True):
        r = httpx.post(s.url + CMPL, json={"prompt": ["wait", "wait", "fail"], "stream": stream}, timeout=30)
        assert r.status_code == 400, r.text
        assert "this prompt is bad" in r.json()["error"]["message"]
        # the two waiting siblings were cancelled, not left waiting for a release
        wait_for(lambda: s.llm.started == s.llm.ended, 10, "the siblings to be cancelled")
        assert s.backend.in_flight == 0
    assert_idle(s)


def test_a_streamed_list_starts_sending_before_its_last_prompt_starts(scripted):
    """A prompt list larger than the slots: the first text goes out while a later prompt
    still waits (before: nothing until every prompt had produced its first piece)."""
    s = scripted
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", s.url + CMPL, json={"prompt": ["x", "x", "wait"], "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] == "x"
            s.llm.release()
            rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    done = {c["index"] for e in rest[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]}
    assert done == {0, 1, 2}
    assert_idle(s)


def test_streamed_list_client_gone_before_first_piece_cancels_everything(scripted):
    """The client leaves while the prompts are starting: the streams that did open are closed,
    the waiting ones cancelled, and the places given back."""
    s = scripted
    port = int(s.url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": ["wait", "wait", "wait"], "stream": True}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        wait_for(lambda: s.llm.started == 3 and s.backend.in_flight == 3, 10, "3 waiting prompts")
    # closed before the first byte of the answer
    wait_for(lambda: s.llm.ended == 3 and s.backend.in_flight == 0, 10, "everything cancelled")
    assert_idle(s)


def test_streamed_list_client_vanishes_after_first_piece(scripted):
    s = scripted
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", s.url + CMPL, json={"prompt": ["endless", "endless", "wait"], "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: s.llm.started == 3, 10, "all three started")
    wait_for(lambda: s.llm.ended == 3 and s.backend.in_flight == 0, 10, "all three closed")
    assert_idle(s)


def test_sse_response_gives_back_its_places_when_the_body_never_started():
    """A client gone before the first byte: the body iterator never runs (so its `finally`
    never does); SSEResponse's cleanup still gives the places back and closes the streams."""
    async def main():
        cleaned = asyncio.Event()

        async def body():
            yield b"data: never\n\n"

        async def cleanup():
            cleaned.set()

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):           # a peer that never takes a byte
            await asyncio.Event().wait()

        response = SSEResponse(body(), cleanup=cleanup)
        await asyncio.wait_for(response({"type": "http"}, receive, send), 5)
        assert cleaned.is_set()
    asyncio.run(main())


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_header_limit_with_either_http_implementation(http):
    if http == "httptools":
        pytest.importorskip("httptools")
    llm = ScriptedLLM()
    app = create_app(llm, max_header_bytes=32 * 1024)
    with serve_in_thread(app, http=limited_http_protocol(32 * 1024, implementation=http)) as url:
        port = int(url.rsplit(":", 1)[1])
        answer = _raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
        # keep-alive: a second request on the same connection is counted afresh
        with httpx.Client(timeout=10) as h:
            for _ in range(3):
                assert h.get(url + "/health", headers={"X-Ok": "v" * 20_000}).status_code == 200
            assert h.get(url + "/health", headers={"X-No": "v" * 40_000}).status_code in (431, 400)
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_asgi_gate_refuses_oversized_headers_under_any_server():
    async def main():
        app = create_app(ScriptedLLM(), max_header_bytes=4096)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/health", headers={"X-Big": "v" * 5000})
            assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
            assert (await c.get("/health")).status_code == 200
    asyncio.run(main())
