"""Async use of one LLM (issue 14): acomplete / astream / achat / agenerate never block the
event loop, share the engine with each other (their requests batch together) and with
threads, and a cancelled task frees its sequence."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyllama import LLM, Chunk

PROMPTS = [f"Story {i}: once upon a time" if i % 2 else f"The number {i} is" for i in range(8)]


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    # a model with a few ms per token, so that generation visibly spans many loop turns
    path = tiny_model_factory(n_embd=256, n_layer=4, n_ff=768, n_head=4, n_head_kv=2)
    with LLM(path, n_ctx=2048, n_parallel=8, n_threads=1, temperature=0, max_tokens=24, ignore_eos=True) as m:
        yield m


def test_eight_astreams_equal_sequential_texts(llm):
    expected = [llm.complete(p).text for p in PROMPTS]
    assert len(set(expected)) > 1
    decodes_before = llm.metrics()["n_decode_total"]

    async def one(p: str) -> str:
        return "".join([piece async for piece in llm.astream(p)])

    async def main() -> list:
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    got = asyncio.run(main())
    assert got == expected
    m = llm.metrics()
    # they batched: far fewer decodes than 8 x 24 one-at-a-time steps
    assert m["n_decode_total"] - decodes_before < 8 * 24 * 0.6


def test_event_loop_keeps_running(llm):
    ticks: list = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    async def main() -> tuple:
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(llm.acomplete(p, max_tokens=48) for p in PROMPTS[:4]))
        elapsed = time.perf_counter() - t0
        stop.set()
        await t
        return results, elapsed

    results, elapsed = asyncio.run(main())
    assert all(len(r.tokens) == 48 for r in results)
    # the ticker ran all along: no gap anywhere near the length of the generation
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 5
    assert max(gaps) < max(0.5, elapsed / 3), (max(gaps), elapsed)


def test_acomplete_achat_agenerate_match_sync(llm):
    msgs = [{"role": "user", "content": "hello"}]

    async def main():
        a = await llm.acomplete(PROMPTS[0])
        b = await llm.achat(msgs, max_tokens=8)
        c = await llm.agenerate(PROMPTS[:3], max_tokens=8)
        d = await llm.acomplete(PROMPTS[1], n=2, logprobs=True)
        return a, b, c, d

    a, b, c, d = asyncio.run(main())
    assert a.text == llm.complete(PROMPTS[0]).text
    assert b.text == llm.chat(msgs, max_tokens=8).text
    assert [x.text for x in c] == [x.text for x in llm.generate(PROMPTS[:3], max_tokens=8)]
    assert len(d) == 2 and d[0].text == d[1].text
    assert len(d[0].logprobs) == len(d[0].tokens) == 24      # max_tokens=24, ignore_eos


def test_cancelling_a_task_frees_its_sequence(llm):
    async def main():
        task = asyncio.create_task(llm.acomplete(PROMPTS[0], max_tokens=100000, ignore_eos=True))
        await asyncio.sleep(0.3)
        assert any(s["busy"] for s in llm.slots())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # freed within one decode step, not at the next request's step
        deadline = time.perf_counter() + 2.0
        while any(s["busy"] for s in llm.slots()) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        assert not any(s["busy"] for s in llm.slots())
        assert llm.metrics()["requests_processing"] == 0
        # and the LLM still answers
        return await llm.acomplete(PROMPTS[1], max_tokens=4)

    assert len(asyncio.run(main()).tokens) == 4


def test_leaving_an_astream_early_frees_its_sequence(llm):
    async def main():
        stream = llm.astream(PROMPTS[2], max_tokens=100000, chunks=True)
        async for chunk in stream:
            assert isinstance(chunk, Chunk)
            break
        await stream.aclose()
        deadline = time.perf_counter() + 2.0
        while any(s["busy"] for s in llm.slots()) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return llm.slots()

    slots = asyncio.run(main())
    assert slots and not any(s["busy"] for s in slots)


def test_async_and_threads_share_the_engine(llm):
    import threading

    expected = {p: llm.complete(p).text for p in PROMPTS[:4]}
    thread_results: dict = {}

    def worker(p: str) -> None:
        thread_results[p] = llm.complete(p).text

    async def main():
        threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS[:2]]
        for t in threads:
            t.start()
        got = await asyncio.gather(*(llm.acomplete(p) for p in PROMPTS[2:4]))
        for t in threads:
            await asyncio.to_thread(t.join, 60)
        return got

    got = asyncio.run(main())
    assert [g.text for g in got] == [expected[p] for p in PROMPTS[2:4]]
    assert thread_results == {p: expected[p] for p in PROMPTS[:2]}


def test_async_errors_are_raised_in_the_coroutine(llm):
    async def main():
        with pytest.raises(ValueError):
            await llm.acomplete([])
        with pytest.raises(TypeError):
            await llm.acomplete("x", no_such_option=1)
        with pytest.raises(ValueError):
            async for _ in llm.astream("x", top_logprobs=99, logprobs=True):
                pass

    asyncio.run(main())


def test_astream_reports_prompt_progress(tiny_model_path):
    """prompt_progress=True (llama-server's return_progress): before the answer, one report
    where the evaluation starts (the cached tokens, no time spent) and one per prompt chunk
    (n_batch tokens) evaluated, the last at processed == total; with a cached prefix, the start
    is there and the last token alone is evaluated.  Off, or in text mode: no reports."""
    with LLM(tiny_model_path, n_ctx=512, n_batch=16, n_threads=1, verbose=False) as m:
        prompt = "Once upon a time there was " * 8
        n = len(m.tokenize(prompt))
        assert n > 40

        async def run(**kw) -> list:
            return [c async for c in m.astream(prompt, max_tokens=3, temperature=0, ignore_eos=True, **kw)]

        chunks = asyncio.run(run(chunks=True, prompt_progress=True, cache_prompt=False))
        at = [i for i, c in enumerate(chunks) if c.prompt_progress is not None]
        reports = [chunks[i].prompt_progress for i in at]
        assert reports[0] == {"total": n, "cache": 0, "processed": 0, "time_ms": 0.0}
        assert [r["processed"] for r in reports] == [min(16 * k, n) for k in range(-(-n // 16) + 1)]
        times = [r["time_ms"] for r in reports]
        assert times == sorted(times) and times[-1] > 0 and {r["total"] for r in reports} == {n}
        assert all(c.text == "" for c in chunks[:at[-1] + 1]) and at == list(range(len(at)))
        assert "".join(c.text for c in chunks) == m.complete(prompt, max_tokens=3, temperature=0,
                                                             ignore_eos=True).text
        again = asyncio.run(run(chunks=True, prompt_progress=True))           # the prefix is cached now
        reports = [c.prompt_progress for c in again if c.prompt_progress is not None]
        assert [(r["cache"], r["processed"]) for r in reports] == [(n - 1, n - 1), (n - 1, n)]
        assert not [c for c in asyncio.run(run(chunks=True)) if c.prompt_progress is not None]
        assert all(isinstance(t, str) for t in asyncio.run(run(prompt_progress=True)))


def test_sync_stream_and_chat_report_prompt_progress_too(tiny_model_path):
    """LLM.stream / chat(stream=True) with prompt_progress=True: the same reports as the async
    stream, before the answer's text."""
    with LLM(tiny_model_path, n_ctx=512, n_batch=16, n_threads=1, verbose=False, chat_template="chatml") as m:
        prompt = "Once upon a time there was " * 8
        n = len(m.tokenize(prompt))
        chunks = list(m.stream(prompt, chunks=True, prompt_progress=True, max_tokens=3, temperature=0,
                               ignore_eos=True, cache_prompt=False))
        reports = [c.prompt_progress for c in chunks if c.prompt_progress is not None]
        assert [r["processed"] for r in reports] == [min(16 * k, n) for k in range(-(-n // 16) + 1)]
        assert chunks[len(reports)].text and all(c.prompt_progress is None for c in chunks[len(reports):])
        chat = list(m.chat([{"role": "user", "content": prompt}], stream=True, chunks=True, prompt_progress=True,
                           max_tokens=2, temperature=0, cache_prompt=False))
        got = [c.prompt_progress for c in chat if c.prompt_progress is not None]
        assert got[0]["processed"] == 0 and got[-1]["processed"] == got[-1]["total"] > n
